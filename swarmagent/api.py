"""The agent's resource tree: its own routes, then every Docker API path."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from swarmagent.auth import OPEN_PATHS, Authorizer
from swarmagent.errors import ErrorResource
from swarmagent.events import ClusterEvents
from swarmagent.fanout import FanOut
from swarmagent.peers import PeerTable
from swarmagent.proxy import EngineProxy, PeerProxy, Relay
from swarmagent.routing import (
    AmbiguousNode,
    Forward,
    Local,
    MergedEvents,
    Misdirected,
    NoManager,
    UnknownNode,
    route,
)
from swarmagent.routing import (
    FanOut as FanOutRoute,
)
from swarmagent.websocket import CONSOLE_PATHS
from swarmagent.wire import AGENT_HEADERS, IDENTITY_PATH


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
        table: PeerTable,
        engine_relay: Relay,
        peer_relay: Relay,
        fanout: FanOut,
        reactor: Any,
        authorizer: Authorizer,
        identity_open: bool = False,
        events: ClusterEvents | None = None,
        consoles: IResource | None = None,
    ) -> None:
        super().__init__()
        # Without them (unit tests of other routes), /events is one node's
        # and there are no consoles.
        self._events = events
        self._consoles = dict.fromkeys(CONSOLE_PATHS, consoles) if consoles is not None else {}
        self._authorizer = authorizer
        self._open = OPEN_PATHS | ({IDENTITY_PATH} if identity_open else set())
        self._table = table
        self._engine = EngineProxy(engine_relay, reactor)
        self._peer_relay = peer_relay
        self._fanout = fanout
        self._reactor = reactor
        ping = _Leaf(self._ping)
        agents = _Leaf(self._agents)
        self._own = {
            b"/ping": ping,
            b"/v2/ping": ping,
            b"/agents": agents,
            b"/v1/agents": agents,
            b"/v2/agents": agents,
            IDENTITY_PATH: _Leaf(self._identity),
        }

    def own_paths(self) -> frozenset[bytes]:
        """The paths the agent answers itself (everything else goes to an engine)."""
        return frozenset(self._own) | frozenset(self._consoles)

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        for name, value in AGENT_HEADERS:
            request.responseHeaders.setRawHeaders(name, [value])
        if request.path not in self._open:
            verdict = self._authorizer.check(request)
            if not verdict.accepted:
                return ErrorResource(verdict.code, verdict.message, verdict.details)
        if not safe_path(request.path):
            return ErrorResource(400, "Invalid request path", "Dot segments are not allowed")
        own = self._own.get(request.path)
        if own is not None:
            return own
        # A console is served where the target says, like a Docker request.
        return self._docker(request, local=self._consoles.get(request.path))

    def _docker(self, request: Request, local: IResource | None = None) -> IResource:
        # Classified as the engine will read it (decoded); forwarded as sent.
        path = unquote(request.path.decode("latin-1"))
        decision = route(
            request.method.decode("latin-1"), path, lower_headers(request), self._table
        )
        match decision:
            case Local():
                return local or self._engine
            case Forward(peer):
                return PeerProxy(self._peer_relay, peer, self._table.me.identity.key, self._reactor)
            case FanOutRoute(kind):
                return _FanOutResource(self._fanout, kind)
            case MergedEvents():
                return _EventsResource(self._events) if self._events else self._engine
            case NoManager():
                return ErrorResource(
                    503,
                    "The agent was unable to contact any other agent located on a manager node",
                    "Unable to find an agent on any manager node",
                )
            case UnknownNode(target, known):
                return ErrorResource(
                    404,
                    f"No agent known for node {target!r}",
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

    def _ping(self, request: Request) -> bytes:
        request.setResponseCode(204)
        return b""

    def _agents(self, request: Request) -> bytes:
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        doc = [
            {
                "IPAddress": peer.address,
                "Port": peer.port,
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
        return json.dumps(self._table.me.identity.to_json()).encode("utf-8")


class _FanOutResource(Resource):
    isLeaf = True

    def __init__(self, fanout: FanOut, kind: str) -> None:
        super().__init__()
        self._fanout = fanout
        self._kind = kind

    def render_GET(self, request: Request) -> Any:
        return self._fanout.render(request, self._kind)


class _EventsResource(Resource):
    isLeaf = True

    def __init__(self, events: ClusterEvents) -> None:
        super().__init__()
        self._events = events

    def render_GET(self, request: Request) -> Any:
        return self._events.render(request)
