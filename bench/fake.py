"""A fake cluster on loopback: nginx as every node's engine, real agents, no root.

Each fake node is an nginx ``server`` on its own unix socket answering what
the agent and the bench ask an engine (the static answers of
performance-options.md §0):

- ``/_ping``: ``OK`` with Docker's header set;
- ``/containers/json``: a static list of synthetic containers in Docker's item
  shape (about 840 bytes each; 100 of them are 84 KB), served with a
  Content-Length (a real engine chunks anything over 2 KB); the same bytes
  answer ``/containers/{anything}/json``;
- ``/info``: "not in a swarm" for a standalone node, else an active swarm
  worker with its own node ID (no manager, so no node list is expected).

Each agent serves its clients with the run's ``AGENT_RELAY`` (``web`` when
unset), or the mode given for its node, so parts can put both side by side.

One nginx process serves every node's socket. Agents run from
``bench/agentproc.py`` (``makeService`` as twistd runs it) on
``127.7X.0.(10+i)`` and find each other through a hosts file the bench
rewrites to change who is in the cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.client import Target, fetch
from swarmagent import certs
from swarmagent.signature import Signer

REPO = Path(__file__).resolve().parent.parent
LAB_ID = int(os.environ.get("SALAB_ID", "0"))
#: Loopback network of this lab id's fake nodes, and the agents' port.
NET = f"127.{70 + LAB_ID}.0"
PORT = 9001 + 100 * LAB_ID
CLUSTER_NAME = "agents.bench"
#: The agents' front door unless a node is given its own: the run's.
RUN_RELAY = os.environ.get("AGENT_RELAY", "").lower() or "web"
#: The secret the agents are given; the signature headers sign it, as Portainer
#: signs AGENT_SECRET's digest.
SECRET = "bench"
PING_HEADERS = (
    ("Api-Version", "1.47"),
    ("Builder-Version", "2"),
    ("Cache-Control", "no-cache, no-store, must-revalidate"),
    ("Docker-Experimental", "false"),
    ("Ostype", "linux"),
    ("Pragma", "no-cache"),
)

ENGINE_SERVER = """\
    server {{
        listen unix:{sock};
        root {root};
        default_type application/json;
        add_header Api-Version 1.47;
        add_header Ostype linux;
        location ~ ^(/v[0-9.]+)?/_ping$ {{
            default_type "text/plain; charset=utf-8";
{ping_headers}
            return 200 "OK";
        }}
        location ~ ^(/v[0-9.]+)?/info$ {{ rewrite ^ /info.json break; }}
        location ~ ^(/v[0-9.]+)?/version$ {{ rewrite ^ /version.json break; }}
        location ~ ^(/v[0-9.]+)?/containers/json$ {{ rewrite ^ /containers.json break; }}
        # The same bytes on an inspect path: a request a target forwards (a list is
        # fanned out whatever its target, unless the target is the agent's own node).
        location ~ ^(/v[0-9.]+)?/containers/[^/]+/json$ {{ rewrite ^ /containers.json break; }}
        location / {{ return 404 '{{"message":"not in the fake engine"}}'; }}
    }}
"""

ENGINES_CONF = """\
daemon off;
master_process off;
user root;
worker_processes 1;
pid {tmp}/engines.pid;
error_log {tmp}/engines-error.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server_tokens off;
    keepalive_requests 1000000;
    keepalive_timeout 600s;
    client_body_temp_path {tmp}/body;
{servers}
}}
"""

#: nginx as a TLS reverse proxy to one engine socket, the reference; one
#: process (``master_process off``) so its PID is the one that serves.
PROXY_CONF = """\
daemon off;
master_process off;
user root;
worker_processes 1;
pid {tmp}/proxy.pid;
error_log {tmp}/proxy-error.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 600s;
    client_body_temp_path {tmp}/pbody;
    proxy_temp_path {tmp}/proxy;
    upstream engine {{
        server unix:{socket};
        keepalive 64;
    }}
    server {{
        listen {host}:{port} ssl;
        ssl_certificate {tls}/server-cert.pem;
        ssl_certificate_key {tls}/server-key.pem;
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


def container_id(node: str, i: int) -> str:
    return hashlib.sha256(f"{node}/{i}".encode()).hexdigest()


def containers(node: str, count: int) -> bytes:
    """``count`` synthetic containers of ``node`` in Docker's list shape (~840 B each)."""
    items: list[dict[str, Any]] = []
    for i in range(count):
        cid = container_id(node, i)
        running = i % 2 == 0
        items.append(
            {
                "Id": cid,
                "Names": [f"/bench-{node}-{i}"],
                "Image": "busybox:latest",
                "ImageID": "sha256:" + hashlib.sha256(b"busybox").hexdigest(),
                "Command": "sleep 3600",
                "Created": 1764400000 + i,
                "Ports": [],
                "Labels": {"bench": "fake", "com.example.index": str(i)},
                "State": "running" if running else "exited",
                "Status": "Up 2 hours" if running else "Exited (0) 2 hours ago",
                "HostConfig": {"NetworkMode": "bridge"},
                "NetworkSettings": {
                    "Networks": {
                        "bridge": {
                            "IPAMConfig": None,
                            "Links": None,
                            "Aliases": None,
                            "MacAddress": "02:42:ac:11:00:02",
                            "NetworkID": hashlib.sha256(b"bridge").hexdigest(),
                            "EndpointID": cid[::-1],
                            "Gateway": "172.17.0.1",
                            "IPAddress": "172.17.0.2",
                            "IPPrefixLen": 16,
                            "IPv6Gateway": "",
                            "GlobalIPv6Address": "",
                            "GlobalIPv6PrefixLen": 0,
                            "DriverOpts": None,
                            "DNSNames": None,
                        }
                    }
                },
                "Mounts": [],
            }
        )
    return json.dumps(items, separators=(",", ":")).encode()


def info(node: str, swarm: bool) -> bytes:
    doc: dict[str, Any] = {
        "ID": "FAKE:" + node,
        "Name": node,
        "ServerVersion": "27.5.1",
        "OperatingSystem": "fake engine (nginx)",
        "NCPU": 2,
        "Swarm": {"NodeID": "", "LocalNodeState": "inactive", "ControlAvailable": False},
    }
    if swarm:
        node_id = hashlib.sha256(node.encode()).hexdigest()[:25]
        doc["Swarm"] = {"NodeID": node_id, "LocalNodeState": "active", "ControlAvailable": False}
    return json.dumps(doc).encode()


@dataclass
class FakeNode:
    """One fake engine and, once started, its agent."""

    name: str
    ip: str
    dir: Path
    swarm: bool
    #: The agent's ``AGENT_RELAY``: ``web`` or ``bytes``.
    relay: str = "web"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def socket(self) -> str:
        return str(self.dir / "engine.sock")

    def set_containers(self, count: int) -> None:
        tmp = self.dir / "containers.json.new"
        tmp.write_bytes(containers(self.name, count))
        tmp.replace(self.dir / "containers.json")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def relays(nodes: int, given: Sequence[str], default: str) -> list[str]:
    """Each node's relay mode: ``given`` in node order, then ``default``."""
    modes = [*given, *[default] * (nodes - len(given))]
    if len(modes) != nodes or any(m not in ("web", "bytes") for m in modes):
        raise ValueError(f"{nodes} nodes need web or bytes each, not {modes}")
    return modes


class FakeCluster:
    """``nodes`` fake engines (the first ``standalone`` not in a swarm), certificates, agents."""

    def __init__(
        self,
        nodes: int,
        containers: int = 100,
        standalone: int = 0,
        refresh: int = 1,
        fanout_timeout: int = 10,
        relay: Sequence[str] = (),
    ) -> None:
        """``refresh``: the agents' discovery interval (s); each tick costs CPU in a window.
        ``relay``: the first nodes' ``AGENT_RELAY``, the others get ``RUN_RELAY``."""
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-fake{LAB_ID}-"))
        self.tls = self.tmp / "tls"
        self.hosts = self.tmp / "hosts"
        self.nodes = [
            FakeNode(
                f"node{i}",
                f"{NET}.{10 + i}",
                self.tmp / f"node{i}",
                swarm=i > standalone,
                relay=mode,
            )
            for i, mode in enumerate(relays(nodes, relay, RUN_RELAY), start=1)
        ]
        self.signer = Signer.generate(SECRET)
        self._containers = containers
        self._refresh = refresh
        self._fanout_timeout = fanout_timeout
        self.engines: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> FakeCluster:
        try:
            self._start_engines()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for n in self.nodes:
            _stop(n.proc)
        _stop(self.proxy)
        _stop(self.engines)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _start_engines(self) -> None:
        certs.init(
            self.tls,
            [n.name for n in self.nodes],
            [ipaddress.ip_address(n.ip) for n in self.nodes],
            force=True,
        )
        ping = "\n".join(f"            add_header {k} {json.dumps(v)};" for k, v in PING_HEADERS)
        servers = []
        for n in self.nodes:
            n.dir.mkdir(parents=True)
            (n.dir / "info.json").write_bytes(info(n.name, n.swarm))
            (n.dir / "version.json").write_bytes(b'{"Version":"27.5.1","ApiVersion":"1.47"}')
            n.set_containers(self._containers)
            servers.append(ENGINE_SERVER.format(sock=n.socket, root=n.dir, ping_headers=ping))
        conf = self.tmp / "engines.conf"
        conf.write_text(ENGINES_CONF.format(tmp=self.tmp, servers="".join(servers)))
        self.engines = _nginx(self.tmp, conf, "engines")
        for n in self.nodes:
            _wait_ok(Target("engine", unix=n.socket), self.engines, self.tmp / "engines.stderr")
        self.set_members(self.nodes)

    def set_containers(self, count: int) -> None:
        for n in self.nodes:
            n.set_containers(count)

    def set_members(self, members: list[FakeNode]) -> None:
        """The cluster's "DNS": who the agents find at the cluster address."""
        tmp = self.hosts.with_suffix(".new")
        tmp.write_text("".join(f"{m.ip} {CLUSTER_NAME}\n" for m in members if m.swarm))
        tmp.replace(self.hosts)

    def start_proxy(self, node: FakeNode, port: int) -> Target:
        """nginx as a TLS reverse proxy to ``node``'s engine on ``node.ip:port``."""
        conf = self.tmp / "proxy.conf"
        conf.write_text(
            PROXY_CONF.format(
                tmp=self.tmp, socket=node.socket, host=node.ip, port=port, tls=self.tls
            )
        )
        self.proxy = _nginx(self.tmp, conf, "proxy")
        target = Target("nginx_tls", host=node.ip, port=port, tls=str(self.tls))
        _wait_ok(target, self.proxy, self.tmp / "proxy.stderr")
        return target

    def agent_env(self, node: FakeNode) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(node.dir),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "AGENT_HOST": node.ip,
            "AGENT_PORT": str(PORT),
            "DOCKER_HOST": "unix://" + node.socket,
            "AGENT_REFRESH_INTERVAL": str(self._refresh),
            "AGENT_FANOUT_TIMEOUT": str(self._fanout_timeout),
            "AGENT_RELAY": node.relay,
            "DATA_PATH": str(node.dir / "agent-data"),
            "AGENT_SECRET": SECRET,
            "AGENT_TLS_CERT": str(self.tls / certs.SERVER_CERT),
            "AGENT_TLS_KEY": str(self.tls / certs.SERVER_KEY),
            "AGENT_TLS_CA": str(self.tls / certs.CA_CERT),
        }
        if node.swarm:
            env["AGENT_CLUSTER_ADDR"] = CLUSTER_NAME
        return env

    def start_agents(self, nodes: list[FakeNode]) -> None:
        """An agent per node (``makeService`` run as twistd runs it), all answering."""
        for n in nodes:
            with open(n.dir / "agent.log", "ab") as log:
                n.proc = subprocess.Popen(
                    [sys.executable, "-m", "bench.agentproc", str(self.hosts)],
                    env=self.agent_env(n),
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        # Many Pythons importing Twisted at once on two busy cores take a while.
        for n in nodes:
            _wait_ok(self.agent(n), n.proc, n.dir / "agent.log", "/ping", 120 + 10 * len(nodes))

    def agent(self, node: FakeNode, target: str = "") -> Target:
        """The agent of ``node`` over TLS, with Portainer's signature headers (and a target)."""
        headers = tuple(self.signer.headers().items())
        if target:
            headers += (("X-PortainerAgent-Target", target),)
        return Target("agent", host=node.ip, port=PORT, tls=str(self.tls), headers=headers)

    def members_of(self, node: FakeNode) -> set[str]:
        status, body = fetch(self.agent(node), "/agents", 5)
        if status != 200:
            raise RuntimeError(f"/agents answered {status}")
        return {a["NodeName"] for a in json.loads(body)}

    def wait_members(self, node: FakeNode, names: set[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        have: set[str] = set()
        while True:
            # A busy agent may not answer within 5 s: ask again.
            with contextlib.suppress(OSError):
                have = self.members_of(node)
            if have == names:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.name} knows {sorted(have)}, not {sorted(names)}")
            time.sleep(0.1)


def _nginx(tmp: Path, conf: Path, label: str) -> subprocess.Popen[bytes]:
    with open(tmp / f"{label}.stderr", "wb") as err:
        return subprocess.Popen(
            ["nginx", "-p", str(tmp), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=err
        )


def _wait_ok(
    target: Target,
    proc: subprocess.Popen[bytes] | None,
    log: Path,
    path: str = "/_ping",
    timeout: float = 30,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if fetch(target, path, 2)[0] < 300:
                return
        except OSError:
            pass
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"{target.name} did not answer {path}: {log.read_text()[-2000:]}")
        time.sleep(0.05)
