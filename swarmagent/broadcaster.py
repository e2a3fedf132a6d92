"""Serving a broadcast: one request sent to several nodes, their answers merged.

Which requests may be broadcast, and to which nodes, is ``broadcast.py``'s
(routing's) to say; this sends each node its own copy through
:class:`~swarmagent.nodes.Nodes` and puts the answers together: progress
streams line by line (``progress.py``), prunes added up, a tag as one
status.

twisted.web has already spooled the request body (an image tarball) to
``request.content``, a temporary file when it is large. Each node's copy
reads that file at its own offset (``os.pread``), as fast as that node
takes it: the upload is read from the client once, never held in memory
whole, and a slow node does not hold the others back.
"""

from __future__ import annotations

import io
import json
import os
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Cooperator
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from swarmagent.broadcast import TAG, Operation
from swarmagent.clientgone import watch_gone
from swarmagent.errors import write_error
from swarmagent.logs import logger
from swarmagent.nodes import (
    NO_AGENT,
    Answered,
    NodeFailed,
    Nodes,
    add_up,
    answer_all_failed,
    name_missing,
)
from swarmagent.peers import Peer
from swarmagent.progress import MergedProgress, failed_on, refusal
from swarmagent.twisted_types import Rendered, request_body

log = logger(__name__)

#: Bytes read from the spooled body per write to a node.
READ_SIZE = 64 * 1024


class SpooledReader:
    """One node's reader of a spooled request body: a file-like object for
    ``FileBodyProducer``.

    It reads through its own duplicate of the spool file's descriptor, with
    positional reads: the shared offset is left alone, and the file stays
    readable until every reader is done with it, even once the request has
    finished and twisted.web has closed its own handle (a node may answer
    before it has read the whole body). Closing it (at the end of the body,
    or when its producer is stopped) closes only its own descriptor; one that
    is never started is closed when it is collected.
    """

    def __init__(self, fd: int) -> None:
        own = os.dup(fd)
        self._fd = own
        self._close = weakref.finalize(self, os.close, own)
        #: The whole body's length in bytes.
        self.size = os.fstat(own).st_size
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = self.size - self._pos
        data = os.pread(self._fd, size, self._pos)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._close()


def body_copies(request: Request, cooperator: Cooperator) -> Callable[[], IBodyProducer | None]:
    """A maker of body producers, one per node, each reading the body anew.

    twisted.web keeps a small body in memory (under 100 kB): each copy then
    reads the same bytes; a larger one is a temporary file, which each copy
    reads with its own :class:`SpooledReader`.
    """
    content = request_body(request)
    if content is None:
        return lambda: None
    try:
        fd = content.fileno()
    except (OSError, io.UnsupportedOperation):
        content.seek(0)
        data = content.read()
        content.seek(0)
        if not data:
            return lambda: None
        return lambda: FileBodyProducer(io.BytesIO(data), cooperator, READ_SIZE)
    content.flush()
    if os.fstat(fd).st_size == 0:
        return lambda: None
    return lambda: FileBodyProducer(SpooledReader(fd), cooperator, READ_SIZE)


class Broadcaster:
    """Serves broadcast requests."""

    def __init__(self, nodes: Nodes, cooperator: Cooperator) -> None:
        self._nodes = nodes
        self._cooperator = cooperator

    def resource(
        self, operation: Operation, peers: Sequence[Peer], absent: Sequence[str] = ()
    ) -> IResource:
        """A leaf that serves a POST as ``operation`` on each of ``peers``."""
        return _BroadcastResource(self, operation, tuple(peers), tuple(absent))

    def render(
        self, request: Request, operation: Operation, peers: Sequence[Peer], absent: Sequence[str]
    ) -> Rendered:
        body = body_copies(request, self._cooperator)
        if operation.streams:
            MergedProgress(self._nodes, request, peers, absent, body).start()
        else:
            Deferred.fromCoroutine(self._whole(request, operation, peers, absent, body))
        return NOT_DONE_YET

    async def _whole(
        self,
        request: Request,
        operation: Operation,
        peers: Sequence[Peer],
        absent: Sequence[str],
        body: Callable[[], IBodyProducer | None],
    ) -> None:
        """Send to every node, wait for all, answer once."""
        gone = watch_gone(request)
        calls = [
            self._nodes.call(peer, request.uri, request, method=b"POST", body=body())
            for peer in peers
        ]
        outcomes = await gatherResults(calls)
        if gone():
            return
        failures = [NodeFailed(NO_AGENT, node=name) for name in absent]
        done: list[Answered] = []
        for outcome in outcomes:
            if isinstance(outcome, NodeFailed):
                failures.append(outcome)
            elif 200 <= outcome.code < 300:
                done.append(outcome)
            else:
                failures.append(refusal(outcome.node.name, outcome.code, outcome.body))
        for failure in failures:
            log.warn(
                "{what}: node {node} failed: {why}",
                what=request.path,
                node=failure.node,
                why=failure.why,
            )
        if not done:
            answer_all_failed(request, failures, f"{operation.name} {failed_on(failures)}")
            return
        if operation is TAG:
            _answer_tag(request, done, failures)
            return
        docs: list[tuple[str, Any]] = []
        for answer in done:
            try:
                docs.append((answer.node.name, json.loads(answer.body)))
            except ValueError:
                failures.append(NodeFailed("answer is not JSON", node=answer.node.name))
        name_missing(request, [f.node for f in failures])
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.write(json.dumps(add_up(docs), separators=(",", ":")).encode("utf-8"))
        request.finish()


def _answer_tag(request: Request, done: list[Answered], failures: list[NodeFailed]) -> None:
    """A tag is done or not: every node tagged, else an error naming those that did not."""
    if not failures:
        request.setResponseCode(done[0].code)
        request.finish()
        return
    code = next((f.code for f in failures if 400 <= f.code < 500), 502)
    tagged = ", ".join(a.node.name for a in done)
    why = "; ".join(f"{f.node}: {f.why}" for f in failures)
    request.write(write_error(request, code, f"Tagged on {tagged} only", f"failed on {why}"))
    request.finish()


class _BroadcastResource(Resource):
    isLeaf = True

    def __init__(
        self,
        broadcaster: Broadcaster,
        operation: Operation,
        peers: tuple[Peer, ...],
        absent: tuple[str, ...],
    ) -> None:
        super().__init__()
        self._broadcaster = broadcaster
        self._operation = operation
        self._peers = peers
        self._absent = absent

    def render_POST(self, request: Request) -> Rendered:
        return self._broadcaster.render(request, self._operation, self._peers, self._absent)
