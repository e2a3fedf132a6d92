"""The client end of an HTTP/1.1 upgrade: Docker's ``Upgrade: tcp`` hijack, or WebSocket.

twisted.web's ``Agent`` cannot hand a connection over after a ``101``, so the
agent speaks this much HTTP itself: :class:`UpgradeClient` writes the request,
reads the answer's head, and from then on hands every byte of the connection,
as it came, to its subclass (a tunnel's upstream side, a console's engine side).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

#: The longest answer head read, its blank line included.
MAX_HEAD = 64 * 1024


def upgrade_request(
    method: bytes,
    uri: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    upgrade: bytes,
    body: bytes,
) -> bytes:
    """A whole upgrade request: its head, asking for ``upgrade``, then ``body``."""
    lines = [method + b" " + uri + b" HTTP/1.1", b"Host: docker"]
    lines += [name + b": " + value for name, value in headers]
    lines += [b"Connection: Upgrade", b"Upgrade: " + upgrade, b"Content-Length: %d" % len(body)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@dataclass(frozen=True)
class Answer:
    """An answer's head: its status code, its headers, and its bytes as received."""

    code: int
    headers: Headers
    raw: bytes


class NoAnswerHead(Exception):
    """The upstream sent no usable answer head: too long, malformed, or none before closing."""


def parse_head(raw: bytes) -> Answer:
    """The answer whose head is ``raw`` (its blank line included)."""
    status, *fields = raw.removesuffix(b"\r\n\r\n").split(b"\r\n")
    version, _, rest = status.partition(b" ")
    code = rest.partition(b" ")[0]
    if not version.startswith(b"HTTP/") or len(code) != 3 or not code.isdigit():
        raise NoAnswerHead(f"malformed status line {status[:80]!r}")
    headers = Headers()
    for field in fields:
        name, colon, value = field.partition(b":")
        if not colon or not name or name != name.strip():
            raise NoAnswerHead(f"malformed header line {field[:80]!r}")
        headers.addRawHeader(name, value.strip())
    return Answer(int(code), headers, raw)


class UpgradeClient(Protocol):
    """Writes an upgrade request when connected, reads the answer head, then hands the stream over.

    Subclasses say what the answer means: :meth:`answerReceived` gets the head
    (any status; a refusal's body follows as stream bytes), :meth:`streamReceived`
    every byte after it, none lost, and :meth:`headFailed` why there is no head
    (the connection is then closed). The end of the connection, before or after
    the head, is ``connectionLost``, which subclasses extend.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        # What came of the head so far; None once it is read.
        self._head: bytes | None = b""
        # No usable head came: the connection is closing, nothing more is read.
        self._failed = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self._failed:
            return
        if self._head is None:
            self.streamReceived(data)
            return
        buffer = self._head + data
        # The blank line may have started in the last read; it must end within MAX_HEAD.
        end = buffer.find(b"\r\n\r\n", max(0, len(self._head) - 3), MAX_HEAD)
        if end < 0:
            if len(buffer) >= MAX_HEAD:
                self._fail(Failure(NoAnswerHead(f"answer head over {MAX_HEAD} bytes")))
            else:
                self._head = buffer
            return
        raw, rest = buffer[: end + 4], buffer[end + 4 :]
        try:
            answer = parse_head(raw)
        except NoAnswerHead:
            self._fail(Failure())
            return
        self._head = None
        self.answerReceived(answer)
        if rest:
            self.streamReceived(rest)

    def _fail(self, reason: Failure) -> None:
        self._failed = True
        self.headFailed(reason)
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._head is not None and not self._failed:
            why = reason.getErrorMessage()
            self.headFailed(Failure(NoAnswerHead(f"closed before the answer head: {why}")))

    def answerReceived(self, answer: Answer) -> None:
        """The answer head has come; stream bytes follow."""

    def streamReceived(self, data: bytes) -> None:
        """Bytes that came after the answer head, in order."""
        raise NotImplementedError

    def headFailed(self, reason: Failure) -> None:
        """No usable answer head came (``reason`` wraps a :class:`NoAnswerHead`)."""
