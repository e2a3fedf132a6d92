"""Portainer's WebSocket consoles: the handshake, the engine upgrade, the relay."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from swarmagent import __version__
from swarmagent.websocket import (
    ConsoleFactory,
    ConsoleProtocol,
    ConsoleResource,
    Utf8Frames,
    engine_request,
)
from tests.helpers import CLIENT, Client, make_site, parse_response

EXEC_ID = "0123456789abcdef"
UPGRADED = b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\n"
UPGRADED += b"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
TEXT, BINARY, CLOSE = 0x1, 0x2, 0x8


# --- WebSocket framing, as a browser would send and read it -------------------


def client_frame(payload: bytes, opcode: int = TEXT) -> bytes:
    """One masked frame, as a client must send it."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big") if n else 0
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big") if n else b""
    return head + mask + masked


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked frame in ``data``."""
    frames = []
    while data:
        opcode, n = data[0] & 0x0F, data[1] & 0x7F
        at = 2
        if n == 126:
            n, at = int.from_bytes(data[2:4], "big"), 4
        elif n == 127:
            n, at = int.from_bytes(data[2:10], "big"), 10
        frames.append((opcode, data[at : at + n]))
        data = data[at + n :]
    return frames


def handshake(path: str, extra: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: agent.test\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


class Wire(StringTransport):
    """A StringTransport that, like TCP and TLS transports, lets
    ``unregisterProducer`` be called with no producer (autobahn does)."""

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


# --- a fake engine, reached through the injected endpoint factory ---------------


@implementer(IStreamClientEndpoint)
@dataclass
class FakeEngineEndpoint:
    """Connects each console to a StringTransport, or fails to."""

    refuse: bool = False
    connections: list[tuple[Protocol, Wire]] = field(default_factory=list)

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        if self.refuse:
            return fail(ConnectionRefusedError("engine down"))
        # As an object: mypy-zope would narrow the IProtocol to nothing.
        protocol: object = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2375))
        assert isinstance(protocol, Protocol)
        transport = Wire()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)


@implementer(IAgentEndpointFactory)
@dataclass
class FakeEndpoints:
    endpoint: FakeEngineEndpoint

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return self.endpoint


class ConsoleCase(SynchronousTestCase):
    MAX_MESSAGE = 256 * 1024

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.engine = FakeEngineEndpoint()
        self.factory = ConsoleFactory(
            FakeEndpoints(self.engine), self.clock, max_message=self.MAX_MESSAGE
        )

    def open(self, path: str = f"/websocket/exec?id={EXEC_ID}", extra: str = "") -> ConsoleProtocol:
        """A client's console connection, its handshake sent."""
        protocol = self.factory.buildProtocol(CLIENT)
        assert isinstance(protocol, ConsoleProtocol)
        self.client = Wire(peerAddress=CLIENT)
        protocol.makeConnection(self.client)
        protocol.dataReceived(handshake(path, extra))
        return protocol

    @property
    def engine_side(self) -> Protocol:
        self.assertEqual(len(self.engine.connections), 1)
        return self.engine.connections[0][0]

    @property
    def engine_wire(self) -> Wire:
        return self.engine.connections[0][1]

    def head_and_frames(self) -> tuple[bytes, list[tuple[int, bytes]]]:
        head, sep, rest = self.client.value().partition(b"\r\n\r\n")
        self.assertTrue(sep, "an answer head")
        return head, server_frames(rest)

    def opened(self, path: str = f"/websocket/exec?id={EXEC_ID}") -> ConsoleProtocol:
        """A console whose engine has switched protocols."""
        protocol = self.open(path)
        self.engine_side.dataReceived(UPGRADED)
        return protocol

    def received(self) -> list[tuple[int, bytes]]:
        return self.head_and_frames()[1]


class HandshakeTests(ConsoleCase):
    def test_exec_starts_with_tty_and_upgrade(self) -> None:
        self.open()
        sent = self.engine_wire.value()
        self.assertEqual(sent, engine_request("exec", EXEC_ID))
        head, _, body = sent.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(f"POST /exec/{EXEC_ID}/start HTTP/1.1\r\n".encode()))
        for header in (b"Connection: Upgrade", b"Upgrade: tcp", b"Content-Type: application/json"):
            self.assertIn(header, head.split(b"\r\n"))
        self.assertEqual(json.loads(body), {"Tty": True, "Detach": False})
        self.assertEqual(self.client.value(), b"", "no answer before the engine's")

    def test_attach(self) -> None:
        self.open(f"/v2/websocket/attach?id={EXEC_ID}")
        head = self.engine_wire.value().split(b"\r\n")[0]
        query = "stdin=1&stdout=1&stderr=1&stream=1"
        self.assertEqual(head, f"POST /containers/{EXEC_ID}/attach?{query} HTTP/1.1".encode())

    def test_version_prefixed_exec(self) -> None:
        """Portainer's React UI prefixes agent routes with /v1.41."""
        self.open(f"/v1.41/websocket/exec?id={EXEC_ID}")
        self.assertEqual(self.engine_wire.value(), engine_request("exec", EXEC_ID))

    def test_version_prefixed_attach(self) -> None:
        self.open(f"/v1.41/v2/websocket/attach?id={EXEC_ID}")
        self.assertEqual(self.engine_wire.value(), engine_request("attach", EXEC_ID))

    def test_switches_once_the_engine_has(self) -> None:
        self.opened()
        head, frames = self.head_and_frames()
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertIn(f"Portainer-Agent: {__version__}".encode(), head.split(b"\r\n"))
        self.assertEqual(frames, [])

    def test_forwarded_answer_is_marked_by_the_forwarding_agent(self) -> None:
        self.open(extra="X-SwarmAgent-Hop: id-b\r\n")
        self.engine_side.dataReceived(UPGRADED)
        head, _ = self.head_and_frames()
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertNotIn(b"Portainer-Agent", head)

    def test_engine_refusal_is_an_http_error(self) -> None:
        self.open()
        body = b'{"message":"No such exec instance: 0123"}'
        refusal = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
        refusal += b"Content-Length: %d\r\n\r\n" % len(body)
        self.engine_side.dataReceived(refusal[:30])
        self.engine_side.dataReceived(refusal[30:] + body[:5])
        self.engine_side.dataReceived(body[5:])
        response = parse_response(self.client.value())
        self.assertEqual(response.code, 404)
        self.assertEqual(response.body, body)
        self.assertEqual(response.header("portainer-agent"), __version__)
        self.assertTrue(self.client.disconnecting)
        self.assertTrue(self.engine_wire.disconnecting)

    def test_engine_unreachable_is_502(self) -> None:
        self.engine.refuse = True
        protocol = self.open()
        # The wait for the engine's answer that never came is cancelled and
        # handled, not left to be logged as an unhandled error when collected.
        assert protocol._engine is not None
        self.assertIsNone(self.successResultOf(protocol._engine.ready))
        response = parse_response(self.client.value())
        self.assertEqual(response.code, 502)
        self.assertEqual(response.json()["message"], "Unable to reach the Docker engine")
        self.assertIn("engine down", response.json()["details"])

    def test_engine_closing_before_its_answer_is_502(self) -> None:
        self.open()
        self.engine_side.dataReceived(b"HTTP/1.1 10")
        self.engine_side.connectionLost(Failure(ConnectionDone()))
        response = parse_response(self.client.value())
        self.assertEqual(response.code, 502)
        self.assertEqual(response.json()["message"], "The engine sent no answer head")
        self.assertIn("Closed before the answer head", response.json()["details"])

    def test_engine_garbage_is_502(self) -> None:
        self.open()
        self.engine_side.dataReceived(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        response = parse_response(self.client.value())
        self.assertEqual(response.code, 502)
        self.assertEqual(response.json()["message"], "The engine sent no answer head")
        self.assertTrue(self.engine_wire.disconnecting)

    def test_bad_id_is_refused_by_the_socket_too(self) -> None:
        self.open("/websocket/exec?id=../../x")
        self.assertEqual(parse_response(self.client.value()).code, 400)
        self.assertEqual(self.engine.connections, [])

    def test_client_gone_during_the_handshake_closes_the_engine(self) -> None:
        protocol = self.open()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.engine_wire.disconnecting)


class RelayTests(ConsoleCase):
    def test_client_messages_are_written_raw(self) -> None:
        protocol = self.opened()
        self.engine_wire.clear()
        protocol.dataReceived(client_frame(b"ls -l\r"))
        protocol.dataReceived(client_frame(b"\x03\xff\x00", BINARY))
        self.assertEqual(self.engine_wire.value(), b"ls -l\r\x03\xff\x00")

    def test_large_message(self) -> None:
        """A pasted 200 KiB reaches the engine whole (the reference stops at 2 KiB)."""
        protocol = self.opened()
        self.engine_wire.clear()
        paste = os.urandom(100 * 1024).hex().encode()
        protocol.dataReceived(client_frame(paste))
        self.assertEqual(self.engine_wire.value(), paste)
        self.assertNotIn(CLOSE, [op for op, _ in self.received()])

    def test_message_over_the_limit_closes(self) -> None:
        protocol = self.opened()
        self.engine_wire.clear()
        protocol.dataReceived(client_frame(b"x" * (self.MAX_MESSAGE + 1)))
        self.assertEqual(self.engine_wire.value(), b"")
        closes = [p for op, p in self.received() if op == CLOSE]
        self.assertEqual([int.from_bytes(p[:2], "big") for p in closes], [1009])  # too big

    def test_output_sent_as_it_comes(self) -> None:
        self.opened()
        self.engine_side.dataReceived(b"$ ")
        self.assertEqual(self.received(), [(TEXT, b"$ ")])
        self.engine_side.dataReceived(b"hello\r\n")
        self.assertEqual(self.received(), [(TEXT, b"$ "), (TEXT, b"hello\r\n")])

    def test_output_in_the_upgrade_read_is_kept(self) -> None:
        self.open()
        self.engine_side.dataReceived(UPGRADED + b"welcome\r\n")
        self.assertEqual(self.received(), [(TEXT, b"welcome\r\n")])

    def test_utf8_cut_between_reads_is_not_lost(self) -> None:
        self.opened()
        text = "héllo wörld €\r\n".encode()
        for i in range(len(text)):  # byte by byte: every character cut
            self.engine_side.dataReceived(text[i : i + 1])
        frames = self.received()
        self.assertEqual({op for op, _ in frames}, {TEXT})
        self.assertEqual(b"".join(p for _, p in frames), text)
        for _, payload in frames:
            payload.decode("utf-8")  # each frame valid on its own

    def test_invalid_utf8_goes_out_binary_in_place(self) -> None:
        self.opened()
        self.engine_side.dataReceived(b"ok \xff\xfe end")
        self.assertEqual(self.received(), [(TEXT, b"ok "), (BINARY, b"\xff\xfe"), (TEXT, b" end")])

    def test_engine_end_closes_after_the_last_output(self) -> None:
        self.opened()
        self.engine_side.dataReceived(b"bye \xe2\x82")  # a character cut by the end
        self.engine_side.connectionLost(Failure(ConnectionDone()))
        frames = self.received()
        self.assertEqual(frames[:2], [(TEXT, b"bye "), (BINARY, b"\xe2\x82")])
        self.assertEqual(frames[2][0], CLOSE)
        self.assertEqual(int.from_bytes(frames[2][1][:2], "big"), 1000)

    def test_client_leaving_closes_the_engine(self) -> None:
        protocol = self.opened()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.engine_wire.disconnecting)

    def test_client_close_frame_closes_the_engine(self) -> None:
        protocol = self.opened()
        protocol.dataReceived(client_frame((1000).to_bytes(2, "big"), CLOSE))
        closes = [p for op, p in self.received() if op == CLOSE]
        self.assertEqual([int.from_bytes(p[:2], "big") for p in closes], [1000])
        self.assertTrue(self.client.disconnecting, "the server drops the connection")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.engine_wire.disconnecting)

    def test_slow_client_pauses_the_engine(self) -> None:
        protocol = self.opened()
        producer: Any = self.client.producer
        self.assertIsNotNone(producer, "the engine is the client connection's producer")
        producer.pauseProducing()
        self.assertEqual(self.engine_wire.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual(self.engine_wire.producerState, "producing")
        self.assertIsNotNone(protocol)

    def test_timers_on_the_injected_clock(self) -> None:
        self.opened()
        self.assertTrue(self.clock.getDelayedCalls(), "the ping timer runs on the clock")


class ResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.engine = FakeEngineEndpoint()
        factory = ConsoleFactory(FakeEndpoints(self.engine), MemoryReactorClock())
        self.site = make_site(ConsoleResource(factory))

    def test_id_must_be_hex(self) -> None:
        for bad in ("", "xyz", "12%2F..", "ab%20cd", "0x12"):
            with self.subTest(id=bad):
                response = Client(self.site).send("GET", f"/websocket/exec?id={bad}").response()
                self.assertEqual(response.code, 400)
                self.assertEqual(response.json()["message"], "Invalid query parameter: id")

    def test_plain_get_is_refused(self) -> None:
        response = Client(self.site).send("GET", f"/websocket/exec?id={EXEC_ID}").response()
        self.assertEqual(response.code, 400)
        self.assertEqual(response.header("content-type"), "application/json")

    def test_upgrade_takes_the_connection_over(self) -> None:
        client = Client(self.site)
        wire: Any = client.transport
        wire.protocol = client.channel  # as a TCP transport has it
        client.channel.dataReceived(handshake(f"/websocket/exec?id={EXEC_ID}"))
        self.assertIsInstance(wire.protocol, ConsoleProtocol)
        self.assertEqual(len(self.engine.connections), 1, "the console asked the engine")


class Utf8FramesTests(SynchronousTestCase):
    def test_text(self) -> None:
        self.assertEqual(Utf8Frames().feed("añb".encode()), [("añb".encode(), False)])

    def test_cut_character_waits(self) -> None:
        frames = Utf8Frames()
        self.assertEqual(frames.feed(b"a\xc3"), [(b"a", False)])
        self.assertEqual(frames.feed(b"\xb1"), [("ñ".encode(), False)])

    def test_every_byte_kept(self) -> None:
        data = os.urandom(4096)
        frames = Utf8Frames()
        out = frames.feed(data[:1000]) + frames.feed(data[1000:]) + frames.feed(b"", final=True)
        self.assertEqual(b"".join(p for p, _ in out), data)
        for payload, binary in out:
            if not binary:
                payload.decode("utf-8")
