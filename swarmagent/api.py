"""The agent's resource tree: its own routes, then every Docker API path."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from swarmagent.errors import ErrorResource
from swarmagent.fanout import FanOut
from swarmagent.peers import PeerTable
from swarmagent.proxy import EngineProxy, PeerProxy, Relay
from swarmagent.routing import (
    AmbiguousNode,
    Forward,
    Local,
    Misdirected,
    NoManager,
    UnknownNode,
    route,
)
from swarmagent.routing import (
    FanOut as FanOutRoute,
)
from swarmagent.wire import AGENT_HEADERS, IDENTITY_PATH


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
    ) -> None:
        super().__init__()
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

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        for name, value in AGENT_HEADERS:
            request.responseHeaders.setRawHeaders(name, [value])
        own = self._own.get(request.path)
        if own is not None:
            return own
        return self._docker(request)

    def _docker(self, request: Request) -> IResource:
        path = request.path.decode("latin-1")
        decision = route(
            request.method.decode("latin-1"), path, lower_headers(request), self._table
        )
        match decision:
            case Local():
                return self._engine
            case Forward(peer):
                return PeerProxy(self._peer_relay, peer, self._table.me.identity.key, self._reactor)
            case FanOutRoute(kind):
                return _FanOutResource(self._fanout, kind)
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
