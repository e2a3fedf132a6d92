"""The API's HTTP channel: a request head too large is refused with 431, one whose
lines end in a bare LF with 400, and the connection closed.

twisted.web's ``HTTPChannel`` bounds a request's head (request line and
headers, ``totalHeadersSize``, 16 KiB) but, past it, either answers a bare 400
(many header lines) or, for one line longer than that (``LineReceiver``'s
``lineLengthExceeded``), closes the transport directly without unregistering
the channel as its producer: over TLS the close then waits for that producer
forever, so the client got neither an answer nor a close while it kept
sending. Here both answer 431 (RFC 6585) and close through the channel, and
whatever the client still sends is ignored; the TLS layer
(:mod:`swarmagent.halfclose`) then closes TCP shortly after its close_notify.

twisted.web ends a head's lines at CRLF only: a head whose lines end in a bare
LF (``GET /ping HTTP/1.1\n\n``, which RFC 9112 lets a server accept or
refuse) never ends, and the client waited for the idle timeout (found by
``bench/fuzz.py``). It is refused with 400 as soon as its first bare LF
arrives; so is a request target that is not visible ASCII, which twisted.web
takes and the relay could not.
"""

from __future__ import annotations

import json
import re

from twisted.web.http import HTTPChannel

#: The whole answer (a status line, then the length and body): the connection is closed after it.
REFUSAL = (
    b"HTTP/1.1 %s\r\n"
    b"Content-Type: application/json\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)
TOO_LARGE = b"431 Request Header Fields Too Large"
BAD_REQUEST = b"400 Bad Request"


#: A request target's bytes: visible ASCII (non-ASCII is percent-encoded).
_TARGET = re.compile(rb"[\x21-\x7e]+")


def _target_ok(line: bytes) -> bool:
    """Whether a request line's target, if it has the three parts twisted.web
    reads (it refuses the others), is visible ASCII: twisted.web takes any byte,
    and the relay's URL parsing failed on the others (a 500, found by bench/fuzz.py)."""
    parts = line.split(b" ")
    return len(parts) != 3 or _TARGET.fullmatch(parts[1]) is not None


class AgentChannel(HTTPChannel):
    """``HTTPChannel`` that answers a head over ``totalHeadersSize`` with 431,
    and a head line ended by a bare LF or a request target of other bytes than
    visible ASCII with 400."""

    _head_size = 0
    _refused = False
    _receiving = 0
    _closing = False

    def dataReceived(self, data: bytes) -> None:
        # After the refusal nothing the client sends is parsed (nor resets the idle timeout).
        if self._refused:
            return
        # A request finished while its data is parsed feeds the rest back in
        # here; LineReceiver only buffers that, for the outer call to parse.
        self._receiving += 1
        try:
            super().dataReceived(data)
        finally:
            self._receiving -= 1
        # Once parsed, between heads' lines (not in a body, nor paused with
        # requests queued) the buffer holds the start of one line, without a
        # CRLF: any LF in it is bare.
        if self._receiving or self._refused or not self.line_mode or self.paused:
            return
        # Closing (twisted.web refused the request itself, say): parsing
        # stopped mid-buffer, leaving what followed there, CRLFs and all.
        if self._closing:
            return
        if b"\n" in self._buffer:
            self._refuse(
                BAD_REQUEST,
                "Bad request",
                "a request line or header ends in a bare LF; HTTP/1.1 lines end in CRLF",
            )

    def lineReceived(self, line: bytes) -> None:
        # The first line of a head (twisted.web skips one empty line before it).
        request_line = self._head_size == 0 and line != b""
        # Counted as twisted.web counts it (the request line and each header line),
        # checked first so that the answer is 431 rather than its bare 400.
        self._head_size += len(line)
        if self._head_size > self.totalHeadersSize:
            self._too_large()
            return
        if request_line and not _target_ok(line):
            self._refuse(
                BAD_REQUEST,
                "Bad request",
                "the request target holds a byte that is not visible ASCII (RFC 9112 section 3.2)",
            )
            return
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        self._head_size = 0
        super().allHeadersReceived()

    def lineLengthExceeded(self, line: bytes) -> None:
        # One line (request line or header) longer than the whole head may be.
        self._too_large()

    def loseConnection(self) -> None:
        self._closing = True
        super().loseConnection()

    def _too_large(self) -> None:
        self._refuse(
            TOO_LARGE,
            "Request header fields too large",
            f"the request line and headers exceed {self.totalHeadersSize} bytes",
        )

    def _refuse(self, status: bytes, message: str, details: str) -> None:
        if self._refused:
            return
        self._refused = True
        body = json.dumps({"message": message, "details": details}).encode("utf-8")
        assert self.transport is not None
        self.transport.write(REFUSAL % (status, len(body), body))
        # The channel's own close: it unregisters itself as the transport's producer first.
        self.loseConnection()
