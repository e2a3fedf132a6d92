"""The cluster-wide event stream: every node's ``/events``, merged live, each event tagged.

One client request opens one upstream ``/events`` per node (this node's
engine directly, the others through their agents, re-targeted and
hop-marked), with the client's query. Each upstream body is cut into lines
(one JSON event per line, as the engine writes them), each event is tagged
with its node as list items are, and written to the client as it comes.

Memory stays constant per stream: a node's unfinished line is bounded by
``max_line`` (a longer one is dropped, not buffered), and a slow client
pauses every upstream transport (the stream is the request's producer).
The stream watches the peer table, so a node that joins is added to the
open stream and one that leaves is dropped from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import parse_qsl, urlencode

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from swarmagent.clientgone import watch_gone
from swarmagent.logs import logger
from swarmagent.nodes import NodeFailed, Nodes, answer_all_failed, tag
from swarmagent.peers import Peer
from swarmagent.twisted_types import Rendered

log = logger(__name__)

#: Longest event line kept; engine events are well under 4 KiB.
MAX_LINE = 256 * 1024
#: Most of a node's error answer kept to pass on.
MAX_ERROR_BODY = 64 * 1024


class LineSplitter:
    """Cuts a byte stream into lines, holding at most ``max_line`` bytes.

    A line longer than ``max_line`` is dropped whole (its start is not kept
    while its end is awaited), and counted in ``dropped``.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self.dropped = 0
        self._parts: list[bytes] = []
        self._size = 0
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes]:
        """The lines ``data`` completes, without their line ends."""
        lines: list[bytes] = []
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            piece = data[start:end]
            if self._skipping:
                self._skipping = False
            elif self._size + len(piece) > self.max_line:
                self.dropped += 1
            else:
                line = b"".join([*self._parts, piece]).rstrip(b"\r")
                if line.strip():
                    lines.append(line)
            self._parts, self._size = [], 0
            start = end + 1
        rest = data[start:]
        if rest and not self._skipping:
            if self._size + len(rest) > self.max_line:
                # Forget the start now: holding it until the line ends would
                # make memory depend on what the upstream sends.
                self._skipping = True
                self.dropped += 1
                self._parts, self._size = [], 0
            else:
                self._parts.append(rest)
                self._size += len(rest)
        return lines


def tag_event(line: bytes, node_name: str) -> tuple[bytes, int] | None:
    """One event line marked with its node, and its time in ns (0 if none).

    None if the line is not a JSON object.
    """
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    tag([event], node_name)
    time_nano = event.get("timeNano")
    if not isinstance(time_nano, int):
        time_nano = 0
    return json.dumps(event, separators=(",", ":")).encode("utf-8") + b"\n", time_nano


def resume_from(uri: bytes, time_nano: int) -> bytes:
    """``uri`` (a path and query) with ``since`` just after ``time_nano``: what
    a node sent is not sent again."""
    base, _, query = uri.partition(b"?")
    params = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != b"since"]
    after = time_nano + 1
    params.append((b"since", b"%d.%09d" % divmod(after, 1_000_000_000)))
    return base + b"?" + urlencode(params).encode("ascii")


class ClusterEvents:
    """Serves ``GET /events`` for the whole cluster."""

    def __init__(self, nodes: Nodes, *, max_line: int = MAX_LINE) -> None:
        self.nodes = nodes
        self.max_line = max_line

    def resource(self) -> IResource:
        """A leaf that serves a GET as the cluster's event stream."""
        return _EventsResource(self)

    def render(self, request: Request) -> Rendered:
        """Open every node's stream; the answer ends when they all have."""
        request.defaultContentType = None
        metrics = self.nodes.metrics
        metrics.stream_opened("events")
        # Fires when the stream ends and when its client leaves.
        request.notifyFinish().addBoth(lambda _: metrics.stream_closed("events"))
        MergedStream(self, request).start()
        return NOT_DONE_YET


@dataclass(eq=False)
class _Node:
    """One node's upstream stream within a merged stream."""

    peer: Peer
    pending: Deferred[IResponse] | None = None
    transport: IPushProducer | None = None
    ended: bool = False
    lines: LineSplitter = field(default_factory=LineSplitter)


@implementer(IPushProducer)
class MergedStream:
    """One client's merged stream; the producer of the client's request."""

    def __init__(self, events: ClusterEvents, request: Request) -> None:
        self._events = events
        self._request = request
        self._nodes: dict[str, _Node] = {}
        #: Time (ns) of the last event sent from each node, by node key.
        self._last_sent: dict[str, int] = {}
        self._failures: list[NodeFailed] = []
        self._paused = False
        self._head_sent = False
        self._done = False
        #: A look at the table, due after it changed.
        self._sync_due: IDelayedCall | None = None

    def start(self) -> None:
        watch_gone(self._request, then=self.stopProducing)
        self.sync()
        if not self._done:
            self._events.nodes.table.watch(self._table_changed)

    def _table_changed(self) -> None:
        # Once the change is complete: a discovery tick changes the table
        # once per agent it probes, and the stream follows it once.
        if self._sync_due is None:
            self._sync_due = self._events.nodes.clock.callLater(0, self.sync)

    def _stop_watching(self) -> None:
        self._events.nodes.table.unwatch(self._table_changed)
        if self._sync_due is not None and self._sync_due.active():
            self._sync_due.cancel()
        self._sync_due = None

    def sync(self) -> None:
        """Follow the peer table: open new nodes' streams, drop those that left."""
        self._sync_due = None
        if self._done:
            return
        current = {p.identity.key: p for p in self._events.nodes.table.nodes()}
        for key in [k for k in self._nodes if k not in current]:
            node = self._nodes.pop(key)
            if not node.ended:
                log.info("events: node {node} left; dropped from the stream", node=node.peer.name)
            self._close(node)
        for key, peer in current.items():
            if key not in self._nodes:
                self._open(key, peer)
        self._maybe_finish()

    # -- one node -----------------------------------------------------------

    def _open(self, key: str, peer: Peer) -> None:
        node = _Node(peer, lines=LineSplitter(self._events.max_line))
        self._nodes[key] = node
        uri = self._request.uri
        if key in self._last_sent:
            # Back after it left: from where it stopped, so nothing is sent
            # twice and what it saw meanwhile is not lost.
            uri = resume_from(uri, self._last_sent[key])
        node.pending = self._events.nodes.send(peer, uri, self._request)
        node.pending.addCallbacks(
            self._answered, self._unreachable, callbackArgs=(node,), errbackArgs=(node,)
        )

    def _answered(self, response: IResponse, node: _Node) -> None:
        node.pending = None
        if self._done or self._nodes.get(node.peer.identity.key) is not node:
            response.deliverBody(Discard())
            return
        if response.code != 200:
            response.deliverBody(_ErrorBody(self, node, response.code))
            return
        self._send_head()
        response.deliverBody(_NodeLines(self, node))

    def _unreachable(self, reason: Failure, node: _Node) -> None:
        node.pending = None
        # Cancelled by the agent itself (client gone, node left): no news.
        if self._done or node.ended or self._nodes.get(node.peer.identity.key) is not node:
            return
        self.node_failed(node, NodeFailed(reason.getErrorMessage(), node=node.peer.name))

    def node_failed(self, node: _Node, failure: NodeFailed) -> None:
        log.warn("events: node {node} left out: {why}", node=failure.node, why=failure.why)
        self._failures.append(failure)
        self.node_ended(node)

    def node_connected(self, node: _Node, transport: IPushProducer) -> None:
        node.transport = transport
        if self._paused:
            transport.pauseProducing()

    def node_lines(self, node: _Node, lines: list[bytes]) -> None:
        if self._done or self._nodes.get(node.peer.identity.key) is not node:
            return
        for line in lines:
            tagged = tag_event(line, node.peer.name)
            if tagged is None:
                log.debug("events: node {node} sent a non-event line", node=node.peer.name)
                continue
            event, time_nano = tagged
            self._events.nodes.metrics.relayed_bytes("events", len(event))
            self._request.write(event)
            if time_nano:
                self._last_sent[node.peer.identity.key] = time_nano

    def node_ended(self, node: _Node) -> None:
        node.ended = True
        node.transport = None
        if self._nodes.get(node.peer.identity.key) is node:
            self._maybe_finish()

    def _close(self, node: _Node) -> None:
        node.ended = True
        if node.pending is not None:
            node.pending.cancel()
        if node.transport is not None:
            node.transport.stopProducing()
            node.transport = None

    # -- the client's side --------------------------------------------------

    def _send_head(self) -> None:
        if self._head_sent:
            return
        self._head_sent = True
        request = self._request
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.registerProducer(self, True)
        # The head goes out now: a client waits for it before it reads events.
        request.write(b"")

    def _maybe_finish(self) -> None:
        if self._done or any(not n.ended for n in self._nodes.values()):
            return
        self._done = True
        self._stop_watching()
        request = self._request
        if self._head_sent:
            request.unregisterProducer()
            request.finish()
            return
        answer_all_failed(request, self._failures, "No node streamed its events")

    def pauseProducing(self) -> None:
        self._paused = True
        for node in self._nodes.values():
            if node.transport is not None:
                node.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        for node in self._nodes.values():
            if node.transport is not None:
                node.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The client left: close every upstream at once."""
        if self._done:
            return
        self._done = True
        self._stop_watching()
        for node in self._nodes.values():
            self._close(node)


class _NodeLines(Protocol):
    """Receives one node's event stream."""

    def __init__(self, stream: MergedStream, node: _Node) -> None:
        self._stream = stream
        self._node = node

    def connectionMade(self) -> None:
        # A response body's transport pauses and stops the connection it
        # comes on (an IPushProducer); ``Protocol`` types it ITransport only.
        self._stream.node_connected(self._node, cast(IPushProducer, self.transport))

    def dataReceived(self, data: bytes) -> None:
        lines = self._node.lines
        dropped = lines.dropped
        complete = lines.feed(data)
        if lines.dropped != dropped:
            log.warn(
                "events: node {node} sent a line over {max} bytes; dropped",
                node=self._node.peer.name,
                max=lines.max_line,
            )
        self._stream.node_lines(self._node, complete)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # A stream the agent closed itself (client gone, node left) is no news.
        if not self._node.ended and not reason.check(ResponseDone, PotentialDataLoss):
            log.warn(
                "events: node {node} stream broken: {why}",
                node=self._node.peer.name,
                why=reason.getErrorMessage(),
            )
        self._stream.node_ended(self._node)


class _ErrorBody(Protocol):
    """Keeps the start of a node's error answer."""

    def __init__(self, stream: MergedStream, node: _Node, code: int) -> None:
        self._stream = stream
        self._node = node
        self._code = code
        self._body: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._size < MAX_ERROR_BODY:
            self._body.append(data[: MAX_ERROR_BODY - self._size])
            self._size += len(self._body[-1])

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        body = b"".join(self._body)
        failure = NodeFailed.refused(self._node.peer.name, self._code, body)
        self._stream.node_failed(self._node, failure)


class Discard(Protocol):
    """Reads an answer nobody wants any more, and hangs up."""

    def connectionMade(self) -> None:
        # A response body's transport, as in _NodeLines.
        cast(IPushProducer, self.transport).stopProducing()


class _EventsResource(Resource):
    isLeaf = True

    def __init__(self, events: ClusterEvents) -> None:
        super().__init__()
        self._events = events

    def render_GET(self, request: Request) -> Rendered:
        return self._events.render(request)
