"""``twistd swarmagent``: the agent as a service of services."""

from __future__ import annotations

import socket
import sys
from typing import TYPE_CHECKING

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection, MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IProtocolFactory, IReactorTime, IResolver
from twisted.internet.task import Cooperator
from twisted.logger import ILogObserver
from twisted.names import client as dns_client
from twisted.names import hosts
from twisted.names.resolve import ResolverChain
from twisted.python.components import Componentized
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request

from swarmagent.access import RequestLog, taken_over
from swarmagent.api import AgentRoot
from swarmagent.auth import Authorizer
from swarmagent.broadcaster import Broadcaster
from swarmagent.browse import BrowseResource, threaded
from swarmagent.clients import ENGINE_BASE, EngineEndpoints, PeerEndpoints, make_pool
from swarmagent.config import Options
from swarmagent.discovery import Discovery, HTTPProbe, ManagerNodeList
from swarmagent.diskusage import ClusterDiskUsage
from swarmagent.dockerhub import DockerHub, DockerHubResource, make_hub_client
from swarmagent.engine import Engine
from swarmagent.events import ClusterEvents
from swarmagent.fanout import FanOut
from swarmagent.halfclose import HalfCloseTLSFactory
from swarmagent.hostinfo import HostInfoResource
from swarmagent.internal import InternalEndpoint, InternalSite
from swarmagent.locate import Locator
from swarmagent.locations import Locations
from swarmagent.logfile import LogFile
from swarmagent.logs import set_level
from swarmagent.metrics import Metrics, MetricsResource
from swarmagent.nodes import Nodes
from swarmagent.peers import NodeIdentity, Peer, PeerTable
from swarmagent.proxy import Relay
from swarmagent.relay import Doors, FrontDoorFactory, PeerPools, UpstreamPool
from swarmagent.signature import PairingStore, PairingWindow, Signer, Verifier
from swarmagent.statuspage import StatusResource
from swarmagent.tls import HTTP11Site, from_settings
from swarmagent.twisted_types import IAgentReactor, Rendered, installed_reactor

if TYPE_CHECKING:
    from swarmagent.websocket import ConsoleResource

__all__ = ["Options", "makeService"]

# Seconds an idle client connection (or one that never sends a request) is kept.
IDLE_TIMEOUT = 120
# Where the relay sends plain Docker requests (the engine's endpoint ignores the host).
ENGINE_URI = URI.fromBytes(ENGINE_BASE + b"/")


class _PoolService(MultiService):
    """Closes the pooled connections when the agent stops; sets twistd's log
    observer to the agent's own (``logfile.py``)."""

    def __init__(
        self,
        pools: list[HTTPConnectionPool],
        log_observer: ILogObserver,
        relay_pools: list[UpstreamPool | PeerPools] | None = None,
    ) -> None:
        super().__init__()
        self._pools = pools
        self._relay_pools = relay_pools or []
        self._log_observer = log_observer

    def setServiceParent(self, parent: IServiceCollection) -> None:
        # twistd reads the application's ILogObserver once it holds its services.
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self._log_observer)
        super().setServiceParent(parent)

    def stopService(self) -> Deferred[list[list[None]]]:
        super().stopService()
        closing = [p.closeCachedConnections() for p in self._pools]
        closing += [p.close() for p in self._relay_pools]
        return gatherResults(closing)


class LazyConsoles(Resource):
    """Portainer's consoles, built on the first console request.

    autobahn costs about 6 MB resident, and most agents never serve a console.
    """

    isLeaf = True

    def __init__(self, endpoints: EngineEndpoints, reactor: IReactorTime, metrics: Metrics) -> None:
        super().__init__()
        self._endpoints = endpoints
        self._reactor = reactor
        self._metrics = metrics
        self._resource: ConsoleResource | None = None

    def render(self, request: Request) -> Rendered:
        if self._resource is None:
            from swarmagent.websocket import ConsoleFactory, ConsoleResource

            factory = ConsoleFactory(self._endpoints, self._reactor, metrics=self._metrics)
            self._resource = ConsoleResource(factory)
        result = self._resource.render(request)
        if request.channel is not None and request.channel.transport is None:
            # The WebSocket took the connection: twisted.web will not finish it.
            taken_over(request, 101)
        return result


def makeService(
    options: Options,
    reactor: IAgentReactor | None = None,
    resolver: IResolver | None = None,
    hostname: str | None = None,
) -> MultiService:
    """Build the agent: the API listener and the discovery timer."""
    if reactor is None:
        reactor = installed_reactor()
    if resolver is None:
        resolver = ResolverChain(
            [
                hosts.Resolver(b"/etc/hosts"),
                dns_client.Resolver("/etc/resolv.conf", reactor=reactor),
            ]
        )
    set_level(options["log-level"])
    name = hostname or socket.gethostname()
    advertise = options["advertise-addr"] or options["host"]
    try:
        server_tls, client_tls = from_settings(
            cert=options["tls-cert"],
            key=options["tls-key"],
            ca=options["tls-ca"],
            node_name=name,
            advertise_ip=advertise,
        )
        verifier = Verifier(
            options["secret"], PairingStore(options["data-path"]), reset=options["pairing-reset"]
        )
    except (ValueError, OSError) as e:
        raise SystemExit(f"swarmagent: {e}") from None
    # Agents prove themselves to each other with their certificate when a CA
    # is set, else by signing the shared secret; with neither, they have no
    # common credential and the identity route stays open (docs/security.md).
    agents_authenticate = bool(options["tls-ca"] or options["secret"])
    probe_headers = Signer.generate(options["secret"]).headers() if options["secret"] else {}

    connect_timeout = options["connect-timeout"]
    engine_pool = make_pool(reactor)
    peer_pool = make_pool(reactor)
    engine_endpoints = EngineEndpoints(reactor, options["docker-host"], connect_timeout)
    peer_endpoints = PeerEndpoints(reactor, connect_timeout, client_tls)
    engine_client = Agent.usingEndpointFactory(reactor, engine_endpoints, pool=engine_pool)
    peer_client = Agent.usingEndpointFactory(reactor, peer_endpoints, pool=peer_pool)
    cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
    metrics = Metrics(process=True)

    port = options["port"]
    me = Peer(advertise, port, NodeIdentity(name=name), is_self=True)
    table = PeerTable(me, max_failures=options["probe-failures"])
    # Lists, lookups and events wait --fanout-timeout for each node; the
    # agent's own questions carry the probe's credentials. A silent node's
    # ping (each discovery tick) is bounded like a probe, and never longer.
    nodes = Nodes(
        table,
        engine_client,
        peer_client,
        reactor,
        options["fanout-timeout"],
        credentials=probe_headers,
        metrics=metrics,
        ping_timeout=min(connect_timeout, options["fanout-timeout"]),
    )
    engine = Engine(engine_client, reactor, timeout=max(connect_timeout, 10.0))
    discovery = Discovery(
        table,
        engine,
        resolver,
        HTTPProbe(peer_client, reactor, timeout=connect_timeout, headers=probe_headers),
        reactor,
        name=options["cluster-addr"] or None,
        port=port,
        hostname=name,
        # A worker asks a manager's agent, bounded like a probe.
        node_list=ManagerNodeList(nodes, timeout=connect_timeout),
        metrics=metrics,
        nodes=nodes,
    )
    metrics.watch_table(lambda: len(table.nodes()) - 1, lambda: len(table.agentless()))
    metrics.watch_pairing(lambda: verifier.state)
    authorizer = Authorizer(verifier, server_tls)
    # Where the lists just served put each object: the lookups ask there first.
    locations = Locations(reactor)
    # Every log line, the access lines among them, on stdout.
    log_file = LogFile(sys.stdout, reactor, json=options["log-format"] == "json")
    requests = RequestLog(
        metrics, reactor, authorizer.who, log_file if options["access-log"] else None
    )
    root = AgentRoot(
        nodes,
        Relay(engine_client, engine_endpoints, cooperator, metrics),
        Relay(peer_client, peer_endpoints, cooperator, metrics),
        FanOut(nodes, locations),
        authorizer,
        Locator(nodes, locations),
        Broadcaster(nodes, cooperator),
        ClusterDiskUsage(nodes),
        identity_open=not agents_authenticate,
        events=ClusterEvents(nodes),
        consoles=LazyConsoles(engine_endpoints, reactor, metrics),
        browse=BrowseResource(
            engine_client,
            host_root=options["host-root"] or None,
            clock=reactor,
            timeout=connect_timeout,
            run=threaded(reactor),
        ),
        host_info=HostInfoResource(options["host-root"] or "/", reactor),
        dockerhub=DockerHubResource(
            DockerHub(
                make_hub_client(reactor),
                reactor,
                options["dockerhub-auth-url"],
                options["dockerhub-registry-url"],
            )
        ),
        metrics=metrics,
        requests=requests,
        status=StatusResource(discovery, options),
    )
    # The idle timeout also closes connections that never send a request.
    # Bodies are relayed or streamed to disk, never parsed into request.args:
    # twisted.web would read a whole upload into memory to do that.
    site_class = InternalSite if options["relay"] == "bytes" else HTTP11Site
    site = site_class(root, reactor=reactor, timeout=IDLE_TIMEOUT, parsePOSTFormSubmission=False)

    host = options["host"]
    endpoint_class = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
    endpoint = endpoint_class(reactor, port, interface=host)

    front: IProtocolFactory = site
    relay_pools: list[UpstreamPool | PeerPools] = []
    if options["relay"] == "bytes":
        # The front door: plain Docker requests relayed as bytes, every other
        # request to the resource tree over a private socket pair.
        engine_upstreams = UpstreamPool(engine_endpoints.endpointForURI(ENGINE_URI), reactor)
        tree_upstreams = UpstreamPool(InternalEndpoint(reactor, site), reactor)
        peer_upstreams = PeerPools(peer_endpoints, reactor)
        relay_pools = [engine_upstreams, tree_upstreams, peer_upstreams]
        front = FrontDoorFactory(
            Doors(
                engine=engine_upstreams,
                internal=tree_upstreams,
                authorizer=authorizer,
                table=table,
                requests=requests,
                clock=reactor,
                own=root.answers,
                idle_timeout=IDLE_TIMEOUT,
                peers=peer_upstreams,
                metrics=metrics,
                nodes=nodes,
            )
        )
    service = _PoolService([engine_pool, peer_pool], log_file, relay_pools)
    # Half-closeable TLS: a hijacked stream's end of input is a close_notify.
    https = HalfCloseTLSFactory(server_tls, False, front, reactor)
    StreamServerEndpointService(endpoint, https).setServiceParent(service)
    discovery.service(options["refresh-interval"]).setServiceParent(service)
    PairingWindow(verifier, reactor, options["secret-timeout"]).setServiceParent(service)
    if options["metrics-port"]:
        # For a scraper inside the cluster: plain HTTP, no credentials, /metrics only.
        page = Resource()
        page.putChild(b"metrics", MetricsResource(metrics))
        plain = HTTP11Site(page, reactor=reactor, timeout=IDLE_TIMEOUT)
        metrics_endpoint = endpoint_class(reactor, options["metrics-port"], interface=host)
        StreamServerEndpointService(metrics_endpoint, plain).setServiceParent(service)
    return service
