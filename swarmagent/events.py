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

from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode

from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from swarmagent.clientgone import watch_gone
from swarmagent.logs import logger
from swarmagent.mergedlines import MAX_LINE, MergedLines, NodeStream, json_line, json_object
from swarmagent.nodes import NodeFailed, Nodes, tag
from swarmagent.peers import Peer
from swarmagent.twisted_types import Rendered

log = logger(__name__)


def tag_event(line: bytes, node_name: str) -> tuple[bytes, int] | None:
    """One event line marked with its node, and its time in ns (0 if none).

    None if the line is not a JSON object.
    """
    event = json_object(line)
    if event is None:
        return None
    tag([event], node_name)
    time_nano = event.get("timeNano")
    if not isinstance(time_nano, int):
        time_nano = 0
    return json_line(event), time_nano


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


class MergedStream(MergedLines):
    """One client's merged event stream, following the peer table."""

    def __init__(self, events: ClusterEvents, request: Request) -> None:
        super().__init__(request, max_line=events.max_line)
        self._events = events
        self._nodes: dict[str, NodeStream] = {}
        #: Time (ns) of the last event sent from each node, by node key.
        self._last_sent: dict[str, int] = {}
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

    def closing(self) -> None:
        """Stop watching the table."""
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
            self.close_node(node)
        for key, peer in current.items():
            if key not in self._nodes:
                self._open(key, peer)
        self._maybe_finish()

    def _open(self, key: str, peer: Peer) -> None:
        node = self.new_node(peer)
        self._nodes[key] = node
        uri = self._request.uri
        if key in self._last_sent:
            # Back after it left: from where it stopped, so nothing is sent
            # twice and what it saw meanwhile is not lost.
            uri = resume_from(uri, self._last_sent[key])
        self.await_answer(node, self._events.nodes.send(peer, uri, self._request))

    # -- what this merge says -------------------------------------------------

    def streams(self) -> Iterable[NodeStream]:
        return self._nodes.values()

    def current(self, node: NodeStream) -> bool:
        return self._nodes.get(node.peer.identity.key) is node

    def node_line(self, node: NodeStream, line: bytes) -> None:
        tagged = tag_event(line, node.peer.name)
        if tagged is None:
            log.debug("events: node {node} sent a non-event line", node=node.peer.name)
            return
        event, time_nano = tagged
        self._events.nodes.metrics.relayed_bytes("events", len(event))
        self._request.write(event)
        if time_nano:
            self._last_sent[node.peer.identity.key] = time_nano

    def failed(self, failure: NodeFailed) -> None:
        log.warn("events: node {node} left out: {why}", node=failure.node, why=failure.why)
        self._failures.append(failure)

    def refused(self, node: NodeStream, code: int, body: bytes) -> NodeFailed:
        return NodeFailed.refused(node.peer.name, code, body)

    def unreachable(self, node: NodeStream, reason: Failure) -> NodeFailed:
        return NodeFailed(reason.getErrorMessage(), node=node.peer.name)

    def broken(self, node: NodeStream, reason: Failure) -> None:
        log.warn(
            "events: node {node} stream broken: {why}",
            node=node.peer.name,
            why=reason.getErrorMessage(),
        )

    def all_failed(self) -> str:
        return "No node streamed its events"

    def line_dropped(self, node: NodeStream) -> None:
        log.warn(
            "events: node {node} sent a line over {max} bytes; dropped",
            node=node.peer.name,
            max=node.lines.max_line,
        )


class _EventsResource(Resource):
    isLeaf = True

    def __init__(self, events: ClusterEvents) -> None:
        super().__init__()
        self._events = events

    def render_GET(self, request: Request) -> Rendered:
        return self._events.render(request)
