"""Portainer's volume and host file browser, served on this node.

Every path is confined to its root (the volume's folder, or the host root
the agent was given): ``.`` and ``..`` segments, raw or percent-encoded, and
NUL bytes are refused, and the path is walked one component at a time from
the root's descriptor with ``O_NOFOLLOW``, so no symbolic link is ever
followed. A container can plant any link in its own volume; browsing it must
not reach the agent's or the host's files. Every disk operation after the
walk is relative to a directory descriptor: nothing is looked up again by
name from ``/``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from io import BytesIO
from typing import IO, Protocol, TypeVar
from urllib.parse import quote, unquote

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.web import static
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from swarmagent.clients import ENGINE_BASE, get_within
from swarmagent.errors import describe, write_error
from swarmagent.logs import logger
from swarmagent.routing import strip_version
from swarmagent.twisted_types import Rendered, request_args, request_body

log = logger(__name__)

#: What each operation answers to (HEAD with GET, as any static file).
METHODS: dict[str, tuple[bytes, ...]] = {
    "ls": (b"GET",),
    "get": (b"GET", b"HEAD"),
    "delete": (b"DELETE",),
    "rename": (b"PUT",),
    "put": (b"POST",),
}

# The reference agent's messages, kept so Portainer shows the same text; the
# details say why.
FAILED = {
    "ls": "Unable to list files inside specified directory",
    "get": "Unable to open file",
    "delete": "Unable to remove file",
    "rename": "Unable to rename file",
    "put": "Error saving file to disk",
}
BAD_PATH = "Invalid query parameter: path"
BAD_PAYLOAD = "Invalid request payload"
BAD_FILENAME = "Invalid filename"
NO_HOST_BROWSER = "The host browser is not enabled on this node"

CHUNK = 64 * 1024
MAX_PATH = 4096
MAX_JSON = 64 * 1024
MAX_PART_HEADERS = 16 * 1024

_BROWSE = re.compile(r"^(?:/v2)?/browse/([^/]+)$")
_BROWSE_V1 = re.compile(r"^/v1/browse/([^/]+)/([^/]+)$")

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Non-blocking and no controlling tty: opening a FIFO or a device planted in a
# volume must neither hang the agent nor change its terminal (it is refused
# right after, by fstat).
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY

T = TypeVar("T")


class Runner(Protocol):
    """Runs a blocking call and gives its result: in the reactor's thread pool."""

    def __call__(self, f: Callable[..., T], /, *args: object) -> Deferred[T]: ...


def threaded(reactor: IReactorThreads) -> Runner:
    """A runner for the disk work: the reactor's thread pool."""

    def run(f: Callable[..., T], /, *args: object) -> Deferred[T]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


# --- routes ------------------------------------------------------------------


def parse_browse_path(bare: str) -> tuple[str, str | None] | None:
    """``(op, volume ID from the path or None)`` for a browse route, else None.

    ``bare`` has no ``/vX.Y`` prefix: ``/browse/ls``, ``/v2/browse/ls`` and
    the legacy ``/v1/browse/{volumeID}/ls``.
    """
    if (m := _BROWSE.match(bare)) and m[1] in METHODS:
        return m[1], None
    if (m := _BROWSE_V1.match(bare)) and m[2] in METHODS:
        return m[2], unquote(m[1])
    return None


def browse_paths(volume: str = "data") -> frozenset[bytes]:
    """Every browse route (the legacy ones for ``volume``), for whoever lists routes."""
    forms = ("/browse/{op}", "/v2/browse/{op}", f"/v1/browse/{quote(volume)}/{{op}}")
    return frozenset(form.format(op=op).encode("ascii") for form in forms for op in METHODS)


def volume_of(request: Request) -> str | None:
    """The volume a browse request names: in its path, else in ``volumeID``."""
    parsed = parse_browse_path(strip_version(request.path.decode("latin-1")))
    if parsed and parsed[1]:
        return parsed[1]
    return _arg(request, b"volumeID")


def _arg(request: Request, name: bytes) -> str | None:
    args = request_args(request)
    values = args.get(name)
    if not values or not values[0]:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(400, f"{name.decode()} is not UTF-8", BAD_PATH) from None


# --- errors ------------------------------------------------------------------


class Refused(Exception):
    """A request that fails with ``code``; ``message`` defaults to the op's."""

    def __init__(self, code: int, details: str, message: str | None = None) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.message = message


def _symlink(shown: str) -> Refused:
    return Refused(403, f"{shown} is a symbolic link: symbolic links are not followed")


def _os_error(e: OSError, shown: str) -> Refused:
    """An OSError met on ``shown`` (the path as the client gave it), as a status."""
    code = {
        errno.ENOENT: 404,
        errno.EEXIST: 409,
        errno.ENOTEMPTY: 409,
        errno.EISDIR: 409,
        errno.EACCES: 403,
        errno.EPERM: 403,
        errno.EROFS: 403,
        errno.ENOTDIR: 400,
        errno.EINVAL: 400,
        errno.ENAMETOOLONG: 400,
        errno.ELOOP: 403,
    }.get(e.errno or 0, 500)
    return Refused(code, f"{shown}: {e.strerror or describe(e)}")


# --- confinement -------------------------------------------------------------


def _dot(segment: str) -> bool:
    """Whether ``segment`` is ``.`` or ``..``, however often percent-encoded."""
    for _ in range(8):
        if segment in (".", ".."):
            return True
        decoded = unquote(segment)
        if decoded == segment:
            return False
        segment = decoded
    return True  # encoded past any honest use


def split_path(raw: str, message: str = BAD_PATH) -> list[str]:
    """The components of a client path; raise Refused(400) on a bad one.

    Empty components (``a//b``, a leading or trailing ``/``) are dropped.
    A backslash is an ordinary character on Linux, but ``..`` between
    backslashes is refused as well, as the reference agent does.
    """
    if "\0" in raw:
        raise Refused(400, "the path contains a NUL byte", message)
    if len(raw.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise Refused(400, "the path is too long", message)
    parts = [p for p in raw.split("/") if p]
    if any(_dot(piece) for p in parts for piece in p.split("\\")):
        raise Refused(400, f"{raw}: '.' and '..' segments are not allowed", message)
    return parts


@dataclass(frozen=True)
class Root:
    """The folder a request is confined to.

    ``base`` is None for a volume (client paths are relative to its folder),
    else the host root's components (client paths are absolute and must lie
    under it). ``missing`` explains a root the agent cannot open.
    """

    path: str
    base: tuple[str, ...] | None
    missing: str

    def parts(self, raw: str | None, message: str = BAD_PATH) -> list[str]:
        """The components of ``raw`` below the root."""
        if raw is None:
            raise Refused(400, "the path is missing", message)
        parts = split_path(raw, message)
        if self.base is None:
            return parts
        n = len(self.base)
        if not raw.startswith("/") or tuple(parts[:n]) != self.base:
            inside = "/" + "/".join(self.base)
            raise Refused(400, f"{raw} is not an absolute path under {inside}", message)
        return parts[n:]

    def shown(self, parts: Sequence[str]) -> str:
        """``parts`` as the client would name them."""
        return "/" + "/".join((*(self.base or ()), *parts))

    @contextmanager
    def opened(self) -> Iterator[int]:
        """A descriptor on the root folder (whose own path is trusted)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise Refused(500, f"{self.missing} ({e.strerror})") from e
        try:
            yield fd
        finally:
            os.close(fd)


def host_root_at(path: str) -> Root:
    """The root of the host browser: the host's root as mounted in the agent."""
    path = os.path.normpath(os.path.abspath(path))
    base = tuple(p for p in path.split("/") if p)
    missing = f"the host root {path} is not a folder the agent can see: mount the host's root there"
    return Root(path, base, missing)


def volume_root(name: str, mountpoint: str) -> Root:
    """The root of a local volume, read where the engine says it is."""
    missing = (
        f"the folder of volume {name}, {mountpoint}, is not visible to the agent: "
        "mount the engine's volume folder (/var/lib/docker/volumes) into the agent "
        "at the same path, as the stack does"
    )
    return Root(mountpoint, None, missing)


def _lstat(name: str, parent: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None


def open_dir(root: Root, root_fd: int, parts: Sequence[str], *, create: bool = False) -> int:
    """A new descriptor on the folder at ``parts`` below ``root_fd``.

    Each component is opened from its parent with ``O_NOFOLLOW``: a symbolic
    link anywhere is refused, never followed. With ``create``, missing
    folders are made (0755).
    """
    fd = os.open(".", _DIR, dir_fd=root_fd)
    try:
        for i, name in enumerate(parts):
            if create:
                with suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
            try:
                child = os.open(name, _DIR, dir_fd=fd)
            except OSError as e:
                shown = root.shown(parts[: i + 1])
                st = _lstat(name, fd)
                if st is not None and stat.S_ISLNK(st.st_mode):
                    raise _symlink(shown) from e
                if e.errno == errno.ENOTDIR:
                    raise Refused(400, f"{shown} is not a folder") from e
                if e.errno == errno.ENOENT:
                    raise Refused(404, f"{shown}: no such folder") from e
                raise _os_error(e, shown) from e
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def parent_of(root: Root, root_fd: int, parts: Sequence[str]) -> Iterator[tuple[int, str]]:
    """The folder holding ``parts``' last component, and that name; the
    root itself is refused (it is neither removed nor renamed)."""
    if not parts:
        raise Refused(400, "the path names the root folder itself", BAD_PATH)
    fd = open_dir(root, root_fd, parts[:-1])
    try:
        yield fd, parts[-1]
    finally:
        os.close(fd)


# --- the operations (blocking: run by the Runner) ----------------------------


def list_dir(root: Root, parts: list[str]) -> list[dict[str, object]]:
    """``ls``: the folder's entries, links listed as themselves (not as Dir)."""
    with root.opened() as root_fd:
        fd = open_dir(root, root_fd, parts)
        try:
            found = []
            with os.scandir(fd) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:  # removed while listed
                        continue
                    found.append(
                        {
                            "Name": entry.name,
                            "Size": st.st_size,
                            "Dir": stat.S_ISDIR(st.st_mode),
                            "ModTime": st.st_mtime_ns // 1_000_000_000,
                        }
                    )
            return found
        finally:
            os.close(fd)


def open_file(root: Root, parts: list[str]) -> int:
    """``get``: a descriptor on a regular file (the caller closes it)."""
    with root.opened() as root_fd, parent_of(root, root_fd, parts) as (parent, name):
        shown = root.shown(parts)
        st = _lstat(name, parent)
        if st is None:
            raise Refused(404, f"{shown}: no such file")
        _regular(st, shown)
        try:
            fd = os.open(name, _FILE, dir_fd=parent)
        except OSError as e:
            raise (_symlink(shown) if e.errno == errno.ELOOP else _os_error(e, shown)) from e
        try:
            # It may have been swapped since the lstat.
            _regular(os.fstat(fd), shown)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _regular(st: os.stat_result, shown: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise _symlink(shown)
    if stat.S_ISDIR(st.st_mode):
        raise Refused(400, f"{shown} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise Refused(400, f"{shown} is not a regular file")


def remove(root: Root, parts: list[str]) -> None:
    """``delete``: a file, a link (not its target) or a folder with its content."""
    with root.opened() as root_fd, parent_of(root, root_fd, parts) as (parent, name):
        shown = root.shown(parts)
        st = _lstat(name, parent)
        if st is None:
            raise Refused(404, f"{shown}: no such file or folder")
        try:
            if stat.S_ISDIR(st.st_mode):
                # The fd-based rmtree: it never follows a link met inside.
                shutil.rmtree(name, dir_fd=parent)
            else:
                os.unlink(name, dir_fd=parent)
        except OSError as e:
            raise _os_error(e, shown) from e


def rename(root: Root, current: list[str], new: list[str]) -> None:
    """``rename``: within the root; an existing target is a conflict."""
    with (
        root.opened() as root_fd,
        parent_of(root, root_fd, current) as (src, old_name),
        parent_of(root, root_fd, new) as (dst, new_name),
    ):
        shown = root.shown(current)
        if _lstat(old_name, src) is None:
            raise Refused(404, f"{shown}: no such file or folder")
        if _lstat(new_name, dst) is not None:
            raise Refused(409, f"{root.shown(new)} already exists")
        try:
            os.rename(old_name, new_name, src_dir_fd=src, dst_dir_fd=dst)
        except OSError as e:
            raise _os_error(e, shown) from e


def _body_of(request: Request) -> IO[bytes]:
    """The request body as a file of our own: the request closes its
    ``content`` if the client goes away, while a thread may be reading it."""
    content = request_body(request)
    assert content is not None
    try:
        fd = content.fileno()
    except (AttributeError, OSError, ValueError):
        # Small bodies are kept in memory by twisted.web.
        content.seek(0)
        return BytesIO(content.read())
    return os.fdopen(os.dup(fd), "rb")


# --- multipart/form-data -----------------------------------------------------


class Malformed(ValueError):
    """The body is not the multipart document it claims to be."""


@dataclass(frozen=True)
class PartStart:
    """A part's headers; ``name`` and ``filename`` from its Content-Disposition."""

    name: str | None
    filename: str | None


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd

_PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _EPILOGUE = range(5)
_TSPECIALS = frozenset('()<>@,;:\\"/[]?=')
_ESCAPED = re.compile(r'\\([()<>@,;:\\"/\[\]?=])')


class MultipartParser:
    """A push parser for multipart/form-data with bounded memory.

    ``feed`` takes the body in pieces of any size and returns the events they
    complete; ``close`` checks that the closing delimiter was seen. Part data
    is never held beyond one piece plus a delimiter's length.
    """

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"\r\n--" + boundary
        # The first delimiter has no line break before it: lend it one.
        self._buf = bytearray(b"\r\n")
        self._state = _PREAMBLE

    def feed(self, data: bytes) -> list[Event]:
        buf = self._buf
        buf += data
        events: list[Event] = []
        delimiter = self._delimiter
        while True:
            if self._state == _PREAMBLE:
                i = buf.find(delimiter)
                if i < 0:
                    del buf[: max(0, len(buf) - len(delimiter) + 1)]
                    return events
                del buf[: i + len(delimiter)]
                self._state = _AFTER_DELIMITER
            elif self._state == _AFTER_DELIMITER:
                # "--" closes; else optional blanks, then the line break.
                blanks = len(buf) - len(buf.lstrip(b" \t"))
                if blanks > 1024:
                    raise Malformed("a delimiter line is too long")
                rest = buf[blanks : blanks + 2]
                if len(rest) < 2:
                    return events
                if rest == b"--" and not blanks:
                    self._state = _EPILOGUE
                elif rest == b"\r\n":
                    del buf[:blanks]  # the line break opens the headers
                    self._state = _HEADERS
                else:
                    raise Malformed("a delimiter is not followed by a line break")
            elif self._state == _HEADERS:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_PART_HEADERS:
                        raise Malformed("a part's headers are too long")
                    return events
                if end > MAX_PART_HEADERS:
                    raise Malformed("a part's headers are too long")
                events.append(_part_start(bytes(buf[2:end])))
                del buf[: end + 4]
                self._state = _BODY
            elif self._state == _BODY:
                i = buf.find(delimiter)
                # The boundary only counts when a delimiter line follows it:
                # wait for the byte after it before deciding.
                while i >= 0 and i + len(delimiter) < len(buf):
                    if buf[i + len(delimiter)] in b"-\r \t":
                        break
                    i = buf.find(delimiter, i + 1)
                if i < 0 or i + len(delimiter) == len(buf):
                    # Hold back what may be the start of a delimiter.
                    safe = i if i >= 0 else max(0, len(buf) - len(delimiter))
                    if safe:
                        events.append(PartData(bytes(buf[:safe])))
                        del buf[:safe]
                    return events
                if i:
                    events.append(PartData(bytes(buf[:i])))
                events.append(PartEnd())
                del buf[: i + len(delimiter)]
                self._state = _AFTER_DELIMITER
            else:  # the epilogue is ignored
                buf.clear()
                return events

    def close(self) -> None:
        if self._state != _EPILOGUE:
            raise Malformed("the body ends before its closing delimiter")


def _part_start(block: bytes) -> PartStart:
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("a part's headers are not UTF-8") from None
    disposition = None
    for line in text.split("\r\n") if text else ():
        field, colon, value = line.partition(":")
        if not colon:
            raise Malformed(f"a part's header line has no colon: {line[:80]!r}")
        if field.strip().lower() == "content-disposition":
            disposition = value
    if disposition is None:
        return PartStart(None, None)
    kind, params = parse_params(disposition)
    if kind.lower() != "form-data":
        return PartStart(None, None)
    return PartStart(params.get("name"), params.get("filename"))


def parse_params(value: str) -> tuple[str, dict[str, str]]:
    """A header value's type and its parameters (names lower-cased).

    Quoted strings unescape a backslash before a special character only, as
    Go's mime package does (browsers send ``C:\\dir`` unescaped); an RFC 5987
    ``name*=UTF-8''…`` value wins over the plain one.
    """
    items: list[str] = []
    current: list[str] = []
    quoted = False
    i = 0
    while i < len(value):
        c = value[i]
        if quoted and c == "\\" and i + 1 < len(value) and value[i + 1] in _TSPECIALS:
            current.append(c + value[i + 1])
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        if c == ";" and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    if quoted:
        raise Malformed("an unterminated quoted string in a header")
    items.append("".join(current))
    params: dict[str, str] = {}
    extended: dict[str, str] = {}
    for item in items[1:]:
        key, eq, raw = item.strip().partition("=")
        if not eq:
            continue
        key, raw = key.strip().lower(), raw.strip()
        if key.endswith("*"):
            charset, _, encoded = raw.partition("''")
            if charset.lower() not in ("utf-8", "us-ascii"):
                raise Malformed(f"unsupported charset {charset!r} in a header")
            extended[key[:-1]] = unquote(encoded, errors="strict")
        elif raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            params[key] = _ESCAPED.sub(r"\1", raw[1:-1])
        else:
            params[key] = raw
    params.update(extended)
    return items[0].strip(), params


def boundary_of(content_type: bytes | None) -> bytes:
    """The boundary of a multipart/form-data Content-Type."""
    if not content_type:
        raise Malformed("no Content-Type: expected multipart/form-data")
    kind, params = parse_params(content_type.decode("latin-1"))
    if kind.lower() != "multipart/form-data":
        raise Malformed(f"the Content-Type is {kind}, not multipart/form-data")
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= 200:
        raise Malformed("the Content-Type has no valid boundary")
    return boundary.encode("latin-1")


def read_events(body: IO[bytes], boundary: bytes) -> Iterator[Event]:
    """Parse ``body`` from its start, a chunk at a time."""
    body.seek(0)
    parser = MultipartParser(boundary)
    while chunk := body.read(CHUNK):
        yield from parser.feed(chunk)
    parser.close()


@dataclass(frozen=True)
class Upload:
    """What a put body holds, short of the file's content."""

    path: str
    filename: str


def read_form(body: IO[bytes], boundary: bytes) -> Upload:
    """Check the whole body and read its fields; the file's data is skipped.

    Fields may come in any order; the first of each name counts.
    """
    path: str | None = None
    filename: str | None = None
    field: str | None = None
    value = bytearray()
    try:
        for event in read_events(body, boundary):
            if isinstance(event, PartStart):
                field = event.name
                value.clear()
                if field == "file" and filename is None:
                    if not event.filename:
                        raise Refused(400, "the file field has no filename", BAD_PAYLOAD)
                    filename = event.filename
            elif isinstance(event, PartData) and field == "Path" and path is None:
                value += event.data
                if len(value) > MAX_PATH:
                    raise Refused(400, "the Path field is too long", BAD_PAYLOAD)
            elif isinstance(event, PartEnd) and field == "Path" and path is None:
                path = value.decode("utf-8")
    except (Malformed, UnicodeDecodeError) as e:
        raise Refused(400, f"malformed multipart body: {e}", BAD_PAYLOAD) from e
    if filename is None:
        raise Refused(400, "no file in the field 'file'", BAD_PAYLOAD)
    if path is None:
        raise Refused(400, "no target folder in the field 'Path'", BAD_PAYLOAD)
    if filename in (".", "..") or any(c in filename for c in "/\0"):
        raise Refused(400, f"{filename!r} is not a plain file name", BAD_FILENAME)
    return Upload(path, filename)


def save_upload(root: Root, body: IO[bytes], boundary: bytes) -> None:
    """``put``: the file into the Path folder (made if missing), atomically.

    The body is read twice, from the file twisted.web spooled it to: once to
    check it and find the fields (in any order), once to copy the file's
    data. It goes to a new file in the target folder, synced, then renamed
    over the final name: a failed upload leaves the old file as it was and
    nothing else behind, and an overwrite leaves no tail of the old content.
    """
    try:
        form = read_form(body, boundary)
        folder = root.parts(form.path, BAD_PAYLOAD)
        with root.opened() as root_fd:
            fd = open_dir(root, root_fd, folder, create=True)
            try:
                _write_atomically(
                    fd, form.filename, body, boundary, root.shown([*folder, form.filename])
                )
            finally:
                os.close(fd)
    finally:
        body.close()


def _write_atomically(folder: int, name: str, body: IO[bytes], boundary: bytes, shown: str) -> None:
    temp = f".swarmagent-upload-{secrets.token_hex(8)}"
    try:
        out = os.open(
            temp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644,
            dir_fd=folder,
        )
    except OSError as e:
        raise _os_error(e, shown) from e
    try:
        try:
            old = _lstat(name, folder)
            if old is not None and stat.S_ISDIR(old.st_mode):
                raise Refused(409, f"{shown} is a folder")
            if old is not None and stat.S_ISREG(old.st_mode):
                _keep_owner_and_mode(out, old)
            _copy_file_part(body, boundary, out)
            os.fsync(out)
        finally:
            os.close(out)
        os.rename(temp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException as e:
        with suppress(OSError):
            os.unlink(temp, dir_fd=folder)
        if isinstance(e, OSError):
            raise _os_error(e, shown) from e
        if isinstance(e, Malformed):  # the body changed under us
            raise Refused(500, f"the upload could not be read again: {e}") from e
        raise
    with suppress(OSError):  # the rename itself survives a crash
        os.fsync(folder)


def _keep_owner_and_mode(out: int, old: os.stat_result) -> None:
    """A replaced file keeps its owner and mode, as the reference's (which
    writes into the old file) does: the container that owns it can still
    write it."""
    with suppress(PermissionError):  # an agent not run as root
        os.fchown(out, old.st_uid, old.st_gid)
    os.fchmod(out, stat.S_IMODE(old.st_mode))


def _copy_file_part(body: IO[bytes], boundary: bytes, out: int) -> None:
    state = "before"
    for event in read_events(body, boundary):
        if isinstance(event, PartStart) and state == "before" and event.name == "file":
            state = "in"
        elif isinstance(event, PartData) and state == "in":
            view = memoryview(event.data)
            while view:
                view = view[os.write(out, view) :]
        elif isinstance(event, PartEnd) and state == "in":
            state = "after"


# --- serving a file ----------------------------------------------------------


_COMPRESSED = {"gzip": "application/gzip", "bzip2": "application/x-bzip2"}


class OpenedFile(static.File):
    """twisted.web's static file over a file already opened by descriptor.

    It is statted through ``/proc/self/fd`` and read from the open file, never
    looked up by name: what was checked is what is served. Range,
    If-Modified-Since, Last-Modified and HEAD are static.File's.
    """

    def __init__(self, file: IO[bytes], name: str) -> None:
        super().__init__(f"/proc/self/fd/{file.fileno()}", defaultType="application/octet-stream")
        self._file = file
        kind, encoding = static.getTypeAndEncoding(
            name, self.contentTypes, self.contentEncodings, self.defaultType
        )
        # A .gz is sent as it is on disk, typed as what it is: with a
        # Content-Encoding, clients would unpack it on the way.
        self.type, self.encoding = _COMPRESSED.get(encoding, kind), None

    def openForReading(self) -> IO[bytes]:
        return self._file


# --- the resource --------------------------------------------------------------


class BrowseResource(Resource):
    """Serves one browse request on this node (routing is the caller's)."""

    isLeaf = True

    def __init__(
        self,
        engine: IAgent,
        host_root: str | None,
        clock: IReactorTime,
        timeout: float,
        run: Runner,
    ) -> None:
        super().__init__()
        self._engine = engine
        self._host = host_root_at(host_root) if host_root else None
        self._clock = clock
        self._timeout = timeout
        self._run = run

    def render(self, request: Request) -> Rendered:
        parsed = parse_browse_path(strip_version(request.path.decode("latin-1")))
        if parsed is None:
            return write_error(request, 404, "Not found", "no such browse operation")
        op = parsed[0]
        if request.method not in METHODS[op]:
            allowed = METHODS[op]
            request.setHeader(b"allow", b", ".join(allowed))
            return write_error(
                request, 405, "Method not allowed", f"{op} takes {allowed[0].decode()}"
            )
        Deferred.fromCoroutine(self._serve(request, op))
        return NOT_DONE_YET

    async def _serve(self, request: Request, op: str) -> None:
        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)
        try:
            root = await self._root(request)
            if op == "get":
                parts = root.parts(_arg(request, b"path"))
                fd = await self._run(open_file, root, parts)
                self._send_file(request, fd, parts[-1], gone)
                return
            if op == "ls":
                found = await self._run(list_dir, root, root.parts(_arg(request, b"path")))
                body = json.dumps(found, separators=(",", ":")).encode("utf-8")
                request.setHeader(b"content-type", b"application/json")
            else:
                await self._change(request, op, root)
                request.setResponseCode(204)
                body = b""
        except Refused as e:
            if e.code >= 500:
                log.warn("browse {op}: {details}", op=op, details=e.details)
            body = write_error(request, e.code, e.message or FAILED[op], e.details)
        except Exception as e:
            log.failure("browse {op} failed", op=op)
            body = write_error(request, 500, FAILED[op], describe(e))
        if not gone:
            request.write(body)
            request.finish()

    async def _change(self, request: Request, op: str, root: Root) -> None:
        if op == "delete":
            await self._run(remove, root, root.parts(_arg(request, b"path")))
        elif op == "rename":
            current, new = _rename_payload(request)
            await self._run(
                rename, root, root.parts(current, BAD_PAYLOAD), root.parts(new, BAD_PAYLOAD)
            )
        else:
            try:
                boundary = boundary_of(request.getHeader(b"content-type"))
            except Malformed as e:
                raise Refused(400, str(e), BAD_PAYLOAD) from e
            await self._run(save_upload, root, _body_of(request), boundary)

    def _send_file(self, request: Request, fd: int, name: str, gone: list[object]) -> None:
        file = os.fdopen(fd, "rb")
        if gone:
            file.close()
            return
        # static.File closes it when done, but not on every early return:
        # closing twice is harmless, leaking is not.
        request.notifyFinish().addBoth(lambda _: file.close())
        answer = OpenedFile(file, name).render(request)
        if answer is not NOT_DONE_YET:
            request.write(answer)
            request.finish()

    async def _root(self, request: Request) -> Root:
        volume = volume_of(request)
        if volume is None:
            if self._host is None:
                raise Refused(
                    404,
                    "mount the host's root into the agent (like /host) and set "
                    "AGENT_HOST_ROOT (--host-root) to browse it",
                    NO_HOST_BROWSER,
                )
            return self._host
        return await self._volume(volume)

    async def _volume(self, name: str) -> Root:
        url = ENGINE_BASE + b"/volumes/" + quote(name, safe="").encode("ascii")
        try:
            code, body, _ = await get_within(
                self._engine, url, Headers(), self._clock, self._timeout
            )
        except Exception as e:
            raise Refused(502, f"unable to inspect volume {name}: {describe(e)}") from e
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if code != 200 or not isinstance(doc, dict):
            said = doc.get("message") if isinstance(doc, dict) else None
            if code == 404:
                raise Refused(404, said or f"no such volume: {name}")
            raise Refused(
                502, f"the engine answered {code} to the inspect of volume {name}: {said}"
            )
        driver = doc.get("Driver")
        if driver != "local":
            raise Refused(
                400, f"volume {name} uses the driver {driver!r}: only local volumes can be browsed"
            )
        mountpoint = doc.get("Mountpoint")
        if not isinstance(mountpoint, str) or not mountpoint.startswith("/"):
            raise Refused(502, f"the engine gives volume {name} no mountpoint")
        return volume_root(name, mountpoint)


def _rename_payload(request: Request) -> tuple[str, str]:
    content = request_body(request)
    raw = content.read(MAX_JSON + 1) if content is not None else b""
    if len(raw) > MAX_JSON:
        raise Refused(400, "the payload is too large", BAD_PAYLOAD)
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise Refused(400, f"the payload is not JSON: {e}", BAD_PAYLOAD) from e
    if not isinstance(doc, dict):
        raise Refused(400, "the payload is not a JSON object", BAD_PAYLOAD)
    current, new = doc.get("CurrentFilePath"), doc.get("NewFilePath")
    if not isinstance(current, str) or not current:
        raise Refused(400, "Current file path is invalid", BAD_PAYLOAD)
    if not isinstance(new, str) or not new:
        raise Refused(400, "New file path is invalid", BAD_PAYLOAD)
    return current, new
