"""Metrics and the status document on a real swarm: node3's link cut, node4 with no agent."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.lab import Lab, wait_until
from tests.labcase import FANOUT_TIMEOUT, REFRESH, SLACK, LabTestCase, explain, knows_exactly

#: Where the test leaves what it saw, for a reader of the run (the report quotes it).
SEEN = Path(os.environ.get("SWARMAGENT_OBS_OUT", "/tmp/swarmagent-observability"))
WITH_AGENTS = ("node1", "node2", "node3")


def samples(text: str) -> list[Any]:
    """Every sample of a /metrics answer, through prometheus_client's own parser."""
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(all_samples: list[Any], name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    return float(
        sum(
            s.value
            for s in all_samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )
    )


class ObservabilityClusterTests(LabTestCase):
    """node1 (manager), node2, node3 with agents; node4 in the swarm without one."""

    NODES = 4

    @classmethod
    def setUpLab(cls, lab: Lab) -> None:
        cls.agents = {name: lab.start_agent(lab.node(name)) for name in WITH_AGENTS}
        for agent in cls.agents.values():
            agent.wait_ready(20)

    def baseline(self, lab: Lab) -> None:
        for name in list(lab.cut):
            lab.restore_link(lab.node(name))
        # Only the agents are in the cluster address, as in a stack.
        lab.set_dns([lab.node(name) for name in WITH_AGENTS])
        for agent in self.agents.values():
            wait_until(
                functools.partial(knows_exactly, agent, set(WITH_AGENTS)),
                REFRESH * 5 + 10,
                0.1,
                f"{agent.node.name} to know its peers",
            )

    @explain
    def test_metrics_and_status_with_node3_cut(self) -> None:
        lab = self.the_lab
        node1 = self.agent("node1")
        status = node1.request("GET", "/swarmagent/status").json()
        self.assertEqual(status["Node"]["Name"], "node1")

        def node4_expected() -> bool:
            doc = node1.request("GET", "/swarmagent/status").json()
            return any(e["Name"] == "node4" and not e["HasAgent"] for e in doc["Expected"])

        wait_until(node4_expected, REFRESH * 5 + 5, 0.2, "node4 expected without an agent")

        lab.cut_link(lab.node("node3"))
        self.addCleanup(lab.restore_link, lab.node("node3"))
        # A scripted mix: lists (node3 times out), forwards to node2, own
        # routes, a refused request.
        for _ in range(3):
            r = node1.request("GET", "/containers/json?all=1", timeout=30)
            self.assertEqual(r.status, 200, r.body[:300])
        # node3 is silent once the ping its first timeout sent runs out too;
        # from then on, lists leave it out without asking it.
        wait_until(
            lambda: node1.request("GET", "/swarmagent/status").json()["Silent"],
            FANOUT_TIMEOUT + SLACK + 10,
            0.2,
            "node3 silent",
        )
        for _ in range(3):
            r = node1.request("GET", "/containers/json?all=1", timeout=30)
            self.assertEqual(r.status, 200, r.body[:300])
        self.assertEqual(node1.request("GET", "/images/json", timeout=30).status, 200)
        for _ in range(2):
            r = node1.request("GET", "/version", headers={"X-PortainerAgent-Target": "node2"})
            self.assertEqual(r.status, 200, r.body[:300])
        self.assertEqual(node1.request("GET", "/ping").status, 204)
        refused = node1.request("GET", "/containers/json", context=lab.client_context(False))
        self.assertEqual(refused.status, 403)

        def node3_failing() -> bool:
            doc = node1.request("GET", "/swarmagent/status").json()
            return any(
                p["Name"] == "node3" and p["ConsecutiveFailures"] >= 1 and p["LastError"]
                for p in doc["Peers"]
            )

        wait_until(node3_failing, REFRESH * 5 + 10, 0.2, "node3's probes failing")

        metrics = node1.request("GET", "/metrics")
        self.assertEqual(metrics.status, 200)
        text = metrics.body.decode()
        all_samples = samples(text)
        failures = "swarmagent_node_failures_total"
        self.assertGreaterEqual(value(all_samples, failures, node="node3"), 4)
        # The first list ran out the deadline on node3 (and the ones sent while
        # its ping was out, and the discovery tick's pings); the lists after it
        # fell silent left it out at once.
        timeouts = value(all_samples, failures, node="node3", reason="timeout")
        silent = value(all_samples, failures, node="node3", reason="silent")
        self.assertGreaterEqual(timeouts, 1)
        self.assertGreaterEqual(silent, 3)
        self.assertEqual(timeouts + silent, value(all_samples, failures, node="node3"))
        self.assertEqual(value(all_samples, failures, node="node2"), 0)
        for node in ("node1", "node2"):
            count = value(all_samples, "swarmagent_node_call_seconds_count", node=node)
            self.assertGreaterEqual(count, 4, node)
        requests = "swarmagent_requests_total"
        self.assertGreaterEqual(value(all_samples, requests, route="cluster_list", code="2xx"), 4)
        self.assertEqual(value(all_samples, requests, route="forwarded", code="2xx"), 2)
        self.assertEqual(value(all_samples, requests, route="refused", code="4xx"), 1)
        refusals = "swarmagent_auth_refusals_total"
        self.assertEqual(value(all_samples, refusals, reason="no_credential"), 1)
        self.assertGreater(value(all_samples, "process_resident_memory_bytes"), 0)
        # Without credentials, nothing.
        self.assertEqual(
            node1.request("GET", "/metrics", context=lab.client_context(False)).status, 403
        )

        doc = node1.request("GET", "/swarmagent/status").json()
        peers = {p["Name"]: p for p in doc["Peers"]}
        self.assertTrue(peers["node3"]["LastError"], peers["node3"])
        self.assertTrue(peers["node2"]["InTable"])
        self.assertIsNotNone(peers["node2"]["ProbeRTT"])
        expected = {e["Name"]: e for e in doc["Expected"]}
        self.assertFalse(expected["node4"]["HasAgent"])
        self.assertEqual(expected["node4"]["Why"], "no agent reachable")
        self.assertTrue(expected["node2"]["HasAgent"])
        self.assertNotIn("secret", {k for k, v in doc["Settings"].items() if v not in ("", "set")})

        # The operator's table, from inside node1 with the agent's own environment.
        inside = lab.node("node1")
        table = subprocess.run(
            [*inside.nsenter(), sys.executable, "-m", "swarmagent.status"],
            env=lab.agent_env(inside),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        self.assertEqual(table.returncode, 0, table.stderr)
        self.assertIn("node3", table.stdout)
        self.assertIn("no agent reachable", table.stdout)
        SEEN.mkdir(parents=True, exist_ok=True)
        (SEEN / "metrics.txt").write_text(text)
        (SEEN / "status.txt").write_text(table.stdout)
