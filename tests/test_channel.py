"""Tests for :mod:`swarmagent.channel`: a request head too large gets 431 and a close."""

from __future__ import annotations

import json

from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.static import Data

from swarmagent import tls
from swarmagent.channel import AgentChannel
from swarmagent.halfclose import CLOSE_GRACE, HalfCloseTLSFactory
from swarmagent.tls import HTTP11Site
from tests.test_halfclose import IDENTITY, HalfRecorder

HEADER = b"X-H%d: " + b"a" * 990 + b"\r\n"


def one_line(size: int) -> bytes:
    """The start of a request whose one header line is ``size`` bytes (and not over yet)."""
    return b"GET /ping HTTP/1.1\r\nHost: agent\r\nX-Big: " + b"a" * size


def many_lines(size: int) -> bytes:
    """A request head of about ``size`` bytes in header lines of 1 KB (not ended yet)."""
    return b"GET /ping HTTP/1.1\r\nHost: agent\r\n" + b"".join(
        HEADER % i for i in range(size // 1000)
    )


def site(clock: Clock) -> HTTP11Site:
    root = Resource()
    root.putChild(b"ping", Data(b"pong", "text/plain"))
    return HTTP11Site(root, reactor=clock)


class ChannelTests(unittest.TestCase):
    def setUp(self) -> None:
        built = site(Clock()).buildProtocol(None)
        assert isinstance(built, AgentChannel)
        self.channel = built
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def assert_refused(self) -> None:
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"))
        self.assertIn(b"Connection: close", head)
        self.assertEqual(json.loads(body)["message"], "Request header fields too large")
        self.assertTrue(self.transport.disconnecting)

    def test_one_line_too_long(self) -> None:
        """A single header line past the limit (twisted.web: a close, no answer)."""
        self.channel.dataReceived(one_line(20_000))
        self.assert_refused()

    def test_many_lines_too_long(self) -> None:
        """Header lines adding up past the limit (twisted.web: a bare 400)."""
        self.channel.dataReceived(many_lines(20_000) + b"\r\n")
        self.assert_refused()

    def test_the_request_line_counts(self) -> None:
        self.channel.dataReceived(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n")
        self.assert_refused()

    def test_what_follows_is_ignored(self) -> None:
        """One answer, whatever the client still sends."""
        self.channel.dataReceived(one_line(20_000))
        answered = self.transport.value()
        for _ in range(20):
            self.channel.dataReceived(b"a" * 20_000)
        self.channel.dataReceived(b"\r\n\r\nGET /ping HTTP/1.1\r\nHost: agent\r\n\r\n")
        self.assertEqual(self.transport.value(), answered)

    def test_heads_within_the_limit_are_served(self) -> None:
        """The count starts again with each request on a kept-alive connection."""
        for _ in range(3):
            self.channel.dataReceived(many_lines(15_000) + b"\r\n")
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 200 OK"), 3)
        self.assertFalse(self.transport.disconnecting)


class OverTLSTests(unittest.TestCase):
    """The API listener's stack, in memory: ``HalfCloseTLS`` over the agent's ``Site``."""

    def setUp(self) -> None:
        self.clock = Clock()
        server = HalfCloseTLSFactory(tls.ServerTLS(IDENTITY), False, site(self.clock), self.clock)
        # A client that never answers the agent's close_notify with its own (and
        # could not be told apart from one still sending its head).
        self.client = HalfRecorder()
        client = HalfCloseTLSFactory(
            tls.ClientTLS(), True, Factory.forProtocol(lambda: self.client), self.clock
        )
        self.server_tls = server.buildProtocol(None)
        self.client_tls = client.buildProtocol(None)
        assert self.server_tls is not None and self.client_tls is not None
        self.pump = iosim.connect(
            self.server_tls,
            iosim.makeFakeServer(self.server_tls),
            self.client_tls,
            iosim.makeFakeClient(self.client_tls),
            clock=self.clock,
        )

    def send_and_keep_sending(self, head: bytes) -> None:
        for start in range(0, len(head), 16_384):
            self.client_tls.write(head[start : start + 16_384])
            self.pump.flush()
        # The client has not read the answer yet: it sends on.
        for _ in range(10):
            self.client_tls.write(b"a" * 16_384)
            self.pump.flush()

    def test_answer_then_close(self) -> None:
        for head in (one_line(20_000), many_lines(200_000), one_line(2_000_000)):
            with self.subTest(size=len(head)):
                self.setUp()
                self.send_and_keep_sending(head)
                self.assertTrue(self.client.data.startswith(b"HTTP/1.1 431 "))
                # The agent's close_notify has arrived; TCP is closed once the grace is over.
                self.assertTrue(self.client.read_closed)
                self.assertIsNone(self.client.lost)
                self.clock.advance(CLOSE_GRACE)
                self.pump.flush()
                self.assertIsNotNone(self.client.lost)
