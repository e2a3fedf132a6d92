"""Finding the node that holds the container, exec instance, image or volume a request names.

The local engine is asked first (one small inspect on its socket): most
requests are about this node's objects, and then nothing else is asked. On
its 404 every other node's agent is asked the same inspect in parallel,
targeted and hop-marked like a forward, each bounded by the fan-out deadline.

Asking before serving (rather than serving and retrying after a 404) keeps
one path for every request: writes, hijacked streams and requests with a
body are never sent twice, and a 404 that is not "no such container" (a
missing path in ``/archive``) is the engine's answer, not a cue to look
elsewhere.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from twisted.web.server import Request

from swarmagent.clients import ENGINE_BASE, get_within, peer_url
from swarmagent.errors import describe
from swarmagent.logs import logger
from swarmagent.peers import Peer, PeerTable
from swarmagent.proxy import forward_headers

log = logger(__name__)

# On the raw (still percent-encoded) path, so the inspect reaches each
# engine spelled as the client spelled the object.
_RAW_OBJECT = re.compile(rb"^(/v\d+\.\d+)?/(containers|exec)/([^/]+)")
_RAW_IMAGE = re.compile(rb"^(/v\d+\.\d+)?/images/(.+?)(?:/(?:json|history|push|tag|get))?$")


def inspect_path(raw_path: bytes) -> tuple[bytes, bytes] | None:
    """The object's kind and inspect path.

    ``/v1.41/containers/abc/logs`` → ``(b"containers", b"/v1.41/containers/abc/json")``.
    """
    if m := _RAW_OBJECT.match(raw_path):
        version, kind, ident = m.groups()
    elif m := _RAW_IMAGE.match(raw_path):
        version, kind, ident = m[1], b"images", m[2]
    else:
        return None
    return kind, (version or b"") + b"/" + kind + b"/" + ident + b"/json"


@dataclass(frozen=True)
class Here:
    """Serve from this node's engine: found here, or its answer is the answer."""


@dataclass(frozen=True)
class There:
    """Exactly one other node holds it."""

    peer: Peer


@dataclass(frozen=True)
class Nowhere:
    """No node holds it: the local engine's 404, and the nodes that did not say."""

    body: bytes
    missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class Several:
    """More than one other node matches (an ID prefix, a name used twice)."""

    peers: tuple[Peer, ...]


Found = Here | There | Nowhere | Several


class Locator:
    """Asks the nodes which one holds an object."""

    def __init__(
        self,
        table: PeerTable,
        engine: IAgent,
        peers: IAgent,
        clock: IReactorTime,
        timeout: float,
    ) -> None:
        self._table = table
        self._engine = engine
        self._peers = peers
        self._clock = clock
        self._timeout = timeout

    async def locate(self, request: Request, kind: str, ident: str) -> Found:
        """Where ``request``'s container, exec instance, image, volume or network is."""
        if kind == "networks":
            return await self._swarm_network(request, ident)
        if kind == "volumes":
            # A browse request names its volume in the query, not the path.
            path = b"/volumes/" + quote(ident, safe="").encode("ascii")
        else:
            target = inspect_path(request.path)
            if target is None:
                return Here()
            path = target[1]
        try:
            code, body = await self._ask(self._engine, ENGINE_BASE + path, Headers())
        except Exception:
            # The relay meets the same failure and reports it as usual.
            return Here()
        if code != 404:
            return Here()

        me = self._table.me
        others = [p for p in self._table.nodes() if p is not me and not p.is_self]
        calls = [
            self._ask(
                self._peers,
                peer_url(p.address, p.port, path),
                # The credentials and marks of a forward: the peer serves it
                # from its own engine, never sends it on.
                forward_headers(request, p, me.identity.key),
            )
            for p in others
        ]
        results = await DeferredList(calls, consumeErrors=True)
        holders: list[Peer] = []
        answers: list[bytes] = []
        missing: list[str] = []
        for peer, (ok, result) in zip(others, results, strict=True):
            if ok and result[0] == 200:
                holders.append(peer)
                answers.append(result[1])
            elif not (ok and result[0] == 404):
                why = f"answered {result[0]}" if ok else _reason(result)
                log.warn("lookup of {path}: node {node}: {why}", path=path, node=peer.name, why=why)
                missing.append(peer.name)
        missing.extend(name for _, name in self._table.agentless())
        if len(holders) == 1 or (
            kind == "images" and request.method == b"GET" and _one_image(answers)
        ):
            # Several nodes holding the same image give the same answer to a
            # read: any of them will do. A write must say which one.
            return There(holders[0])
        if holders:
            return Several(tuple(holders))
        return Nowhere(body, tuple(missing))

    async def _swarm_network(self, request: Request, ident: str) -> Found:
        """A manager's, if the network is swarm-scoped; else this node's.

        Workers list a swarm network only while one of their tasks uses it,
        and cannot remove it; managers know every one.
        """
        path = b"/networks/" + quote(ident, safe="").encode("ascii")
        try:
            code, body = await self._ask(self._engine, ENGINE_BASE + path, Headers())
        except Exception:
            return Here()
        if (code == 200 and not _swarm_scoped(body)) or code not in (200, 404):
            return Here()
        managers = self._table.managers()
        if not managers:
            return Here()
        leader = managers[0]
        url = peer_url(leader.address, leader.port, path)
        headers = forward_headers(request, leader, self._table.me.identity.key)
        try:
            code, body = await self._ask(self._peers, url, headers)
        except Exception as e:
            log.warn(
                "lookup of network {ident} on {node}: {why}",
                ident=ident,
                node=leader.name,
                why=describe(e),
            )
            return Here()
        return There(leader) if code == 200 and _swarm_scoped(body) else Here()

    def _ask(self, agent: IAgent, url: bytes, headers: Headers) -> Deferred[tuple[int, bytes]]:
        return get_within(agent, url, headers, self._clock, self._timeout)


def _swarm_scoped(inspect: bytes) -> bool:
    try:
        return bool(json.loads(inspect).get("Scope") == "swarm")
    except (ValueError, AttributeError):
        return False


def _one_image(answers: list[bytes]) -> bool:
    """Whether these inspect answers all describe one image (by its ID)."""
    try:
        ids = {json.loads(a)["Id"] for a in answers}
    except (ValueError, TypeError, KeyError):
        return False
    return len(ids) == 1


def _reason(failure: Any) -> str:
    return describe(getattr(failure, "value", failure))
