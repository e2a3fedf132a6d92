"""makeService: the listener and the discovery timer, on an injected reactor."""

from __future__ import annotations

from pathlib import Path

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase

from swarmagent.api import AgentRoot
from swarmagent.config import Options
from swarmagent.relay import FrontDoorFactory
from swarmagent.signature import PAIRED_KEY_FILE, PairingStore, Signer
from swarmagent.tap import IDLE_TIMEOUT, makeService
from swarmagent.tls import HTTP11Site
from tests.helpers import StubResolver, agent_reactor

ENGINE_TIMEOUT = 10  # the engine's deadline: max(connect timeout, 10 s)


def options(*argv: str) -> Options:
    parsed = Options(environ={})
    parsed.parseOptions(list(argv))
    return parsed


class MakeServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = StubResolver()
        self.resolver.names["tasks.agent"] = ["10.0.0.2"]

    def make(self, *argv: str) -> MultiService:
        data = ["--data-path", self.mktemp()]  # the paired key is kept there
        service = makeService(
            options(*data, *argv),
            reactor=agent_reactor(self.reactor),
            resolver=self.resolver,
            hostname="node-a",
        )
        self.assertIsInstance(service, MultiService)
        return service

    def start(self, service: MultiService) -> None:
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())

    def test_children(self) -> None:
        service = self.make("--refresh-interval", "7")
        children = list(service)
        self.assertEqual(
            sorted(type(c).__name__ for c in children),
            ["PairingWindow", "StreamServerEndpointService", "TimerService"],
        )
        [timer] = [c for c in children if isinstance(c, TimerService)]
        self.assertEqual(timer.step, 7)
        self.assertIs(timer.clock, self.reactor)

    def test_listens(self) -> None:
        service = self.make("--port", "9443", "--host", "127.0.0.1", "--relay", "web")
        self.assertEqual(self.reactor.tcpServers, [])
        self.start(service)
        [(port, factory, _, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (9443, "127.0.0.1"))
        # HTTPS only: the Site is reached through TLS.
        assert isinstance(factory, TLSMemoryBIOFactory)
        site = factory.wrappedFactory
        assert isinstance(site, HTTP11Site)
        # No ALPN: Twisted before 26.4 would set it on the shared TLS context.
        self.assertFalse(IProtocolNegotiationFactory.providedBy(site))
        self.assertIsInstance(site.resource, AgentRoot)
        self.assertIs(site.reactor, self.reactor)
        self.assertEqual(site.timeOut, IDLE_TIMEOUT)

    def test_relay_in_front(self) -> None:
        # With the byte relay the front door serves each connection, the Site behind it.
        self.start(self.make("--port", "9443", "--relay", "bytes"))
        [(_, factory, _, _)] = self.reactor.tcpServers
        assert isinstance(factory, TLSMemoryBIOFactory)
        door = factory.wrappedFactory
        assert isinstance(door, FrontDoorFactory)
        self.assertTrue(door.doors.own(b"/swarmagent/status"))
        self.assertTrue(door.doors.own(b"/v1/browse/some-volume/ls"))
        self.assertFalse(door.doors.own(b"/containers/json"))
        self.assertEqual(door.doors.idle_timeout, IDLE_TIMEOUT)

    def test_listens_on_ipv6(self) -> None:
        self.start(self.make("--host", "::"))
        [(port, _, _, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (9001, "::"))

    def test_discovery_runs_on_the_injected_reactor_and_resolver(self) -> None:
        self.start(self.make("--cluster-addr", "tasks.agent", "--docker-host", "unix:///e.sock"))
        # The first tick starts at once: it asks the engine who this node is.
        self.assertEqual([c[0] for c in self.reactor.unixClients], ["/e.sock"])
        self.assertEqual(self.resolver.queries, [])
        # The engine never answers; at its deadline the tick goes on to DNS,
        # then probes the agent it found.
        self.reactor.advance(ENGINE_TIMEOUT)
        self.assertIn(("A", "tasks.agent"), self.resolver.queries)
        # (MemoryReactorClock's name resolver maps every host to 127.0.0.1.)
        self.assertEqual([port for _, port, *_ in self.reactor.tcpClients], [9001])

    def test_stop(self) -> None:
        service = self.make("--docker-host", "unix:///e.sock", "--refresh-interval", "1")
        service.startService()
        self.reactor.advance(ENGINE_TIMEOUT)
        tries = len(self.reactor.unixClients)
        self.successResultOf(service.stopService())
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.unixClients), tries)
        self.assertFalse(service.running)

    def test_pairing_reset_reaches_the_pairing(self) -> None:
        """A new --pairing-reset forgets the key kept under --data-path, at build time."""
        data = Path(self.mktemp())
        PairingStore(data).save(bytes.fromhex(Signer.generate().public_key_hex))
        self.make("--data-path", str(data))
        self.assertTrue((data / PAIRED_KEY_FILE).exists())
        self.make("--data-path", str(data), "--pairing-reset", "1764432000")
        self.assertFalse((data / PAIRED_KEY_FILE).exists())
        self.assertEqual(PairingStore(data).last_reset(), "1764432000")
