"""Integration tests: real agents in a real multi-node swarm (see :mod:`tests.lab`).

Run as root: ``python -m twisted.trial tests.test_cluster``.
"""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import docker.errors

from tests.lab import AGENT_SRV_NAME, IMAGE, Agent, Lab, Response, wait_until
from tests.labcase import (
    FANOUT_TIMEOUT,
    PROBE_FAILURES,
    REFRESH,
    SLACK,
    TARGET,
    LabTestCase,
    agent_names,
    engine_containers,
    explain,
    knows_exactly,
    listed_containers,
    missing_nodes,
)


class ClusterTests(LabTestCase):
    """A 3-node swarm (node1 manager; node2, node3 workers), an agent on each."""

    #: Per node: a running container (whose output names its node) and one
    #: never started, so that "all" lists differ from running-only ones.
    containers: ClassVar[dict[str, dict[str, str]]] = {}

    @classmethod
    def setUpLab(cls, lab: Lab) -> None:
        super().setUpLab(lab)
        cls.containers = {}
        for node in lab.nodes:
            client = node.docker()
            try:
                running = client.containers.run(
                    IMAGE,
                    ["sh", "-c", f"echo hello-from-{node.name}; exec sleep 3600"],
                    name=f"lab-{node.name}-run",
                    detach=True,
                )
                idle = client.containers.create(
                    IMAGE, ["sleep", "3600"], name=f"lab-{node.name}-idle"
                )
                client.volumes.create(f"lab-vol-{node.name}")
            finally:
                client.close()
            cls.containers[node.name] = {"run": running.id, "idle": idle.id}

    @explain
    def test_ping(self) -> None:
        """/ping answers 204 without auth, with the Portainer agent headers."""
        for agent in self.agents.values():
            r = agent.request("GET", "/ping")
            self.assertEqual(r.status, 204, r.body)
            self.assertIsNotNone(r.headers.get("Portainer-Agent"))
            self.assertEqual(r.headers.get("Portainer-Agent-API-Version"), "2")
            self.assertEqual(r.headers.get("Portainer-Agent-Platform"), "1")

    def settled_list(self, agent: Agent, path: str, everything: bool) -> tuple[Response, dict]:
        """The agent's container list and the engines' own, once they agree.

        Engines can change between the two looks (service tasks of another
        test going away), hence a bounded retry; on timeout the last pair is
        returned for the caller's assertions to report.
        """
        nodes = self.the_lab.nodes
        last: list[tuple[Response, dict[str, str]]] = []

        def same() -> bool:
            r = agent.request("GET", path)
            last[:] = [(r, engine_containers(nodes, everything))]
            return r.status == 200 and listed_containers(r) == last[0][1]

        with contextlib.suppress(TimeoutError):
            wait_until(same, 10, 0.2)
        return last[0]

    @explain
    def test_container_list_is_union_of_engines(self) -> None:
        """Through any agent, the container list is every engine's, each tagged."""
        lab = self.the_lab
        for query, everything in (("?all=1", True), ("", False)):
            for agent in self.agents.values():
                for prefix in ("", "/v1.41"):
                    path = f"{prefix}/containers/json{query}"
                    r, want = self.settled_list(agent, path, everything)
                    where = f"{path} via {agent.node.name}"
                    self.assertEqual(r.status, 200, f"{where}: {r.body[:300]!r}")
                    self.assertEqual(listed_containers(r), want, where)
                    self.assertEqual(missing_nodes(r), set(), where)
        # The fixture really is spread over all the nodes.
        self.assertEqual(set(engine_containers(lab.nodes).values()), {n.name for n in lab.nodes})

    @explain
    def test_other_lists_are_cluster_wide(self) -> None:
        """Images, volumes and networks fan out too; volumes keep their envelope."""
        names = {n.name for n in self.the_lab.nodes}
        agent = self.agent("node2")
        r = agent.request("GET", "/volumes")
        self.assertEqual(r.status, 200, r.body[:300])
        doc = r.json()
        self.assertIn("Warnings", doc)
        self.assertEqual(
            {(v["Name"], v["Portainer"]["Agent"]["NodeName"]) for v in doc["Volumes"]},
            {(f"lab-vol-{n}", n) for n in names},
        )
        for path in ("/images/json", "/networks"):
            r = agent.request("GET", path)
            self.assertEqual(r.status, 200, f"{path}: {r.body[:300]!r}")
            by_node: dict[str, int] = {}
            for item in r.json():
                node = item["Portainer"]["Agent"]["NodeName"]
                by_node[node] = by_node.get(node, 0) + 1
            self.assertEqual(set(by_node), names, path)

    @explain
    def test_target_header_reaches_other_node(self) -> None:
        """node3's container is driven through node1's agent with the target header."""
        cid = self.containers["node3"]["run"]
        node3 = self.node("node3")
        agent = self.agent("node1")
        to_node3 = {TARGET: "node3"}

        def state() -> str:
            client = node3.docker()
            try:
                return str(client.containers.get(cid).status)
            finally:
                client.close()

        def ensure_running() -> None:
            client = node3.docker()
            try:
                if client.containers.get(cid).status != "running":
                    client.containers.get(cid).start()
            finally:
                client.close()

        self.addCleanup(ensure_running)

        r = agent.request("GET", f"/containers/{cid}/json", headers=to_node3)
        self.assertEqual(r.status, 200, r.body[:300])
        self.assertEqual(r.json()["Id"], cid)
        self.assertEqual(r.json()["Name"], "/lab-node3-run")

        # Targeted at node1, the request stays there, whose engine has no
        # such container: proof that the header did the routing.
        r = agent.request("GET", f"/containers/{cid}/json", headers={TARGET: "node1"})
        self.assertEqual(r.status, 404, r.body[:300])

        # The swarm node ID works as a target too.
        node_id = self.the_lab.node_ids()["node3"]
        r = agent.request("GET", f"/v1.41/containers/{cid}/json", headers={TARGET: node_id})
        self.assertEqual(r.status, 200, r.body[:300])

        r = agent.request("POST", f"/containers/{cid}/stop?t=0", headers=to_node3)
        self.assertEqual(r.status, 204, r.body[:300])
        self.assertEqual(state(), "exited")

        r = agent.request("POST", f"/containers/{cid}/start", headers=to_node3)
        self.assertEqual(r.status, 204, r.body[:300])
        self.assertEqual(state(), "running")

        r = agent.request("GET", f"/containers/{cid}/logs?stdout=1", headers=to_node3)
        self.assertEqual(r.status, 200, r.body[:300])
        # Non-TTY logs are multiplexed frames; the text is in there verbatim,
        # once per start.
        self.assertGreaterEqual(r.body.count(b"hello-from-node3"), 2, r.body[:300])

    @explain
    def test_service_create_via_worker_lands_on_manager(self) -> None:
        """POST /services/create to a worker's agent creates it on the manager."""
        name = f"lab-sleep-{uuid.uuid4().hex[:8]}"
        spec = {
            "Name": name,
            "TaskTemplate": {
                "ContainerSpec": {"Image": IMAGE, "Command": ["sleep", "3600"]},
            },
            "Mode": {"Replicated": {"Replicas": 1}},
        }
        manager = self.the_lab.manager

        def remove() -> None:
            client = manager.docker()
            try:
                client.services.get(name).remove()
            except docker.errors.NotFound:
                pass
            finally:
                client.close()

        self.addCleanup(remove)
        r = self.agent("node2").request("POST", "/services/create", body=spec)
        self.assertEqual(r.status, 201, r.body[:300])
        service_id = r.json()["ID"]

        client = manager.docker()
        try:
            service = client.services.get(service_id)
            self.assertEqual(service.name, name)
            self.assertEqual(service.attrs["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"], IMAGE)
        finally:
            client.close()

        # Reading it back through the other worker goes to the manager too.
        r = self.agent("node3").request("GET", f"/services/{service_id}")
        self.assertEqual(r.status, 200, r.body[:300])
        self.assertEqual(r.json()["Spec"]["Name"], name)

    @explain
    def test_discovery_follows_dns(self) -> None:
        """Nodes come with DNS within an interval, leave after failed probes."""
        lab = self.the_lab
        watcher = self.agent("node1")

        lab.set_dns([self.node("node1"), self.node("node2")])
        wait_until(
            lambda: agent_names(watcher) == {"node1", "node2"},
            PROBE_FAILURES * REFRESH + 5,
            0.1,
            "node3 to leave node1's /agents after leaving DNS",
        )

        lab.set_dns(lab.nodes)
        start = time.monotonic()
        wait_until(lambda: "node3" in agent_names(watcher), 10, 0.05, "node3 to come back")
        self.assertLess(time.monotonic() - start, REFRESH + SLACK, "node3 joined too late")

        self.agent("node3").kill()
        start = time.monotonic()
        wait_until(
            lambda: "node3" not in agent_names(watcher), 15, 0.05, "dead node3 to be dropped"
        )
        self.assertLess(
            time.monotonic() - start,
            PROBE_FAILURES * REFRESH + SLACK + 1,
            "dead node3 dropped too late",
        )
        # Still in DNS, just dead: the others stay.
        self.assertEqual(agent_names(watcher), {"node1", "node2"})

    @explain
    def test_srv_discovery(self) -> None:
        """A cluster address starting with '_' is looked up as SRV."""
        lab = self.the_lab
        node2 = self.node("node2")
        self.agent("node2").stop()
        agent = lab.start_agent(node2, AGENT_CLUSTER_ADDR=AGENT_SRV_NAME)
        self.agents["node2"] = agent  # baseline() replaces it for later tests
        agent.wait_ready(20)
        everyone = {n.name for n in lab.nodes}
        wait_until(lambda: agent_names(agent) == everyone, REFRESH + 5, 0.1, "SRV peers")

    @explain
    def test_cut_link_fanout_reports_missing_node(self) -> None:
        """An unreachable node is left out within the deadline and named."""
        lab = self.the_lab
        node3 = self.node("node3")
        reachable = [n for n in lab.nodes if n.name != "node3"]
        agent = self.agent("node1")
        want = engine_containers(reachable)

        lab.cut_link(node3)
        self.addCleanup(lab.restore_link, node3)

        def timed(path: str) -> tuple[Response, float]:
            start = time.monotonic()
            r = agent.request("GET", path, timeout=30)
            return r, time.monotonic() - start

        # Both at once, right after the cut: node1 drops node3 from its peer
        # table after a few failed probes, and from then on it would no
        # longer name it as missing (it would not know of it at all).
        with ThreadPoolExecutor(2) as pool:
            (r, elapsed), (rv, elapsed_v) = pool.map(timed, ["/containers/json?all=1", "/volumes"])

        self.assertLess(elapsed, FANOUT_TIMEOUT + SLACK, "the list waited too long")
        self.assertEqual(r.status, 200, r.body[:300])
        self.assertEqual(listed_containers(r), want)
        self.assertEqual(missing_nodes(r), {"node3"})

        self.assertLess(elapsed_v, FANOUT_TIMEOUT + SLACK, "the volume list waited too long")
        self.assertEqual(rv.status, 200, rv.body[:300])
        doc = rv.json()
        self.assertEqual(
            {v["Portainer"]["Agent"]["NodeName"] for v in doc["Volumes"]},
            {n.name for n in reachable},
        )
        self.assertEqual(missing_nodes(rv), {"node3"})
        self.assertTrue(any("node3" in w for w in doc["Warnings"]), doc["Warnings"])


class GrowingClusterTests(LabTestCase):
    """A lab that gains a node while running."""

    NODES = 2

    @explain
    def test_add_node(self) -> None:
        """A node added to the swarm and to DNS shows up in the agents' views."""
        lab = self.the_lab
        node = lab.add_node()
        self.assertEqual(node.name, "node3")
        client = lab.manager.docker()
        try:
            roles = {
                n.attrs["Description"]["Hostname"]: n.attrs["Spec"]["Role"]
                for n in client.nodes.list()
            }
        finally:
            client.close()
        self.assertEqual(roles, {"node1": "manager", "node2": "worker", "node3": "worker"})
        self.agents["node3"] = agent = lab.start_agent(node)
        agent.wait_ready(20)
        lab.set_dns(lab.nodes)
        everyone = {"node1", "node2", "node3"}
        for a in self.agents.values():
            wait_until(functools.partial(knows_exactly, a, everyone), REFRESH + 5, 0.1, "node3")
