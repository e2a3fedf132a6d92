"""The cluster's disk usage: every node's ``GET /system/df``, added up.

Sizes are summed (``LayersSize``, ``BuilderSize``) and the lists (images,
containers, volumes, build cache) concatenated, each item tagged with its
node, so ``docker system df`` and ``docker system df -v`` show the whole
cluster. Nodes that fail or miss the deadline are left out and named, as
for lists.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from swarmagent.clientgone import watch_gone
from swarmagent.logs import logger
from swarmagent.nodes import Answered, NodeFailed, Nodes, add_up, answer_all_failed, name_missing
from swarmagent.twisted_types import Rendered

log = logger(__name__)


def usage_of(outcome: Answered | NodeFailed) -> tuple[str, dict[str, Any]] | NodeFailed:
    """One node's disk usage document, or why it gave none."""
    if isinstance(outcome, NodeFailed):
        return outcome
    if outcome.code != 200:
        return outcome.refusal()
    try:
        doc = json.loads(outcome.body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return NodeFailed("answer is not a JSON object", node=outcome.node.name)
    return outcome.node.name, doc


class ClusterDiskUsage:
    """Serves ``GET /system/df`` for the whole cluster."""

    def __init__(self, nodes: Nodes) -> None:
        self._nodes = nodes

    def resource(self) -> IResource:
        """A leaf that serves a GET as the cluster's disk usage."""
        return _DiskUsageResource(self)

    def render(self, request: Request) -> Rendered:
        Deferred.fromCoroutine(self._serve(request))
        return NOT_DONE_YET

    async def _serve(self, request: Request) -> None:
        gone = watch_gone(request)
        missing = self._nodes.agentless()
        calls = [
            self._nodes.get(node, request.uri, request).addCallback(usage_of)
            for node in self._nodes.table.nodes()
        ]
        usages: list[tuple[str, dict[str, Any]]] = []
        for result in await gatherResults(calls):
            if isinstance(result, NodeFailed):
                missing.append(result)
            else:
                usages.append(result)
        if gone():
            return
        for failure in missing:
            log.warn("disk usage: node {node} left out: {why}", node=failure.node, why=failure)
        if not usages:
            answer_all_failed(request, missing, "No node answered its disk usage")
            return
        name_missing(request, [f.node for f in missing])
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.write(json.dumps(add_up(usages), separators=(",", ":")).encode("utf-8"))
        request.finish()


class _DiskUsageResource(Resource):
    isLeaf = True

    def __init__(self, usage: ClusterDiskUsage) -> None:
        super().__init__()
        self._usage = usage

    def render_GET(self, request: Request) -> Rendered:
        return self._usage.render(request)
