"""Pooled HTTP clients: one for the local engine, one for the other agents."""

from __future__ import annotations

import socket
from typing import NoReturn, cast

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ISystemHandle,
)
from twisted.internet.protocol import Protocol
from twisted.web.client import URI, HTTPConnectionPool, _HTTP11ClientFactory, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IResponse
from zope.interface import implementer

from swarmagent.config import EngineAddress
from swarmagent.halfclose import HalfCloseTLSEndpoint
from swarmagent.twisted_types import ClientReactor

# A peer that dies with requests in flight must cost a bounded wait, yet an
# engine may take minutes to answer (a container stop with a long grace
# period). So the deadline is on the network, not on the answer: unacked data
# fails the connection after TCP_USER_TIMEOUT, and keepalives notice a silent
# peer under a quiet stream.
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
USER_TIMEOUT_MS = 20_000

ENGINE_BASE = b"http://docker"
#: Idle connections kept per upstream (an engine, an agent), by both front
#: doors' pools: as many as the clients' concurrency the bench loads with
#: (64). Beyond it, each request to a peer pays a new TLS handshake
#: (measured: a fifth of the entry agent's CPU at c=64 with 16, on either
#: front door). Idle ones close after a minute.
PERSISTENT_PER_HOST = 64


def _tune(protocol: IProtocol) -> IProtocol:
    # A connected Protocol, on a TCP transport (an ISystemHandle): neither
    # declared by IStreamClientEndpoint.connect.
    sock = cast(ISystemHandle, cast(Protocol, protocol).transport).getHandle()
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (
            ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
            ("TCP_KEEPCNT", KEEPALIVE_COUNT),
            ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS),
        ):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    return protocol


@implementer(IStreamClientEndpoint)
class TunedTCPEndpoint:
    """A TCP client endpoint whose connections detect a dead peer."""

    def __init__(self, inner: IStreamClientEndpoint) -> None:
        self._inner = inner

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return self._inner.connect(protocolFactory).addCallback(_tune)


@implementer(IAgentEndpointFactory)
class EngineEndpoints:
    """Every URI maps to the local engine, whatever its host part says."""

    def __init__(self, reactor: ClientReactor, address: EngineAddress, timeout: float) -> None:
        self._reactor = reactor
        self._address = address
        self._timeout = timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        a = self._address
        if a.scheme == "unix":
            return UNIXClientEndpoint(self._reactor, a.path, timeout=self._timeout)
        return TunedTCPEndpoint(
            HostnameEndpoint(self._reactor, a.host, a.port, timeout=self._timeout)
        )


@implementer(IAgentEndpointFactory)
class PeerEndpoints:
    """TLS over TCP to the host and port a peer URI names."""

    def __init__(
        self, reactor: ClientReactor, timeout: float, tls: IOpenSSLClientConnectionCreator
    ) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._tls = tls

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii").strip("[]")
        tcp = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        # Half-closeable, so a tunnel can pass the end of a stream's input on.
        return HalfCloseTLSEndpoint(self._tls, TunedTCPEndpoint(tcp))


class _QuietFactory(_HTTP11ClientFactory):
    # One log line per pooled connection opened and closed is noise.
    noisy = False


def make_pool(reactor: IReactorTime) -> HTTPConnectionPool:
    """Persistent connections, enough per host for a burst of parallel calls."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietFactory
    pool.maxPersistentPerHost = PERSISTENT_PER_HOST
    pool.cachedConnectionTimeout = 60
    return pool


def peer_url(address: str, port: int, path: bytes) -> bytes:
    """The URL of ``path`` (with its query) on the agent at ``address``."""
    host = f"[{address}]" if ":" in address else address
    return f"https://{host}:{port}".encode("ascii") + path


async def get(client: IAgent, url: bytes, headers: Headers) -> tuple[int, bytes, Headers]:
    """GET ``url`` and read the whole answer: its status, body and headers.

    Straight on the ``IAgent``: treq re-parses URLs with hyperlink, which
    rejects an IPv6 literal host (``https://[fd00::3]:9001/``).
    """
    response: IResponse = await client.request(b"GET", url, headers)
    body: bytes = await readBody(response)
    return response.code, body, response.headers


def get_within(
    client: IAgent, url: bytes, headers: Headers, clock: IReactorTime, timeout: float
) -> Deferred[tuple[int, bytes, Headers]]:
    """:func:`get`, failing with ``TimeoutError`` if it takes over ``timeout`` s."""
    # A cancelled HTTP call fails with its own error (ResponseNeverReceived
    # wrapping CancelledError), not CancelledError: name the deadline here.
    return Deferred.fromCoroutine(get(client, url, headers)).addTimeout(
        timeout, clock, onTimeoutCancel=_timed_out
    )


def _timed_out(result: object, timeout: float) -> NoReturn:
    raise TimeoutError(f"no answer within {timeout:g} s")
