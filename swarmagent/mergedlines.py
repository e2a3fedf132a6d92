"""Several nodes' JSON-lines streams merged live into one client's answer.

What the cluster's event stream (``events.py``) and a broadcast's progress
(``progress.py``) share: one upstream answer per node, its body cut into
bounded lines handed on as they come; a node's error answer kept (bounded)
as its failure; the client's flow control passed on to every node's
connection (the merge is the producer of the client's request, so a slow
client pauses every upstream and one that leaves closes them all); and the
answer finished once every node has ended, or answered as failed when no
node answered with a stream. What a line becomes, which nodes take part and
how a failure is told are each merge's own.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from twisted.web.server import Request
from zope.interface import implementer

from swarmagent.nodes import NodeFailed, answer_all_failed
from swarmagent.peers import Peer

#: Longest line kept; engine events and progress lines are well under 4 KiB.
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


def json_object(line: bytes) -> dict[str, Any] | None:
    """A line's JSON object; None if the line is not one."""
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def json_line(doc: dict[str, Any]) -> bytes:
    """``doc`` as one compact JSON line."""
    return json.dumps(doc, separators=(",", ":")).encode("utf-8") + b"\n"


@dataclass(eq=False)
class NodeStream:
    """One node's upstream answer within a merge."""

    peer: Peer
    pending: Deferred[IResponse] | None = None
    transport: IPushProducer | None = None
    ended: bool = False
    lines: LineSplitter = field(default_factory=LineSplitter)


@implementer(IPushProducer)
class MergedLines(ABC):
    """One client's merged stream; the producer of the client's request.

    A merge says which nodes take part (``streams``, ``current``), what their
    lines become (``node_line``) and how a node's failure is told
    (``failed``, ``refused``, ``unreachable``, ``broken``); the hooks with a
    body here do nothing unless a merge needs them.
    """

    def __init__(self, request: Request, *, max_line: int = MAX_LINE) -> None:
        self._request = request
        self._max_line = max_line
        self._failures: list[NodeFailed] = []
        self._paused = False
        self._head_sent = False
        self._done = False

    # -- what each merge says ----------------------------------------------

    @abstractmethod
    def streams(self) -> Iterable[NodeStream]:
        """Every node's stream in the merge now."""

    def current(self, node: NodeStream) -> bool:
        """Whether ``node`` is still in the merge (not dropped meanwhile)."""
        return True

    @abstractmethod
    def node_line(self, node: NodeStream, line: bytes) -> None:
        """Write what one complete line of a node's is to the client."""

    @abstractmethod
    def failed(self, failure: NodeFailed) -> None:
        """Count (and tell of) a node's failure."""

    @abstractmethod
    def refused(self, node: NodeStream, code: int, body: bytes) -> NodeFailed:
        """A node's error answer (not 200) as its failure."""

    @abstractmethod
    def unreachable(self, node: NodeStream, reason: Failure) -> NodeFailed:
        """A node that could not be asked, as its failure."""

    @abstractmethod
    def broken(self, node: NodeStream, reason: Failure) -> NodeFailed | None:
        """A node's stream cut short: its failure, or None if it just ends."""

    @abstractmethod
    def all_failed(self) -> str:
        """The message when no node answered with a stream."""

    def line_dropped(self, node: NodeStream) -> None:  # noqa: B027 (a hook, empty unless overridden)
        """A node sent a line over the longest kept."""

    def head_written(self) -> None:  # noqa: B027 (a hook, empty unless overridden)
        """The answer's head has just gone out."""

    def ending(self) -> None:  # noqa: B027 (a hook, empty unless overridden)
        """Every node has ended and the answer is about to finish."""

    def closing(self) -> None:  # noqa: B027 (a hook, empty unless overridden)
        """The merge is done (every node ended, or the client left)."""

    # -- one node ----------------------------------------------------------

    def new_node(self, peer: Peer) -> NodeStream:
        return NodeStream(peer, lines=LineSplitter(self._max_line))

    def await_answer(self, node: NodeStream, answer: Deferred[IResponse]) -> None:
        """Read ``node``'s answer when it comes; ``node`` is in the merge already."""
        node.pending = answer
        answer.addCallbacks(
            self._answered, self._unreachable, callbackArgs=(node,), errbackArgs=(node,)
        )

    def _answered(self, response: IResponse, node: NodeStream) -> None:
        node.pending = None
        if self._done or not self.current(node):
            response.deliverBody(Discard())
            return
        if response.code != 200:
            response.deliverBody(_ErrorBody(self, node, response.code))
            return
        self._send_head()
        response.deliverBody(_NodeLines(self, node))

    def _unreachable(self, reason: Failure, node: NodeStream) -> None:
        node.pending = None
        # Cancelled by the agent itself (client gone, node left): no news.
        if self._done or node.ended or not self.current(node):
            return
        self.node_ended(node, self.unreachable(node, reason))

    def node_connected(self, node: NodeStream, transport: IPushProducer) -> None:
        node.transport = transport
        if self._paused:
            transport.pauseProducing()

    def node_data(self, node: NodeStream, data: bytes) -> None:
        lines = node.lines
        dropped = lines.dropped
        complete = lines.feed(data)
        if lines.dropped != dropped:
            self.line_dropped(node)
        if not self._done and self.current(node):
            for line in complete:
                self.node_line(node, line)

    def node_lost(self, node: NodeStream, reason: Failure) -> None:
        # A stream the agent closed itself (client gone, node left) is no news.
        failure = None
        if not node.ended and not reason.check(ResponseDone, PotentialDataLoss):
            failure = self.broken(node, reason)
        self.node_ended(node, failure)

    def node_ended(self, node: NodeStream, failure: NodeFailed | None = None) -> None:
        """``node``'s stream is over, having failed if ``failure`` says why."""
        node.ended = True
        node.transport = None
        if failure is not None:
            self.failed(failure)
        if self.current(node):
            self._maybe_finish()

    def close_node(self, node: NodeStream) -> None:
        """Stop asking ``node``, whether it answered yet or not."""
        node.ended = True
        if node.pending is not None:
            node.pending.cancel()
        if node.transport is not None:
            node.transport.stopProducing()
            node.transport = None

    # -- the client's side -------------------------------------------------

    def _send_head(self) -> None:
        if self._head_sent:
            return
        self._head_sent = True
        request = self._request
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.registerProducer(self, True)
        # The head goes out now: a client waits for it before it reads lines.
        request.write(b"")
        self.head_written()

    def _maybe_finish(self) -> None:
        if self._done or any(not n.ended for n in self.streams()):
            return
        self._done = True
        self.closing()
        request = self._request
        if not self._head_sent:
            answer_all_failed(request, self._failures, self.all_failed())
            return
        self.ending()
        request.unregisterProducer()
        request.finish()

    def pauseProducing(self) -> None:
        self._paused = True
        for node in self.streams():
            if node.transport is not None:
                node.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        for node in self.streams():
            if node.transport is not None:
                node.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The client left: close every upstream at once."""
        if self._done:
            return
        self._done = True
        self.closing()
        for node in self.streams():
            self.close_node(node)


class _NodeLines(Protocol):
    """Receives one node's stream."""

    def __init__(self, merge: MergedLines, node: NodeStream) -> None:
        self._merge = merge
        self._node = node

    def connectionMade(self) -> None:
        # A response body's transport pauses and stops the connection it
        # comes on (an IPushProducer); ``Protocol`` types it ITransport only.
        self._merge.node_connected(self._node, cast(IPushProducer, self.transport))

    def dataReceived(self, data: bytes) -> None:
        self._merge.node_data(self._node, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._merge.node_lost(self._node, reason)


class _ErrorBody(Protocol):
    """Keeps the start of a node's error answer."""

    def __init__(self, merge: MergedLines, node: NodeStream, code: int) -> None:
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
        failure = self._merge.refused(self._node, self._code, b"".join(self._body))
        self._merge.node_ended(self._node, failure)


class Discard(Protocol):
    """Reads an answer nobody wants any more, and hangs up."""

    def connectionMade(self) -> None:
        # A response body's transport, as in _NodeLines.
        cast(IPushProducer, self.transport).stopProducing()
