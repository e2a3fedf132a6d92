"""Tests for :mod:`swarmagent.upgrade`: the upgrade client on an in-memory transport."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from swarmagent.upgrade import (
    MAX_HEAD,
    Answer,
    NoAnswerHead,
    UpgradeClient,
    parse_head,
    upgrade_request,
)

REQUEST = upgrade_request(b"POST", b"/exec/e1/start", [], b"tcp", b'{"Tty":true}')
UPGRADED = (
    b"HTTP/1.1 101 UPGRADED\r\n"
    b"Content-Type: application/vnd.docker.raw-stream\r\n"
    b"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
)
# Bytes that look like a head, and a blank line, in the stream: never parsed.
STREAM = b"\x01\x00\x00\x00\x00\x00\x00\x05hello HTTP/1.1 200 OK\r\n\r\nworld"


class Recorder(UpgradeClient):
    """Records what the client hands over, in order."""

    def __init__(self) -> None:
        super().__init__(REQUEST)
        self.answers: list[Answer] = []
        self.stream = b""
        self.failures: list[Failure] = []
        self.order: list[str] = []

    def answerReceived(self, answer: Answer) -> None:
        self.answers.append(answer)
        self.order.append("answer")

    def streamReceived(self, data: bytes) -> None:
        self.stream += data
        self.order.append("stream")

    def headFailed(self, reason: Failure) -> None:
        self.failures.append(reason)
        self.order.append("failed")


def connected() -> tuple[Recorder, StringTransport]:
    client = Recorder()
    transport = StringTransport()
    client.makeConnection(transport)
    return client, transport


class RequestTests(SynchronousTestCase):
    def test_written_when_connected(self) -> None:
        client, transport = connected()
        self.assertEqual(transport.value(), REQUEST)
        self.assertEqual(client.order, [])

    def test_request_bytes(self) -> None:
        headers = [(b"X-A", b"1"), (b"X-A", b"2")]
        sent = upgrade_request(b"POST", b"/containers/c/attach?stream=1", headers, b"tcp", b"in")
        self.assertEqual(
            sent,
            b"POST /containers/c/attach?stream=1 HTTP/1.1\r\nHost: docker\r\n"
            b"X-A: 1\r\nX-A: 2\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
            b"Content-Length: 2\r\n\r\nin",
        )


class HeadTests(SynchronousTestCase):
    def assertUpgraded(self, client: Recorder, transport: StringTransport) -> None:
        [answer] = client.answers
        self.assertEqual(answer.code, 101)
        self.assertEqual(answer.headers.getRawHeaders(b"upgrade"), [b"tcp"])
        self.assertEqual(answer.raw, UPGRADED)
        self.assertEqual(client.stream, STREAM)
        self.assertEqual(client.failures, [])
        self.assertEqual(client.order[0], "answer")
        self.assertFalse(transport.disconnecting)

    def test_split_at_every_byte(self) -> None:
        data = UPGRADED + STREAM
        for at in range(len(data) + 1):
            with self.subTest(at=at):
                client, transport = connected()
                client.dataReceived(data[:at])
                client.dataReceived(data[at:])
                self.assertUpgraded(client, transport)

    def test_byte_by_byte(self) -> None:
        client, transport = connected()
        for i in range(len(UPGRADED + STREAM)):
            client.dataReceived((UPGRADED + STREAM)[i : i + 1])
        self.assertUpgraded(client, transport)

    @given(st.lists(st.integers(min_value=0, max_value=len(UPGRADED + STREAM)), max_size=8))
    def test_any_cuts(self, cuts: list[int]) -> None:
        data = UPGRADED + STREAM
        client, transport = connected()
        at = 0
        for cut in [*sorted(cuts), len(data)]:
            client.dataReceived(data[at:cut])
            at = cut
        self.assertUpgraded(client, transport)

    def test_bytes_after_the_head_in_the_same_read(self) -> None:
        client, _ = connected()
        client.dataReceived(UPGRADED + b"first")
        client.dataReceived(b"second")
        self.assertEqual(client.order, ["answer", "stream", "stream"])
        self.assertEqual(client.stream, b"firstsecond")

    def test_nothing_after_the_head(self) -> None:
        client, _ = connected()
        client.dataReceived(UPGRADED)
        self.assertEqual(client.order, ["answer"])

    def test_refusal_with_a_body(self) -> None:
        """Any status is an answer; a refusal's body is handed over like a stream."""
        body = b'{"message":"No such exec instance: e1"}'
        head = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
        head += b"Content-Length: %d\r\n\r\n" % len(body)
        client, transport = connected()
        client.dataReceived(head + body[:10])
        client.dataReceived(body[10:])
        [answer] = client.answers
        self.assertEqual(answer.code, 404)
        self.assertEqual(answer.headers.getRawHeaders(b"content-length"), [b"%d" % len(body)])
        self.assertEqual(answer.raw, head)
        self.assertEqual(client.stream, body)
        self.assertFalse(transport.disconnecting, "closing is the subclass's call")

    def test_head_of_the_largest_size(self) -> None:
        filler = b"X-Filler: " + b"a" * (MAX_HEAD - len(UPGRADED) - len(b"X-Filler: \r\n"))
        head = UPGRADED[:-2] + filler + b"\r\n\r\n"
        self.assertEqual(len(head), MAX_HEAD)
        client, _ = connected()
        client.dataReceived(head + b"out")
        self.assertEqual([a.raw for a in client.answers], [head])
        self.assertEqual(client.stream, b"out")


class FailureTests(SynchronousTestCase):
    def assertFailed(self, client: Recorder, text: str) -> None:
        self.assertEqual(client.answers, [])
        self.assertEqual(client.stream, b"")
        [reason] = client.failures
        self.assertIsInstance(reason.value, NoAnswerHead)
        self.assertIn(text, reason.getErrorMessage())

    def test_oversized_head(self) -> None:
        client, transport = connected()
        line = b"X-Filler: " + b"a" * 1000 + b"\r\n"
        client.dataReceived(b"HTTP/1.1 101 UPGRADED\r\n")
        while not transport.disconnecting:
            client.dataReceived(line)
        self.assertFailed(client, f"over {MAX_HEAD} bytes")
        # Once failed, nothing more is read as a head or handed over.
        client.dataReceived(b"\r\n" + STREAM)
        client.connectionLost(Failure(ConnectionDone()))
        self.assertFailed(client, f"over {MAX_HEAD} bytes")

    def test_head_one_byte_over(self) -> None:
        filler = b"X-Filler: " + b"a" * (MAX_HEAD + 1 - len(UPGRADED) - len(b"X-Filler: \r\n"))
        head = UPGRADED[:-2] + filler + b"\r\n\r\n"
        self.assertEqual(len(head), MAX_HEAD + 1)
        client, transport = connected()
        client.dataReceived(head)
        self.assertFailed(client, f"over {MAX_HEAD} bytes")
        self.assertTrue(transport.disconnecting)

    def test_blank_line_past_the_limit_in_one_read(self) -> None:
        filler = b"X-Filler: " + b"a" * MAX_HEAD + b"\r\n"
        client, transport = connected()
        client.dataReceived(UPGRADED[:-2] + filler + b"\r\n" + STREAM)
        self.assertFailed(client, f"over {MAX_HEAD} bytes")
        self.assertTrue(transport.disconnecting)

    def test_malformed_status_line(self) -> None:
        for status in (b"SSH-2.0-OpenSSH_9.2", b"HTTP/1.1 1O1 UPGRADED", b"HTTP/1.1", b""):
            with self.subTest(status=status):
                client, transport = connected()
                client.dataReceived(status + b"\r\nUpgrade: tcp\r\n\r\n" + STREAM)
                self.assertFailed(client, "malformed status line")
                self.assertTrue(transport.disconnecting)

    def test_malformed_header_line(self) -> None:
        for line in (b"no colon", b": no name", b"Upgrade : tcp"):
            with self.subTest(line=line):
                client, transport = connected()
                client.dataReceived(b"HTTP/1.1 101 UPGRADED\r\n" + line + b"\r\n\r\n")
                self.assertFailed(client, "malformed header line")
                self.assertTrue(transport.disconnecting)

    def test_closed_before_the_head(self) -> None:
        for sent in (b"", b"HTTP/1.1 101 UPGR", UPGRADED[:-1]):
            with self.subTest(sent=sent):
                client, _ = connected()
                client.dataReceived(sent)
                client.connectionLost(Failure(ConnectionLost("reset by peer")))
                self.assertFailed(client, "closed before the answer head: ")
                self.assertIn("reset by peer", client.failures[0].getErrorMessage())

    def test_closed_after_the_head_is_no_failure(self) -> None:
        client, _ = connected()
        client.dataReceived(UPGRADED + b"out")
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((client.order, client.stream), (["answer", "stream"], b"out"))


class ParseHeadTests(SynchronousTestCase):
    def test_headers_kept_in_order_and_repeated(self) -> None:
        answer = parse_head(b"HTTP/1.0 200 OK fine\r\nA: 1\r\nB:2 \r\na: 3\r\n\r\n")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.headers.getRawHeaders(b"a"), [b"1", b"3"])
        self.assertEqual(answer.headers.getRawHeaders(b"b"), [b"2"])

    def test_no_phrase(self) -> None:
        self.assertEqual(parse_head(b"HTTP/1.1 101\r\n\r\n").code, 101)
