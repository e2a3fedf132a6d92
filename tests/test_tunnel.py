"""Tests for :mod:`swarmagent.tunnel`: the upstream side of a tunnel, in memory."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from swarmagent.tunnel import Tunnel, _UpstreamSide, wants_upgrade
from tests.helpers import HalfCloseTransport

REQUEST = b"POST /exec/e1/start HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
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
        """The engine's (or the next agent's) refusal reaches the client as it
        came, marked, and says the connection ends with it."""
        self.upstream.makeConnection(self.engine)
        self.upstream.dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}")
        self.upstream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            self.client.value(),
            b"HTTP/1.1 404 Not Found\r\nPortainer-Agent: 2.23.0\r\nConnection: close\r\n"
            b"Content-Length: 2\r\n\r\n{}",
        )
        self.assertTrue(self.client.disconnecting)

    def test_after_a_refusal_the_client_does_not_reach_the_upstream(self) -> None:
        """A refused upgrade leaves the upstream connection HTTP and open (the
        engine keeps it alive): the client's next request, sent on the same
        connection, must not reach the engine unrouted and unauthorized."""
        self.upstream.makeConnection(self.engine)
        self.engine.clear()
        self.upstream.dataReceived(
            b"HTTP/1.1 404 Not Found\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}"
        )
        self.tunnel.from_client(b"GET /containers/json HTTP/1.1\r\n\r\n")
        self.assertEqual(self.engine.value(), b"")
        self.assertEqual(
            self.client.value(),
            b"HTTP/1.1 404 Not Found\r\nPortainer-Agent: 2.23.0\r\nConnection: close\r\n"
            b"Content-Length: 2\r\n\r\n{}",
        )
        # The client, told so, closes; the upstream goes with it.
        self.tunnel.client_gone()
        self.assertTrue(self.engine.disconnecting)

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


class WantsUpgradeTests(SynchronousTestCase):
    def wants(self, headers: dict[bytes, list[bytes]]) -> bool:
        request = Request(DummyChannel())
        for name, values in headers.items():
            request.requestHeaders.setRawHeaders(name, values)
        return wants_upgrade(request)

    def test_upgrade_with_connection_upgrade(self) -> None:
        self.assertTrue(self.wants({b"connection": [b"Upgrade"], b"upgrade": [b"tcp"]}))
        self.assertTrue(
            self.wants({b"connection": [b"keep-alive, upgrade"], b"upgrade": [b"websocket"]})
        )

    def test_upgrade_header_alone_is_plain_http(self) -> None:
        """As llhttp (the front door) reads it: without "Connection: upgrade"
        the connection stays HTTP, so the tree does not take it over."""
        self.assertFalse(self.wants({b"upgrade": [b"tcp"]}))
        self.assertFalse(self.wants({b"connection": [b"keep-alive"], b"upgrade": [b"tcp"]}))

    def test_other_protocols_are_not_spliced(self) -> None:
        self.assertFalse(self.wants({b"connection": [b"upgrade"], b"upgrade": [b"h2c"]}))
