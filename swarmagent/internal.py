"""The resource tree as the front door's upstream: a ``Site`` reached only over socket pairs.

Requests the front door (:mod:`swarmagent.relay`) does not relay itself go
to the twisted.web resource tree over one end of a ``socket.socketpair()``
that the reactor adopts: nothing on the filesystem or the network can reach
it. The front door tells the tree who the client is in internal headers
(:data:`CLIENT`, :data:`CERT`), which it always strips from what clients
send; :class:`VouchedRequest` (this ``Site``'s requests only) takes them out
and believes them.
"""

from __future__ import annotations

import socket
from typing import cast
from urllib.parse import quote, unquote

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IReactorSocket,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.web.server import Request, Site
from zope.interface import implementer

from swarmagent.auth import IClientCert
from swarmagent.tls import NO_CERT, ClientCert, HTTP11Site

#: Every internal header starts so; the front door drops such headers from client input.
PREFIX = b"x-swarmagent-internal-"
#: The client's address: ``host port``.
CLIENT = PREFIX + b"client"
#: What the client's certificate proved: ``verified <subject, %-quoted>`` or ``untrusted``.
CERT = PREFIX + b"cert"


def is_internal(lower_name: bytes) -> bool:
    """Whether a (lower-case) header name is one of the front door's own."""
    return lower_name.startswith(PREFIX)


def vouch(client: IAddress, cert: ClientCert) -> list[tuple[bytes, bytes]]:
    """The internal headers saying who the client is."""
    out: list[tuple[bytes, bytes]] = []
    host = getattr(client, "host", None)
    if host is not None:
        out.append((CLIENT, f"{host} {getattr(client, 'port', 0)}".encode("ascii")))
    if cert.subject is not None:
        out.append((CERT, b"verified " + quote(cert.subject).encode("ascii")))
    elif cert.untrusted:
        out.append((CERT, b"untrusted"))
    return out


def _cert(value: bytes | None) -> ClientCert:
    if value is None:
        return NO_CERT
    if value == b"untrusted":
        return ClientCert(untrusted=True)
    kind, _, subject = value.partition(b" ")
    if kind == b"verified":
        return ClientCert(subject=unquote(subject.decode("ascii")))
    return NO_CERT


def _address(value: bytes | None) -> IAddress | None:
    if value is None:
        return None
    host, _, port = value.decode("ascii").partition(" ")
    cls = IPv6Address if ":" in host else IPv4Address
    return cls("TCP", host, int(port or 0))


class VouchedRequest(Request):
    """A request relayed by the front door: its client as the front door saw it."""

    _vouched_client: IAddress | None = None

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        headers = self.requestHeaders
        client = headers.getRawHeaders(CLIENT, [None])[0]
        cert = headers.getRawHeaders(CERT, [None])[0]
        headers.removeHeader(CLIENT)
        headers.removeHeader(CERT)
        self._vouched_client = _address(client)
        self.setComponent(IClientCert, _cert(cert))
        super().requestReceived(command, path, version)

    def getClientAddress(self) -> IAddress:
        if self._vouched_client is not None:
            return self._vouched_client
        return super().getClientAddress()  # type: ignore[no-any-return]

    def isSecure(self) -> bool:
        # The client's own connection is TLS.
        return True


class InternalSite(HTTP11Site):
    """The API's ``Site`` behind the front door: its requests are :class:`VouchedRequest`."""

    requestFactory = VouchedRequest


@implementer(IStreamClientEndpoint)
class InternalEndpoint:
    """Connects to ``site`` over a fresh socket pair, both ends adopted by the reactor."""

    def __init__(self, reactor: IReactorSocket, site: Site) -> None:
        self._reactor = reactor
        self._site = site

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        ours, theirs = socket.socketpair()
        built: list[IProtocol] = []
        capture = _Capture(protocolFactory, built)
        try:
            ours.setblocking(False)
            theirs.setblocking(False)
            # The reactor holds copies of the descriptors: these are closed below.
            site = cast(ServerFactory, self._site)
            self._reactor.adoptStreamConnection(theirs.fileno(), socket.AF_UNIX, site)
            self._reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, capture)
        finally:
            ours.close()
            theirs.close()
        return succeed(built[0])


class _Capture(ServerFactory):
    """Builds with ``inner`` and keeps what it built (adoption returns nothing)."""

    def __init__(self, inner: IProtocolFactory, built: list[IProtocol]) -> None:
        self._inner = inner
        self._built = built

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        assert addr is not None  # the reactor always names the peer
        protocol = cast("Protocol | None", self._inner.buildProtocol(addr))
        if protocol is not None:
            self._built.append(protocol)
        return protocol
