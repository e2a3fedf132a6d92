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
from urllib.parse import quote

from twisted.internet.defer import gatherResults
from twisted.web.server import Request

from swarmagent.logs import logger
from swarmagent.nodes import Answered, NodeFailed, Nodes
from swarmagent.routing import AmbiguousObject, Forward, Local, Located, NotFound

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
    """Asks the nodes which one holds an object."""

    def __init__(self, nodes: Nodes) -> None:
        self._nodes = nodes

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
        # This agent's own question to its engine; a failure is the relay's
        # to meet and report as usual.
        here = await self._nodes.get(self._nodes.me, path)
        if not isinstance(here, Answered) or here.code != 404:
            return Local()

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
        if len(holders) == 1 or (
            kind == "images" and request.method == b"GET" and _one_image(holders)
        ):
            # Several nodes holding the same image give the same answer to a
            # read: any of them will do. A write must say which one.
            return Forward(holders[0].node)
        if holders:
            return AmbiguousObject(kind, ident, tuple(h.node for h in holders))
        return NotFound(here.body, tuple(missing))

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


def _swarm_scoped(inspect: bytes) -> bool:
    try:
        return bool(json.loads(inspect).get("Scope") == "swarm")
    except (ValueError, AttributeError):
        return False


def _one_image(holders: list[Answered]) -> bool:
    """Whether these inspect answers all describe one image (by its ID)."""
    try:
        ids = {json.loads(h.body)["Id"] for h in holders}
    except (ValueError, TypeError, KeyError):
        return False
    return len(ids) == 1
