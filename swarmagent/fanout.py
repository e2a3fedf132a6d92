"""Cluster-wide lists: ask every node in parallel, tag each item, merge, name the missing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IAgent
from twisted.web.server import NOT_DONE_YET, Request

from swarmagent.clients import get_within
from swarmagent.errors import describe, write_error
from swarmagent.logs import logger
from swarmagent.peers import MANAGER, Peer, PeerTable
from swarmagent.proxy import node_copy
from swarmagent.signature import SIGNATURE_HEADER
from swarmagent.wire import MISSING_NODES

log = logger(__name__)

#: Why a swarm node with no agent in the peer table is left out.
NO_AGENT = "no agent reachable"


class NodeFailed(Exception):
    """A node gave no usable list."""

    def __init__(self, why: str, code: int = 0, body: bytes = b"") -> None:
        super().__init__(why)
        self.code = code
        self.body = body


@dataclass
class Merged:
    """What the nodes answered, put together."""

    #: Each answering node's tagged items, JSON-encoded without the brackets.
    chunks: list[bytes] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: The nodes left out, by name, and why.
    missing: list[tuple[str, NodeFailed]] = field(default_factory=list)
    answered: int = 0
    #: Swarm-scoped networks listed once (see :func:`once_per_swarm`), encoded, by ID.
    swarm: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _Answer:
    """One node's list: its tagged items, its warnings, its swarm-scoped items."""

    chunk: bytes
    warnings: list[str]
    swarm: dict[str, bytes]


def once_per_swarm(request: Request, kind: str) -> bool:
    """Whether a network list names each swarm-scoped network once.

    Every node running one of its tasks lists an overlay network, so a merge
    holds it once per node. Portainer groups those copies itself (its
    networks view shows the nodes), as the reference agent sends them; any
    other client gets what a manager's engine answers: one, so that
    ``docker stack rm`` removes each network once.
    """
    return kind == "networks" and not request.requestHeaders.hasHeader(SIGNATURE_HEADER)


def tag(items: list[Any], node_name: str) -> list[Any]:
    """Mark each item with its node, where the Portainer UI looks for it."""
    mark = {"Agent": {"NodeName": node_name}}
    for item in items:
        if isinstance(item, dict):
            item["Portainer"] = mark
    return items


def parse_list(kind: str, body: bytes) -> tuple[list[Any], list[str]]:
    """The items and engine warnings of one node's list answer."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise NodeFailed("answer is not JSON") from None
    if kind == "volumes":
        if not isinstance(doc, dict):
            raise NodeFailed("volume answer is not an object")
        volumes = doc.get("Volumes") or []
        warnings = doc.get("Warnings") or []
        if not isinstance(volumes, list) or not isinstance(warnings, list):
            raise NodeFailed("volume answer has the wrong shape")
        return volumes, [str(w) for w in warnings]
    if not isinstance(doc, list):
        raise NodeFailed("answer is not a list")
    return doc, []


class FanOut:
    """Serves one cluster-wide list request."""

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

    def render(self, request: Request, kind: str) -> Any:
        """Start the calls; the answer is written when the last one ends."""
        Deferred.fromCoroutine(self._serve(request, kind))
        return NOT_DONE_YET

    async def collect(self, request: Request, kind: str) -> Merged:
        """Ask every known node for its list, each bounded by the deadline.

        A swarm node expected to run an agent but with none in the table is
        named missing too (taken with the same snapshot as the nodes asked).
        """
        nodes = self._table.nodes()
        agentless = self._table.agentless()
        once = once_per_swarm(request, kind)
        calls = [self._ask(request, kind, peer, once) for peer in nodes]
        results = await DeferredList(calls, consumeErrors=True)
        merged = Merged()
        answers = list(zip(nodes, results, strict=True))
        for peer, (ok, result) in answers:
            if ok:
                merged.answered += 1
                if result.chunk:
                    merged.chunks.append(result.chunk)
                merged.warnings.extend(f"{peer.name}: {w}" for w in result.warnings)
            else:
                failure = result.value  # type: ignore[attr-defined]
                if not isinstance(failure, NodeFailed):
                    failure = NodeFailed(describe(failure))
                merged.missing.append((peer.name, failure))
        merged.missing.extend((name, NodeFailed(NO_AGENT)) for _, name in agentless)
        # A manager's copy of a swarm network first: it is the one to act on.
        for _, (ok, result) in sorted(answers, key=lambda a: a[0].identity.role != MANAGER):
            for key, item in result.swarm.items() if ok else ():
                merged.swarm.setdefault(key, item)
        return merged

    def _ask(self, request: Request, kind: str, peer: Peer, once: bool) -> Deferred[_Answer]:
        me = self._table.me
        agent = self._engine if peer is me else self._peers
        url, headers = node_copy(request, peer, me)

        async def call() -> _Answer:
            code, body = await get_within(agent, url, headers, self._clock, self._timeout)
            if code != 200:
                raise NodeFailed(f"answered {code}", code, body)
            items, warnings = parse_list(kind, body)
            items = tag(items, peer.name)
            swarm: dict[str, bytes] = {}
            if once:
                swarm = {str(i.get("Id")): _encode_items([i]) for i in items if _swarm_scoped(i)}
                items = [i for i in items if not _swarm_scoped(i)]
            # Encoded as soon as it arrives, while other nodes are still awaited;
            # many small encodes are also cheaper than one of everything.
            return _Answer(_encode_items(items), warnings, swarm)

        return Deferred.fromCoroutine(call())

    async def _serve(self, request: Request, kind: str) -> None:
        finished = [False]
        request.notifyFinish().addBoth(lambda _: finished.__setitem__(0, True))
        merged = await self.collect(request, kind)
        if finished[0]:
            return
        for name, failure in merged.missing:
            log.warn("{kind} list: node {node} left out: {why}", kind=kind, node=name, why=failure)
        if merged.missing and not merged.answered:
            self._write_all_failed(request, merged)
            return
        if merged.missing:
            names = ", ".join(name for name, _ in merged.missing)
            request.responseHeaders.setRawHeaders(MISSING_NODES, [names.encode("utf-8")])
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        items = b"[" + b",".join([*merged.chunks, *merged.swarm.values()]) + b"]"
        if kind == "volumes":
            warnings = merged.warnings + [
                f"node {name} did not answer: {f}" for name, f in merged.missing
            ]
            encoded = json.dumps(warnings, separators=(",", ":")).encode("utf-8")
            request.write(b'{"Volumes":' + items + b',"Warnings":' + encoded + b"}")
        else:
            request.write(items)
        request.finish()

    def _write_all_failed(self, request: Request, merged: Merged) -> None:
        # Every node refused: if an engine said why (a bad filter, say), the
        # client gets that answer; otherwise the agent's own 502.
        for _, failure in merged.missing:
            if 400 <= failure.code < 500:
                request.setResponseCode(failure.code)
                request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
                request.write(failure.body)
                request.finish()
                return
        names = ", ".join(f"{name}: {f}" for name, f in merged.missing)
        request.write(write_error(request, 502, "No node answered the cluster-wide list", names))
        request.finish()


def _swarm_scoped(item: Any) -> bool:
    return isinstance(item, dict) and item.get("Scope") == "swarm"


def _encode_items(items: list[Any]) -> bytes:
    """``items`` as JSON without the enclosing brackets (b"" for none)."""
    return json.dumps(items, separators=(",", ":"))[1:-1].encode("utf-8")
