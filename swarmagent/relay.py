"""The front door: each request head parsed strictly, plain Docker requests relayed as bytes.

Every client connection is a :class:`FrontDoor` (under the half-closeable TLS
of :mod:`swarmagent.halfclose`). It parses request heads with ``httptools``
(llhttp, strict: CL and TE together, a duplicate Content-Length, obs-fold, a
bare LF or a bad chunk size is a 400 and a close), authorizes each request as
``AgentRoot`` does and asks :func:`~swarmagent.routing.route` where it goes.
A request for this node's engine (:class:`~swarmagent.routing.Local`) is
relayed on a pooled keep-alive connection to the engine, one for another node
(:class:`~swarmagent.routing.Forward`) on one to that node's agent: its head
rewritten as :meth:`~swarmagent.nodes.Nodes.copy` builds that node's copy,
its body as it comes; only the answer's head and framing are read, its body
bytes pass through untouched. Every other request (the agent's own routes,
lists, lookups, broadcasts, events, upgrades, refusals) goes, with who the
client is, to the twisted.web resource tree over a private socket pair
(:mod:`swarmagent.internal`): the connection stays here. An answer of ``101``
turns the connection into a raw splice both ways, half-close included.

One request is served at a time per connection, in order: pipelined requests
wait, their bodies buffered (the client is paused past :data:`QUEUE_LIMIT`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import cast
from urllib.parse import unquote

import httptools
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.http import NO_BODY_CODES
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from swarmagent.access import RequestLog
from swarmagent.auth import OPEN_PATHS, Authorizer
from swarmagent.clients import PERSISTENT_PER_HOST, peer_url
from swarmagent.eager import read_plainly, send_at_once
from swarmagent.errors import error_body
from swarmagent.internal import is_internal, vouch
from swarmagent.logs import logger
from swarmagent.metrics import Metrics
from swarmagent.nodes import Nodes
from swarmagent.peers import Peer, PeerTable
from swarmagent.proxy import HOP_BY_HOP, OWN_HEADERS
from swarmagent.routing import Forward, Local, route, strip_version
from swarmagent.signature import PUBLIC_KEY_HEADER, SIGNATURE_HEADER
from swarmagent.tls import ClientCert
from swarmagent.tunnel import error_response
from swarmagent.twisted_types import StreamTransport
from swarmagent.upgrade import MAX_HEAD
from swarmagent.wire import AGENT_HEADERS, BROADCAST, HOP, MISSING_NODES, TARGET

log = logger(__name__)

#: A request head (request line and headers) may be this long, as twisted.web allows.
MAX_REQUEST_HEAD = 16 * 1024
#: Bytes of pipelined requests buffered before the client is paused.
QUEUE_LIMIT = 1024 * 1024
#: Seconds an idle pooled upstream connection is kept.
POOL_IDLE = 60.0
#: Idle upstream connections kept, as many as twisted.web's client pool keeps:
#: with 16, each answer past the bound closed one that the next request had to
#: reconnect (a peer forward at c=64: a TLS handshake for most requests).
POOL_SIZE = PERSISTENT_PER_HOST

_KEY = PUBLIC_KEY_HEADER.lower().encode("ascii")
_SIGNATURE = SIGNATURE_HEADER.lower().encode("ascii")
_AGENT_MARKS = b"".join(n + b": " + v + b"\r\n" for n, v in AGENT_HEADERS)
_NETWORK_CREATE = "/networks/create"
#: Set anew (or dropped) on another node's copy.
_PEER_SET = frozenset(h.encode("ascii") for h in (TARGET, HOP, BROADCAST))
#: Not passed on from a relayed answer (the body passes untouched: its
#: framing headers with it).
_ANSWER_DROP = (
    HOP_BY_HOP - {b"content-length", b"transfer-encoding", b"trailer", b"host"}
) | OWN_HEADERS


def _drop(always: frozenset[bytes], fields: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """``always`` and the headers the message's ``Connection`` names."""
    connection = b",".join(v for n, v in fields if n.lower() == b"connection")
    return _with_tokens(always, connection) if connection else always


@lru_cache(maxsize=64)
def _with_tokens(always: frozenset[bytes], connection: bytes) -> frozenset[bytes]:
    # Most messages say "keep-alive" or "close": worked out once each.
    return always | {t.strip().lower() for t in connection.split(b",")}


def _push_back(
    timer: IDelayedCall | None, clock: IReactorTime, seconds: float, call: Callable[[], None]
) -> IDelayedCall:
    """``timer`` pushed back to ``seconds`` from now, or a new one if it is spent.

    A connection's timers (idle, pool expiry, answer-head deadline) are reset at
    each request: cheap in Twisted, unlike a call cancelled and another made.
    """
    if timer is not None and timer.active():
        timer.reset(seconds)
        return timer
    return clock.callLater(seconds, call)


class _TextHeaders(Mapping[str, str]):
    """A request's first header values by lower-case name, as text: each
    decoded when read (:func:`~swarmagent.routing.route` reads a few)."""

    def __init__(self, names: dict[bytes, bytes]) -> None:
        self._names = names

    def __getitem__(self, name: str) -> str:
        return self._names[name.encode("latin-1")].decode("latin-1")

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.encode("latin-1") in self._names

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        # Mapping.get would raise and catch a KeyError for each absent header.
        value = self._names.get(name.encode("latin-1"))
        return default if value is None else value.decode("latin-1")

    def __iter__(self) -> Iterator[str]:
        return (name.decode("latin-1") for name in self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass
class Exchange:
    """One request, from its head on, and what became of its answer."""

    method: bytes
    target: bytes
    version: str
    headers: list[tuple[bytes, bytes]]
    #: The first value of each header, by lower-case name.
    names: dict[bytes, bytes]
    keep_alive: bool
    upgrade: bool
    started: float
    #: Body bytes (de-chunked) not yet sent on.
    body: list[bytes] = field(default_factory=list)
    #: The whole request has been read.
    complete: bool = False
    #: Where body bytes go once the exchange is served (None: buffered).
    sink: Callable[[bytes], None] | None = None
    #: Called when the request's body has all been read.
    on_complete: Callable[[], None] | None = None
    #: The answer's status (0: none yet) and the bytes sent to the client.
    code: int = 0
    sent: int = 0
    #: Refused before serving: the whole answer to send, then close.
    refusal: bytes = b""
    #: Bytes of this exchange held in memory while it waits (its head if
    #: queued, its body until sent): counted in the connection's queue bound.
    held: int = 0
    #: Counted as an open stream (its answer relayed here).
    streaming: bool = False
    #: The nodes named missing in the answer (its X-SwarmAgent-Missing-Nodes).
    missing: bytes = b""

    def header(self, lower: bytes) -> bytes | None:
        return self.names.get(lower)

    @property
    def path(self) -> bytes:
        return self.target.partition(b"?")[0]

    @property
    def chunked(self) -> bool:
        te = self.header(b"transfer-encoding")
        return te is not None and te.rsplit(b",", 1)[-1].strip().lower() == b"chunked"


@implementer(IHalfCloseableProtocol)
class Upstream(Protocol):
    """A pooled connection upstream: sends one request at a time, reads the answer's framing.

    The answer's head is parsed (``httptools``); its body is counted down
    (Content-Length), scanned (chunked) or read until the close, and handed
    on untouched.
    """

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.door: FrontDoor | None = None
        self.reused = False
        self._buf = b""
        self._state = "idle"
        self._remaining = 0
        #: The answer being read lets the connection serve another request.
        self._keep_alive = False
        self._head_only = False
        self._parser: httptools.HttpResponseParser | None = None
        self._status = 0
        self._fields: list[tuple[bytes, bytes]] = []
        self._ended = False
        self._expired: IDelayedCall | None = None
        self._lost: list[Deferred[None]] = []

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name, value))

    def on_message_complete(self) -> None:
        self._ended = True

    def send(self, door: FrontDoor, head: bytes, head_only: bool) -> None:
        """Send a request head; the answer goes to ``door``."""
        assert self.transport is not None
        self.door = door
        self._head_only = head_only
        self._state = "head"
        self._buf = b""
        self.transport.write(head)

    def dataReceived(self, data: bytes) -> None:
        if self.door is None:
            # Nothing was asked: an idle connection that talks is broken.
            self._close()
            return
        while data and self.door is not None:
            state = self._state
            if state == "head":
                data = self._head(data)
            elif state == "length":
                take = data[: self._remaining]
                self._remaining -= len(take)
                data = data[len(take) :]
                self.door.answer_body(take)
                if self._remaining == 0:
                    # Kept only if the upstream said so ("Connection: close"
                    # after an error, say) and sent nothing more.
                    self._done(reusable=self._keep_alive and not data)
                    return
            elif state == "chunked":
                assert self._parser is not None
                try:
                    self._parser.feed_data(data)
                except httptools.HttpParserError:
                    self._broken("malformed chunked body")
                    return
                self.door.answer_body(data)
                if self._ended:
                    self._done(reusable=self._keep_alive)
                return
            elif state == "close":
                self.door.answer_body(data)
                return
            elif state == "splice":
                self.door.raw_from_upstream(data)
                return
            else:
                self._close()
                return

    def _head(self, data: bytes) -> bytes:
        """Read an answer head; what is left of ``data`` after it."""
        assert self.door is not None
        buf = self._buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self._broken("answer head too long")
            else:
                self._buf = buf
            return b""
        head, rest = buf[: end + 4], buf[end + 4 :]
        self._buf = b""
        door = self.door
        if head.startswith((b"HTTP/1.1 101 ", b"HTTP/1.1 101\r")):
            # Switching protocols: what follows is the new protocol's (llhttp
            # pauses on it, or refuses one without "Connection: upgrade").
            self._state = "splice"
            door.answer_head(head, 101, [], False, framed=True)
            door.upgraded()
            if rest:
                door.raw_from_upstream(rest)
            return b""
        self._fields = []
        self._ended = False
        self._parser = httptools.HttpResponseParser(self)
        try:
            self._parser.feed_data(head)
        except httptools.HttpParserError as e:
            self._broken(f"malformed answer head: {e}")
            return b""
        code = self._parser.get_status_code()
        keep_alive = self._keep_alive = self._parser.should_keep_alive()
        if 100 <= code < 200:
            door.interim(head)
            return rest
        names = {n.lower(): v for n, v in self._fields}
        te = names.get(b"transfer-encoding")
        length = names.get(b"content-length")
        if self._head_only or code in NO_BODY_CODES:
            door.answer_head(head, code, self._fields, keep_alive, framed=True)
            self._done(reusable=keep_alive and not rest)
            return b""
        if te is not None and te.rsplit(b",", 1)[-1].strip().lower() == b"chunked":
            self._state = "chunked"
            door.answer_head(head, code, self._fields, keep_alive, framed=True)
            return rest
        if length is not None and te is None:
            # A small answer's body is read with its head: sent with it.
            size = int(length)
            first, rest = rest[:size], rest[size:]
            self._remaining = size - len(first)
            door.answer_head(head, code, self._fields, keep_alive, framed=True, body=first)
            if self._remaining == 0:
                self._done(reusable=keep_alive and not rest)
                return b""
            self._state = "length"
            return rest
        self._state = "close"
        door.answer_head(head, code, self._fields, False, framed=False)
        return rest

    def _done(self, reusable: bool) -> None:
        door, self.door = self.door, None
        self._state = "idle"
        self._parser = None
        assert door is not None
        door.answer_done(self, reusable)

    def _broken(self, why: str) -> None:
        door, self.door = self.door, None
        self._state = "broken"
        self._close()
        if door is not None:
            door.upstream_failed(why)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionMade(self) -> None:
        if self.pool.eager:
            send_at_once(self.transport)
            read_plainly(self.transport)

    def when_lost(self) -> Deferred[None]:
        """Fires once the connection is closed."""
        d: Deferred[None] = Deferred()
        if self.transport is None:
            d.callback(None)
        else:
            self._lost.append(d)
        return d

    def idle(self, clock: IReactorTime, seconds: float) -> None:
        """Now in the pool: closed after ``seconds`` unused."""
        # One that falls due while the connection is in use does nothing.
        self._expired = _push_back(self._expired, clock, seconds, self._expire)

    def _expire(self) -> None:
        self._expired = None
        if self.door is not None:
            return
        self.pool.lost(self)
        self._close()

    def _stop_expiry(self) -> None:
        if self._expired is not None:
            self._expired.cancel()
            self._expired = None

    def readConnectionLost(self) -> None:
        # The far end is done: over HTTP, that ends the connection; in a
        # splice, it is the end of that direction only.
        if self._state == "splice" and self.door is not None:
            self.door.upstream_eof()
        else:
            self._close()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_expiry()
        self.pool.lost(self)
        self.transport = None
        lost, self._lost = self._lost, []
        for d in lost:
            d.callback(None)
        door, self.door = self.door, None
        if door is None:
            return
        if self._state == "close":
            door.answer_done(self, reusable=False)
        elif self._state == "splice":
            door.upstream_gone()
        else:
            before_head = self._state == "head"
            # A kept connection the upstream closed as it was sent a request:
            # the request may go again on a fresh one.
            retry = before_head and self.reused and not self._buf
            door.upstream_failed(reason.getErrorMessage(), before_head, retry)


class UpstreamPool:
    """Keep-alive connections to one upstream (the engine, or the resource tree)."""

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        size: int = POOL_SIZE,
        idle: float = POOL_IDLE,
        eager: bool = True,
    ) -> None:
        """``eager``: its connections send each write at once (:mod:`swarmagent.eager`)."""
        self.eager = eager
        self._endpoint = endpoint
        self._clock = clock
        self._size = size
        self._idle_seconds = idle
        self._idle: list[Upstream] = []
        self._factory = Factory.forProtocol(lambda: Upstream(self))
        self._factory.noisy = False

    def take(self) -> Upstream | None:
        """An idle connection, if one is left."""
        while self._idle:
            upstream = self._idle.pop()
            transport = upstream.transport
            if transport is not None and not getattr(transport, "disconnecting", False):
                upstream.reused = True
                return upstream
        return None

    def connect(self) -> Deferred[Upstream]:
        """A new connection."""
        d: Deferred[IProtocol] = self._endpoint.connect(self._factory)
        return d.addCallback(lambda p: cast(Upstream, p))

    def put(self, upstream: Upstream) -> None:
        """Keep ``upstream`` for a next request, or close it if enough are kept."""
        if len(self._idle) >= self._size or upstream.transport is None:
            if upstream.transport is not None:
                upstream.transport.loseConnection()
            return
        upstream.idle(self._clock, self._idle_seconds)
        self._idle.append(upstream)

    def lost(self, upstream: Upstream) -> None:
        if upstream in self._idle:
            self._idle.remove(upstream)

    def close(self) -> Deferred[list[None]]:
        """Close every idle connection; fires once they are closed."""
        idle, self._idle = self._idle, []
        closed = [upstream.when_lost() for upstream in idle]
        for upstream in idle:
            if upstream.transport is not None:
                upstream.transport.loseConnection()
        return gatherResults(closed)


class PeerPools:
    """One :class:`UpstreamPool` per other agent (by address and port)."""

    def __init__(self, endpoints: IAgentEndpointFactory, clock: IReactorTime) -> None:
        self._endpoints = endpoints
        self._clock = clock
        self._pools: dict[tuple[str, int], UpstreamPool] = {}

    def pool(self, peer: Peer) -> UpstreamPool:
        """The pool of ``peer``'s agent."""
        key = (peer.address, peer.port)
        pool = self._pools.get(key)
        if pool is None:
            uri = URI.fromBytes(peer_url(peer.address, peer.port, b"/"))
            pool = self._pools[key] = UpstreamPool(self._endpoints.endpointForURI(uri), self._clock)
        return pool

    def close(self) -> Deferred[list[list[None]]]:
        """Close every idle connection; fires once they are closed."""
        return gatherResults([pool.close() for pool in self._pools.values()])


@dataclass
class Doors:
    """What every front door shares: the upstreams and the judges."""

    engine: UpstreamPool
    internal: UpstreamPool
    authorizer: Authorizer
    table: PeerTable
    requests: RequestLog
    clock: IReactorTime
    #: Whether the resource tree answers a path (without its version) itself
    #: (AgentRoot.answers).
    own: Callable[[bytes], bool]
    #: Seconds a connection may wait for a whole request head.
    idle_timeout: float = 120.0
    #: Counts the relayed answers as streams (RequestLog counts the requests).
    metrics: Metrics = field(default_factory=Metrics)
    #: Client connections send each write at once (:mod:`swarmagent.eager`).
    eager: bool = True
    #: Connections to the other agents: a request for another node is relayed
    #: there (None: the tree forwards it).
    peers: PeerPools | None = None
    #: The nodes' lives: a request for a silent node is refused at once, and
    #: one whose answer head is overdue is given up if its node does not
    #: answer a ping (:meth:`~swarmagent.nodes.Nodes.answer_of`; None: no bound).
    nodes: Nodes | None = None


@implementer(IHalfCloseableProtocol, IPushProducer)
class FrontDoor(Protocol):
    """One client connection: requests parsed, routed, relayed in order."""

    def __init__(self, doors: Doors) -> None:
        self._doors = doors
        self._parser = httptools.HttpRequestParser(self)
        self._incoming: Exchange | None = None
        self._url = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        #: Bytes read since the last head ended (the head being read, raw).
        self._head_bytes = 0
        self._too_large = False
        self._hung_up = False
        self._queue: deque[Exchange] = deque()
        self._queued = 0
        self._current: Exchange | None = None
        self._upstream: Upstream | None = None
        #: Where the current request goes: "tree", "local" (the engine) or "forwarded".
        self._kind = "tree"
        self._peer: Peer | None = None
        self._close_after = False
        self._refused = False
        self._splice = False
        #: The parser handed over to a raw stream (an upgrade request was read).
        self._raw = False
        self._early: list[bytes] = []
        self._paused_by_queue = False
        self._paused_by_upstream = False
        self._client_paused = False
        self._cert: ClientCert | None = None
        #: The last credentials (key, signature) accepted on this connection:
        #: a client sends the same pair on each request.
        self._accepted: tuple[bytes | None, bytes | None] | None = None
        self._client: IAddress | None = None
        self._timer: IDelayedCall | None = None
        self._gone = False
        #: The exchange whose answer head is awaited from a node, within the
        #: node's deadline (:meth:`~swarmagent.nodes.Nodes.overdue`), and
        #: that node; one timer, pushed back for each exchange.
        self._awaited: Exchange | None = None
        self._awaited_node: Peer | None = None
        self._head_timer: IDelayedCall | None = None

    # connection
    def connectionMade(self) -> None:
        transport = self._transport()
        assert self.transport is not None
        self._client = self.transport.getPeer()
        transport.registerProducer(self, True)
        if self._doors.eager:
            send_at_once(self.transport)
            # Each answer's bytes into TLS at once, not at the next reactor turn.
            self._send = getattr(self.transport, "write_now", transport.write)
        else:
            self._send = transport.write
        self._arm_timer()

    def _transport(self) -> StreamTransport:
        assert self.transport is not None
        return cast(StreamTransport, self.transport)

    def _hang_up(self) -> None:
        """Close the client's connection, this door its producer no longer:
        TLS sends its close_notify (and closes) only once none is registered."""
        transport = self._transport()
        if not self._hung_up:
            self._hung_up = True
            transport.unregisterProducer()
        transport.loseConnection()

    def _arm_timer(self) -> None:
        # Counted from the end of the last answer, not reset by data: a head
        # sent a byte at a time (slowloris) gets no longer than an idle client.
        # Pushed back at each answer's end; one that falls due while a request
        # is served does nothing.
        doors = self._doors
        self._timer = _push_back(self._timer, doors.clock, doors.idle_timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._current is None:
            self._hang_up()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        self._cancel_timer()
        if self._head_timer is not None and self._head_timer.active():
            self._head_timer.cancel()
        self._head_came()
        upstream, self._upstream = self._upstream, None
        current, self._current = self._current, None
        if upstream is not None:
            upstream.door = None
            _close(upstream)
        if current is not None and not self._splice:
            self._log(current)

    # IPushProducer, for the client transport: a slow client pauses the upstream.
    def pauseProducing(self) -> None:
        self._client_paused = True
        if self._upstream is not None and self._upstream.transport is not None:
            cast(StreamTransport, self._upstream.transport).pauseProducing()

    def resumeProducing(self) -> None:
        self._client_paused = False
        if self._upstream is not None and self._upstream.transport is not None:
            cast(StreamTransport, self._upstream.transport).resumeProducing()

    def stopProducing(self) -> None:
        if self._upstream is not None:
            _close(self._upstream)

    # reading the client
    def dataReceived(self, data: bytes) -> None:
        if self._raw:
            self._raw_from_client(data)
            return
        if self._refused:
            return
        if self._incoming is None:
            self._head_bytes += len(data)  # between bodies: a head's bytes
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # The rest is the raw stream's, the upgrade request's body included.
            self._raw = True
            offset = e.args[0]
            if offset < len(data):
                self._raw_from_client(data[offset:])
        except httptools.HttpParserError as e:
            broken, self._incoming = self._incoming, None
            if broken is not None and self._drop_broken(broken):
                return
            if self._too_large:
                self._refuse_large()
            else:
                self._refuse(400, b"Bad Request", "Malformed HTTP request", str(e))
        else:
            # httptools keeps a head's line or value whole before any callback:
            # one that never ends is cut off here (its raw bytes: OWS, CRLFs).
            if self._incoming is None and self._head_bytes > 2 * MAX_REQUEST_HEAD:
                self._too_large = True
                self._refuse_large()

    def _refuse_large(self) -> None:
        self._refuse(
            431,
            b"Request Header Fields Too Large",
            "Request header fields too large",
            f"the request line and headers exceed {MAX_REQUEST_HEAD} bytes",
        )

    def _raw_from_client(self, data: bytes) -> None:
        current = self._current
        if (
            current is not None
            and current.upgrade
            and self._upstream is not None
            and self._upstream.transport is not None
        ):
            self._upstream.transport.write(data)
        else:
            self._early.append(data)

    def readConnectionLost(self) -> None:
        # The client's half-close: the end of a spliced stream's input; over
        # HTTP, the client is done.
        if self._raw and self._upstream is not None and self._upstream.transport is not None:
            cast(StreamTransport, self._upstream.transport).loseWriteConnection()
        elif self._current is None:
            self._hang_up()
        else:
            self._close_after = True

    def writeConnectionLost(self) -> None:
        pass

    def _drop_broken(self, ex: Exchange) -> bool:
        """``ex``'s body is malformed: it goes no further, as its upstream would
        wait for the rest of it for ever. Whether the connection was cut (its
        answer had begun: no 400 can follow it)."""
        if ex in self._queue:
            self._queue.remove(ex)
            return False
        if ex is not self._current:
            return False  # answered already: the 400 follows that answer
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.door = None
            _close(upstream)
        ex.sink = lambda data: None
        ex.on_complete = None
        if ex.code == 0:
            # Unanswered: the 400 is its answer (and its log line), as twisted.web's.
            self._head_came()
            self._current = None
            return False
        self._refused = True
        self._close_after = True
        self._finish()
        return True

    def _refuse(self, code: int, reason: bytes, message: str, details: str) -> None:
        """Answer a request that cannot be read (after those before it), then close."""
        self._refused = True
        now = self._doors.clock.seconds()
        ex = Exchange(b"-", b"-", "1.1", [], {}, False, False, now, complete=True)
        ex.refusal = error_response(code, reason, error_body(message, details), AGENT_HEADERS)
        ex.code = code
        self._enqueue(ex)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._fields = []
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name, value))
        self._grow(len(name) + len(value) + 2)

    def _grow(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_REQUEST_HEAD:
            self._too_large = True
            raise ValueError("request head too large")

    def on_headers_complete(self) -> None:
        self._head_bytes = 0
        parser = self._parser
        names: dict[bytes, bytes] = {}
        for name, value in self._fields:
            names.setdefault(name.lower(), value)
        ex = Exchange(
            parser.get_method(),
            self._url,
            parser.get_http_version(),
            self._fields,
            names,
            parser.should_keep_alive(),
            parser.should_upgrade(),
            self._doors.clock.seconds(),
        )
        self._incoming = ex
        self._enqueue(ex)

    def on_body(self, data: bytes) -> None:
        ex = self._incoming
        assert ex is not None
        if ex.sink is not None:
            ex.sink(data)
        else:
            ex.body.append(data)
            self._hold(ex, len(data))

    def on_message_complete(self) -> None:
        ex = self._incoming
        assert ex is not None
        self._incoming = None
        ex.complete = True
        if ex.on_complete is not None:
            ex.on_complete()

    def _enqueue(self, ex: Exchange) -> None:
        if self._current is None:
            self._serve(ex)
        else:
            self._queue.append(ex)
            self._hold(ex, self._head_size)

    def _hold(self, ex: Exchange, size: int) -> None:
        ex.held += size
        self._queued += size
        self._check_queue()

    def _let_go(self, ex: Exchange) -> None:
        """``ex``'s bytes are sent or dropped: no longer held."""
        self._queued -= ex.held
        ex.held = 0
        self._check_queue()

    def _check_queue(self) -> None:
        # Pipelined requests wait in memory: bounded.
        over = self._queued > QUEUE_LIMIT
        if over != self._paused_by_queue:
            self._paused_by_queue = over
            self._update_reading()

    def _update_reading(self) -> None:
        transport = self._transport()
        if self._paused_by_queue or self._paused_by_upstream:
            transport.pauseProducing()
        else:
            transport.resumeProducing()

    # serving
    def _serve(self, ex: Exchange) -> None:
        self._current = ex
        self._let_go(ex)
        if ex.refusal:
            self._write(ex, ex.refusal)
            self._close_after = True
            self._finish()
            return
        self._kind, self._peer = self._destination(ex)
        pool = self._pool()
        if not ex.keep_alive or ex.upgrade:
            # An upgrade not agreed to leaves a stream no parser can read.
            self._close_after = True
        nodes = self._doors.nodes
        if nodes is not None and self._kind != "tree":
            silence = nodes.silence(self._peer) if self._peer is not None else None
            if silence is not None:
                # Known silent: answered at once, as lists name it missing.
                self._give_up(ex, 502, b"Bad Gateway", silence.describe(), missing=True)
                return
            self._await_head(ex, self._peer if self._peer is not None else nodes.me)
        self._ask(pool)

    def _ask(self, pool: UpstreamPool) -> None:
        """Send the current request on an idle connection of ``pool``, else a new one."""
        upstream = pool.take()
        if upstream is not None:
            self._connected(upstream)
        else:
            pool.connect().addCallbacks(self._connected, self._connect_failed)

    def _await_head(self, ex: Exchange, node: Peer) -> None:
        """Bound the wait for ``ex``'s answer head by ``node``'s life, as
        :meth:`~swarmagent.nodes.Nodes.answer_of` bounds the tree's requests."""
        nodes = self._doors.nodes
        assert nodes is not None
        self._awaited, self._awaited_node = ex, node
        # One that falls due when no head is awaited does nothing.
        late = self._head_late
        self._head_timer = _push_back(self._head_timer, self._doors.clock, nodes.deadline, late)

    def _head_late(self) -> None:
        self._head_timer = None
        ex, node = self._awaited, self._awaited_node
        if ex is not None and node is not None and self._doors.nodes is not None:
            self._doors.nodes.overdue(node).addCallback(self._pinged, ex, node)

    def _pinged(self, why: str | None, ex: Exchange, node: Peer) -> None:
        if self._awaited is not ex or self._gone:
            return  # its head came meanwhile
        if why is None:
            self._await_head(ex, node)  # only slow: waited for again
        else:
            self._overdue(why, ex)

    def _head_came(self) -> None:
        self._awaited = self._awaited_node = None

    def _overdue(self, why: str, ex: Exchange) -> None:
        """No answer head in time, nor an answer to the node's ping: a 504."""
        if self._current is not ex or self._gone:
            return
        self._head_came()
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.door = None
            _close(upstream)
        self._give_up(ex, 504, b"Gateway Timeout", why)

    def _give_up(
        self, ex: Exchange, code: int, reason: bytes, details: str, missing: bool = False
    ) -> None:
        """Answer ``ex`` with an error about its node, then close (its body is dropped)."""
        log.warn("{upstream}: {why}", upstream=self._unreachable(), why=details)
        marks = AGENT_HEADERS
        if missing and self._peer is not None:
            ex.missing = self._peer.name.encode("utf-8")
            marks += ((MISSING_NODES, ex.missing),)
        ex.code = code
        ex.sink = lambda data: None
        ex.on_complete = None
        self._write(
            ex, error_response(code, reason, error_body(self._unreachable(), details), marks)
        )
        self._close_after = True
        self._finish()

    def _destination(self, ex: Exchange) -> tuple[str, Peer | None]:
        """Where ``ex`` goes: the engine for a plain Docker request for this node
        ("local"), another node's agent for one for it ("forwarded", when peers
        are relayed too), else the tree."""
        tree = ("tree", None)
        path = ex.path
        names = ex.names
        if ex.upgrade or not path.startswith(b"/") or b"upgrade" in names:
            return tree
        text = path.decode("latin-1")
        bare = strip_version(text).encode("latin-1")
        if bare in OPEN_PATHS or self._doors.own(bare):
            return tree
        unquoted = unquote(text)
        bare_text = strip_version(unquoted)
        segments = bare_text.split("/")
        if "." in segments or ".." in segments:
            return tree  # the tree answers 400
        credentials = (names.get(_KEY), names.get(_SIGNATURE))
        if credentials != self._accepted:
            if not self._doors.authorizer.judge(self._client_cert(), *credentials).accepted:
                return tree  # the tree refuses it, and counts it
            self._accepted = credentials
        if ex.method == b"POST" and bare_text == _NETWORK_CREATE:
            return tree  # the body says whether a manager must serve it
        decision = route(
            ex.method.decode("latin-1"),
            unquoted,
            _TextHeaders(names),
            self._doors.table,
            query=ex.target.partition(b"?")[2].decode("latin-1"),
        )
        match decision:
            case Local():
                return ("local", None)
            case Forward(peer) if self._doors.peers is not None:
                return ("forwarded", peer)
        return tree

    def _client_cert(self) -> ClientCert:
        # Once per connection, after the handshake (a request proves it is done).
        if self._cert is None:
            self._cert = self._doors.authorizer.client_cert(self.transport)
        return self._cert

    def _request_head(self, ex: Exchange) -> bytes:
        """The head sent upstream."""
        framing = self._framing(ex)
        if self._kind == "tree":
            assert self._client is not None
            client = self._client
            lines = [b"%s %s HTTP/%s" % (ex.method, ex.target, ex.version.encode("ascii"))]
            for name, value in ex.headers:
                lower = name.lower()
                if is_internal(lower) or lower in (b"content-length", b"transfer-encoding"):
                    continue
                lines.append(name + b": " + value)
            lines += [n + b": " + v for n, v in vouch(client, self._client_cert())]
            lines += framing
            return b"\r\n".join(lines) + b"\r\n\r\n"
        return self._copy_head(ex, framing)

    def _framing(self, ex: Exchange) -> list[bytes]:
        te = ex.header(b"transfer-encoding")
        if te is not None:
            return [b"Transfer-Encoding: " + te]
        length = ex.header(b"content-length")
        if length is not None:
            return [b"Content-Length: " + length]
        return []

    def _copy_head(self, ex: Exchange, framing: list[bytes]) -> bytes:
        """The head of a node's copy, as :meth:`~swarmagent.nodes.Nodes.copy` builds it.

        This node's (the engine's): end-to-end headers, none of the agents'.
        Another node's: end-to-end headers with the agents' (the client's
        credentials among them), targeted at it and hop-marked with this
        node's key, without the broadcast header.
        """
        drop = _drop(HOP_BY_HOP, ex.headers) if b"connection" in ex.names else HOP_BY_HOP
        peer = self._peer
        if peer is None:
            host = b"docker"
            agent_marks: list[bytes] = []
        else:
            drop = drop | _PEER_SET
            address = f"[{peer.address}]" if ":" in peer.address else peer.address
            host = f"{address}:{peer.port}".encode("ascii")
            agent_marks = [
                b"X-PortainerAgent-Target: " + peer.identity.key.encode("utf-8"),
                b"X-SwarmAgent-Hop: " + self._doors.table.me.identity.key.encode("utf-8"),
            ]
        lines = [
            b"%s %s HTTP/%s" % (ex.method, ex.target, ex.version.encode("ascii")),
            b"Host: " + host,
        ]
        forwarded: list[bytes] = []
        for name, value in ex.headers:
            lower = name.lower()
            if lower in drop:
                continue
            if lower.startswith((b"x-portaineragent-", b"x-swarmagent-")) and (
                peer is None or is_internal(lower)
            ):
                continue
            if lower == b"x-forwarded-for":
                forwarded.append(value)
                continue
            lines.append(name + b": " + value)
        client = getattr(self._client, "host", None)
        if client:
            forwarded.append(client.encode("ascii"))
        if forwarded:
            lines.append(b"X-Forwarded-For: " + b", ".join(forwarded))
        lines += agent_marks
        lines += framing
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _connected(self, upstream: Upstream) -> None:
        ex = self._current
        if ex is None or self._gone:
            self._pool().put(upstream)
            return
        self._upstream = upstream
        transport = cast(StreamTransport, upstream.transport)
        if self._client_paused:
            transport.pauseProducing()
        # A slow upstream pauses reading from the client.
        transport.registerProducer(_ClientReader(self), True)
        upstream.send(self, self._request_head(ex), head_only=ex.method == b"HEAD")
        if ex.upgrade:
            early, self._early = self._early, []
            for data in early:
                transport.write(data)
            return
        chunked = ex.chunked
        body, ex.body = ex.body, []
        self._let_go(ex)
        for piece in body:
            self._send_body(transport, piece, chunked)
        if ex.complete:
            if chunked:
                transport.write(b"0\r\n\r\n")
        else:
            ex.sink = lambda data: self._send_body(transport, data, chunked)
            if chunked:
                ex.on_complete = lambda: transport.write(b"0\r\n\r\n")

    @staticmethod
    def _send_body(transport: StreamTransport, data: bytes, chunked: bool) -> None:
        if chunked:
            transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            transport.write(data)

    def _connect_failed(self, reason: Failure) -> None:
        self.upstream_failed(reason.getErrorMessage(), before_head=True)

    def _pool(self) -> UpstreamPool:
        if self._kind == "local":
            return self._doors.engine
        if self._kind == "forwarded" and self._peer is not None and self._doors.peers is not None:
            return self._doors.peers.pool(self._peer)
        return self._doors.internal

    def _unreachable(self) -> str:
        if self._kind == "local":
            return "Unable to reach the Docker engine"
        if self._peer is not None:
            return f"Unable to reach the agent of node {self._peer.name}"
        return "Unable to reach the agent"

    # the answer (called by Upstream)
    def interim(self, head: bytes) -> None:
        """A 1xx answer head: on to the client as it is."""
        if self._current is not None:
            self._transport().write(head)

    def answer_head(
        self,
        head: bytes,
        code: int,
        fields: list[tuple[bytes, bytes]],
        keep_alive: bool,
        framed: bool,
        body: bytes = b"",
    ) -> None:
        """An answer's head (and ``body``, its first bytes, sent with it)."""
        ex = self._current
        if ex is None:
            return
        self._head_came()
        ex.code = code
        if code == 101:
            # The tree's tunnel (or console) answered: its head as it is.
            self._write(ex, head)
            return
        if not keep_alive or not framed:
            self._close_after = True
        tree = self._kind == "tree"
        if tree and not self._close_after:
            self._write(ex, head + body)
            return
        if not tree:
            # As twisted.web's relay counted each answer it streamed.
            ex.streaming = True
            self._doors.metrics.stream_opened("stream")
            if body:
                self._doors.metrics.relayed_bytes("stream", len(body))
        line = head[: head.find(b"\r\n") + 2]
        out = [line]
        if tree:
            drop: frozenset[bytes] | set[bytes] = {b"connection"}
        else:
            out.append(_AGENT_MARKS)
            drop = _drop(_ANSWER_DROP, fields)
        for name, value in fields:
            if name.lower() not in drop:
                out.append(name + b": " + value + b"\r\n")
        if self._close_after:
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")
        out.append(body)
        self._write(ex, b"".join(out))

    def answer_body(self, data: bytes) -> None:
        ex = self._current
        if ex is not None:
            if ex.streaming:
                self._doors.metrics.relayed_bytes("stream", len(data))
            self._write(ex, data)

    def _write(self, ex: Exchange, data: bytes) -> None:
        ex.sent += len(data)
        self._send(data)

    def answer_done(self, upstream: Upstream, reusable: bool) -> None:
        """The answer's last byte is out: the upstream may serve another request."""
        ex = self._current
        # An upgrade request's connection got the client's raw bytes after its
        # head, which the upstream reads as requests of their own: never kept.
        # Nor is one after any Upgrade header: the tree takes its connection
        # over for one (a tunnel, a console) without Connection: upgrade too,
        # and a refused tunnel goes on splicing to the engine.
        kept = (
            reusable
            and ex is not None
            and ex.complete
            and not ex.upgrade
            and ex.header(b"upgrade") is None
        )
        self._release(upstream, kept)
        if ex is not None and not ex.complete:
            # The rest of the body is read and dropped: the answer did not wait for it.
            ex.sink = lambda data: None
            ex.on_complete = None
        self._finish()

    def _release(self, upstream: Upstream, reusable: bool) -> None:
        self._upstream = None
        if upstream.transport is not None:
            cast(StreamTransport, upstream.transport).unregisterProducer()
            if self._client_paused:
                cast(StreamTransport, upstream.transport).resumeProducing()
        if self._paused_by_upstream:
            self._paused_by_upstream = False
            self._update_reading()
        pool = self._pool()
        if reusable:
            pool.put(upstream)
        elif upstream.transport is not None:
            upstream.transport.loseConnection()

    def upstream_failed(self, why: str, before_head: bool = False, retry: bool = False) -> None:
        """The upstream broke: a 502 before the answer's head, a cut connection after it.

        ``retry``: it broke before reading anything, on a kept connection; a
        request with no body is then sent again, on a fresh connection.
        """
        ex = self._current
        upstream, self._upstream = self._upstream, None
        if upstream is not None and upstream.transport is not None:
            cast(StreamTransport, upstream.transport).unregisterProducer()
        if ex is None or self._gone:
            return
        if retry and ex.code == 0 and ex.complete and not ex.upgrade and not self._framing(ex):
            self._ask(self._pool())
            return
        if before_head and ex.code == 0:
            log.warn("{upstream}: {why}", upstream=self._unreachable(), why=why)
            ex.code = 502
            body = error_body(self._unreachable(), why)
            self._write(ex, error_response(502, b"Bad Gateway", body, AGENT_HEADERS))
        else:
            log.warn("{upstream}: stream broken: {why}", upstream=self._unreachable(), why=why)
        self._close_after = True
        self._finish()

    def upgraded(self) -> None:
        """A 101: from now on the connection is a raw splice both ways."""
        self._splice = True
        self._raw = True

    def raw_from_upstream(self, data: bytes) -> None:
        self._transport().write(data)

    def upstream_eof(self) -> None:
        """The upstream's half of a splice ended: pass the half-close on."""
        self._transport().loseWriteConnection()

    def upstream_gone(self) -> None:
        self._upstream = None
        self._hang_up()

    def _finish(self) -> None:
        """The current exchange is over: log it, then the next one, or close."""
        self._head_came()
        ex, self._current = self._current, None
        if ex is not None:
            self._let_go(ex)  # a body never sent (a refusal, a 502)
            self._log(ex)
        if self._close_after:
            self._hang_up()
            return
        if self._queue:
            self._serve(self._queue.popleft())
        else:
            self._arm_timer()

    def _log(self, ex: Exchange) -> None:
        if ex.streaming:
            ex.streaming = False
            self._doors.metrics.stream_closed("stream")
        # The resource tree counts (and logs) what it serves.
        if self._kind == "tree" and not ex.refusal:
            return
        doors = self._doors

        def who() -> str:
            key = next((v for n, v in ex.headers if n.lower() == _KEY), None)
            return doors.authorizer.name(self._client_cert(), key)

        nodes: tuple[str, ...] = ()
        if ex.refusal:
            route_name = "error"
        elif self._peer is not None:
            route_name, nodes = "forwarded", (self._peer.name,)
        else:
            route_name, nodes = "local", (doors.table.me.name,)
        doors.requests.done(
            ex.method,
            ex.path,
            route_name,
            nodes,
            ex.code,
            ex.sent,
            ex.started,
            who,
            ex.missing,
        )


def _close(upstream: Upstream) -> None:
    """Close ``upstream`` now, though a client is its producer.

    A TLS transport (a peer's) waits for its producer to be unregistered
    before it sends close_notify and closes TCP: a stream the client
    abandoned would otherwise stay open upstream, the far agent streaming
    into it for as long as the stream lasts.
    """
    transport = cast("StreamTransport | None", upstream.transport)
    if transport is not None:
        transport.unregisterProducer()
        transport.loseConnection()


@implementer(IPushProducer)
class _ClientReader:
    """Registered with the upstream transport: its full buffer pauses reading the client."""

    def __init__(self, door: FrontDoor) -> None:
        self._door = door

    def pauseProducing(self) -> None:
        self._door._paused_by_upstream = True
        self._door._update_reading()

    def resumeProducing(self) -> None:
        self._door._paused_by_upstream = False
        self._door._update_reading()

    def stopProducing(self) -> None:
        pass


class FrontDoorFactory(Factory):
    """Builds a :class:`FrontDoor` per client connection."""

    noisy = False

    def __init__(self, doors: Doors) -> None:
        self.doors = doors

    def buildProtocol(self, addr: IAddress | None) -> FrontDoor:
        door = FrontDoor(self.doors)
        door.factory = self
        return door
