"""Shared fixture for tests that run real agents in a real swarm (:mod:`tests.lab`).

A test run starts one lab (engines start in ~2 s, a swarm in ~15, but not
for free) and every test class uses it in turn: the first lab test starts it,
the last one stops it, and a class coming after another gets it reset to a
fresh lab of the size it asks for before its class fixture goes on. Every
test starts from its class's baseline (all links up, every node in DNS, an
agent with the class's settings on every node that knows every other), which
:meth:`LabTestCase.setUp` restores, so a test can run alone or after any
other. Without root, dockerd etc. the tests skip, except under ``CI=true``
where they fail.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, cast

from twisted.trial import unittest

from tests.lab import (
    DOCKER_CLI,
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


def nothing_silent(agent: Agent) -> bool:
    """Whether ``agent`` leaves no node out as silent (True when its status is
    refused: agents with neither a CA nor a secret do not show it)."""
    r = agent.request("GET", "/swarmagent/status", timeout=5)
    return r.status != 200 or not r.json().get("Silent")


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

    return cast(F, wrapper)  # functools.wraps: the same call as ``test``


class _SharedLab:
    """The one lab of a test run, handed from test class to test class.

    Started by the first lab test, stopped after the last one (and at exit,
    if the run ends early). A test of another class than the last gets the
    lab :meth:`~tests.lab.Lab.reset` to a fresh lab of its class's size, and
    its class's :meth:`LabTestCase.setUpLab` run; classes with the same
    :meth:`LabTestCase.fixture` share one (one stack deployment, say). Another
    lab is started only for a class whose ``LAB`` or ``MANAGERS`` the running
    one cannot serve.
    """

    def __init__(self) -> None:
        self.lab: Lab | None = None
        #: The fixture on the lab (see LabTestCase.fixture), None if none.
        self.fixture: object = None
        #: The class whose tests use the lab now.
        self.user: type[LabTestCase] | None = None
        #: ``LAB`` of every test trial created: the first lab is one serving all.
        self.wanted: set[type[Lab]] = set()
        #: Tests created and not finished yet; the lab stops at 0.
        self.pending = 0
        #: Labs this run started.
        self.started = 0
        self.error: BaseException | None = None

    def acquire(self, cls: type[LabTestCase]) -> Lab:
        """The lab, with ``cls``'s fixture on it."""
        if self.user is not None and self.user is not cls:
            agents = self.user.agents
            self.user.lab, self.user.agents = None, {}
            cls.agents = agents
        self.user = None
        lab = self.lab
        if lab is not None and not (isinstance(lab, cls.LAB) and lab.n_managers == cls.MANAGERS):
            self.stop()
            lab = None
        fresh = lab is None
        if lab is None:
            lab = self._start(cls)
        if cls.__dict__.get("_lab_error") is not None:
            raise RuntimeError(f"the lab fixture of {cls.__name__} failed earlier")
        if cls.fixture() != self.fixture:
            self.fixture = None
            try:
                if not fresh:
                    lab.reset(cls.NODES)
                cls.agents = {}
                cls.setUpLab(lab)
            except BaseException as e:
                cls._lab_error = e
                raise
            self.fixture = cls.fixture()
        cls.lab, self.user = lab, cls
        return lab

    def _start(self, cls: type[LabTestCase]) -> Lab:
        if self.error is not None:
            raise RuntimeError("the lab failed to start earlier in this run") from self.error
        # The most derived lab class every test can use, if there is one.
        kind = next(
            (k for k in self.wanted if all(issubclass(k, w) for w in self.wanted | {cls.LAB})),
            cls.LAB,
        )
        lab = kind(nodes=cls.NODES, managers=cls.MANAGERS)
        self.lab, self.fixture = lab, None
        self.started += 1
        try:
            lab.start()
        except BaseException as e:
            self.error = e
            self.stop()
            raise
        return lab

    def release(self) -> None:
        """One test done; after the last, the lab goes."""
        self.pending -= 1
        if self.pending <= 0:
            self.stop()

    def stop(self) -> None:
        lab, self.lab, self.fixture = self.lab, None, None
        if self.user is not None:
            self.user.lab, self.user.agents, self.user = None, {}, None
        if lab is not None:
            lab.stop()


_shared = _SharedLab()


class LabTestCase(unittest.TestCase):
    """Tests on the run's one :class:`Lab`, with agents on every node.

    A class says what lab it needs (``LAB``, ``NODES``, ``MANAGERS``) and
    puts its fixture on it in :meth:`setUpLab`; :meth:`baseline` restores
    that before each test.
    """

    NODES: ClassVar[int] = 3
    MANAGERS: ClassVar[int] = 1
    LAB: ClassVar[type[Lab]] = Lab

    # Trial has no setUpClass/tearDownClass or session fixtures: the first
    # test's setUp starts the lab, the cleanup of the last test that trial
    # created (it creates every case before running any) stops it, and an
    # atexit hook covers runs that stop early (--exitfirst, ^C, a signal).
    #: The lab while this class's tests use it.
    lab: ClassVar[Lab | None] = None
    agents: ClassVar[dict[str, Agent]] = {}
    _lab_error: ClassVar[BaseException | None] = None

    def __init__(self, methodName: str = "runTest") -> None:
        super().__init__(methodName)
        _shared.pending += 1
        _shared.wanted.add(type(self).LAB)

    @classmethod
    def fixture(cls) -> object:
        """What :meth:`setUpLab` makes; classes that return the same share it."""
        return cls

    @classmethod
    def setUpLab(cls, lab: Lab) -> None:
        """Class fixture, run on a fresh lab; override to add to it."""
        cls.agents = {n.name: lab.start_agent(n) for n in lab.nodes}
        for agent in cls.agents.values():
            agent.wait_ready(20)

    def setUp(self) -> None:
        ok, why = Lab.can_run()
        if not ok:
            if IN_CI:
                raise AssertionError(f"CI=true but the lab cannot run here: {why}")
            raise unittest.SkipTest(why)
        _install_signal_handlers()
        self.addCleanup(_shared.release)  # registered first, so it runs last
        self.baseline(_shared.acquire(type(self)))

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
        for agent in cls.agents.values():
            # A node an earlier test made silent (frozen, cut off) is asked
            # again at each refresh: lists leave it out until it answers.
            wait_until(
                functools.partial(nothing_silent, agent),
                FANOUT_TIMEOUT + 2 * REFRESH + SLACK,
                0.1,
                f"{agent.node.name} to see every node answer",
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

    def docker_cli(
        self,
        *args: str,
        cli: str = DOCKER_CLI,
        via: str = "node1",
        headers: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """A docker CLI against ``via``'s agent with the lab's client certificate,
        and ``headers`` in its config.json (none: the plain CLI, no target)."""
        config = tempfile.mkdtemp(prefix="dockercfg-")
        self.addCleanup(shutil.rmtree, config, True)
        with open(os.path.join(config, "config.json"), "w") as f:
            json.dump({"HttpHeaders": headers or {}}, f)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": config,
            "DOCKER_CONFIG": config,
            "DOCKER_HOST": self.agent(via).url.replace("https://", "tcp://"),
            "DOCKER_TLS_VERIFY": "1",
            "DOCKER_CERT_PATH": str(self.the_lab.tls),
        }
        return subprocess.run(
            [cli, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )


@atexit.register
def _stop_leftover_lab() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is _terminate:
            signal.signal(sig, signal.SIG_IGN)  # let the teardown finish
    _shared.stop()
    if _shared.started:
        sys.stderr.write(f"\nlab tests: {_shared.started} lab(s) started in this run\n")


def _terminate(signum: int, frame: object) -> None:
    # Unwinds like ^C: trial stops and exits, and atexit stops the lab.
    raise KeyboardInterrupt(f"signal {signum}")


def _install_signal_handlers() -> None:
    """^C, SIGTERM and SIGHUP stop the run at once, and atexit stops the lab.

    The reactor trial runs each test in catches ^C only to stop itself,
    which a test blocked in the lab does not notice; SIGTERM and SIGHUP
    would end the process without running atexit.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _terminate)
