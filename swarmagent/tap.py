"""``twistd swarmagent``: the agent as a service of services."""

from __future__ import annotations

import socket
from typing import Any

from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.task import Cooperator
from twisted.names import client as dns_client
from twisted.names import hosts
from twisted.names.resolve import ResolverChain
from twisted.web.client import Agent
from twisted.web.server import Site

from swarmagent.api import AgentRoot
from swarmagent.clients import EngineEndpoints, PeerEndpoints, make_pool
from swarmagent.config import Options
from swarmagent.discovery import Discovery, HTTPProbe
from swarmagent.engine import Engine
from swarmagent.fanout import FanOut
from swarmagent.logs import set_level
from swarmagent.peers import NodeIdentity, Peer, PeerTable
from swarmagent.proxy import Relay

__all__ = ["Options", "makeService"]


class _PoolService(MultiService):
    """Closes the pooled connections when the agent stops."""

    def __init__(self, pools: list[Any]) -> None:
        super().__init__()
        self._pools = pools

    def stopService(self) -> Any:
        super().stopService()
        return gatherResults([p.closeCachedConnections() for p in self._pools])


def makeService(
    options: Options,
    reactor: Any = None,
    resolver: Any = None,
    hostname: str | None = None,
) -> MultiService:
    """Build the agent: the API listener and the discovery timer."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    if resolver is None:
        resolver = ResolverChain(
            [
                hosts.Resolver(b"/etc/hosts"),
                dns_client.Resolver("/etc/resolv.conf", reactor=reactor),
            ]
        )
    set_level(options["log-level"])

    connect_timeout = options["connect-timeout"]
    engine_pool = make_pool(reactor)
    peer_pool = make_pool(reactor)
    engine_endpoints = EngineEndpoints(reactor, options["docker-host"], connect_timeout)
    peer_endpoints = PeerEndpoints(reactor, connect_timeout)
    engine_raw = Agent.usingEndpointFactory(reactor, engine_endpoints, pool=engine_pool)
    peer_raw = Agent.usingEndpointFactory(reactor, peer_endpoints, pool=peer_pool)
    engine_http = HTTPClient(engine_raw)
    peer_http = HTTPClient(peer_raw)
    cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))

    port = options["port"]
    advertise = options["advertise-addr"] or options["host"]
    me = Peer(advertise, port, NodeIdentity(name=hostname or socket.gethostname()), is_self=True)
    table = PeerTable(me, max_failures=options["probe-failures"])
    engine = Engine(engine_http, reactor, timeout=max(connect_timeout, 10.0))
    discovery = Discovery(
        table,
        engine,
        resolver,
        HTTPProbe(peer_http, reactor, timeout=connect_timeout),
        reactor,
        name=options["cluster-addr"] or None,
        port=port,
        hostname=hostname or socket.gethostname(),
    )
    fanout = FanOut(table, engine_http, peer_http, reactor, options["fanout-timeout"])
    root = AgentRoot(
        table,
        Relay(engine_raw, engine_endpoints, cooperator),
        Relay(peer_raw, peer_endpoints, cooperator),
        fanout,
        reactor,
    )
    site = Site(root, reactor=reactor)

    host = options["host"]
    endpoint_class = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
    endpoint = endpoint_class(reactor, port, interface=host)

    agent = _PoolService([engine_pool, peer_pool])
    StreamServerEndpointService(endpoint, site).setServiceParent(agent)
    discovery.service(options["refresh-interval"]).setServiceParent(agent)
    return agent
