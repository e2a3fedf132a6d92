"""TLS connections that can be half-closed, as Docker's hijacked streams need.

A hijacked ``attach``/``exec`` stream ends its input with a half-close: over
TCP a FIN, over TLS a ``close_notify`` alert (Go's ``tls.Conn.CloseWrite``,
which the docker CLI calls when stdin ends, sends the alert and leaves the TCP
connection open). The stock ``TLSMemoryBIOProtocol`` takes a received
``close_notify`` as the end of the whole connection: it answers with its own
and closes TCP, so the process could never send the output that follows the
end of its input. Its ``loseWriteConnection`` is not TLS-aware either: the
call falls through ``ProtocolWrapper.__getattr__`` to TCP and sends a bare FIN,
which the next TLS layer reads as a truncated (hence whole) close.

TLS allows half-close (RFC 8446 section 6.1; TLS 1.2 peers do it in practice),
and OpenSSL keeps writing after receiving ``close_notify``; only *sending*
one ends the writes. :class:`HalfCloseTLS` uses that, and only when the
wrapped protocol provides ``IHalfCloseableProtocol`` (the tunnel's two sides):
HTTP channels and pooled HTTP clients keep the stock behaviour.

- A received ``close_notify`` is ``readConnectionLost``: no reply alert, TCP
  stays open, writes go on.
- ``loseWriteConnection`` sends ``close_notify`` once the data already written
  is out, and keeps reading until the peer closes.

A whole close (``loseConnection``) sends ``close_notify`` and, as the stock
transport does, waits for the peer's before closing TCP, but only for
:data:`CLOSE_GRACE` seconds: a peer that never answers with its own (a client
still sending a request the agent refused) would otherwise hold the
connection for as long as it keeps sending.
"""

from __future__ import annotations

from typing import cast

from OpenSSL.SSL import RECEIVED_SHUTDOWN, SENT_SHUTDOWN, Error, WantReadError, ZeroReturnError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

#: Seconds a whole close waits for the peer's close_notify before closing TCP
#: (Go's HTTP server waits 500 ms before closing a connection it refused).
CLOSE_GRACE = 0.5


class HalfCloseTLS(BufferingTLSTransport):
    """A TLS transport whose two directions close separately.

    Overrides private methods of ``TLSMemoryBIOProtocol`` (Twisted has no hook
    for what a ``close_notify`` means); ``tests/test_halfclose.py`` pins the
    behaviour relied on.
    """

    # The peer's close_notify was passed on as readConnectionLost.
    _peer_closed = False
    # loseWriteConnection was called: close_notify goes once the buffer is out.
    _write_closing = False
    # A whole close's wait for the peer's close_notify.
    _grace: IDelayedCall | None = None

    def _sent_close_notify(self) -> bool:
        tls = self._tlsConnection
        return tls is not None and bool(tls.get_shutdown() & SENT_SHUTDOWN)

    def _half_closeable(self) -> bool:
        # Checked when the alert arrives, not at connection time: the tunnel
        # takes the connection over from twisted.web mid-stream.
        return IHalfCloseableProtocol.providedBy(self.wrappedProtocol)

    def _flushReceiveBIO(self) -> None:
        # TLSMemoryBIOProtocol._flushReceiveBIO, but for ZeroReturnError
        # (close_notify received), which it turns into a whole close.
        while not self._lostTLSConnection:
            try:
                data = self._tlsConnection.recv(2**15)
            except WantReadError:
                break
            except ZeroReturnError:
                if self._half_closeable() and not self._sent_close_notify():
                    # Only the peer's direction ended. OpenSSL keeps
                    # answering ZeroReturnError, so report it once, and
                    # ignore anything the peer (wrongly) sends after it.
                    if not self._peer_closed:
                        self._peer_closed = True
                        IHalfCloseableProtocol(self.wrappedProtocol).readConnectionLost()
                    break
                # Both directions are done (or the protocol cannot take a
                # half-close): the stock whole close.
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
        self._flushSendBIO()

    def _shutdownTLS(self) -> None:
        # Once our close_notify is out, a second SSL_shutdown would read (and
        # discard) what the peer still sends while it waits for the peer's
        # alert. So send it once; after that, only close TCP when both
        # alerts have been exchanged, as the stock method does.
        tls = self._tlsConnection
        if tls is not None and tls.get_shutdown() & SENT_SHUTDOWN:
            if tls.get_shutdown() & RECEIVED_SHUTDOWN:
                assert self.transport is not None
                self.transport.loseConnection()
            else:
                self._wait_for_peer()
            return
        super()._shutdownTLS()
        self._wait_for_peer()

    def _wait_for_peer(self) -> None:
        # Only a whole close is bounded: after loseWriteConnection alone the
        # peer may go on sending for as long as it likes.
        if not self.disconnecting or self._grace is not None or self.transport is None:
            return
        factory = cast(HalfCloseTLSFactory, self.factory)
        self._grace = factory.clock.callLater(factory.close_grace, self._give_up_on_peer)

    def _give_up_on_peer(self) -> None:
        self._grace = None
        # TCP's own close: what is still buffered is sent first.
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        super().connectionLost(reason)

    def _write(self, data: bytes) -> None:
        # After close_notify OpenSSL refuses to send, and the parent would
        # take that refusal for a broken connection: drop late writes, as a
        # TCP transport does after loseWriteConnection.
        if self._sent_close_notify():
            return
        super()._write(data)

    def write_now(self, data: bytes) -> None:
        """:meth:`write`, but encrypted and sent now, after what the aggregator
        holds: not at the next reactor turn (whose scheduling, an extra poll
        and a timer, costs more than a small answer's TLS record)."""
        self._aggregator.flush()
        TLSMemoryBIOProtocol.write(self, data)

    def loseWriteConnection(self) -> None:
        """Send close_notify after the data already written; keep reading."""
        if self._write_closing or self.disconnecting or not self.connected:
            return
        self._write_closing = True
        # Small writes wait in the aggregator for the next reactor turn.
        self._aggregator.flush()
        self._close_write_if_ready()

    def _close_write_if_ready(self) -> None:
        # Writes made during the handshake wait in _appSendBuffer, and
        # SSL_shutdown during the handshake sends nothing: wait for both.
        if self._write_closing and self._handshakeDone and not self._appSendBuffer:
            self._shutdownTLS()

    def _unbufferPendingWrites(self) -> None:
        super()._unbufferPendingWrites()
        self._close_write_if_ready()

    def _checkHandshakeStatus(self) -> None:
        super()._checkHandshakeStatus()
        self._close_write_if_ready()


class HalfCloseTLSFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` whose connections are :class:`HalfCloseTLS`."""

    protocol = HalfCloseTLS

    def __init__(
        self,
        contextFactory: IOpenSSLServerConnectionCreator | IOpenSSLClientConnectionCreator,
        isClient: bool,
        wrappedFactory: IProtocolFactory,
        clock: IReactorTime | None = None,
        close_grace: float = CLOSE_GRACE,
    ) -> None:
        """``close_grace`` bounds a whole close's wait for the peer's close_notify."""
        super().__init__(contextFactory, isClient, wrappedFactory, clock)
        #: The clock of the close grace (the reactor unless given).
        self.clock = self._clock
        self.close_grace = close_grace


@implementer(IStreamClientEndpoint)
class HalfCloseTLSEndpoint:
    """``wrapClientTLS`` with :class:`HalfCloseTLS` connections."""

    def __init__(
        self, creator: IOpenSSLClientConnectionCreator, inner: IStreamClientEndpoint
    ) -> None:
        self._creator = creator
        self._inner = inner

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        tls = HalfCloseTLSFactory(self._creator, True, protocolFactory)
        return self._inner.connect(tls).addCallback(_unwrap)


def _unwrap(protocol: IProtocol) -> IProtocol:
    # Like wrapClientTLS: the caller gets its own protocol, not the TLS wrapper.
    assert isinstance(protocol, ProtocolWrapper)
    return protocol.wrappedProtocol
