"""Hijacked connections: ``attach`` and ``exec`` start with ``Upgrade: tcp``.

The engine answers such a request with ``101 UPGRADED`` and then speaks raw
bytes both ways on the same connection, with half-close meaning "stdin ended".
twisted.web has no upgrade support, so the agent takes the client's connection
away from the HTTP channel (as autobahn's ``WebSocketResource`` does), replays
the request on a fresh connection upstream (its side an ``UpgradeClient``),
and splices the two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol as TypingProtocol
from typing import cast

from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from swarmagent.access import taken_over
from swarmagent.errors import error_body
from swarmagent.logs import logger
from swarmagent.metrics import Metrics
from swarmagent.twisted_types import StreamTransport, request_body, stream_transport
from swarmagent.upgrade import Answer, UpgradeClient, upgrade_request

log = logger(__name__)

# The upgrades the agent passes through: Docker's raw stream, and WebSocket
# (a console forwarded to the agent that serves it, or the engine's own
# ``attach/ws``), spliced the same way since the far end speaks the protocol.
UPGRADES = (b"tcp", b"websocket")


def _tokens(request: Request, name: bytes) -> list[bytes]:
    values = b",".join(request.requestHeaders.getRawHeaders(name, [])).lower()
    return [t.strip() for t in values.split(b",")]


def _upgrade(request: Request) -> bytes | None:
    # Only with "Connection: upgrade", as llhttp (the front door) reads an
    # upgrade: the two must agree on which connections stop being HTTP.
    if b"upgrade" not in _tokens(request, b"connection"):
        return None
    tokens = _tokens(request, b"upgrade")
    return next((u for u in UPGRADES if u in tokens), None)


def wants_upgrade(request: Request) -> bool:
    """True for a request asking to turn its connection into a raw stream."""
    return _upgrade(request) is not None


def error_response(
    code: int, reason: bytes, body: bytes, extra: tuple[tuple[bytes, bytes], ...]
) -> bytes:
    """A whole HTTP/1.1 error answer, written on a connection already taken over."""
    head = [b"HTTP/1.1 %d %s" % (code, reason), b"Content-Type: application/json"]
    head += [n + b": " + v for n, v in extra]
    head += [b"Content-Length: %d" % len(body), b"Connection: close"]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class Tunnel:
    """Two connections spliced: the client's, taken from twisted.web, and the upstream's."""

    def __init__(
        self,
        client: StreamTransport,
        request: bytes,
        extra_headers: tuple[tuple[bytes, bytes], ...],
        metrics: Metrics | None = None,
    ) -> None:
        self.client = client
        self.request = request
        self._extra = extra_headers
        self.upstream: StreamTransport | None = None
        self._early: list[bytes] = []
        #: The upstream answered other than 101: the connection is HTTP still,
        #: and what the client sends after is not for the upstream to read.
        self._refused = False
        self._client_eof = False
        self.closed = False
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.stream_opened("tunnel")
        self._counted = True
        #: Told the status the client got (0: none), once the upstream answers or fails.
        self.answered: Callable[[int], object] = lambda code: None

    def ended(self) -> None:
        """One side closed: the tunnel no longer counts as open."""
        if self._counted:
            self._counted = False
            self.metrics.stream_closed("tunnel")
            self.answered(0)

    # client side
    def from_client(self, data: bytes) -> None:
        if self._refused:
            return
        self.metrics.relayed_bytes("tunnel", len(data))
        if self.upstream is None:
            self._early.append(data)
        else:
            self.upstream.write(data)

    def client_eof(self) -> None:
        self._client_eof = True
        if self.upstream is not None:
            self.upstream.loseWriteConnection()

    def client_gone(self) -> None:
        self.closed = True
        self.ended()
        if self.upstream is not None:
            self.upstream.loseConnection()

    # upstream side
    def upstream_connected(self, transport: StreamTransport) -> None:
        """The request is sent: what the client sent since follows."""
        self.upstream = transport
        for data in self._early:
            transport.write(data)
        self._early = []
        if self._client_eof:
            transport.loseWriteConnection()
        # Each side is the other's producer: a slow reader pauses the writer.
        self.client.registerProducer(transport, True)
        transport.registerProducer(self.client, True)

    def upstream_answered(self, answer: Answer) -> None:
        """Pass the upstream's answer head on, whatever its status, marked as the agent's.

        A refusal (not 101) ends the connection once its answer is read: the
        client's next request must not reach the upstream unrouted.
        """
        line, _, rest = answer.raw.partition(b"\r\n")
        status = line.split(b" ", 2)[1:2]
        code = int(status[0]) if status and status[0].isdigit() else 0
        self.answered(code)
        extra = self._extra
        if code != 101:
            self._refused = True
            kept = [h for h in rest.split(b"\r\n") if not h.lower().startswith(b"connection:")]
            rest = b"\r\n".join(kept)
            extra += ((b"Connection", b"close"),)
        marks = b"".join(n + b": " + v + b"\r\n" for n, v in extra)
        self.client.write(line + b"\r\n" + marks + rest)

    def upstream_failed(self, reason: Failure, what: str) -> None:
        log.warn("{what}: {why}", what=what, why=reason.getErrorMessage())
        body = error_body(what, reason.getErrorMessage())
        self.answered(502)
        self.client.write(error_response(502, b"Bad Gateway", body, self._extra))
        self.client.loseConnection()


@implementer(IHalfCloseableProtocol)
class _ClientSide(Protocol):
    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def dataReceived(self, data: bytes) -> None:
        self.tunnel.from_client(data)

    def readConnectionLost(self) -> None:
        self.tunnel.client_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.tunnel.client_gone()


@implementer(IHalfCloseableProtocol)
class _UpstreamSide(UpgradeClient):
    def __init__(self, tunnel: Tunnel) -> None:
        super().__init__(tunnel.request)
        self.tunnel = tunnel

    def connectionMade(self) -> None:
        assert self.transport is not None
        # The client may have left while this connection was being made.
        if self.tunnel.closed:
            self.transport.loseConnection()
            return
        super().connectionMade()
        self.tunnel.upstream_connected(stream_transport(self.transport))

    def answerReceived(self, answer: Answer) -> None:
        self.tunnel.upstream_answered(answer)

    def streamReceived(self, data: bytes) -> None:
        self.tunnel.metrics.relayed_bytes("tunnel", len(data))
        self.tunnel.client.write(data)

    def readConnectionLost(self) -> None:
        # The upstream finished writing (the process's output ended): pass
        # the half-close on, the client may still be sending.
        self.tunnel.client.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Also when no usable answer head came: the client gets none either.
        super().connectionLost(reason)
        self.tunnel.ended()
        self.tunnel.client.loseConnection()


class _Delivers(TypingProtocol):
    """A bare transport (TCP's): what it reads goes to its ``protocol``."""

    protocol: IProtocol


def take_over(request: Request, tunnel_for: Callable[[StreamTransport], Tunnel]) -> Tunnel:
    """Detach the client's connection from twisted.web and hand it to a tunnel."""
    channel = request.channel
    transport = stream_transport(channel.transport)  # the listener's HalfCloseTLS
    channel.transport = None
    transport.unregisterProducer()
    tunnel: Tunnel = tunnel_for(transport)
    client_side = _ClientSide(tunnel)
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = client_side
    else:
        cast(_Delivers, transport).protocol = client_side
    client_side.makeConnection(transport)
    # Served after a wait (the container's node looked up first), the
    # channel may hold bytes the client sent after its request: the stream's.
    early = getattr(channel, "_dataBuffer", None)
    if early:
        channel._dataBuffer = []
        data = b"".join(early)
        tunnel.from_client(data)
        # Past this size the channel paused the transport until it could read
        # again, which it never will now: the tunnel reads instead.
        if len(data) > getattr(channel, "_optimisticEagerReadSize", len(data)):
            transport.resumeProducing()
    return tunnel


def hijack(
    request: Request,
    endpoint: IStreamClientEndpoint,
    headers: Headers,
    extra_headers: tuple[tuple[bytes, bytes], ...],
    what: str,
    metrics: Metrics | None = None,
) -> int:
    """Serve an upgrade request by splicing the client to ``endpoint``."""
    content = request_body(request)
    body = b""
    if content is not None:
        content.seek(0)
        body = content.read()
    fields = [(name, v) for name, values in headers.getAllRawHeaders() for v in values]
    sent = upgrade_request(request.method, request.uri, fields, _upgrade(request) or b"tcp", body)
    tunnel = take_over(request, lambda transport: Tunnel(transport, sent, extra_headers, metrics))
    tunnel.answered = lambda code: taken_over(request, code)
    factory = Factory.forProtocol(lambda: _UpstreamSide(tunnel))
    factory.noisy = False
    d = endpoint.connect(factory)
    d.addErrback(tunnel.upstream_failed, what)
    return NOT_DONE_YET
