"""The conversation with the cluster's nodes: one request to one node, and the rules for many.

This node is asked through its engine, any other through its agent. A copy
for another node is targeted at it and hop-marked with this node's key, so
that its agent serves it from its own engine and never sends it on; it
carries the client's credentials (a forward, a list, a lookup) or this
agent's own (discovery's questions). Each copy is built afresh: nothing is
shared between parallel calls (portainer/portainer#1867).

A node that lets a bounded call run out its deadline is *silent*: until it
answers again, :meth:`Nodes.get` and :meth:`Nodes.send` fail for it at once,
naming it missing with the reason and since when, so that it costs one
deadline rather than one per request. It is asked again in the background: by
the discovery tick (:meth:`Nodes.recheck`, a ``/_ping`` that goes through its
agent to its engine, with this agent's own credentials) and by the first call
that finds it silent (that call, sent on with its own credentials while its
caller is answered at once), one such call at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple, TypeVar

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.server import Request

from swarmagent.clients import ENGINE_BASE, get_within, peer_url
from swarmagent.errors import describe, write_error
from swarmagent.logs import logger
from swarmagent.metrics import Metrics, failure_reason, status_failed
from swarmagent.peers import Peer, PeerTable
from swarmagent.proxy import request_headers
from swarmagent.wire import BROADCAST, HOP, MISSING_NODES, TARGET

#: Why a swarm node with no agent in the peer table is left out.
NO_AGENT = "no agent reachable"
#: What :meth:`Nodes.recheck` asks: the node's engine, through its agent.
PING = b"/_ping"
#: Refusals of the asker's credentials: the node's agent answered, but its
#: engine was not asked, so they say nothing of whether it answers.
CREDENTIAL_REFUSALS = frozenset({401, 403, 407})

log = logger(__name__)

_T = TypeVar("_T")


class Copy(NamedTuple):
    """One node's copy of a request: the client that sends it, its URL and headers."""

    client: IAgent
    url: bytes
    headers: Headers


@dataclass(frozen=True)
class Answered:
    """A node's whole answer, whatever its status."""

    node: Peer
    code: int
    body: bytes
    #: As the node sent them (what :meth:`Nodes.get` read; none otherwise).
    headers: Headers = field(default_factory=Headers, compare=False, repr=False)

    def refusal(self) -> NodeFailed:
        """This answer as a failure, for a caller that needed another status."""
        return NodeFailed.refused(self.node.name, self.code, self.body)


class NodeFailed(Exception):
    """A node gave no usable answer: why, and its refusal if it sent one."""

    def __init__(self, why: str, code: int = 0, body: bytes = b"", node: str = "") -> None:
        super().__init__(why)
        self.why = why
        self.code = code
        self.body = body
        #: The node's name ("" until the failure is put down to one).
        self.node = node

    @classmethod
    def refused(cls, node: str, code: int, body: bytes) -> NodeFailed:
        """A node that answered, but not with what was asked for."""
        return cls(f"answered {code}", code, body, node)

    def of(self, node: str) -> NodeFailed:
        """This failure, put down to ``node``."""
        return NodeFailed(self.why, self.code, self.body, node)


#: What asking one node came to.
Outcome = Answered | NodeFailed


def iso_seconds(seconds: float) -> str:
    """A clock's seconds as an ISO 8601 UTC time, to the second."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


@dataclass
class Silence:
    """A node that let a bounded call run out its deadline, and has not answered since."""

    name: str
    #: When the first call it left unanswered was sent (the clock's seconds).
    since: float
    #: The last unanswered call's reason.
    why: str
    #: A call is asking it again now.
    asking: bool = False

    def describe(self) -> str:
        """Why the node is left out, as the missing node's reason."""
        return f"not answering since {iso_seconds(self.since)}: {self.why}"


def _answers(outcome: Outcome) -> bool:
    """Whether an outcome shows the node answering (its engine, as far as can be told)."""
    return isinstance(outcome, Answered) and outcome.code not in CREDENTIAL_REFUSALS


class Nodes:
    """Sends requests to the nodes in the peer table, each to the right place."""

    def __init__(
        self,
        table: PeerTable,
        engine_client: IAgent,
        peer_client: IAgent,
        clock: IReactorTime,
        timeout: float,
        credentials: Mapping[str, str] | None = None,
        metrics: Metrics | None = None,
        ping_timeout: float | None = None,
    ) -> None:
        """``timeout`` bounds :meth:`get`; ``credentials`` are the headers
        that prove this agent to the others when it asks on its own behalf;
        ``metrics`` times each call and counts each node's failures;
        ``ping_timeout`` bounds :meth:`recheck`'s pings (default ``timeout``)."""
        self.table = table
        self.metrics = metrics if metrics is not None else Metrics()
        self.clock = clock
        self._engine_client = engine_client
        self._peer_client = peer_client
        self._timeout = timeout
        self._ping_timeout = timeout if ping_timeout is None else ping_timeout
        self._credentials = dict(credentials or {})
        #: Silent nodes by node key.
        self._silent: dict[str, Silence] = {}
        #: Nodes a call ran out on, pinged to learn whether they are silent.
        self._doubted: set[str] = set()

    @property
    def me(self) -> Peer:
        """This node, as the table knows it now."""
        return self.table.me

    def copy(self, node: Peer, path: bytes, request: Request | None = None) -> Copy:
        """``node``'s copy of a request for ``path`` (with its query).

        This node's copy goes to the engine, with ``request``'s end-to-end
        headers but not the agents' (none when this agent asks on its own
        behalf). Another node's goes to its agent, targeted at it and
        hop-marked, with ``request``'s end-to-end headers (its credentials
        among them), or with this agent's own credentials when there is no
        request.
        """
        if node.is_self:
            if request is None:
                headers = Headers()
            else:
                headers = request_headers(request, keep_agent_headers=False)
            return Copy(self._engine_client, ENGINE_BASE + path, headers)
        if request is None:
            headers = Headers({k: [v] for k, v in self._credentials.items()})
        else:
            headers = request_headers(request, keep_agent_headers=True)
            # A broadcast is the receiving agent's to make, once.
            headers.removeHeader(BROADCAST)
        headers.setRawHeaders(TARGET, [node.identity.key.encode("utf-8")])
        headers.setRawHeaders(HOP, [self.me.identity.key.encode("utf-8")])
        return Copy(self._peer_client, peer_url(node.address, node.port, path), headers)

    def send(
        self,
        node: Peer,
        path: bytes,
        request: Request | None = None,
        *,
        method: bytes = b"GET",
        body: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        """Send ``node``'s copy (a GET unless told), with no deadline: the
        answer's body is the caller's to read. A silent node's fails at once
        (:class:`NodeFailed`)."""
        silence = self._silent.get(node.identity.key)
        if silence is not None:
            self.metrics.node_failed(node.name, "silent")
            return fail(NodeFailed(silence.describe(), node=node.name))
        client, url, headers = self.copy(node, path, request)

        def failed(reason: Failure) -> Failure:
            self.metrics.node_failed(node.name, failure_reason(reason.value))
            return reason

        return client.request(method, url, headers, body).addErrback(failed)

    def call(
        self,
        node: Peer,
        path: bytes,
        request: Request,
        *,
        method: bytes,
        body: IBodyProducer | None = None,
    ) -> Deferred[Outcome]:
        """Send ``node``'s copy and read its answer whole, with no deadline
        (a write may take long); never fails, like :meth:`get`."""

        async def whole() -> Outcome:
            try:
                response = await self.send(node, path, request, method=method, body=body)
                content: bytes = await readBody(response)
            except Exception as e:
                return NodeFailed(describe(e), node=node.name)
            return Answered(node, response.code, content)

        return Deferred.fromCoroutine(whole())

    def get(
        self,
        node: Peer,
        path: bytes,
        request: Request | None = None,
        *,
        timeout: float | None = None,
    ) -> Deferred[Outcome]:
        """GET ``node``'s copy whole, within the deadline; never fails.

        Any answer is :class:`Answered`; none (unreachable, too late) is a
        :class:`NodeFailed` naming the node. A call that runs out the deadline
        makes the node silent; a silent node's is a :class:`NodeFailed` at
        once, and the first such call is sent on in the background, to see
        whether the node answers again.
        """
        within = self._timeout if timeout is None else timeout
        silence = self._silent.get(node.identity.key)
        if silence is None:
            return self._get(node, path, request, within)
        self.metrics.node_failed(node.name, "silent")
        if not silence.asking:
            self._ask_again(node, silence, self._get(node, path, request, within))
        return succeed(NodeFailed(silence.describe(), node=node.name))

    def _get(
        self, node: Peer, path: bytes, request: Request | None, within: float
    ) -> Deferred[Outcome]:
        client, url, headers = self.copy(node, path, request)
        started = self.clock.seconds()

        def answered(result: tuple[int, bytes, Headers]) -> Outcome:
            self.metrics.node_call(node.name, self.clock.seconds() - started)
            if status_failed(result[0]):
                self.metrics.node_failed(node.name, "http_status")
            return Answered(node, *result)

        def failed(reason: Failure) -> Outcome:
            self.metrics.node_call(node.name, self.clock.seconds() - started)
            why = failure_reason(reason.value)
            self.metrics.node_failed(node.name, why)
            if why == "timeout":
                self._doubt(node, path, started, describe(reason.value))
            return NodeFailed(describe(reason.value), node=node.name)

        call = get_within(client, url, headers, self.clock, within)
        return call.addCallbacks(answered, failed)

    def _doubt(self, node: Peer, path: bytes, since: float, why: str) -> None:
        # A call can run out while the node answers (a manager's /nodes waits
        # for a Raft leader while its engine serves containers): it is silent
        # only if a ping, sent at once, runs out too (a ping that ran out is that).
        key = node.identity.key
        if key in self._doubted:
            return  # the ping in flight decides, from the first call's start
        if path == PING or key in self._silent:
            self._fell_silent(node, since, why)
            return
        self._doubted.add(key)

        def pinged(outcome: Outcome) -> None:
            self._doubted.discard(key)
            if not _answers(outcome):
                self._fell_silent(node, since, why)

        self._get(node, PING, None, self._ping_timeout).addCallback(pinged)

    def _fell_silent(self, node: Peer, since: float, why: str) -> None:
        # ``since``: when the call it left unanswered was sent.
        silence = self._silent.get(node.identity.key)
        if silence is not None:
            silence.why = why
            return
        silence = self._silent[node.identity.key] = Silence(node.name, since, why)
        self.metrics.silent(node.name, since)
        log.warn(
            "Node {node} is not answering ({why}): left out at once until it answers again",
            node=node.name,
            why=why,
        )

    def _ask_again(self, node: Peer, silence: Silence, call: Deferred[Outcome]) -> None:
        silence.asking = True

        def done(outcome: Outcome) -> None:
            silence.asking = False
            if _answers(outcome):
                self._answering(node.identity.key)

        call.addCallback(done)

    def _answering(self, key: str) -> None:
        silence = self._forget(key)
        if silence is None:
            return
        log.info(
            "Node {node} answers again (silent since {since})",
            node=silence.name,
            since=iso_seconds(silence.since),
        )

    def _forget(self, key: str) -> Silence | None:
        silence = self._silent.pop(key, None)
        if silence is not None:
            self.metrics.answering(silence.name)
        return silence

    def silence(self, node: Peer) -> Silence | None:
        """``node``'s silence, while it is silent."""
        return self._silent.get(node.identity.key)

    @property
    def deadline(self) -> float:
        """Seconds an answer head is awaited before its node is pinged (:meth:`answer_of`)."""
        return self._timeout

    def overdue(self, node: Peer) -> Deferred[str | None]:
        """An answer from ``node`` is past :attr:`deadline`: ``node`` is pinged.
        Fires with None if it answers (it is only slow at that request), else
        with why the request is given up."""

        def pinged(outcome: Outcome) -> str | None:
            if isinstance(outcome, Answered):
                return None
            silence = self._silent.get(node.identity.key)
            why = silence.describe() if silence is not None else outcome.why
            return f"no answer within {self._timeout:g} s, nor to a ping: {why}"

        return self._get(node, PING, None, self._ping_timeout).addCallback(pinged)

    def answer_of(self, node: Peer, pending: Deferred[_T]) -> Deferred[_T]:
        """``pending``, the answer to a request sent to ``node``, bounded by the node's life.

        A request has no deadline of its own (a stop waits out its grace
        period, an export takes its time), but a node that stopped answering
        must not hold it for ever: with no answer head within the deadline,
        the node is pinged. One that answers the ping is only slow at this
        request and is waited for again; one that does not is silent, and
        the request is given up: ``TimeoutError`` with the reason.
        """
        result: Deferred[_T] = Deferred(lambda _: pending.cancel())
        timer: list[IDelayedCall] = []

        def check() -> None:
            timer.clear()
            self.overdue(node).addCallback(pinged)

        def pinged(why: str | None) -> None:
            if result.called:
                return
            if why is None:
                timer.append(self.clock.callLater(self._timeout, check))
                return
            result.errback(TimeoutError(why))
            pending.cancel()

        def settled(outcome: _T | Failure) -> None:
            for call in timer:
                call.cancel()
            timer.clear()
            if result.called:
                return  # given up, or cancelled: its end is of no use
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

        timer.append(self.clock.callLater(self._timeout, check))
        pending.addBoth(settled)
        return result

    def silences(self) -> dict[str, Silence]:
        """The silent nodes, by node key."""
        return dict(self._silent)

    def recheck(self) -> Deferred[None]:
        """Ping each silent node still in the table (its engine, through its
        agent), within the ping deadline; those that answer are silent no more.
        Silent nodes that left the table are forgotten."""
        nodes = {p.identity.key: p for p in self.table.nodes()}
        for key in [k for k in self._silent if k not in nodes]:
            self._forget(key)
        calls: list[Deferred[None]] = []
        for key, silence in list(self._silent.items()):
            if not silence.asking:
                ping = self._get(nodes[key], PING, None, self._ping_timeout)
                self._ask_again(nodes[key], silence, ping)
                calls.append(ping.addCallback(lambda _: None))
        return DeferredList(calls).addCallback(lambda _: None)

    def agentless(self) -> list[NodeFailed]:
        """The swarm nodes expected to run an agent that have none in the table."""
        return [NodeFailed(NO_AGENT, node=name) for _, name in self.table.agentless()]


def tag(items: list[object], node_name: str) -> list[object]:
    """Mark each item (list item or event) with its node, where the Portainer UI looks for it."""
    mark = {"Agent": {"NodeName": node_name}}
    for item in items:
        if isinstance(item, dict):
            item["Portainer"] = mark
    return items


def add_up(answers: Sequence[tuple[str, object]]) -> dict[str, object]:
    """Several nodes' JSON objects as one (each given with its node's name).

    Lists are concatenated, their items tagged; numbers (sizes, counts) are
    summed; anything else is the first node's. A null is kept only where no
    node gave more.
    """
    out: dict[str, object] = {}
    for node_name, doc in answers:
        if not isinstance(doc, dict):
            continue
        for key, value in doc.items():
            current = out.get(key)
            if isinstance(value, list):
                out[key] = (current if isinstance(current, list) else []) + tag(value, node_name)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = (current if isinstance(current, int | float) else 0) + value
            elif current is None:
                out[key] = value
    return out


def name_missing(request: Request, names: Sequence[str]) -> None:
    """Name the nodes an answer leaves out, if any, in its headers."""
    if names:
        request.responseHeaders.setRawHeaders(MISSING_NODES, [", ".join(names).encode("utf-8")])


def answer_all_failed(request: Request, failures: Sequence[NodeFailed], message: str) -> None:
    """Answer a request that no node could serve, and finish it.

    If an engine said why (a bad filter, say), the client gets that answer,
    as a single engine would give it; otherwise the agent's own 502.
    """
    refusal = next((f for f in failures if 400 <= f.code < 500), None)
    if refusal is not None:
        request.setResponseCode(refusal.code)
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.write(refusal.body)
    else:
        why = ", ".join(f"{f.node}: {f.why}" for f in failures) or "no node"
        request.write(write_error(request, 502, message, why))
    request.finish()
