"""Portainer's WebSocket consoles: ``/websocket/exec`` and ``/websocket/attach``.

A console is a WebSocket (autobahn) on the client's side and a hijacked
engine connection on the other: ``POST /exec/<id>/start`` (TTY forced) or
``POST /containers/<id>/attach?stdin=1&stdout=1&stderr=1&stream=1``, with
``Upgrade: tcp``, answered ``101``. The engine is asked before the WebSocket
handshake is answered, so a refusal (no such exec, say) reaches the client as
an HTTP error, not as an open socket that closes at once.

Client messages, Text or Binary, are written raw to the engine. Engine output
goes to the client without losing a byte, unlike the reference agent (which
drops invalid UTF-8): valid UTF-8 is sent as Text frames, a multi-byte
character cut between two reads waits for its end, and only bytes that can
never be UTF-8 (binary output) go out, in their place, as Binary frames.
Portainer's terminal reads Text frames, so text output always reaches it.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Sequence

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.server import Request
from zope.interface import implementer

from swarmagent.errors import describe, error_body, write_error
from swarmagent.logs import logger
from swarmagent.metrics import Metrics
from swarmagent.routing import strip_version
from swarmagent.tunnel import error_response
from swarmagent.twisted_types import Rendered, StreamTransport, request_args, stream_transport
from swarmagent.upgrade import MAX_HEAD, Answer, UpgradeClient, upgrade_request
from swarmagent.wire import AGENT_HEADERS, CONSOLE_PATHS, HOP

log = logger(__name__)

#: Largest client message (a pasted file, say); the reference's 2048 B is too small.
MAX_MESSAGE = 1024 * 1024
#: Seconds between pings, as the reference agent; a client that misses the
#: pong deadline is gone.
PING_INTERVAL = 50.0
PING_TIMEOUT = 30.0
_HEX = re.compile(rb"[0-9a-fA-F]+")
# Bytes the decoder could not read come back as U+DC80..U+DCFF.
_ESCAPED = re.compile("([\udc80-\udcff]+)")


class Utf8Frames:
    """Cuts a byte stream into WebSocket payloads: (data, is_binary) pairs."""

    def __init__(self) -> None:
        # surrogateescape keeps every undecodable byte; the incremental
        # decoder holds an incomplete character until the next read.
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")

    def feed(self, data: bytes, final: bool = False) -> list[tuple[bytes, bool]]:
        """The payloads ``data`` completes; ``final`` flushes a cut character."""
        text = self._decoder.decode(data, final)
        out: list[tuple[bytes, bool]] = []
        for i, run in enumerate(_ESCAPED.split(text)):
            if not run:
                continue
            if i % 2:
                out.append((bytes(ord(c) - 0xDC00 for c in run), True))
            else:
                out.append((run.encode("utf-8"), False))
        return out


def engine_request(kind: str, ident: str) -> bytes:
    """The hijacking request a console sends to the engine, as the reference does."""
    if kind == "exec":
        path = f"/exec/{ident}/start"
        body = json.dumps({"Tty": True, "Detach": False}).encode()
    else:
        path = f"/containers/{ident}/attach?stdin=1&stdout=1&stderr=1&stream=1"
        body = b""
    headers = [(b"Content-Type", b"application/json")]
    return upgrade_request(b"POST", path.encode("ascii"), headers, b"tcp", body)


class EngineRefused(Exception):
    """The engine did not switch protocols."""

    def __init__(self, code: int, body: bytes) -> None:
        super().__init__(f"engine answered {code}")
        self.code = code
        self.body = body


class _EngineSide(UpgradeClient):
    """The engine's end of a console: the upgrade, then raw bytes."""

    def __init__(self, console: ConsoleProtocol, request: bytes) -> None:
        super().__init__(request)
        self.console = console
        self.ready: Deferred[None] = Deferred()
        # A refusal: its status, declared length and body so far.
        self._code = 0
        self._length: int | None = None
        self._body = b""

    def answerReceived(self, answer: Answer) -> None:
        if answer.code == 101:
            self.ready.callback(None)
            return
        self._code, self._length = answer.code, _content_length(answer.headers)
        self._read_refusal(b"")

    def streamReceived(self, data: bytes) -> None:
        if self.ready.called:
            self.console.from_engine(data)
        else:
            self._read_refusal(data)

    def _read_refusal(self, data: bytes) -> None:
        # Its body says why.
        self._body += data
        if self._length is not None and len(self._body) >= self._length:
            self._refused(self._code, self._body[: self._length])
        elif len(self._body) > MAX_HEAD:
            self._refused(self._code, self._body[:MAX_HEAD])

    def _refused(self, code: int, body: bytes) -> None:
        if not self.ready.called:
            self.ready.errback(EngineRefused(code, body))
        assert self.transport is not None
        self.transport.loseConnection()

    def headFailed(self, reason: Failure) -> None:
        if not self.ready.called:
            body = error_body("The engine sent no answer head", reason.getErrorMessage())
            self.ready.errback(EngineRefused(502, body))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if not self.ready.called:
            # A refusal cut short.
            body = self._body or error_body(
                "The engine closed the connection", reason.getErrorMessage()
            )
            self.ready.errback(EngineRefused(self._code, body))
            return
        self.console.engine_gone()


def _content_length(headers: Headers) -> int | None:
    """The last valid Content-Length of an answer, or None."""
    lengths = [v for v in headers.getRawHeaders(b"content-length", []) if v.isdigit()]
    return int(lengths[-1]) if lengths else None


class ConsoleProtocol(WebSocketServerProtocol):
    """One console: the client's WebSocket spliced to the engine's raw stream."""

    def __init__(self) -> None:
        super().__init__()
        self._engine: _EngineSide | None = None
        self._connecting: Deferred[IProtocol] | None = None
        self._utf8 = Utf8Frames()
        self._early: list[bytes] = []
        self._engine_done = False
        self._refusal: bytes | None = None
        # Whether this console counts as open in the metrics.
        self._counted = False

    # -- handshake ------------------------------------------------------------

    # autobahn waits on a Deferred (txaio.as_future); its stub says otherwise.
    def onConnect(  # type: ignore[override]
        self, request: ConnectionRequest
    ) -> Deferred[tuple[None, dict[str, str]]]:
        return Deferred.fromCoroutine(self._connect(request))

    async def _connect(self, request: ConnectionRequest) -> tuple[None, dict[str, str]]:
        # /v1.41/websocket/exec too: agent routes take a Docker version prefix.
        kind = CONSOLE_PATHS.get(strip_version(request.path).encode("utf-8"))
        ident = (request.params.get("id") or [""])[0]
        if kind is None or not _HEX.fullmatch(ident.encode("utf-8")):
            raise ConnectionDeny(400, "Invalid query parameter: id")
        engine = self._engine = _EngineSide(self, engine_request(kind, ident))
        # Declaring ``factory: ConsoleFactory`` on the class would clash with
        # Factory's protocol type (a Factory[Self]); autobahn leaves it untyped.
        console_factory: ConsoleFactory = self.factory
        endpoints = console_factory.engine_endpoints
        endpoint = endpoints.endpointForURI(URI.fromBytes(b"http://docker/"))
        factory = Factory.forProtocol(lambda: engine)
        factory.noisy = False
        self._connecting = endpoint.connect(factory)
        try:
            await self._connecting
            await engine.ready
        except EngineRefused as e:
            self._refusal = e.body
            raise ConnectionDeny(e.code, f"The engine refused the {kind}") from None
        except Exception as e:
            why = describe(e)
            self._refusal = error_body("Unable to reach the Docker engine", why)
            raise ConnectionDeny(502, "Unable to reach the Docker engine") from None
        finally:
            self._connecting = None
        # The engine may answer before the client reads the handshake: hold
        # its output until the socket is open.
        self._engine_transport().pauseProducing()
        # The agent that answers the client marks the answer; a forwarded
        # request's answer is marked by the agent that forwarded it.
        own = {} if HOP in request.headers else dict(_agent_headers())
        return None, own

    def failHandshake(
        self,
        reason: str,
        code: int = 400,
        responseHeaders: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        """Refuse as the agent refuses anything: a JSON error with the agent headers."""
        self.wasNotCleanReason = reason
        body = self._refusal or error_body(reason)
        phrase = RESPONSES.get(code, b"Error")
        self.sendData(error_response(code, phrase, body, AGENT_HEADERS))
        self.dropConnection(abort=False)
        self._close_engine()

    def onOpen(self) -> None:
        self.factory.metrics.stream_opened("console")
        self._counted = True
        transport = self._engine_transport()
        client = self._client()
        # Each side is the other's producer: a slow reader pauses the writer.
        client.registerProducer(transport, True)
        transport.registerProducer(_PauseOnly(client), True)
        early, self._early = self._early, []
        for data in early:
            self.from_engine(data)
        if self._engine_done:
            self.engine_gone()
        else:
            transport.resumeProducing()

    # -- relay ----------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.metrics.relayed_bytes("console", len(payload))
        if self._engine is not None and self._engine.transport is not None:
            self._engine.transport.write(payload)

    def from_engine(self, data: bytes) -> None:
        if self.state != self.STATE_OPEN:
            self._early.append(data)
            return
        self.factory.metrics.relayed_bytes("console", len(data))
        for payload, binary in self._utf8.feed(data):
            self.sendMessage(payload, isBinary=binary)

    def engine_gone(self) -> None:
        """The process ended (or the engine went away): end the console."""
        self._engine_done = True
        if self.state != self.STATE_OPEN:
            return
        for payload, binary in self._utf8.feed(b"", final=True):
            self.sendMessage(payload, isBinary=binary)
        self._client().unregisterProducer()
        self.sendClose(1000)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._close_engine()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if self._counted:
            self._counted = False
            self.factory.metrics.stream_closed("console")
        self._close_engine()

    def _close_engine(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._engine is not None and not self._engine.ready.called:
            ready = self._engine.ready
            # Left while still connecting: nothing awaits ``ready`` yet, and
            # its cancellation must not be logged as an unhandled error.
            ready.addErrback(lambda _: None)
            ready.cancel()
        if self._engine is not None and self._engine.transport is not None:
            self._engine.transport.loseConnection()

    def _client(self) -> StreamTransport:
        return stream_transport(self.transport)  # the listener's HalfCloseTLS

    def _engine_transport(self) -> StreamTransport:
        assert self._engine is not None and self._engine.transport is not None
        return stream_transport(self._engine.transport)  # UNIX's or TCP's


@implementer(IPushProducer)
class _PauseOnly:
    """The client's connection as the engine's producer, for pausing only.

    A transport stops its producer when it closes; the engine closing must
    not cut the client off before the last output and the close frame.
    """

    def __init__(self, transport: StreamTransport) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


def _agent_headers() -> list[tuple[str, str]]:
    return [(n.decode("ascii"), v.decode("ascii")) for n, v in AGENT_HEADERS]


class _ClockTimer:
    """autobahn's timers on the injected clock (its own go to the global reactor)."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock

    def call_later(
        self, delay: float, fun: Callable[..., object], *args: object, **kwargs: object
    ) -> IDelayedCall:
        return self._clock.callLater(delay, fun, *args, **kwargs)


class ConsoleFactory(WebSocketServerFactory):
    """Builds consoles whose engine is reached through ``engine_endpoints``."""

    protocol = ConsoleProtocol

    def __init__(
        self,
        engine_endpoints: IAgentEndpointFactory,
        reactor: IReactorTime,
        *,
        max_message: int = MAX_MESSAGE,
        ping_interval: float = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(server=None, reactor=reactor)
        self.engine_endpoints = engine_endpoints
        self.metrics = metrics if metrics is not None else Metrics()
        self.setProtocolOptions(
            maxFramePayloadSize=max_message,
            maxMessagePayloadSize=max_message,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            webStatus=False,
            # Tell a client why it is cut off (1009 for a message over the
            # limit) rather than just dropping it.
            failByDrop=False,
        )
        self._batched_timer = _ClockTimer(reactor)
        self.noisy = False


class ConsoleResource(WebSocketResource):
    """Checks a console request, then takes its connection over for the WebSocket."""

    def render(self, request: Request) -> Rendered:
        args = request_args(request)
        ident = args.get(b"id", [b""])[0]
        if not _HEX.fullmatch(ident):
            return write_error(
                request, 400, "Invalid query parameter: id", "The ID must be hexadecimal"
            )
        upgrade = b",".join(request.requestHeaders.getRawHeaders(b"upgrade", [])).lower()
        if b"websocket" not in upgrade:
            return write_error(
                request, 400, "A console is a WebSocket", "Send an Upgrade: websocket request"
            )
        # twisted.web's channel is the connection's producer; the console
        # registers its own, so the channel lets go first (as tunnel.take_over).
        stream_transport(request.channel.transport).unregisterProducer()
        rendered: Rendered = super().render(request)  # autobahn's is untyped
        return rendered
