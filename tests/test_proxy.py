"""The streaming relay to the local engine and to other agents."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Cooperator
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from swarmagent.clients import EngineEndpoints, PeerEndpoints
from swarmagent.config import EngineAddress
from swarmagent.nodes import Nodes
from swarmagent.peers import Peer
from swarmagent.proxy import EngineProxy, PeerProxy, Relay
from swarmagent.tls import ClientTLS
from tests.helpers import (
    AGENT_PORT,
    Client,
    FakeAgent,
    UpstreamCall,
    body_of,
    make_site,
    make_table,
    manager,
    worker,
)

# End-to-end headers a Docker client sends, kept on every hop.
END_TO_END = [
    ("User-Agent", "docker/27.0"),
    ("Content-Type", "application/json"),
    ("X-Registry-Auth", "e30="),
]
# Hop-by-hop headers: this connection's business only.
HOP_BY_HOP = [
    ("Connection", "keep-alive, X-Private-Hop"),
    ("X-Private-Hop", "1"),
    ("Keep-Alive", "timeout=5"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Proxy-Authorization", "Basic eDp5"),
    ("Proxy-Connection", "keep-alive"),
]
AGENT = [
    ("X-PortainerAgent-Target", "b"),
    ("X-PortainerAgent-Signature", "c2ln"),
    ("X-PortainerAgent-PublicKey", "3059"),
    ("X-PortainerAgent-ManagerOperation", "1"),
    ("X-SwarmAgent-Hop", "id-z"),
]
NEVER_FORWARDED = {
    b"connection",
    b"x-private-hop",
    b"keep-alive",
    b"te",
    b"trailer",
    b"proxy-authorization",
    b"proxy-connection",
    b"host",
    b"content-length",
    b"transfer-encoding",
}


def header_names(call: UpstreamCall) -> set[bytes]:
    return {name.lower() for name, _ in call.headers.getAllRawHeaders()}


class RelayCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.upstream = FakeAgent()
        self.cooperator = Cooperator(scheduler=lambda work: self.clock.callLater(0, work))
        self.addCleanup(self.cooperator.stop)
        # This node is a (node ID id-a); the proxies relay, through their
        # Relay's client, the copies it builds.
        self.nodes = Nodes(make_table(manager("a")), self.upstream, self.upstream, self.clock, 5)

    def engine_site(self) -> Resource:
        endpoints = EngineEndpoints(self.clock, EngineAddress("unix", path="/x.sock"), 5)
        return EngineProxy(Relay(self.upstream, endpoints, self.cooperator), self.nodes)

    def request(
        self, method: str, uri: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
    ) -> Client:
        return Client(make_site(self.engine_site(), self.clock)).send(method, uri, headers, body)

    def only_call(self) -> UpstreamCall:
        self.assertEqual(len(self.upstream.calls), 1)
        return self.upstream.calls[0]


class EngineRequestTests(RelayCase):
    def test_url_method_and_query(self) -> None:
        self.request("POST", "/v1.41/containers/abc/stop?t=30")
        call = self.only_call()
        self.assertEqual(call.method, b"POST")
        self.assertEqual(call.url, b"http://docker/v1.41/containers/abc/stop?t=30")

    def test_body(self) -> None:
        self.request("POST", "/containers/create?name=x", END_TO_END, b'{"Image":"alpine"}')
        self.assertEqual(body_of(self.only_call().body, self.clock), b'{"Image":"alpine"}')

    def test_no_body(self) -> None:
        self.request("GET", "/version")
        self.assertIsNone(self.only_call().body)

    def test_headers(self) -> None:
        self.request("POST", "/build", END_TO_END + HOP_BY_HOP + AGENT, b"tar")
        call = self.only_call()
        for name, value in END_TO_END:
            self.assertEqual(call.header(name.encode()), [value.encode()])
        self.assertEqual(call.header(b"x-forwarded-for"), [b"10.9.9.9"])
        names = header_names(call)
        self.assertFalse(names & NEVER_FORWARDED)
        self.assertFalse({n for n in names if n.startswith((b"x-portaineragent", b"x-swarmagent"))})

    def test_forwarded_for_appended(self) -> None:
        self.request("GET", "/version", [("X-Forwarded-For", "192.0.2.1")])
        self.assertEqual(self.only_call().header(b"x-forwarded-for"), [b"192.0.2.1, 10.9.9.9"])


class StreamingTests(RelayCase):
    def test_pieces_reach_the_client_as_they_arrive(self) -> None:
        client = self.request("GET", "/containers/abc/logs?follow=1")
        response = self.only_call().respond(
            200, {b"Content-Type": [b"application/vnd.docker.raw-stream"]}
        )
        for piece in (b"first line\n", b"second line\n", b"third line\n"):
            response.deliver(piece)
            self.assertIn(piece, client.raw)
            self.assertFalse(client.response().complete)
        response.end()
        answer = client.response()
        self.assertTrue(answer.complete)
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.body, b"first line\nsecond line\nthird line\n")
        self.assertEqual(answer.header("content-type"), "application/vnd.docker.raw-stream")

    def test_status_phrase_and_headers(self) -> None:
        client = self.request("GET", "/containers/nope/json")
        response = self.only_call().respond(
            404,
            {
                b"Content-Type": [b"application/json"],
                b"Content-Length": [b"27"],
                b"Docker-Experimental": [b"false"],
                b"Connection": [b"close, X-Upstream-Hop"],
                b"X-Upstream-Hop": [b"1"],
                b"Keep-Alive": [b"timeout=5"],
                b"Transfer-Encoding": [b"chunked"],
            },
            b"Not Found",
        )
        response.deliver(b'{"message":"no such thing"}')
        response.end()
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 404 Not Found\r\n"))
        answer = client.response()
        self.assertEqual(answer.header("docker-experimental"), "false")
        self.assertEqual(answer.header("content-length"), "27")
        self.assertNotIn("x-upstream-hop", answer.headers)
        self.assertNotIn("keep-alive", answer.headers)
        self.assertNotIn("transfer-encoding", answer.headers)
        self.assertEqual(answer.json(), {"message": "no such thing"})

    def test_no_default_content_type(self) -> None:
        client = self.request("POST", "/containers/abc/start")
        self.only_call().respond(204, {}, b"No Content").end()
        answer = client.response()
        self.assertEqual(answer.code, 204)
        self.assertNotIn("content-type", answer.headers)

    def test_slow_client_pauses_the_upstream(self) -> None:
        client = self.request("GET", "/events")
        response = self.only_call().respond(200)
        response.deliver(b"{}")
        client.pause()
        self.assertEqual(response.transport.producerState, "paused")
        client.resume()
        self.assertEqual(response.transport.producerState, "producing")

    def test_upstream_breaks_mid_body(self) -> None:
        """The client must see a cut answer, not a complete-looking one."""
        client = self.request("GET", "/containers/abc/export")
        response = self.only_call().respond(200)
        response.deliver(b"part")
        response.broken()
        self.assertTrue(client.transport.disconnecting)
        self.assertFalse(client.response().complete)


class LengthTests(RelayCase):
    """An answer framed by length upstream keeps its length, instead of being chunked."""

    def test_known_length_is_passed_on(self) -> None:
        client = self.request("GET", "/containers/json")
        response = self.only_call().respond(
            200, {b"Content-Type": [b"application/json"]}, length=10
        )
        response.deliver(b"[1,")
        response.deliver(b'"ab",3]')
        response.end()
        self.assertIn(b"\r\nContent-Length: 10\r\n", client.raw)
        self.assertTrue(client.raw.endswith(b'\r\n\r\n[1,"ab",3]'))
        answer = client.response()
        self.assertNotIn("transfer-encoding", answer.headers)
        self.assertTrue(answer.complete)
        self.assertEqual(answer.json(), [1, "ab", 3])

    def test_empty_body_of_known_length(self) -> None:
        client = self.request("POST", "/containers/abc/kill")
        self.only_call().respond(200, length=0).end()
        answer = client.response()
        self.assertEqual(answer.header("content-length"), "0")
        self.assertNotIn("transfer-encoding", answer.headers)
        self.assertTrue(answer.complete)

    def test_unknown_length_is_chunked(self) -> None:
        client = self.request("GET", "/containers/abc/logs?follow=1")
        response = self.only_call().respond(200)
        response.deliver(b"line\n")
        response.end()
        answer = client.response()
        self.assertEqual(answer.header("transfer-encoding"), "chunked")
        self.assertNotIn("content-length", answer.headers)
        self.assertEqual(answer.body, b"line\n")

    def test_head_keeps_the_entity_length(self) -> None:
        """twisted.web's client leaves a HEAD answer's Content-Length in its
        headers (and its length 0): the client gets the upstream's."""
        client = self.request("HEAD", "/containers/abc/archive?path=/etc")
        self.only_call().respond(200, {b"Content-Length": [b"1234"]}, length=0).end()
        head = client.raw.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nContent-Length: 1234\r\n", head[0] + b"\r\n")
        self.assertEqual(head[2], b"")

    def test_no_body_codes_get_no_length(self) -> None:
        for code in (204, 304):
            client = self.request("POST", "/containers/abc/start")
            self.upstream.calls[-1].respond(code, length=0).end()
            head, _, rest = client.raw.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 %d " % code))
            self.assertNotIn(b"content-length", head.lower())
            self.assertNotIn(b"transfer-encoding", head.lower())
            self.assertEqual(rest, b"")

    def test_upstream_breaks_mid_body(self) -> None:
        """The client is cut off short of the announced length."""
        client = self.request("GET", "/containers/abc/export")
        response = self.only_call().respond(200, length=100)
        response.deliver(b"part")
        response.broken()
        self.assertTrue(client.transport.disconnecting)
        self.assertIn(b"Content-Length: 100", client.raw)
        self.assertFalse(client.response().complete)


class ClientGoneTests(RelayCase):
    def test_before_the_answer_cancels_the_upstream_request(self) -> None:
        client = self.request("GET", "/events")
        client.disconnect()
        self.assertTrue(self.only_call().cancelled)
        self.assertEqual(client.raw, b"")

    def test_mid_body_stops_the_upstream(self) -> None:
        client = self.request("GET", "/containers/abc/logs?follow=1")
        response = self.only_call().respond(200)
        response.deliver(b"line\n")
        client.disconnect()
        self.assertEqual(response.transport.producerState, "stopped")
        written = client.raw
        response.deliver(b"in flight\n")  # already on its way: dropped
        self.assertEqual(client.raw, written)
        # The upstream connection then closes; the relay ends quietly.
        response.broken()
        self.assertEqual(self.flushLoggedErrors(), [])


class UnreachableTests(RelayCase):
    def test_engine_unreachable(self) -> None:
        client = self.request("GET", "/version")
        self.only_call().result.errback(ConnectionRefusedError("connection refused"))
        answer = client.response()
        self.assertEqual(answer.code, 502)
        self.assertEqual(answer.header("content-type"), "application/json")
        self.assertEqual(
            answer.json(),
            {
                "message": "Unable to reach the Docker engine",
                "details": "Connection was refused by other side: connection refused.",
            },
        )

    def test_peer_unreachable(self) -> None:
        peer = Peer("10.0.0.2", AGENT_PORT, worker("b"))
        relay = Relay(self.upstream, PeerEndpoints(self.clock, 5, ClientTLS()), self.cooperator)
        site = make_site(PeerProxy(relay, self.nodes, peer), self.clock)
        client = Client(site).send("GET", "/version")
        self.only_call().result.errback(ConnectionRefusedError())
        answer = client.response()
        self.assertEqual(answer.code, 502)
        self.assertEqual(answer.json()["message"], "Unable to reach the agent of node b")
        self.assertTrue(answer.json()["details"])


class PeerTests(RelayCase):
    def forward(self, peer: Peer, uri: str, headers: Sequence[tuple[str, str]]) -> Client:
        relay = Relay(self.upstream, PeerEndpoints(self.clock, 5, ClientTLS()), self.cooperator)
        site = make_site(PeerProxy(relay, self.nodes, peer), self.clock)
        return Client(site).send("POST", uri, headers, b"{}")

    def test_url(self) -> None:
        self.forward(Peer("10.0.0.2", 9100, worker("b")), "/v1.41/exec/e1/start?x=1", [])
        self.assertEqual(self.only_call().url, b"https://10.0.0.2:9100/v1.41/exec/e1/start?x=1")

    def test_ipv6_url(self) -> None:
        self.forward(Peer("fd00::2", AGENT_PORT, worker("b")), "/version", [])
        self.assertEqual(self.only_call().url, b"https://[fd00::2]:9001/version")

    def test_headers(self) -> None:
        peer = Peer("10.0.0.2", AGENT_PORT, worker("b"))
        self.forward(peer, "/containers/abc/start", END_TO_END + HOP_BY_HOP + AGENT)
        call = self.only_call()
        self.assertEqual(call.header(b"x-portaineragent-target"), [b"id-b"])
        self.assertEqual(call.header(b"x-swarmagent-hop"), [b"id-a"])
        self.assertEqual(call.header(b"x-portaineragent-signature"), [b"c2ln"])
        self.assertEqual(call.header(b"x-portaineragent-publickey"), [b"3059"])
        self.assertEqual(call.header(b"x-portaineragent-manageroperation"), [b"1"])
        self.assertEqual(call.header(b"x-forwarded-for"), [b"10.9.9.9"])
        for name, value in END_TO_END:
            self.assertEqual(call.header(name.encode()), [value.encode()])
        self.assertFalse(header_names(call) & NEVER_FORWARDED)
        self.assertEqual(body_of(call.body, self.clock), b"{}")

    def test_agent_headers_of_the_peer_are_not_doubled(self) -> None:
        peer = Peer("10.0.0.2", AGENT_PORT, worker("b"))
        client = self.forward(peer, "/version", [])
        response = self.only_call().respond(
            200,
            {
                b"Portainer-Agent": [b"9.9.9"],
                b"Portainer-Agent-API-Version": [b"2"],
                b"Portainer-Agent-Platform": [b"1"],
                b"Api-Version": [b"1.46"],
            },
        )
        response.end()
        answer = client.response()
        self.assertEqual(answer.header("api-version"), "1.46")
        for name in ("portainer-agent", "portainer-agent-api-version", "portainer-agent-platform"):
            self.assertNotIn(name, answer.headers)


class StalledNodeTests(RelayCase):
    """A relayed request waits for a slow node, not for one that stopped answering."""

    def setUp(self) -> None:
        super().setUp()
        self.peer = Peer("10.0.0.2", AGENT_PORT, worker("b"))
        relay = Relay(self.upstream, PeerEndpoints(self.clock, 5, ClientTLS()), self.cooperator)
        self.site = make_site(PeerProxy(relay, self.nodes, self.peer), self.clock)

    def forward(self) -> Client:
        return Client(self.site).send("GET", "/containers/abc/json")

    def test_a_node_that_stops_answering_gets_a_504_within_two_deadlines(self) -> None:
        client = self.forward()
        forwarded = self.upstream.calls[0]
        self.clock.advance(5)  # no answer head within the deadline: the node is pinged
        ping = self.upstream.calls[1]
        self.assertEqual(ping.url, b"https://10.0.0.2:9001/_ping")
        self.assertEqual(client.raw, b"")
        self.clock.advance(5)  # nor an answer to the ping
        answer = client.response()
        self.assertEqual(answer.code, 504)
        self.assertEqual(answer.json()["message"], "Unable to reach the agent of node b")
        self.assertIn("nor to a ping: not answering since", answer.json()["details"])
        self.assertTrue(forwarded.cancelled)

    def test_then_a_forward_to_it_fails_at_once_naming_it(self) -> None:
        self.forward()
        self.clock.advance(5)
        self.clock.advance(5)
        asked = len(self.upstream.calls)
        answer = self.forward().response()
        self.assertEqual(answer.code, 502)
        self.assertEqual(answer.header("x-swarmagent-missing-nodes"), "b")
        self.assertIn("Not answering since", answer.json()["details"])
        self.assertEqual(len(self.upstream.calls), asked)  # not sent

    def test_a_slow_answer_from_a_node_that_pings_is_waited_for(self) -> None:
        client = self.forward()
        for round in range(3):
            self.clock.advance(5)
            ping = self.upstream.calls[-1]
            self.assertEqual(ping.url, b"https://10.0.0.2:9001/_ping", round)
            pong = ping.respond(200)
            pong.deliver(b"OK")
            pong.end()
        response = self.upstream.calls[0].respond(200, {b"content-type": [b"application/json"]})
        response.deliver(b"{}")
        response.end()
        answer = client.response()
        self.assertEqual((answer.code, answer.body), (200, b"{}"))
        self.assertEqual(self.nodes.silences(), {})
