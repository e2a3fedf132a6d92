"""A node that stops answering costs one deadline, not one per request (issue #14, item 4).

node3's engine, and separately node3's agent, are frozen with SIGSTOP (open
connections, no answers). The first cluster list through node1 waits the
fan-out deadline before naming node3 missing; once the ping that sends has
run out too, the next ones name it at once,
without asking it; once it is thawed, node3 is back in node1's lists within a
few refresh intervals. Run as root: ``python -m twisted.trial tests.test_faults_cluster``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from tests.lab import IMAGE, Lab, Response, wait_until
from tests.labcase import (
    FANOUT_TIMEOUT,
    PROBE_FAILURES,
    REFRESH,
    SLACK,
    LabTestCase,
    explain,
    listed_containers,
    missing_nodes,
)
from tests.test_observability_cluster import samples, value

#: Lists while node3 is silent: each must be answered before the deadline it no longer pays.
AFTER_THE_FIRST = 3


def _resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


class SilentNodeTests(LabTestCase):
    """node1 (manager), node2 and node3 (workers), an agent on each; a container on node3."""

    @classmethod
    def setUpLab(cls, lab: Lab) -> None:
        super().setUpLab(lab)
        client = lab.node("node3").docker()
        try:
            client.containers.create(IMAGE, ["true"], name="faults-node3")
        finally:
            client.close()

    def freeze(self, pid: int) -> None:
        """SIGSTOP ``pid``; the SIGCONT is registered first, so it always runs."""
        self.addCleanup(_resume, pid)
        os.kill(pid, signal.SIGSTOP)

    def cluster_list(self, timeout: float) -> tuple[Response, float]:
        """``GET /containers/json`` through node1, and how long it took."""
        started = time.monotonic()
        r = self.agent("node1").request("GET", "/containers/json?all=1", timeout=timeout)
        self.assertEqual(r.status, 200, r.body[:300])
        return r, time.monotonic() - started

    def node3_failures(self, reason: str) -> float:
        r = self.agent("node1").request("GET", "/metrics", timeout=5)
        return value(
            samples(r.body.decode()), "swarmagent_node_failures_total", node="node3", reason=reason
        )

    def status_silent(self) -> list[dict[str, str]]:
        r = self.agent("node1").request("GET", "/swarmagent/status", timeout=5)
        return list(r.json()["Silent"])

    def costs_one_deadline(self) -> None:
        timeouts = self.node3_failures("timeout")
        first, _ = self.cluster_list(timeout=FANOUT_TIMEOUT + SLACK + 5)
        self.assertIn("node3", missing_nodes(first))
        # The first list asked node3 and ran out its deadline (the discovery
        # tick's pings of node3, from now on, may add theirs); node3 is silent
        # once the ping that timeout sent runs out too.
        self.assertGreaterEqual(self.node3_failures("timeout"), timeouts + 1)
        [silent] = wait_until(self.status_silent, FANOUT_TIMEOUT + SLACK + 5, 0.2, "node3 silent")
        self.assertEqual(silent["Name"], "node3")
        self.assertIn("no answer within", silent["Why"])
        silenced = self.node3_failures("silent")
        for _ in range(AFTER_THE_FIRST):
            r, took = self.cluster_list(timeout=FANOUT_TIMEOUT + SLACK + 5)
            self.assertIn("node3", missing_nodes(r))
            self.assertNotIn("node3", set(listed_containers(r).values()))
            # Not asked again: no deadline waited for.
            self.assertLess(took, FANOUT_TIMEOUT)
        self.assertGreaterEqual(self.node3_failures("silent"), silenced + AFTER_THE_FIRST)

    def back_after_thawing(self, pid: int, within: float) -> None:
        _resume(pid)
        deadline = time.monotonic() + within
        while True:
            r, _ = self.cluster_list(timeout=FANOUT_TIMEOUT + SLACK + 5)
            if "node3" not in missing_nodes(r):
                break
            self.assertLess(time.monotonic(), deadline, "node3 not back in node1's lists")
            time.sleep(0.2)
        self.assertIn("node3", set(listed_containers(r).values()))
        self.assertEqual(self.status_silent(), [])

    @explain
    def test_frozen_engine(self) -> None:
        dockerd = self.node("node3").dockerd
        assert dockerd is not None
        # The engine itself (the lab execs it in place of its launchers).
        self.assertEqual(Path(f"/proc/{dockerd.pid}/comm").read_text().strip(), "dockerd")
        self.freeze(dockerd.pid)
        self.costs_one_deadline()
        # The pending ping answers as soon as the engine runs again.
        self.back_after_thawing(dockerd.pid, 3 * REFRESH + FANOUT_TIMEOUT + SLACK)

    @explain
    def test_frozen_agent(self) -> None:
        pid = self.agent("node3").proc.pid
        self.freeze(pid)
        self.costs_one_deadline()
        # Its probes failing meanwhile, node3 may have left node1's table:
        # it comes back with its next successful probe.
        self.back_after_thawing(pid, (PROBE_FAILURES + 3) * REFRESH + 5 + FANOUT_TIMEOUT + SLACK)
