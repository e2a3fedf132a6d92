"""Tests for :mod:`swarmagent.tunnel`: the upstream side of a tunnel, in memory."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from swarmagent.tunnel import Tunnel, _UpstreamSide
from tests.helpers import HalfCloseTransport

REQUEST = b"POST /exec/e1/start HTTP/1.1\r\nUpgrade: tcp\r\n\r\n"
MARK = ((b"Portainer-Agent", b"2.23.0"),)


class UpstreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.client = HalfCloseTransport()
        self.tunnel = Tunnel(self.client, REQUEST, MARK)
        self.engine = StringTransport()
        self.upstream = _UpstreamSide(self.tunnel)

    def test_request_then_early_input(self) -> None:
        self.tunnel.from_client(b"stdin")
        self.upstream.makeConnection(self.engine)
        self.assertEqual(self.engine.value(), REQUEST + b"stdin")

    def test_answer_marked_then_stream(self) -> None:
        self.upstream.makeConnection(self.engine)
        self.upstream.dataReceived(b"HTTP/1.1 101 UPGRADED\r\nUpgrade: tcp\r\n\r\nout")
        self.upstream.dataReceived(b"put")
        self.assertEqual(
            self.client.value(),
            b"HTTP/1.1 101 UPGRADED\r\nPortainer-Agent: 2.23.0\r\nUpgrade: tcp\r\n\r\noutput",
        )

    def test_refusal_passes_through(self) -> None:
        """The engine's (or the next agent's) refusal reaches the client as it came, marked."""
        self.upstream.makeConnection(self.engine)
        self.upstream.dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}")
        self.upstream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            self.client.value(),
            b"HTTP/1.1 404 Not Found\r\nPortainer-Agent: 2.23.0\r\nContent-Length: 2\r\n\r\n{}",
        )
        self.assertTrue(self.client.disconnecting)

    def test_closed_before_the_head(self) -> None:
        self.upstream.makeConnection(self.engine)
        self.upstream.dataReceived(b"HTTP/1.1 101 UPGR")
        self.upstream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.client.value(), b"")
        self.assertTrue(self.client.disconnecting)

    def test_malformed_head_closes_both(self) -> None:
        self.upstream.makeConnection(self.engine)
        self.upstream.dataReceived(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        self.assertTrue(self.engine.disconnecting)
        self.upstream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.client.value(), b"")
        self.assertTrue(self.client.disconnecting)

    def test_client_gone_before_the_connection(self) -> None:
        """Nothing is sent upstream for a client that left: no exec is started for no one."""
        self.tunnel.client_gone()
        self.upstream.makeConnection(self.engine)
        self.assertEqual(self.engine.value(), b"")
        self.assertTrue(self.engine.disconnecting)
