"""Finding the other agents (DNS on a timer, then an identity probe per address)
and the swarm nodes that should run one (a manager's node list)."""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import cast

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.names import dns
from twisted.names.error import DomainError
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from swarmagent.clients import get_within, peer_url
from swarmagent.engine import NODES_PATH, Engine, SwarmNodes, read_nodes
from swarmagent.errors import describe
from swarmagent.logs import logger
from swarmagent.metrics import Metrics
from swarmagent.nodes import NodeFailed, Nodes
from swarmagent.peers import MANAGER, NodeIdentity, Peer, PeerTable
from swarmagent.wire import IDENTITY_PATH

# Retry delays (seconds) for one DNS query: a tick must end well before the next.
DNS_TIMEOUTS = (1, 2)

log = logger(__name__)

Address = tuple[str, int]
Probe = Callable[[str, int], Awaitable[NodeIdentity]]
#: Asks a manager's agent for the swarm's node list: the nodes that should
#: run an agent, and Raft's view of the managers.
NodeList = Callable[[Peer], Awaitable[SwarmNodes]]


@dataclass
class ProbeRecord:
    """What the probes of one address found, for the status document."""

    #: The node last seen there ("" until a probe succeeds).
    node: str = ""
    #: When the last probe succeeded (the clock's seconds; None: never).
    last_ok: float | None = None
    rtt: float | None = None
    #: Failed probes since the last success.
    failures: int = 0
    #: The last failure's reason and time (kept after a success: it says what went wrong last).
    last_error: str = ""
    last_error_at: float | None = None


class HTTPProbe:
    """Ask the agent at an address who it is, over the agent-to-agent API,
    with this agent's credentials and a deadline."""

    def __init__(
        self,
        client: IAgent,
        clock: IReactorTime,
        timeout: float,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._client = client
        self._clock = clock
        self._timeout = timeout
        self._headers = Headers({k: [v] for k, v in (headers or {}).items()})

    async def __call__(self, address: str, port: int) -> NodeIdentity:
        """Return the identity the agent at ``address:port`` reports."""
        url = peer_url(address, port, IDENTITY_PATH)
        headers = self._headers.copy()
        code, body, _ = await get_within(self._client, url, headers, self._clock, self._timeout)
        if code != 200:
            raise ValueError(f"identity probe answered {code}")
        return NodeIdentity.from_json(json.loads(body))


class ManagerNodeList:
    """Ask a manager's agent for the swarm's node list (a worker's engine
    cannot tell it), with this agent's own credentials and the probe's deadline."""

    def __init__(self, nodes: Nodes, timeout: float) -> None:
        self._nodes = nodes
        self._timeout = timeout

    async def __call__(self, manager: Peer) -> SwarmNodes:
        """The nodes that should run an agent, and Raft's view of the managers.

        The request is targeted at ``manager`` and hop-marked, so that agent
        serves it from its own engine or refuses it; it never forwards it.
        """
        path = NODES_PATH.encode("ascii")
        outcome = await self._nodes.get(manager, path, timeout=self._timeout)
        if isinstance(outcome, NodeFailed):
            raise outcome
        if outcome.code != 200:
            raise ValueError(f"the agent of {manager.name} answered {outcome.code} to {NODES_PATH}")
        try:
            return read_nodes(json.loads(outcome.body))
        except ValueError as e:
            raise ValueError(f"the agent of {manager.name} sent a bad node list: {e}") from e


class Discovery:
    """Keep the peer table in step with DNS and with each agent's answers."""

    def __init__(
        self,
        table: PeerTable,
        engine: Engine,
        resolver: IResolver,
        probe: Probe,
        clock: IReactorTime,
        *,
        name: str | None,
        port: int,
        hostname: str,
        node_list: NodeList | None = None,
        metrics: Metrics | None = None,
        nodes: Nodes | None = None,
    ) -> None:
        """``nodes``, when given, has its silent nodes asked again at each tick."""
        self.table = table
        self.nodes = nodes
        self.metrics = metrics if metrics is not None else Metrics()
        #: Each probed address's record, while DNS names it.
        self.probes: dict[str, ProbeRecord] = {}
        #: On a manager running as a service: the agent service's newest task
        #: on each node (node ID → state, error); None when unknown.
        self.tasks: dict[str, tuple[str, str]] | None = None
        self.own_service: str | None = None
        self._engine = engine
        self._resolver = resolver
        self._probe = probe
        self._clock = clock
        self.name = name
        self._port = port
        self._hostname = hostname
        self._name_sought = name is not None
        # Without it, a worker does not learn the swarm's nodes.
        self._node_list = node_list
        # Why the node list could not be read last time (None: it could).
        self._nodes_problem: str | None = None

    def service(self, interval: float) -> TimerService:
        """A service running a discovery tick every ``interval`` seconds."""
        timer = TimerService(interval, lambda: Deferred.fromCoroutine(self.tick()))
        timer.clock = self._clock
        return timer

    async def tick(self) -> None:
        """One round: re-read this node, re-resolve, re-probe, ask the silent
        nodes again, then re-read the swarm's node list. Never raises."""
        started = self._clock.seconds()
        try:
            await self._refresh_me()
            if self.name is not None:
                await self._discover(self.name)
            if self.nodes is not None:
                await self.nodes.recheck()
            await self._refresh_expected()
        except Exception:
            log.failure("Discovery tick failed")
        self.metrics.tick(self._clock.seconds() - started)

    async def _discover(self, name: str) -> None:
        try:
            targets: list[Address] | None = await self.resolve(name)
        except Exception as e:
            self.metrics.dns_failed()
            log.warn(
                "DNS lookup of {name} failed ({why}); keeping the last peer set",
                name=name,
                why=_why(e),
            )
            targets = None
        if targets is not None:
            named = {a for a, _ in targets}
            self.probes = {a: r for a, r in self.probes.items() if a in named}
            for peer in self.table.retain(named):
                self.metrics.left(peer.name)
                log.info(
                    "Agent left: {node} at {address} (gone from DNS)",
                    node=peer.name,
                    address=peer.address,
                )
        else:
            targets = [(p.address, p.port) for p in self.table.nodes() if not p.is_self]
        await self._probe_all(targets)

    async def _refresh_expected(self) -> None:
        # After the probes, so that the agents this tick found count as present.
        me = self.table.me.identity
        if not me.swarm:
            self._nodes_problem = None
            if self.table.expect({}):
                log.info("Not in a swarm: no nodes expected")
            return
        try:
            if me.role == MANAGER:
                swarm = await self._engine.swarm_nodes()
            else:
                swarm = await self._from_managers()
        except Exception as e:
            why = _why(e)
            if why != self._nodes_problem:
                log.warn("Cannot read the swarm's node list ({why}); keeping the last one", why=why)
                self._nodes_problem = why
            return
        if self._nodes_problem is not None:
            log.info("The swarm's node list can be read again")
            self._nodes_problem = None
        if me.role == MANAGER and self.own_service is not None:
            try:
                self.tasks = await self._engine.service_tasks(self.own_service)
            except Exception as e:
                log.debug("Cannot read the agent service's tasks: {why}", why=_why(e))
                self.tasks = None
        else:
            self.tasks = None
        # Raft names a new leader before the agents' identities say so.
        self.table.follow(swarm.leader, swarm.unreachable)
        nodes = swarm.expected
        old = self.table.expected
        if self.table.expect(nodes):
            log.info(
                "Swarm nodes expected to run an agent: {count} (new: {new}; gone: {gone})",
                count=len(nodes),
                new=_names(nodes, old),
                gone=_names(old, nodes),
            )

    async def _from_managers(self) -> SwarmNodes:
        # The leader first (answering ones first); the next only if one fails.
        if self._node_list is None:
            raise ValueError("no way to ask a manager")
        managers = self.table.managers()
        if not managers:
            raise ValueError("no manager's agent known")
        errors: list[str] = []
        for manager in managers:
            try:
                return await self._node_list(manager)
            except Exception as e:
                errors.append(_why(e))
        raise ValueError("; ".join(errors))

    async def _refresh_me(self) -> None:
        try:
            identity = await self._engine.identity()
        except Exception as e:
            log.warn("Cannot read this node's identity from the engine: {why}", why=_why(e))
            return
        old = self.table.me.identity
        if identity != old:
            if old.name:
                log.info("This node is now {new} (was {old})", new=identity, old=old)
            self.table.set_me(identity)
        if not self._name_sought and identity.swarm:
            self._name_sought = True
            await self._find_own_service()

    async def _find_own_service(self) -> None:
        # Inside a swarm task the hostname is the container's ID: its
        # service label names the DNS entry of every task of the service.
        try:
            service = await self._engine.service_name(self._hostname)
        except Exception as e:
            log.info("Not running as a swarm service task ({why}): no peer discovery", why=_why(e))
            return
        if service:
            self.own_service = service
            self.name = f"tasks.{service}"
            log.info("Discovering agents at {name}", name=self.name)

    async def _probe_all(self, targets: list[Address]) -> None:
        calls = [Deferred.fromCoroutine(self._probe_one(a, p)) for a, p in targets]
        await DeferredList(calls, consumeErrors=True)

    async def _probe_one(self, address: str, port: int) -> None:
        record = self.probes.setdefault(address, ProbeRecord())
        started = self._clock.seconds()
        try:
            identity = await self._probe(address, port)
        except Exception as e:
            record.failures += 1
            record.last_error, record.last_error_at = _why(e), self._clock.seconds()
            gone = self.table.failed(address)
            if gone is not None:
                self.metrics.left(gone.name)
                log.info(
                    "Agent left: {node} at {address} ({why})",
                    node=gone.name,
                    address=address,
                    why=_why(e),
                )
            else:
                log.debug(
                    "Probe of {address}:{port} failed: {why}",
                    address=address,
                    port=port,
                    why=_why(e),
                )
            return
        rtt = self._clock.seconds() - started
        record.node, record.last_ok, record.rtt, record.failures = identity.name, started, rtt, 0
        if identity.key != self.table.me.identity.key:
            self.metrics.probed(identity.name, rtt)
        news = self.table.seen(address, port, identity)
        if news == "join":
            self.metrics.joined()
            log.info(
                "Agent joined: {node} ({role}) at {address}:{port}",
                node=identity.name,
                role=identity.role,
                address=address,
                port=port,
            )
        elif news == "change":
            log.info("Agent at {address} is now {identity}", address=address, identity=identity)

    async def resolve(self, name: str) -> list[Address]:
        """Addresses and ports of the agents behind ``name``."""
        if not name.startswith("_"):
            return [(a, self._port) for a in await self._addresses(name)]
        lookup = self._resolver.lookupService(name, timeout=DNS_TIMEOUTS)
        answers, _, additional = await _records(lookup)
        glue: dict[str, list[str]] = {}
        for record in additional:
            if record.type in (dns.A, dns.AAAA):
                glue.setdefault(str(record.name).lower(), []).append(_address(record))
        found: list[Address] = []
        for record in answers:
            if record.type != dns.SRV:
                continue
            srv: object = record.payload  # see _address
            assert isinstance(srv, dns.Record_SRV)
            target = str(srv.target)
            addresses = glue.get(target.lower()) or await self._addresses(target)
            found.extend((a, srv.port) for a in addresses)
        return found

    async def _addresses(self, name: str) -> list[str]:
        lookups = [
            _records(self._resolver.lookupAddress(name, timeout=DNS_TIMEOUTS)),
            _records(self._resolver.lookupIPV6Address(name, timeout=DNS_TIMEOUTS)),
        ]
        results = await DeferredList(lookups, consumeErrors=True)
        found: list[str] = []
        errors: list[Failure] = []
        for ok, result in results:
            if not ok:
                # DeferredList's annotation has no room for the Failure.
                errors.append(cast(Failure, result))
                continue
            answers = result[0]
            found.extend(_address(r) for r in answers if r.type in (dns.A, dns.AAAA))
        if not found and len(errors) == len(lookups):
            # Both failed: an error, so the last known set is kept. A name
            # that exists with no records is an honest empty answer.
            errors[0].raiseException()
        return sorted(set(found))


#: A lookup's records: the answers, authority and additional sections.
Records = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]


def _records(
    lookup: Deferred[tuple[dns.RRHeader, dns.RRHeader, dns.RRHeader]],
) -> Deferred[Records]:
    # IResolver's annotations give each section as one record; each is a list.
    return cast("Deferred[Records]", lookup)


def _address(record: dns.RRHeader) -> str:
    # As an object: mypy-zope finds no class within the declared
    # IEncodableRecord, so isinstance would narrow it to nothing.
    payload: object = record.payload
    if record.type == dns.A:
        assert isinstance(payload, dns.Record_A)
        return str(payload.dottedQuad())
    assert isinstance(payload, dns.Record_AAAA)
    return socket.inet_ntop(socket.AF_INET6, payload.address)


def _names(nodes: Mapping[str, str], without: Mapping[str, str]) -> str:
    return ", ".join(sorted(h for i, h in nodes.items() if i not in without)) or "none"


def _why(e: BaseException) -> str:
    if isinstance(e, DomainError):
        return "no such name"
    return describe(e)
