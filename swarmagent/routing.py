"""Where a Docker API request goes: a pure function of the request and the peer table."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from swarmagent.broadcast import Operation, operation, parse_broadcast
from swarmagent.nodefilter import take_node_filter
from swarmagent.peers import MANAGER, Ambiguous, Peer, PeerTable
from swarmagent.wire import BROADCAST, HOP, MANAGER_OPERATION, TARGET

_VERSION = re.compile(r"^/v\d+\.\d+(?=/|$)")
MANAGER_PREFIXES = ("/services", "/tasks", "/secrets", "/configs", "/swarm", "/nodes", "/info")
FANOUT_PATHS = {
    "/containers/json": "containers",
    "/images/json": "images",
    "/volumes": "volumes",
    "/networks": "networks",
}


def strip_version(path: str) -> str:
    """``/v1.41/containers/json`` → ``/containers/json``."""
    return _VERSION.sub("", path, count=1) or "/"


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


# ``/containers/{id}`` and below, ``/exec/{id}`` and below: one object, on one
# node. Bare ``/containers/json|create|prune`` are collection operations; a
# container named "create" is still reached as ``/containers/create/json``.
_OBJECT = re.compile(r"^/(containers|exec)/([^/]+)(/.*)?$")
_COLLECTION_OPS = {"json", "create", "prune"}
# One image: ``/images/{name}/json|history|push|tag|get``, or DELETE
# ``/images/{name}``. A name may hold slashes (``registry:5000/team/app:1``),
# as Docker's own router allows.
_IMAGE = re.compile(r"^/images/(.+?)(?:/(json|history|push|tag|get))?$")
_IMAGE_COLLECTION_OPS = {"json", "create", "load", "search", "prune", "get"}


# One network, by ID or name: ``GET|DELETE /networks/{id}`` (not ``create``,
# ``prune`` or ``connect``).
_NETWORK = re.compile(r"^/networks/([^/]+)$")
_NETWORK_COLLECTION_OPS = {"create", "prune"}


def swarm_network(bare: str, method: str) -> str | None:
    """The network an inspect or removal names, which may be swarm-scoped."""
    m = _NETWORK.match(bare)
    if m is None or method not in ("GET", "HEAD", "DELETE") or m[1] in _NETWORK_COLLECTION_OPS:
        return None
    return m[1]


def creates_swarm_network(method: str, bare: str, body: bytes) -> bool:
    """Whether a request creates a swarm-scoped (overlay) network: only a manager can."""
    if method != "POST" or bare != "/networks/create":
        return False
    try:
        doc = json.loads(body)
    except ValueError:
        return False  # the engine says what is wrong with it
    return isinstance(doc, dict) and (doc.get("Driver") == "overlay" or doc.get("Scope") == "swarm")


def single_object(bare: str, method: str = "GET") -> tuple[str, str] | None:
    """``(kind, id or name)`` if ``bare`` is about one container, exec instance or image."""
    m = _OBJECT.match(bare)
    if m is not None:
        kind, ident, rest = m.groups()
        if rest is None and kind == "containers" and ident in _COLLECTION_OPS:
            return None
        return kind, ident
    m = _IMAGE.match(bare)
    if m is not None:
        name, op = m.groups()
        if op is None and (method != "DELETE" or name in _IMAGE_COLLECTION_OPS):
            return None
        return "images", name
    return None


@dataclass(frozen=True)
class Local:
    """Serve from this node's engine."""


@dataclass(frozen=True)
class Forward:
    """Send to another node's agent."""

    peer: Peer


@dataclass(frozen=True)
class ClusterList:
    """Ask every node (or those a ``node`` filter names) and merge the lists."""

    kind: str
    #: The nodes to ask; None: every node in the table, as the list starts.
    nodes: tuple[Peer, ...] | None = None
    #: Named nodes that have no agent, left out and named.
    absent: tuple[str, ...] = ()
    #: The query to send them (the ``node`` filter taken out); None: the client's.
    query: str | None = None


@dataclass(frozen=True)
class ClusterDF:
    """Ask every node for its disk usage and add the answers up."""


@dataclass(frozen=True)
class Broadcast:
    """Send the request to each of these nodes and merge their answers."""

    operation: Operation
    nodes: tuple[Peer, ...]
    #: Nodes meant to be reached that have no agent, named as failed.
    absent: tuple[str, ...] = ()


@dataclass(frozen=True)
class BadBroadcast:
    """A broadcast the agent refuses: the operation or the header value."""

    why: str


@dataclass(frozen=True)
class MergedEvents:
    """Merge every node's event stream into one."""


@dataclass(frozen=True)
class Locate:
    """Find the node holding this container, exec instance, image, volume or
    swarm network, then serve it there."""

    kind: str
    ident: str


@dataclass(frozen=True)
class NoManager:
    """A manager is needed and none is reachable."""


@dataclass(frozen=True)
class UnknownNode:
    """The target names no known node."""

    target: str
    known: tuple[str, ...]


@dataclass(frozen=True)
class AmbiguousNode:
    """The target is a hostname that several nodes share."""

    target: str
    node_ids: tuple[str, ...]


@dataclass(frozen=True)
class Misdirected:
    """A forwarded request reached a node that cannot serve it."""

    why: str


@dataclass(frozen=True)
class NotFound:
    """No node holds the object: this engine's 404, and the nodes that could not say."""

    body: bytes
    missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class AmbiguousObject:
    """More than one other node holds an object of that name or ID prefix."""

    kind: str
    ident: str
    peers: tuple[Peer, ...]


@dataclass(frozen=True)
class Inspected:
    """Already answered: the request was the inspect the lookup sent ``peer``
    (a 200, its end-to-end headers and body, to serve as they are)."""

    peer: Peer
    headers: tuple[tuple[bytes, list[bytes]], ...]
    body: bytes


#: Where a located request is served (see :class:`Locate`).
Located = Local | Forward | Inspected | NotFound | AmbiguousObject

Route = (
    Local
    | Forward
    | ClusterList
    | ClusterDF
    | Broadcast
    | BadBroadcast
    | MergedEvents
    | Locate
    | NoManager
    | UnknownNode
    | AmbiguousNode
    | Misdirected
)


def route(
    method: str,
    path: str,
    headers: Mapping[str, str],
    table: PeerTable,
    *,
    about: tuple[str, str] | None = None,
    for_manager: bool = False,
    query: str = "",
) -> Route:
    """Decide where a Docker API request is served.

    ``path`` is the request path with its ``/vX.Y`` prefix, ``query`` its raw
    query string; ``headers`` maps lower-case names to values. ``about``
    names the object a request is about when its path does not (a browse
    request's volume); ``for_manager`` says its body asks for what only a
    manager can do (an overlay network).
    """
    me = table.me
    bare = strip_version(path)
    forwarded = bool(headers.get(HOP))
    target = headers.get(TARGET, "").strip()
    targets_me = target in ("", me.name, me.identity.node_id)

    # A forwarded copy never broadcasts again (the copies do not carry the
    # header). The docker CLI pings before every command, with its config's
    # headers: that is answered as usual.
    if BROADCAST in headers and not forwarded and bare != "/_ping":
        return _broadcast(method, bare, headers[BROADCAST], table)

    if not me.identity.swarm:
        return Local()

    if (
        for_manager
        or headers.get(MANAGER_OPERATION)
        or any(_under(bare, p) for p in MANAGER_PREFIXES)
    ):
        if me.identity.role == "manager":
            return Local()
        if forwarded:
            return Misdirected(f"{me.name} is not a manager")
        managers = table.managers()
        return Forward(managers[0]) if managers else NoManager()

    kind = FANOUT_PATHS.get(bare)
    if kind and method == "GET" and not (target and targets_me):
        if forwarded:
            return Misdirected(f"fan-out reached {me.name} with target {target!r}")
        only = take_node_filter(query)
        if only is None:
            return ClusterList(kind)
        chosen = select(only.names, table)
        if not isinstance(chosen, tuple):
            return chosen
        return ClusterList(kind, *chosen, query=only.query)

    if bare == "/system/df" and method == "GET" and not target and not forwarded:
        return ClusterDF()

    # A forwarded request always names its node, so only a client's own
    # untargeted request is merged.
    if bare == "/events" and method == "GET" and not target and not forwarded:
        return MergedEvents()

    # A client that names no node (the docker CLI, the SDK) means the node
    # holding the object, as classic Swarm routed it. Only a client's own
    # request: a forwarded one always names its node.
    if not target and not forwarded and len(table.nodes()) > 1:
        obj = about or single_object(bare, method)
        if obj is not None:
            return Locate(*obj)
        # A swarm-scoped network is a manager's to inspect or remove (the
        # docker CLI's `stack rm` sends no header); a manager's engine knows
        # them all already.
        network = swarm_network(bare, method)
        if network is not None and me.identity.role != MANAGER:
            return Locate("networks", network)

    if targets_me:
        return Local()
    if forwarded:
        return Misdirected(f"{me.name} was sent a request for {target!r}")
    found = table.find(target)
    if isinstance(found, Ambiguous):
        return AmbiguousNode(target, found.node_ids)
    if found is None:
        return UnknownNode(target, tuple(p.name for p in table.nodes()))
    return Forward(found)


def select(
    names: tuple[str, ...], table: PeerTable
) -> tuple[tuple[Peer, ...], tuple[str, ...]] | UnknownNode | AmbiguousNode:
    """The nodes ``names`` (names or node IDs; none: every node) pick, and
    those of them that have no agent (by name)."""
    agentless = table.agentless()
    if not names:
        return tuple(table.nodes()), tuple(name for _, name in agentless)
    chosen: dict[str, Peer] = {}
    absent: dict[str, None] = {}
    for name in names:
        found = table.find(name)
        if isinstance(found, Ambiguous):
            return AmbiguousNode(name, found.node_ids)
        if found is not None:
            chosen.setdefault(found.identity.key, found)
            continue
        without = [hostname for node_id, hostname in agentless if name in (node_id, hostname)]
        if not without:
            return UnknownNode(name, tuple(p.name for p in table.nodes()))
        absent[without[0]] = None
    return tuple(chosen.values()), tuple(absent)


def _broadcast(method: str, bare: str, value: str, table: PeerTable) -> Route:
    """A request carrying the broadcast header: its nodes, or why not."""
    op = operation(method, bare)
    if op is None:
        return BadBroadcast(
            f"{method} {bare} cannot be sent to several nodes: only image load, pull "
            "(or import), tag and the prunes can"
        )
    try:
        names = parse_broadcast(value)
    except ValueError as e:
        return BadBroadcast(f"the broadcast header {e}")
    chosen = select(names, table)
    if not isinstance(chosen, tuple):
        return chosen
    return Broadcast(op, *chosen)
