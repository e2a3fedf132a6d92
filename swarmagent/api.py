"""The agent's resource tree: its own routes, then every Docker API path."""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import unquote, unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.util import DeferredResource

from swarmagent import __version__
from swarmagent.access import RequestLog, mark
from swarmagent.auth import OPEN_PATHS, Authorizer
from swarmagent.broadcaster import Broadcaster
from swarmagent.browse import browse_paths, parse_browse_path, volume_of
from swarmagent.clientgone import watch_gone
from swarmagent.diskusage import ClusterDiskUsage
from swarmagent.errors import ErrorResource, error_body
from swarmagent.events import ClusterEvents
from swarmagent.fanout import FanOut, Selection
from swarmagent.locate import Locator
from swarmagent.logs import logger
from swarmagent.metrics import Metrics, MetricsResource
from swarmagent.nodes import Nodes, name_missing
from swarmagent.proxy import EngineProxy, PeerProxy, Relay
from swarmagent.routing import (
    AmbiguousNode,
    AmbiguousObject,
    BadBroadcast,
    Broadcast,
    ClusterDF,
    ClusterList,
    Forward,
    Inspected,
    Local,
    Locate,
    Located,
    MergedEvents,
    Misdirected,
    NoManager,
    NotFound,
    Route,
    UnknownNode,
    creates_swarm_network,
    route,
    strip_version,
)
from swarmagent.tunnel import wants_upgrade
from swarmagent.twisted_types import Rendered, request_body
from swarmagent.wire import (
    AGENT_HEADERS,
    CONSOLE_PATHS,
    DOCKERHUB_PATH,
    HOST_INFO_PATHS,
    IDENTITY_PATH,
    METRICS_PATH,
    STATUS_PATH,
)

log = logger(__name__)


def _body(request: Request) -> bytes:
    """The start of the request body, enough to read a network's driver."""
    content = request_body(request)
    if content is None:
        return b""
    content.seek(0)
    head = content.read(64 * 1024)
    content.seek(0)
    return bytes(head)


def safe_path(path: bytes) -> bool:
    """False for a path with ``.`` or ``..`` segments, however encoded."""
    segments = unquote_to_bytes(path).split(b"/")
    return not any(s in (b".", b"..") for s in segments)


def lower_headers(request: Request) -> dict[str, str]:
    """Request headers by lower-case name (the first value of each)."""
    out: dict[str, str] = {}
    for name, values in request.requestHeaders.getAllRawHeaders():
        out[name.decode("latin-1").lower()] = values[0].decode("latin-1")
    return out


class _Leaf(Resource):
    """A leaf that answers GET only, with a function of the request."""

    isLeaf = True

    def __init__(self, render: Callable[[Request], bytes]) -> None:
        super().__init__()
        self._render = render

    def render_GET(self, request: Request) -> bytes:
        return self._render(request)

    def render_HEAD(self, request: Request) -> bytes:
        return self._render(request)


class AgentRoot(Resource):
    """Marks every answer as an agent's, then routes each request once, whole."""

    def __init__(
        self,
        nodes: Nodes,
        engine_relay: Relay,
        peer_relay: Relay,
        fanout: FanOut,
        authorizer: Authorizer,
        locator: Locator,
        broadcaster: Broadcaster,
        disk_usage: ClusterDiskUsage,
        identity_open: bool = False,
        events: ClusterEvents | None = None,
        consoles: IResource | None = None,
        browse: IResource | None = None,
        host_info: IResource | None = None,
        dockerhub: IResource | None = None,
        metrics: Metrics | None = None,
        requests: RequestLog | None = None,
        status: IResource | None = None,
    ) -> None:
        """``metrics`` counts refusals and serves ``/metrics``; ``requests``
        closes each request into the metrics and the access log; ``status``
        serves ``/swarmagent/status``."""
        super().__init__()
        self._metrics = metrics
        self._requests = requests
        self._locator = locator
        # Without them (unit tests of other routes), /events is one node's
        # and the other agent-only routes reach the engine.
        self._events = events
        self._consoles = dict.fromkeys(CONSOLE_PATHS, consoles) if consoles is not None else {}
        self._browse = browse
        self._host_info = dict.fromkeys(HOST_INFO_PATHS, host_info) if host_info else {}
        self._authorizer = authorizer
        self._open = OPEN_PATHS | ({IDENTITY_PATH} if identity_open else set())
        self._nodes = nodes
        self._table = nodes.table
        self._engine_proxy = EngineProxy(engine_relay, nodes)
        self._peer_relay = peer_relay
        self._fanout = fanout
        self._broadcaster = broadcaster
        self._disk_usage = disk_usage
        ping = _Leaf(self._ping)
        agents = _Leaf(self._agents)
        self._own: dict[bytes, IResource] = {
            b"/ping": ping,
            b"/v2/ping": ping,
            b"/agents": agents,
            b"/v1/agents": agents,
            b"/v2/agents": agents,
            IDENTITY_PATH: _Leaf(self._identity),
        }
        if dockerhub is not None:
            self._own[DOCKERHUB_PATH] = dockerhub
        if metrics is not None:
            self._own[METRICS_PATH] = MetricsResource(metrics)
        if status is not None:
            self._own[STATUS_PATH] = status

    def own_paths(self) -> frozenset[bytes]:
        """The paths the agent answers itself (everything else goes to an engine)."""
        browse = browse_paths() if self._browse is not None else frozenset()
        return (
            frozenset(self._own) | frozenset(self._consoles) | frozenset(self._host_info) | browse
        )

    def answers(self, bare: bytes) -> bool:
        """Whether the agent serves a path (without its ``/vX.Y`` prefix) itself,
        with a route of its own, rather than as a Docker request."""
        if bare in self._own or bare in self._consoles or bare in self._host_info:
            return True
        return self._browse is not None and parse_browse_path(bare.decode("latin-1")) is not None

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        for name, value in AGENT_HEADERS:
            request.responseHeaders.setRawHeaders(name, [value])
        # The agent's own routes are matched without a Docker version prefix
        # (Portainer's UI sends /v1.41/ping and /v1.41/v2/dockerhub); Docker
        # requests keep theirs when forwarded.
        if self._requests is not None:
            self._requests.start(request)
        bare = strip_version(request.path.decode("latin-1")).encode("latin-1")
        if bare not in self._open:
            verdict = self._authorizer.check(request)
            if not verdict.accepted:
                mark(request, "refused")
                if self._metrics is not None:
                    self._metrics.refused(verdict.reason or "bad_signature")
                return ErrorResource(verdict.code, verdict.message, verdict.details)
        if not safe_path(request.path):
            mark(request, "error")
            return ErrorResource(400, "Invalid request path", "Dot segments are not allowed")
        own = self._own.get(bare)
        if own is not None:
            return own
        # Consoles, host info and browsing are served where the target says,
        # like a Docker request; a browsed volume is found like a container.
        console = self._consoles.get(bare)
        if console is not None:
            return self._docker(request, local=console, kind="console")
        local = self._host_info.get(bare)
        if local is None and self._browse is not None:
            browsing = parse_browse_path(bare.decode("latin-1"))
            if browsing is not None:
                volume = volume_of(request)
                about = ("volumes", volume) if volume else None
                return self._docker(request, local=self._browse, about=about, kind="browse")
        return self._docker(request, local=local)

    def _docker(
        self,
        request: Request,
        local: IResource | None = None,
        about: tuple[str, str] | None = None,
        kind: str | None = None,
    ) -> IResource:
        # Classified as the engine will read it (decoded); forwarded as sent.
        path = unquote(request.path.decode("latin-1"))
        method = request.method.decode("latin-1")
        decision = route(
            method,
            path,
            lower_headers(request),
            self._table,
            about=about,
            for_manager=creates_swarm_network(method, strip_version(path), _body(request)),
            query=request.uri.partition(b"?")[2].decode("latin-1"),
        )
        return self._serve(decision, request, local, kind)

    def _serve(
        self,
        decision: Route | Located,
        request: Request,
        local: IResource | None,
        served_as: str | None = None,
    ) -> IResource:
        """The resource that serves a request routed (or located) to ``decision``;
        ``served_as`` names its route kind when it is not the decision's."""
        self._mark(decision, request, served_as)
        match decision:
            case Local():
                return local or self._engine_proxy
            case Forward(peer):
                return PeerProxy(self._peer_relay, self._nodes, peer)
            case Inspected(_, headers, body):
                return _InspectedResource(headers, body)
            case Locate(kind, ident):
                located_as = served_as or "locate"
                return DeferredResource(self._locate(request, kind, ident, local, located_as))
            case ClusterList(kind, nodes, absent, query):
                return self._fanout.resource(kind, Selection(nodes, absent, query))
            case ClusterDF():
                return self._disk_usage.resource()
            case Broadcast(operation, nodes, absent):
                return self._broadcaster.resource(operation, nodes, absent)
            case BadBroadcast(why):
                # The docker CLI shows the message only.
                return ErrorResource(
                    400,
                    f"This request cannot be broadcast: {why}",
                    "Drop the X-SwarmAgent-Broadcast header (the CLI's config.json HttpHeaders)",
                )
            case MergedEvents():
                return self._events.resource() if self._events else self._engine_proxy
            case NotFound(body, missing):
                return _NotFoundResource(body, missing)
            case AmbiguousObject(kind, ident, peers):
                what = {"containers": "container", "images": "image", "volumes": "volume"}.get(
                    kind, "exec instance"
                )
                return ErrorResource(
                    409,
                    f"Several nodes have a {what} matching {ident!r}: "
                    + ", ".join(p.name for p in peers),
                    "Set the X-PortainerAgent-Target header to one of their node IDs: "
                    + ", ".join(p.identity.key for p in peers),
                )
            case NoManager():
                return ErrorResource(
                    503,
                    "The agent was unable to contact any other agent located on a manager node",
                    "Unable to find an agent on any manager node",
                )
            case UnknownNode(target, known):
                return ErrorResource(
                    404,
                    # The docker CLI shows only the message.
                    f"No agent known for node {target!r}; known nodes: "
                    + (", ".join(known) or "none"),
                    "Known nodes: " + (", ".join(known) or "none"),
                )
            case AmbiguousNode(target, node_ids):
                return ErrorResource(
                    409,
                    f"Several nodes are named {target!r}",
                    "Target one by node ID: " + ", ".join(node_ids),
                )
            case Misdirected(why):
                return ErrorResource(421, "A forwarded request reached the wrong agent", why)
        raise AssertionError(decision)

    def _mark(self, decision: Route | Located, request: Request, served_as: str | None) -> None:
        """Record how ``request`` is served, for its metrics and access log."""
        nodes: tuple[str, ...] = ()
        match decision:
            case Local():
                route, nodes = "local", (self._table.me.name,)
            case Forward(peer):
                route, nodes = "forwarded", (peer.name,)
            case Inspected(peer):
                route, nodes = "local" if peer.is_self else "forwarded", (peer.name,)
            case ClusterList() | ClusterDF():
                route = "cluster_list"
            case Broadcast():
                route = "broadcast"
            case MergedEvents():
                route = "events" if self._events else "local"
            case Locate():
                route = "locate"
            case NotFound():
                route = "locate"
            case _:
                route = "error"
        if route in ("local", "forwarded"):
            if served_as is None and wants_upgrade(request):
                served_as = "tunnel"
            route = served_as or route
        elif route == "locate" and served_as is not None:
            route = served_as
        mark(request, route, nodes)

    def _locate(
        self,
        request: Request,
        kind: str,
        ident: str,
        local: IResource | None,
        served_as: str | None,
    ) -> Deferred[IResource]:
        """The resource that serves ``request`` once its object is found.

        twisted.web has already read the whole request body (``request.content``)
        and buffers whatever the client sends next, so the request can be relayed
        or hijacked once the lookup ends.
        """
        gone = watch_gone(request)

        def failed(reason: Failure) -> Located:
            # A bug here must not leave the client hanging: serve it here.
            log.failure("lookup of {path} failed", reason, path=request.path)
            return Local()

        def serve(found: Located) -> IResource:
            # Exactly as if the client had targeted that node.
            return _Gone() if gone() else self._serve(found, request, local, served_as)

        located = Deferred.fromCoroutine(self._locator.locate(request, kind, ident))
        return located.addErrback(failed).addCallback(serve)

    def _ping(self, request: Request) -> bytes:
        request.setResponseCode(204)
        return b""

    def _agents(self, request: Request) -> bytes:
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        doc = [
            {
                "IPAddress": peer.address,
                # A string, as the reference agent sends it.
                "Port": str(peer.port),
                "NodeName": peer.name,
                "NodeID": peer.identity.node_id,
                "NodeRole": peer.identity.role,
                "EdgeKeySet": False,
            }
            for peer in self._table.nodes()
        ]
        return json.dumps(doc).encode("utf-8")

    def _identity(self, request: Request) -> bytes:
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        doc = {**self._table.me.identity.to_json(), "AgentVersion": __version__}
        return json.dumps(doc).encode("utf-8")


class _Gone(Resource):
    """Nothing to serve: the client left during the lookup."""

    isLeaf = True

    def render(self, request: Request) -> Rendered:
        return NOT_DONE_YET


class _InspectedResource(Resource):
    """A node's answer to the inspect the lookup sent it, which was the request."""

    isLeaf = True

    def __init__(self, headers: tuple[tuple[bytes, list[bytes]], ...], body: bytes) -> None:
        super().__init__()
        self._headers = headers
        self._body = body

    def render(self, request: Request) -> bytes:
        for name, values in self._headers:
            request.responseHeaders.setRawHeaders(name, values)
        return self._body


class _NotFoundResource(Resource):
    """The local engine's own 404, naming the nodes that could not be asked."""

    isLeaf = True

    def __init__(self, body: bytes, missing: tuple[str, ...]) -> None:
        super().__init__()
        self._body = body
        self._missing = missing

    def render(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        name_missing(request, self._missing)
        return self._body or error_body("No such object")
