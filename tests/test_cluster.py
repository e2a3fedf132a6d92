"""Integration tests: real agents in a real multi-node swarm (see :mod:`tests.lab`).

Each test class shares one lab (engines start in ~2 s, but not for free):
the first test of the class starts it, the last one stops it. Every test
starts from the same baseline (all links up, every node in DNS, an agent with
the default settings on every node that knows every other), which
:meth:`LabTestCase.setUp` restores, so a test can run alone or after any
other.

Run as root: ``python -m twisted.trial tests.test_cluster``. Without root,
dockerd etc. the tests skip, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

import docker.errors
from twisted.trial import unittest

from tests.lab import (
    AGENT_SRV_NAME,
    IMAGE,
    Agent,
    Lab,
    Node,
    Response,
    wait_until,
)

F = TypeVar("F", bound=Callable[..., Any])

#: Agent settings the lab uses (see Lab.agent_env); deadlines derive from them.
REFRESH = 1.0
FANOUT_TIMEOUT = 3.0
PROBE_FAILURES = 3
#: Scheduling slack on top of a protocol deadline.
SLACK = 2.0
MISSING = "X-SwarmAgent-Missing-Nodes"
TARGET = "X-PortainerAgent-Target"

IN_CI = os.environ.get("CI", "").lower() == "true"


def missing_nodes(r: Response) -> set[str]:
    """Node names in the ``X-SwarmAgent-Missing-Nodes`` header."""
    return {n.strip() for n in (r.headers.get(MISSING) or "").split(",") if n.strip()}


def agent_names(agent: Agent) -> set[str]:
    """Node names in ``GET /agents`` of ``agent``."""
    r = agent.request("GET", "/agents", timeout=5)
    if r.status != 200:
        raise AssertionError(f"GET /agents on {agent.node.name}: {r.status} {r.body[:200]!r}")
    return {a["NodeName"] for a in r.json()}


def knows_exactly(agent: Agent, names: set[str]) -> bool:
    """Whether ``agent``'s ``/agents`` names exactly ``names``."""
    return agent_names(agent) == names


def engine_containers(nodes: list[Node], all: bool = True) -> dict[str, str]:
    """Container ID → node name, asking each engine directly."""
    out: dict[str, str] = {}
    for node in nodes:
        client = node.docker()
        try:
            out.update({c.id: node.name for c in client.containers.list(all=all)})
        finally:
            client.close()
    return out


def listed_containers(r: Response) -> dict[str, str]:
    """Container ID → ``Portainer.Agent.NodeName`` of a fanned-out list."""
    return {c["Id"]: c["Portainer"]["Agent"]["NodeName"] for c in r.json()}


def explain(test: F) -> F:
    """On failure, print the agents' log tails (the failure alone rarely says why)."""

    @functools.wraps(test)
    def wrapper(self: LabTestCase, *a: Any, **kw: Any) -> Any:
        try:
            return test(self, *a, **kw)
        except unittest.SkipTest:
            raise
        except BaseException:
            lab = type(self).lab
            if lab is not None:
                sys.stderr.write(f"\n=== {self.id()} failed; agent logs ===\n{lab.logs(25)}\n")
            raise

    return wrapper  # type: ignore[return-value]


class LabTestCase(unittest.TestCase):
    """Tests sharing one :class:`Lab` per class, with agents on every node."""

    NODES: ClassVar[int] = 3
    MANAGERS: ClassVar[int] = 1

    # Trial has no setUpClass/tearDownClass: the lab is started by the first
    # test's setUp and stopped by the cleanup of the last test of the class
    # that trial instantiated (it creates every case before running any).
    # An atexit hook covers runs that stop early (--exitfirst, ^C).
    lab: ClassVar[Lab | None] = None
    agents: ClassVar[dict[str, Agent]] = {}
    _pending: ClassVar[int] = 0
    _lab_error: ClassVar[BaseException | None] = None
    #: The class whose lab is up; labs share fixed names, so one at a time.
    _active: ClassVar[type[LabTestCase] | None] = None

    def __init__(self, methodName: str = "runTest") -> None:
        super().__init__(methodName)
        cls = type(self)
        cls._pending = cls.__dict__.get("_pending", 0) + 1

    # -- class-wide lab ----------------------------------------------------

    @classmethod
    def _start_lab(cls) -> Lab:
        if LabTestCase._active is not None and LabTestCase._active is not cls:
            LabTestCase._active._stop_lab()
        if cls.__dict__.get("_lab_error") is not None:
            raise RuntimeError(f"the lab of {cls.__name__} failed to start earlier")
        lab = Lab(nodes=cls.NODES, managers=cls.MANAGERS)
        cls.lab, cls.agents, LabTestCase._active = lab, {}, cls
        try:
            lab.start()
            cls.setUpLab(lab)
        except BaseException as e:
            cls._lab_error = e
            cls._stop_lab()
            raise
        return lab

    @classmethod
    def _stop_lab(cls) -> None:
        lab, cls.lab, cls.agents = cls.lab, None, {}
        if LabTestCase._active is cls:
            LabTestCase._active = None
        if lab is not None:
            lab.stop()

    @classmethod
    def setUpLab(cls, lab: Lab) -> None:
        """Class fixture, run once after the lab is up; override to add to it."""
        cls.agents = {n.name: lab.start_agent(n) for n in lab.nodes}
        for agent in cls.agents.values():
            agent.wait_ready(20)

    def setUp(self) -> None:
        ok, why = Lab.can_run()
        if not ok:
            if IN_CI:
                raise AssertionError(f"CI=true but the lab cannot run here: {why}")
            raise unittest.SkipTest(why)
        self.addCleanup(self._release)  # registered first, so it runs last
        cls = type(self)
        lab = cls.lab if cls.lab is not None else cls._start_lab()
        self.baseline(lab)

    def _release(self) -> None:
        cls = type(self)
        cls._pending -= 1
        if cls._pending <= 0:
            cls._stop_lab()

    def baseline(self, lab: Lab) -> None:
        """Undo what earlier tests may have changed; cheap when nothing did."""
        for name in list(lab.cut):
            lab.restore_link(lab.node(name))
        lab.set_dns(lab.nodes)
        cls = type(self)
        restarted = False
        for node in lab.nodes:
            agent = cls.agents.get(node.name)
            if agent is None or not agent.alive or agent.overrides:
                if agent is not None:
                    agent.stop()
                cls.agents[node.name] = lab.start_agent(node)
                restarted = True
        for agent in cls.agents.values():
            agent.wait_ready(20)
        everyone = {n.name for n in lab.nodes}
        for agent in cls.agents.values():
            # A fresh agent finds its peers on its first DNS refresh; one
            # whose peers were dropped finds them again on the next one.
            wait_until(
                functools.partial(knows_exactly, agent, everyone),
                PROBE_FAILURES * REFRESH + 5 if restarted else REFRESH + 5,
                0.1,
                f"{agent.node.name} to know {sorted(everyone)}",
            )

    # -- helpers -----------------------------------------------------------

    @property
    def the_lab(self) -> Lab:
        assert self.lab is not None
        return self.lab

    def agent(self, name: str) -> Agent:
        return self.agents[name]

    def node(self, name: str) -> Node:
        return self.the_lab.node(name)


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

        # Without the header the request stays on node1, whose engine has no
        # such container: proof that the header did the routing.
        r = agent.request("GET", f"/containers/{cid}/json")
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


@atexit.register
def _stop_leftover_lab() -> None:
    if LabTestCase._active is not None:
        LabTestCase._active._stop_lab()
