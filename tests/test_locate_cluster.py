"""Integration: container and exec requests without a target header, in a real swarm.

Through node1's agent, a container on node3 is inspected, stopped, started,
logged and exec'd into with no ``X-PortainerAgent-Target``: the agent finds
its node. Run as root: ``python -m twisted.trial tests.test_locate_cluster``.
"""

from __future__ import annotations

import contextlib
import subprocess
from typing import ClassVar

import docker
from prometheus_client.parser import text_string_to_metric_families

from tests.lab import IMAGE, Lab, sdk_client
from tests.labcase import LabTestCase, engine_containers, explain


class LocateTests(LabTestCase):
    """node1 (manager), node2 and node3 (workers); a container on each, and
    one name ("twin") used on both node2 and node3."""

    containers: ClassVar[dict[str, str]] = {}

    @classmethod
    def setUpLab(cls, lab: Lab) -> None:
        super().setUpLab(lab)
        cls.containers = {}
        for node in lab.nodes:
            client = node.docker()
            try:
                c = client.containers.run(
                    IMAGE,
                    ["sh", "-c", f"echo hello-from-{node.name}; exec sleep 3600"],
                    name=f"loc-{node.name}",
                    detach=True,
                )
                cls.containers[node.name] = c.id
                client.containers.create(IMAGE, ["sleep", "3600"], name=f"loc-{node.name}-idle")
                if node.name in ("node2", "node3"):
                    client.containers.create(IMAGE, ["true"], name="twin")
            finally:
                client.close()

    def state(self, node: str, cid: str) -> str:
        client = self.node(node).docker()
        try:
            return str(client.containers.get(cid).status)
        finally:
            client.close()

    def sdk(self, via: str = "node1") -> docker.DockerClient:
        """The docker SDK through ``via``'s agent, with no target header."""
        client = sdk_client(self.agent(via).url, self.the_lab.tls)
        self.addCleanup(client.close)
        return client

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The docker CLI against node1's agent, with an empty config (no HttpHeaders)."""
        return self.docker_cli(*args, timeout=30)

    @explain
    def test_raw_requests_reach_the_node_holding_the_container(self) -> None:
        """Inspect, stop, start and logs of a node3 container, through node1, untargeted."""
        cid = self.containers["node3"]
        agent = self.agent("node1")
        self.addCleanup(self.ensure_running, cid)

        for ref in (cid, cid[:12], "loc-node3"):
            r = agent.request("GET", f"/v1.41/containers/{ref}/json")
            self.assertEqual(r.status, 200, f"{ref}: {r.body[:300]!r}")
            self.assertEqual(r.json()["Id"], cid)

        r = agent.request("POST", f"/containers/{cid}/stop?t=0")
        self.assertEqual(r.status, 204, r.body[:300])
        self.assertEqual(self.state("node3", cid), "exited")
        r = agent.request("POST", f"/containers/{cid}/start")
        self.assertEqual(r.status, 204, r.body[:300])
        self.assertEqual(self.state("node3", cid), "running")
        r = agent.request("GET", f"/containers/{cid}/logs?stdout=1")
        self.assertEqual(r.status, 200, r.body[:300])
        self.assertGreaterEqual(r.body.count(b"hello-from-node3"), 2, r.body[:300])

        # This node's own containers are still served here.
        r = agent.request("GET", "/containers/loc-node1/json")
        self.assertEqual(r.status, 200, r.body[:300])
        self.assertEqual(r.json()["Id"], self.containers["node1"])

    def ensure_running(self, cid: str) -> None:
        client = self.node("node3").docker()
        try:
            if client.containers.get(cid).status != "running":
                client.containers.get(cid).start()
        finally:
            client.close()

    @explain
    def test_nowhere_is_no_such_container(self) -> None:
        r = self.agent("node2").request("GET", "/containers/no-such-thing/json")
        self.assertEqual(r.status, 404, r.body[:300])
        self.assertIn("No such container", r.json()["message"])
        self.assertIsNone(r.headers.get("X-SwarmAgent-Missing-Nodes"))

    @explain
    def test_a_name_on_several_nodes_needs_a_target(self) -> None:
        r = self.agent("node1").request("GET", "/containers/twin/json")
        self.assertEqual(r.status, 409, r.body[:300])
        self.assertIn("node2, node3", r.json()["message"])
        # On a node that has one, that one is served, as before.
        r = self.agent("node2").request("GET", "/containers/twin/json")
        self.assertEqual(r.status, 200, r.body[:300])
        ids = engine_containers([self.node("node2")])
        self.assertEqual(ids.get(r.json()["Id"]), "node2")

    @explain
    def test_sdk_lists_and_inspects_every_node(self) -> None:
        """``containers.list(all=True)`` inspects each listed ID, untargeted."""
        client = self.sdk()
        listed = {c.id: c.name for c in client.containers.list(all=True)}
        self.assertEqual(set(listed), set(engine_containers(self.the_lab.nodes)))
        self.assertEqual(listed[self.containers["node3"]], "loc-node3")
        c = client.containers.get("loc-node2")
        self.assertIn(b"hello-from-node2", c.logs())
        result = c.exec_run(["hostname"])
        self.assertEqual(result.exit_code, 0, result.output)

    @explain
    def test_cli_logs_and_exec_without_headers(self) -> None:
        cid = self.containers["node3"]
        logs = self.cli("logs", cid)
        self.assertEqual(logs.returncode, 0, logs.stderr)
        self.assertIn("hello-from-node3", logs.stdout)
        run = self.cli("exec", cid, "echo", "hi")
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertEqual(run.stdout, "hi\n")
        inspect = self.cli("inspect", "--format", "{{.Name}}", "loc-node3")
        self.assertEqual(inspect.returncode, 0, inspect.stderr)
        self.assertEqual(inspect.stdout.strip(), "/loc-node3")
        missing = self.cli("logs", "no-such-thing")
        self.assertNotEqual(missing.returncode, 0)
        self.assertIn("No such container", missing.stderr)

    @explain
    def test_a_listed_container_that_moved_is_found_again(self) -> None:
        """A whole list places "mover" on node3 (the next inspect asks node3
        alone); once it is gone there and made again on node2, the stale place
        costs one 404, and the search finds node2's."""
        agent = self.agent("node1")
        node3, node2 = self.node("node3").docker(), self.node("node2").docker()
        self.addCleanup(node3.close)
        self.addCleanup(node2.close)
        first = node3.containers.create(IMAGE, ["true"], name="mover")
        self.addCleanup(self.remove, node3, "mover")
        listed = agent.request("GET", "/containers/json?all=1")
        self.assertEqual(listed.status, 200, listed.body[:300])
        [item] = [i for i in listed.json() if i["Id"] == first.id]
        self.assertEqual(item["Portainer"]["Agent"]["NodeName"], "node3")
        r = agent.request("GET", "/containers/mover/json")
        self.assertEqual((r.status, r.json()["Id"]), (200, first.id), r.body[:300])

        first.remove()
        second = node2.containers.create(IMAGE, ["true"], name="mover")
        self.addCleanup(self.remove, node2, "mover")
        r = agent.request("GET", "/containers/mover/json")
        self.assertEqual((r.status, r.json()["Id"]), (200, second.id), r.body[:300])
        r = agent.request("GET", f"/containers/{first.id}/json")
        self.assertEqual(r.status, 404, r.body[:300])

    def metric(self, agent: str, name: str, label: str) -> dict[str, float]:
        """``agent``'s samples named ``name``, summed by the value of ``label``."""
        r = self.agent(agent).request("GET", "/metrics")
        self.assertEqual(r.status, 200, r.body[:300])
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(r.body.decode()):
            for s in family.samples:
                if s.name == name:
                    key = s.labels.get(label, "")
                    out[key] = out.get(key, 0.0) + s.value
        return out

    def requests_served(self, agent: str) -> float:
        """Docker API requests ``agent`` has served (not its own routes, /metrics among them)."""
        counts = self.metric(agent, "swarmagent_requests_total", "route")
        return sum(n for route, n in counts.items() if route != "own")

    @explain
    def test_a_listed_container_is_inspected_with_one_request(self) -> None:
        """Portainer's snapshot: after a whole list, an untargeted inspect of
        node3's container is one request from node1's agent, to node3's (node2
        is not asked), and node3's answer is served with the agent's headers."""
        cid = self.containers["node3"]
        agent = self.agent("node1")
        listed = agent.request("GET", "/containers/json?all=1")
        self.assertEqual(listed.status, 200, listed.body[:300])
        calls = "swarmagent_node_call_seconds_count"
        before = self.metric("node1", calls, "node")
        served = {n: self.requests_served(n) for n in ("node2", "node3")}

        r = agent.request("GET", f"/containers/{cid}/json")
        self.assertEqual((r.status, r.json()["Id"]), (200, cid), r.body[:300])
        self.assertEqual(r.headers["Content-Type"], "application/json")
        self.assertIsNotNone(r.headers["Api-Version"])
        self.assertEqual(len(r.headers.get_all("Portainer-Agent") or []), 1)

        after = self.metric("node1", calls, "node")
        asked = {n: after.get(n, 0) - before.get(n, 0) for n in ("node2", "node3")}
        self.assertEqual(asked, {"node2": 0, "node3": 1})
        self.assertEqual(
            {n: self.requests_served(n) - served[n] for n in served}, {"node2": 0, "node3": 1}
        )

    def remove(self, client: docker.DockerClient, name: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            client.containers.get(name).remove(force=True)
