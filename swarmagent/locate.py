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

An object a recent cluster list (or lookup) placed on another node is asked
there first (``locations.py``): its 200 serves the request there; anything
else drops the entry and runs the search above, so a stale entry costs one
call, never a wrong answer.

A plain inspect (``GET /containers/{id}/json``, of an exec instance or an
image too, with no query) is its own lookup: the 200 that places the object
is served as the answer, not asked again. So an inspect of a listed object costs one request, to its
node (Portainer's snapshot inspects every running container that way).
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote

from twisted.internet.defer import gatherResults
from twisted.web.server import Request

from swarmagent.locations import KINDS, NAMES, Locations
from swarmagent.logs import logger
from swarmagent.nodes import Answered, NodeFailed, Nodes, Outcome
from swarmagent.peers import Peer
from swarmagent.proxy import answer_headers
from swarmagent.routing import AmbiguousObject, Forward, Inspected, Local, Located, NotFound

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


class Locator:
    """Asks the nodes which one holds an object (the node ``locations`` names first)."""

    def __init__(self, nodes: Nodes, locations: Locations | None = None) -> None:
        self._nodes = nodes
        self._locations = locations

    async def locate(self, request: Request, kind: str, ident: str) -> Located:
        """Where ``request``'s container, exec instance, image, volume or network is served.

        ``Local`` when this node holds it, or when its engine's answer is the
        answer; ``Forward`` to the one other node that holds it; else
        ``NotFound`` or ``AmbiguousObject``.
        """
        if kind == "networks":
            return await self._swarm_network(request, ident)
        if kind == "volumes":
            # A browse request names its volume in the query, not the path.
            path = b"/volumes/" + quote(ident, safe="").encode("ascii")
        else:
            target = inspect_path(request.path)
            if target is None:
                return Local()
            path = target[1]
        # A plain inspect is its own lookup: the 200 that places it answers
        # it. Not with a query: ``size`` may outlast the lookup's deadline.
        inspect = request.method == b"GET" and request.uri == path
        cached = self._cached(request, kind, ident)
        here: Outcome | None = None
        if cached is not None and self._locations is not None:
            peer, entry = cached
            if entry == NAMES:
                # The name may have been taken on this node since the list
                # placed it elsewhere: this engine's answer first, as always.
                here = await self._nodes.get(self._nodes.me, path)
                if not isinstance(here, Answered) or here.code != 404:
                    return _served(here, inspect, Local())
            there = await self._nodes.get(peer, path, request)
            if isinstance(there, Answered) and there.code == 200:
                self._locations.remember(entry, ident, peer.identity.key)
                return _served(there, inspect, Forward(peer))
            self._locations.forget(entry, ident)
        # This agent's own question to its engine; a failure is the relay's
        # to meet and report as usual.
        if here is None:
            here = await self._nodes.get(self._nodes.me, path)
        if not isinstance(here, Answered) or here.code != 404:
            return _served(here, inspect, Local())

        # The credentials and marks of a forward: each peer serves it from
        # its own engine, never sends it on.
        others = [p for p in self._nodes.table.nodes() if not p.is_self]
        outcomes = await gatherResults([self._nodes.get(p, path, request) for p in others])
        holders: list[Answered] = []
        missing: list[str] = []
        for outcome in outcomes:
            if isinstance(outcome, Answered) and outcome.code == 200:
                holders.append(outcome)
            elif not (isinstance(outcome, Answered) and outcome.code == 404):
                failure = outcome if isinstance(outcome, NodeFailed) else outcome.refusal()
                log.warn(
                    "lookup of {path}: node {node}: {why}",
                    path=path,
                    node=failure.node,
                    why=failure.why,
                )
                missing.append(failure.node)
        missing.extend(f.node for f in self._nodes.agentless())
        if len(holders) == 1 and not missing:
            self._remember(kind, ident, holders[0])
        if len(holders) == 1 or (
            kind == "images" and request.method == b"GET" and _one_image(holders)
        ):
            # Several nodes holding the same image give the same answer to a
            # read: any of them will do. A write must say which one.
            return _served(holders[0], inspect, Forward(holders[0].node))
        if holders:
            return AmbiguousObject(kind, ident, tuple(h.node for h in holders))
        return NotFound(here.body, tuple(missing))

    def _cached(self, request: Request, kind: str, ident: str) -> tuple[Peer, str] | None:
        """The other node an entry places the object on, if any, and the
        entry's kind (``kind``, or ``NAMES`` for a container's name).

        An image only for a read: its holders all answer one alike, so an
        entry never hides a choice the client must make.
        """
        if self._locations is None or kind not in KINDS:
            return None
        if kind == "images" and request.method not in (b"GET", b"HEAD"):
            return None
        entry = kind
        key = self._locations.where(kind, ident)
        if key is None and kind == "containers":
            entry, key = NAMES, self._locations.where(NAMES, ident)
        if key is None:
            return None
        for peer in self._nodes.table.nodes():
            if peer.identity.key == key:
                # This node's engine is asked first anyway.
                return None if peer.is_self else (peer, entry)
        self._locations.forget(entry, ident)
        return None

    def _remember(self, kind: str, ident: str, found: Answered) -> None:
        """Keep where an exact ID or container name was found."""
        entry = _exact(kind, ident, found.body)
        if self._locations is not None and kind in KINDS and entry is not None:
            self._locations.remember(entry, ident, found.node.identity.key)

    async def _swarm_network(self, request: Request, ident: str) -> Located:
        """A manager's, if the network is swarm-scoped; else this node's.

        Workers list a swarm network only while one of their tasks uses it,
        and cannot remove it; managers know every one.
        """
        path = b"/networks/" + quote(ident, safe="").encode("ascii")
        here = await self._nodes.get(self._nodes.me, path)
        if not isinstance(here, Answered):
            return Local()
        if (here.code == 200 and not _swarm_scoped(here.body)) or here.code not in (200, 404):
            return Local()
        managers = self._nodes.table.managers()
        if not managers:
            return Local()
        leader = managers[0]
        there = await self._nodes.get(leader, path, request)
        if isinstance(there, NodeFailed):
            log.warn(
                "lookup of network {ident} on {node}: {why}",
                ident=ident,
                node=there.node,
                why=there.why,
            )
            return Local()
        return Forward(leader) if there.code == 200 and _swarm_scoped(there.body) else Local()


def _served(outcome: Outcome, inspect: bool, otherwise: Located) -> Located:
    """The lookup's own answer, if it answers the request (a plain inspect's
    200); else ``otherwise``, where the request is to be sent."""
    if not (inspect and isinstance(outcome, Answered) and outcome.code == 200):
        return otherwise
    # The body is whole: its framing is this agent's to set.
    headers = answer_headers(outcome.headers, length=False)
    return Inspected(outcome.node, tuple(headers), outcome.body)


def _swarm_scoped(inspect: bytes) -> bool:
    try:
        return bool(json.loads(inspect).get("Scope") == "swarm")
    except (ValueError, AttributeError):
        return False


def _exact(kind: str, ident: str, inspect: bytes) -> str | None:
    """The entry ``ident`` makes: ``kind`` if it is the inspected object's full
    ID, ``NAMES`` if its container name, else None."""
    try:
        doc = json.loads(inspect)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    if ident == doc.get("ID" if kind == "exec" else "Id"):
        return kind
    if kind == "containers" and ident == str(doc.get("Name", "")).removeprefix("/"):
        return NAMES
    return None


def _one_image(holders: list[Answered]) -> bool:
    """Whether these inspect answers all describe one image (by its ID)."""
    try:
        ids = {json.loads(h.body)["Id"] for h in holders}
    except (ValueError, TypeError, KeyError):
        return False
    return len(ids) == 1
