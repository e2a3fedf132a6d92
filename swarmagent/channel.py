"""The API's HTTP channel: a request head too large is refused with 431, and the connection closed.

twisted.web's ``HTTPChannel`` bounds a request's head (request line and
headers, ``totalHeadersSize``, 16 KiB) but, past it, either answers a bare 400
(many header lines) or, for one line longer than that (``LineReceiver``'s
``lineLengthExceeded``), closes the transport directly without unregistering
the channel as its producer: over TLS the close then waits for that producer
forever, so the client got neither an answer nor a close while it kept
sending. Here both answer 431 (RFC 6585) and close through the channel, and
whatever the client still sends is ignored; the TLS layer
(:mod:`swarmagent.halfclose`) then closes TCP shortly after its close_notify.
"""

from __future__ import annotations

import json

from twisted.web.http import HTTPChannel

#: The whole answer: the connection is closed after it.
TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Content-Type: application/json\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)


class AgentChannel(HTTPChannel):
    """``HTTPChannel`` that answers a head over ``totalHeadersSize`` with 431."""

    _head_size = 0
    _refused = False

    def dataReceived(self, data: bytes) -> None:
        # After the refusal nothing the client sends is parsed (nor resets the idle timeout).
        if not self._refused:
            super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        # Counted as twisted.web counts it (the request line and each header line),
        # checked first so that the answer is 431 rather than its bare 400.
        self._head_size += len(line)
        if self._head_size > self.totalHeadersSize:
            self._too_large()
            return
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        self._head_size = 0
        super().allHeadersReceived()

    def lineLengthExceeded(self, line: bytes) -> None:
        # One line (request line or header) longer than the whole head may be.
        self._too_large()

    def _too_large(self) -> None:
        if self._refused:
            return
        self._refused = True
        body = json.dumps(
            {
                "message": "Request header fields too large",
                "details": f"the request line and headers exceed {self.totalHeadersSize} bytes",
            }
        ).encode("utf-8")
        assert self.transport is not None
        self.transport.write(TOO_LARGE % (len(body), body))
        # The channel's own close: it unregisters itself as the transport's producer first.
        self.loseConnection()
