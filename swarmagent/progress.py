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

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IBodyProducer, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from swarmagent.clientgone import watch_gone
from swarmagent.errors import describe
from swarmagent.events import MAX_ERROR_BODY, MAX_LINE, Discard, LineSplitter
from swarmagent.logs import logger
from swarmagent.nodes import NO_AGENT, NodeFailed, Nodes, answer_all_failed, tag
from swarmagent.peers import Peer

log = logger(__name__)


def _encode(doc: dict[str, object]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode("utf-8") + b"\n"


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
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    error = error_message(doc)
    if error is not None:
        doc = {k: v for k, v in doc.items() if k not in ("error", "errorDetail")}
        doc["status"] = f"failed: {error}"
    ident = doc.get("id")
    doc["id"] = f"{node_name} {ident}" if ident else node_name
    tag([doc], node_name)
    return _encode(doc), error


def failure_line(failure: NodeFailed) -> bytes:
    """The status line that names a node that failed."""
    doc: dict[str, object] = {"id": failure.node, "status": f"failed: {failure.why}"}
    tag([doc], failure.node)
    return _encode(doc)


def failed_on(failures: Sequence[NodeFailed]) -> str:
    """``failed on node3: why; node4: why``."""
    return "failed on " + "; ".join(f"{f.node}: {f.why}" for f in failures)


def final_error(failures: Sequence[NodeFailed]) -> bytes:
    """The last line when nodes failed: an error line the docker CLI reports."""
    message = failed_on(failures)
    return _encode({"errorDetail": {"message": message}, "error": message})


def refusal(node: str, code: int, body: bytes) -> NodeFailed:
    """A node's error answer (not 200) as a failure, with the engine's message."""
    why = f"answered {code}"
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and doc.get("message"):
        why += f": {doc['message']}"
    return NodeFailed(why, code, body, node)


@dataclass(eq=False)
class _Node:
    """One node's stream within the merge."""

    peer: Peer
    pending: Deferred[IResponse] | None = None
    transport: IPushProducer | None = None
    ended: bool = False
    lines: LineSplitter = field(default_factory=LineSplitter)


@implementer(IPushProducer)
class MergedProgress:
    """One client's merged progress stream; the producer of the client's request."""

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
        self._nodes = nodes
        self._request = request
        self._peers = list(peers)
        self._body = body
        self._max_line = max_line
        self._streams: list[_Node] = []
        self._failures = [NodeFailed(NO_AGENT, node=name) for name in absent]
        self._paused = False
        self._head_sent = False
        self._done = False

    def start(self) -> None:
        """Send the request to every node; the answer ends when they all have."""
        self._request.defaultContentType = None
        watch_gone(self._request, then=self.stopProducing)
        for peer in self._peers:
            node = _Node(peer, lines=LineSplitter(self._max_line))
            self._streams.append(node)
            node.pending = self._nodes.send(
                peer, self._request.uri, self._request, method=b"POST", body=self._body()
            )
            node.pending.addCallbacks(
                self._answered, self._unreachable, callbackArgs=(node,), errbackArgs=(node,)
            )
        self._maybe_finish()

    def _answered(self, response: IResponse, node: _Node) -> None:
        node.pending = None
        if self._done:
            response.deliverBody(Discard())
            return
        if response.code != 200:
            response.deliverBody(_ErrorBody(self, node, response.code))
            return
        self._send_head()
        response.deliverBody(_ProgressLines(self, node))

    def _unreachable(self, reason: Failure, node: _Node) -> None:
        node.pending = None
        if not self._done:
            self.node_failed(node, NodeFailed(describe(reason.value), node=node.peer.name))

    def node_failed(self, node: _Node, failure: NodeFailed) -> None:
        node.ended = True
        node.transport = None
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
        self._maybe_finish()

    def node_connected(self, node: _Node, transport: IPushProducer) -> None:
        node.transport = transport
        if self._paused:
            transport.pauseProducing()

    def node_lines(self, node: _Node, lines: list[bytes]) -> None:
        if self._done:
            return
        for line in lines:
            tagged = tag_progress(line, node.peer.name)
            if tagged is None:
                log.debug("node {node} sent a non-JSON progress line", node=node.peer.name)
                continue
            encoded, error = tagged
            self._request.write(encoded)
            if error is not None:
                # The stream goes on to its end; the node is named at the end.
                self._failures.append(NodeFailed(error, node=node.peer.name))

    def node_ended(self, node: _Node, reason: Failure) -> None:
        if not node.ended and not reason.check(ResponseDone, PotentialDataLoss):
            why = f"stream broken: {describe(reason.value)}"
            self.node_failed(node, NodeFailed(why, node=node.peer.name))
            return
        node.ended = True
        node.transport = None
        self._maybe_finish()

    def _send_head(self) -> None:
        if self._head_sent:
            return
        self._head_sent = True
        request = self._request
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.registerProducer(self, True)
        request.write(b"")
        for failure in self._failures:
            request.write(failure_line(failure))

    def _maybe_finish(self) -> None:
        if self._done or any(not n.ended for n in self._streams):
            return
        self._done = True
        request = self._request
        if not self._head_sent:
            # The docker CLI shows the message only: it names every node.
            message = failed_on(self._failures)
            answer_all_failed(request, self._failures, message[:1].upper() + message[1:])
            return
        if self._failures:
            request.write(final_error(self._failures))
        request.unregisterProducer()
        request.finish()

    def pauseProducing(self) -> None:
        self._paused = True
        for node in self._streams:
            if node.transport is not None:
                node.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        for node in self._streams:
            if node.transport is not None:
                node.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The client left: stop every node's request at once."""
        if self._done:
            return
        self._done = True
        for node in self._streams:
            node.ended = True
            if node.pending is not None:
                node.pending.cancel()
            if node.transport is not None:
                node.transport.stopProducing()
                node.transport = None


class _ProgressLines(Protocol):
    """Receives one node's progress stream."""

    def __init__(self, merge: MergedProgress, node: _Node) -> None:
        self._merge = merge
        self._node = node

    def connectionMade(self) -> None:
        # A response body's transport, as in events._NodeLines.
        self._merge.node_connected(self._node, cast(IPushProducer, self.transport))

    def dataReceived(self, data: bytes) -> None:
        self._merge.node_lines(self._node, self._node.lines.feed(data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._merge.node_ended(self._node, reason)


class _ErrorBody(Protocol):
    """Keeps the start of a node's error answer."""

    def __init__(self, merge: MergedProgress, node: _Node, code: int) -> None:
        self._merge = merge
        self._node = node
        self._code = code
        self._body: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._size < MAX_ERROR_BODY:
            self._body.append(data[: MAX_ERROR_BODY - self._size])
            self._size += len(self._body[-1])

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        failure = refusal(self._node.peer.name, self._code, b"".join(self._body))
        self._merge.node_failed(self._node, failure)
