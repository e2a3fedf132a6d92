"""Shared fixture for tests that run real agents in a real swarm (:mod:`tests.lab`).

Each test class shares one lab (engines start in ~2 s, but not for free):
the first test of the class starts it, the last one stops it. Every test
starts from the same baseline (all links up, every node in DNS, an agent with
the default settings on every node that knows every other), which
:meth:`LabTestCase.setUp` restores, so a test can run alone or after any
other. Without root, dockerd etc. the tests skip, except under ``CI=true``
where they fail.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from twisted.trial import unittest

from tests.lab import (
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
    LAB: ClassVar[type[Lab]] = Lab

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
        lab = cls.LAB(nodes=cls.NODES, managers=cls.MANAGERS)
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


@atexit.register
def _stop_leftover_lab() -> None:
    if LabTestCase._active is not None:
        LabTestCase._active._stop_lab()
