"""Cluster-wide lists: ask every node in parallel, tag each item, merge, name the missing.

Each item is marked with its node twice: the Portainer tag the UI reads,
and a label (``swarmagent.node``) that the docker CLI can show
(``docker ps --format '{{.Label "swarmagent.node"}}'``). Both are put in as
bytes (``nodelist.py``): the items' values go out as each engine sent them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from twisted.internet.defer import Deferred, gatherResults
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from swarmagent.clientgone import watch_gone
from swarmagent.locations import KINDS, NAMES, Locations
from swarmagent.logs import logger
from swarmagent.nodelist import node_list
from swarmagent.nodes import (
    NO_AGENT,
    Answered,
    NodeFailed,
    Nodes,
    answer_all_failed,
    name_missing,
)
from swarmagent.peers import MANAGER, Peer
from swarmagent.signature import SIGNATURE_HEADER
from swarmagent.twisted_types import Rendered

log = logger(__name__)


@dataclass
class Merged:
    """What the nodes answered, put together."""

    #: Each answering node's tagged items, JSON-encoded without the brackets.
    chunks: list[bytes] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: The nodes left out, and why.
    missing: list[NodeFailed] = field(default_factory=list)
    answered: int = 0
    #: Swarm-scoped networks listed once (see :func:`once_per_swarm`), encoded, by ID.
    swarm: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _List:
    """One node's list: its tagged items, its warnings, its swarm-scoped items."""

    node: Peer
    chunk: bytes
    warnings: list[str]
    swarm: dict[str, bytes]
    #: The items' IDs and container names, for the locations (none for other kinds).
    ids: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def once_per_swarm(request: Request, kind: str) -> bool:
    """Whether a network list names each swarm-scoped network once.

    Every node running one of its tasks lists an overlay network, so a merge
    holds it once per node. Portainer groups those copies itself (its
    networks view shows the nodes), as the reference agent sends them; any
    other client gets what a manager's engine answers: one, so that
    ``docker stack rm`` removes each network once.
    """
    return kind == "networks" and not request.requestHeaders.hasHeader(SIGNATURE_HEADER)


@dataclass(frozen=True)
class Selection:
    """The nodes a list asks, and what: a ``node`` filter's choice.

    ``nodes`` None is every node in the table when the list starts.
    """

    nodes: tuple[Peer, ...] | None = None
    #: Chosen nodes that have no agent, named missing.
    absent: tuple[str, ...] = ()
    #: The query sent to each (None: the client's own).
    query: str | None = None


def whole_list(query: bytes) -> bool:
    """Whether a container list's query asks for every container (``all``, no filter)."""
    args = parse_qs(query.decode("latin-1"))
    every = args.get("all", ["0"])[-1].lower() in ("1", "true")
    return every and not any(f.strip() not in ("", "{}") for f in args.get("filters", []))


class FanOut:
    """Serves cluster-wide list requests, and tells ``locations`` where each item is."""

    def __init__(self, nodes: Nodes, locations: Locations | None = None) -> None:
        self._nodes = nodes
        self._locations = locations

    def resource(self, kind: str, selection: Selection | None = None) -> IResource:
        """A leaf that serves a GET as the cluster-wide list of ``kind``."""
        return _ListResource(self, kind, selection or Selection())

    def render(self, request: Request, kind: str, selection: Selection | None = None) -> Rendered:
        """Start the calls; the answer is written when the last one ends."""
        Deferred.fromCoroutine(self._serve(request, kind, selection or Selection()))
        return NOT_DONE_YET

    async def _collect(self, request: Request, kind: str, selection: Selection) -> Merged:
        """Ask every known node (or the selected ones) for its list, each
        bounded by the deadline.

        A swarm node expected to run an agent but with none in the table is
        named missing too (taken with the same snapshot as the nodes asked).
        """
        if selection.nodes is None:
            nodes = self._nodes.table.nodes()
            agentless = self._nodes.agentless()
        else:
            nodes = list(selection.nodes)
            agentless = [NodeFailed(NO_AGENT, node=name) for name in selection.absent]
        uri = request.uri
        if selection.query is not None:
            uri = request.path + (
                b"?" + selection.query.encode("latin-1") if selection.query else b""
            )
        once = once_per_swarm(request, kind)
        calls: list[Deferred[_List | NodeFailed]] = [
            self._nodes.get(node, uri, request).addCallback(_list_of, kind, once) for node in nodes
        ]
        merged = Merged()
        lists: list[_List] = []
        for result in await gatherResults(calls):
            if isinstance(result, NodeFailed):
                merged.missing.append(result)
                continue
            merged.answered += 1
            lists.append(result)
            if result.chunk:
                merged.chunks.append(result.chunk)
            merged.warnings.extend(f"{result.node.name}: {w}" for w in result.warnings)
        merged.missing.extend(agentless)
        if self._locations is not None and kind in KINDS:
            # A name is unique only among every container of every node.
            names = (
                not merged.missing
                and selection.nodes is None
                and whole_list(uri.partition(b"?")[2])
            )
            self._locations.learn(kind, [(a.node.identity.key, a.ids) for a in lists])
            if names and kind == "containers":
                self._locations.learn(NAMES, [(a.node.identity.key, a.names) for a in lists])
        # A manager's copy of a swarm network first: it is the one to act on.
        for answer in sorted(lists, key=lambda a: a.node.identity.role != MANAGER):
            for key, item in answer.swarm.items():
                merged.swarm.setdefault(key, item)
        return merged

    async def _serve(self, request: Request, kind: str, selection: Selection) -> None:
        gone = watch_gone(request)
        merged = await self._collect(request, kind, selection)
        if gone():
            return
        for failure in merged.missing:
            log.warn(
                "{kind} list: node {node} left out: {why}",
                kind=kind,
                node=failure.node,
                why=failure,
            )
        if merged.missing and not merged.answered:
            answer_all_failed(request, merged.missing, "No node answered the cluster-wide list")
            return
        name_missing(request, [f.node for f in merged.missing])
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        # One join for the whole answer: each concatenation would copy every
        # node's list again (megabytes at 10 nodes x 500 containers).
        items = _between(b",", [*merged.chunks, *merged.swarm.values()])
        if kind == "volumes":
            warnings = merged.warnings + [
                f"node {f.node} did not answer: {f}" for f in merged.missing
            ]
            encoded = json.dumps(warnings, separators=(",", ":")).encode("utf-8")
            parts = [b'{"Volumes":[', *items, b'],"Warnings":', encoded, b"}"]
        else:
            parts = [b"[", *items, b"]"]
        request.write(b"".join(parts))
        request.finish()


def _between(separator: bytes, chunks: list[bytes]) -> list[bytes]:
    """``chunks`` with ``separator`` between each two, for one ``bytes.join``."""
    out = [separator] * (2 * len(chunks) - 1) if chunks else []
    out[::2] = chunks
    return out


def _list_of(outcome: Answered | NodeFailed, kind: str, once: bool) -> _List | NodeFailed:
    """One node's answer as its list, or why it gave none.

    Tagged as soon as it arrives, while other nodes are still awaited.
    """
    if isinstance(outcome, NodeFailed):
        return outcome
    node = outcome.node
    if outcome.code != 200:
        return outcome.refusal()
    try:
        tagged = node_list(
            kind,
            outcome.body,
            node.name,
            once=once,
            ids=kind in KINDS,
            names=kind == "containers",
        )
    except NodeFailed as e:
        return e.of(node.name)
    return _List(node, tagged.items, tagged.warnings, tagged.swarm, tagged.ids, tagged.names)


class _ListResource(Resource):
    isLeaf = True

    def __init__(self, fanout: FanOut, kind: str, selection: Selection) -> None:
        super().__init__()
        self._fanout = fanout
        self._kind = kind
        self._selection = selection

    def render_GET(self, request: Request) -> Rendered:
        return self._fanout.render(request, self._kind, self._selection)
