"""Relaying one request to the local engine or to another agent, streaming both ways."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Cooperator
from twisted.python.failure import Failure
from twisted.web.client import URI, FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import NOT_DONE_YET, Request

from swarmagent.clients import ENGINE_BASE, peer_url
from swarmagent.clientwatch import ClientWatch
from swarmagent.errors import describe, write_error
from swarmagent.logs import logger
from swarmagent.peers import Peer
from swarmagent.tunnel import hijack, wants_upgrade
from swarmagent.wire import AGENT_HEADERS, HOP, TARGET

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


def response_headers(response: IResponse) -> list[tuple[bytes, list[bytes]]]:
    """The end-to-end headers of an upstream response, for the client."""
    drop = (HOP_BY_HOP - {b"content-length"}) | OWN_HEADERS | _connection_tokens(response.headers)
    return [(n, v) for n, v in response.headers.getAllRawHeaders() if n.lower() not in drop]


class _BodyRelay(Protocol):
    """Writes an upstream body to the client as it arrives.

    The upstream transport is registered as the request's producer, so a slow
    client pauses the upstream read (constant memory), and a client that
    leaves closes the upstream connection at once.
    """

    def __init__(self, request: Request) -> None:
        self.request = request
        self.reason: Failure | None = None
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
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
        self, agent: IAgent, endpoints: IAgentEndpointFactory, cooperator: Cooperator
    ) -> None:
        self._agent = agent
        self._endpoints = endpoints
        self._cooperator = cooperator

    def _body(self, request: Request) -> IBodyProducer | None:
        content = request.content
        if content is None:
            return None
        content.seek(0, 2)
        if content.tell() == 0:
            return None
        content.seek(0)
        return FileBodyProducer(content, cooperator=self._cooperator)

    def __call__(self, request: Request, url: bytes, headers: Headers, unreachable: str) -> None:
        """Relay ``request`` to ``url``; ``unreachable`` names the upstream in errors."""
        if wants_upgrade(request):
            endpoint = self._endpoints.endpointForURI(URI.fromBytes(url))
            hijack(request, endpoint, headers, AGENT_HEADERS, unreachable)
            return
        Deferred.fromCoroutine(self._relay(request, url, headers, unreachable))

    async def _relay(
        self, request: Request, url: bytes, headers: Headers, unreachable: str
    ) -> None:
        pending = self._agent.request(request.method, url, headers, self._body(request))
        client = ClientWatch(request, on_gone=pending.cancel)
        try:
            response = await pending
        except Exception as e:
            if not client.gone and not isinstance(e, CancelledError):
                why = describe(e)
                log.warn("{upstream}: {why}", upstream=unreachable, why=why)
                request.write(write_error(request, 502, unreachable, why))
                request.finish()
            return
        request.setResponseCode(response.code, response.phrase)
        for name, values in response_headers(response):
            request.responseHeaders.setRawHeaders(name, values)
        # Send the head now: a client may wait for it before its next call
        # (the CLI's `wait?condition=next-exit` answers only its head until
        # the container exits, and `docker run` starts it only after).
        request.write(b"")
        relay = _BodyRelay(request)
        response.deliverBody(relay)
        await relay.done
        if client.gone:
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
    """Relays any request, path and query unchanged, to the local engine."""

    isLeaf = True

    def __init__(self, relay: Relay, reactor: Any) -> None:
        super().__init__("docker", 0, b"", reactor)
        self._relay = relay

    def render(self, request: Request) -> Any:
        request.defaultContentType = None
        headers = request_headers(request, keep_agent_headers=False)
        self._relay(
            request, ENGINE_BASE + request.uri, headers, "Unable to reach the Docker engine"
        )
        return NOT_DONE_YET


class PeerProxy(ReverseProxyResource):
    """Relays a request to another node's agent, re-targeted to be served there."""

    isLeaf = True

    def __init__(self, relay: Relay, peer: Peer, hop: str, reactor: Any) -> None:
        super().__init__(peer.address, peer.port, b"", reactor)
        self._relay = relay
        self._peer = peer
        self._hop = hop

    def render(self, request: Request) -> Any:
        request.defaultContentType = None
        headers = forward_headers(request, self._peer, self._hop)
        url = peer_url(self._peer.address, self._peer.port, request.uri)
        self._relay(request, url, headers, f"Unable to reach the agent of node {self._peer.name}")
        return NOT_DONE_YET


def node_copy(request: Request, peer: Peer, me: Peer) -> tuple[bytes, Headers]:
    """A fresh URL and headers for ``request`` as ``peer`` must serve it.

    Built anew per node: nothing is shared between parallel calls
    (portainer/portainer#1867). This node's copy goes to its engine.
    """
    if peer is me or peer.is_self:
        return ENGINE_BASE + request.uri, request_headers(request, keep_agent_headers=False)
    url = peer_url(peer.address, peer.port, request.uri)
    return url, forward_headers(request, peer, me.identity.key)


def forward_headers(request: Request, peer: Peer, hop: str) -> Headers:
    """Headers for a copy of ``request`` that ``peer`` must serve itself."""
    headers = request_headers(request, keep_agent_headers=True)
    headers.setRawHeaders(TARGET, [peer.identity.key.encode("utf-8")])
    headers.setRawHeaders(HOP, [hop.encode("utf-8")])
    return headers
