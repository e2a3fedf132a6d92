"""``/host/info``: the host's PCI devices and physical disks, read from sysfs.

The reference agent asks ghw, chrooted at ``/host``; this reads the same
files: ``sys/bus/pci/devices``, ``sys/block``, the PCI ID database and udev's.
"""

from __future__ import annotations

import gzip
import json
import os
import re

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from swarmagent.errors import describe, write_error
from swarmagent.logs import logger
from swarmagent.twisted_types import Rendered

log = logger(__name__)

# ghw's search order (pcidb): the distribution's database, plain or gzipped.
PCI_IDS = (
    "usr/share/hwdata/pci.ids",
    "usr/share/misc/pci.ids",
    "usr/share/hwdata/pci.ids.gz",
    "usr/share/misc/pci.ids.gz",
)

# Block devices that are no hardware: loop files, RAM disks (brd, zram),
# device-mapper (LVM, LUKS, multipath), software RAID and network block
# devices. Each stands on disks already listed (or on none), so listing it
# would count capacity twice. The kernel puts them all under
# /sys/devices/virtual, which catches the others (zd, drbd, ...). ghw leaves
# out loop devices only. Optical (sr) and floppy (fd) drives are kept: they
# are hardware, and ghw lists them.
VIRTUAL_DISKS = ("loop", "ram", "zram", "dm-", "md", "nbd")

# ghw's word for a disk vendor it cannot read.
UNKNOWN = "unknown"

SECTOR = 512

_HEX_ID = re.compile(r"(?:0x)?([0-9a-f]{4})")
# The line after a vendor's block: anything but a device line, a comment or a blank.
_BLOCK_END = re.compile(rb"\n[^\t#\n]")


def host_info(root: str = "/") -> dict[str, object]:
    """What the reference answers: ``{"PCIDevices": [...], "PhysicalDisks": [...]}``.

    A list whose sysfs folder cannot be read is ``None`` (JSON ``null``).
    """
    return {"PCIDevices": pci_devices(root), "PhysicalDisks": physical_disks(root)}


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().strip()


def _listdir(path: str) -> list[str] | None:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return None


def _pci_id(path: str) -> str | None:
    """A sysfs ID file (``0x8086``) as pci.ids spells it (``8086``), or None."""
    try:
        match = _HEX_ID.fullmatch(_read(path).lower())
    except OSError:
        return None
    return match.group(1) if match else None


def pci_devices(root: str = "/") -> list[dict[str, str]] | None:
    """``[{"Vendor", "Name"}]`` for each PCI function, by address.

    Names come from the PCI ID database when the host has one, else the hex
    IDs; a function whose IDs cannot be read is left out, as ghw does.
    """
    folder = os.path.join(root, "sys/bus/pci/devices")
    addresses = _listdir(folder)
    if addresses is None:
        return None
    ids: list[tuple[str, str]] = []
    for address in addresses:
        vendor = _pci_id(os.path.join(folder, address, "vendor"))
        device = _pci_id(os.path.join(folder, address, "device"))
        if vendor is not None and device is not None:
            ids.append((vendor, device))
    names = pci_names(root, set(ids))
    return [
        {"Vendor": names.get(vendor, vendor), "Name": names.get(vendor + device, device)}
        for vendor, device in ids
    ]


def _pci_database(root: str) -> bytes | None:
    for relative in PCI_IDS:
        path = os.path.join(root, relative)
        try:
            if path.endswith(".gz"):
                with gzip.open(path) as f:
                    return f.read()
            with open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError):  # absent, unreadable or a truncated gzip
            continue
    return None


def _find_line(data: bytes, prefix: bytes, key: bytes, start: int, end: int) -> int:
    """Where ``key`` starts on the first line ``prefix + key`` in [start, end), or -1.

    Searching for ``key`` and checking what precedes it is several times
    faster than searching for the whole, which starts with a common byte.
    """
    at = data.find(key, start, end)
    while at >= 0:
        if at >= len(prefix) and data[at - len(prefix) : at] == prefix:
            return at
        at = data.find(key, at + 1, end)
    return -1


def _rest_of_line(data: bytes, at: int) -> str:
    stop = data.find(b"\n", at)
    return data[at : len(data) if stop < 0 else stop].decode("utf-8", "replace").strip()


def pci_names(root: str, ids: set[tuple[str, str]]) -> dict[str, str]:
    """Names from the host's pci.ids, for these IDs only.

    Keys: a vendor ID (``"8086"``) for its name, vendor and device IDs together
    (``"80861237"``) for the device's. IDs the database lacks are absent.
    The file (about 1.3 MB) is searched for each name, not parsed whole.
    """
    data = _pci_database(root) if ids else None
    if data is None:
        return {}
    data = b"\n" + data  # every vendor line now follows a newline
    names: dict[str, str] = {}
    for vendor in {v for v, _ in ids}:
        key = vendor.encode("ascii") + b"  "
        at = _find_line(data, b"\n", key, 0, len(data))
        if at < 0:
            continue
        names[vendor] = _rest_of_line(data, at + len(key))
        block = data.find(b"\n", at)
        if block < 0:
            continue  # the last line: no devices
        block_end = _BLOCK_END.search(data, block)
        end = block_end.start() if block_end else len(data)
        for device in {d for v, d in ids if v == vendor}:
            key = device.encode("ascii") + b"  "
            found = _find_line(data, b"\n\t", key, block, end)
            if found >= 0:
                names[vendor + device] = _rest_of_line(data, found + len(key))
    return names


def _is_virtual(folder: str, name: str) -> bool:
    if name.startswith(VIRTUAL_DISKS):
        return True
    try:
        # /sys/block/x is a link to ../devices/<bus path>/block/x.
        return "/devices/virtual/" in os.readlink(os.path.join(folder, name))
    except OSError:
        return False


def _disk_size(path: str) -> int:
    """Bytes; 0 when unreadable, as ghw answers."""
    try:
        return int(_read(path)) * SECTOR
    except (OSError, ValueError):
        return 0


def _udev_vendor(root: str, disk: str) -> str:
    """``ID_VENDOR`` from udev's database, or ``""``."""
    try:
        number = _read(os.path.join(disk, "dev"))
        with open(os.path.join(root, "run/udev/data", "b" + number), encoding="utf-8") as f:
            for line in f:
                if line.startswith("E:ID_VENDOR="):
                    return line[len("E:ID_VENDOR=") :].strip()
    except (OSError, UnicodeDecodeError):
        pass
    return ""


def _disk_vendor(root: str, disk: str) -> str:
    try:
        vendor = _read(os.path.join(disk, "device", "vendor"))
    except OSError:
        vendor = ""
    return vendor or _udev_vendor(root, disk) or UNKNOWN


def physical_disks(root: str = "/") -> list[dict[str, object]] | None:
    """``[{"Vendor", "Size"}]`` for each whole disk (not partitions), by name; Size in bytes."""
    folder = os.path.join(root, "sys/block")
    names = _listdir(folder)
    if names is None:
        return None
    disks = []
    for name in names:
        if _is_virtual(folder, name):
            continue
        disk = os.path.join(folder, name)
        disks.append(
            {"Vendor": _disk_vendor(root, disk), "Size": _disk_size(os.path.join(disk, "size"))}
        )
    return disks


class HostInfoResource(Resource):
    """``GET /host/info``: this host's devices and disks, as JSON.

    Read in the reactor's thread pool: a big host (hundreds of PCI functions
    with SR-IOV, hundreds of disks with their udev records) costs thousands
    of file reads, and the pci.ids search ~10 ms of CPU; on the reactor
    thread that would stall every stream the agent relays. File reads release
    the GIL, and the search is a few C calls the reactor can run between.
    """

    isLeaf = True

    def __init__(self, root: str, reactor: IReactorThreads) -> None:
        super().__init__()
        self._root = root
        self._reactor = reactor

    def render_GET(self, request: Request) -> Rendered:
        Deferred.fromCoroutine(self._serve(request))
        return NOT_DONE_YET

    async def _serve(self, request: Request) -> None:
        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)
        pool = self._reactor.getThreadPool()
        try:
            info = await deferToThreadPool(self._reactor, pool, host_info, self._root)
        except Exception as e:
            log.failure("Host information from {root}", root=self._root)
            body = write_error(request, 500, "Unable to retrieve host information", describe(e))
        else:
            request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
            body = json.dumps(info).encode("utf-8")
        if not gone:
            request.write(body)
            request.finish()
