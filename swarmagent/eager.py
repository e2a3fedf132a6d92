"""Writes sent at once, reads without recvmsg: the relay's sockets skip two Twisted detours.

Twisted's ``FileDescriptor.write`` never sends: it buffers, asks the reactor
to watch for writability (an ``epoll_ctl``), sends at the next poll, then
stops watching (another ``epoll_ctl``): twisted/twisted#5303, open since 2011.
A relayed request's small writes then cost four ``epoll_ctl`` calls and a
poll. :func:`send_at_once` makes one transport send when nothing is already
buffered, as asyncio does, and buffer only what the socket does not take;
and sets ``TCP_NODELAY`` on TCP, as asyncio does too (without it, Nagle and
delayed ACKs stall a relayed body's last segment by tens of milliseconds).

Twisted's unix transport reads with ``recvmsg`` to take the file descriptors
a peer may pass: :func:`read_plainly` makes one read with ``recv``, as TCP
does, where none are ever passed (the engine, the resource tree).

It reads ``FileDescriptor``'s buffer fields (``dataBuffer``, ``offset``,
``_tempDataLen``, ``_writeDisconnected``), which Twisted does not promise:
``tests/test_eager.py`` pins the behaviour relied on.
"""

from __future__ import annotations

import socket
from functools import partial

from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.protocols.policies import ProtocolWrapper


def socket_transport(transport: object) -> FileDescriptor | None:
    """The socket transport under ``transport`` (under a TLS layer, if any)."""
    if isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    return transport if isinstance(transport, FileDescriptor) else None


def send_at_once(transport: object) -> None:
    """Make the socket under ``transport`` send each write at once when it can."""
    fd = socket_transport(transport)
    sock = getattr(fd, "socket", None)
    if fd is None or not isinstance(sock, socket.socket):
        return
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffered = fd.write

    def write(data: bytes) -> None:
        if (
            data
            and fd.connected
            and not fd._writeDisconnected
            and not fd._tempDataLen
            and fd.offset == len(fd.dataBuffer)
        ):
            try:
                sent = sock.send(data)
            except OSError:
                # Full, or broken: the buffered write below meets the error
                # at the next poll and reports it as Twisted always does.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        buffered(data)

    # An instance attribute: only this connection's writes change.
    fd.write = write  # type: ignore[method-assign]


def read_plainly(transport: object) -> None:
    """Make the unix socket under ``transport`` read with ``recv``, not ``recvmsg``
    (file descriptors sent to it are then dropped by the kernel)."""
    fd = socket_transport(transport)
    sock = getattr(fd, "socket", None)
    unix = isinstance(sock, socket.socket) and sock.family == socket.AF_UNIX
    if isinstance(fd, tcp.Connection) and unix:
        # An instance attribute: only this connection's reads change.
        fd.doRead = partial(tcp.Connection.doRead, fd)  # type: ignore[method-assign]
