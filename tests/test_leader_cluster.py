"""Manager operations follow a leader change as fast as the swarm does (issue #14, item 5).

A 5-node lab with 3 managers (node1, the leader, node2 and node3) and an
agent on each node. node1's link is cut: Raft elects another leader, after
which a surviving manager's own engine answers ``GET /services`` again. The
same request through a worker's agent must answer within a few seconds of
that engine (it once took twice as long: the old leader stayed first in the
agents' choice until its probes had failed three times, ticks stretched by
their deadlines). A service created through the worker right after succeeds.
Run as root: ``SALAB_ID=9 python -m twisted.trial tests.test_leader_cluster``.
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import docker.errors

from tests.lab import IMAGE, Node
from tests.labcase import FANOUT_TIMEOUT, REFRESH, SLACK, LabTestCase, explain

#: Seconds to wait for the engine, then the agent, to answer again.
RECOVERY = 90.0
#: How far behind the engine the worker's agent may be: the old leader, passed
#: over at its first failed probe (5 s after the cut, before any election
#: ends), costs nothing then; a refresh or two and a deadline, for a loaded
#: machine. Measured: 0.1-0.7 s behind; before the fix 3.5-17 s (3 runs each).
BEHIND = 2 * REFRESH + FANOUT_TIMEOUT + SLACK + 1.0
#: The deadline of each polling request.
ASK_TIMEOUT = 3.0


def first_success(ask: Callable[[], bool], since: float, until: float) -> float | None:
    """Seconds from ``since`` to the end of the first ``ask`` that returns
    True among those sent 1 s or more after ``since``; None if none by ``until``."""
    while time.monotonic() < until:
        sent = time.monotonic()
        try:
            ok = ask()
        except Exception:
            ok = False
        if ok and sent >= since + 1.0:
            return time.monotonic() - since
        time.sleep(0.2)
    return None


class LeaderChangeTests(LabTestCase):
    NODES = 5
    MANAGERS = 3

    def leader(self) -> Node:
        client = self.node("node2").docker()
        try:
            for n in client.nodes.list():
                if (n.attrs.get("ManagerStatus") or {}).get("Leader"):
                    return self.node(n.attrs["Description"]["Hostname"])
        finally:
            client.close()
        raise AssertionError("no leader in the node list")

    def restore(self, node: Node) -> None:
        if node.name in self.the_lab.cut:
            self.the_lab.restore_link(node)

    @explain
    def test_worker_agent_follows_the_engine(self) -> None:
        lab = self.the_lab
        old = self.leader()
        survivor = next(n for n in lab.nodes[:3] if n is not old)
        worker = self.agent("node5")
        engine = survivor.docker(timeout=int(ASK_TIMEOUT))
        self.addCleanup(engine.close)

        def engine_answers() -> bool:
            engine.services.list()
            return True

        def agent_answers() -> bool:
            return worker.request("GET", "/services", timeout=ASK_TIMEOUT).status == 200

        self.assertTrue(engine_answers())
        self.assertTrue(agent_answers())
        # Registered first: the link comes back whatever happens (baseline() waits for it).
        self.addCleanup(self.restore, old)
        lab.cut_link(old)
        cut = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            engine_took = pool.submit(first_success, engine_answers, cut, cut + RECOVERY)
            agent_took = pool.submit(first_success, agent_answers, cut, cut + RECOVERY)
            engine_s, agent_s = engine_took.result(), agent_took.result()
        # The figures, for the record (speed is not asserted beyond the bound).
        sys.stderr.write(
            f"\nleader {old.name} cut: {survivor.name}'s engine answers after {engine_s} s, "
            f"node5's agent after {agent_s} s\n"
        )
        self.assertIsNotNone(engine_s, f"{survivor.name}'s engine never answered again")
        self.assertIsNotNone(agent_s, "node5's agent never answered GET /services again")
        assert engine_s is not None and agent_s is not None
        self.assertLessEqual(agent_s, engine_s + BEHIND)

        name = f"lab-leader-{uuid.uuid4().hex[:8]}"
        spec = {
            "Name": name,
            "TaskTemplate": {"ContainerSpec": {"Image": IMAGE, "Command": ["sleep", "3600"]}},
            "Mode": {"Replicated": {"Replicas": 1}},
        }

        def remove() -> None:
            with contextlib.suppress(docker.errors.NotFound):
                engine.services.get(name).remove()

        self.addCleanup(remove)
        r = worker.request("POST", "/services/create", body=spec, timeout=30)
        self.assertEqual(r.status, 201, r.body[:300])
        self.assertEqual(engine.services.get(r.json()["ID"]).name, name)
