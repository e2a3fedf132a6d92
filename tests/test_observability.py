"""Metrics, the access log and the status document move as the behaviour they describe."""

from __future__ import annotations

import io
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Cooperator
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.resource import Resource

from swarmagent.access import RequestLog
from swarmagent.clients import EngineEndpoints
from swarmagent.config import EngineAddress, Options
from swarmagent.discovery import Discovery, ProbeRecord
from swarmagent.engine import SwarmNodes
from swarmagent.events import ClusterEvents
from swarmagent.fanout import FanOut
from swarmagent.logfile import LogFile
from swarmagent.logs import set_level
from swarmagent.metrics import AUTH_REFUSALS, NODE_FAILURES, ROUTES, Metrics, failure_reason
from swarmagent.nodes import Nodes
from swarmagent.peers import NodeIdentity
from swarmagent.proxy import EngineProxy, Relay
from swarmagent.signature import PUBLIC_KEY_HEADER, SIGNATURE_HEADER, Signer, Verifier
from swarmagent.statuspage import status_document, why_agentless
from swarmagent.tls import HTTP11Site
from swarmagent.tunnel import Tunnel, _UpstreamSide
from tests.helpers import (
    ByHost,
    Client,
    FakeAgent,
    FakeNode,
    HalfCloseTransport,
    StubResolver,
    make_site,
    make_table,
    manager,
    worker,
)
from tests.test_api import SIGNER, AgentCase

TIMEOUT = 2.0
# Path and header characters a client can send (no space; no % or #, which
# twisted.web would decode or cut).
PRINTABLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#%")


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """A sample's value, 0 when the series does not exist."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


def label_values(metrics: Metrics, name: str, label: str) -> set[str]:
    return {
        s.labels[label]
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name.startswith(name) and label in s.labels
    }


class NodeCallTests(SynchronousTestCase):
    """A cluster-wide list over a (this node), b and c, where c never answers."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.metrics = Metrics()
        table = make_table(manager("a"), {"10.0.0.2": worker("b"), "10.0.0.3": worker("c")})
        self.c = FakeNode(None)
        peers = ByHost({b"10.0.0.2:9001": FakeNode([{"Id": "b1"}]), b"10.0.0.3:9001": self.c})
        self.nodes = Nodes(
            table,
            RequestTraversalAgent(FakeNode([{"Id": "a1"}])),
            RequestTraversalAgent(peers),
            self.clock,
            TIMEOUT,
            metrics=self.metrics,
        )
        self.fanout = FanOut(self.nodes)

    def test_one_node_times_out(self) -> None:
        """One timeout for c, none for the others; one latency observation per node."""
        client = Client(make_site(self.fanout.resource("containers"), self.clock))
        client.send("GET", "/containers/json")
        self.clock.advance(TIMEOUT)
        self.assertEqual(client.response().code, 200)
        failures = "swarmagent_node_failures_total"
        self.assertEqual(sample(self.metrics, failures, node="c", reason="timeout"), 1)
        self.assertEqual(label_values(self.metrics, failures, "node"), {"c"})
        for node in ("a", "b", "c"):
            count = sample(self.metrics, "swarmagent_node_call_seconds_count", node=node)
            self.assertEqual(count, 1, node)
        # c's observation is the deadline it waited.
        self.assertEqual(sample(self.metrics, "swarmagent_node_call_seconds_sum", node="c"), 2.0)

    def test_refusal_and_server_error_count_as_http_status(self) -> None:
        """An agent's 403 or an engine's 500 is the node's failure; a 404 is an answer."""
        me = self.nodes.me
        for code, counted in ((403, 1), (500, 2), (404, 2)):
            node = FakeNode({"message": "x"}, code=code)
            nodes = Nodes(
                self.nodes.table,
                RequestTraversalAgent(node),
                RequestTraversalAgent(node),
                self.clock,
                TIMEOUT,
                metrics=self.metrics,
            )
            self.successResultOf(nodes.get(me, b"/containers/x/json"))
            self.assertEqual(
                sample(
                    self.metrics, "swarmagent_node_failures_total", node="a", reason="http_status"
                ),
                counted,
            )

    def test_failure_reasons(self) -> None:

        self.assertEqual(failure_reason(TimeoutError("no answer within 2 s")), "timeout")
        self.assertEqual(failure_reason(ConnectionRefusedError()), "refused")
        self.assertEqual(
            failure_reason(ResponseNeverReceived([Failure(SSL.Error("bad cert"))])), "tls"
        )
        self.assertEqual(failure_reason(ValueError("odd")), "other")
        for reason in ("timeout", "refused", "tls", "other"):
            self.assertIn(reason, NODE_FAILURES)


class RequestMetricsTests(AgentCase):
    """Requests through AgentRoot, counted by route and status class, and logged."""

    def agent_routes(self) -> dict[str, Any]:
        self.metrics = Metrics()
        self.verifier_state = "secret"
        # JSON lines: every field of a line, as a key.
        self.access_out = io.StringIO()
        access_log = LogFile(self.access_out, self.clock, json=True)
        return {
            "metrics": self.metrics,
            "requests": RequestLog(self.metrics, self.clock, lambda r: "key:test", access_log),
        }

    def access_lines(self) -> list[dict[str, Any]]:
        """The access lines written so far, decoded."""
        return [json.loads(line) for line in self.access_out.getvalue().splitlines()]

    def count(self, route: str, code: str) -> float:
        return sample(self.metrics, "swarmagent_requests_total", route=route, code=code)

    def test_routes_and_status_classes(self) -> None:
        self.assertEqual(self.get("/ping").code, 204)
        self.assertEqual(self.get("/v1.41/containers/json").code, 200)
        refused = Client(self.site).send("GET", "/containers/json").response()
        self.assertEqual(refused.code, 403)
        unknown = self.get("/containers/x/json", [("X-PortainerAgent-Target", "zz")])
        self.assertEqual(unknown.code, 404)
        self.assertEqual(self.count("own", "2xx"), 1)
        self.assertEqual(self.count("cluster_list", "2xx"), 1)
        self.assertEqual(self.count("refused", "4xx"), 1)
        self.assertEqual(self.count("error", "4xx"), 1)
        no_credential = "swarmagent_auth_refusals_total"
        self.assertEqual(sample(self.metrics, no_credential, reason="no_credential"), 1)

    def test_forwarded_latency_observed_when_done(self) -> None:
        client = self.request("POST", "/containers/abc/start", [("X-PortainerAgent-Target", "c")])
        self.clock.advance(3)
        self.assertEqual(self.count("forwarded", "2xx"), 0)
        self.peers.calls[0].respond(204, phrase=b"No Content").end()
        self.assertEqual(client.response().code, 204)
        self.assertEqual(self.count("forwarded", "2xx"), 1)
        total = sample(self.metrics, "swarmagent_request_seconds_sum", route="forwarded")
        self.assertEqual(total, 3)

    def test_client_gone_counts_no_status(self) -> None:
        client = self.request("POST", "/containers/abc/start", [("X-PortainerAgent-Target", "c")])
        client.disconnect()
        self.assertEqual(self.count("forwarded", "none"), 1)

    def test_tunnel_counted_when_upstream_answers(self) -> None:
        """A hijacked exec leaves twisted.web: it is counted with the upstream's status."""
        upgrade = [("Connection", "Upgrade"), ("Upgrade", "tcp"), ("X-PortainerAgent-Target", "c")]
        self.request("POST", "/exec/e1/start", upgrade)
        [(_, wire)] = self.peer_endpoints.connected
        self.assertEqual(self.count("tunnel", "1xx"), 0, "not before the answer")
        wire.protocol.dataReceived(b"HTTP/1.1 101 UPGRADED\r\nUpgrade: tcp\r\n\r\nout")
        self.assertEqual(self.count("tunnel", "1xx"), 1)
        [line] = self.access_lines()
        self.assertEqual((line["route"], line["nodes"], line["status"]), ("tunnel", "c", 101))

    def test_metrics_route_needs_credentials(self) -> None:
        self.assertEqual(Client(self.site).send("GET", "/metrics").response().code, 403)
        response = self.get("/metrics")
        self.assertEqual(response.code, 200)
        names = {f.name for f in text_string_to_metric_families(response.body.decode())}
        self.assertIn("swarmagent_requests", names)

    def test_access_log_line(self) -> None:
        """One line per request: route, node, status; never a credential or the query."""
        client = self.request(
            "GET", "/containers/abc/json?secret=hunter2", [("X-PortainerAgent-Target", "a")]
        )
        self.engine.calls[0].respond(200).end()
        self.assertEqual(client.response().code, 200)
        [event] = self.access_lines()
        self.assertEqual(
            (event["method"], event["path"], event["route"], event["nodes"], event["status"]),
            ("GET", "/containers/abc/json", "local", "a", 200),
        )
        self.assertEqual(event["client"], "key:test")
        self.assertEqual(event["log_namespace"], "swarmagent.access")
        self.assertEqual(
            event["line"],
            f"GET /containers/abc/json local nodes=a 200 0B {event['ms']}ms "
            "client=key:test missing=-",
        )
        # No credential or query anywhere in the output.
        line = self.access_out.getvalue()
        for secret in SIGNER.headers().values():
            self.assertNotIn(secret, line)
        self.assertNotIn(SIGNATURE_HEADER, line)
        self.assertNotIn(PUBLIC_KEY_HEADER, line)
        self.assertNotIn("hunter2", line)

    def test_access_log_follows_log_level(self) -> None:
        set_level(LogLevel.warn)
        self.addCleanup(set_level, LogLevel.info)
        self.get("/ping")
        self.assertEqual(self.access_lines(), [])
        # The metrics still count it.
        self.assertEqual(self.count("own", "2xx"), 1)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["GET", "POST", "DELETE"]),
                st.text(PRINTABLE, max_size=40),
                st.one_of(
                    st.none(),
                    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20),
                ),
            ),
            max_size=6,
        )
    )
    def test_labels_bounded(self, requests: list[tuple[str, str, str | None]]) -> None:
        """Whatever the paths and targets, labels are route kinds, classes and node names."""
        for method, path, target in requests:
            headers = [("X-PortainerAgent-Target", target)] if target else []
            self.request(method, "/" + path.lstrip("/"), headers)
            for call in self.engine.calls + self.peers.calls:
                if not call.result.called:
                    call.respond(200).end()
        self.clock.advance(TIMEOUT * 2)
        self.assertLessEqual(label_values(self.metrics, "swarmagent_request", "route"), set(ROUTES))
        codes = label_values(self.metrics, "swarmagent_requests", "code")
        self.assertLessEqual(codes, {"1xx", "2xx", "3xx", "4xx", "5xx", "none"})
        nodes = {p.name for p in self.table.nodes()}
        self.assertLessEqual(label_values(self.metrics, "swarmagent_node", "node"), nodes)
        reasons = label_values(self.metrics, "swarmagent_auth_refusals", "reason")
        self.assertEqual(reasons, set(AUTH_REFUSALS))


class SiteTests(SynchronousTestCase):
    def test_no_twisted_web_access_log(self) -> None:
        """HTTP11Site writes no combined-log line (the agent logs requests itself)."""

        out = io.StringIO()
        site = HTTP11Site(Resource(), reactor=MemoryReactorClock())
        site.startFactory()
        site._logFile = out  # where twisted.web would write its line
        Client(site).send("GET", "/").response()
        self.assertEqual(out.getvalue(), "")


class PairingStateTests(SynchronousTestCase):
    def state(self, metrics: Metrics) -> str:
        on = [
            s.labels["swarmagent_pairing"]
            for f in metrics.registry.collect()
            for s in f.samples
            if s.name == "swarmagent_pairing" and s.value == 1
        ]
        self.assertEqual(len(on), 1)
        return on[0]

    def test_states(self) -> None:
        verifier = Verifier()
        metrics = Metrics()
        metrics.watch_pairing(lambda: verifier.state)
        self.assertEqual(self.state(metrics), "open")
        signer = Signer.generate()
        headers = signer.headers()
        verdict = verifier.verify(headers[PUBLIC_KEY_HEADER], headers[SIGNATURE_HEADER])
        self.assertTrue(verdict.accepted)
        self.assertEqual(self.state(metrics), "paired")
        other = Signer.generate().headers()
        verdict = verifier.verify(other[PUBLIC_KEY_HEADER], other[SIGNATURE_HEADER])
        self.assertEqual(verdict.reason, "other_key")
        secret = Verifier(secret="s")
        self.assertEqual(secret.state, "secret")
        fresh = Verifier()
        fresh.close_pairing()
        self.assertEqual(fresh.state, "closed")


class FakeEngine:
    def __init__(self, me: NodeIdentity) -> None:
        self.me = me

    async def identity(self) -> NodeIdentity:
        return self.me

    async def swarm_nodes(self) -> SwarmNodes:
        return SwarmNodes({"id-a": "a", "id-b": "b", "id-c": "c", "id-d": "d"})

    async def service_tasks(self, service: str) -> dict[str, tuple[str, str]]:
        return {
            "id-a": ("running", ""),
            "id-b": ("running", ""),
            "id-c": ("running", ""),
            "id-d": ("rejected", "no suitable node"),
        }


class DiscoveryMetricsTests(SynchronousTestCase):
    """a (manager) finds b and c at 10.0.0.2-3; c stops answering."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.metrics = Metrics()
        self.table = make_table(manager("a"), max_failures=2)
        self.answers: dict[str, NodeIdentity | None] = {
            "10.0.0.2": worker("b"),
            "10.0.0.3": worker("c"),
        }
        # The answers' addresses, whatever each probe then says.
        self.resolver = StubResolver()
        self.resolver.names["tasks.agent"] = list(self.answers)

        async def probe(address: str, port: int) -> NodeIdentity:
            self.clock.advance(0.25)
            identity = self.answers[address]
            if identity is None:
                raise TimeoutError("no answer within 5 s")
            return identity

        self.discovery = Discovery(
            self.table,
            FakeEngine(manager("a")),  # type: ignore[arg-type]
            self.resolver,
            probe,
            self.clock,
            name="tasks.agent",
            port=9001,
            hostname="a",
            metrics=self.metrics,
        )
        self.discovery.own_service = "agent"
        self.metrics.watch_table(
            lambda: len(self.table.nodes()) - 1, lambda: len(self.table.agentless())
        )

    def tick(self) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.discovery.tick()))

    def test_joins_leaves_probes_dns(self) -> None:
        self.tick()
        self.assertEqual(sample(self.metrics, "swarmagent_peer_joins_total"), 2)
        self.assertEqual(sample(self.metrics, "swarmagent_peers"), 2)
        self.assertEqual(sample(self.metrics, "swarmagent_peer_probe_rtt_seconds", node="c"), 0.25)
        self.assertEqual(sample(self.metrics, "swarmagent_agentless_nodes"), 1)  # d
        self.assertEqual(sample(self.metrics, "swarmagent_discovery_tick_seconds_count"), 1)
        self.answers["10.0.0.3"] = None
        self.tick()
        self.tick()
        self.assertEqual(sample(self.metrics, "swarmagent_peer_leaves_total"), 1)
        self.assertEqual(sample(self.metrics, "swarmagent_peers"), 1)
        self.assertEqual(sample(self.metrics, "swarmagent_agentless_nodes"), 2)
        self.assertIsNone(
            self.metrics.registry.get_sample_value(
                "swarmagent_peer_probe_rtt_seconds", {"node": "c"}
            )
        )
        self.resolver.broken.add("tasks.agent")
        self.tick()
        self.assertEqual(sample(self.metrics, "swarmagent_dns_failures_total"), 1)

    def test_status_document(self) -> None:
        self.tick()
        self.answers["10.0.0.3"] = None
        self.tick()
        self.tick()
        options = Options(environ={"AGENT_SECRET": "hunter2"})
        options.parseOptions([])
        doc = status_document(self.discovery, options)
        self.assertEqual(doc["Node"]["Name"], "a")
        peers = {p["Name"]: p for p in doc["Peers"]}
        self.assertEqual(set(peers), {"b", "c"})
        self.assertTrue(peers["b"]["InTable"])
        self.assertEqual(peers["b"]["ProbeRTT"], 0.25)
        self.assertEqual(peers["b"]["ConsecutiveFailures"], 0)
        self.assertFalse(peers["c"]["InTable"])
        self.assertEqual(peers["c"]["ConsecutiveFailures"], 2)
        self.assertEqual(peers["c"]["LastError"], "no answer within 5 s")
        self.assertIsNotNone(peers["c"]["LastErrorAt"])
        self.assertIsNone(peers["b"]["LastErrorAt"])
        self.assertIsNotNone(peers["c"]["LastProbe"])
        expected = {e["Name"]: e for e in doc["Expected"]}
        self.assertTrue(expected["b"]["HasAgent"])
        self.assertEqual(expected["c"]["Why"], "unreachable: no answer within 5 s")
        self.assertEqual(expected["d"]["Why"], "task failing: rejected: no suitable node")
        self.assertEqual(doc["Settings"]["secret"], "set")
        self.assertNotIn("hunter2", json.dumps(doc))
        self.assertEqual(doc["Settings"]["log-level"], "INFO")

    def test_silent_nodes_in_the_status_and_asked_at_each_tick(self) -> None:
        """A node that ran out a deadline is shown silent until the tick's ping answers."""
        self.tick()
        engine, peers = FakeAgent(), FakeAgent()
        nodes = Nodes(self.table, engine, peers, self.clock, 3, metrics=self.metrics)
        self.discovery.nodes = nodes
        b = next(p for p in self.table.nodes() if p.name == "b")
        asked_at = self.clock.seconds()
        nodes.get(b, b"/containers/json")
        self.clock.advance(3)
        self.clock.advance(3)  # the ping then sent runs out too: silent
        options = Options(environ={})
        options.parseOptions([])
        [silent] = status_document(self.discovery, options)["Silent"]
        self.assertEqual(silent["Name"], "b")
        self.assertEqual(silent["NodeID"], "id-b")
        self.assertEqual(silent["Why"], "no answer within 3 s")
        self.assertIsNotNone(silent["Since"])
        since = sample(self.metrics, "swarmagent_node_silent_since_seconds", node="b")
        self.assertEqual(since, asked_at)
        tick = Deferred.fromCoroutine(self.discovery.tick())
        ping = peers.calls[-1]
        self.assertEqual(len(peers.calls), 3)
        self.assertTrue(ping.url.endswith(b"/_ping"))
        ping.respond(200).end()
        self.successResultOf(tick)
        self.assertEqual(status_document(self.discovery, options)["Silent"], [])

    def test_why_agentless(self) -> None:
        probes = {"10.0.0.9": ProbeRecord(node="z", failures=1, last_error="refused")}
        self.assertEqual(why_agentless("id-y", "y", {}, {}), "no task scheduled")
        self.assertEqual(why_agentless("id-y", "y", {"id-y": ("pending", "")}, {}), "task pending")
        self.assertEqual(why_agentless("id-z", "z", None, probes), "unreachable: refused")
        self.assertEqual(why_agentless("id-y", "y", None, probes), "no agent reachable")


class StreamMetricsTests(SynchronousTestCase):
    """Open relays counted while open, and their bytes."""

    def open(self, metrics: Metrics, kind: str) -> float:
        return sample(metrics, "swarmagent_open_streams", kind=kind)

    def relayed(self, metrics: Metrics, kind: str) -> float:
        return sample(metrics, "swarmagent_relayed_bytes_total", kind=kind)

    def test_streamed_answer(self) -> None:

        clock = MemoryReactorClock()
        metrics = Metrics()
        upstream = FakeAgent()
        cooperator = Cooperator(scheduler=lambda work: clock.callLater(0, work))
        self.addCleanup(cooperator.stop)
        nodes = Nodes(make_table(manager("a")), upstream, upstream, clock, 5)
        endpoints = EngineEndpoints(clock, EngineAddress("unix", path="/x.sock"), 5)
        proxy = EngineProxy(Relay(upstream, endpoints, cooperator, metrics), nodes)
        Client(make_site(proxy, clock)).send("GET", "/containers/abc/logs?follow=1")
        self.assertEqual(self.open(metrics, "stream"), 0, "not before the answer")
        response = upstream.calls[0].respond(200)
        self.assertEqual(self.open(metrics, "stream"), 1)
        response.deliver(b"twelve bytes")
        response.deliver(b"+3 ")
        self.assertEqual(self.relayed(metrics, "stream"), 15)
        response.end()
        self.assertEqual(self.open(metrics, "stream"), 0)

    def test_tunnel(self) -> None:

        metrics = Metrics()
        codes: list[int] = []
        tunnel = Tunnel(HalfCloseTransport(), b"POST /exec/e/start HTTP/1.1\r\n\r\n", (), metrics)
        tunnel.answered = codes.append
        self.assertEqual(self.open(metrics, "tunnel"), 1)
        upstream = _UpstreamSide(tunnel)
        upstream.makeConnection(StringTransport())
        tunnel.from_client(b"stdin")
        upstream.dataReceived(b"HTTP/1.1 101 UPGRADED\r\nUpgrade: tcp\r\n\r\noutput")
        self.assertEqual(codes[0], 101)
        self.assertEqual(self.relayed(metrics, "tunnel"), len(b"stdin") + len(b"output"))
        upstream.connectionLost(Failure(ConnectionDone()))
        tunnel.client_gone()
        self.assertEqual(self.open(metrics, "tunnel"), 0, "closed once, not twice")

    def test_events(self) -> None:

        clock = MemoryReactorClock()
        metrics = Metrics()
        engine = FakeAgent()
        nodes = Nodes(make_table(manager("a")), engine, FakeAgent(), clock, 2, metrics=metrics)
        client = Client(make_site(ClusterEvents(nodes).resource(), clock))
        client.send("GET", "/events")
        self.assertEqual(self.open(metrics, "events"), 1)
        stream = engine.calls[0].respond(200)
        event = b'{"id":"a1","time":1,"timeNano":1000000000}\n'
        stream.deliver(event)
        self.assertGreater(self.relayed(metrics, "events"), len(event), "tagged with its node")
        client.disconnect()
        self.assertEqual(self.open(metrics, "events"), 0)
