"""The front door (swarmagent.relay): strict heads, byte-exact relaying, and what goes to the tree.

Client and upstream connections are StringTransports driven by hand; the
last class runs a front door on the real reactor, over loopback, in front
of a twisted.web engine and the tree on its socket pair.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI, Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from swarmagent.access import RequestLog
from swarmagent.auth import Authorizer, IClientCert
from swarmagent.clients import make_pool
from swarmagent.internal import CERT, CLIENT, InternalEndpoint, InternalSite, vouch
from swarmagent.metrics import Metrics
from swarmagent.nodes import Nodes
from swarmagent.peers import PeerTable
from swarmagent.relay import (
    MAX_REQUEST_HEAD,
    Doors,
    FrontDoor,
    FrontDoorFactory,
    PeerPools,
    Upstream,
    UpstreamPool,
)
from swarmagent.signature import Signer, Verifier
from swarmagent.tls import ClientCert
from swarmagent.tunnel import hijack
from swarmagent.twisted_types import IAgentReactor
from tests.helpers import FakeAgent, HalfCloseTransport, make_table, manager, standalone

SECRET = "s3cret"
SIGNED = Signer.generate(SECRET).headers()
SIGNED_LINES = "".join(f"{k}: {v}\r\n" for k, v in SIGNED.items())
CLIENT_ADDRESS = IPv4Address("TCP", "192.0.2.7", 50000)
OWN = frozenset({b"/swarmagent/status", b"/ping"})


def request(
    method: str = "GET", target: str = "/_ping", extra: str = "", body: bytes = b""
) -> bytes:
    """A signed HTTP/1.1 request."""
    head = f"{method} {target} HTTP/1.1\r\nHost: agent\r\n{SIGNED_LINES}{extra}\r\n"
    return head.encode("latin-1") + body


class TLSLikeTransport(HalfCloseTransport):
    """Closes as ``TLSMemoryBIOProtocol`` does: not while a producer is
    registered, but once it is unregistered (``closed`` says it did)."""

    closed = False

    def loseConnection(self) -> None:
        super().loseConnection()
        self._close_if_ready()

    def unregisterProducer(self) -> None:
        super().unregisterProducer()
        self._close_if_ready()

    def _close_if_ready(self) -> None:
        if self.disconnecting and self.producer is None:
            self.closed = True


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """An upstream: each connection a StringTransport, or a failure to connect."""

    def __init__(self) -> None:
        self.connections: list[tuple[Upstream, HalfCloseTransport]] = []
        self.refuse: Exception | None = None

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        if self.refuse is not None:
            return fail(self.refuse)
        protocol = cast(Upstream, factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2375)))
        transport = TLSLikeTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)

    @property
    def last(self) -> tuple[Upstream, HalfCloseTransport]:
        return self.connections[-1]

    def sent(self, index: int = -1) -> bytes:
        value: bytes = self.connections[index][1].value()
        return value


@implementer(IAgentEndpointFactory)
class FakePeers:
    """Each other agent's endpoint, by URI."""

    def __init__(self) -> None:
        self.endpoints: dict[bytes, FakeEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return self.endpoints.setdefault(uri.toBytes(), FakeEndpoint())


class Harness:
    """A front door's shared parts, with fake upstreams."""

    def __init__(
        self, table: PeerTable | None = None, peers: bool = False, nodes: bool = False
    ) -> None:
        """``nodes``: requests bounded by their node's life, its pings sent
        through ``self.agent``."""
        self.clock = MemoryReactorClock()
        self.agent = FakeAgent()
        self.engine = FakeEndpoint()
        self.tree = FakeEndpoint()
        self.peers = FakePeers()
        self.metrics = Metrics()
        authorizer = Authorizer(Verifier(SECRET), None)
        self.table = table if table is not None else make_table(standalone("node-a"))
        self.nodes = Nodes(self.table, self.agent, self.agent, self.clock, 5)
        self.doors = Doors(
            engine=UpstreamPool(self.engine, self.clock),
            internal=UpstreamPool(self.tree, self.clock),
            authorizer=authorizer,
            table=self.table,
            requests=RequestLog(self.metrics, self.clock, authorizer.who),
            clock=self.clock,
            own=OWN.__contains__,
            idle_timeout=120.0,
            peers=PeerPools(self.peers, self.clock) if peers else None,
            metrics=self.metrics,
            nodes=self.nodes if nodes else None,
        )

    def connect(self) -> tuple[FrontDoor, HalfCloseTransport]:
        door = FrontDoorFactory(self.doors).buildProtocol(CLIENT_ADDRESS)
        transport = HalfCloseTransport(peerAddress=CLIENT_ADDRESS)
        door.makeConnection(transport)
        return door, transport

    def count(self, route: str, code: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "swarmagent_requests_total", {"route": route, "code": code}
        )
        return value or 0.0


def head_lines(raw: bytes) -> list[bytes]:
    return raw.partition(b"\r\n\r\n")[0].split(b"\r\n")


def header_names(raw: bytes) -> list[bytes]:
    return [line.partition(b":")[0].lower() for line in head_lines(raw)[1:]]


OK_PING = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nOK"


class EngineRelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.door, self.client = self.h.connect()

    def test_request_copy(self) -> None:
        # As Nodes.copy builds this node's copy: end-to-end headers only,
        # none of the agents', Host for the engine, the client's address added.
        self.door.dataReceived(
            request(
                extra="X-PortainerAgent-Target: node-a\r\nX-SwarmAgent-Hop: x\r\n"
                "Connection: keep-alive, X-Private\r\nX-Private: 1\r\nX-Forwarded-For: 10.1.1.1\r\n"
                "Accept: */*\r\n"
            )
        )
        sent = self.h.engine.sent()
        lines = head_lines(sent)
        self.assertEqual(lines[0], b"GET /_ping HTTP/1.1")
        self.assertIn(b"Host: docker", lines)
        self.assertIn(b"Accept: */*", lines)
        self.assertIn(b"X-Forwarded-For: 10.1.1.1, 192.0.2.7", lines)
        names = header_names(sent)
        for dropped in (b"x-portaineragent-target", b"x-swarmagent-hop", b"x-private"):
            self.assertNotIn(dropped, names)
        self.assertNotIn(b"x-portaineragent-publickey", names)
        self.assertEqual(names.count(b"host"), 1)
        self.assertEqual(self.h.tree.connections, [])

    def test_answer_marked_and_passed(self) -> None:
        self.door.dataReceived(request())
        upstream, _ = self.h.engine.last
        upstream.dataReceived(
            b"HTTP/1.1 200 OK\r\nPortainer-Agent: fake\r\nConnection: keep-alive\r\n"
            b"Keep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nOK"
        )
        raw = self.client.value()
        lines = head_lines(raw)
        self.assertEqual(lines[0], b"HTTP/1.1 200 OK")
        self.assertIn(b"Portainer-Agent-API-Version: 2", lines)
        self.assertNotIn(b"Portainer-Agent: fake", lines)
        self.assertNotIn(b"connection", header_names(raw))
        self.assertNotIn(b"keep-alive", header_names(raw))
        self.assertTrue(raw.endswith(b"\r\n\r\nOK"))
        self.assertEqual(self.h.count("local", "2xx"), 1)
        # Counted as a stream while it was relayed, as twisted.web's relay did.
        registry = self.h.metrics.registry
        self.assertEqual(
            registry.get_sample_value("swarmagent_open_streams", {"kind": "stream"}), 0
        )
        self.assertEqual(
            registry.get_sample_value("swarmagent_relayed_bytes_total", {"kind": "stream"}), 2
        )

    def test_keep_alive_reuses_the_upstream(self) -> None:
        for _ in range(3):
            self.door.dataReceived(request())
            self.h.engine.last[0].dataReceived(OK_PING)
        self.assertEqual(len(self.h.engine.connections), 1)
        self.assertEqual(self.client.value().count(b"\r\n\r\nOK"), 3)
        self.assertFalse(self.client.disconnecting)
        self.assertEqual(self.h.count("local", "2xx"), 3)

    def test_as_many_upstreams_kept_as_the_web_paths_pool(self) -> None:
        """As many clients at once as twisted.web's client pool keeps per host
        each find a kept upstream for their next request: none is opened anew
        (each would be a TLS handshake to a peer)."""
        kept = make_pool(self.h.clock).maxPersistentPerHost
        clients = [self.door] + [self.h.connect()[0] for _ in range(kept - 1)]
        for _ in range(2):
            for door in clients:
                door.dataReceived(request())
            for upstream, _transport in self.h.engine.connections[-kept:]:
                upstream.dataReceived(OK_PING)
        self.assertEqual(len(self.h.engine.connections), kept)

    def test_an_upstream_that_says_close_is_not_reused(self) -> None:
        """An answer with "Connection: close" (twisted.web's after a 400, say)
        leaves its connection out of the pool, whatever its framing."""
        closing = [
            b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 2\r\n\r\nno",
            b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n",
        ]
        for number, answer in enumerate(closing, start=1):
            self.door.dataReceived(request())
            upstream, transport = self.h.engine.last
            upstream.dataReceived(answer)
            self.assertTrue(transport.disconnecting)
            self.assertEqual(len(self.h.engine.connections), number)
        self.door.dataReceived(request())  # a fresh connection again
        self.assertEqual(len(self.h.engine.connections), 3)

    def test_chunked_answer_untouched_at_every_split(self) -> None:
        body = b"3;name=value\r\nabc\r\n10\r\n" + b"x" * 16 + b"\r\n0\r\nX-Trailer: t\r\n\r\n"
        answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
        for split in range(1, len(answer)):
            h = Harness()
            door, client = h.connect()
            door.dataReceived(request())
            upstream, _ = h.engine.last
            upstream.dataReceived(answer[:split])
            upstream.dataReceived(answer[split:])
            raw = client.value()
            self.assertTrue(raw.endswith(b"\r\n\r\n" + body), split)
            # The message ended: the connection went back to the pool.
            door.dataReceived(request())
            self.assertEqual(len(h.engine.connections), 1, split)

    def test_length_answer_at_every_split(self) -> None:
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789"
        for split in range(1, len(answer)):
            h = Harness()
            door, client = h.connect()
            door.dataReceived(request())
            upstream, _ = h.engine.last
            upstream.dataReceived(answer[:split])
            upstream.dataReceived(answer[split:])
            self.assertTrue(client.value().endswith(b"\r\n\r\n0123456789"), split)
            self.assertIsNone(upstream.door, split)

    def test_chunked_request_body_at_every_split(self) -> None:
        data = request(
            "POST",
            "/containers/create",
            "Transfer-Encoding: chunked\r\n",
            b"4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nX-T: 1\r\n\r\n",
        )
        head_end = data.index(b"\r\n\r\n") + 4
        for split in range(head_end, len(data)):
            h = Harness()
            door, _ = h.connect()
            door.dataReceived(data[:split])
            door.dataReceived(data[split:])
            sent = h.engine.sent()
            head, _, body = sent.partition(b"\r\n\r\n")
            self.assertIn(b"Transfer-Encoding: chunked", head.split(b"\r\n"))
            self.assertEqual(_dechunk(body), b"wikipedia", split)
            self.assertTrue(body.endswith(b"0\r\n\r\n"), split)

    def test_length_request_body_at_every_split(self) -> None:
        data = request("POST", "/build", "Content-Length: 7\r\n", b"payload")
        for split in range(1, len(data)):
            h = Harness()
            door, _ = h.connect()
            door.dataReceived(data[:split])
            door.dataReceived(data[split:])
            sent = h.engine.sent()
            self.assertIn(b"Content-Length: 7", head_lines(sent))
            self.assertTrue(sent.endswith(b"\r\n\r\npayload"), split)

    def test_pipelined_requests_in_order(self) -> None:
        self.door.dataReceived(request(target="/one") + request(target="/two"))
        upstream, transport = self.h.engine.last
        # One at a time: the second goes once the first is answered.
        self.assertEqual(transport.value().count(b"HTTP/1.1\r\n"), 1)
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
        self.assertIn(b"GET /two HTTP/1.1", transport.value())
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
        raw = self.client.value()
        self.assertLess(raw.index(b"one"), raw.index(b"two"))
        self.assertEqual(len(self.h.engine.connections), 1)

    def test_head_with_content_length(self) -> None:
        self.door.dataReceived(request("HEAD", "/containers/x/json"))
        upstream, _ = self.h.engine.last
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 120\r\n\r\n")
        raw = self.client.value()
        self.assertIn(b"Content-Length: 120", head_lines(raw))
        self.assertTrue(raw.endswith(b"\r\n\r\n"))
        # Nothing more was awaited: the next request goes on the same connection.
        self.door.dataReceived(request())
        self.assertEqual(len(self.h.engine.connections), 1)
        self.assertIn(b"GET /_ping", self.h.engine.sent())

    def test_bodiless_codes(self) -> None:
        for status in (b"204 No Content", b"304 Not Modified"):
            h = Harness()
            door, client = h.connect()
            door.dataReceived(request())
            h.engine.last[0].dataReceived(b"HTTP/1.1 " + status + b"\r\n\r\n")
            self.assertIsNone(h.engine.last[0].door)
            self.assertFalse(client.disconnecting)

    def test_interim_answers(self) -> None:
        self.door.dataReceived(
            request("POST", "/build", "Expect: 100-continue\r\nContent-Length: 2\r\n")
        )
        upstream, transport = self.h.engine.last
        self.assertIn(b"Expect: 100-continue", head_lines(transport.value()))
        upstream.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(self.client.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.door.dataReceived(b"{}")
        self.assertTrue(transport.value().endswith(b"\r\n\r\n{}"))
        upstream.dataReceived(OK_PING)
        self.assertTrue(self.client.value().endswith(b"OK"))
        self.assertIn(b"HTTP/1.1 200 OK", self.client.value())

    def test_until_close_answer(self) -> None:
        self.door.dataReceived(request(target="/containers/x/attach"))
        upstream, _ = self.h.engine.last
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: raw\r\n\r\nstream")
        self.assertIn(b"Connection: close", head_lines(self.client.value()))
        upstream.dataReceived(b" more")
        upstream.connectionLost(Failure(Exception("closed")))
        self.assertTrue(self.client.value().endswith(b"stream more"))
        self.assertTrue(self.client.disconnecting)

    def test_http10_closes(self) -> None:
        self.door.dataReceived(b"GET /_ping HTTP/1.0\r\n" + SIGNED_LINES.encode() + b"\r\n")
        self.assertIn(b"GET /_ping HTTP/1.0", self.h.engine.sent())
        self.h.engine.last[0].dataReceived(OK_PING)
        self.assertIn(b"Connection: close", head_lines(self.client.value()))
        self.assertTrue(self.client.disconnecting)

    def test_connection_close(self) -> None:
        self.door.dataReceived(request(extra="Connection: close\r\n"))
        self.h.engine.last[0].dataReceived(OK_PING)
        self.assertIn(b"Connection: close", head_lines(self.client.value()))
        self.assertTrue(self.client.disconnecting)

    def test_502_before_the_head(self) -> None:
        self.h.engine.refuse = ConnectionRefusedError("no engine")
        self.door.dataReceived(request())
        raw = self.client.value()
        self.assertEqual(head_lines(raw)[0], b"HTTP/1.1 502 Bad Gateway")
        doc = json.loads(raw.partition(b"\r\n\r\n")[2])
        self.assertEqual(doc["message"], "Unable to reach the Docker engine")
        self.assertIn(b"Portainer-Agent-API-Version: 2", head_lines(raw))
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.h.count("local", "5xx"), 1)

    def test_upstream_closes_before_the_head(self) -> None:
        self.door.dataReceived(request())
        upstream, _ = self.h.engine.last
        upstream.dataReceived(b"HTTP/1.1 2")
        upstream.connectionLost(Failure(ConnectionResetError("reset")))
        self.assertEqual(head_lines(self.client.value())[0], b"HTTP/1.1 502 Bad Gateway")

    def test_cut_after_the_head(self) -> None:
        self.door.dataReceived(request())
        upstream, _ = self.h.engine.last
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
        upstream.connectionLost(Failure(ConnectionResetError("reset")))
        raw = self.client.value()
        self.assertNotIn(b"502", raw)
        self.assertTrue(raw.endswith(b"01234"))
        self.assertTrue(self.client.disconnecting)

    def test_stale_kept_connection_is_retried(self) -> None:
        self.door.dataReceived(request())
        self.h.engine.last[0].dataReceived(OK_PING)
        self.door.dataReceived(request())
        stale, _ = self.h.engine.last
        stale.connectionLost(Failure(ConnectionResetError("closed while idle")))
        self.assertEqual(len(self.h.engine.connections), 2)
        self.h.engine.last[0].dataReceived(OK_PING)
        self.assertEqual(self.client.value().count(b"200 OK"), 2)

    def test_the_queue_bound_lets_go_of_what_it_held(self) -> None:
        """Pipelined heads and bodies count against the bound only while held:
        many served pairs never leave the client paused."""
        for _ in range(3000):
            self.door.dataReceived(request() + request())
            for _ in range(2):
                self.h.engine.last[0].dataReceived(OK_PING)
        self.assertEqual(self.client.producerState, "producing")
        self.assertEqual(self.door._queued, 0)

    def test_a_body_held_while_connecting_is_let_go_once_sent(self) -> None:
        """A large upload's start, read while the engine connection is being
        made, pauses the client; once sent upstream, the client reads again."""
        connect = self.h.engine.connect
        pending: list[tuple[Deferred[IProtocol], IProtocolFactory]] = []

        def slow(factory: IProtocolFactory) -> Deferred[IProtocol]:
            d: Deferred[IProtocol] = Deferred()
            pending.append((d, factory))
            return d

        self.h.engine.connect = slow  # type: ignore[method-assign]
        body = b"x" * (1100 * 1024)
        length = f"Content-Length: {4 * len(body)}\r\n"
        self.door.dataReceived(request("POST", "/images/load", length, body))
        self.assertEqual(self.client.producerState, "paused")
        d, factory = pending.pop()
        connect(factory).chainDeferred(d)
        self.assertEqual(self.client.producerState, "producing")
        self.assertIn(body, self.h.engine.sent())

    def test_backpressure_both_ways(self) -> None:
        self.door.dataReceived(request("POST", "/images/load", "Content-Length: 100\r\n"))
        _, transport = self.h.engine.last
        # A slow client pauses the upstream's reading.
        self.door.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        self.door.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        # A slow upstream pauses the client's.
        producer = cast(IPushProducer, transport.producer)
        producer.pauseProducing()
        self.assertEqual(self.client.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual(self.client.producerState, "producing")

    def test_client_gone_closes_upstream(self) -> None:
        self.door.dataReceived(request())
        _, transport = self.h.engine.last
        self.door.connectionLost(Failure(ConnectionResetError()))
        self.assertTrue(transport.disconnecting)

    def test_abandoned_streams_close_their_upstreams(self) -> None:
        """A streamed answer the client left, from the engine, a peer and the
        tree: its upstream closes (a TLS one, too, though the client was its
        producer)."""
        h = Harness(make_table(manager("node-a"), {"10.0.0.2": manager("node-b")}), peers=True)
        streams = {
            "engine": ("/v1.41/events", "X-PortainerAgent-Target: node-a\r\n", h.engine),
            "peer": ("/v1.41/events", "X-PortainerAgent-Target: node-b\r\n", None),
            # Every node's events, merged.
            "tree": ("/v1.41/events", "", h.tree),
        }
        for name, (target, extra, endpoint) in streams.items():
            with self.subTest(name):
                door, _ = h.connect()
                door.dataReceived(request(target=target, extra=extra))
                if endpoint is None:
                    endpoint = h.peers.endpoints[b"https://10.0.0.2:9001/"]
                upstream, transport = endpoint.last
                upstream.dataReceived(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
                )
                # A slow client paused it, then left.
                door.pauseProducing()
                door.connectionLost(Failure(ConnectionResetError()))
                self.assertTrue(cast(TLSLikeTransport, transport).closed)

    def test_idle_timeout(self) -> None:
        self.h.clock.advance(119)
        self.assertFalse(self.client.disconnecting)
        self.h.clock.advance(1)
        self.assertTrue(self.client.disconnecting)

    def test_idle_time_counts_from_the_last_answer(self) -> None:
        self.h.clock.advance(100)
        self.door.dataReceived(request())
        self.h.clock.advance(100)  # a slow answer is not idle time
        self.assertFalse(self.client.disconnecting)
        self.h.engine.last[0].dataReceived(OK_PING)
        self.h.clock.advance(119)
        self.assertFalse(self.client.disconnecting)
        self.h.clock.advance(1)
        self.assertTrue(self.client.disconnecting)

    def test_slowloris_head(self) -> None:
        # Data does not reset the clock: a head must be whole in time.
        data = request()
        for i in range(len(data) - 1):
            self.door.dataReceived(data[i : i + 1])
            self.h.clock.advance(1)
            if self.client.disconnecting:
                break
        self.assertTrue(self.client.disconnecting)
        self.assertEqual(self.h.engine.connections, [])


def _dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, body = out + body[:size], body[size + 2 :]


SMUGGLING = {
    "CL+TE": b"POST /build HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    "duplicate CL": b"POST /build HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "obs-fold": b"GET /_ping HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n",
    "bare LF": b"GET /_ping HTTP/1.1\nHost: agent\n\n",
    "bare LF in a header": b"GET /_ping HTTP/1.1\r\nHost: agent\n\r\n",
    "TE not chunked last": b"POST /build HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    "space before colon": b"GET /_ping HTTP/1.1\r\nHost : agent\r\n\r\n",
}


class StrictnessTests(SynchronousTestCase):
    def test_smuggling_shapes_refused(self) -> None:
        for name, data in SMUGGLING.items():
            h = Harness()
            door, client = h.connect()
            door.dataReceived(data + request())
            raw = client.value()
            self.assertEqual(head_lines(raw)[0], b"HTTP/1.1 400 Bad Request", name)
            self.assertTrue(client.disconnecting, name)
            # Refused as it was read: no byte of it went anywhere.
            self.assertEqual(h.engine.connections + h.tree.connections, [], name)
            self.assertEqual(h.count("error", "4xx"), 1, name)

    def test_bad_chunk_size_after_its_answer(self) -> None:
        h = Harness()
        door, client = h.connect()
        door.dataReceived(request("POST", "/build", "Transfer-Encoding: chunked\r\n"))
        h.engine.last[0].dataReceived(OK_PING)
        door.dataReceived(b"zz\r\n")
        # The request's answer comes first; then the 400, and the close.
        raw = client.value()
        self.assertIn(b"400 Bad Request", raw)
        self.assertLess(raw.index(b"200 OK"), raw.index(b"400 Bad Request"))
        self.assertTrue(client.disconnecting)

    def test_bad_chunk_size_before_its_answer(self) -> None:
        """Found by bench.fuzz: the upstream (the tree, the engine) would wait for
        the rest of the body for ever, so the client for its answer: a 400 at
        once, and the upstream closed, as twisted.web does."""
        for target in ("/ping", "/build"):
            with self.subTest(target):
                h = Harness()
                door, client = h.connect()
                door.dataReceived(
                    request("POST", target, "Transfer-Encoding: chunked\r\n") + b"zz\r\n"
                )
                _, upstream = (h.tree if target == "/ping" else h.engine).last
                raw = client.value()
                self.assertEqual(head_lines(raw)[0], b"HTTP/1.1 400 Bad Request")
                self.assertTrue(cast(TLSLikeTransport, upstream).closed)
                self.assertTrue(client.disconnecting)

    def test_bad_chunk_size_while_its_answer_streams(self) -> None:
        h = Harness()
        door, client = h.connect()
        door.dataReceived(request("POST", "/build", "Transfer-Encoding: chunked\r\n"))
        upstream, transport = h.engine.last
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        door.dataReceived(b"zz\r\n")
        # No 400 can follow a begun answer: both connections are cut.
        self.assertNotIn(b"400", client.value())
        self.assertTrue(cast(TLSLikeTransport, transport).closed)
        self.assertTrue(client.disconnecting)

    def test_head_too_large(self) -> None:
        h = Harness()
        door, client = h.connect()
        door.dataReceived(request(extra="X-Big: " + "a" * MAX_REQUEST_HEAD + "\r\n"))
        self.assertEqual(
            head_lines(client.value())[0], b"HTTP/1.1 431 Request Header Fields Too Large"
        )
        self.assertTrue(client.disconnecting)
        self.assertEqual(h.engine.connections, [])

    def test_head_that_never_ends(self) -> None:
        """httptools calls back only with a whole value: a header value sent
        without end (as test_observability_process's client sends it) is cut
        off by its raw size, not buffered until the idle timeout."""
        h = Harness()
        door, client = h.connect()
        door.dataReceived(b"GET /ping HTTP/1.1\r\nHost: a\r\nX-Big: ")
        for _ in range(2 * MAX_REQUEST_HEAD // 1000):
            door.dataReceived(b"a" * 1000)
        self.assertEqual(client.value(), b"")
        door.dataReceived(b"a" * 1000)
        self.assertEqual(
            head_lines(client.value())[0], b"HTTP/1.1 431 Request Header Fields Too Large"
        )
        self.assertTrue(client.disconnecting)

    def test_pipelined_heads_are_counted_each(self) -> None:
        # Many small requests in one read are no head too large.
        h = Harness()
        door, client = h.connect()
        count = 3 * MAX_REQUEST_HEAD // len(request())
        door.dataReceived(request(target="/ping") * count)
        for _ in range(count):
            h.tree.last[0].dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(client.value().count(b" 204 "), count)
        self.assertNotIn(b" 431 ", client.value())

    @settings(max_examples=150, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.text(
                    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
                    min_size=1,
                    max_size=20,
                ),
                # CR and LF end a line: the shapes they make are SMUGGLING's.
                st.binary(max_size=30).filter(lambda v: b"\r" not in v and b"\n" not in v),
            ),
            max_size=8,
        )
    )
    def test_any_head(self, fields: list[tuple[str, bytes]]) -> None:
        """A head is relayed with its end-to-end headers as sent, or refused with 400: never
        anything else."""
        h = Harness()
        door, client = h.connect()
        extra = b"".join(n.encode() + b": " + v + b"\r\n" for n, v in fields)
        data = request().replace(b"\r\n\r\n", b"\r\n" + extra + b"\r\n")
        door.dataReceived(data)
        raw = client.value()
        if raw:
            self.assertEqual(head_lines(raw)[0], b"HTTP/1.1 400 Bad Request")
            self.assertEqual(h.engine.connections, [])
            return
        skip = (b"connection", b"content-length", b"transfer-encoding", b"host", b"upgrade")
        if not h.engine.connections:
            # Sent to the tree instead: a framing or upgrade header, or agent headers.
            self.assertTrue(h.tree.connections)
            return
        relayed = [
            (n, v.strip(b" \t"))
            for n, _, v in (line.partition(b":") for line in head_lines(h.engine.sent())[1:])
        ]
        for name, value in fields:
            lower = name.lower().encode()
            if lower in skip or lower.startswith(
                (
                    b"x-portaineragent-",
                    b"x-swarmagent-",
                    b"te",
                    b"trailer",
                    b"keep-alive",
                    b"proxy-",
                )
            ):
                continue
            if any(lower in v.lower() for n, v in fields if n.lower() == "connection"):
                continue
            if lower == b"x-forwarded-for":
                continue
            # Surrounding whitespace is not part of a value (RFC 9110 §5.5).
            self.assertIn((name.encode(), value.strip(b" \t")), relayed)


class TreeTests(SynchronousTestCase):
    """What the front door hands to the resource tree, and how."""

    def setUp(self) -> None:
        self.h = Harness()
        self.door, self.client = self.h.connect()

    def test_own_paths_go_to_the_tree_vouched(self) -> None:
        self.door.dataReceived(
            request(
                target="/v1.41/swarmagent/status",
                extra="X-SwarmAgent-Internal-Cert: verified CN=forged\r\n"
                "X-SwarmAgent-Internal-Client: 10.9.9.9 1\r\n",
            )
        )
        self.assertEqual(self.h.engine.connections, [])
        sent = self.h.tree.sent()
        lines = head_lines(sent)
        self.assertEqual(lines[0], b"GET /v1.41/swarmagent/status HTTP/1.1")
        # The client's own claims are gone; the front door's say who it is.
        self.assertNotIn(b"X-SwarmAgent-Internal-Cert: verified CN=forged", lines)
        self.assertIn(CLIENT + b": 192.0.2.7 50000", lines)
        self.assertEqual([n for n in header_names(sent) if n == CERT], [])
        # The tree's answer is passed as it is (it marks its answers itself).
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
        self.h.tree.last[0].dataReceived(answer)
        self.assertEqual(self.client.value(), answer)
        # Counted by the tree, not here.
        self.assertEqual(self.h.count("local", "2xx"), 0)

    def test_unsigned_goes_to_the_tree(self) -> None:
        # The tree refuses it, and counts the refusal.
        self.door.dataReceived(b"GET /containers/json HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(self.h.engine.connections, [])
        self.assertIn(b"GET /containers/json", self.h.tree.sent())

    def test_dot_segments_go_to_the_tree(self) -> None:
        self.door.dataReceived(request(target="/containers/%2e%2e/json"))
        self.assertEqual(self.h.engine.connections, [])

    def test_cluster_routes_go_to_the_tree(self) -> None:
        h = Harness(make_table(manager("node-a"), {"10.0.0.2": manager("node-b")}))
        door, _ = h.connect()
        # A cluster list, a lookup, a request for another node: the tree's.
        door.dataReceived(request(target="/containers/json"))
        h.tree.last[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]")
        door.dataReceived(request(target="/containers/abc/json"))
        h.tree.last[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        door.dataReceived(request(target="/_ping", extra="X-PortainerAgent-Target: node-b\r\n"))
        h.tree.last[0].dataReceived(OK_PING)
        door.dataReceived(request("POST", "/networks/create", "Content-Length: 2\r\n", b"{}"))
        self.assertEqual(h.engine.connections, [])
        self.assertEqual(len(h.tree.connections), 1)
        # This node's own: the engine's.
        h.tree.last[0].dataReceived(OK_PING)
        door.dataReceived(request(target="/_ping", extra="X-PortainerAgent-Target: node-a\r\n"))
        self.assertEqual(len(h.engine.connections), 1)

    def test_forwarded_relayed_to_the_peer(self) -> None:
        h = Harness(make_table(manager("node-a"), {"10.0.0.2": manager("node-b")}), peers=True)
        door, client = h.connect()
        door.dataReceived(
            request(
                # The CLI pings with its config's headers, a broadcast's among them.
                target="/v1.41/_ping",
                extra="X-PortainerAgent-Target: node-b\r\nX-SwarmAgent-Broadcast: all\r\n"
                "X-SwarmAgent-Internal-Cert: verified CN=forged\r\n",
            )
        )
        self.assertEqual(h.engine.connections + h.tree.connections, [])
        peer = h.peers.endpoints[b"https://10.0.0.2:9001/"]
        lines = head_lines(peer.sent())
        self.assertEqual(lines[0], b"GET /v1.41/_ping HTTP/1.1")
        self.assertIn(b"Host: 10.0.0.2:9001", lines)
        # Targeted at node-b and hop-marked with this node's key, as Nodes.copy does.
        self.assertIn(b"X-PortainerAgent-Target: id-node-b", lines)
        self.assertIn(b"X-SwarmAgent-Hop: id-node-a", lines)
        for name, value in SIGNED.items():
            self.assertIn(f"{name}: {value}".encode(), lines)
        names = header_names(peer.sent())
        self.assertNotIn(b"x-swarmagent-broadcast", names)
        self.assertNotIn(b"x-swarmagent-internal-cert", names)
        self.assertEqual(names.count(b"x-portaineragent-target"), 1)
        # The peer's own agent headers give way to this agent's.
        peer.last[0].dataReceived(
            b"HTTP/1.1 200 OK\r\nPortainer-Agent: 0.0.1\r\nContent-Length: 2\r\n\r\n{}"
        )
        raw = client.value()
        self.assertNotIn(b"Portainer-Agent: 0.0.1", head_lines(raw))
        self.assertIn(b"Portainer-Agent-API-Version: 2", head_lines(raw))
        self.assertTrue(raw.endswith(b"\r\n\r\n{}"))
        self.assertEqual(h.count("forwarded", "2xx"), 1)

    def test_unreachable_peer(self) -> None:
        h = Harness(make_table(manager("node-a"), {"10.0.0.2": manager("node-b")}), peers=True)
        door, client = h.connect()
        h.peers.endpointForURI(URI.fromBytes(b"https://10.0.0.2:9001/"))
        h.peers.endpoints[b"https://10.0.0.2:9001/"].refuse = ConnectionRefusedError("down")
        door.dataReceived(request(extra="X-PortainerAgent-Target: node-b\r\n"))
        raw = client.value()
        self.assertEqual(head_lines(raw)[0], b"HTTP/1.1 502 Bad Gateway")
        doc = json.loads(raw.partition(b"\r\n\r\n")[2])
        self.assertEqual(doc["message"], "Unable to reach the agent of node node-b")

    def test_upgrade_spliced_with_half_close(self) -> None:
        data = request(
            "POST",
            "/exec/abc/start",
            "Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 2\r\n",
            b"{}early",
        )
        self.door.dataReceived(data)
        upstream, transport = self.h.tree.last
        # The body and what followed went on at once: the tree reads the body first.
        self.assertTrue(transport.value().endswith(b"\r\n\r\n{}early"))
        upstream.dataReceived(b"HTTP/1.1 101 UPGRADED\r\nUpgrade: tcp\r\n\r\nout")
        self.assertTrue(self.client.value().endswith(b"\r\n\r\nout"))
        self.door.dataReceived(b"GET / HTTP/1.1\r\n")  # raw bytes now, not a request
        self.assertTrue(transport.value().endswith(b"GET / HTTP/1.1\r\n"))
        # The client's end of input is passed on; the upstream keeps writing.
        self.door.readConnectionLost()
        self.assertTrue(transport.write_closed)
        upstream.dataReceived(b" more")
        self.assertTrue(self.client.value().endswith(b"out more"))
        upstream.readConnectionLost()
        self.assertTrue(self.client.write_closed)
        upstream.connectionLost(Failure(Exception("done")))
        self.assertTrue(self.client.disconnecting)

    def test_upgrade_refused_closes(self) -> None:
        self.door.dataReceived(
            request("POST", "/exec/abc/start", "Connection: Upgrade\r\nUpgrade: tcp\r\n")
        )
        self.h.tree.last[0].dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}")
        self.assertTrue(self.client.disconnecting)

    def test_upgrade_refused_is_not_reused(self) -> None:
        """Found by bench.fuzz: what the client sent after an upgrade request
        went to the tree as raw bytes, which it read as a next request; kept,
        the connection gave that request's answer to the next client's."""
        self.door.dataReceived(
            request("POST", "/exec/abc/start", "Connection: Upgrade\r\nUpgrade: tcp\r\n")
            + b"GET /nowhere HTTP/1.1\r\n\r\n"
        )
        upstream, transport = self.h.tree.last
        self.assertTrue(transport.value().endswith(b"GET /nowhere HTTP/1.1\r\n\r\n"))
        upstream.dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}")
        self.assertTrue(cast(TLSLikeTransport, transport).closed)
        door, _ = self.h.connect()
        door.dataReceived(request(target="/ping"))
        self.assertEqual(len(self.h.tree.connections), 2)


class ClientCloseTests(SynchronousTestCase):
    """The front door closes a TLS client's connection itself when it must.

    Found by ``test_observability_process`` with bytes the default: TLS sends
    its close_notify, and closes, only once no producer is registered, and the
    front door is its client transport's producer: a client still sending
    after a 431 waited for a close that never came.
    """

    def setUp(self) -> None:
        self.h = Harness()
        self.door = FrontDoorFactory(self.h.doors).buildProtocol(CLIENT_ADDRESS)
        self.client = TLSLikeTransport(peerAddress=CLIENT_ADDRESS)
        self.door.makeConnection(self.client)

    def test_after_a_refusal(self) -> None:
        self.door.dataReceived(request(extra="X-Big: " + "a" * MAX_REQUEST_HEAD + "\r\n"))
        self.assertIn(b" 431 ", self.client.value())
        self.assertTrue(self.client.closed)

    def test_after_an_answer_that_closes(self) -> None:
        self.door.dataReceived(request(extra="Connection: close\r\n"))
        self.h.engine.last[0].dataReceived(OK_PING)
        self.assertTrue(self.client.value().endswith(b"OK"))
        self.assertTrue(self.client.closed)

    def test_after_an_answer_until_close(self) -> None:
        self.door.dataReceived(request())
        upstream = self.h.engine.last[0]
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nall")
        upstream.connectionLost(Failure(Exception("done")))
        self.assertTrue(self.client.closed)

    def test_idle(self) -> None:
        self.h.clock.advance(120)
        self.assertTrue(self.client.closed)

    def test_after_a_splice(self) -> None:
        self.door.dataReceived(
            request("POST", "/exec/abc/start", "Connection: Upgrade\r\nUpgrade: tcp\r\n")
        )
        upstream = self.h.tree.last[0]
        upstream.dataReceived(b"HTTP/1.1 101 UPGRADED\r\nUpgrade: tcp\r\n\r\nout")
        upstream.connectionLost(Failure(Exception("done")))
        self.assertTrue(self.client.closed)


class StalledNodeTests(SynchronousTestCase):
    """A relayed request waits for a slow node, not for one that stopped answering."""

    def setUp(self) -> None:
        table = make_table(manager("node-a"), {"10.0.0.2": manager("node-b")})
        self.h = Harness(table, peers=True, nodes=True)
        self.peer = self.h.peers.endpointForURI(URI.fromBytes(b"https://10.0.0.2:9001/"))

    def forward(self) -> tuple[FrontDoor, HalfCloseTransport]:
        door, client = self.h.connect()
        door.dataReceived(request(extra="X-PortainerAgent-Target: node-b\r\n"))
        return door, client

    def answer(self, client: HalfCloseTransport) -> tuple[bytes, dict[str, str]]:
        raw = client.value()
        doc = json.loads(raw.partition(b"\r\n\r\n")[2])
        return head_lines(raw)[0], doc

    def test_a_node_that_stops_answering_gets_a_504_within_two_deadlines(self) -> None:
        _, client = self.forward()
        _, forwarded = cast(FakeEndpoint, self.peer).last
        self.h.clock.advance(5)  # no answer head within the deadline: the node is pinged
        self.assertEqual(self.h.agent.calls[0].url, b"https://10.0.0.2:9001/_ping")
        self.assertEqual(client.value(), b"")
        self.h.clock.advance(5)  # nor an answer to the ping
        line, doc = self.answer(client)
        self.assertEqual(line, b"HTTP/1.1 504 Gateway Timeout")
        self.assertEqual(doc["message"], "Unable to reach the agent of node node-b")
        self.assertIn("nor to a ping: not answering since", doc["details"])
        self.assertTrue(cast(TLSLikeTransport, forwarded).closed)
        self.assertTrue(client.disconnecting)
        self.assertEqual(self.h.count("forwarded", "5xx"), 1)

    def test_then_a_forward_to_it_fails_at_once_naming_it(self) -> None:
        self.forward()
        self.h.clock.advance(5)
        self.h.clock.advance(5)
        sent = len(cast(FakeEndpoint, self.peer).connections)
        _, client = self.forward()
        line, doc = self.answer(client)
        self.assertEqual(line, b"HTTP/1.1 502 Bad Gateway")
        self.assertIn(b"X-SwarmAgent-Missing-Nodes: node-b", head_lines(client.value()))
        self.assertEqual(doc["message"], "Unable to reach the agent of node node-b")
        self.assertIn("Not answering since", doc["details"])
        self.assertEqual(len(cast(FakeEndpoint, self.peer).connections), sent)  # not sent

    def test_a_slow_answer_from_a_node_that_pings_is_waited_for(self) -> None:
        _, client = self.forward()
        for round in range(3):
            self.h.clock.advance(5)
            ping = self.h.agent.calls[-1]
            self.assertEqual(ping.url, b"https://10.0.0.2:9001/_ping", round)
            pong = ping.respond(200)
            pong.deliver(b"OK")
            pong.end()
        cast(FakeEndpoint, self.peer).last[0].dataReceived(OK_PING)
        raw = client.value()
        self.assertEqual(head_lines(raw)[0], b"HTTP/1.1 200 OK")
        self.assertTrue(raw.endswith(b"\r\n\r\nOK"))
        self.assertEqual(self.h.nodes.silences(), {})

    def test_once_the_head_came_no_bound(self) -> None:
        _, client = self.forward()
        upstream, transport = cast(FakeEndpoint, self.peer).last
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.h.clock.advance(60)
        self.assertEqual(self.h.agent.calls, [])
        self.assertFalse(transport.disconnecting)
        self.assertEqual(head_lines(client.value())[0], b"HTTP/1.1 200 OK")

    def test_each_request_of_a_connection_has_a_whole_deadline(self) -> None:
        door, _ = self.forward()
        self.h.clock.advance(4)
        cast(FakeEndpoint, self.peer).last[0].dataReceived(OK_PING)
        door.dataReceived(request(extra="X-PortainerAgent-Target: node-b\r\n"))
        self.assertEqual(len(cast(FakeEndpoint, self.peer).connections), 1)  # kept, reused
        self.h.clock.advance(4)  # 8 s after the first, 4 after the second: not late
        self.assertEqual(self.h.agent.calls, [])
        self.h.clock.advance(1)
        self.assertEqual(self.h.agent.calls[0].url, b"https://10.0.0.2:9001/_ping")

    def test_the_engine_is_bounded_too(self) -> None:
        door, client = self.h.connect()
        door.dataReceived(request(extra="X-PortainerAgent-Target: node-a\r\n"))
        _, transport = self.h.engine.last
        self.h.clock.advance(5)
        self.h.clock.advance(5)
        line, doc = self.answer(client)
        self.assertEqual(line, b"HTTP/1.1 504 Gateway Timeout")
        self.assertEqual(doc["message"], "Unable to reach the Docker engine")
        self.assertIn("nor to a ping", doc["details"])
        self.assertTrue(cast(TLSLikeTransport, transport).closed)


class VouchTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        for cert in (ClientCert(), ClientCert(untrusted=True), ClientCert(subject="CN=a,O=ü é")):
            leaf = _Recorder()
            site = InternalSite(leaf, reactor=MemoryReactorClock())
            channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
            assert channel is not None
            channel.makeConnection(HalfCloseTransport())
            lines = b"".join(n + b": " + v + b"\r\n" for n, v in vouch(CLIENT_ADDRESS, cert))
            channel.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n" + lines + b"\r\n")
            [req] = leaf.seen
            self.assertEqual(IClientCert(req), cert)
            self.assertEqual(req.getClientAddress(), CLIENT_ADDRESS)
            self.assertFalse(req.requestHeaders.hasHeader(CLIENT))
            self.assertFalse(req.requestHeaders.hasHeader(CERT))


class _Recorder(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Request] = []

    def render(self, request: Request) -> bytes:
        self.seen.append(request)
        return b""


class _Engine(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        body = request.content.read() if request.content is not None else b""
        return json.dumps(
            {
                "path": request.uri.decode(),
                "host": (request.getHeader(b"host") or b"").decode(),
                "body": body.decode(),
            }
        ).encode()


class _Tree(Resource):
    isLeaf = True

    def __init__(self, engine: IStreamClientEndpoint) -> None:
        super().__init__()
        self._engine = engine

    def render(self, request: Request) -> bytes | int:
        # As the proxy did before it asked for "Connection: upgrade" too (any
        # Upgrade header): the front door must not rely on the tree agreeing.
        if request.requestHeaders.hasHeader(b"upgrade"):
            # The connection taken over, spliced to the engine.
            return hijack(request, self._engine, Headers(), (), "the engine")
        cert = cast(ClientCert, IClientCert(request))
        return json.dumps({"tree": request.uri.decode(), "cert": cert.subject}).encode()


class LoopbackTests(TestCase):
    """A front door on the real reactor, in front of a twisted.web engine and the tree."""

    async def _front(self) -> bytes:
        """Listen: the engine, then the front door; its URL."""
        reactor = cast(IAgentReactor, global_reactor)
        engine_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            # No idle timers: this test's connections close as it ends.
            Site(_Engine(), timeout=None)
        )
        self.addCleanup(engine_port.stopListening)
        engine_address = cast(IPv4Address, engine_port.getHost())
        engine_endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", engine_address.port)
        engine = UpstreamPool(engine_endpoint, reactor)
        site = InternalSite(_Tree(engine_endpoint), timeout=None)
        tree = UpstreamPool(InternalEndpoint(reactor, site), reactor)
        self.addCleanup(engine.close)
        self.addCleanup(tree.close)
        authorizer = Authorizer(Verifier(SECRET), None)
        doors = Doors(
            engine=engine,
            internal=tree,
            authorizer=authorizer,
            table=make_table(standalone("node-a")),
            requests=RequestLog(Metrics(), reactor, authorizer.who),
            clock=reactor,
            own=OWN.__contains__,
        )
        front = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            FrontDoorFactory(doors)
        )
        self.addCleanup(front.stopListening)
        return b"http://127.0.0.1:%d" % cast(IPv4Address, front.getHost()).port

    async def _call(
        self, url: bytes, method: bytes = b"GET", body: bytes = b"", extra: Headers | None = None
    ) -> tuple[int, bytes]:
        pool = HTTPConnectionPool(global_reactor, persistent=False)
        agent = Agent(global_reactor, pool=pool)
        headers = Headers({k: [v] for k, v in SIGNED.items()})
        for name, values in (extra or Headers()).getAllRawHeaders():
            headers.setRawHeaders(name, values)
        producer = FileBodyProducer(BytesIO(body)) if body else None
        response = await agent.request(method, url, headers, producer)
        content: bytes = await readBody(response)
        return response.code, content

    async def test_engine_and_tree(self) -> None:
        url = await self._front()
        code, body = await self._call(url + b"/v1.41/containers/json?all=1")
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body)["path"], "/v1.41/containers/json?all=1")
        self.assertEqual(json.loads(body)["host"], "docker")
        code, body = await self._call(url + b"/containers/create", b"POST", b'{"Image": "x"}')
        self.assertEqual(json.loads(body)["body"], '{"Image": "x"}')
        code, body = await self._call(url + b"/swarmagent/status")
        self.assertEqual(json.loads(body), {"tree": "/swarmagent/status", "cert": None})

    async def test_a_refused_tunnel_is_not_the_next_clients(self) -> None:
        """Found by bench.fuzz (bytes mode: ``/ping`` answered 404). The tree
        takes a request with an ``Upgrade`` header over as a tunnel whatever
        its ``Connection`` header says; llhttp reads an upgrade only with
        ``Connection: upgrade``. The engine refused the upgrade, and the tree's
        connection, a splice to the engine from then on, went back to the
        pool: the next client's request, any client's, reached the engine.
        (The tree now reads upgrades as llhttp does; this tree still does not.)"""
        url = await self._front()
        code, body = await self._call(
            url + b"/exec/abc/start", b"POST", extra=Headers({b"Upgrade": [b"tcp"]})
        )
        self.assertEqual((code, json.loads(body)["path"]), (200, "/exec/abc/start"))
        code, body = await self._call(url + b"/swarmagent/status")
        self.assertEqual(json.loads(body), {"tree": "/swarmagent/status", "cert": None})


class PoolTests(SynchronousTestCase):
    def answered(self) -> tuple[Harness, FrontDoor, Upstream, HalfCloseTransport]:
        """A client whose first request was answered: its upstream now idle in the pool."""
        h = Harness()
        door, _ = h.connect()
        door.dataReceived(request())
        upstream, transport = h.engine.last
        upstream.dataReceived(OK_PING)
        return h, door, upstream, transport

    def test_idle_connection_expires(self) -> None:
        h, door, upstream, transport = self.answered()
        h.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        h.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        # Out of the pool at once: the next request opens another.
        door.dataReceived(request())
        self.assertEqual(len(h.engine.connections), 2)
        # Its close, once done, finds its timer spent (it raised AlreadyCalled).
        upstream.connectionLost(Failure(Exception("closed")))
        self.assertEqual(h.engine.last[0].door, door)

    def test_expiry_counts_from_the_last_use(self) -> None:
        h, door, upstream, transport = self.answered()
        h.clock.advance(50)
        door.dataReceived(request())
        h.clock.advance(20)  # in use when its first idle minute ends
        upstream.dataReceived(OK_PING)
        self.assertEqual(len(h.engine.connections), 1)
        h.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        h.clock.advance(1)
        self.assertTrue(transport.disconnecting)
