"""send_at_once: a write reaches the socket before the reactor runs again;
read_plainly: a unix socket reads with recv."""

from __future__ import annotations

import os
import socket
from typing import cast

from twisted.internet import reactor
from twisted.internet.interfaces import IAddress, IFileDescriptorReceiver, IReactorSocket
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from swarmagent.eager import read_plainly, send_at_once, socket_transport


@implementer(IFileDescriptorReceiver)
class _Recording(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.descriptors: list[int] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self.descriptors.append(descriptor)
        os.close(descriptor)


class _Kept(ServerFactory):
    def __init__(self) -> None:
        self.built: list[_Recording] = []

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        protocol = _Recording()
        self.built.append(protocol)
        return protocol


class _Adopted(TestCase):
    def connected(
        self, family: socket.AddressFamily = socket.AF_UNIX
    ) -> tuple[_Recording, socket.socket]:
        """A protocol on a real adopted socket, and the socket at the other end."""
        if family == socket.AF_UNIX:
            ours, theirs = socket.socketpair()
        else:
            listener = socket.socket(family)
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            theirs = socket.create_connection(listener.getsockname())
            ours, _ = listener.accept()
            listener.close()
        ours.setblocking(False)
        factory = _Kept()
        cast(IReactorSocket, reactor).adoptStreamConnection(ours.fileno(), family, factory)
        ours.close()
        [protocol] = factory.built
        theirs.settimeout(5)
        self.addCleanup(theirs.close)
        assert protocol.transport is not None
        self.addCleanup(protocol.transport.abortConnection)  # type: ignore[attr-defined]
        return protocol, theirs


class SendAtOnceTests(_Adopted):
    def test_sent_without_the_reactor(self) -> None:
        protocol, other = self.connected()
        send_at_once(protocol.transport)
        assert protocol.transport is not None
        protocol.transport.write(b"now")
        # No reactor turn has run since the write.
        self.assertEqual(other.recv(10), b"now")

    def test_stock_write_waits_for_the_reactor(self) -> None:
        # What send_at_once changes: the stock transport has not sent yet.
        protocol, other = self.connected()
        assert protocol.transport is not None
        protocol.transport.write(b"later")
        other.setblocking(False)
        with self.assertRaises(BlockingIOError):
            other.recv(10)

    async def test_buffered_writes_keep_their_order(self) -> None:
        protocol, other = self.connected()
        fd = socket_transport(protocol.transport)
        assert fd is not None
        send_at_once(fd)
        size = 8 * 1024 * 1024  # more than the socket takes at once
        fd.write(b"a" * size)
        self.assertTrue(fd._tempDataLen or fd.offset < len(fd.dataBuffer))
        fd.write(b"tail")  # buffered behind the rest, not sent ahead of it
        other.setblocking(False)
        received = bytearray()
        while len(received) < size + 4:
            try:
                received += other.recv(1 << 20)
            except BlockingIOError:
                await deferLater(reactor, 0.001, lambda: None)
        self.assertEqual(bytes(received[-5:]), b"atail")

    def test_tcp_nodelay(self) -> None:
        protocol, _ = self.connected(socket.AF_INET)
        send_at_once(protocol.transport)
        fd = socket_transport(protocol.transport)
        sock = getattr(fd, "socket", None)
        assert isinstance(sock, socket.socket)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)


class ReadPlainlyTests(_Adopted):
    async def sent(self, plainly: bool) -> _Recording:
        """A protocol sent a descriptor (stdin's) with its data: what it got."""
        protocol, other = self.connected()
        if plainly:
            read_plainly(protocol.transport)
        socket.send_fds(other, [b"data"], [0])
        while not protocol.data:
            await deferLater(reactor, 0.001, lambda: None)
        return protocol

    async def test_data_without_the_descriptors(self) -> None:
        protocol = await self.sent(plainly=True)
        self.assertEqual((protocol.data, protocol.descriptors), (b"data", []))

    async def test_stock_reads_take_descriptors(self) -> None:
        # What read_plainly changes.
        protocol = await self.sent(plainly=False)
        self.assertEqual(protocol.data, b"data")
        self.assertEqual(len(protocol.descriptors), 1)
