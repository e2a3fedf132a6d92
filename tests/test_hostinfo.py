"""Tests for :mod:`swarmagent.hostinfo`, on fake sysfs trees in a temporary folder."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from swarmagent.hostinfo import HostInfoResource, host_info, pci_devices, physical_disks

reactor: Any = _reactor

# A pci.ids excerpt in the real file's layout: a comment header, vendors,
# devices (one tab), subsystems (two tabs), comments inside blocks, and the
# class section at the end.
PCI_IDS = """\
#
#	List of PCI ID's
#
0010  Allied Telesis, Inc (Wrong ID)
# This is a relabelled RTL-8139
	8139  AT-2500TX V3 Ethernet
1af4  Red Hat, Inc.
	1000  Virtio network device
		1af4 0001  Virtio network device
# a comment inside the block
	1001  Virtio block device
10de  NVIDIA Corporation
	1001  GeForce 256
	1c82  GP107 [GeForce GTX 1050 Ti]
8086  Intel Corporation
	0001  PWM
		8086 0002  Not a device line
ffff  Illegal Vendor ID

# List of known device classes

C 00  Unclassified device
	00  Non-VGA unclassified device
C 01  Mass storage controller
	01  IDE interface
		00  ISA Compatibility mode-only controller
"""


class FakeHost:
    """A host root with just the files host info reads."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, relative: str, text: str | bytes) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return path

    def pci(self, address: str, vendor: str, device: str) -> None:
        # As the kernel writes them: 0x-prefixed hex, a newline.
        self.write(f"sys/bus/pci/devices/{address}/vendor", f"{vendor}\n")
        self.write(f"sys/bus/pci/devices/{address}/device", f"{device}\n")

    def disk(
        self,
        name: str,
        sectors: str = "2048",
        vendor: str | None = None,
        dev: str = "8:0",
        bus_path: str = "pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0",
    ) -> None:
        """/sys/block/<name>, a link into /sys/devices as the kernel makes it."""
        real = self.root / "sys/devices" / bus_path / "block" / name
        real.mkdir(parents=True)
        (real / "size").write_text(f"{sectors}\n")
        (real / "dev").write_text(f"{dev}\n")
        if vendor is not None:
            (real / "device").mkdir()
            (real / "device" / "vendor").write_text(vendor)
        link = self.root / "sys/block" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(real, link.parent))

    def udev(self, dev: str, lines: str) -> None:
        self.write(f"run/udev/data/b{dev}", lines)


class PciTests(unittest.TestCase):
    def setUp(self) -> None:
        self.host = FakeHost(Path(self.mktemp()))
        self.root = str(self.host.root)

    def test_names_from_the_database(self) -> None:
        self.host.write("usr/share/misc/pci.ids", PCI_IDS)
        self.host.pci("0000:00:02.0", "0x10de", "0x1C82")  # upper case is read too
        self.host.pci("0000:00:01.0", "0x1af4", "0x1001")
        self.host.pci("0000:00:03.0", "0x1af4", "0x1002")  # vendor known, device not
        self.host.pci("0000:00:04.0", "0xabcd", "0x0001")  # neither known
        self.assertEqual(
            pci_devices(self.root),
            [  # by address, as sysfs lists them
                {"Vendor": "Red Hat, Inc.", "Name": "Virtio block device"},
                {"Vendor": "NVIDIA Corporation", "Name": "GP107 [GeForce GTX 1050 Ti]"},
                {"Vendor": "Red Hat, Inc.", "Name": "1002"},
                {"Vendor": "abcd", "Name": "0001"},
            ],
        )

    def test_device_names_stay_in_their_vendor_block(self) -> None:
        self.host.write("usr/share/misc/pci.ids", PCI_IDS)
        # 1001 is a device of 1af4 and of 10de; 1c82 of 10de only, after
        # 1af4's block; 0002 a subsystem ID under 8086.
        self.host.pci("0000:00:01.0", "0x10de", "0x1001")
        self.host.pci("0000:00:01.1", "0x1af4", "0x1c82")
        self.host.pci("0000:00:02.0", "0x8086", "0x0002")
        # 8139 follows a comment line inside 0010's block; 0001 is a subclass
        # line in the class section too, after ffff's (empty) block.
        self.host.pci("0000:00:03.0", "0x0010", "0x8139")
        self.host.pci("0000:00:04.0", "0xffff", "0x0001")
        self.assertEqual(
            pci_devices(self.root),
            [
                {"Vendor": "NVIDIA Corporation", "Name": "GeForce 256"},
                {"Vendor": "Red Hat, Inc.", "Name": "1c82"},
                {"Vendor": "Intel Corporation", "Name": "0002"},
                {"Vendor": "Allied Telesis, Inc (Wrong ID)", "Name": "AT-2500TX V3 Ethernet"},
                {"Vendor": "Illegal Vendor ID", "Name": "0001"},
            ],
        )

    def test_first_line_and_last_line(self) -> None:
        self.host.write("usr/share/misc/pci.ids", "1af4  Red Hat\n\t1000  Net\nffff  Last")
        self.host.pci("0000:00:01.0", "0x1af4", "0x1000")
        self.host.pci("0000:00:02.0", "0xffff", "0x1000")
        self.assertEqual(
            pci_devices(self.root),
            [{"Vendor": "Red Hat", "Name": "Net"}, {"Vendor": "Last", "Name": "1000"}],
        )

    def test_without_a_database_the_ids(self) -> None:
        self.host.pci("0000:00:01.0", "0x1af4", "0x1000")
        self.assertEqual(pci_devices(self.root), [{"Vendor": "1af4", "Name": "1000"}])

    def test_database_places_in_ghws_order(self) -> None:
        self.host.pci("0000:00:01.0", "0x1af4", "0x1000")
        self.host.write(
            "usr/share/misc/pci.ids.gz", gzip.compress(b"1af4  From misc gz\n\t1000  Gz\n")
        )
        self.assertEqual(pci_devices(self.root), [{"Vendor": "From misc gz", "Name": "Gz"}])
        self.host.write("usr/share/misc/pci.ids", "1af4  From misc\n\t1000  Plain\n")
        self.assertEqual(pci_devices(self.root), [{"Vendor": "From misc", "Name": "Plain"}])
        self.host.write("usr/share/hwdata/pci.ids", "1af4  From hwdata\n\t1000  Plain\n")
        self.assertEqual(pci_devices(self.root), [{"Vendor": "From hwdata", "Name": "Plain"}])

    def test_unreadable_database_is_skipped(self) -> None:
        self.host.pci("0000:00:01.0", "0x1af4", "0x1000")
        self.host.write("usr/share/hwdata/pci.ids.gz", b"\x1f\x8b truncated")
        (self.host.root / "usr/share/hwdata/pci.ids").mkdir()
        self.host.write("usr/share/misc/pci.ids.gz", gzip.compress(b"1af4  Gz\n\t1000  Gz net\n"))
        self.assertEqual(pci_devices(self.root), [{"Vendor": "Gz", "Name": "Gz net"}])

    def test_unreadable_ids_leave_the_device_out(self) -> None:
        self.host.pci("0000:00:01.0", "0x1af4", "0x1000")
        self.host.pci("0000:00:02.0", "garbage", "0x1000")
        self.host.write("sys/bus/pci/devices/0000:00:03.0/vendor", "0x1af4\n")  # no device file
        self.assertEqual(pci_devices(self.root), [{"Vendor": "1af4", "Name": "1000"}])

    def test_no_pci_folder_is_null(self) -> None:
        self.host.write("usr/share/misc/pci.ids", PCI_IDS)
        self.assertIsNone(pci_devices(self.root))

    def test_empty_pci_folder_is_an_empty_list(self) -> None:
        (self.host.root / "sys/bus/pci/devices").mkdir(parents=True)
        self.assertEqual(pci_devices(self.root), [])


class DiskTests(unittest.TestCase):
    def setUp(self) -> None:
        self.host = FakeHost(Path(self.mktemp()))
        self.root = str(self.host.root)

    def test_size_in_bytes_and_vendor_trimmed(self) -> None:
        self.host.disk("sda", sectors="976773168", vendor="ATA     \n")
        self.assertEqual(physical_disks(self.root), [{"Vendor": "ATA", "Size": 976773168 * 512}])

    def test_vendor_from_udev_then_unknown(self) -> None:
        self.host.disk("nvme0n1", dev="259:0", bus_path="pci0000:00/0000:00:1d.0/nvme/nvme0")
        self.host.udev("259:0", "S:disk/by-id/x\nE:ID_MODEL=Disk\nE:ID_VENDOR=Samsung\nG:y\n")
        self.host.disk("sdb", vendor="  \n", dev="8:16")  # blank: udev is asked
        self.host.udev("8:16", "E:ID_VENDOR=WDC\n")
        self.host.disk("vda", dev="254:0", bus_path="pci0000:00/0000:00:04.0/virtio1")
        self.assertEqual(
            physical_disks(self.root),
            [
                {"Vendor": "Samsung", "Size": 2048 * 512},
                {"Vendor": "WDC", "Size": 2048 * 512},
                {"Vendor": "unknown", "Size": 2048 * 512},
            ],
        )

    def test_unreadable_size_is_zero(self) -> None:
        self.host.disk("sda", sectors="many", vendor="ATA")
        self.host.disk("sdb", vendor="ATA")
        (self.host.root / "sys/block/sdb/size").unlink()
        self.assertEqual(
            physical_disks(self.root),
            [{"Vendor": "ATA", "Size": 0}, {"Vendor": "ATA", "Size": 0}],
        )

    def test_virtual_devices_are_left_out(self) -> None:
        virtual = "virtual"
        # Named ones, even where they are no links (an odd sysfs copy).
        for name in ("loop0", "ram0", "zram0", "dm-0", "md127", "nbd0"):
            self.host.disk(name, bus_path=virtual)
        self.host.write("sys/block/loop7/size", "8\n")
        # Any other the kernel files as virtual (a ZFS volume, DRBD).
        self.host.disk("zd0", bus_path=virtual)
        self.host.disk("drbd1", bus_path=virtual)
        # Hardware: kept, optical drives included (ghw lists them).
        self.host.disk("sr0", sectors="0", vendor="QEMU    ")
        self.host.disk("sda", vendor="ATA")
        self.assertEqual(
            physical_disks(self.root),
            [{"Vendor": "ATA", "Size": 2048 * 512}, {"Vendor": "QEMU", "Size": 0}],
        )

    def test_no_block_folder_is_null(self) -> None:
        self.assertIsNone(physical_disks(self.root))

    def test_empty_block_folder_is_an_empty_list(self) -> None:
        (self.host.root / "sys/block").mkdir(parents=True)
        self.assertEqual(physical_disks(self.root), [])


class HostInfoTests(unittest.TestCase):
    def test_the_reference_shape(self) -> None:
        host = FakeHost(Path(self.mktemp()))
        host.write("usr/share/hwdata/pci.ids", PCI_IDS)
        host.pci("0000:00:01.0", "0x8086", "0x0001")
        host.disk("sda", vendor="ATA")
        self.assertEqual(
            json.loads(json.dumps(host_info(str(host.root)))),
            {
                "PCIDevices": [{"Vendor": "Intel Corporation", "Name": "PWM"}],
                "PhysicalDisks": [{"Vendor": "ATA", "Size": 1048576}],
            },
        )

    def test_nothing_mounted_is_null_null(self) -> None:
        self.assertEqual(host_info(self.mktemp()), {"PCIDevices": None, "PhysicalDisks": None})


class ResourceTests(unittest.TestCase):
    """The resource on the real reactor and its thread pool."""

    def render(self, resource: HostInfoResource) -> Deferred[DummyRequest]:
        request = DummyRequest([b""])
        resource.render(request)
        return request.notifyFinish().addCallback(lambda _: request)

    async def test_answers_json(self) -> None:
        host = FakeHost(Path(self.mktemp()))
        host.pci("0000:00:01.0", "0x1af4", "0x1000")
        request = await self.render(HostInfoResource(str(host.root), reactor))
        self.assertEqual(request.responseCode or 200, 200)
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"]
        )
        self.assertEqual(
            json.loads(b"".join(request.written)),
            {"PCIDevices": [{"Vendor": "1af4", "Name": "1000"}], "PhysicalDisks": None},
        )

    async def test_unexpected_error_is_the_references_500(self) -> None:
        # A NUL byte in the root: not an OSError, so nothing expects it.
        request = await self.render(HostInfoResource("/no\0where", reactor))
        self.assertEqual(request.responseCode, 500)
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"]
        )
        body = json.loads(b"".join(request.written))
        self.assertEqual(body["message"], "Unable to retrieve host information")
        self.assertIn("null byte", body["details"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_client_gone_before_the_answer(self) -> None:
        host = FakeHost(Path(self.mktemp()))
        host.pci("0000:00:01.0", "0x1af4", "0x1000")
        threads = ManualThreads()
        request = DummyRequest([b""])
        # ManualThreads is the thread pool only, not a whole IReactorThreads.
        HostInfoResource(str(host.root), threads).render(request)  # type: ignore[arg-type]
        request.processingFailed(Failure(ConnectionError("gone")))
        threads.run()
        self.assertEqual(request.written, [])
        self.assertEqual(request.finished, 0)
        # The same, with the client still there, does answer.
        request = DummyRequest([b""])
        HostInfoResource(str(host.root), threads).render(request)  # type: ignore[arg-type]  # as above
        threads.run()
        self.assertEqual(request.finished, 1)
        self.assertIn(b"1af4", b"".join(request.written))


class ManualThreads:
    """A reactor's thread pool whose work runs when the test says (in its thread)."""

    def __init__(self) -> None:
        self.work: list[tuple[Any, Any, tuple[Any, ...]]] = []

    def getThreadPool(self) -> ManualThreads:
        return self

    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any) -> None:
        self.work.append((on_result, f, args))

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)

    def run(self) -> None:
        on_result, f, args = self.work.pop(0)
        on_result(True, f(*args))
