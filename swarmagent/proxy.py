"""Relaying one request to the local engine or to another agent, streaming both ways."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Cooperator
from twisted.python.failure import Failure
from twisted.web.client import URI, FileBodyProducer, ResponseDone
from twisted.web.http import NO_BODY_CODES, PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    UNKNOWN_LENGTH,
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IResponse,
)
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from swarmagent.clientgone import watch_gone
from swarmagent.errors import describe, write_error
from swarmagent.logs import logger
from swarmagent.metrics import Metrics
from swarmagent.peers import Peer
from swarmagent.tunnel import hijack, wants_upgrade
from swarmagent.twisted_types import Rendered, request_body
from swarmagent.wire import AGENT_HEADERS, MISSING_NODES

if TYPE_CHECKING:
    # nodes.py builds each node's copy of a request with request_headers.
    from swarmagent.nodes import Nodes

log = logger(__name__)

# RFC 9110 §7.6.1; the body is re-framed on each hop, so its length and
# framing headers are the client library's to set.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
# Set by the agent that answers the client; a peer's copies would double them.
OWN_HEADERS = frozenset(name.lower() for name, _ in AGENT_HEADERS)


def _is_agent_header(name: bytes) -> bool:
    return name.startswith((b"x-portaineragent-", b"x-swarmagent-"))


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def request_headers(request: Request, *, keep_agent_headers: bool) -> Headers:
    """The end-to-end headers of a client request, for the next hop."""
    drop = HOP_BY_HOP | _connection_tokens(request.requestHeaders)
    out = Headers()
    for name, values in request.requestHeaders.getAllRawHeaders():
        lower = name.lower()
        if lower in drop or (not keep_agent_headers and _is_agent_header(lower)):
            continue
        out.setRawHeaders(name, values)
    client = request.getClientAddress()
    host = getattr(client, "host", None)
    if host:
        forwarded = b", ".join([*out.getRawHeaders(b"x-forwarded-for", []), host.encode("ascii")])
        out.setRawHeaders(b"x-forwarded-for", [forwarded])
    return out


def answer_headers(headers: Headers, *, length: bool) -> list[tuple[bytes, list[bytes]]]:
    """An upstream answer's end-to-end headers, for the client: not its hop's,
    nor its agent's own (this agent sets its own); ``length``: its
    Content-Length kept (twisted.web's client leaves it out of most)."""
    hop = HOP_BY_HOP - {b"content-length"} if length else HOP_BY_HOP
    drop = hop | OWN_HEADERS | _connection_tokens(headers)
    return [(n, list(v)) for n, v in headers.getAllRawHeaders() if n.lower() not in drop]


def response_headers(response: IResponse) -> list[tuple[bytes, list[bytes]]]:
    """The end-to-end headers of an upstream response, for the client."""
    return answer_headers(response.headers, length=True)


def body_length(method: bytes, response: IResponse) -> int | None:
    """The length of the body the client will get, when the upstream framed it by length.

    twisted.web's client takes ``Content-Length`` out of the headers (it is
    the message's framing) and leaves it in ``response.length``; without it
    again, twisted.web's server would chunk every answer. A HEAD answer
    keeps the upstream's own header (it is the entity's length, not this
    message's), and a 204 or 304 has no body to frame; chunked or
    close-delimited answers stay unknown.
    """
    if method == b"HEAD" or response.code in NO_BODY_CODES or response.code < 200:
        return None
    length = response.length
    return None if length is UNKNOWN_LENGTH else int(length)


#: A request's answer, bounded by its node's life (``Nodes.answer_of``).
Bounded = Callable[[Deferred[IResponse]], Deferred[IResponse]]


class _BodyRelay(Protocol):
    """Writes an upstream body to the client as it arrives.

    The upstream transport is registered as the request's producer, so a slow
    client pauses the upstream read (constant memory), and a client that
    leaves closes the upstream connection at once.
    """

    def __init__(self, request: Request, metrics: Metrics) -> None:
        self.request = request
        self.reason: Failure | None = None
        self.done: Deferred[None] = Deferred()
        self._metrics = metrics

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self._metrics.relayed_bytes("stream", len(data))
        self.request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # A client that left first took the request's channel with it.
        if self.request.channel is not None:
            self.request.unregisterProducer()
        self.reason = reason
        self.done.callback(None)


class Relay:
    """Sends one client request upstream and streams the answer back."""

    def __init__(
        self,
        client: IAgent,
        endpoints: IAgentEndpointFactory,
        cooperator: Cooperator,
        metrics: Metrics | None = None,
    ) -> None:
        self._client = client
        self._endpoints = endpoints
        self._cooperator = cooperator
        self._metrics = metrics if metrics is not None else Metrics()

    def _body(self, request: Request) -> IBodyProducer | None:
        content = request_body(request)
        if content is None:
            return None
        content.seek(0, 2)
        if content.tell() == 0:
            return None
        content.seek(0)
        return FileBodyProducer(content, cooperator=self._cooperator)

    def __call__(
        self,
        request: Request,
        url: bytes,
        headers: Headers,
        unreachable: str,
        bound: Bounded,
    ) -> None:
        """Relay ``request`` to ``url``; ``unreachable`` names the upstream in
        errors; ``bound`` (``Nodes.answer_of`` for the upstream's node) gives
        up waiting for the answer head when the node stops answering."""
        if wants_upgrade(request):
            endpoint = self._endpoints.endpointForURI(URI.fromBytes(url))
            hijack(request, endpoint, headers, AGENT_HEADERS, unreachable, self._metrics)
            return
        Deferred.fromCoroutine(self._relay(request, url, headers, unreachable, bound))

    async def _relay(
        self,
        request: Request,
        url: bytes,
        headers: Headers,
        unreachable: str,
        bound: Bounded,
    ) -> None:
        pending = bound(self._client.request(request.method, url, headers, self._body(request)))
        gone = watch_gone(request, then=pending.cancel)
        try:
            response = await pending
        except Exception as e:
            if not gone() and not isinstance(e, CancelledError):
                why = describe(e)
                log.warn("{upstream}: {why}", upstream=unreachable, why=why)
                # The bound's TimeoutError: the node stopped answering.
                code = 504 if isinstance(e, TimeoutError) else 502
                request.write(write_error(request, code, unreachable, why))
                request.finish()
            return
        request.setResponseCode(response.code, response.phrase)
        for name, values in response_headers(response):
            request.responseHeaders.setRawHeaders(name, values)
        length = body_length(request.method, response)
        if length is not None:
            # A body cut short upstream still cuts the client off (below),
            # which then sees fewer bytes than announced.
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % length])
        # Send the head now: a client may wait for it before its next call
        # (the CLI's `wait?condition=next-exit` answers only its head until
        # the container exits, and `docker run` starts it only after).
        request.write(b"")
        relay = _BodyRelay(request, self._metrics)
        self._metrics.stream_opened("stream")
        try:
            response.deliverBody(relay)
            await relay.done
        finally:
            self._metrics.stream_closed("stream")
        if gone():
            return
        reason = relay.reason
        if reason is not None and reason.check(ResponseDone, PotentialDataLoss):
            request.finish()
        else:
            # The upstream broke mid-body: cut the client off too, so it
            # sees a truncated answer rather than a complete-looking one.
            log.warn(
                "{upstream}: stream broken: {why}",
                upstream=unreachable,
                why=reason.getErrorMessage() if reason else "closed",
            )
            request.loseConnection()


class EngineProxy(ReverseProxyResource):
    """Relays any request, path and query unchanged, to the local engine.

    A leaf whose ``render`` relays through a pooled client: it holds none of
    the base's address, path or reactor (``Resource.__init__`` only).
    """

    isLeaf = True

    def __init__(self, relay: Relay, nodes: Nodes) -> None:
        Resource.__init__(self)
        self._relay = relay
        self._nodes = nodes

    def render(self, request: Request) -> Rendered:
        request.defaultContentType = None
        me = self._nodes.me
        _, url, headers = self._nodes.copy(me, request.uri, request)
        bound = partial(self._nodes.answer_of, me)
        self._relay(request, url, headers, "Unable to reach the Docker engine", bound)
        return NOT_DONE_YET


class PeerProxy(ReverseProxyResource):
    """Relays a request to another node's agent, re-targeted to be served there.

    A leaf like :class:`EngineProxy`.
    """

    isLeaf = True

    def __init__(self, relay: Relay, nodes: Nodes, peer: Peer) -> None:
        Resource.__init__(self)
        self._relay = relay
        self._nodes = nodes
        self._peer = peer

    def render(self, request: Request) -> Rendered:
        request.defaultContentType = None
        unreachable = f"Unable to reach the agent of node {self._peer.name}"
        silence = self._nodes.silence(self._peer)
        if silence is not None:
            # Known silent: answered at once, as lists name it missing.
            request.responseHeaders.setRawHeaders(MISSING_NODES, [self._peer.name.encode()])
            return write_error(request, 502, unreachable, silence.describe())
        _, url, headers = self._nodes.copy(self._peer, request.uri, request)
        bound = partial(self._nodes.answer_of, self._peer)
        self._relay(request, url, headers, unreachable, bound)
        return NOT_DONE_YET
