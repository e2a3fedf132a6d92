"""Several nodes' progress streams (an image load or pull) merged into one.

Each node's answer is cut into JSON lines, as the engine writes them, and
each line is written to the client as it comes, tagged with its node as
merged events are; its ``id`` (what the docker CLI prints first on a line,
and keys its progress bars by) is prefixed with the node's name, so the CLI
shows every node's progress apart.

A node's own error line would end the client's reading (the CLI stops at
the first one), so it is written as a status line instead, and the node
counted as failed; so is a node that could not be reached or refused. The
others complete, and the last line is then one error naming every failed
node, which the CLI reports and exits non-zero on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from twisted.web.server import Request

from swarmagent.clientgone import watch_gone
from swarmagent.errors import describe
from swarmagent.logs import logger
from swarmagent.mergedlines import MAX_LINE, MergedLines, NodeStream, json_line, json_object
from swarmagent.nodes import NO_AGENT, NodeFailed, Nodes, tag
from swarmagent.peers import Peer

log = logger(__name__)


def error_message(doc: dict[str, Any]) -> str | None:
    """The error a progress line reports, if it is an error line."""
    detail = doc.get("errorDetail")
    if isinstance(detail, dict) and detail.get("message"):
        return str(detail["message"])
    if doc.get("error"):
        return str(doc["error"])
    return None


def tag_progress(line: bytes, node_name: str) -> tuple[bytes, str | None] | None:
    """One progress line tagged with its node, and the error it reports, if any.

    An error line becomes a status line (``failed: …``). None if the line is
    not a JSON object.
    """
    doc = json_object(line)
    if doc is None:
        return None
    error = error_message(doc)
    if error is not None:
        doc = {k: v for k, v in doc.items() if k not in ("error", "errorDetail")}
        doc["status"] = f"failed: {error}"
    ident = doc.get("id")
    doc["id"] = f"{node_name} {ident}" if ident else node_name
    tag([doc], node_name)
    return json_line(doc), error


def failure_line(failure: NodeFailed) -> bytes:
    """The status line that names a node that failed."""
    doc: dict[str, object] = {"id": failure.node, "status": f"failed: {failure.why}"}
    tag([doc], failure.node)
    return json_line(doc)


def failed_on(failures: Sequence[NodeFailed]) -> str:
    """``failed on node3: why; node4: why``."""
    return "failed on " + "; ".join(f"{f.node}: {f.why}" for f in failures)


def final_error(failures: Sequence[NodeFailed]) -> bytes:
    """The last line when nodes failed: an error line the docker CLI reports."""
    message = failed_on(failures)
    return json_line({"errorDetail": {"message": message}, "error": message})


def refusal(node: str, code: int, body: bytes) -> NodeFailed:
    """A node's error answer (not 200) as a failure, with the engine's message."""
    why = f"answered {code}"
    doc = json_object(body)
    if doc is not None and doc.get("message"):
        why += f": {doc['message']}"
    return NodeFailed(why, code, body, node)


class MergedProgress(MergedLines):
    """One client's merged progress stream."""

    def __init__(
        self,
        nodes: Nodes,
        request: Request,
        peers: Sequence[Peer],
        absent: Sequence[str],
        body: Callable[[], IBodyProducer | None],
        *,
        max_line: int = MAX_LINE,
    ) -> None:
        """``body`` makes each node's own copy of the request body."""
        super().__init__(request, max_line=max_line)
        self._nodes = nodes
        self._peers = list(peers)
        self._body = body
        self._streams: list[NodeStream] = []
        self._failures.extend(NodeFailed(NO_AGENT, node=name) for name in absent)

    def start(self) -> None:
        """Send the request to every node; the answer ends when they all have."""
        self._request.defaultContentType = None
        watch_gone(self._request, then=self.stopProducing)
        for peer in self._peers:
            node = self.new_node(peer)
            self._streams.append(node)
            self.await_answer(
                node,
                self._nodes.send(
                    peer, self._request.uri, self._request, method=b"POST", body=self._body()
                ),
            )
        self._maybe_finish()

    # -- what this merge says -------------------------------------------------

    def streams(self) -> Iterable[NodeStream]:
        return self._streams

    def node_line(self, node: NodeStream, line: bytes) -> None:
        tagged = tag_progress(line, node.peer.name)
        if tagged is None:
            log.debug("node {node} sent a non-JSON progress line", node=node.peer.name)
            return
        encoded, error = tagged
        self._request.write(encoded)
        if error is not None:
            # The stream goes on to its end; the node is named at the end.
            self._failures.append(NodeFailed(error, node=node.peer.name))

    def failed(self, failure: NodeFailed) -> None:
        if self._done:
            return
        log.warn(
            "{what}: node {node} failed: {why}",
            what=self._request.path,
            node=failure.node,
            why=failure.why,
        )
        self._failures.append(failure)
        if self._head_sent:
            self._request.write(failure_line(failure))

    def refused(self, node: NodeStream, code: int, body: bytes) -> NodeFailed:
        return refusal(node.peer.name, code, body)

    def unreachable(self, node: NodeStream, reason: Failure) -> NodeFailed:
        return NodeFailed(describe(reason.value), node=node.peer.name)

    def broken(self, node: NodeStream, reason: Failure) -> NodeFailed:
        return NodeFailed(f"stream broken: {describe(reason.value)}", node=node.peer.name)

    def all_failed(self) -> str:
        # The docker CLI shows the message only: it names every node.
        message = failed_on(self._failures)
        return message[:1].upper() + message[1:]

    def head_written(self) -> None:
        for failure in self._failures:
            self._request.write(failure_line(failure))

    def ending(self) -> None:
        if self._failures:
            self._request.write(final_error(self._failures))
