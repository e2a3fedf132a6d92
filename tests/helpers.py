"""Fakes shared by the unit tests.

In-memory ones (no sockets, no engine, no real reactor), and a TLS server
factory for the tests that do listen on loopback.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from swarmagent.peers import MANAGER, WORKER, NodeIdentity, Peer, PeerTable
from swarmagent.twisted_types import IAgentReactor

AGENT_PORT = 9001
CLIENT = IPv4Address("TCP", "10.9.9.9", 40000)


# --- nodes and tables ------------------------------------------------------


def manager(name: str, node_id: str = "", *, leader: bool = False) -> NodeIdentity:
    """A manager node's identity; its node ID defaults to ``id-<name>``."""
    return NodeIdentity(name, node_id or f"id-{name}", MANAGER, leader, "27.0.0")


def worker(name: str, node_id: str = "") -> NodeIdentity:
    """A worker node's identity; its node ID defaults to ``id-<name>``."""
    return NodeIdentity(name, node_id or f"id-{name}", WORKER, False, "27.0.0")


def standalone(name: str) -> NodeIdentity:
    """An engine outside any swarm."""
    return NodeIdentity(name)


def make_table(
    me: NodeIdentity,
    others: Mapping[str, NodeIdentity] | None = None,
    *,
    address: str = "10.0.0.1",
    max_failures: int = 3,
) -> PeerTable:
    """A table for ``me`` at ``address`` that has seen ``others`` (by address)."""
    table = PeerTable(Peer(address, AGENT_PORT, me, is_self=True), max_failures=max_failures)
    for peer_address, identity in (others or {}).items():
        table.seen(peer_address, AGENT_PORT, identity)
    return table


# --- DNS -------------------------------------------------------------------


def a_record(name: str, address: str) -> dns.RRHeader:
    return dns.RRHeader(name=name.encode(), type=dns.A, payload=dns.Record_A(address))


def aaaa_record(name: str, address: str) -> dns.RRHeader:
    return dns.RRHeader(name=name.encode(), type=dns.AAAA, payload=dns.Record_AAAA(address))


def srv_record(name: str, target: str, port: int) -> dns.RRHeader:
    return dns.RRHeader(
        name=name.encode(), type=dns.SRV, payload=dns.Record_SRV(0, 0, port, target.encode())
    )


class StubResolver(ResolverBase):
    """A twisted.names resolver over fixed answers.

    ``names`` maps a name to its addresses (IPv4 and IPv6 mixed); ``srv``
    maps an SRV name to its answers and additional records. A name in
    ``broken`` fails as a server failure would; any other unknown name is
    NXDOMAIN. ``queries`` records every lookup as (type, name).
    """

    def __init__(self) -> None:
        super().__init__()
        self.names: dict[str, list[str]] = {}
        self.srv: dict[str, tuple[list[dns.RRHeader], list[dns.RRHeader]]] = {}
        self.broken: set[str] = set()
        self.queries: list[tuple[str, str]] = []

    def _answer(self, name: str, records: list[dns.RRHeader]) -> Deferred[Any]:
        if name in self.broken:
            return fail(dns.DNSQueryTimeoutError(name))
        return succeed((records, [], []))

    def _known(self, name: str) -> bool:
        return name in self.names or name in self.broken

    def lookupAddress(self, name: str, timeout: Any = None) -> Deferred[Any]:
        self.queries.append(("A", name))
        if not self._known(name):
            return fail(DNSNameError(name))
        return self._answer(
            name, [a_record(name, a) for a in self.names.get(name, []) if ":" not in a]
        )

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> Deferred[Any]:
        self.queries.append(("AAAA", name))
        if not self._known(name):
            return fail(DNSNameError(name))
        return self._answer(
            name, [aaaa_record(name, a) for a in self.names.get(name, []) if ":" in a]
        )

    def lookupService(self, name: str, timeout: Any = None) -> Deferred[Any]:
        self.queries.append(("SRV", name))
        if name in self.broken:
            return fail(dns.DNSQueryTimeoutError(name))
        if name not in self.srv:
            return fail(DNSNameError(name))
        answers, additional = self.srv[name]
        return succeed((answers, [], additional))


# --- a fake engine, served over treq.testing.RequestTraversalAgent -----------


class FakeEngineResource(Resource):
    """The few engine endpoints the agent reads about its own node."""

    isLeaf = True

    def __init__(self, identity: NodeIdentity, containers: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.identity = identity
        self.containers = dict(containers or {})  # container ID → service label
        # The swarm's node list (``GET /nodes``); None: answered 503 as a
        # worker's engine does.
        self.nodes: list[dict[str, Any]] | None = None
        self.down = False
        self.paths: list[bytes] = []

    def render_GET(self, request: Request) -> bytes:
        self.paths.append(request.path)
        if self.down:
            request.setResponseCode(500)
            return b'{"message":"engine is down"}'
        me = self.identity
        if request.path == b"/info":
            swarm: dict[str, object] = {
                "NodeID": me.node_id,
                "LocalNodeState": "active" if me.swarm else "inactive",
                "ControlAvailable": me.swarm and me.role == MANAGER,
            }
            return _json({"Name": me.name, "ServerVersion": me.engine_version, "Swarm": swarm})
        if request.path == b"/nodes":
            if self.nodes is None:
                request.setResponseCode(503)
                return b'{"message":"This node is not a swarm manager."}'
            return _json(self.nodes)
        if request.path == f"/nodes/{me.node_id}".encode():
            return _json({"ID": me.node_id, "ManagerStatus": {"Leader": me.leader}})
        for container, service in self.containers.items():
            if request.path == f"/containers/{container}/json".encode():
                labels = {"com.docker.swarm.service.name": service} if service else {}
                return _json({"Id": container, "Config": {"Labels": labels}})
        request.setResponseCode(404)
        return b'{"message":"no such object"}'


def node_doc(identity: NodeIdentity, availability: str = "active") -> dict[str, Any]:
    """A node as the engine's ``GET /nodes`` lists it."""
    return {
        "ID": identity.node_id,
        "Description": {"Hostname": identity.name},
        "Spec": {"Role": identity.role, "Availability": availability},
        "Status": {"State": "ready"},
    }


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# --- fake nodes for fan-out (one resource per node, dispatched by Host) -------


@dataclass
class Seen:
    """One request a fake node received."""

    uri: bytes
    headers: Headers


class FakeNode(Resource):
    """A node's engine (or agent) answering list requests.

    ``answer`` is a JSON document (bytes: the body as they are), or None to
    never answer; ``code`` is the status to answer with.
    """

    isLeaf = True

    def __init__(self, answer: Any = None, code: int = 200) -> None:
        super().__init__()
        self.answer = answer
        self.code = code
        self.seen: list[Seen] = []
        self.hanging: list[Request] = []

    def render_GET(self, request: Request) -> Any:
        self.seen.append(Seen(request.uri, request.requestHeaders))
        if self.answer is None:
            self.hanging.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        return self.answer if isinstance(self.answer, bytes) else _json(self.answer)


class ByHost(Resource):
    """Dispatches to a resource by the request's Host header."""

    isLeaf = True

    def __init__(self, hosts: Mapping[bytes, Resource]) -> None:
        super().__init__()
        self.hosts = hosts

    def render(self, request: Request) -> Any:
        node = self.hosts.get(request.getHeader(b"host") or b"")
        if node is None:  # no one there: the connection drops unanswered
            request.loseConnection()
            return NOT_DONE_YET
        return node.render(request)


# --- an HTTP client talking to a Site over a StringTransport -------------------


@dataclass
class Response:
    """An HTTP response as the client's transport received it."""

    code: int
    headers: dict[str, list[str]]
    body: bytes
    complete: bool

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(raw: bytes) -> Response:
    """Parse what a server wrote so far: status, headers, the (de-chunked) body."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"no complete response head in {raw!r}")
    lines = head.decode("latin-1").split("\r\n")
    code = int(lines[0].split(" ")[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if headers.get("transfer-encoding") == ["chunked"]:
        body, complete = b"", False
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                complete = True
                break
            body, rest = body + rest[:size], rest[size + 2 :]
        return Response(code, headers, body, complete)
    length = int(headers.get("content-length", ["0"])[0])
    return Response(code, headers, rest[:length], len(rest) >= length)


class ClientTransport(StringTransport):
    """A client connection's transport: like TCP's, it hands what it reads to
    its ``protocol``, which a tunnel sets when it takes the connection over."""

    protocol: IProtocol | None = None


class HalfCloseTransport(StringTransport):
    """A StringTransport that half-closes too, as TCP's and TLS's transports do."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class Client:
    """One client connection to a Site, driven by hand."""

    def __init__(self, site: Site) -> None:
        self.transport = ClientTransport(peerAddress=CLIENT)
        self.channel = site.buildProtocol(CLIENT)
        self.channel.makeConnection(self.transport)

    def send(
        self,
        method: str,
        uri: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Client:
        lines = [f"{method} {uri} HTTP/1.1", "Host: agent.test"]
        lines += [f"{n}: {v}" for n, v in headers]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        self.channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        return self

    @property
    def raw(self) -> bytes:
        written: bytes = self.transport.value()  # StringTransport.value is untyped
        return written

    def response(self) -> Response:
        return parse_response(self.raw)

    @property
    def producer(self) -> IPushProducer | None:
        """The producer registered on the client's transport, if any."""
        # StringTransport declares ``producer = None``, which reads as always None.
        return cast("IPushProducer | None", self.transport.producer)

    def pause(self) -> None:
        """The client reads slowly: its transport's buffer is full."""
        producer = self.producer
        assert producer is not None
        producer.pauseProducing()

    def resume(self) -> None:
        producer = self.producer
        assert producer is not None
        producer.resumeProducing()

    def disconnect(self) -> None:
        """The client goes away, as a TCP transport reports it: the producer
        registered on the transport is stopped, then the protocol told."""
        producer = self.producer
        if producer is not None:
            producer.stopProducing()
        self.channel.connectionLost(Failure(ConnectionDone()))


def make_site(resource: IResource, clock: MemoryReactorClock | None = None) -> Site:
    return Site(resource, reactor=clock or MemoryReactorClock())


# --- a fake IAgent for the streaming relay -----------------------------------


@implementer(IResponse)
class FakeResponse:
    """An upstream response whose body the test delivers piece by piece."""

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(
        self, code: int, headers: Headers, phrase: bytes = b"OK", length: object = UNKNOWN_LENGTH
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = headers
        #: The body's length as twisted.web's client gives it: from the
        #: Content-Length header, which it takes out of ``headers``.
        self.length = length
        self.protocol: Protocol | None = None
        # The upstream connection, as the body protocol's transport: a producer.
        self.transport = StringTransport()

    def deliverBody(self, protocol: Protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def setPreviousResponse(self, response: IResponse) -> None:
        raise NotImplementedError

    def deliver(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.dataReceived(data)

    def end(self) -> None:
        assert self.protocol is not None
        self.protocol.connectionLost(Failure(ResponseDone()))

    def broken(self) -> None:
        assert self.protocol is not None
        self.protocol.connectionLost(Failure(ConnectionLost("upstream died")))


@dataclass
class UpstreamCall:
    """One request the relay sent upstream."""

    method: bytes
    url: bytes
    headers: Headers
    body: IBodyProducer | None
    result: Deferred[IResponse]
    cancelled: bool = False

    def respond(
        self,
        code: int = 200,
        headers: Mapping[bytes, list[bytes]] | None = None,
        phrase: bytes = b"OK",
        length: object = UNKNOWN_LENGTH,
    ) -> FakeResponse:
        response = FakeResponse(code, Headers(dict(headers or {})), phrase, length)
        self.result.callback(response)
        return response

    def header(self, name: bytes) -> Sequence[bytes] | None:
        return self.headers.getRawHeaders(name)


@implementer(IAgent)
class FakeAgent:
    """Records each request; the test answers it through its UpstreamCall."""

    def __init__(self) -> None:
        self.calls: list[UpstreamCall] = []

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        def cancel(d: Deferred[IResponse]) -> None:
            call.cancelled = True

        call = UpstreamCall(method, uri, headers or Headers(), bodyProducer, Deferred(cancel))
        self.calls.append(call)
        return call.result


@dataclass
class Collector:
    """An IConsumer gathering what a body producer writes."""

    data: list[bytes] = field(default_factory=list)

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


def body_of(producer: IBodyProducer | None, clock: MemoryReactorClock) -> bytes:
    """Everything ``producer`` writes, running its cooperator on ``clock``."""
    if producer is None:
        return b""
    collector = Collector()
    done: list[Any] = []
    producer.startProducing(collector).addBoth(done.append)
    for _ in range(1000):
        if done:
            return b"".join(collector.data)
        clock.advance(0)
    raise AssertionError("the body producer never finished")


def callable_probe(
    answers: Mapping[str, NodeIdentity | Exception],
) -> Callable[[str, int], Any]:
    """A discovery probe answering from ``answers`` (a live mapping) by address."""

    async def probe(address: str, port: int) -> NodeIdentity:
        answer = answers.get(address, ConnectionRefusedError(address))
        if isinstance(answer, Exception):
            raise answer
        return answer

    return probe


def agent_reactor(reactor: MemoryReactorClock) -> IAgentReactor:
    """``reactor`` where ``makeService`` wants the agent's reactor.

    A MemoryReactorClock runs no threads (IReactorThreads): the service keeps
    it for the disk work of browse and host-info requests, which the tests
    that build a whole service do not send.
    """
    return cast(IAgentReactor, reactor)


def observe_logs(test: SynchronousTestCase) -> EventLoggingObserver:
    """The global log's events from now until ``test`` ends.

    ``EventLoggingObserver.createWithCleanup``, for any trial test case: its
    annotation asks for the asynchronous ``TestCase``.
    """
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    test.addCleanup(globalLogPublisher.removeObserver, observer)
    return observer


def log_lines(logs: EventLoggingObserver, start: int = 0) -> list[str]:
    """The text of the events ``logs`` has seen, from the ``start``-th on."""
    return [formatEvent(event) for event in logs[start:]]


class TrackingTLSFactory(TLSMemoryBIOFactory):
    """What ``listenSSL`` builds, plus a way to wait until every connection has closed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._idle: list[Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def idle(self) -> Deferred[None]:
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d
