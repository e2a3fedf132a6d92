"""The conversation with other nodes: per-node copies, the deadline, and the rules for many."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from swarmagent.nodes import (
    NO_AGENT,
    PING,
    Answered,
    Copy,
    NodeFailed,
    Nodes,
    Outcome,
    answer_all_failed,
    name_missing,
    tag,
)
from swarmagent.peers import Peer
from tests.helpers import AGENT_PORT, Client, FakeAgent, Response, make_site, make_table, manager

TIMEOUT = 2.0
CLIENT_HEADERS = [
    ("Authorization", "Bearer t"),
    ("X-PortainerAgent-Signature", "sig"),
    ("X-PortainerAgent-Target", "somewhere"),
    ("X-SwarmAgent-Hop", "elsewhere"),
    ("Connection", "close"),
]


class _Serve(Resource):
    """A leaf that hands each request to ``serve``."""

    isLeaf = True

    def __init__(self, serve: Callable[[Request], Any]) -> None:
        super().__init__()
        self._serve = serve

    def render(self, request: Request) -> Any:
        return self._serve(request)


def raw(copy: Copy, name: bytes) -> list[bytes] | None:
    values = copy.headers.getRawHeaders(name)
    return None if values is None else list(values)


class NodesCase(SynchronousTestCase):
    """This node is a (node ID id-a); b and c (at an IPv6 address) are the others."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.table = make_table(manager("a"), {"10.0.0.2": manager("b"), "fd00::3": manager("c")})
        self.engine = FakeAgent()
        self.peers = FakeAgent()
        self.nodes = Nodes(
            self.table,
            self.engine,
            self.peers,
            self.clock,
            TIMEOUT,
            credentials={"X-PortainerAgent-Signature": "own"},
        )
        self.a, self.b, self.c = self.table.nodes()

    def copies(
        self, node: Peer, uri: str = "/v1.41/containers/json?all=1", path: bytes | None = None
    ) -> Copy:
        """``node``'s copy of a client request for ``uri`` (or of ``path`` with its headers)."""
        made: list[Copy] = []

        def serve(request: Request) -> bytes:
            made.append(self.nodes.copy(node, path or request.uri, request))
            return b""

        Client(make_site(_Serve(serve))).send("GET", uri, CLIENT_HEADERS)
        [copy] = made
        return copy


class CopyTests(NodesCase):
    def test_this_node_goes_to_the_engine(self) -> None:
        copy = self.copies(self.a)
        self.assertIs(copy.client, self.engine)
        self.assertEqual(copy.url, b"http://docker/v1.41/containers/json?all=1")
        self.assertEqual(raw(copy, b"authorization"), [b"Bearer t"])
        self.assertEqual(raw(copy, b"x-forwarded-for"), [b"10.9.9.9"])
        names = [n.lower() for n, _ in copy.headers.getAllRawHeaders()]
        self.assertFalse([n for n in names if n.startswith((b"x-portaineragent", b"x-swarmagent"))])
        self.assertIsNone(raw(copy, b"connection"))

    def test_a_peer_gets_a_forward(self) -> None:
        copy = self.copies(self.b)
        self.assertIs(copy.client, self.peers)
        self.assertEqual(copy.url, b"https://10.0.0.2:9001/v1.41/containers/json?all=1")
        self.assertEqual(raw(copy, b"x-portaineragent-target"), [b"id-b"])
        self.assertEqual(raw(copy, b"x-swarmagent-hop"), [b"id-a"])
        self.assertEqual(raw(copy, b"x-portaineragent-signature"), [b"sig"])
        self.assertEqual(raw(copy, b"authorization"), [b"Bearer t"])
        self.assertIsNone(raw(copy, b"connection"))

    def test_ipv6_peer_url(self) -> None:
        self.assertEqual(self.c.address, "fd00::3")
        copy = self.copies(self.c, path=b"/v1.41/containers/x/json")
        self.assertEqual(copy.url, b"https://[fd00::3]:9001/v1.41/containers/x/json")
        self.assertEqual(raw(copy, b"x-portaineragent-target"), [b"id-c"])

    def test_fresh_headers_per_node(self) -> None:
        b, c = self.copies(self.b), self.copies(self.c)
        self.assertIsNot(b.headers, c.headers)
        self.assertEqual(raw(b, b"x-portaineragent-target"), [b"id-b"])

    def test_own_question_carries_own_credentials(self) -> None:
        copy = self.nodes.copy(self.b, b"/nodes")
        self.assertEqual(copy.url, b"https://10.0.0.2:9001/nodes")
        self.assertEqual(raw(copy, b"x-portaineragent-signature"), [b"own"])
        self.assertEqual(raw(copy, b"x-portaineragent-target"), [b"id-b"])
        self.assertEqual(raw(copy, b"x-swarmagent-hop"), [b"id-a"])

    def test_own_question_to_the_engine_is_bare(self) -> None:
        copy = self.nodes.copy(self.a, b"/containers/x/json")
        self.assertEqual(copy.url, b"http://docker/containers/x/json")
        self.assertEqual(list(copy.headers.getAllRawHeaders()), [])

    def test_hop_follows_this_nodes_identity(self) -> None:
        self.table.set_me(manager("a", "id-a2"))
        copy = self.nodes.copy(self.b, b"/x")
        self.assertEqual(raw(copy, b"x-swarmagent-hop"), [b"id-a2"])


class GetTests(NodesCase):
    def get(self, node: Peer) -> list[Outcome]:
        outcomes: list[Outcome] = []
        self.nodes.get(node, b"/containers/x/json").addCallback(outcomes.append)
        return outcomes

    def test_any_answer_is_answered(self) -> None:
        outcomes = self.get(self.b)
        response = self.peers.calls[0].respond(404)
        response.deliver(b'{"message":"no such container"}')
        response.end()
        self.assertEqual(outcomes, [Answered(self.b, 404, b'{"message":"no such container"}')])

    def test_deadline_is_a_failure_with_its_reason(self) -> None:
        outcomes = self.get(self.b)
        self.clock.advance(TIMEOUT - 0.01)
        self.assertEqual(outcomes, [])
        self.clock.advance(0.01)
        [failed] = outcomes
        assert isinstance(failed, NodeFailed)
        self.assertEqual((failed.node, failed.why), ("b", f"no answer within {TIMEOUT:g} s"))
        self.assertTrue(self.peers.calls[0].cancelled)

    def test_own_deadline(self) -> None:
        outcomes: list[Outcome] = []
        self.nodes.get(self.b, b"/nodes", timeout=0.5).addCallback(outcomes.append)
        self.clock.advance(0.5)
        [failed] = outcomes
        assert isinstance(failed, NodeFailed)
        self.assertEqual(failed.why, "no answer within 0.5 s")

    def test_unreachable_is_a_failure(self) -> None:
        outcomes = self.get(self.a)
        self.engine.calls[0].result.errback(ConnectionRefusedError("refused"))
        [failed] = outcomes
        assert isinstance(failed, NodeFailed)
        self.assertEqual((failed.node, failed.code), ("a", 0))
        self.assertIn("refused", failed.why)

    def test_agentless_nodes(self) -> None:
        self.table.expect({"id-a": "a", "id-b": "b", "id-c": "c", "id-e": "e", "id-d": "d"})
        failures = self.nodes.agentless()
        self.assertEqual([(f.node, f.why) for f in failures], [("d", NO_AGENT), ("e", NO_AGENT)])


class SilenceTests(NodesCase):
    """A node that ran out a deadline costs one deadline, not one per call."""

    def get(self, node: Peer, path: bytes = b"/containers/json") -> list[Outcome]:
        outcomes: list[Outcome] = []
        self.nodes.get(node, path).addCallback(outcomes.append)
        return outcomes

    def answer(self, call_index: int, code: int = 200, agent: FakeAgent | None = None) -> None:
        response = (agent or self.peers).calls[call_index].respond(code)
        response.deliver(b"[]")
        response.end()

    def run_out(self, node: Peer) -> NodeFailed:
        """The first call to ``node`` waits the whole deadline, and so does
        the ping then sent: ``node`` is silent (and pinged again)."""
        outcomes = self.get(node)
        self.assertEqual(outcomes, [])
        self.clock.advance(TIMEOUT)
        [failed] = outcomes
        assert isinstance(failed, NodeFailed)
        self.clock.advance(TIMEOUT)
        return failed

    def test_first_call_waits_the_next_do_not(self) -> None:
        self.clock.advance(1_700_000_000)
        self.run_out(self.b)
        self.assertEqual(list(self.nodes.silences()), ["id-b"])
        asked = len(self.peers.calls)
        for _ in range(3):
            [failed] = self.get(self.b)  # at once, with no clock advance
            assert isinstance(failed, NodeFailed)
            self.assertEqual(failed.node, "b")
            self.assertEqual(
                failed.why,
                f"not answering since 2023-11-14T22:13:20+00:00: no answer within {TIMEOUT:g} s",
            )
        # Only the first was sent on, in the background, to see whether it answers.
        self.assertEqual(len(self.peers.calls), asked + 1)
        # The other nodes are asked as before.
        self.get(self.c)
        self.assertEqual(len(self.peers.calls), asked + 2)

    def test_a_node_that_answers_its_ping_is_not_left_out(self) -> None:
        """A call can run out while the node answers (found by the soak: a
        manager's engine holds /services and /nodes while the swarm elects a
        leader): the node is pinged at once and, if the ping answers, never
        silent; a container list asked meanwhile still asks it (a soak run had
        one leave out a healthy manager while it was silent for one ping)."""
        outcomes = self.get(self.b)
        self.clock.advance(TIMEOUT)
        self.assertIsInstance(outcomes[0], NodeFailed)
        ping = self.peers.calls[-1]
        self.assertEqual(ping.url, b"https://10.0.0.2:9001" + PING)
        self.assertEqual(self.nodes.silences(), {})
        asked = len(self.peers.calls)
        meanwhile = self.get(self.b)
        self.assertEqual(len(self.peers.calls), asked + 1)  # asked, not left out
        self.answer(asked - 1)  # the ping
        self.answer(-1)
        self.assertEqual(meanwhile, [Answered(self.b, 200, b"[]")])
        self.assertEqual(self.nodes.silences(), {})

    def test_the_background_call_that_answers_ends_the_silence(self) -> None:
        self.run_out(self.b)
        self.get(self.b)
        self.answer(-1)
        self.assertEqual(self.nodes.silences(), {})
        outcomes = self.get(self.b)
        self.assertEqual(outcomes, [])  # a real call again
        self.answer(-1)
        [answered] = outcomes
        self.assertIsInstance(answered, Answered)

    def test_the_background_call_that_runs_out_asks_again_next_time(self) -> None:
        self.run_out(self.b)
        self.get(self.b)
        self.clock.advance(TIMEOUT)
        asked = len(self.peers.calls)
        self.get(self.b)
        self.assertEqual(len(self.peers.calls), asked + 1)
        self.assertIn("id-b", self.nodes.silences())

    def test_answers_never_make_a_node_silent(self) -> None:
        for code in (400, 403, 404, 500):
            outcomes = self.get(self.b)
            self.answer(-1, code)
            [answered] = outcomes
            self.assertEqual(answered, Answered(self.b, code, b"[]"))
        self.assertEqual(self.nodes.silences(), {})

    def test_quick_failures_do_not_make_a_node_silent(self) -> None:
        self.get(self.b)
        self.peers.calls[-1].result.errback(ConnectionRefusedError("refused"))
        self.assertEqual(self.nodes.silences(), {})

    def test_recheck_pings_through_the_agent_and_clears(self) -> None:
        self.run_out(self.b)
        self.nodes.recheck()
        ping = self.peers.calls[-1]
        self.assertEqual(ping.url, b"https://10.0.0.2:9001" + PING)
        self.assertEqual(ping.headers.getRawHeaders(b"x-portaineragent-target"), [b"id-b"])
        self.assertEqual(ping.headers.getRawHeaders(b"x-portaineragent-signature"), [b"own"])
        # A ping in flight: lists are still answered at once, and not sent on.
        asked = len(self.peers.calls)
        [failed] = self.get(self.b)
        self.assertIsInstance(failed, NodeFailed)
        self.assertEqual(len(self.peers.calls), asked)
        self.answer(-1)
        self.assertEqual(self.nodes.silences(), {})

    def test_a_refused_ping_says_nothing(self) -> None:
        """The agent refusing this agent's credentials did not ask its engine."""
        self.run_out(self.b)
        self.nodes.recheck()
        self.answer(-1, 403)
        self.assertIn("id-b", self.nodes.silences())

    def test_a_ping_that_runs_out_keeps_the_silence(self) -> None:
        self.run_out(self.b)
        done: list[object] = []
        self.nodes.recheck().addCallback(done.append)
        self.clock.advance(TIMEOUT)
        self.assertEqual(done, [None])
        self.assertIn("id-b", self.nodes.silences())

    def test_this_nodes_engine(self) -> None:
        """This node's own engine, frozen, is silent too; its ping goes to the engine."""
        self.run_out(self.a)
        self.nodes.recheck()
        self.assertEqual(self.engine.calls[-1].url, b"http://docker" + PING)
        self.answer(-1, 200, self.engine)
        self.assertEqual(self.nodes.silences(), {})

    def test_send_fails_at_once(self) -> None:
        self.run_out(self.b)
        failure = self.failureResultOf(self.nodes.send(self.b, b"/events"), NodeFailed)
        self.assertIn("not answering since", failure.value.why)

    def test_a_node_that_left_is_forgotten(self) -> None:
        self.run_out(self.b)
        self.table.retain(["fd00::3"])
        self.nodes.recheck()
        self.assertEqual(self.nodes.silences(), {})

    def test_metrics(self) -> None:
        self.run_out(self.b)
        self.get(self.b)
        registry = self.nodes.metrics.registry
        value = registry.get_sample_value
        self.assertEqual(value("swarmagent_node_silent_since_seconds", {"node": "b"}), 0.0)
        self.assertEqual(
            value("swarmagent_node_failures_total", {"node": "b", "reason": "silent"}), 1.0
        )
        self.answer(-1)
        self.assertIsNone(value("swarmagent_node_silent_since_seconds", {"node": "b"}))


class AnswerOfTests(NodesCase):
    """A request with no deadline of its own is bounded by its node's life."""

    def setUp(self) -> None:
        super().setUp()
        self.pending: Deferred[IResponse] = Deferred()
        self.cancelled: list[bool] = []
        self.pending.addErrback(self.dropped)
        self.bounded = self.nodes.answer_of(self.b, self.pending)

    def dropped(self, reason: Failure) -> Failure:
        self.cancelled.append(reason.check(CancelledError) is not None)
        return reason

    def ping(self) -> Any:
        ping = self.peers.calls[-1]
        self.assertEqual(ping.url, b"https://10.0.0.2:9001" + PING)
        return ping

    def test_an_answer_in_time_is_passed_on_and_nothing_is_asked(self) -> None:
        answer = cast(IResponse, object())  # whatever the request gets
        self.pending.callback(answer)
        self.assertIs(self.successResultOf(self.bounded), answer)
        self.clock.advance(TIMEOUT * 10)
        self.assertEqual(self.peers.calls, [])

    def test_a_node_that_answers_its_ping_is_waited_for(self) -> None:
        """A slow request (a stop waiting out its grace period) is not given up."""
        for _ in range(3):
            self.clock.advance(TIMEOUT)
            response = self.ping().respond(200)
            response.deliver(b"OK")
            response.end()
        self.assertNoResult(self.bounded)
        self.assertEqual(len(self.peers.calls), 3)
        answer = cast(IResponse, object())  # whatever the request gets
        self.pending.callback(answer)
        self.assertIs(self.successResultOf(self.bounded), answer)
        self.assertEqual(self.cancelled, [])

    def test_a_node_that_does_not_answer_its_ping_is_given_up(self) -> None:
        self.clock.advance(1_700_000_000)  # past the deadline: the ping is sent
        self.ping()
        self.assertNoResult(self.bounded)
        self.clock.advance(TIMEOUT)  # the ping runs out its own deadline
        failure = self.failureResultOf(self.bounded, TimeoutError)
        self.assertEqual(
            str(failure.value),
            f"no answer within {TIMEOUT:g} s, nor to a ping: not answering since "
            f"2023-11-14T22:13:20+00:00: no answer within {TIMEOUT:g} s",
        )
        self.assertEqual(self.cancelled, [True])  # the request itself is dropped
        self.assertIn("id-b", self.nodes.silences())

    def test_a_ping_refused_at_once_gives_it_up(self) -> None:
        self.clock.advance(TIMEOUT)
        self.ping().result.errback(ConnectionRefusedError("refused"))
        failure = self.failureResultOf(self.bounded, TimeoutError)
        self.assertIn("nor to a ping: refused", str(failure.value))
        self.assertEqual(self.cancelled, [True])

    def test_cancelling_it_cancels_the_request_and_stops_the_watch(self) -> None:
        self.bounded.cancel()
        self.failureResultOf(self.bounded, CancelledError)
        self.assertEqual(self.cancelled, [True])
        self.clock.advance(TIMEOUT * 10)
        self.assertEqual(self.peers.calls, [])

    def test_an_answer_while_the_ping_is_out_wins(self) -> None:
        self.clock.advance(TIMEOUT)
        self.ping()
        answer = cast(IResponse, object())  # whatever the request gets
        self.pending.callback(answer)
        self.assertIs(self.successResultOf(self.bounded), answer)
        self.clock.advance(TIMEOUT)  # the ping runs out: nothing more happens
        self.assertEqual(self.cancelled, [])


class FailureTests(SynchronousTestCase):
    def test_refusal(self) -> None:
        peer = Peer("10.0.0.2", AGENT_PORT, manager("b"))
        failure = Answered(peer, 409, b"{}").refusal()
        self.assertEqual((failure.node, failure.why, failure.code), ("b", "answered 409", 409))
        self.assertEqual(failure.body, b"{}")
        self.assertEqual(str(failure), "answered 409")

    def test_put_down_to_a_node(self) -> None:
        failure = NodeFailed("answer is not JSON").of("c")
        self.assertEqual((failure.node, failure.why, failure.code), ("c", "answer is not JSON", 0))


class RulesTests(SynchronousTestCase):
    def answer(self, serve: Callable[[Request], Any]) -> Response:
        return Client(make_site(_Serve(serve))).send("GET", "/x").response()

    def all_failed(self, failures: Sequence[NodeFailed]) -> Response:
        def serve(request: Request) -> Any:
            answer_all_failed(request, failures, "Nothing")
            return NOT_DONE_YET

        return self.answer(serve)

    def test_first_refusal_passed_through(self) -> None:
        response = self.all_failed(
            [
                NodeFailed("answered 500", 500, b"{}", "a"),
                NodeFailed("answered 404", 404, b'{"message":"first"}', "b"),
                NodeFailed("answered 400", 400, b'{"message":"second"}', "c"),
            ]
        )
        self.assertEqual(response.code, 404)
        self.assertEqual(response.json(), {"message": "first"})
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertTrue(response.complete)

    def test_otherwise_502_naming_each_node(self) -> None:
        response = self.all_failed(
            [NodeFailed("answered 500", 500, b"{}", "a"), NodeFailed("no answer", node="b")]
        )
        self.assertEqual(response.code, 502)
        self.assertEqual(
            response.json(), {"message": "Nothing", "details": "A: answered 500, b: no answer"}
        )
        self.assertTrue(response.complete)

    def test_no_failure_known(self) -> None:
        response = self.all_failed([])
        self.assertEqual((response.code, response.json()["details"]), (502, "No node"))

    def test_missing_nodes_named(self) -> None:
        def serve(names: list[str]) -> Callable[[Request], bytes]:
            def render(request: Request) -> bytes:
                name_missing(request, names)
                return b"[]"

            return render

        self.assertEqual(
            self.answer(serve(["b", "d"])).header("x-swarmagent-missing-nodes"), "b, d"
        )
        self.assertIsNone(self.answer(serve([])).header("x-swarmagent-missing-nodes"))

    def test_tag(self) -> None:
        items: list[Any] = [{"Id": 1, "Portainer": {"Agent": {"NodeName": "old"}}}, "x"]
        self.assertEqual(
            tag(items, "n"), [{"Id": 1, "Portainer": {"Agent": {"NodeName": "n"}}}, "x"]
        )
        self.assertEqual(
            json.loads(json.dumps(tag([{}], "m"))), [{"Portainer": {"Agent": {"NodeName": "m"}}}]
        )
