"""A real multi-node Docker Swarm on one machine, for integration tests.

Each node is a network namespace (``salab-nodeN``) plus a UTS and mount
namespace held open by a small "holder" process; a ``dockerd`` runs inside
with its own ``/run``, ``/var/lib/docker`` and ``/etc/resolv.conf``. The nodes
hang off a host bridge (``salab0``, 10.213.0.1/24) through veth pairs and have
no default route: nothing they do can leave the machine.

A tiny authoritative DNS server (:mod:`tests.lab_dns`) on the bridge address
stands in for Docker's embedded DNS, so agents run inside the node namespaces
can discover each other through ``tasks.agent.lab.test`` and
``_agent._tcp.lab.test``.

Every process the lab starts is put in a cgroup below ``salab/`` (when the
machine has a usable cgroup hierarchy) and containers are put there too via
``--cgroup-parent``; tearing down is "kill everything in the cgroup tree".
This also finds the leftovers of a crashed run, which :meth:`Lab.start`
removes first.

Usage::

    with Lab(nodes=3) as lab:
        agent = lab.start_agent(lab.nodes[0])
        agent.wait_ready(10)
        print(agent.request("GET", "/agents").json())

Requires root, dockerd, nsenter/unshare (util-linux), iproute2 and a static
busybox (for the test image). See :meth:`Lab.can_run`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.parse
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import docker.tls

from swarmagent import certs

T = TypeVar("T")

# --- Fixed lab addressing. One lab per machine at a time: the names below are
# --- what start() cleans up after a crashed run.
#: Labs with different SALAB_ID (0-9) can run side by side: every name,
#: address range and folder below derives from it.
LAB_ID = int(os.environ.get("SALAB_ID", "0"))
if not 0 <= LAB_ID <= 9:
    raise ValueError(f"SALAB_ID must be 0-9, got {LAB_ID}")
PREFIX = "salab" if LAB_ID == 0 else f"sa{LAB_ID}lab"  # netns PREFIX-nodeN, veth PREFIXvN
BRIDGE = f"{PREFIX}0"
NET = f"10.213.{LAB_ID}"  # private test range; never routed anywhere
HOST_IP = f"{NET}.1"
PREFIX_LEN = 24
#: Swarm overlay networks get addresses from here, away from NET.
OVERLAY_POOL = "10.214.0.0/16"
DOMAIN = "lab.test"
#: The cluster address agents resolve by default (an A record set).
AGENT_TASKS_NAME = f"tasks.agent.{DOMAIN}"
#: The same agents as an SRV record set.
AGENT_SRV_NAME = f"_agent._tcp.{DOMAIN}"
AGENT_PORT = 9001
#: The agents serve HTTPS only. The lab makes one CA (``Lab.tls``): agents
#: use its server certificate and trust its clients, as an operator would
#: with ``python -m swarmagent.certs init``.
AGENT_SCHEME = "https"
IMAGE_REPO = "salab/busybox"
IMAGE = f"{IMAGE_REPO}:latest"

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Source tree the agents run from (PYTHONPATH): this working tree by default.
AGENT_SRC = Path(os.environ.get("SALAB_AGENT_SRC", REPO_ROOT))
DEFAULT_ROOT = Path(os.environ.get("SALAB_ROOT", f"/var/tmp/swarmagent-lab{LAB_ID or ''}"))
BUSYBOX = Path("/bin/busybox")
DOCKERD = os.environ.get("SALAB_DOCKERD", "/usr/sbin/dockerd")
#: Debian's docker CLI (20.10, API 1.41); a newer one may come first in PATH.
DOCKER_CLI = "/usr/bin/docker"
#: Both docker CLIs the machine has: Debian's 20.10 and a current one (28.x, API 1.50).
CLIS = [cli for cli in (DOCKER_CLI, "/usr/local/bin/docker") if os.path.exists(cli)]


#: Networks an engine in a swarm has of its own; the rest someone made.
_BUILTIN_NETWORKS = frozenset({"bridge", "host", "none", "ingress", "docker_gwbridge"})

#: iptables FORWARD rule letting traffic between lab nodes through.
_FORWARD_RULE = ("-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT")

# ---------------------------------------------------------------------------
# Small helpers


def run(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output; raise with its stderr if it fails."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def wait_until(
    fn: Callable[[], T | None], timeout: float, interval: float = 0.1, what: str = "condition"
) -> T:
    """Poll ``fn`` until it returns something truthy, at most ``timeout`` s.

    Exceptions from ``fn`` count as "not yet"; the last one is reported if the
    deadline passes.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:  # polling: any error means "not yet"
            last = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}") from last
        time.sleep(interval)


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file ('' if missing)."""
    try:
        data = path.read_bytes()[-64 * 1024 :]
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _parallel(fn: Callable[[Any], T], items: Iterable[Any]) -> list[T]:
    """``[fn(x) for x in items]``, concurrently; re-raises the first error."""
    items = list(items)
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


@dataclass
class Response:
    """An HTTP response, fully read."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    url: str,
    method: str,
    path: str,
    body: bytes | str | dict[str, Any] | list[Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 15,
    context: ssl.SSLContext | None = None,
) -> Response:
    """One HTTP(S) request to ``url`` + ``path``; never raises on 4xx/5xx.

    A dict/list body is sent as JSON. For https without ``context`` the
    server is not verified and no client certificate is sent.
    """
    u = urllib.parse.urlsplit(url)
    hdrs = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    elif isinstance(body, str):
        body = body.encode()
    conn: http.client.HTTPConnection
    if u.scheme == "https":
        ctx = context
        if ctx is None:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(u.hostname or "", u.port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        return Response(r.status, r.headers, r.read())
    finally:
        conn.close()


def multipart(fields: dict[str, str], name: str, content: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body as Portainer's UI sends an upload: the folder
    in ``Path``, the file in ``file``."""
    boundary = "----swarmagent-lab-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = b"".join([*parts, head, content, f"\r\n--{boundary}--\r\n".encode()])
    return body, f"multipart/form-data; boundary={boundary}"


def sdk_client(
    url: str,
    tls: Path,
    *,
    target: str = "",
    timeout: int = 20,
    ca: Path | None = None,
) -> docker.DockerClient:
    """The docker SDK for Python against an agent at ``url`` (https or tcp),
    with the client certificate in ``tls`` (Docker's layout), checking the
    agent against ``ca`` (default: ``tls``'s CA), sending ``target`` if given."""
    client = docker.DockerClient(
        base_url=url.replace("https://", "tcp://"),
        version="1.41",
        timeout=timeout,
        tls=docker.tls.TLSConfig(
            client_cert=(str(tls / certs.CLIENT_CERT), str(tls / certs.CLIENT_KEY)),
            ca_cert=str((ca or tls) / certs.CA_CERT),
            verify=True,
        ),
    )
    # Else requests prefers REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, when set,
    # to the client's own CA file (psf/requests#3829).
    client.api.trust_env = False
    if target:
        client.api.headers["X-PortainerAgent-Target"] = target
    return client


def _engine_ping(sock: Path) -> bool:
    """True if a Docker engine answers ``/_ping`` on unix socket ``sock``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(str(sock))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = s.recv(64).split(b"\r\n", 1)[0]
            return status_line.split(b" ")[1:2] == [b"200"]
    except OSError:
        return False


# ---------------------------------------------------------------------------
# Process tracking through cgroups


def _cgroup_hierarchy() -> Path | None:
    """A cgroup hierarchy we can use to track every lab process.

    cgroup v1's "pids" controller if mounted, else the cgroup v2 root.
    """
    v1 = Path("/sys/fs/cgroup/pids")
    if (v1 / "cgroup.procs").exists():
        return v1
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").exists():
        return v2
    return None


def _cgroup_tree(top: Path) -> list[Path]:
    """``top`` and every cgroup below it, deepest first."""
    if not top.is_dir():
        return []
    dirs = [Path(d) for d, _, _ in os.walk(top)]
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)


def _cgroup_pids(top: Path) -> set[int]:
    pids: set[int] = set()
    for d in _cgroup_tree(top):
        with contextlib.suppress(OSError):
            pids.update(int(x) for x in (d / "cgroup.procs").read_text().split())
    return pids


def _kill(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    me = os.getpid()
    for pid in pids:
        if pid not in (me, 1):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _kill_until_gone(victims: Callable[[], set[int]], timeout: float = 15) -> None:
    """SIGKILL ``victims()`` until it is empty (bounded: it may never be)."""
    deadline = time.monotonic() + timeout
    while (pids := victims()) and time.monotonic() < deadline:
        _kill(pids)
        time.sleep(0.1)


def _pids_mentioning(text: str) -> set[int]:
    """Processes whose command line contains ``text`` (for cgroup-less hosts)."""
    needle = text.encode()
    found = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (d / "cmdline").read_bytes():
                    found.add(int(d.name))
    found.discard(os.getpid())
    return found


# ---------------------------------------------------------------------------
# The test image


def busybox_tarball(cache: Path) -> Path:
    """A root filesystem tarball holding only a static busybox, cached by hash."""
    digest = hashlib.sha256(BUSYBOX.read_bytes()).hexdigest()[:16]
    out = cache / f"busybox-rootfs-{digest}.tar"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    applets = run(str(BUSYBOX), "--list").stdout.split()

    def add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode = tarfile.DIRTYPE, mode
        tar.addfile(ti)

    def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode = len(data), 0o644
        tar.addfile(ti, fileobj=io.BytesIO(data))

    with tarfile.open(tmp, "w") as tar:
        for d in ("bin", "etc", "proc", "sys", "dev", "root", "var"):
            add_dir(tar, d)
        add_dir(tar, "tmp", 0o1777)
        tar.add(str(BUSYBOX), "bin/busybox")
        for applet in applets:
            if applet != "busybox":
                ti = tarfile.TarInfo(f"bin/{applet}")
                ti.type, ti.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(ti)
        add_file(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        add_file(tar, "etc/group", b"root:x:0:\n")
    tmp.rename(out)
    return out


# ---------------------------------------------------------------------------
# Nodes and agents


@dataclass
class Node:
    """One Docker engine in its own namespaces."""

    index: int
    dir: Path
    cgroup: Path | None
    name: str = ""
    ip: str = ""
    netns: str = ""
    veth: str = ""
    #: Holder process of the node's net+uts+mount namespaces (``nsenter -t``).
    pid: int = 0
    holder: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    dockerd: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.name = self.name or f"node{self.index}"
        self.ip = self.ip or f"{NET}.{10 + self.index}"
        self.netns = self.netns or f"{PREFIX}-{self.name}"
        self.veth = self.veth or f"{PREFIX}v{self.index}"

    @property
    def socket(self) -> str:
        """Host path of the engine's second unix socket."""
        return str(self.dir / "sock" / "docker.sock")

    @property
    def dockerd_log(self) -> Path:
        return self.dir / "dockerd.log"

    def docker(self, timeout: int = 60) -> docker.DockerClient:
        """A Docker SDK client talking to this node's engine from the host."""
        return docker.DockerClient(base_url="unix://" + self.socket, timeout=timeout)

    def nsenter(self) -> list[str]:
        """Command prefix that runs something inside this node."""
        return ["nsenter", "-t", str(self.pid), "--net", "--uts", "--mount", f"--wd={self.dir}"]

    def exec(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command inside the node's namespaces."""
        return run(*self.nsenter(), *cmd, check=check)


def run_in_volume(node: Node, volume: str, script: str) -> str:
    """Run ``script`` in a container on ``node`` that mounts ``volume`` at /data;
    its output, which should end with a newline (a last line without one may
    not have reached the log when the container's stream ends)."""
    client = node.docker()
    try:
        container = client.containers.create(
            IMAGE, ["sh", "-c", script], volumes={volume: {"bind": "/data"}}
        )
        try:
            container.start()
            # Followed to its end: logs read after the exit may miss lines.
            out = b"".join(container.logs(stream=True, follow=True))
            status = container.wait()["StatusCode"]
        finally:
            container.remove(force=True)
        if status != 0:
            raise AssertionError(f"{script!r} on {node.name} exited {status}: {out!r}")
        return out.decode()
    finally:
        client.close()


class Agent:
    """A running agent process (``twistd -n swarmagent``) on a node."""

    def __init__(
        self,
        node: Node,
        proc: subprocess.Popen[bytes],
        log: Path,
        port: int,
        overrides: dict[str, str] | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.node = node
        #: TLS for :meth:`request`: the lab's client certificate by default.
        self.context = context
        self.proc = proc
        self.log = log
        self.port = port
        #: The ``**env`` it was started with, beyond the lab's defaults.
        self.overrides = dict(overrides or {})
        self.url = f"{AGENT_SCHEME}://{node.ip}:{port}"

    def __repr__(self) -> str:
        return f"<Agent {self.node.name} pid={self.proc.pid} {self.url}>"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def request(self, method: str, path: str, **kw: Any) -> Response:
        """HTTP request to this agent, with the lab's client certificate
        unless ``context`` says otherwise; see :func:`http_request`."""
        kw.setdefault("context", self.context)
        return http_request(self.url, method, path, **kw)

    def wait_ready(self, timeout: float = 15) -> None:
        """Poll ``GET /ping`` until it answers 204."""

        def ready() -> bool:
            if not self.alive:
                raise AssertionError(
                    f"agent on {self.node.name} exited with {self.proc.returncode}:\n"
                    + self.log_tail()
                )
            return self.request("GET", "/ping", timeout=2).status == 204

        try:
            wait_until(ready, timeout, 0.1, f"agent on {self.node.name} to answer /ping")
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self.log_tail()}") from e

    def stop(self, grace: float = 5) -> None:
        """SIGTERM, then SIGKILL if still running after ``grace`` seconds."""
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.alive:
            self.proc.kill()
        self.proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        return f"--- {self.log} ---\n{tail(self.log, lines)}"


class Lab:
    """A Docker Swarm of ``nodes`` engines (the first ``managers`` are managers)."""

    def __init__(self, nodes: int = 3, managers: int = 1, root: Path = DEFAULT_ROOT) -> None:
        if not 1 <= managers <= nodes:
            raise ValueError("need 1 <= managers <= nodes")
        self.n_nodes = nodes
        self.n_managers = managers
        self.root = Path(root)
        self.cache = Path(os.environ.get("SALAB_CACHE", self.root / "cache"))
        self.nodes: list[Node] = []
        self.agents: list[Agent] = []
        self.dns: subprocess.Popen[bytes] | None = None
        self.dns_file = self.root / "dns.json"
        hierarchy = _cgroup_hierarchy()
        self.cgroup: Path | None = hierarchy / PREFIX if hierarchy else None
        self._agent_seq = 0
        self._tokens: dict[str, str] = {}
        #: Names of the nodes whose link is cut right now.
        self.cut: set[str] = set()

    # -- availability ------------------------------------------------------

    @staticmethod
    def can_run() -> tuple[bool, str]:
        """Whether this machine can host a lab, and if not why."""
        if sys.platform != "linux":
            return False, "needs Linux"
        if os.geteuid() != 0:
            return False, "needs root"
        for tool in ("nsenter", "unshare", "ip", "mount", "umount"):
            if not shutil.which(tool):
                return False, f"{tool} not found"
        if not os.access(DOCKERD, os.X_OK):
            return False, f"{DOCKERD} not found"
        if not BUSYBOX.exists():
            return False, f"{BUSYBOX} not found (apt install busybox-static)"
        if "overlay" not in Path("/proc/filesystems").read_text():
            return False, "kernel has no overlay filesystem"
        if not Path("/sys/fs/cgroup").is_dir():
            return False, "no /sys/fs/cgroup"
        return True, ""

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Clean up leftovers, then bring up bridge, DNS, engines and the swarm."""
        self.cleanup_leftovers()
        self.root.mkdir(parents=True, exist_ok=True)
        tarball = busybox_tarball(self.cache)
        self._make_certs()
        self._setup_bridge()
        self.nodes = [self._new_node(i) for i in range(1, self.n_nodes + 1)]
        self.set_dns(self.nodes)
        self._start_dns()
        _parallel(self._start_node, self.nodes)
        _parallel(lambda n: self._load_image(n, tarball), self.nodes)
        self._form_swarm()

    def stop(self) -> None:
        """Tear everything down; safe on a half-started lab and when repeated."""
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.stop(grace=2)
        self.agents = []
        # Engines are killed outright: a clean dockerd shutdown waits for
        # containers (``sleep`` as PID 1 ignores SIGTERM), and the whole
        # mount namespace with its overlay mounts disappears anyway.
        self._kill_all()
        self.dns = None
        self.nodes = []
        self.cut = set()
        self._remove_network()
        self._remove_cgroups()
        self._remove_files()

    @property
    def tls(self) -> Path:
        """The lab's CA, agent certificate and client certificate (Docker's layout)."""
        return self.root / "tls"

    def _make_certs(self) -> None:
        ips = [ipaddress.ip_address(f"{NET}.{10 + i}") for i in range(1, 40)]
        names = [f"node{i}" for i in range(1, 40)]
        certs.init(self.tls, names, ips, force=True)

    def client_context(self, certificate: bool = True) -> ssl.SSLContext:
        """TLS that verifies the agents against the lab's CA and, if
        ``certificate``, presents the lab's client certificate."""
        ctx = ssl.create_default_context(cafile=str(self.tls / certs.CA_CERT))
        if certificate:
            ctx.load_cert_chain(self.tls / certs.CLIENT_CERT, self.tls / certs.CLIENT_KEY)
        return ctx

    def cleanup_leftovers(self) -> None:
        """Remove what an earlier (crashed) run of a lab may have left behind."""
        self._kill_all()
        self._remove_network()
        self._remove_cgroups()
        self._remove_files()

    def _kill_all(self) -> None:
        """SIGKILL every lab process, until none is left (bounded)."""

        def victims() -> set[int]:
            pids: set[int] = set()
            for ns in self._lab_netns():
                pids |= {int(p) for p in run("ip", "netns", "pids", ns, check=False).stdout.split()}
            if self.cgroup is not None:
                pids |= _cgroup_pids(self.cgroup)
            else:
                # No cgroup tracking: dockerd, the DNS server and the holders
                # name the lab root on their command line. (Containers and
                # agents are found through the netns, or not at all.)
                pids |= _pids_mentioning(str(self.root) + "/")
            return pids

        _kill_until_gone(victims)
        # Reap our own children so no zombies keep counting as "alive".
        for proc in [self.dns] + [p for n in self.nodes for p in (n.dockerd, n.holder)]:
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.wait(5)

    @staticmethod
    def _lab_netns() -> list[str]:
        out = run("ip", "netns", "list", check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX + "-")]

    def _remove_network(self) -> None:
        self._remove_forward_rules()
        for ns in self._lab_netns():
            run("ip", "netns", "del", ns, check=False)
        links = run("ip", "-o", "link", "show", check=False).stdout
        for line in links.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if name.startswith(PREFIX):
                run("ip", "link", "del", name, check=False)

    def _cgroup_tops(self) -> list[Path]:
        """The lab's cgroup in each hierarchy that has one."""
        if self.cgroup is None:
            return []
        # Containers went into every v1 hierarchy through --cgroup-parent.
        return [self.cgroup] + [
            d / PREFIX for d in Path("/sys/fs/cgroup").iterdir() if (d / PREFIX).is_dir()
        ]

    def _remove_cgroups(self) -> None:
        for top in self._cgroup_tops():
            for d in _cgroup_tree(top):
                with contextlib.suppress(OSError):
                    d.rmdir()

    def _remove_files(self) -> None:
        # Mounts live in the nodes' private mount namespaces, but a crash at
        # the wrong time (or an older harness) may have left some on the host.
        mounts = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if mp == str(self.root) or mp.startswith(str(self.root) + "/"):
                    mounts.append(mp)
        for mp in sorted(mounts, key=len, reverse=True):
            run("umount", "-l", mp, check=False)
        if not self.root.is_dir():
            return
        for child in self.root.iterdir():
            if child == self.cache:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)

    # -- network and DNS ----------------------------------------------------

    def _setup_bridge(self) -> None:
        run("ip", "link", "add", BRIDGE, "type", "bridge", "forward_delay", "0")
        run("ip", "addr", "add", f"{HOST_IP}/{PREFIX_LEN}", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        # With br_netfilter loaded, frames between two ports of the bridge go
        # through the host's iptables FORWARD chain, whose policy is DROP on
        # any host that runs Docker itself. Let the lab's own traffic pass.
        if shutil.which("iptables"):
            run("iptables", "-I", "FORWARD", *_FORWARD_RULE, check=False)

    @staticmethod
    def _remove_forward_rules() -> None:
        if shutil.which("iptables"):
            for _ in range(10):  # one per earlier run that crashed, at most
                if run("iptables", "-D", "FORWARD", *_FORWARD_RULE, check=False).returncode:
                    break

    def _start_dns(self) -> None:
        log = self.root / "dns.log"
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("lab_dns.py")),
            "--records",
            str(self.dns_file),
            "--listen",
            HOST_IP,
            "--port",
            "53",
        ]
        self.dns = self._spawn(cmd, "dns", log)

        def answering() -> bool:
            if self.dns is not None and self.dns.poll() is not None:
                raise RuntimeError(f"lab DNS server exited:\n{tail(log)}")
            return "DNSServerFactory starting" in tail(log)

        wait_until(answering, 10, 0.05, "the lab DNS server")

    def set_dns(self, nodes: Iterable[Node], port: int = AGENT_PORT) -> None:
        """Publish ``nodes`` as the agent service (A and SRV) in the lab DNS."""
        nodes = list(nodes)
        records: dict[str, dict[str, list[Any]]] = {
            f"{n.name}.{DOMAIN}": {"A": [n.ip]} for n in self.nodes
        }
        records[AGENT_TASKS_NAME] = {"A": [n.ip for n in nodes]}
        records[AGENT_SRV_NAME] = {"SRV": [[0, 0, port, f"{n.name}.{DOMAIN}"] for n in nodes]}
        if not nodes:
            # An empty record set would make these names NXDOMAIN; say so.
            del records[AGENT_TASKS_NAME], records[AGENT_SRV_NAME]
        tmp = self.dns_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"zone": DOMAIN, "records": records}, indent=1))
        tmp.rename(self.dns_file)  # atomic, and a new inode the server notices

    def cut_link(self, node: Node) -> None:
        """Take the node off the bridge (host side of its veth down)."""
        run("ip", "link", "set", node.veth, "down")
        self.cut.add(node.name)

    def restore_link(self, node: Node, timeout: float = 10) -> None:
        """Put the node back on the bridge and wait until the host reaches it.

        The first packets after the link comes back can take a few hundred
        ms (neighbour entries that went FAILED during the cut).
        """
        run("ip", "link", "set", node.veth, "up")
        self.cut.discard(node.name)
        wait_until(
            lambda: run(str(BUSYBOX), "ping", "-c1", "-W1", node.ip, check=False).returncode == 0,
            timeout,
            0.05,
            f"{node.name} reachable again",
        )

    # -- processes ---------------------------------------------------------

    def _spawn(
        self, cmd: list[str], cgroup: str, log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` inside lab cgroup ``cgroup`` (relative to salab/).

        A shell moves itself into the cgroup before exec'ing ``cmd``, so the
        process and all its descendants are tracked from their first instant.
        """
        if self.cgroup is not None:
            cg = self.cgroup / cgroup
            cg.mkdir(parents=True, exist_ok=True)
            cmd = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cg / "cgroup.procs"), *cmd]
        with open(log, "ab") as out:
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a ^C on the test run must not hit them first
            )

    # -- nodes -------------------------------------------------------------

    def _new_node(self, index: int) -> Node:
        node = Node(index=index, dir=self.root / f"node{index}", cgroup=None)
        if self.cgroup is not None:
            node.cgroup = self.cgroup / node.name
        for sub in ("data", "sock", "agent-data"):
            (node.dir / sub).mkdir(parents=True, exist_ok=True)
        (node.dir / "resolv.conf").write_text(f"nameserver {HOST_IP}\nsearch {DOMAIN}\n")
        run("ip", "netns", "add", node.netns)
        run(
            "ip",
            "link",
            "add",
            node.veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            node.netns,
        )
        run("ip", "link", "set", node.veth, "master", BRIDGE, "up")
        run("ip", "-n", node.netns, "addr", "add", f"{node.ip}/{PREFIX_LEN}", "dev", "eth0")
        run("ip", "-n", node.netns, "link", "set", "eth0", "up")
        run("ip", "-n", node.netns, "link", "set", "lo", "up")
        return node

    def _start_node(self, node: Node) -> None:
        """Start the namespace holder, then dockerd inside it; wait for the engine."""
        resolv = Path("/etc/resolv.conf").resolve()
        # If /etc/resolv.conf points into /run, its target vanishes under our
        # fresh /run tmpfs: recreate it so the bind mount has a target.
        touch = (
            f'mkdir -p "{resolv.parent}" && touch "{resolv}" && '
            if str(resolv).startswith("/run/")
            else ""
        )
        script = (
            "set -e; "
            f"echo {node.name} > /proc/sys/kernel/hostname; "
            "mount --make-rprivate /; "
            "mount -t tmpfs -o mode=755 tmpfs /run; "
            f"{touch}"
            "mkdir -p /var/lib/docker; "
            f'mount --bind "{node.dir / "data"}" /var/lib/docker; '
            f'mount --bind "{node.dir / "resolv.conf"}" /etc/resolv.conf; '
            "exec sleep infinity"
        )
        node.holder = self._spawn(
            [
                "nsenter",
                f"--net=/run/netns/{node.netns}",
                "unshare",
                "--uts",
                "--mount",
                "sh",
                "-c",
                script,
            ],
            f"{node.name}/holder",
            node.dir / "holder.log",
        )
        node.pid = node.holder.pid

        def settled() -> bool:
            if node.holder is not None and node.holder.poll() is not None:
                raise RuntimeError(f"{node.name} holder exited:\n{tail(node.dir / 'holder.log')}")
            # The shell has exec'ed sleep once the mounts are done.
            return Path(f"/proc/{node.pid}/comm").read_text().strip() == "sleep"

        wait_until(settled, 10, 0.02, f"{node.name} namespaces")
        self.start_engine(node)

    def start_engine(self, node: Node, timeout: float = 30) -> None:
        """(Re)start the node's dockerd and wait until it answers."""
        Path(node.socket).unlink(missing_ok=True)
        cmd = [
            *node.nsenter(),
            DOCKERD,
            "--data-root",
            "/var/lib/docker",
            "--exec-root",
            "/run/docker",
            "--pidfile",
            "/run/docker.pid",
            "-H",
            "unix:///var/run/docker.sock",
            "-H",
            f"unix://{node.socket}",
            "--storage-driver",
            "overlay2",
            "--iptables=false",
            # Containers land in the lab's cgroup tree, so teardown finds them.
            *(["--cgroup-parent", f"/{PREFIX}/{node.name}"] if self.cgroup else []),
        ]
        node.dockerd = self._spawn(cmd, f"{node.name}/daemon", node.dockerd_log)

        def up() -> bool:
            if node.dockerd is not None and node.dockerd.poll() is not None:
                raise RuntimeError(f"dockerd on {node.name} exited:\n{tail(node.dockerd_log)}")
            return _engine_ping(Path(node.socket))

        wait_until(up, timeout, 0.1, f"dockerd on {node.name}")

    def stop_engine(self, node: Node) -> None:
        """Kill the node's dockerd (its containers keep running)."""
        if node.dockerd is not None and node.dockerd.poll() is None:
            node.dockerd.kill()
            node.dockerd.wait(10)

    def _load_image(self, node: Node, tarball: Path) -> None:
        client = node.docker()
        try:
            client.api.import_image(
                src=str(tarball), repository=IMAGE_REPO, tag="latest", changes=['CMD ["sh"]']
            )
            client.images.get(IMAGE)
        finally:
            client.close()

    def _form_swarm(self) -> None:
        manager = self.nodes[0]
        client = manager.docker()
        try:
            client.swarm.init(
                advertise_addr=manager.ip,
                listen_addr=f"{manager.ip}:2377",
                default_addr_pool=[OVERLAY_POOL],
                subnet_size=24,
            )
            tokens = client.swarm.attrs["JoinTokens"]
        finally:
            client.close()
        self._tokens = tokens
        # Managers join one at a time (raft membership changes serialise
        # anyway); workers can join together.
        for node in self.nodes[1 : self.n_managers]:
            self._join(node, manager=True)
        _parallel(self._join, self.nodes[self.n_managers :])
        self.wait_swarm_ready()

    def _join(self, node: Node, manager: bool = False) -> None:
        client = node.docker()
        try:
            client.swarm.join(
                remote_addrs=[f"{self.nodes[0].ip}:2377"],
                join_token=self._tokens["Manager" if manager else "Worker"],
                advertise_addr=node.ip,
                listen_addr=f"{node.ip}:2377",
            )
        finally:
            client.close()

    def wait_swarm_ready(self, timeout: float = 30) -> None:
        """Wait until the manager sees every node of the lab Ready."""
        names = {n.name for n in self.nodes}

        def ready() -> bool:
            client = self.manager.docker()
            try:
                nodes = client.nodes.list()
            finally:
                client.close()
            up = {
                n.attrs["Description"]["Hostname"]
                for n in nodes
                if n.attrs["Status"]["State"] == "ready"
            }
            return names <= up

        wait_until(ready, timeout, 0.2, "all swarm nodes Ready")

    @property
    def manager(self) -> Node:
        return self.nodes[0]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def node_ids(self) -> dict[str, str]:
        """Swarm node ID of each lab node, by name."""
        client = self.manager.docker()
        try:
            return {n.attrs["Description"]["Hostname"]: n.id for n in client.nodes.list()}
        finally:
            client.close()

    def add_node(self) -> Node:
        """Start one more engine and join it to the swarm as a worker."""
        node = self._new_node(max((n.index for n in self.nodes), default=0) + 1)
        self.nodes.append(node)
        self._start_node(node)
        self._load_image(node, busybox_tarball(self.cache))
        self._join(node)
        self.wait_swarm_ready()
        return node

    def remove_node(self, node: Node) -> None:
        """The reverse of :meth:`add_node`: out of the swarm, then torn down."""
        with contextlib.suppress(Exception):
            node_id = self.node_ids().get(node.name)
            client = self.manager.docker()
            try:
                if node_id:
                    client.nodes.get(node_id).remove(force=True)
            finally:
                client.close()

        def victims() -> set[int]:
            out = run("ip", "netns", "pids", node.netns, check=False).stdout.split()
            pids = {int(p) for p in out}
            if node.cgroup is not None:
                pids |= _cgroup_pids(node.cgroup)
            return pids

        _kill_until_gone(victims)
        for proc in (node.dockerd, node.holder):
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.wait(5)
        run("ip", "netns", "del", node.netns, check=False)
        run("ip", "link", "del", node.veth, check=False)
        for top in self._cgroup_tops():
            for d in _cgroup_tree(top / node.name):
                with contextlib.suppress(OSError):
                    d.rmdir()
        shutil.rmtree(node.dir, ignore_errors=True)
        self.nodes.remove(node)
        self.cut.discard(node.name)
        self.agents = [a for a in self.agents if a.node is not node]

    def reset(self, nodes: int) -> None:
        """Back to a lab as :meth:`start` leaves it, with ``nodes`` nodes.

        No agents; links up; every node in DNS and active in the swarm; no
        services, secrets, configs, containers, volumes or networks of
        anyone's making; empty agent data folders. The engines, the swarm
        and the images stay: that is what makes it cheaper than a new lab.
        """
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.stop(grace=2)
        self.agents = []
        for name in list(self.cut):
            self.restore_link(self.node(name))
        while len(self.nodes) > nodes:
            self.remove_node(self.nodes[-1])
        while len(self.nodes) < nodes:
            self.add_node()
        manager = self.manager.docker()
        try:
            for service in manager.services.list():
                service.remove()
            for node in manager.nodes.list():
                if node.attrs["Spec"].get("Availability") != "active":
                    node.update({**node.attrs["Spec"], "Availability": "active"})
        finally:
            manager.close()
        _parallel(self._clear_engine, self.nodes)
        manager = self.manager.docker()
        try:
            for secret in manager.secrets.list():
                secret.remove()
            for config in manager.configs.list():
                config.remove()
        finally:
            manager.close()
        for node in self.nodes:
            data = node.dir / "agent-data"
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir()
        self.set_dns(self.nodes)

    def _clear_engine(self, node: Node) -> None:
        """Remove every container, volume and made network from ``node``'s engine."""
        client = node.docker()

        def cleared() -> bool:
            # Tasks of removed services may still be going away: repeat.
            for c in client.containers.list(all=True):
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    c.remove(force=True, v=True)
            for v in client.volumes.list():
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    v.remove(force=True)
            for n in made_networks():
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    n.remove()
            return not (
                client.containers.list(all=True) or client.volumes.list() or made_networks()
            )

        def made_networks() -> list[Any]:
            # Overlay networks are the manager's to remove; workers follow.
            return [
                n
                for n in client.networks.list()
                if n.name not in _BUILTIN_NETWORKS
                and (node is self.manager or n.attrs.get("Scope") != "swarm")
            ]

        try:
            wait_until(cleared, 60, 0.5, f"{node.name}'s engine to be empty")
        finally:
            client.close()

    # -- agents ------------------------------------------------------------

    def agent_env(self, node: Node, **env: str) -> dict[str, str]:
        """The environment :meth:`start_agent` gives an agent on ``node``."""
        base = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(node.dir),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(AGENT_SRC),
            "PYTHONUNBUFFERED": "1",
            "AGENT_HOST": node.ip,
            "AGENT_PORT": str(AGENT_PORT),
            "AGENT_CLUSTER_ADDR": AGENT_TASKS_NAME,
            # Inside the node's mount namespace this is the node's own engine.
            "DOCKER_HOST": "unix:///var/run/docker.sock",
            "AGENT_REFRESH_INTERVAL": "1",
            "AGENT_FANOUT_TIMEOUT": "3",
            "DATA_PATH": str(node.dir / "agent-data"),
            "AGENT_TLS_CERT": str(self.tls / certs.SERVER_CERT),
            "AGENT_TLS_KEY": str(self.tls / certs.SERVER_KEY),
            "AGENT_TLS_CA": str(self.tls / certs.CA_CERT),
        }
        # Which path serves plain Docker requests (--relay): the run's choice,
        # so that every lab test can run on both.
        if "AGENT_RELAY" in os.environ:
            base["AGENT_RELAY"] = os.environ["AGENT_RELAY"]
        base.update({k: str(v) for k, v in env.items()})
        return base

    def start_agent(self, node: Node, **env: str) -> Agent:
        """Run ``twistd -n swarmagent`` inside ``node``; returns at once."""
        full_env = self.agent_env(node, **env)
        self._agent_seq += 1
        log = node.dir / f"agent-{self._agent_seq}.log"
        cmd = [
            *node.nsenter(),
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "swarmagent",
        ]
        proc = self._spawn(cmd, f"{node.name}/agents", log, env=full_env)
        overrides = {k: str(v) for k, v in env.items()}
        context = self.client_context() if full_env.get("AGENT_TLS_CA") else None
        agent = Agent(node, proc, log, int(full_env["AGENT_PORT"]), overrides, context)
        self.agents.append(agent)
        return agent

    def logs(self, lines: int = 30) -> str:
        """Tails of the agent logs (for failure reports)."""
        return "\n".join(a.log_tail(lines) for a in self.agents)
