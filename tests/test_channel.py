"""Tests for :mod:`swarmagent.channel`: a request head too large gets 431, one with
bare LF line ends 400, and a close."""

from __future__ import annotations

import json

from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.static import Data

from swarmagent import tls
from swarmagent.channel import AgentChannel
from swarmagent.halfclose import CLOSE_GRACE, HalfCloseTLSFactory
from swarmagent.tls import HTTP11Site
from swarmagent.twisted_types import request_body
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
    root.putChild(b"echo", Echo())
    return HTTP11Site(root, reactor=clock)


class Echo(Resource):
    """Answers a request with its body."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        content = request_body(request)
        assert content is not None
        return bytes(content.read())


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


class BareLineFeedTests(unittest.TestCase):
    """A head whose lines end in a bare LF (twisted.web waits for a CRLF until
    the idle timeout) gets 400 and a close; an LF in a body is the body's."""

    def setUp(self) -> None:
        built = site(Clock()).buildProtocol(None)
        assert isinstance(built, AgentChannel)
        self.channel = built
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def assert_refused(self) -> None:
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), head)
        self.assertIn(b"Connection: close", head)
        self.assertIn("bare LF", json.loads(body)["details"])
        self.assertTrue(self.transport.disconnecting)

    def test_request_line(self) -> None:
        self.channel.dataReceived(b"GET /ping HTTP/1.1\n\n")
        self.assert_refused()

    def test_header_line(self) -> None:
        self.channel.dataReceived(b"GET /ping HTTP/1.1\r\nHost: agent\n\n")
        self.assert_refused()

    def test_byte_by_byte(self) -> None:
        """A CR and its LF in separate reads are a CRLF; a lone LF is refused when it comes."""
        for byte in b"GET /ping HTTP/1.1\r\nHost: agent\r":
            self.channel.dataReceived(bytes([byte]))
        self.channel.dataReceived(b"\n")
        self.assertEqual(self.transport.value(), b"")
        self.channel.dataReceived(b"X: 1\n")
        self.assert_refused()

    def test_what_follows_is_ignored(self) -> None:
        self.channel.dataReceived(b"GET /ping HTTP/1.1\n")
        answered = self.transport.value()
        self.channel.dataReceived(b"\r\n\r\nGET /ping HTTP/1.1\r\nHost: agent\r\n\r\n")
        self.assertEqual(self.transport.value(), answered)

    def test_after_twisted_web_refused(self) -> None:
        """Its own refusal stops parsing mid-buffer: one answer, no second close."""
        self.channel.dataReceived(
            b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n"
        )
        out = self.transport.value()
        self.assertEqual(out.count(b"HTTP/1.1 "), 1, out)
        self.assertNotIn(b"bare LF", out)
        self.assertTrue(self.transport.disconnecting)

    def test_line_feeds_in_bodies_are_served(self) -> None:
        """Bodies with LFs, sized and chunked, pipelined in one read, each answered."""
        sized = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\na\nb\n\n"
        chunked = (
            b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nc\nd\r\n0\r\n\r\n"
        )
        self.channel.dataReceived(sized + chunked + sized)
        out = self.transport.value()
        self.assertEqual(out.count(b"HTTP/1.1 200 OK"), 3, out)
        self.assertIn(b"a\nb\n\n", out)
        self.assertIn(b"c\nd", out)
        self.assertFalse(self.transport.disconnecting)


class RequestTargetTests(unittest.TestCase):
    """A request target of other bytes than visible ASCII gets 400 and a close."""

    def setUp(self) -> None:
        built = site(Clock()).buildProtocol(None)
        assert isinstance(built, AgentChannel)
        self.channel = built
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def test_refused(self) -> None:
        for target in (b"\x80/ping", b"/p\xc3\xa9", b"/ping\x7f", b"/a\x00b"):
            with self.subTest(target=target):
                self.setUp()
                self.channel.dataReceived(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
                head, _, body = self.transport.value().partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), head)
                self.assertIn("request target", json.loads(body)["details"])
                self.assertTrue(self.transport.disconnecting)

    def test_encoded_is_served(self) -> None:
        """Percent-encoded bytes, and a request line after the one empty line twisted.web skips."""
        self.channel.dataReceived(b"\r\nGET /ping?q=%C3%A9 HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 OK"))
        self.channel.dataReceived(b"GET /ping HTTP/1.1\r\nHost: a\r\nX: \xc3\xa9\r\n\r\n")
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 200 OK"), 2)
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
