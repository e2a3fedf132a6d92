"""TLS for the agent's API, and for its calls to the other agents.

Server side (:class:`ServerTLS`): TLS 1.2 or 1.3, ECDHE with AEAD ciphers only, HTTP/1.1 and no
ALPN (:class:`HTTP11Site`). The certificate is the operator's (AGENT_TLS_CERT, AGENT_TLS_KEY)
or, as the reference agent does, a self-signed one made at every start. With a CA (AGENT_TLS_CA)
the server asks for a client certificate but does not require one;
:meth:`ServerTLS.verified_client` then tells a request handler whether the peer proved it holds
a certificate from that CA. A certificate that does not verify does not fail the handshake: the
client is simply not verified, and must authenticate some other way (the Portainer signature).

Client side (:class:`ClientTLS`): with a CA, the peer's certificate must chain to it and this
agent presents its own certificate (which therefore needs the clientAuth usage; ``python -m
swarmagent.certs init`` gives it both). The peer's name or address is *not* checked: one
certificate serves every node of a global service, and being signed by the cluster's private
CA is the identity that matters. Without a CA, peers are not verified at all, like
Portainer's and the reference agent's ``InsecureSkipVerify``: anyone who can intercept
overlay traffic can then read the signature headers that agents forward (a replayable
credential). Set AGENT_TLS_CA to close that gap.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from weakref import WeakKeyDictionary

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    ILoggingContext,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    ISystemHandle,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web import http
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.server import Request, Site
from zope.interface import implementer, implementer_only

from swarmagent.certs import PrivateKey, is_dns_name, load_key, self_signed
from swarmagent.channel import AgentChannel

#: TLS 1.2 suites: forward secret (ECDHE) and authenticated encryption (GCM, ChaCha20) only.
#: TLS 1.3 suites are all of that kind already; OpenSSL's default set is kept.
CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
#: CA, intermediates, leaf: more than enough for a private CA.
VERIFY_DEPTH = 4


@dataclass(frozen=True)
class Identity:
    """A certificate, its private key and any intermediates to send after it."""

    certificate: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = field(default=())


def _public_der(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_identity(cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> Identity:
    """Read operator files: a PEM certificate (then any intermediates) and its PEM key."""
    try:
        certs = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())
    except ValueError as e:
        raise ValueError(f"{cert_path}: not a PEM certificate ({e})") from None
    try:
        key = load_key(key_path)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{key_path}: not an unencrypted PEM key ({e})") from None
    if _public_der(certs[0].public_key()) != _public_der(key.public_key()):
        raise ValueError(f"{key_path} is not the key of the certificate in {cert_path}")
    return Identity(certs[0], key, tuple(certs[1:]))


def generated_identity(node_name: str, advertise_ip: str, now: datetime | None = None) -> Identity:
    """A self-signed certificate for ``localhost``, the node name and the advertise address.

    As the reference agent's: one year, server authentication, made anew at every start
    (but ECDSA P-256 rather than RSA-2048: smaller and quicker to handshake).
    """
    names = ["localhost"]
    if is_dns_name(node_name) and node_name != "localhost":
        names.append(node_name)
    ips = []
    try:
        ip = ipaddress.ip_address(advertise_ip)
    except ValueError:
        pass
    else:
        if not ip.is_unspecified:
            ips.append(ip)
    cert, key = self_signed(node_name[:64] or "swarmagent", dns_names=names, ips=ips, now=now)
    return Identity(cert, key)


def load_ca(path: str | os.PathLike[str]) -> tuple[x509.Certificate, ...]:
    """The CA certificates of a PEM file (the root must be among them)."""
    try:
        certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except ValueError as e:
        raise ValueError(f"{path}: not a PEM certificate ({e})") from None
    return tuple(certs)


def chains_to(identity: Identity, ca: Sequence[x509.Certificate]) -> bool:
    """Whether the identity's certificate verifies against ``ca``, as a peer will check it."""
    store = crypto.X509Store()
    for cert in ca:
        store.add_cert(crypto.X509.from_cryptography(cert))
    try:
        crypto.X509StoreContext(
            store,
            crypto.X509.from_cryptography(identity.certificate),
            [crypto.X509.from_cryptography(c) for c in identity.chain],
        ).verify_certificate()
    except crypto.X509StoreContextError:
        return False
    return True


def _context(identity: Identity | None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        # No resumption: a resumed session skips the certificate check that
        # ServerTLS records, and these connections are long-lived anyway.
        | SSL.OP_NO_TICKET
    )
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_cipher_list(CIPHERS.encode("ascii"))
    if identity is not None:
        ctx.use_certificate(identity.certificate)
        ctx.use_privatekey(identity.key)
        for cert in identity.chain:
            ctx.add_extra_chain_cert(cert)
        ctx.check_privatekey()
    return ctx


def _trust(ctx: SSL.Context, ca: Sequence[x509.Certificate]) -> None:
    store = ctx.get_cert_store()
    assert store is not None  # a new context always has one
    for cert in ca:
        store.add_cert(crypto.X509.from_cryptography(cert))


@dataclass(frozen=True)
class ClientCert:
    """What one connection's client certificate proved."""

    #: The subject (RFC 4514) of a certificate that chained to the CA, else None.
    subject: str | None = None
    #: A certificate was presented that did not chain to the CA.
    untrusted: bool = False


#: No certificate, or no TLS.
NO_CERT = ClientCert()


class _ClientCheck:
    """What the verify callback learnt about one connection's client certificate."""

    def __init__(self) -> None:
        self.leaf_ok = False
        self.failed = False
        #: What the certificate proved, worked out at the first request (the
        #: handshake is over by then, and the client verified once).
        self.proved: ClientCert | None = None


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Server connections for the agent's API (pass to ``SSL4ServerEndpoint``)."""

    def __init__(self, identity: Identity, client_ca: Sequence[x509.Certificate] = ()) -> None:
        self.identity = identity
        self.client_ca = tuple(client_ca)
        self._checks: WeakKeyDictionary[SSL.Connection, _ClientCheck] = WeakKeyDictionary()
        self._context = _context(identity)
        # Needed for client certificates even with the cache off (SSL_CTX_set_session_id_context).
        self._context.set_session_id(b"swarmagent")
        if self.client_ca:
            _trust(self._context, self.client_ca)
            for cert in self.client_ca:
                self._context.add_client_ca(cert)
            # VERIFY_PEER without FAIL_IF_NO_PEER_CERT: ask, don't require.
            self._context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, self._verify)
            self._context.set_verify_depth(VERIFY_DEPTH)

    def _verify(
        self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        # OpenSSL calls this for each certificate of the chain, root first, with its own
        # verdict in ``ok``. Record it and carry on: a bad certificate makes an unverified
        # client, not a failed handshake.
        check = self._checks.get(conn)
        if check is not None:
            if not ok:
                check.failed = True
            elif depth == 0:
                check.leaf_ok = True
        return True

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """A connection for one accepted client (IOpenSSLServerConnectionCreator)."""
        conn = SSL.Connection(self._context, None)
        self._checks[conn] = _ClientCheck()
        return conn

    def verified_peer(self, request: Request) -> x509.Certificate | None:
        """The client's certificate if it chained to the CA during this connection's handshake."""
        return self._verified(_connection(request))

    def _verified(self, conn: object) -> x509.Certificate | None:
        if not isinstance(conn, SSL.Connection):
            return None
        check = self._checks.get(conn)
        if check is None or check.failed or not check.leaf_ok:
            return None
        return conn.get_peer_certificate(as_cryptography=True)

    def _untrusted(self, conn: object) -> bool:
        if not isinstance(conn, SSL.Connection):
            return False
        check = self._checks.get(conn)
        if check is None or (not check.failed and check.leaf_ok):
            return False
        return conn.get_peer_certificate() is not None

    def verified_client(self, request: Request) -> bool:
        """Whether the request came over a connection with a CA-verified client certificate."""
        return self.verified_peer(request) is not None

    def client_cert(self, transport: object) -> ClientCert:
        """What ``transport``'s (a TLS connection's) client certificate proved."""
        conn = _handle(transport)
        check = self._checks.get(conn) if isinstance(conn, SSL.Connection) else None
        if check is not None and check.proved is not None:
            return check.proved
        cert = self._verified(conn)
        if cert is not None:
            proved = ClientCert(subject=cert.subject.rfc4514_string())
        else:
            proved = ClientCert(untrusted=self._untrusted(conn))
        if check is not None:
            check.proved = proved
        return proved


def _handle(transport: object) -> object:
    """A transport's ``SSL.Connection`` over TLS (else whatever its handle is)."""
    # Over TLS the transport is an ISystemHandle whose handle is the SSL.Connection.
    system = ISystemHandle(transport, None)
    return system.getHandle() if system is not None else None


def _connection(request: Request) -> object:
    """The request's ``SSL.Connection`` over TLS (else whatever its transport's handle is)."""
    return _handle(request.transport)


@implementer_only(IProtocolFactory, ILoggingContext)
class HTTP11Site(Site):
    """The API's ``Site``: HTTP/1.1 only, offered with no ALPN.

    A ``Site`` is an ``IProtocolNegotiationFactory``: Twisted before 26.4 then sets its
    protocols (h2 too, with the h2 package installed) on :class:`ServerTLS`'s context at each
    connection, which pyOpenSSL 26.2 and later refuse (a used context is immutable). Hijacked
    streams and upgrades need HTTP/1.1 anyway.

    twisted.web's access log is off (it wrote a line per request to twistd's
    log whatever LOG_LEVEL said, and re-dated its lines every second): the
    agent writes its own (``swarmagent.access``). Its channels are
    :class:`~swarmagent.channel.AgentChannel`: a head too large gets 431 and a close.
    """

    protocol = AgentChannel  # type: ignore[assignment]

    def startFactory(self) -> None:
        pass

    def stopFactory(self) -> None:
        pass

    def log(self, request: http.Request) -> None:
        pass


@implementer(IOpenSSLClientConnectionCreator, IPolicyForHTTPS)
class ClientTLS:
    """Client connections to other agents (an ``Agent`` policy, or a ``wrapClientTLS`` creator).

    With ``ca``: verify the peer against it (not its name) and present ``identity``.
    Without: verify nothing and present nothing, as the reference agent does.
    """

    def __init__(
        self, ca: Sequence[x509.Certificate] = (), identity: Identity | None = None
    ) -> None:
        self.ca = tuple(ca)
        self._context = _context(identity)
        if self.ca:
            _trust(self._context, self.ca)
            self._context.set_verify(SSL.VERIFY_PEER)
            self._context.set_verify_depth(VERIFY_DEPTH)
        else:
            self._context.set_verify(SSL.VERIFY_NONE)

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """A connection to one peer (IOpenSSLClientConnectionCreator)."""
        return SSL.Connection(self._context, None)

    def creatorForNetloc(self, hostname: bytes, port: int) -> ClientTLS:
        """The same creator for every peer: names are not checked (IPolicyForHTTPS)."""
        return self


def from_settings(
    *,
    cert: str = "",
    key: str = "",
    ca: str = "",
    node_name: str,
    advertise_ip: str,
    now: datetime | None = None,
) -> tuple[ServerTLS, ClientTLS]:
    """Both sides' TLS from AGENT_TLS_CERT, AGENT_TLS_KEY and AGENT_TLS_CA (paths or "")."""
    if bool(cert) != bool(key):
        raise ValueError("AGENT_TLS_CERT and AGENT_TLS_KEY must be set together")
    identity = (
        load_identity(cert, key) if cert else generated_identity(node_name, advertise_ip, now)
    )
    if not ca:
        return ServerTLS(identity), ClientTLS()
    if not cert:
        raise ValueError("AGENT_TLS_CA needs AGENT_TLS_CERT and AGENT_TLS_KEY signed by that CA")
    cas = load_ca(ca)
    # Peers check this certificate against the same CA, as a server and as a client: a
    # mistake here would only show later as failed calls between agents.
    if not chains_to(identity, cas):
        raise ValueError(f"{cert} is not signed by the CA in {ca}")
    if not _has_usage(identity.certificate, ExtendedKeyUsageOID.CLIENT_AUTH):
        raise ValueError(f"{cert} lacks the clientAuth usage agents need to call each other")
    return ServerTLS(identity, cas), ClientTLS(cas, identity)


def _has_usage(cert: x509.Certificate, usage: x509.ObjectIdentifier) -> bool:
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True  # no restriction
    return usage in usages
