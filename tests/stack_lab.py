"""The lab swarm with the agent deployed as users deploy it: a stack.

:class:`StackLab` is a :class:`tests.lab.Lab` whose agents are not processes
the harness starts but the tasks of ``compose/agent-stack.yml`` (plus
``agent-stack.tls.yml``, for the lab's certificates), deployed with
``docker stack deploy`` from the image the ``Dockerfile`` builds. The image is
built without a registry: a Debian base made with debootstrap from the
machine's own apt source, then ``docker build`` on a build engine in the
host's network namespace (the node engines have no route). Both are cached
in :data:`IMAGE_CACHE` between runs.

It is also the local lab a user starts with ``scripts/lab up`` (see
:func:`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.lab import (
    AGENT_PORT,
    DOCKER_CLI,
    PREFIX,
    REPO_ROOT,
    Lab,
    Node,
    Response,
    http_request,
    run,
    tail,
    wait_until,
)

IMAGE_CACHE = Path(os.environ.get("SALAB_IMAGE_CACHE", "/var/cache/swarmagent-lab"))
DEBIAN_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-pip", "python-is-python3", "ca-certificates")
BASE_IMAGE = f"swarmagent-lab/python:{DEBIAN_SUITE}"
AGENT_IMAGE = "swarmagent:lab"
STACK = "swarmagent"
SERVICE = f"{STACK}_agent"
STACK_FILES = ("compose/agent-stack.yml", "compose/agent-stack.tls.yml")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        with contextlib.suppress(OSError):
            text = path.read_text()
            for m in re.finditer(r"^\s*URIs:\s*(\S+)|^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M):
                uri = m.group(1) or m.group(2)
                if "security" not in uri:
                    return uri
    return "http://deb.debian.org/debian"


def base_rootfs(cache: Path, log: Path) -> Path:
    """A Debian root filesystem with Python and pip, as a tarball (cached).

    It stands in for ``python:3.12-slim``: pip installs system-wide, so
    Debian's ``EXTERNALLY-MANAGED`` marker goes, and so do apt's caches.
    """
    key = hashlib.sha256(f"{DEBIAN_SUITE} {BASE_PACKAGES}".encode()).hexdigest()[:12]
    out = cache / f"debian-python-{key}.tar"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / f"rootfs-{os.getpid()}"
    try:
        with open(log, "ab") as f:
            subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    DEBIAN_SUITE,
                    str(root),
                    apt_mirror(),
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=900,
            )
        for junk in (
            *root.glob("usr/lib/python3*/EXTERNALLY-MANAGED"),
            *root.glob("var/cache/apt/archives/*.deb"),
            *root.glob("var/lib/apt/lists/*_*"),
        ):
            junk.unlink()
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        run("tar", "-C", str(root), "-cf", str(tmp), ".", timeout=300)
        tmp.rename(out)
    finally:
        run("rm", "-rf", "--one-file-system", str(root), check=False, timeout=300)
    return out


class BuildEngine:
    """A dockerd in the host's network namespace, only for building images.

    Its data root is in the cache, so build layers survive between runs; a
    lock keeps two labs from sharing it at once.
    """

    def __init__(self, cache: Path) -> None:
        self.dir = cache / "build-engine"
        self.socket = self.dir / "docker.sock"
        # Short: containerd's socket paths live under the exec root.
        self.exec_root = Path(f"/run/salab-build-{os.getpid()}")
        self.log = self.dir / "dockerd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock: Any = None

    def __enter__(self) -> BuildEngine:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir / "lock", "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.socket.unlink(missing_ok=True)
        with open(self.log, "ab") as out:
            self._proc = subprocess.Popen(
                [
                    "dockerd",
                    "--data-root",
                    str(self.dir / "data"),
                    "--exec-root",
                    str(self.exec_root),
                    "--pidfile",
                    str(self.exec_root / "dockerd.pid"),
                    "-H",
                    f"unix://{self.socket}",
                    # No bridge, no iptables: it only builds, with --network host.
                    "--bridge=none",
                    "--iptables=false",
                    "--storage-driver",
                    "overlay2",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until(self._up, 60, 0.2, "the build engine")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _up(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"build engine exited:\n{tail(self.log)}")
        return self.docker("version", check=False).returncode == 0

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        run("rm", "-rf", str(self.exec_root), check=False)
        if self._lock is not None:
            self._lock.close()

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_BUILDKIT": "1",
        }

    def docker(
        self, *args: str, check: bool = True, log: Path | None = None, timeout: float = 900
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this engine (output to ``log`` if given)."""
        if log is None:
            return subprocess.run(
                [DOCKER_CLI, *args],
                capture_output=True,
                text=True,
                env=self.env(),
                timeout=timeout,
                check=check,
            )
        with open(log, "a") as f:
            return subprocess.run(
                [DOCKER_CLI, *args],
                stdout=f,
                stderr=subprocess.STDOUT,
                text=True,
                env=self.env(),
                timeout=timeout,
                check=check,
            )


def build_agent_image(cache: Path, out: Path, log: Path) -> Path:
    """Build the ``Dockerfile`` on a Debian base and save the image to ``out``."""
    rootfs = base_rootfs(cache, log)
    with BuildEngine(cache) as engine:
        if engine.docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
            engine.docker("import", "-c", 'CMD ["python3"]', str(rootfs), BASE_IMAGE, log=log)
        # The host's CA bundle goes in as a build secret: this machine may reach
        # the package index through a TLS-inspecting proxy only the host trusts.
        secret = ["--secret", f"id=ca,src={HOST_CA_BUNDLE}"] if HOST_CA_BUNDLE.is_file() else []
        engine.docker(
            "build",
            "--network",
            "host",
            *secret,
            "--build-arg",
            f"BASE_IMAGE={BASE_IMAGE}",
            "-t",
            AGENT_IMAGE,
            str(REPO_ROOT),
            log=log,
        )
        engine.docker("save", "-o", str(out), AGENT_IMAGE, log=log)
    return out


class StackAgent:
    """The agent task on one node, reached on the node's published port."""

    def __init__(self, lab: StackLab, node: Node) -> None:
        self.node = node
        self.url = f"https://{node.ip}:{AGENT_PORT}"
        self._lab = lab

    def request(self, method: str, path: str, **kw: Any) -> Response:
        """HTTPS request with the lab's client certificate; see :func:`http_request`."""
        kw.setdefault("context", self._lab.client_context())
        return http_request(self.url, method, path, **kw)

    def names(self) -> set[str]:
        """Node names in this agent's ``GET /agents``."""
        r = self.request("GET", "/agents", timeout=5)
        if r.status != 200:
            raise AssertionError(f"GET /agents on {self.node.name}: {r.status}")
        return {a["NodeName"] for a in r.json()}


class StackLab(Lab):
    """A :class:`Lab` running the agent as the ``swarmagent`` stack."""

    def __init__(self, nodes: int = 3, managers: int = 1, **kw: Any) -> None:
        super().__init__(nodes, managers, **kw)
        self.image_cache = IMAGE_CACHE
        self.log = self.root / "stack.log"

    @property
    def image_tarball(self) -> Path:
        return self.root / "agent-image.tar"

    def build(self) -> None:
        """Build the agent image (on the host) into :attr:`image_tarball`."""
        build_agent_image(self.image_cache, self.image_tarball, self.log)

    def load(self, nodes: list[Node] | None = None) -> None:
        """Load the agent image on ``nodes`` (default: all)."""
        for node in nodes or self.nodes:
            client = node.docker(timeout=300)
            try:
                with open(self.image_tarball, "rb") as f:
                    client.images.load(f)
            finally:
                client.close()

    def stack_env(self) -> dict[str, str]:
        """Environment for the docker CLI on the manager, with the stack's variables."""
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.root),
            "DOCKER_HOST": f"unix://{self.manager.socket}",
            "SWARMAGENT_IMAGE": AGENT_IMAGE,
            "SWARMAGENT_TLS": str(self.tls),
        }

    def manager_cli(self, *args: str, timeout: float = 120) -> str:
        """Run the docker CLI against the manager's engine; its output."""
        p = subprocess.run(
            [DOCKER_CLI, *args],
            capture_output=True,
            text=True,
            env=self.stack_env(),
            cwd=REPO_ROOT,
            timeout=timeout,
            check=False,
        )
        with open(self.log, "a") as f:
            f.write(f"$ docker {' '.join(args)}\n{p.stdout}{p.stderr}")
        if p.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed: {p.stderr.strip()}")
        return p.stdout

    def deploy(self, *overlays: str) -> None:
        """``docker stack deploy`` the stack files, unchanged, plus ``overlays``."""
        files = [a for f in (*STACK_FILES, *overlays) for a in ("-c", f)]
        self.manager_cli("stack", "deploy", *files, "--resolve-image", "never", STACK)

    @property
    def stack_agents(self) -> dict[str, StackAgent]:
        return {n.name: StackAgent(self, n) for n in self.nodes}

    def wait_whole(self, timeout: float = 90, nodes: list[Node] | None = None) -> None:
        """Wait until every agent (of ``nodes``) knows every node of the lab."""
        everyone = {n.name for n in self.nodes}
        for node in nodes or self.nodes:
            agent = StackAgent(self, node)

            def knows_everyone(agent: StackAgent = agent) -> bool:
                return agent.names() == everyone

            wait_until(
                knows_everyone,
                timeout,
                0.5,
                f"the agent on {node.name} to know {sorted(everyone)}",
            )

    def deploy_stack(self) -> None:
        """Build and load the image (once per lab), deploy, wait for every agent.

        Not part of :meth:`start`: the same lab serves the tests whose agents
        the harness starts (see :mod:`tests.labcase`), and :meth:`reset`
        removes the stack again.
        """
        if not self.image_tarball.exists():
            self.build()
            self.load()
        self.deploy()
        self.wait_whole()

    def add_node(self) -> Node:
        """One more worker, with the image loaded if built; the global service lands on it."""
        node = super().add_node()
        if self.image_tarball.exists():
            self.load([node])
        return node

    # -- a lab that outlives the process that made it (scripts/lab) -------

    def attach(self) -> None:
        """Find the nodes of a lab started by another process."""
        self.nodes = []
        for d in sorted(self.root.glob("node*"), key=lambda p: int(p.name[4:] or 0)):
            node = Node(index=int(d.name[4:]), dir=d, cgroup=None)
            if self.cgroup is not None:
                node.cgroup = self.cgroup / node.name
            node.pid = _holder_pid(node)
            self.nodes.append(node)
        if not self.nodes:
            raise RuntimeError(f"no lab found in {self.root}")
        client = self.manager.docker()
        try:
            self._tokens = client.swarm.attrs["JoinTokens"]
        finally:
            client.close()


def _holder_pid(node: Node) -> int:
    """The process holding ``node``'s namespaces (a ``sleep`` in its netns)."""
    pids = run("ip", "netns", "pids", node.netns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if cmdline[:2] == [b"sleep", b"infinity"]:
                return int(pid)
    raise RuntimeError(f"{node.name}: its namespace holder is gone")


# ---------------------------------------------------------------------------
# scripts/lab


@contextlib.contextmanager
def step(n: int, total: int, what: str, log: Path) -> Iterator[None]:
    """Print one step of the lab's progress; on failure, say where to look."""
    print(f"[{n}/{total}] {what} ...", end="", flush=True)
    start = time.monotonic()
    try:
        yield
    except BaseException as e:
        print(" FAILED")
        print(f"    {type(e).__name__}: {e}".rstrip(), file=sys.stderr)
        print(f"    log: {log}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f" done ({time.monotonic() - start:.1f} s)")


def up(lab: StackLab) -> None:
    total = 6
    lab.cleanup_leftovers()
    lab.root.mkdir(parents=True, exist_ok=True)
    log = lab.log
    with step(1, total, f"Starting {lab.n_nodes} Docker engines and forming the swarm", log):
        try:
            Lab.start(lab)
        except BaseException:
            lab.stop()
            raise
    with step(2, total, "Making the Debian base image (debootstrap, cached)", log):
        base_rootfs(lab.image_cache, log)
    with step(3, total, "Building the agent image from the Dockerfile", log):
        lab.build()
    with step(4, total, "Loading the image on every node", log):
        lab.load()
    with step(5, total, "Deploying compose/agent-stack.yml (docker stack deploy)", log):
        lab.deploy()
    with step(6, total, "Waiting for every agent to see every other", log):
        lab.wait_whole()
    connect(lab)


def connect(lab: StackLab) -> None:
    """The three lines that point the docker CLI at the cluster."""
    print("\nThe cluster is up. Point the docker CLI at it (any node's agent will do):\n")
    print(f"export DOCKER_HOST=tcp://{lab.manager.ip}:{AGENT_PORT}")
    print("export DOCKER_TLS_VERIFY=1")
    print(f"export DOCKER_CERT_PATH={lab.tls}")
    print(
        f"\nThen: docker ps -a   (every node's containers)."
        f" Nodes: {', '.join(f'{n.name} {n.ip}' for n in lab.nodes)}."
        f" Tear down: scripts/lab down"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="scripts/lab", description="A local Docker Swarm running swarmagent as a stack."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the swarm and deploy the agent")
    p_up.add_argument("--nodes", type=int, default=3, help="engines in the swarm (default 3)")
    p_up.add_argument("--managers", type=int, default=1, help="of which managers (default 1)")
    sub.add_parser("down", help="remove everything the lab made (the image cache stays)")
    sub.add_parser("add-node", help="join one more engine to the running swarm")
    sub.add_parser("env", help="print the docker CLI settings again")
    args = parser.parse_args(argv)
    ok, why = Lab.can_run()
    if not ok:
        raise SystemExit(f"scripts/lab: this machine cannot run the lab: {why}")
    if args.command == "up":
        up(StackLab(nodes=args.nodes, managers=args.managers))
    elif args.command == "down":
        lab = StackLab()
        lab.cleanup_leftovers()
        print(f"Removed the lab ({PREFIX}-* namespaces, bridge, engines, {lab.root}).")
    else:
        lab = StackLab()
        lab.attach()
        if args.command == "add-node":
            with step(1, 2, "Starting one more engine and joining it", lab.log):
                node = lab.add_node()
            with step(2, 2, f"Waiting for the agent on {node.name} and its peers", lab.log):
                lab.wait_whole()
            print(f"{node.name} ({node.ip}) joined; `docker ps -a` now includes it.")
        else:
            connect(lab)


if __name__ == "__main__":
    main()
