"""End to end: the agent deployed as users deploy it, driven by real clients.

The lab builds the image from the ``Dockerfile``, loads it on every node and
runs ``docker stack deploy`` of ``compose/agent-stack.yml`` (with the TLS
overlay, for the lab's certificates); Docker's own embedded DNS does the
discovery. Then the docker CLI, the docker SDK and a client that signs as
Portainer does talk to the agents on each node's published port. Run as root:
``python -m twisted.trial tests.test_stack``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, ClassVar

import docker
import pexpect

from swarmagent.signature import Signer
from tests.lab import (
    DOCKER_CLI,
    IMAGE,
    Lab,
    Response,
    multipart,
    run_in_volume,
    sdk_client,
    wait_until,
)
from tests.labcase import TARGET, LabTestCase, engine_containers, explain, missing_nodes
from tests.stack_lab import AGENT_IMAGE, SERVICE, StackAgent, StackLab
from tests.test_security_cluster import unverified


class StackTestCase(LabTestCase):
    """A lab whose agents are the tasks of the ``swarmagent`` stack."""

    LAB = StackLab
    #: One long-running container per node, by node name.
    workloads: ClassVar[dict[str, str]] = {}

    @classmethod
    def fixture(cls) -> object:
        # Every stack test class uses the same deployment.
        return StackTestCase

    @classmethod
    def setUpLab(cls, lab: Lab) -> None:
        # Deploy the agents, and give every node a workload.
        assert isinstance(lab, StackLab)
        lab.deploy_stack()
        StackTestCase.workloads = {}
        for node in lab.nodes:
            StackTestCase.workloads[node.name] = run_workload(node.docker(), f"work-{node.name}")

    def baseline(self, lab: Lab) -> None:
        assert isinstance(lab, StackLab)
        for name in list(lab.cut):
            lab.restore_link(lab.node(name))
        lab.wait_whole(timeout=60)

    @property
    def stack(self) -> StackLab:
        assert isinstance(self.lab, StackLab)
        return self.lab

    def agent_on(self, name: str) -> StackAgent:
        return StackAgent(self.stack, self.node(name))

    # -- clients -----------------------------------------------------------

    def cli_env(self, via: str, target: str = "") -> dict[str, str]:
        """The docker CLI's environment: ``via``'s agent, the lab's client certificate."""
        config = tempfile.mkdtemp(prefix="dockercfg-")
        self.addCleanup(shutil.rmtree, config, True)
        headers = {TARGET: target} if target else {}
        with open(os.path.join(config, "config.json"), "w") as f:
            json.dump({"HttpHeaders": headers}, f)
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DOCKER_CONFIG": config,
            "DOCKER_HOST": f"tcp://{self.node(via).ip}:9001",
            "DOCKER_TLS_VERIFY": "1",
            "DOCKER_CERT_PATH": str(self.stack.tls),
        }

    def cli(self, *args: str, via: str = "node1", target: str = "", timeout: float = 60) -> str:
        """Run the docker CLI through ``via``'s agent; its stdout."""
        p = subprocess.run(
            [DOCKER_CLI, *args],
            env=self.cli_env(via, target),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if p.returncode != 0:
            self.fail(f"docker {' '.join(args)} via {via}: {p.returncode} {p.stderr}")
        return p.stdout

    def tty(self, *args: str, via: str = "node1", target: str = "") -> pexpect.spawn:
        """The docker CLI in a pseudo-terminal, through ``via``'s agent."""
        child = pexpect.spawn(
            DOCKER_CLI,
            list(args),
            env=self.cli_env(via, target),
            encoding="utf-8",
            timeout=20,
            dimensions=(24, 80),
        )
        self.addCleanup(child.close, True)
        return child

    def sdk(self, via: str = "node2", target: str = "") -> docker.DockerClient:
        """The docker SDK for Python through ``via``'s agent, with the client certificate."""
        client = sdk_client(
            StackAgent(self.stack, self.node(via)).url, self.stack.tls, target=target
        )
        self.addCleanup(client.close)
        return client

    def engines(self, kind: str) -> dict[str, set[str]]:
        """Each engine's own IDs of ``kind`` (containers, images, volumes, networks)."""
        out: dict[str, set[str]] = {}
        for node in self.stack.nodes:
            client = node.docker()
            try:
                if kind == "containers":
                    out[node.name] = {c.id for c in client.containers.list(all=True)}
                elif kind == "images":
                    out[node.name] = {i.id for i in client.images.list()}
                elif kind == "volumes":
                    out[node.name] = {v.name for v in client.volumes.list()}
                else:
                    out[node.name] = {n.id for n in client.networks.list()}
            finally:
                client.close()
        return out


def run_workload(client: docker.DockerClient, name: str) -> str:
    """Start a container that prints a line a second; its ID."""
    try:
        c = client.containers.run(
            IMAGE,
            ["sh", "-c", "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 1; done"],
            name=name,
            detach=True,
        )
        return str(c.id)
    finally:
        client.close()


# Check groups are mixins of a StackTestCase, for the type checker; trial
# runs them once, in ClientTests.
if TYPE_CHECKING:
    _Checks = StackTestCase
else:
    _Checks = object


# The client checks only read the cluster (or clean up what they add), so one
# lab serves them all: each group is a mixin of ClientTests below.


class CLIChecks(_Checks):
    """The docker CLI, pointed at an agent as at a TLS-protected engine."""

    @explain
    def test_ps_through_every_agent_lists_every_node(self) -> None:
        expected = set().union(*self.engines("containers").values())
        for via in ("node1", "node2", "node3"):
            with self.subTest(via=via):
                out = self.cli("ps", "-a", "--no-trunc", "--format", "{{.ID}}", via=via)
                self.assertEqual(set(out.split()), expected)

    @explain
    def test_cluster_wide_lists(self) -> None:
        """volume, image and network ls: every node's items, each node's copy once;
        a swarm network (the stack's overlay, ingress) once, as a manager lists it."""
        engines = {kind: self.engines(kind) for kind in ("volumes", "images", "networks")}
        commands = {
            "volumes": ("volume", "ls", "-q"),
            "images": ("image", "ls", "-q", "--no-trunc"),
            "networks": ("network", "ls", "-q", "--no-trunc"),
        }
        manager = self.stack.manager.docker()
        self.addCleanup(manager.close)
        swarm = {n.id for n in manager.networks.list(filters={"scope": "swarm"})}
        self.assertTrue(swarm)
        for kind, cmd in commands.items():
            with self.subTest(kind=kind):
                listed = self.cli(*cmd, via="node3").split()
                per_node = engines[kind]
                self.assertEqual(set(listed), set().union(*per_node.values()))
                # One row per node's copy: three nodes, three agent volumes.
                copies = sum(len(ids - swarm) for ids in per_node.values())
                expected = copies + len(swarm) if kind == "networks" else copies
                self.assertEqual(len(listed), expected)

    @explain
    def test_services_through_a_worker(self) -> None:
        """`docker service ls` and `service create` sent to a worker's agent reach the manager."""
        self.assertIn(SERVICE, self.cli("service", "ls", "--format", "{{.Name}}", via="node3"))
        name = f"e2e-{time.monotonic_ns()}"
        self.addCleanup(self.stack.manager_cli, "service", "rm", name)
        self.cli(
            "service",
            "create",
            "--detach",
            "--name",
            name,
            "--no-resolve-image",
            IMAGE,
            "sleep",
            "3600",
            via="node3",
        )
        manager = self.stack.manager.docker()
        self.addCleanup(manager.close)
        self.assertEqual(manager.services.get(name).name, name)

    @explain
    def test_exec_it_on_another_node(self) -> None:
        child = self.tty("exec", "-it", self.workloads["node3"], "sh", target="node3")
        child.expect_exact("#")
        child.sendline("echo $((6*7)) on $(hostname)")
        child.expect(r"42 on \w+")
        child.sendline("exit 5")
        child.expect(pexpect.EOF)
        child.close()
        self.assertEqual(child.exitstatus, 5)

    @explain
    def test_logs_follow_on_another_node(self) -> None:
        child = self.tty("logs", "-f", "--tail", "0", self.workloads["node2"], target="node2")
        # The workload prints a new line every second: one seen means live.
        child.expect(r"tick-\d+")


class SDKChecks(_Checks):
    """The docker SDK for Python with client certificates."""

    @explain
    def test_lists(self) -> None:
        client = self.sdk()
        engines = self.engines("containers")
        listed = {c.id for c in client.containers.list(all=True)}
        self.assertEqual(listed, set().union(*engines.values()))
        self.assertEqual(
            {v.name for v in client.volumes.list()}, set().union(*self.engines("volumes").values())
        )
        self.assertEqual(
            {i.id for i in client.images.list()}, set().union(*self.engines("images").values())
        )
        self.assertEqual(
            {n.id for n in client.networks.list()},
            set().union(*self.engines("networks").values()),
        )

    @explain
    def test_get_on_another_node_by_target(self) -> None:
        container = self.sdk(via="node2", target="node3").containers.get(self.workloads["node3"])
        self.assertEqual(container.name, "work-node3")
        self.assertEqual(container.status, "running")
        self.assertIn(b"tick-", container.logs(tail=2))

    @explain
    def test_events_tagged_by_node(self) -> None:
        client = self.sdk(via="node1")
        since = int(time.time()) - 1
        label = f"e2e-events-{time.monotonic_ns()}"
        started: dict[str, str] = {}
        for node in self.stack.nodes:
            engine = node.docker()
            try:
                c = engine.containers.run(IMAGE, ["true"], labels={label: "1"}, detach=True)
                started[str(c.id)] = node.name
            finally:
                engine.close()
        # The SDK reads events with no timeout: `until` bounds the stream.
        events = client.events(
            since=since,
            until=int(time.time()) + 20,
            decode=True,
            filters={"type": "container", "event": "start", "label": label},
        )
        seen: dict[str, str] = {}
        try:
            for event in events:
                seen[event["id"]] = event["Portainer"]["Agent"]["NodeName"]
                if len(seen) == len(started):
                    break
        finally:
            events.close()
        self.assertEqual(seen, started)


class PortainerChecks(_Checks):
    """A client that speaks to the agent as Portainer does (signature, no certificate)."""

    portainer = Signer.generate()

    def call(self, path: str, signed: bool = True, **headers: str) -> Response:
        all_headers = {**(self.portainer.headers() if signed else {}), **headers}
        return self.agent_on("node2").request(
            "GET", path, headers=all_headers, context=unverified()
        )

    @explain
    def test_portainer_flow(self) -> None:
        r = self.call("/ping", signed=False)
        self.assertEqual(r.status, 204)
        self.assertEqual(r.headers.get("Portainer-Agent-API-Version"), "2")
        self.assertIsNotNone(r.headers.get("Portainer-Agent"))
        self.assertEqual(self.call("/containers/json", signed=False).status, 403)
        # The first signed call pairs this key.
        r = self.call("/containers/json?all=1")
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(missing_nodes(r), set())
        items = r.json()
        by_node = {c["Id"]: c["Portainer"]["Agent"]["NodeName"] for c in items}
        self.assertEqual(by_node, engine_containers(self.stack.nodes))
        for cid, name in by_node.items():
            r = self.call(f"/containers/{cid}/json", **{TARGET: name})
            self.assertEqual(r.status, 200, r.body)
            self.assertEqual(r.json()["Id"], cid)
        # Paired: another key is refused.
        intruder = Signer.generate()
        r = self.agent_on("node2").request(
            "GET", "/containers/json", headers=intruder.headers(), context=unverified()
        )
        self.assertEqual(r.status, 403)


class LifeTests(StackTestCase):
    """The cluster changes under the agents: restarts, new nodes, drains."""

    def force_update(self) -> None:
        self.stack.manager_cli(
            "service", "update", "--force", "--detach=false", SERVICE, timeout=240
        )

    def agent_tasks(self) -> set[str]:
        manager = self.stack.manager.docker()
        try:
            tasks = manager.services.get(SERVICE).tasks(filters={"desired-state": "running"})
            return {t["ID"] for t in tasks}
        finally:
            manager.close()

    @explain
    def test_rolling_restart(self) -> None:
        """After `service update --force`, every agent knows every node within 30 s."""
        before = self.agent_tasks()
        began = time.monotonic()
        self.force_update()
        updated = time.monotonic()
        self.assertTrue(before.isdisjoint(self.agent_tasks()), "every task was replaced")
        self.stack.wait_whole(timeout=30)
        sys.stderr.write(
            f"\nrolling restart: update {updated - began:.1f} s, "
            f"whole again {time.monotonic() - updated:.1f} s later\n"
        )

    @explain
    def test_added_node(self) -> None:
        began = time.monotonic()
        node = self.stack.add_node()
        joined = time.monotonic()
        run_workload(node.docker(), f"work-{node.name}")
        self.stack.wait_whole(timeout=60)
        sys.stderr.write(
            f"\nadded node: engine joined in {joined - began:.1f} s, its agent known to all "
            f"{time.monotonic() - joined:.1f} s later\n"
        )
        r = self.agent_on("node1").request("GET", "/containers/json")
        names = {c["Names"][0]: c["Portainer"]["Agent"]["NodeName"] for c in r.json()}
        self.assertEqual(names.get(f"/work-{node.name}"), node.name)

    @explain
    def test_drained_node_leaves(self) -> None:
        self.set_availability("node3", "drain")
        self.addCleanup(self.set_availability, "node3", "active")
        others = {n.name for n in self.stack.nodes} - {"node3"}
        agent = self.agent_on("node1")
        wait_until(lambda: agent.names() == others, 60, 0.5, "node3's agent to leave")
        r = agent.request("GET", "/containers/json")
        self.assertEqual(r.status, 200)
        # A drained node has no agent on purpose: it is not reported missing.
        self.assertEqual(missing_nodes(r), set())

    @explain
    def test_node_without_agent_is_missing(self) -> None:
        """A swarm node whose agent is gone is named missing, from the swarm's node list."""
        self.stack.manager_cli(
            "service", "update", "--detach=false", "--constraint-add", "node.hostname!=node2",
            SERVICE, timeout=240,
        )  # fmt: skip
        self.addCleanup(self.restore_everywhere)
        agent = self.agent_on("node1")
        others = {n.name for n in self.stack.nodes} - {"node2"}
        wait_until(lambda: agent.names() == others, 60, 0.5, "node2's agent to leave")
        r = agent.request("GET", "/containers/json")
        self.assertEqual(r.status, 200)
        self.assertEqual(missing_nodes(r), {"node2"})
        listed = {c["Portainer"]["Agent"]["NodeName"] for c in r.json()}
        self.assertNotIn("node2", listed)

    @explain
    def test_shared_secret_from_a_docker_secret(self) -> None:
        """agent-stack.secret.yml: Portainer's AGENT_SECRET, handed over as a Docker secret."""
        secret = f"e2e-{time.monotonic_ns()}"
        manager = self.stack.manager.docker()
        self.addCleanup(manager.close)
        created = manager.secrets.create(name="swarmagent_secret", data=secret.encode())
        self.addCleanup(self.without_secret, created)
        self.stack.deploy("compose/agent-stack.secret.yml")
        portainer = Signer.generate(secret)
        everyone = {n.name for n in self.stack.nodes}

        def signed(signer: Signer) -> Response:
            return self.agent_on("node2").request(
                "GET", "/agents", headers=signer.headers(), context=unverified()
            )

        # Until the updated task runs, node2's agent refuses this signature.
        wait_until(
            lambda: (
                signed(portainer).status == 200
                and {a["NodeName"] for a in signed(portainer).json()} == everyone
            ),
            120,
            0.5,
            "node2's agent to take the secret",
        )
        self.assertEqual(signed(Signer.generate()).status, 403)
        self.assertEqual(signed(Signer.generate(secret + "x")).status, 403)
        # Any key that signs the secret is accepted: there is no pairing.
        self.assertEqual(signed(Signer.generate(secret)).status, 200)

    def without_secret(self, secret: Any) -> None:
        self.stack.deploy()
        wait_until(lambda: not self.secret_in_use(), 120, 0.5, "the agents to drop the secret")
        secret.remove()

    def secret_in_use(self) -> bool:
        manager = self.stack.manager.docker()
        try:
            spec = manager.services.get(SERVICE).attrs["Spec"]
            tasks = manager.services.get(SERVICE).tasks(filters={"desired-state": "running"})
        finally:
            manager.close()
        in_spec = spec["TaskTemplate"]["ContainerSpec"].get("Secrets") or []
        return any(s["SecretName"] == "swarmagent_secret" for s in in_spec) or any(
            any(
                x["SecretName"] == "swarmagent_secret"
                for x in t["Spec"]["ContainerSpec"].get("Secrets") or []
            )
            for t in tasks
        )

    def restore_everywhere(self) -> None:
        self.stack.manager_cli(
            "service", "update", "--detach=false", "--constraint-rm", "node.hostname!=node2",
            SERVICE, timeout=240,
        )  # fmt: skip

    def set_availability(self, name: str, availability: str) -> None:
        manager = self.stack.manager.docker()
        try:
            node = next(
                n for n in manager.nodes.list() if n.attrs["Description"]["Hostname"] == name
            )
            spec: dict[str, Any] = dict(node.attrs["Spec"])
            spec["Availability"] = availability
            node.update(spec)
        finally:
            manager.close()


class BrowseChecks(_Checks):
    """Portainer's volume browser and host info on the deployed agents, through
    the published port: the stack mounts /var/lib/docker/volumes where the
    engine says its volumes are."""

    @explain
    def test_volume_browser_round_trip(self) -> None:
        volume = f"e2e-browse-{time.monotonic_ns()}"
        node3 = self.node("node3")
        engine = node3.docker()
        self.addCleanup(engine.close)
        engine.volumes.create(volume)
        self.addCleanup(lambda: engine.volumes.get(volume).remove(force=True))
        run_in_volume(node3, volume, "mkdir /data/sub && printf hello > /data/a.txt")
        agent = self.agent_on("node1")
        to_node3 = {TARGET: "node3"}

        r = agent.request("GET", f"/v2/browse/ls?volumeID={volume}&path=/", headers=to_node3)
        self.assertEqual(r.status, 200, r.body[:300])
        self.assertEqual(
            {(e["Name"], e["Dir"]) for e in r.json()}, {("a.txt", False), ("sub", True)}
        )
        r = agent.request(
            "GET", f"/v2/browse/get?volumeID={volume}&path=a.txt",
            headers={**to_node3, "Range": "bytes=1-3"},
        )  # fmt: skip
        self.assertEqual((r.status, r.body), (206, b"ell"))

        body, ctype = multipart({"Path": "/sub"}, "up.txt", b"uploaded\n")
        r = agent.request(
            "POST", f"/v2/browse/put?volumeID={volume}", body=body,
            headers={**to_node3, "Content-Type": ctype},
        )  # fmt: skip
        self.assertEqual(r.status, 204, r.body[:300])
        r = agent.request(
            "PUT", f"/v2/browse/rename?volumeID={volume}", headers=to_node3,
            body={"CurrentFilePath": "/sub/up.txt", "NewFilePath": "/moved.txt"},
        )  # fmt: skip
        self.assertEqual(r.status, 204, r.body[:300])
        r = agent.request("DELETE", f"/v2/browse/delete?volumeID={volume}&path=a.txt",
                          headers=to_node3)  # fmt: skip
        self.assertEqual(r.status, 204, r.body[:300])
        self.assertEqual(run_in_volume(node3, volume, "cat /data/moved.txt; ls /data"),
                         "uploaded\nmoved.txt\nsub\n")  # fmt: skip

    @explain
    def test_host_info_from_each_node(self) -> None:
        for node in self.stack.nodes:
            with self.subTest(node=node.name):
                for r in (
                    self.agent_on(node.name).request("GET", "/v2/host/info"),
                    self.agent_on("node1").request(
                        "GET", "/v2/host/info", headers={TARGET: node.name}
                    ),
                ):
                    self.assertEqual(r.status, 200, r.body[:300])
                    doc = r.json()
                    self.assertEqual(set(doc), {"PCIDevices", "PhysicalDisks"})
                    # The container sees the host's /sys: the same devices as the host.
                    if doc["PCIDevices"] is not None:
                        self.assertEqual(
                            len(doc["PCIDevices"]), len(os.listdir("/sys/bus/pci/devices"))
                        )


class StackFileChecks(_Checks):
    """The stack files themselves."""

    @explain
    def test_deployed_as_written(self) -> None:
        """One task per node, from the lab's image, global, with the health check passing."""
        manager = self.stack.manager.docker()
        self.addCleanup(manager.close)
        service = manager.services.get(SERVICE)
        self.assertIn("Global", service.attrs["Spec"]["Mode"])
        image = service.attrs["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
        self.assertEqual(image, AGENT_IMAGE)
        for node in self.stack.nodes:
            engine = node.docker()
            self.addCleanup(engine.close)
            agents = engine.containers.list(
                filters={"label": f"com.docker.swarm.service.name={SERVICE}"}
            )
            self.assertEqual(len(agents), 1, node.name)
            wait_until(
                functools.partial(healthy, engine, agents[0].id),
                60,
                0.5,
                f"the agent on {node.name} to be healthy",
            )


def healthy(engine: docker.DockerClient, container: str) -> bool:
    """Whether the engine's health check of ``container`` passes."""
    status: str = engine.api.inspect_container(container)["State"]["Health"]["Status"]
    return status == "healthy"


class ClientTests(
    CLIChecks, SDKChecks, PortainerChecks, BrowseChecks, StackFileChecks, StackTestCase
):
    """Every client check, against one deployed stack."""
