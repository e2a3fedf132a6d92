"""Tests for :mod:`swarmagent.tls`: real handshakes over loopback TCP with the reactor."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, ISystemHandle
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel
from zope.interface import implementer

from swarmagent import certs, tls
from swarmagent.tls import ClientTLS, HTTP11Site, Identity, ServerTLS
from tests.helpers import TrackingTLSFactory

reactor: Any = _reactor


class _Whoami(Resource):
    """Answers with what the server knows of the client's certificate."""

    isLeaf = True

    def __init__(self, server: ServerTLS) -> None:
        super().__init__()
        self._server = server

    def render_GET(self, request: Request) -> bytes:
        peer = self._server.verified_peer(request)
        if peer is None:
            assert not self._server.verified_client(request)
            return b"anonymous"
        assert self._server.verified_client(request)
        cn = peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return b"verified " + str(cn).encode()


class _OneRequest(Protocol):
    """Sends one HTTP/1.0 GET, then collects the answer until the server closes."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()
        self.tls_version: str | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"GET / HTTP/1.0\r\nHost: agent\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        if self.tls_version is None:
            handle = ISystemHandle(self.transport).getHandle()  # TLS's: its SSL.Connection
            assert isinstance(handle, SSL.Connection)
            self.tls_version = handle.get_protocol_version_name()
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ConnectionDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


@implementer(IOpenSSLClientConnectionCreator)
class _LegacyClient:
    """A client that may offer old versions and weak ciphers, for refusal tests."""

    def __init__(
        self,
        max_version: int,
        ciphers: bytes = b"DEFAULT:@SECLEVEL=0",
        alpn: tuple[bytes, ...] = (),
    ) -> None:
        self._ctx = SSL.Context(SSL.TLS_METHOD)
        self._ctx.set_min_proto_version(0)
        self._ctx.set_max_proto_version(max_version)
        self._ctx.set_cipher_list(ciphers)
        if alpn:
            self._ctx.set_alpn_protos(list(alpn))
        self.connection: SSL.Connection | None = None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        self.connection = SSL.Connection(self._ctx, None)
        return self.connection


@implementer(tls.IOpenSSLServerConnectionCreator)
class _PermissiveServer:
    """A server that takes anything, to show a legacy client can talk at all."""

    def __init__(self, identity: Identity) -> None:
        self._ctx = SSL.Context(SSL.TLS_METHOD)
        self._ctx.set_min_proto_version(0)
        self._ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        self._ctx.use_certificate(identity.certificate)
        self._ctx.use_privatekey(identity.key)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._ctx, None)


def _ca(name: str) -> tuple[x509.Certificate, certs.PrivateKey]:
    return certs.make_ca(name)


def _identity(
    ca: tuple[x509.Certificate, certs.PrivateKey],
    name: str,
    *,
    server: bool = False,
    client: bool = False,
    ips: tuple[str, ...] = ("127.0.0.1",),
) -> Identity:
    cert, key = certs.issue(
        ca[0],
        ca[1],
        name,
        ips=[ipaddress.ip_address(ip) for ip in ips],
        server=server,
        client=client,
    )
    return Identity(cert, key)


class HandshakeTests(unittest.TestCase):
    """A real server (as ``listenSSL`` builds it) and real clients, on 127.0.0.1."""

    def setUp(self) -> None:
        self.ca = _ca("Cluster CA")
        self.other_ca = _ca("Other CA")
        self.server_identity = _identity(self.ca, "agent", server=True, client=True)

    def serve(self, creator: Any, resource: Resource | None = None) -> int:
        """Listen on a free port with ``creator``; return the port number."""
        if resource is None:
            resource = _Whoami(creator)
        factory = TrackingTLSFactory(creator, False, HTTP11Site(resource))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(factory.idle)
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def fetch(self, port: int, creator: Any) -> Deferred[bytes]:
        """GET / through ``creator``; the answer's body."""
        proto = _OneRequest()
        self.last = proto
        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        connectProtocol(endpoint, proto)
        return proto.done.addCallback(lambda raw: raw.split(b"\r\n\r\n", 1)[1])

    async def test_anonymous_without_ca(self) -> None:
        port = self.serve(ServerTLS(tls.generated_identity("node1", "127.0.0.1")))
        self.assertEqual(await self.fetch(port, ClientTLS()), b"anonymous")
        self.assertEqual(self.last.tls_version, "TLSv1.3")

    async def test_client_certificate_from_ca(self) -> None:
        port = self.serve(ServerTLS(self.server_identity, [self.ca[0]]))
        client = _identity(self.ca, "portainer", client=True)
        self.assertEqual(
            await self.fetch(port, ClientTLS([self.ca[0]], client)), b"verified portainer"
        )

    async def test_server_certificate_as_client(self) -> None:
        # Agents present their server certificate (serverAuth + clientAuth) to each other.
        port = self.serve(ServerTLS(self.server_identity, [self.ca[0]]))
        self.assertEqual(
            await self.fetch(port, ClientTLS([self.ca[0]], self.server_identity)),
            b"verified agent",
        )

    async def test_no_client_certificate(self) -> None:
        port = self.serve(ServerTLS(self.server_identity, [self.ca[0]]))
        self.assertEqual(await self.fetch(port, ClientTLS([self.ca[0]])), b"anonymous")
        self.assertEqual(await self.fetch(port, ClientTLS()), b"anonymous")

    async def test_client_certificate_from_other_ca(self) -> None:
        port = self.serve(ServerTLS(self.server_identity, [self.ca[0]]))
        stranger = _identity(self.other_ca, "stranger", client=True)
        self.assertEqual(await self.fetch(port, ClientTLS((), stranger)), b"anonymous")

    async def test_self_signed_client_certificate(self) -> None:
        port = self.serve(ServerTLS(self.server_identity, [self.ca[0]]))
        cert, key = certs.self_signed("impostor")
        self.assertEqual(await self.fetch(port, ClientTLS((), Identity(cert, key))), b"anonymous")

    async def test_client_certificate_without_client_usage(self) -> None:
        port = self.serve(ServerTLS(self.server_identity, [self.ca[0]]))
        server_only = _identity(self.ca, "server-only", server=True)
        self.assertEqual(await self.fetch(port, ClientTLS((), server_only)), b"anonymous")

    async def test_expired_client_certificate(self) -> None:
        port = self.serve(ServerTLS(self.server_identity, [self.ca[0]]))
        long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=800)
        cert, key = certs.issue(self.ca[0], self.ca[1], "old", client=True, now=long_ago)
        self.assertEqual(await self.fetch(port, ClientTLS((), Identity(cert, key))), b"anonymous")

    async def test_client_verifies_server_against_ca(self) -> None:
        port = self.serve(ServerTLS(_identity(self.other_ca, "rogue", server=True)))
        with self.assertRaises(SSL.Error) as caught:
            await self.fetch(port, ClientTLS([self.ca[0]]))
        self.assertIn("certificate verify failed", str(caught.exception))

    async def test_client_ignores_server_name(self) -> None:
        # One certificate serves every node; the CA signature is what is checked.
        identity = _identity(self.ca, "elsewhere", server=True, ips=("192.0.2.7",))
        port = self.serve(ServerTLS(identity))
        self.assertEqual(await self.fetch(port, ClientTLS([self.ca[0]])), b"anonymous")

    async def test_refuses_tls_1_1_and_below(self) -> None:
        identity = tls.generated_identity("node1", "127.0.0.1")
        control = self.serve(_PermissiveServer(identity), Resource())
        port = self.serve(ServerTLS(identity))
        for version, name in [(SSL.TLS1_1_VERSION, "TLSv1.1"), (SSL.TLS1_VERSION, "TLSv1")]:
            # The same client does get through to a server that allows it...
            await self.fetch(control, _LegacyClient(version))
            self.assertEqual(self.last.tls_version, name)
            # ...but ours answers with a protocol_version alert.
            with self.assertRaises(SSL.Error) as caught:
                await self.fetch(port, _LegacyClient(version))
            self.assertIn("alert protocol version", str(caught.exception))

    async def test_refuses_non_aead_ciphers(self) -> None:
        port = self.serve(ServerTLS(tls.generated_identity("node1", "127.0.0.1")))
        for cipher in [
            b"ECDHE-ECDSA-AES128-SHA",
            b"ECDHE-ECDSA-AES256-SHA384",
            b"AES128-GCM-SHA256",
        ]:
            with self.subTest(cipher=cipher), self.assertRaises(SSL.Error) as caught:
                await self.fetch(port, _LegacyClient(SSL.TLS1_2_VERSION, cipher))
            self.assertIn("handshake failure", str(caught.exception))

    async def test_tls_1_2_aead(self) -> None:
        port = self.serve(ServerTLS(tls.generated_identity("node1", "127.0.0.1")))
        client = _LegacyClient(SSL.TLS1_2_VERSION, b"ECDHE-ECDSA-CHACHA20-POLY1305")
        self.assertEqual(await self.fetch(port, client), b"anonymous")
        self.assertEqual(self.last.tls_version, "TLSv1.2")

    async def test_http_1_1_only(self) -> None:
        # A Go client offers h2 first; the server must not take it up, nor answer
        # with http/1.1 as Twisted before 26.4 does for a plain Site.
        port = self.serve(ServerTLS(tls.generated_identity("node1", "127.0.0.1")))
        client = _LegacyClient(SSL.TLS1_3_VERSION, alpn=(b"h2", b"http/1.1"))
        self.assertEqual(await self.fetch(port, client), b"anonymous")
        assert client.connection is not None
        self.assertEqual(client.connection.get_alpn_proto_negotiated(), b"")

    async def test_web_client_policy(self) -> None:
        # ClientTLS works as twisted.web's HTTPS policy, as the peer HTTP client will use it.
        port = self.serve(ServerTLS(self.server_identity, [self.ca[0]]))
        agent = Agent(reactor, contextFactory=ClientTLS([self.ca[0]], self.server_identity))
        response = await agent.request(b"GET", f"https://127.0.0.1:{port}/".encode())
        self.assertEqual(await readBody(response), b"verified agent")


class VerifiedClientTests(unittest.SynchronousTestCase):
    def test_plain_request(self) -> None:
        server = ServerTLS(tls.generated_identity("node1", "127.0.0.1"))
        # A request on a plain TCP connection: no TLS handle to ask.
        request = Request(DummyChannel())
        self.assertFalse(server.verified_client(request))
        self.assertIsNone(server.verified_peer(request))


class GeneratedIdentityTests(unittest.SynchronousTestCase):
    def test_names(self) -> None:
        now = datetime.datetime(2030, 1, 2, tzinfo=datetime.UTC)
        identity = tls.generated_identity("node-1.example", "10.0.0.5", now=now)
        cert = identity.certificate
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(sans.get_values_for_type(x509.DNSName), ["localhost", "node-1.example"])
        self.assertEqual(
            sans.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("10.0.0.5")]
        )
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])
        self.assertFalse(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertEqual(
            cert.not_valid_after_utc - cert.not_valid_before_utc, datetime.timedelta(days=365)
        )
        self.assertLessEqual(cert.not_valid_before_utc, now)

    def test_odd_names_left_out(self) -> None:
        identity = tls.generated_identity("not a dns name", "0.0.0.0")
        sans = identity.certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        self.assertEqual(sans.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(sans.get_values_for_type(x509.IPAddress), [])


class FromSettingsTests(unittest.SynchronousTestCase):
    """AGENT_TLS_CERT / _KEY / _CA, as files made by ``swarmagent.certs``."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        certs.init(self.dir, ["agent"], [ipaddress.ip_address("10.0.0.5")])
        self.cert = str(self.dir / certs.SERVER_CERT)
        self.key = str(self.dir / certs.SERVER_KEY)
        self.ca = str(self.dir / certs.CA_CERT)

    def build(self, cert: str = "", key: str = "", ca: str = "") -> tuple[ServerTLS, ClientTLS]:
        return tls.from_settings(
            cert=cert, key=key, ca=ca, node_name="node1", advertise_ip="10.0.0.5"
        )

    def test_generated(self) -> None:
        server, client = self.build()
        self.assertEqual(server.client_ca, ())
        self.assertEqual(client.ca, ())
        self.assertEqual(server.identity.certificate.issuer, server.identity.certificate.subject)

    def test_operator_files(self) -> None:
        server, client = self.build(cert=self.cert, key=self.key)
        self.assertEqual(server.identity.certificate, certs.load_cert(self.cert))
        self.assertEqual(client.ca, ())

    def test_with_ca(self) -> None:
        server, client = self.build(cert=self.cert, key=self.key, ca=self.ca)
        self.assertEqual(server.client_ca, (certs.load_cert(self.ca),))
        self.assertEqual(client.ca, server.client_ca)

    def test_mistakes(self) -> None:
        other = Path(self.mktemp())
        certs.init(other)
        cases: list[tuple[dict[str, str], str]] = [
            ({"cert": self.cert}, "must be set together"),
            ({"key": self.key}, "must be set together"),
            ({"ca": self.ca}, "needs AGENT_TLS_CERT"),
            ({"cert": self.cert, "key": str(other / certs.SERVER_KEY)}, "is not the key"),
            (
                {
                    "cert": str(other / certs.SERVER_CERT),
                    "key": str(other / certs.SERVER_KEY),
                    "ca": self.ca,
                },
                "is not signed by the CA",
            ),
            ({"cert": self.key, "key": self.key}, "not a PEM certificate"),
            ({"cert": self.cert, "key": self.cert}, "not an unencrypted PEM key"),
        ]
        for kwargs, message in cases:
            with self.subTest(message=message):
                e = self.assertRaises(ValueError, self.build, **kwargs)
                self.assertIn(message, str(e))
        # Signed by the CA, but peers could not use it as a client certificate.
        ca = certs.load_cert(self.ca)
        ca_key = certs.load_key(self.dir / certs.CA_KEY)
        cert, key = certs.issue(ca, ca_key, "server-only", server=True)
        (self.dir / "so.pem").write_bytes(certs.cert_pem(cert))
        (self.dir / "so-key.pem").write_bytes(certs.key_pem(key))
        e = self.assertRaises(
            ValueError,
            self.build,
            cert=str(self.dir / "so.pem"),
            key=str(self.dir / "so-key.pem"),
            ca=self.ca,
        )
        self.assertIn("clientAuth", str(e))
