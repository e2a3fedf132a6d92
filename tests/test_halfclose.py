"""Tests for :mod:`swarmagent.halfclose`: real TLS in memory (``iosim``), fake clocks."""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import SENT_SHUTDOWN
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial import unittest
from zope.interface import implementer

from swarmagent import tls
from swarmagent.halfclose import (
    CLOSE_GRACE,
    HalfCloseTLS,
    HalfCloseTLSEndpoint,
    HalfCloseTLSFactory,
)
from swarmagent.tunnel import Tunnel, _ClientSide, _UpstreamSide
from swarmagent.twisted_types import stream_transport

IDENTITY = tls.generated_identity("node1", "127.0.0.1")


class Recorder(Protocol):
    """Records what it gets; a stand-in for an HTTP channel (no half-close)."""

    def __init__(self) -> None:
        self.data = b""
        self.read_closed = False
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


@implementer(IHalfCloseableProtocol)
class HalfRecorder(Recorder):
    """A :class:`Recorder` that takes half-closes, as the tunnel's sides do."""

    def readConnectionLost(self) -> None:
        self.read_closed = True

    def writeConnectionLost(self) -> None:
        pass


class Greeter(HalfRecorder):
    """Writes and ends its output as soon as it is connected, mid-handshake."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"early")
        stream_transport(self.transport).loseWriteConnection()


class Quiet(HalfRecorder):
    """Ends its output as soon as it is connected, having written nothing."""

    def connectionMade(self) -> None:
        stream_transport(self.transport).loseWriteConnection()


class Closer(HalfRecorder):
    """Closes its connection on the first data it reads (its output already ended)."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        assert self.transport is not None
        self.transport.loseConnection()


def tls_pair(
    server: Protocol, client: Protocol, clock: Clock, server_tls: type = HalfCloseTLSFactory
) -> tuple[Any, Any, iosim.IOPump]:
    """A TLS server and client wrapping ``server`` and ``client``, connected in memory."""
    s = server_tls(tls.ServerTLS(IDENTITY), False, Factory.forProtocol(lambda: server), clock)
    c = HalfCloseTLSFactory(tls.ClientTLS(), True, Factory.forProtocol(lambda: client), clock)
    server_proto = s.buildProtocol(None)
    client_proto = c.buildProtocol(None)
    pump = iosim.connect(
        server_proto,
        iosim.makeFakeServer(server_proto),
        client_proto,
        iosim.makeFakeClient(client_proto),
        clock=clock,
    )
    return server_proto, client_proto, pump


class HalfCloseTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_close_notify_ends_one_direction(self) -> None:
        """The peer's close_notify is readConnectionLost; the answer still flows back."""
        server, client = HalfRecorder(), HalfRecorder()
        server_tls, client_tls, pump = tls_pair(server, client, self.clock)
        client_tls.write(b"input")
        client_tls.loseWriteConnection()
        pump.flush()
        self.assertEqual(server.data, b"input")
        self.assertTrue(server.read_closed)
        self.assertIsNone(server.lost)
        self.assertTrue(client_tls.getHandle().get_shutdown() & SENT_SHUTDOWN)

        server_tls.write(b"output after the end of input")
        pump.flush()
        self.assertEqual(client.data, b"output after the end of input")
        self.assertIsNone(client.lost)

        server_tls.loseConnection()
        pump.flush()
        assert server.lost is not None and client.lost is not None
        server.lost.trap(ConnectionDone)
        client.lost.trap(ConnectionDone)

    def test_server_ends_its_output(self) -> None:
        """The other way round: the agent ends its output, the client still sends."""
        server, client = HalfRecorder(), HalfRecorder()
        server_tls, client_tls, pump = tls_pair(server, client, self.clock)
        server_tls.write(b"all the output")
        server_tls.loseWriteConnection()
        pump.flush()
        self.assertEqual(client.data, b"all the output")
        self.assertTrue(client.read_closed)
        client_tls.write(b"more input")
        pump.flush()
        self.assertEqual(server.data, b"more input")
        self.assertIsNone(server.lost)

    def test_whole_close_without_half_close_support(self) -> None:
        """A protocol that cannot take a half-close (HTTP) sees the stock whole close."""
        server, client = Recorder(), HalfRecorder()
        _, client_tls, pump = tls_pair(server, client, self.clock)
        client_tls.write(b"GET / HTTP/1.1\r\n\r\n")
        client_tls.loseWriteConnection()
        pump.flush()
        self.assertEqual(server.data, b"GET / HTTP/1.1\r\n\r\n")
        assert server.lost is not None
        self.assertIsNotNone(client.lost)

    def test_stock_tls_closes_everything(self) -> None:
        """What this module is for: Twisted's own TLS ends the whole connection."""
        server, client = HalfRecorder(), HalfRecorder()
        _, client_tls, pump = tls_pair(server, client, self.clock, TLSMemoryBIOFactory)
        client_tls.loseWriteConnection()
        pump.flush()
        self.assertFalse(server.read_closed)
        self.assertIsNotNone(server.lost)

    def test_whole_close_waits_for_the_peer_only_so_long(self) -> None:
        """A peer that never sends its close_notify (still sending) is closed after the grace."""
        server, client = HalfRecorder(), HalfRecorder()
        server_tls, client_tls, pump = tls_pair(server, client, self.clock)
        server_tls.write(b"the answer")
        server_tls.loseConnection()
        pump.flush()
        self.assertEqual(client.data, b"the answer")
        self.assertTrue(client.read_closed)
        client_tls.write(b"more of the request")
        pump.flush()
        self.assertIsNone(client.lost)
        self.clock.advance(CLOSE_GRACE)
        pump.flush()
        assert client.lost is not None and server.lost is not None
        client.lost.trap(ConnectionDone)

    def test_half_close_is_not_bounded(self) -> None:
        """After loseWriteConnection alone, the peer may send for as long as it likes."""
        server, client = HalfRecorder(), HalfRecorder()
        server_tls, client_tls, pump = tls_pair(server, client, self.clock)
        server_tls.loseWriteConnection()
        pump.flush()
        self.clock.advance(CLOSE_GRACE * 100)
        client_tls.write(b"still sending")
        pump.flush()
        self.assertEqual(server.data, b"still sending")
        self.assertIsNone(server.lost)
        self.assertIsNone(client.lost)

    def test_writes_after_close_notify_are_dropped(self) -> None:
        server, client = HalfRecorder(), HalfRecorder()
        server_tls, client_tls, pump = tls_pair(server, client, self.clock)
        client_tls.write(b"before")
        client_tls.loseWriteConnection()
        client_tls.write(b"after")
        pump.flush()
        self.assertEqual(server.data, b"before")
        self.assertIsNone(client.lost)
        server_tls.write(b"still open")
        pump.flush()
        self.assertEqual(client.data, b"still open")

    def test_write_now_needs_no_reactor_turn(self) -> None:
        server, client = HalfRecorder(), HalfRecorder()
        server_tls, _, pump = tls_pair(server, client, self.clock)
        pump.flush()  # the handshake
        server_tls.write(b"held ")
        pump.flush(advanceClock=False)
        self.assertEqual(client.data, b"")  # the stock write waits for the clock
        server_tls.write_now(b"and now")
        pump.flush(advanceClock=False)
        self.assertEqual(client.data, b"held and now")  # in order, without it

    def test_end_of_output_during_the_handshake(self) -> None:
        """close_notify waits for the handshake and the data written before it."""
        server, client = HalfRecorder(), Greeter()
        tls_pair(server, client, self.clock)
        self.assertEqual(server.data, b"early")
        self.assertTrue(server.read_closed)
        self.assertIsNone(server.lost)

    def test_end_of_output_during_the_handshake_without_data(self) -> None:
        """With nothing written first, close_notify still goes once the handshake is done."""
        server, client = HalfRecorder(), Quiet()
        tls_pair(server, client, self.clock)
        self.assertTrue(server.read_closed)
        self.assertIsNone(server.lost)

    def test_lose_connection_after_half_close_keeps_reading(self) -> None:
        """Our close_notify is sent once: the peer's last data is not discarded."""
        server, client = HalfRecorder(), HalfRecorder()
        server_tls, client_tls, pump = tls_pair(server, client, self.clock)
        client_tls.loseWriteConnection()
        pump.flush()
        client_tls.loseConnection()
        pump.flush()
        self.assertIsNone(client.lost)
        server_tls.write(b"last words")
        server_tls.loseConnection()
        pump.flush()
        self.assertEqual(client.data, b"last words")
        assert client.lost is not None
        client.lost.trap(ConnectionDone)

    def test_lose_connection_mid_read_after_half_close(self) -> None:
        """A second SSL_shutdown would discard the records still queued: it is not made."""
        server, client = HalfRecorder(), Closer()
        server_tls, client_tls, pump = tls_pair(server, client, self.clock)
        client_tls.loseWriteConnection()
        pump.flush()
        # Two TLS records, delivered to the client in one read.
        for chunk in (b"first ", b"second"):
            server_tls.write(chunk)
            self.clock.advance(0)
        server_tls.loseConnection()
        pump.flush()
        self.assertEqual(client.data, b"first second")
        assert client.lost is not None
        client.lost.trap(ConnectionDone)


@implementer(IStreamClientEndpoint)
class _Connected:
    """An endpoint whose connection is made at once, with a bare transport."""

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        protocol = factory.buildProtocol(iosim.FakeAddress())
        assert protocol is not None
        protocol.makeConnection(StringTransport())
        return succeed(protocol)


class EndpointTests(unittest.TestCase):
    def test_connect_gives_the_wrapped_protocol(self) -> None:
        app = HalfRecorder()
        endpoint = HalfCloseTLSEndpoint(tls.ClientTLS(), _Connected())
        result = self.successResultOf(endpoint.connect(Factory.forProtocol(lambda: app)))
        self.assertIs(result, app)
        self.assertIsInstance(app.transport, HalfCloseTLS)


class _EngineSocket(StringTransport):
    """A unix socket to the engine: records its write side's shutdown."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class TunnelTests(unittest.TestCase):
    """The client's close_notify, carried across a tunnel."""

    def setUp(self) -> None:
        self.clock = Clock()
        # The tunnel needs the TLS transport made over this side: set below.
        client_side = _ClientSide(None)  # type: ignore[arg-type]
        self.cli = HalfRecorder()  # the docker CLI
        self.agent_tls, self.cli_tls, self.pump = tls_pair(client_side, self.cli, self.clock)
        # As take_over does: the tunnel's client is the TLS transport.
        self.tunnel: Tunnel = Tunnel(self.agent_tls, b"POST /exec/x/start HTTP/1.1\r\n\r\n", ())
        client_side.tunnel = self.tunnel

    def test_to_the_engine(self) -> None:
        """The engine's socket is half-closed, and its later output reaches the CLI."""
        engine = _EngineSocket()
        upstream = _UpstreamSide(self.tunnel)
        upstream.makeConnection(engine)
        self.cli_tls.write(b"stdin")
        self.cli_tls.loseWriteConnection()
        self.pump.flush()
        self.assertEqual(engine.value(), b"POST /exec/x/start HTTP/1.1\r\n\r\nstdin")
        self.assertTrue(engine.write_closed)

        upstream.dataReceived(b"HTTP/1.1 101 UPGRADED\r\n\r\nafter-eof\n")
        self.pump.flush()
        self.assertEqual(self.cli.data, b"HTTP/1.1 101 UPGRADED\r\n\r\nafter-eof\n")
        self.assertIsNone(self.cli.lost)

    def test_to_another_agent(self) -> None:
        """On a TLS hop the end of input is a close_notify, which the next agent reads."""
        next_agent = HalfRecorder()
        upstream = _UpstreamSide(self.tunnel)
        _, hop_tls, hop = tls_pair(next_agent, upstream, self.clock)
        self.cli_tls.write(b"stdin")
        self.cli_tls.loseWriteConnection()
        self.pump.flush()
        hop.flush()
        self.assertEqual(next_agent.data, b"POST /exec/x/start HTTP/1.1\r\n\r\nstdin")
        self.assertTrue(next_agent.read_closed)
        self.assertIsNone(next_agent.lost)

        assert next_agent.transport is not None
        next_agent.transport.write(b"HTTP/1.1 101 UPGRADED\r\n\r\nafter-eof\n")
        hop.flush()
        self.pump.flush()
        self.assertEqual(self.cli.data, b"HTTP/1.1 101 UPGRADED\r\n\r\nafter-eof\n")
        self.assertIsNone(self.cli.lost)
        self.assertIsInstance(hop_tls, HalfCloseTLS)
