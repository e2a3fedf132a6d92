"""The volume and host browser: routes, confinement, multipart, the five operations."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from email.utils import formatdate
from io import BytesIO
from typing import Any
from urllib.parse import parse_qs, quote, unquote

import treq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.test.requesthelper import DummyChannel

from swarmagent.browse import (
    BrowseResource,
    Malformed,
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    Refused,
    Root,
    host_root_at,
    list_dir,
    open_file,
    parse_browse_path,
    parse_params,
    remove,
    rename,
    save_upload,
    split_path,
    threaded,
    volume_of,
    volume_root,
)
from swarmagent.twisted_types import installed_reactor
from tests.helpers import Client, Response

reactor = installed_reactor()
BOUNDARY = b"----WebKitFormBoundary7MA4YWxkTrZu0gW"
SECRET = b"the host's secret"


def inline(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """A runner doing the disk work at once, for synchronous tests."""
    return maybeDeferred(f, *args)


def form(
    parts: Sequence[tuple[str, bytes, str | None]], boundary: bytes = BOUNDARY, close: bool = True
) -> bytes:
    """A multipart/form-data body: (field name, value, filename or None) each."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += b"--" + boundary + b"\r\n"
        out += f"Content-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + (b"--" + boundary + b"--\r\n" if close else b"")


def upload(path: str, name: str, data: bytes, *, path_first: bool = True) -> bytes:
    fields = [("Path", path.encode(), None), ("file", data, name)]
    return form(fields if path_first else fields[::-1])


MULTIPART = ("Content-Type", f"multipart/form-data; boundary={BOUNDARY.decode()}")


class FakeEngine(Resource):
    """The engine's volume inspect, for the volumes in ``volumes``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.volumes: dict[str, dict[str, Any]] = {}
        self.paths: list[bytes] = []
        self.down = False

    def render_GET(self, request: Request) -> bytes:
        self.paths.append(request.path)
        if self.down:
            request.setResponseCode(500)
            return b'{"message":"engine is down"}'
        name = unquote(request.path.decode()[len("/volumes/") :])
        if request.path.startswith(b"/volumes/") and name in self.volumes:
            return json.dumps({"Name": name, **self.volumes[name]}).encode()
        request.setResponseCode(404)
        return json.dumps({"message": f"get {name}: no such volume"}).encode()


def snapshot(top: str) -> dict[str, Any]:
    """Every entry under ``top`` (not following links): kind, mode and content."""
    found: dict[str, Any] = {}
    for folder, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st_ = os.lstat(path)
            if stat.S_ISLNK(st_.st_mode):
                found[path] = ("link", os.readlink(path))
            elif stat.S_ISREG(st_.st_mode):
                with open(path, "rb") as f:
                    found[path] = ("file", st_.st_mode, f.read())
            else:
                found[path] = ("dir", st_.st_mode)
    return found


def write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def open_fds() -> dict[str, str]:
    """This process's open descriptors (but the one used to list them)."""
    found = {}
    for n in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own, closed since
            found[n] = os.readlink(f"/proc/self/fd/{n}")
    return found


# --- routes --------------------------------------------------------------------


class RouteTests(SynchronousTestCase):
    def test_forms(self) -> None:
        for op in ("ls", "get", "delete", "rename", "put"):
            self.assertEqual(parse_browse_path(f"/browse/{op}"), (op, None))
            self.assertEqual(parse_browse_path(f"/v2/browse/{op}"), (op, None))
            self.assertEqual(parse_browse_path(f"/v1/browse/vol/{op}"), (op, "vol"))

    def test_volume_in_path_is_decoded(self) -> None:
        self.assertEqual(parse_browse_path("/v1/browse/my%20vol/ls"), ("ls", "my vol"))

    def test_not_browse(self) -> None:
        for path in (
            "/browse/cat",
            "/browse/ls/x",
            "/v1/browse/ls",
            "/v2/browse/vol/ls",
            "/v3/browse/ls",
            "/containers/json",
            "/browse",
        ):
            self.assertIsNone(parse_browse_path(path), path)

    def test_volume_of(self) -> None:
        def request(uri: bytes) -> Request:
            r = Request(DummyChannel())
            r.path, _, query = uri.partition(b"?")
            # Request declares ``args = None`` at class level: typed None.
            r.args = parse_qs(query)  # type: ignore[assignment]
            return r

        self.assertEqual(volume_of(request(b"/v1/browse/a/ls?volumeID=b")), "a")
        self.assertEqual(volume_of(request(b"/v2/browse/ls?volumeID=b")), "b")
        self.assertEqual(volume_of(request(b"/v1.41/v2/browse/ls?volumeID=b")), "b")
        self.assertIsNone(volume_of(request(b"/browse/ls?volumeID=")))
        self.assertIsNone(volume_of(request(b"/browse/ls?path=/")))


# --- confinement ---------------------------------------------------------------

NAMES = [
    "a.txt",
    "sub",
    "deeper",
    "b.txt",
    "c.txt",
    "out",
    "up",
    "top",
    "dangling",
    "secret",
    "inner",
    "back",
    "new",
    "fifo",
]
DOTS = [".", "..", "%2e", "%2e%2e", "%2E.", ".%2E", "%252e%252e", "%25252e", "a\\..\\b"]
segments = st.one_of(st.sampled_from(NAMES), st.sampled_from(DOTS), st.just(""))
paths = st.builds(
    lambda lead, segs: lead + "/".join(segs),
    st.sampled_from(["", "/"]),
    st.lists(segments, max_size=5),
)


def plant(base: str) -> tuple[str, str]:
    """A volume root full of links, next to an outside folder; returns both."""
    root = os.path.join(base, "root")
    outside = os.path.join(base, "outside")
    write(os.path.join(outside, "secret.txt"), SECRET)
    os.makedirs(os.path.join(outside, "dir"))
    write(os.path.join(root, "a.txt"), b"inside")
    write(os.path.join(root, "sub", "b.txt"), b"b")
    write(os.path.join(root, "sub", "deeper", "c.txt"), b"c")
    os.symlink(outside, os.path.join(root, "out"))
    os.symlink("..", os.path.join(root, "up"))
    os.symlink(base, os.path.join(root, "top"))
    os.symlink("/nonexistent-target", os.path.join(root, "dangling"))
    os.symlink(os.path.join(outside, "secret.txt"), os.path.join(root, "secret"))
    os.symlink("sub", os.path.join(root, "inner"))
    os.symlink("../..", os.path.join(root, "sub", "back"))
    os.mkfifo(os.path.join(root, "fifo"))
    return root, outside


def walks(root: str, parts: Sequence[str], upto: int) -> bool:
    """Whether the first ``upto`` components are all real folders."""
    path = os.path.join(root, *parts[:upto])
    return os.path.realpath(path) == os.path.normpath(path) and os.path.isdir(path)


def crosses_link(root: str, parts: Sequence[str], upto: int) -> bool:
    """Whether one of the first ``upto`` components (as on disk) is a link."""
    path = root
    for name in parts[:upto]:
        path = os.path.join(path, name)
        if os.path.islink(path):
            return True
        if not os.path.isdir(path):
            return False
    return False


def has_dot(raw: str) -> bool:
    for seg in raw.replace("\\", "/").split("/"):
        for _ in range(4):
            seg = unquote(seg)
        if seg in (".", ".."):
            return True
    return False


class ConfinementTests(SynchronousTestCase):
    """Random paths over a root planted with links never escape it."""

    def layout(self) -> tuple[Root, str, dict[str, Any]]:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        root, _ = plant(base)
        around = {p: v for p, v in snapshot(base).items() if not p.startswith(root + "/")}
        return volume_root("v", root), base, around

    def check(self, base: str, around: dict[str, Any], root: str) -> None:
        after = {p: v for p, v in snapshot(base).items() if not p.startswith(root + "/")}
        self.assertEqual(after, around)

    def run_op(self, op: Callable[[], Any], expect_link: bool, dotted: bool) -> Any:
        try:
            result = op()
        except Refused as e:
            if dotted:
                self.assertEqual(e.code, 400, e.details)
            elif expect_link:
                self.assertEqual(e.code, 403, e.details)
                self.assertIn("symbolic links are not followed", e.details)
            self.assertNotEqual(e.code, 500, e.details)
            return None
        self.assertFalse(dotted, "a dot segment was accepted")
        self.assertFalse(expect_link, "a symbolic link was followed")
        return result

    @given(paths)
    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    def test_ls(self, raw: str) -> None:
        root, base, around = self.layout()
        dotted = has_dot(raw)
        parts = [] if dotted else split_path(raw)
        found = self.run_op(
            lambda: list_dir(root, root.parts(raw)),
            not dotted and crosses_link(root.path, parts, len(parts)),
            dotted,
        )
        if found is not None:
            names = {e["Name"] for e in found}
            self.assertEqual(names, set(os.listdir(os.path.join(root.path, *parts))))
            self.assertNotIn("secret.txt", names)
            links = {e["Name"] for e in found if e["Name"] in ("out", "inner", "up")}
            self.assertFalse(any(e["Dir"] for e in found if e["Name"] in links))
        self.check(base, around, root.path)

    @given(paths)
    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    def test_get(self, raw: str) -> None:
        root, base, around = self.layout()
        dotted = has_dot(raw)
        parts = [] if dotted else split_path(raw)
        fds = open_fds()
        fd = self.run_op(
            lambda: open_file(root, root.parts(raw)),
            not dotted and crosses_link(root.path, parts, len(parts)),
            dotted,
        )
        if fd is not None:
            with os.fdopen(fd, "rb") as f:
                data = f.read()
            self.assertNotEqual(data, SECRET)
            self.assertEqual(data, read(os.path.join(root.path, *parts)))
        self.assertEqual(open_fds(), fds)
        self.check(base, around, root.path)

    @given(paths)
    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    def test_delete(self, raw: str) -> None:
        root, base, around = self.layout()
        dotted = has_dot(raw)
        parts = [] if dotted else split_path(raw)
        target = os.path.join(root.path, *parts)

        def delete() -> bool:
            remove(root, root.parts(raw))
            return True

        done = self.run_op(
            delete,
            # The last component may be a link: it is removed, not followed.
            not dotted and crosses_link(root.path, parts, len(parts) - 1),
            dotted,
        )
        if done:
            self.assertFalse(os.path.lexists(target))
        self.check(base, around, root.path)

    @given(paths, paths)
    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    def test_rename(self, raw: str, raw_new: str) -> None:
        root, base, around = self.layout()
        dotted = has_dot(raw) or has_dot(raw_new)
        parts = [] if dotted else split_path(raw)
        new = [] if dotted else split_path(raw_new)
        # The current path is walked first: the new one matters only if
        # the current one's folder was reached.
        link = crosses_link(root.path, parts, len(parts) - 1) or (
            bool(parts)
            and walks(root.path, parts, len(parts) - 1)
            and crosses_link(root.path, new, len(new) - 1)
        )
        self.run_op(
            lambda: rename(root, root.parts(raw), root.parts(raw_new)),
            not dotted and link,
            dotted,
        )
        self.check(base, around, root.path)

    @given(paths)
    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    def test_put(self, raw: str) -> None:
        root, base, around = self.layout()
        dotted = has_dot(raw)
        parts = [] if dotted else split_path(raw)
        body = BytesIO(upload(raw, "f.txt", b"data"))

        def save() -> bool:
            save_upload(root, body, BOUNDARY)
            return True

        done = self.run_op(
            save,
            not dotted and crosses_link(root.path, parts, len(parts)),
            dotted,
        )
        if done:
            self.assertEqual(read(os.path.join(root.path, *parts, "f.txt")), b"data")
        self.check(base, around, root.path)

    def test_symlinked_root_of_the_volume_itself_is_trusted(self) -> None:
        # The engine's own path to the volume may go through a link
        # (/var/lib/docker moved elsewhere): that one is the admin's.
        root, base, _ = self.layout()
        os.symlink(root.path, os.path.join(base, "alias"))
        found = list_dir(volume_root("v", os.path.join(base, "alias")), [])
        self.assertIn("a.txt", {e["Name"] for e in found})

    def test_split_path(self) -> None:
        self.assertEqual(split_path("/"), [])
        self.assertEqual(split_path("a.txt"), ["a.txt"])
        self.assertEqual(split_path("/sub//a.txt/"), ["sub", "a.txt"])
        self.assertEqual(split_path("/x..y/..z"), ["x..y", "..z"])
        for bad in ("..", "/a/../b", "./a", "a/%2e%2e", "%252E%252E/x", "a\0b", "a\\..\\b"):
            e = self.assertRaises(Refused, split_path, bad)
            self.assertEqual(e.code, 400)

    def test_host_root_parts(self) -> None:
        root = host_root_at("/host")
        self.assertEqual(root.parts("/host"), [])
        self.assertEqual(root.parts("/host/etc/hosts"), ["etc", "hosts"])
        for bad in ("/hostile/etc", "/etc", "host/etc", "", "/host/../etc"):
            self.assertEqual(self.assertRaises(Refused, root.parts, bad).code, 400, bad)
        self.assertEqual(host_root_at("/").parts("/etc"), ["etc"])


# --- multipart -----------------------------------------------------------------


def parse(body: bytes, cuts: Iterable[int], boundary: bytes = BOUNDARY) -> list[Any]:
    """Feed ``body`` cut at ``cuts``; return [(name, filename, data)] per part."""
    parser = MultipartParser(boundary)
    parts: list[Any] = []
    start = 0
    for end in [*sorted(set(cuts)), len(body)]:
        for event in parser.feed(body[start:end]):
            if isinstance(event, PartStart):
                parts.append([event.name, event.filename, b""])
            elif isinstance(event, PartData):
                parts[-1][2] += event.data
            else:
                assert isinstance(event, PartEnd)
        start = end
    parser.close()
    return [tuple(p) for p in parts]


class MultipartTests(SynchronousTestCase):
    def test_every_chunk_size(self) -> None:
        data = b"line\r\n--" + BOUNDARY[:-1] + b"x\r\n\r\n--" + BOUNDARY + b"X tail\r"
        for first in (True, False):
            body = upload("/sub", "a.txt", data, path_first=first)
            want = [("Path", None, b"/sub"), ("file", "a.txt", data)]
            for size in range(1, len(body) + 1):
                got = parse(body, range(size, len(body), size))
                self.assertEqual(got, want if first else want[::-1], size)

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["Path", "file", "other"]),
                st.binary(max_size=300).map(lambda b: b.replace(b"\r\n--" + BOUNDARY, b"")),
            ),
            max_size=4,
        ),
        st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
    )
    @settings(max_examples=300, deadline=None)
    def test_random_splits(self, fields: list[tuple[str, bytes]], cuts: list[int]) -> None:
        # Data made of pieces of the delimiter, to tempt the parser.
        parts = [(n, v, "f.bin" if n == "file" else None) for n, v in fields]
        body = form(parts)
        got = parse(body, [c for c in cuts if c < len(body)])
        self.assertEqual(got, [(n, f, v) for n, v, f in parts])

    def test_preamble_and_epilogue_are_ignored(self) -> None:
        body = b"preamble\r\n" + form([("Path", b"/", None)]) + b"epilogue"
        self.assertEqual(parse(body, []), [("Path", None, b"/")])

    def test_empty_part_headers(self) -> None:
        body = b"--" + BOUNDARY + b"\r\n\r\nvalue\r\n--" + BOUNDARY + b"--"
        self.assertEqual(parse(body, []), [(None, None, b"value")])

    def test_truncated_anywhere_is_malformed(self) -> None:
        body = upload("/", "a.txt", b"content")
        for end in range(len(body) - len(b"--\r\n") - 1):
            self.assertRaises(Malformed, parse, body[:end], [])

    def test_malformed(self) -> None:
        d = b"--" + BOUNDARY
        for body in (
            d + b"junk\r\n\r\nx\r\n" + d + b"--",  # a delimiter line with more on it
            d + b"\r\nno colon here\r\n\r\nx\r\n" + d + b"--",
            d + b'\r\nContent-Disposition: form-data; name="x\r\n\r\nx\r\n' + d + b"--",
            d + b"\r\n" + b"X-Long: " + b"a" * 20000 + b"\r\n\r\nx\r\n" + d + b"--",
            d + b"\r\nContent-Disposition: form-data; name=\xff\r\n\r\nx\r\n" + d + b"--",
            b"no delimiter at all",
        ):
            self.assertRaises(Malformed, parse, body, [])

    def test_params(self) -> None:
        self.assertEqual(
            parse_params('form-data; name="file"; filename="a \\"b\\".txt"'),
            ("form-data", {"name": "file", "filename": 'a "b".txt'}),
        )
        # A backslash before an ordinary character stays (as browsers send it).
        self.assertEqual(parse_params('x; filename="C:\\dir.txt"')[1]["filename"], "C:\\dir.txt")
        self.assertEqual(
            parse_params("x; filename=plain; filename*=UTF-8''%E2%82%AC.txt")[1]["filename"],
            "€.txt",
        )
        self.assertEqual(parse_params("x; name=a;b=c")[1], {"name": "a", "b": "c"})


# --- the operations over HTTP ----------------------------------------------------


class BrowseCase(SynchronousTestCase):
    """A node with one local volume ``data`` and the host root at ``host``."""

    host_root: bool = True

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        self.volumes = os.path.join(self.base, "var/lib/docker/volumes")
        self.data = os.path.join(self.volumes, "data", "_data")
        self.host = os.path.join(self.base, "host")
        os.makedirs(self.data)
        os.makedirs(os.path.join(self.host, "etc"))
        write(os.path.join(self.host, "etc", "hostname"), b"node-1\n")
        self.engine = FakeEngine()
        self.engine.volumes["data"] = {"Driver": "local", "Mountpoint": self.data}
        self.clock = MemoryReactorClock()
        self.resource = BrowseResource(
            RequestTraversalAgent(self.engine),
            self.host if self.host_root else None,
            self.clock,
            5.0,
            inline,
        )
        self.site = Site(self.resource, reactor=self.clock, parsePOSTFormSubmission=False)

    def call(
        self, method: str, uri: str, body: bytes = b"", headers: Iterable[tuple[str, str]] = ()
    ) -> Response:
        return Client(self.site).send(method, uri, list(headers), body).response()

    def put(self, body: bytes, uri: str = "/v2/browse/put?volumeID=data") -> Response:
        return self.call("POST", uri, body, [MULTIPART])

    def assertError(self, response: Response, code: int, message: str, *details: str) -> None:
        self.assertEqual(response.code, code, response.body)
        self.assertEqual(response.header("content-type"), "application/json")
        doc = response.json()
        self.assertEqual(doc["message"], message)
        for piece in details:
            self.assertIn(piece, doc["details"])

    def file(self, *parts: str) -> str:
        return os.path.join(self.data, *parts)


class ListTests(BrowseCase):
    def test_root_and_sub(self) -> None:
        write(self.file("a.txt"), b"12345")
        write(self.file("sub", "b.txt"), b"b")
        os.utime(self.file("a.txt"), (1_700_000_000.7, 1_700_000_000.7))
        os.symlink("/etc", self.file("link"))
        response = self.call("GET", "/v2/browse/ls?volumeID=data&path=/")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.header("content-type"), "application/json")
        found = {e["Name"]: e for e in response.json()}
        self.assertEqual(set(found), {"a.txt", "sub", "link"})
        self.assertEqual(
            found["a.txt"], {"Name": "a.txt", "Size": 5, "Dir": False, "ModTime": 1_700_000_000}
        )
        self.assertTrue(found["sub"]["Dir"])
        self.assertFalse(found["link"]["Dir"])
        sub = self.call("GET", "/v2/browse/ls?volumeID=data&path=/sub").json()
        self.assertEqual([e["Name"] for e in sub], ["b.txt"])

    def test_every_route_form(self) -> None:
        write(self.file("a.txt"), b"")
        for uri in (
            "/browse/ls?volumeID=data&path=/",
            "/v2/browse/ls?volumeID=data&path=/",
            "/v1/browse/data/ls?path=/",
            "/v1.41/v2/browse/ls?volumeID=data&path=/",
        ):
            response = self.call("GET", uri)
            self.assertEqual([e["Name"] for e in response.json()], ["a.txt"], uri)
        self.assertEqual(self.engine.paths[-1], b"/volumes/data")

    def test_not_a_folder_missing_and_bad_paths(self) -> None:
        write(self.file("a.txt"), b"")
        message = "Unable to list files inside specified directory"
        self.assertError(
            self.call("GET", "/v2/browse/ls?volumeID=data&path=/a.txt"), 400, message, "/a.txt"
        )
        self.assertError(self.call("GET", "/v2/browse/ls?volumeID=data&path=/nope"), 404, message)
        for raw in ("/..", "/%2e%2e", "/%252e%252e/x", "/sub/%2E", "a%00b"):
            self.assertError(
                self.call("GET", f"/v2/browse/ls?volumeID=data&path={raw}"),
                400,
                "Invalid query parameter: path",
            )
        self.assertError(
            self.call("GET", "/v2/browse/ls?volumeID=data"), 400, "Invalid query parameter: path"
        )

    def test_symlinked_folder(self) -> None:
        os.symlink(self.host, self.file("escape"))
        self.assertError(
            self.call("GET", "/v2/browse/ls?volumeID=data&path=/escape/etc"),
            403,
            "Unable to list files inside specified directory",
            "/escape is a symbolic link: symbolic links are not followed",
        )

    def test_wrong_method(self) -> None:
        response = self.call("POST", "/v2/browse/ls?volumeID=data&path=/")
        self.assertError(response, 405, "Method not allowed")
        self.assertEqual(response.header("allow"), "GET")
        self.assertEqual(self.call("DELETE", "/v2/browse/get").header("allow"), "GET, HEAD")

    def test_unknown_operation(self) -> None:
        self.assertEqual(self.call("GET", "/v2/browse/cat?path=/").code, 404)


class VolumeTests(BrowseCase):
    def test_unknown_volume(self) -> None:
        self.assertError(
            self.call("GET", "/v2/browse/ls?volumeID=nope&path=/"),
            404,
            "Unable to list files inside specified directory",
            "Get nope: no such volume",
        )

    def test_name_is_quoted_for_the_engine(self) -> None:
        self.call("GET", "/v2/browse/ls?volumeID=a%2Fb%3Fc&path=/")
        self.assertEqual(self.engine.paths[-1], b"/volumes/a%2Fb%3Fc")

    def test_other_driver(self) -> None:
        self.engine.volumes["remote"] = {"Driver": "rexray/ebs", "Mountpoint": self.data}
        self.assertError(
            self.call("GET", "/v2/browse/ls?volumeID=remote&path=/"),
            400,
            "Unable to list files inside specified directory",
            "'rexray/ebs'",
            "only local volumes",
        )

    def test_mountpoint_not_visible(self) -> None:
        gone = "/var/lib/docker/volumes/elsewhere-" + os.urandom(4).hex() + "/_data"
        self.engine.volumes["elsewhere"] = {"Driver": "local", "Mountpoint": gone}
        self.assertError(
            self.call("GET", "/v2/browse/ls?volumeID=elsewhere&path=/"),
            500,
            "Unable to list files inside specified directory",
            gone,
            "/var/lib/docker/volumes",
        )

    def test_engine_down(self) -> None:
        self.engine.down = True
        self.assertError(
            self.call("GET", "/v2/browse/ls?volumeID=data&path=/"),
            502,
            "Unable to list files inside specified directory",
            "500",
            "engine is down",
        )


class HostTests(BrowseCase):
    def test_host_paths(self) -> None:
        response = self.call("GET", f"/v2/browse/ls?path={self.host}/etc")
        self.assertEqual([e["Name"] for e in response.json()], ["hostname"])
        self.assertEqual(self.engine.paths, [])

    def test_outside_the_host_root(self) -> None:
        for path in ("/etc", f"{self.host}/../etc", "etc", f"{self.host}x/etc"):
            self.assertError(
                self.call("GET", f"/v2/browse/ls?path={quote(path)}"),
                400,
                "Invalid query parameter: path",
            )

    def test_rename_and_delete_the_root_refused(self) -> None:
        self.assertEqual(self.call("DELETE", f"/browse/delete?path={self.host}").code, 400)
        self.assertTrue(os.path.isdir(self.host))


class NoHostTests(BrowseCase):
    host_root = False

    def test_off(self) -> None:
        self.assertError(
            self.call("GET", "/v2/browse/ls?path=/host/etc"),
            404,
            "The host browser is not enabled on this node",
            "AGENT_HOST_ROOT",
        )

    def test_volumes_still_served(self) -> None:
        self.assertEqual(self.call("GET", "/v2/browse/ls?volumeID=data&path=/").code, 200)


class DeleteTests(BrowseCase):
    def test_file_and_folder(self) -> None:
        write(self.file("a.txt"), b"")
        write(self.file("sub", "deep", "b.txt"), b"")
        self.assertEqual(
            self.call("DELETE", "/v2/browse/delete?volumeID=data&path=a.txt").code, 204
        )
        self.assertEqual(self.call("DELETE", "/v2/browse/delete?volumeID=data&path=/sub").code, 204)
        self.assertEqual(os.listdir(self.data), [])

    def test_missing(self) -> None:
        self.assertError(
            self.call("DELETE", "/v2/browse/delete?volumeID=data&path=/nope"),
            404,
            "Unable to remove file",
        )

    def test_root(self) -> None:
        for path in ("/", "", "//"):
            response = self.call("DELETE", f"/v2/browse/delete?volumeID=data&path={path}")
            self.assertEqual(response.code, 400)
        self.assertTrue(os.path.isdir(self.data))

    def test_link_removed_not_its_target(self) -> None:
        os.symlink(os.path.join(self.host, "etc"), self.file("etc"))
        self.assertEqual(self.call("DELETE", "/v2/browse/delete?volumeID=data&path=/etc").code, 204)
        self.assertFalse(os.path.lexists(self.file("etc")))
        self.assertEqual(read(os.path.join(self.host, "etc", "hostname")), b"node-1\n")

    def test_links_inside_a_removed_folder_are_not_followed(self) -> None:
        os.makedirs(self.file("sub"))
        os.symlink(os.path.join(self.host, "etc"), self.file("sub", "etc"))
        self.assertEqual(self.call("DELETE", "/v2/browse/delete?volumeID=data&path=/sub").code, 204)
        self.assertEqual(read(os.path.join(self.host, "etc", "hostname")), b"node-1\n")


class RenameTests(BrowseCase):
    def rename(
        self, current: Any, new: Any, uri: str = "/v2/browse/rename?volumeID=data"
    ) -> Response:
        return self.call(
            "PUT", uri, json.dumps({"CurrentFilePath": current, "NewFilePath": new}).encode()
        )

    def test_rename_and_move(self) -> None:
        write(self.file("a.txt"), b"a")
        os.makedirs(self.file("sub"))
        self.assertEqual(self.rename("a.txt", "b.txt").code, 204)
        self.assertEqual(self.rename("/b.txt", "/sub/c.txt").code, 204)
        self.assertEqual(read(self.file("sub", "c.txt")), b"a")
        self.assertEqual(os.listdir(self.data), ["sub"])

    def test_v1(self) -> None:
        write(self.file("a.txt"), b"a")
        self.assertEqual(self.rename("a.txt", "b.txt", "/v1/browse/data/rename").code, 204)
        self.assertTrue(os.path.exists(self.file("b.txt")))

    def test_target_exists(self) -> None:
        write(self.file("a.txt"), b"a")
        write(self.file("b.txt"), b"b")
        self.assertError(self.rename("a.txt", "b.txt"), 409, "Unable to rename file", "/b.txt")
        self.assertEqual(read(self.file("b.txt")), b"b")

    def test_missing_source(self) -> None:
        self.assertError(self.rename("nope", "b.txt"), 404, "Unable to rename file")

    def test_bad_payloads(self) -> None:
        write(self.file("a.txt"), b"a")
        for current, new in (("", "b"), ("a.txt", ""), (None, "b"), ("a.txt", 3)):
            self.assertError(self.rename(current, new), 400, "Invalid request payload")
        for body in (b"", b"not json", b"[]", b"{" + b" " * 70000 + b"}"):
            self.assertError(
                self.call("PUT", "/v2/browse/rename?volumeID=data", body),
                400,
                "Invalid request payload",
            )
        self.assertError(self.rename("a.txt", "../b"), 400, "Invalid request payload")
        self.assertError(self.rename("/", "b"), 400, "Invalid query parameter: path")
        self.assertTrue(os.path.exists(self.file("a.txt")))

    def test_folder_into_itself(self) -> None:
        os.makedirs(self.file("sub"))
        self.assertEqual(self.rename("sub", "sub/inner").code, 400)


class PutTests(BrowseCase):
    def test_path_before_and_after(self) -> None:
        for first in (True, False):
            name = f"{first}.txt"
            self.assertEqual(
                self.put(upload("/sub/deep", name, b"data", path_first=first)).code, 204
            )
            self.assertEqual(read(self.file("sub", "deep", name)), b"data")
        mode = stat.S_IMODE(os.stat(self.file("sub", "deep")).st_mode)
        self.assertEqual(mode & ~0o022, 0o755 & ~0o022)

    def test_root_as_portainer_sends_it(self) -> None:
        for path in ("/", ""):
            self.assertEqual(self.put(upload(path, "a.txt", path.encode() + b"x")).code, 204)
            self.assertEqual(read(self.file("a.txt")), path.encode() + b"x")

    def test_large_body_spooled_to_disk(self) -> None:
        data = os.urandom(300_000) + b"\r\n--" + BOUNDARY[:-3]
        self.assertEqual(self.put(upload("/big", "blob.bin", data)).code, 204)
        self.assertEqual(read(self.file("big", "blob.bin")), data)

    def test_overwrite_leaves_no_tail(self) -> None:
        write(self.file("a.txt"), b"a much longer old content")
        self.assertEqual(self.put(upload("/", "a.txt", b"new")).code, 204)
        self.assertEqual(read(self.file("a.txt")), b"new")
        self.assertEqual(os.listdir(self.data), ["a.txt"])

    def test_overwrite_keeps_owner_and_mode(self) -> None:
        # As root (the agent's usual user) the owner is kept too.
        owner = (4242, 4243) if os.getuid() == 0 else (os.getuid(), os.getgid())
        write(self.file("a.txt"), b"old")
        os.chmod(self.file("a.txt"), 0o600)
        os.chown(self.file("a.txt"), *owner)
        self.assertEqual(self.put(upload("/", "a.txt", b"new")).code, 204)
        st_ = os.stat(self.file("a.txt"))
        self.assertEqual((stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid), (0o600, *owner))

    def test_new_file_mode(self) -> None:
        umask = os.umask(0o022)
        os.umask(umask)
        self.assertEqual(self.put(upload("/", "b.txt", b"new")).code, 204)
        self.assertEqual(stat.S_IMODE(os.stat(self.file("b.txt")).st_mode), 0o644 & ~umask)

    def test_malformed_leaves_old_file_and_nothing_else(self) -> None:
        write(self.file("sub", "a.txt"), b"old")
        before = snapshot(self.data)
        whole = upload("/sub", "a.txt", b"new content")
        for body in (whole[:-10], whole[: len(whole) // 2], b"garbage", b""):
            self.assertError(self.put(body), 400, "Invalid request payload", "alformed multipart")
        # A cut upload does not even make the folder in Path.
        self.assertError(
            self.put(upload("/new", "a.txt", b"x")[:-5]), 400, "Invalid request payload"
        )
        self.assertEqual(snapshot(self.data), before)

    def test_failure_while_writing(self) -> None:
        """A read error during the copy: old file intact, no temp file left."""
        write(self.file("a.txt"), b"old")
        body = upload("/", "a.txt", b"x" * 200_000)

        class Failing(BytesIO):
            passes = 0

            def seek(self, *args: Any) -> int:
                self.passes += 1
                return super().seek(*args)

            def read(self, n: int | None = -1) -> bytes:
                if self.passes == 2 and self.tell() > 100_000:
                    raise OSError(5, "Input/output error")
                return super().read(n)

        root = volume_root("data", self.data)
        e = self.assertRaises(Refused, save_upload, root, Failing(body), BOUNDARY)
        self.assertEqual(e.code, 500)
        self.assertEqual(os.listdir(self.data), ["a.txt"])
        self.assertEqual(read(self.file("a.txt")), b"old")

    def test_missing_fields(self) -> None:
        for body in (
            form([("file", b"x", "a.txt")]),
            form([("Path", b"/", None)]),
            form([("Path", b"/", None), ("file", b"x", None)]),
            form([("Path", b"/", None), ("file", b"x", "")]),
        ):
            self.assertError(self.put(body), 400, "Invalid request payload")
        self.assertEqual(os.listdir(self.data), [])

    def test_bad_filenames(self) -> None:
        for name in ("../a.txt", "a/b.txt", "..", "."):
            self.assertError(self.put(upload("/", name, b"x")), 400, "Invalid filename")
        self.assertEqual(os.listdir(self.data), [])

    def test_not_multipart(self) -> None:
        for headers in (
            [],
            [("Content-Type", "application/json")],
            [("Content-Type", "multipart/form-data")],
        ):
            response = self.call("POST", "/v2/browse/put?volumeID=data", b"{}", headers)
            self.assertError(response, 400, "Invalid request payload")

    def test_path_through_a_link(self) -> None:
        os.symlink(self.host, self.file("host"))
        self.assertError(
            self.put(upload("/host/etc", "hostname", b"pwned")), 403, "Error saving file to disk"
        )
        self.assertEqual(read(os.path.join(self.host, "etc", "hostname")), b"node-1\n")

    def test_onto_a_link_replaces_the_link(self) -> None:
        os.symlink(os.path.join(self.host, "etc", "hostname"), self.file("a.txt"))
        self.assertEqual(self.put(upload("/", "a.txt", b"mine")).code, 204)
        self.assertFalse(os.path.islink(self.file("a.txt")))
        self.assertEqual(read(os.path.join(self.host, "etc", "hostname")), b"node-1\n")

    def test_onto_a_folder(self) -> None:
        os.makedirs(self.file("a.txt"))
        self.assertError(self.put(upload("/", "a.txt", b"x")), 409, "Error saving file to disk")
        self.assertEqual(os.listdir(self.data), ["a.txt"])

    def test_host_browser(self) -> None:
        response = self.put(upload(f"{self.host}/tmp", "a.txt", b"x"), "/v2/browse/put")
        self.assertEqual(response.code, 204)
        self.assertEqual(read(os.path.join(self.host, "tmp", "a.txt")), b"x")
        self.assertError(
            self.put(upload("/tmp", "a.txt", b"x"), "/v2/browse/put"),
            400,
            "Invalid request payload",
        )


class GetEdgeTests(BrowseCase):
    """What completes without the body being streamed: errors, HEAD, 304."""

    def test_errors(self) -> None:
        os.makedirs(self.file("sub"))
        os.mkfifo(self.file("fifo"))
        os.symlink(os.path.join(self.host, "etc", "hostname"), self.file("link"))
        fds = open_fds()
        for path, code, why in (
            ("/sub", 400, "is a folder"),
            ("/fifo", 400, "not a regular file"),
            ("/nope", 404, "no such file"),
            ("/link", 403, "symbolic links are not followed"),
        ):
            response = self.call("GET", f"/v2/browse/get?volumeID=data&path={path}")
            self.assertError(response, code, "Unable to open file", why)
        response = self.call("GET", "/v2/browse/get?volumeID=data&path=/")
        self.assertError(response, 400, "Invalid query parameter: path", "root folder")
        self.assertEqual(open_fds(), fds)

    def test_head_and_not_modified_close_the_file(self) -> None:
        write(self.file("a.txt"), b"hello")
        os.utime(self.file("a.txt"), (1_700_000_000, 1_700_000_000))
        fds = open_fds()
        head = self.call("HEAD", "/v2/browse/get?volumeID=data&path=a.txt")
        self.assertEqual(head.code, 200)
        self.assertEqual(head.header("content-length"), "5")
        self.assertEqual(head.body, b"")
        self.assertEqual(head.header("content-type"), "text/plain")
        self.assertEqual(head.header("last-modified"), formatdate(1_700_000_000, usegmt=True))
        cached = self.call(
            "GET",
            "/v2/browse/get?volumeID=data&path=a.txt",
            headers=[("If-Modified-Since", formatdate(1_700_000_000, usegmt=True))],
        )
        self.assertEqual(cached.code, 304)
        self.assertEqual(cached.body, b"")
        self.assertEqual(open_fds(), fds)

    def test_client_gone_closes_the_file(self) -> None:
        write(self.file("a.txt"), b"hello" * 100_000)
        fds = open_fds()
        client = Client(self.site).send("GET", "/v2/browse/get?volumeID=data&path=a.txt")
        self.assertNotEqual(open_fds(), fds)
        client.disconnect()
        self.assertEqual(open_fds(), fds)


class LiveTests(TestCase):
    """Over a real connection (static.File streams from the reactor), with
    the disk work in the reactor's thread pool."""

    def setUp(self) -> None:
        self.data = os.path.abspath(self.mktemp())
        os.makedirs(self.data)
        engine = FakeEngine()
        engine.volumes["data"] = {"Driver": "local", "Mountpoint": self.data}
        resource = BrowseResource(
            RequestTraversalAgent(engine),
            None,
            reactor,
            5.0,
            threaded(reactor),
        )
        site = Site(resource, parsePOSTFormSubmission=False)
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = self.successResultOf(endpoint.listen(site))
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        self.base = f"http://127.0.0.1:{address.port}/v2/browse/"
        self.url = self.base + "get?volumeID=data&path="

    async def get(self, path: str, **headers: str) -> tuple[int, Headers, bytes]:
        response = await treq.get(
            self.url + quote(path),
            headers=Headers({k.replace("_", "-"): [v] for k, v in headers.items()}),
            persistent=False,
        )
        return response.code, response.headers, await response.content()

    async def test_download(self) -> None:
        data = os.urandom(1_500_000)
        write(os.path.join(self.data, "sub", "blob.tar.gz"), data)
        write(os.path.join(self.data, "a.txt"), b"text")
        code, headers, body = await self.get("/sub/blob.tar.gz")
        self.assertEqual((code, body), (200, data))
        # Sent as stored: no Content-Encoding for a client to undo.
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/gzip"])
        # (twisted's client turns an absent Content-Encoding into an empty one)
        self.assertFalse(any(headers.getRawHeaders("content-encoding", [])))
        self.assertTrue(headers.getRawHeaders("last-modified"))
        code, headers, body = await self.get("a.txt")
        self.assertEqual((code, body), (200, b"text"))
        await self.settled()

    async def test_range(self) -> None:
        write(os.path.join(self.data, "n.bin"), bytes(range(100)))
        code, headers, body = await self.get("n.bin", Range="bytes=10-19")
        self.assertEqual((code, body), (206, bytes(range(10, 20))))
        self.assertEqual(headers.getRawHeaders("content-range"), ["bytes 10-19/100"])
        code, _, _ = await self.get("n.bin", Range="bytes=200-300")
        self.assertEqual(code, 416)
        await self.settled()

    async def test_upload_through_the_thread_pool(self) -> None:
        data = os.urandom(2_000_000)
        response = await treq.post(
            self.base + "put?volumeID=data",
            data=upload("/up", "big.bin", data),
            headers=Headers({"Content-Type": [MULTIPART[1]]}),
            persistent=False,
        )
        self.assertEqual(response.code, 204, await response.content())
        self.assertEqual(read(os.path.join(self.data, "up", "big.bin")), data)
        self.assertEqual(os.listdir(os.path.join(self.data, "up")), ["big.bin"])

    async def test_unknown_type(self) -> None:
        write(os.path.join(self.data, "noext"), b"<html>")
        _, headers, _ = await self.get("noext")
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/octet-stream"])

    async def settled(self) -> None:
        """No descriptor on a served file is left open (once the server
        side has seen the end: the client may see the body first)."""
        for _ in range(500):
            if not self.served():
                return
            await deferLater(reactor, 0.01)
        self.assertEqual(self.served(), [])

    def served(self) -> list[str]:
        return [t for t in open_fds().values() if t.startswith(self.data + "/")]
