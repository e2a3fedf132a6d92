"""The cluster-wide event stream: every node's ``/events`` merged, tagged, followed."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from swarmagent.events import ClusterEvents, tag_event
from swarmagent.mergedlines import LineSplitter
from swarmagent.nodes import Nodes
from tests.helpers import (
    AGENT_PORT,
    Client,
    FakeAgent,
    FakeResponse,
    UpstreamCall,
    make_site,
    make_table,
    manager,
    worker,
)

A_EVENT = {"Type": "container", "Action": "start", "id": "a1", "time": 1}
B_EVENT = {"Type": "container", "Action": "die", "id": "b1", "time": 2}
# URL prefix of each node's upstream request: the engine for a, agents for the others.
HOSTS = {
    "a": b"http://docker/",
    "b": b"https://10.0.0.2:",
    "c": b"https://10.0.0.3:",
    "d": b"https://10.0.0.4:",
}


def line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode() + b"\n"


class EventsCase(SynchronousTestCase):
    """This node is a; b and c are the other nodes."""

    MAX_LINE = 1024

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.table = make_table(manager("a"), {"10.0.0.2": manager("b"), "10.0.0.3": worker("c")})
        self.engine = FakeAgent()
        self.peers = FakeAgent()
        nodes = Nodes(self.table, self.engine, self.peers, self.clock, 2)
        self.events = ClusterEvents(nodes, max_line=self.MAX_LINE)
        self.site = make_site(self.events.resource(), self.clock)

    def get(self, uri: str = "/v1.41/events", headers: Sequence[tuple[str, str]] = ()) -> Client:
        return Client(self.site).send("GET", uri, headers)

    def call(self, node: str) -> UpstreamCall:
        """The one (latest) upstream request for ``node``."""
        hosts = {"a": b"http://docker/", "b": b"https://10.0.0.2:", "c": b"https://10.0.0.3:"}
        hosts |= {"d": b"https://10.0.0.4:"}
        calls = [
            c for c in [*self.engine.calls, *self.peers.calls] if c.url.startswith(hosts[node])
        ]
        self.assertTrue(calls, f"no request for node {node}")
        return calls[-1]

    def stream_all(self, nodes: str = "abc") -> dict[str, FakeResponse]:
        return {
            n: self.call(n).respond(200, {b"content-type": [b"application/json"]}) for n in nodes
        }

    def following(self) -> bool:
        """Whether a stream still watches the peer table."""
        return bool(self.table._watchers)

    def events_of(self, client: Client) -> list[dict[str, Any]]:
        body = client.response().body
        self.assertTrue(body.endswith(b"\n") or not body, body)
        return [json.loads(x) for x in body.splitlines()]

    def nodes_of(self, client: Client) -> list[tuple[str, str]]:
        return [(e["id"], e["Portainer"]["Agent"]["NodeName"]) for e in self.events_of(client)]


class MergeTests(EventsCase):
    def test_one_request_per_node_with_the_query(self) -> None:
        uri = '/v1.41/events?since=10&until=20&filters={"type":["container"]}'
        self.get(uri)
        self.assertEqual(len(self.engine.calls), 1)
        self.assertEqual(len(self.peers.calls), 2)
        engine = self.call("a")
        self.assertEqual(engine.url, b"http://docker" + uri.encode())
        self.assertIsNone(engine.header(b"x-swarmagent-hop"))
        for node, address in (("b", "10.0.0.2"), ("c", "10.0.0.3")):
            call = self.call(node)
            self.assertEqual(call.url, f"https://{address}:{AGENT_PORT}{uri}".encode())
            self.assertEqual(call.header(b"x-portaineragent-target"), [f"id-{node}".encode()])
            self.assertEqual(call.header(b"x-swarmagent-hop"), [b"id-a"])
        # Fresh headers per node: one node's target never leaks into another's.
        self.assertIsNot(self.call("b").headers, self.call("c").headers)

    def test_events_tagged_with_their_node(self) -> None:
        client = self.get()
        streams = self.stream_all()
        streams["b"].deliver(line(B_EVENT))
        streams["a"].deliver(line(A_EVENT))
        streams["c"].deliver(line({**B_EVENT, "id": "c1"}) + line({**A_EVENT, "id": "c2"}))
        self.assertEqual(
            self.nodes_of(client), [("b1", "b"), ("a1", "a"), ("c1", "c"), ("c2", "c")]
        )
        response = client.response()
        self.assertEqual(response.code, 200)
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertFalse(response.complete, "the stream stays open")
        first = self.events_of(client)[0]
        self.assertEqual(first["Action"], "die", "the event itself is kept")

    def test_each_event_is_written_when_it_arrives(self) -> None:
        client = self.get()
        streams = self.stream_all()
        self.assertEqual(self.events_of(client), [], "the head is out before any event")
        streams["c"].deliver(line(A_EVENT))
        self.assertEqual(len(self.events_of(client)), 1)
        streams["c"].deliver(line(B_EVENT))
        self.assertEqual(len(self.events_of(client)), 2)

    def test_lines_split_across_chunks(self) -> None:
        client = self.get()
        streams = self.stream_all()
        data = line(A_EVENT) + line(B_EVENT)
        for i in range(len(data)):  # byte by byte
            streams["b"].deliver(data[i : i + 1])
        self.assertEqual(self.nodes_of(client), [("a1", "b"), ("b1", "b")])

    def test_interleaved_partial_lines_stay_per_node(self) -> None:
        client = self.get()
        streams = self.stream_all()
        a, b = line(A_EVENT), line(B_EVENT)
        streams["a"].deliver(a[:10])
        streams["b"].deliver(b[:7])
        streams["a"].deliver(a[10:])
        streams["b"].deliver(b[7:])
        self.assertEqual(self.nodes_of(client), [("a1", "a"), ("b1", "b")])

    def test_non_events_are_skipped(self) -> None:
        client = self.get()
        streams = self.stream_all()
        streams["a"].deliver(b"not json\n\n[1,2]\r\n" + line(A_EVENT))
        self.assertEqual(self.nodes_of(client), [("a1", "a")])

    def test_oversize_line_dropped_stream_goes_on(self) -> None:
        client = self.get()
        streams = self.stream_all()
        huge = {"id": "huge", "x": "y" * (3 * self.MAX_LINE)}
        data = line(huge)
        for start in range(0, len(data), 100):
            streams["a"].deliver(data[start : start + 100])
        streams["a"].deliver(line(A_EVENT))
        self.assertEqual(self.nodes_of(client), [("a1", "a")])

    def test_until_in_the_past_ends_when_every_node_ended(self) -> None:
        client = self.get("/events?since=1&until=2")
        self.assertTrue(self.following())
        streams = self.stream_all()
        streams["a"].deliver(line(A_EVENT))
        streams["a"].end()
        streams["b"].end()
        self.assertFalse(client.response().complete, "c has not ended yet")
        streams["c"].deliver(line(B_EVENT))
        streams["c"].end()
        response = client.response()
        self.assertTrue(response.complete)
        self.assertEqual(self.nodes_of(client), [("a1", "a"), ("b1", "c")])
        self.assertFalse(self.following(), "the table is no longer followed")

    def test_a_broken_node_stream_does_not_end_the_others(self) -> None:
        client = self.get()
        streams = self.stream_all()
        streams["b"].broken()
        streams["a"].deliver(line(A_EVENT))
        self.assertEqual(self.nodes_of(client), [("a1", "a")])
        self.assertFalse(client.response().complete)


class FailureTests(EventsCase):
    def test_head_waits_for_a_streaming_node(self) -> None:
        client = self.get()
        self.assertEqual(client.raw, b"")
        self.call("c").respond(200)
        self.assertEqual(client.response().code, 200)

    def test_unreachable_node_left_out(self) -> None:
        client = self.get()
        self.call("b").result.errback(ConnectionRefusedError("no"))
        self.call("a").respond(200).deliver(line(A_EVENT))
        self.assertEqual(self.nodes_of(client), [("a1", "a")])

    def test_every_engine_refuses_bad_query(self) -> None:
        client = self.get("/events?filters=nonsense")
        refusal = b'{"message":"invalid filter"}'
        for node in "abc":
            answer = self.call(node).respond(400, phrase=b"Bad Request")
            answer.deliver(refusal)
            answer.end()
        response = client.response()
        self.assertEqual(response.code, 400)
        self.assertEqual(response.body, refusal)
        self.assertTrue(response.complete)

    def test_no_node_reachable_is_502(self) -> None:
        client = self.get()
        for node in "abc":
            self.call(node).result.errback(ConnectionRefusedError("down"))
        response = client.response()
        self.assertEqual(response.code, 502)
        self.assertEqual(response.json()["message"], "No node streamed its events")
        self.assertIn("b:", response.json()["details"])

    def test_node_refusing_after_the_head_is_left_out(self) -> None:
        client = self.get()
        streams = self.stream_all("ab")
        refused = self.call("c").respond(500)
        refused.deliver(b'{"message":"oops"}')
        refused.end()
        streams["a"].deliver(line(A_EVENT))
        self.assertEqual(self.nodes_of(client), [("a1", "a")])
        self.assertFalse(client.response().complete)


class MembershipTests(EventsCase):
    def test_node_joining_is_added(self) -> None:
        client = self.get()
        streams = self.stream_all()
        self.table.seen("10.0.0.4", AGENT_PORT, worker("d"))
        self.assertEqual(len(self.peers.calls), 2, "not before the next look at the table")
        self.clock.advance(1)
        self.assertEqual(len(self.peers.calls), 3)
        call = self.call("d")
        self.assertEqual(call.header(b"x-portaineragent-target"), [b"id-d"])
        call.respond(200).deliver(line(B_EVENT))
        streams["a"].deliver(line(A_EVENT))
        self.assertEqual(self.nodes_of(client), [("b1", "d"), ("a1", "a")])

    def test_node_leaving_is_dropped_without_ending(self) -> None:
        client = self.get()
        streams = self.stream_all()
        self.table.retain(["10.0.0.3"])  # b is gone
        self.clock.advance(1)
        self.assertEqual(streams["b"].transport.producerState, "stopped")
        self.assertEqual(streams["c"].transport.producerState, "producing")
        streams["b"].deliver(line(B_EVENT))  # late bytes from a closed stream
        streams["b"].broken()
        streams["a"].deliver(line(A_EVENT))
        self.assertEqual(self.nodes_of(client), [("a1", "a")])
        self.assertFalse(client.response().complete)

    def test_node_leaving_before_it_answered(self) -> None:
        self.get()
        self.table.retain(["10.0.0.3"])
        self.clock.advance(1)
        self.assertTrue(self.call("b").cancelled)
        self.assertFalse(self.call("c").cancelled)

    def test_node_coming_back_is_opened_again(self) -> None:
        self.get()
        self.stream_all()
        self.table.retain(["10.0.0.3"])
        self.clock.advance(1)
        self.table.seen("10.0.0.2", AGENT_PORT, manager("b"))
        self.clock.advance(1)
        self.assertEqual(len([c for c in self.peers.calls if b"10.0.0.2" in c.url]), 2)

    def test_node_coming_back_resumes_after_its_last_event(self) -> None:
        """Nothing it sent before it left is sent again; nothing it saw meanwhile is lost."""
        query = "filters=%7B%22type%22%3A%5B%22container%22%5D%7D&since=100"
        client = self.get(f"/v1.41/events?{query}")
        streams = self.stream_all()
        streams["b"].deliver(line({**B_EVENT, "timeNano": 1_700_000_000_123_456_789}))
        self.table.retain(["10.0.0.3"])
        self.clock.advance(1)
        self.table.seen("10.0.0.2", AGENT_PORT, manager("b"))
        self.clock.advance(1)
        again = self.call("b").url
        self.assertTrue(again.startswith(b"https://10.0.0.2:9001/v1.41/events?"), again)
        params = dict(parse_qsl(again.partition(b"?")[2]))
        self.assertEqual(params[b"since"], b"1700000000.123456790")
        self.assertEqual(params[b"filters"], b'{"type":["container"]}')
        # A node seen for the first time starts from the client's own query.
        self.table.seen("10.0.0.4", AGENT_PORT, worker("d"))
        self.clock.advance(1)
        self.assertTrue(self.call("d").url.endswith(b"?" + query.encode()))
        self.assertEqual(self.nodes_of(client), [("b1", "b")])

    def test_a_node_that_ended_is_not_reopened(self) -> None:
        self.get("/events?until=5")
        streams = self.stream_all()
        streams["b"].end()
        self.clock.advance(5)
        self.assertEqual(len(self.peers.calls), 2)


class ClientTests(EventsCase):
    def test_client_leaving_closes_every_upstream(self) -> None:
        client = self.get()
        streams = self.stream_all("ab")  # c has not answered yet
        client.disconnect()
        self.assertEqual(streams["a"].transport.producerState, "stopped")
        self.assertEqual(streams["b"].transport.producerState, "stopped")
        self.assertTrue(self.call("c").cancelled)
        self.assertFalse(self.following(), "the table is no longer followed")

    def test_client_leaving_before_any_answer(self) -> None:
        client = self.get()
        client.disconnect()
        self.assertTrue(all(self.call(n).cancelled for n in "abc"))

    def test_slow_client_pauses_every_upstream(self) -> None:
        client = self.get()
        streams = self.stream_all("ab")
        client.pause()
        self.assertEqual(streams["a"].transport.producerState, "paused")
        self.assertEqual(streams["b"].transport.producerState, "paused")
        late = self.call("c").respond(200)  # answers while the client is slow
        self.assertEqual(late.transport.producerState, "paused")
        client.resume()
        for name, stream in [*streams.items(), ("c", late)]:
            self.assertEqual(stream.transport.producerState, "producing", name)


class UnitTests(SynchronousTestCase):
    def test_splitter_holds_at_most_max_line(self) -> None:
        splitter = LineSplitter(max_line=10)
        self.assertEqual(splitter.feed(b"0123456789"), [])
        self.assertEqual(splitter.feed(b"A"), [], "the 11th byte drops the line")
        self.assertEqual(splitter.dropped, 1)
        self.assertEqual(splitter.feed(b"BBBBBBBBBBBBBBBBBBBB\nok\n"), [b"ok"])
        self.assertEqual(splitter.dropped, 1, "one long line counts once")
        self.assertEqual(splitter.feed(b"x" * 11 + b"\n"), [])
        self.assertEqual(splitter.dropped, 2)
        self.assertEqual(splitter.feed(b"0123456789\n"), [b"0123456789"], "max_line fits")

    def test_splitter_crlf_and_blank_lines(self) -> None:
        self.assertEqual(LineSplitter().feed(b"a\r\n\r\n\nb\n"), [b"a", b"b"])

    def test_tag_replaces_an_existing_mark(self) -> None:
        result = tag_event(b'{"id":"x","Portainer":{"Agent":{"NodeName":"zz"}}}', "b")
        assert result is not None
        tagged, _ = result
        self.assertTrue(tagged.endswith(b"\n"))
        self.assertEqual(json.loads(tagged)["Portainer"], {"Agent": {"NodeName": "b"}})

    def test_tag_refuses_non_objects(self) -> None:
        for raw in (b"[1]", b"nope", b'"s"'):
            self.assertIsNone(tag_event(raw, "b"))
