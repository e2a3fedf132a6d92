"""Cluster-wide lists: parallel calls, merge and tag, deadline, missing nodes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent

from swarmagent.fanout import FanOut, Selection
from swarmagent.nodes import Nodes, tag
from swarmagent.peers import Ambiguous, PeerTable
from tests.helpers import (
    ByHost,
    Client,
    FakeAgent,
    FakeNode,
    Response,
    make_site,
    make_table,
    manager,
    observe_logs,
    standalone,
    worker,
)

TIMEOUT = 2.0
MISSING = "x-swarmagent-missing-nodes"


def make_fanout(
    table: PeerTable, engine: IAgent, peers: IAgent, clock: Any, timeout: float
) -> FanOut:
    return FanOut(Nodes(table, engine, peers, clock, timeout))


class FanOutCase(SynchronousTestCase):
    """Three nodes: a (this one, served by its engine), b and c (their agents)."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.table = make_table(manager("a"), {"10.0.0.2": worker("b"), "10.0.0.3": worker("c")})
        self.a = FakeNode([{"Id": "a1"}])
        self.b = FakeNode([{"Id": "b1"}, {"Id": "b2"}])
        self.c = FakeNode([{"Id": "c1"}])
        peers = ByHost({b"10.0.0.2:9001": self.b, b"10.0.0.3:9001": self.c})
        self.fanout = make_fanout(
            self.table,
            RequestTraversalAgent(self.a),
            RequestTraversalAgent(peers),
            self.clock,
            TIMEOUT,
        )

    def get(self, kind: str, uri: str, headers: Sequence[tuple[str, str]] = ()) -> Client:
        return Client(make_site(self.fanout.resource(kind))).send("GET", uri, headers)

    def items(self, response: Response) -> list[tuple[str, str]]:
        return [(i["Id"], i["Portainer"]["Agent"]["NodeName"]) for i in response.json()]


class MergeTests(FanOutCase):
    def test_merge_and_tag(self) -> None:
        for kind, path in [
            ("containers", "/containers/json"),
            ("images", "/v1.41/images/json"),
            ("networks", "/networks"),
        ]:
            with self.subTest(kind=kind):
                response = self.get(kind, path).response()
                self.assertEqual(response.code, 200)
                self.assertEqual(response.header("content-type"), "application/json")
                self.assertIsNone(response.header(MISSING))
                self.assertEqual(
                    self.items(response), [("a1", "a"), ("b1", "b"), ("b2", "b"), ("c1", "c")]
                )

    def test_tag_replaces_an_existing_mark(self) -> None:
        self.b.answer = [
            {"Id": "b1", "Portainer": {"Agent": {"NodeName": "liar"}}, "Names": ["/x"]}
        ]
        doc = self.get("containers", "/containers/json").response().json()
        self.assertEqual(
            doc[1],
            {
                "Id": "b1",
                "Names": ["/x"],
                "Labels": {"swarmagent.node": "b"},
                "Portainer": {"Agent": {"NodeName": "b"}},
            },
        )

    def test_a_malformed_answer_is_a_missing_node(self) -> None:
        """A node's answer that is not a whole JSON list (cut short, or a
        second document after it) is left out and named; the merge is whole."""
        for body in (b'[{"Id":"b1"},{"Id":"b2"', b'[{"Id":"b1"}]{"Id":"b2"}', b"[1,]"):
            with self.subTest(body=body):
                self.b.answer = body
                response = self.get("containers", "/containers/json").response()
                self.assertEqual(response.code, 200)
                self.assertEqual(self.items(response), [("a1", "a"), ("c1", "c")])
                self.assertEqual(response.header(MISSING), "b")

    def test_empty_lists(self) -> None:
        for node in (self.a, self.b, self.c):
            node.answer = []
        response = self.get("containers", "/containers/json").response()
        self.assertEqual((response.code, response.json()), (200, []))

    def test_volumes(self) -> None:
        self.a.answer = {"Volumes": [{"Name": "va"}], "Warnings": None}
        self.b.answer = {"Volumes": None, "Warnings": ["disk nearly full"]}
        self.c.answer = {"Volumes": [{"Name": "vc"}], "Warnings": []}
        response = self.get("volumes", "/volumes").response()
        self.assertEqual(
            response.json(),
            {
                "Volumes": [
                    {
                        "Name": "va",
                        "Labels": {"swarmagent.node": "a"},
                        "Portainer": {"Agent": {"NodeName": "a"}},
                    },
                    {
                        "Name": "vc",
                        "Labels": {"swarmagent.node": "c"},
                        "Portainer": {"Agent": {"NodeName": "c"}},
                    },
                ],
                "Warnings": ["b: disk nearly full"],
            },
        )

    def test_alone(self) -> None:
        self.fanout = make_fanout(
            make_table(manager("a")), RequestTraversalAgent(self.a), FakeAgent(), self.clock, 1
        )
        response = self.get("containers", "/containers/json").response()
        self.assertEqual(self.items(response), [("a1", "a")])


class RequestCopyTests(FanOutCase):
    def test_query_reaches_every_node(self) -> None:
        uri = "/v1.41/containers/json?all=1&filters=%7B%22label%22%3A%5B%22x%22%5D%7D"
        self.get("containers", uri)
        for node in (self.a, self.b, self.c):
            self.assertEqual([s.uri for s in node.seen], [uri.encode()])

    def test_each_node_its_own_target(self) -> None:
        headers = [
            ("X-PortainerAgent-Target", "somewhere"),
            ("X-PortainerAgent-Signature", "sig"),
            ("Authorization", "Bearer t"),
        ]
        self.get("containers", "/containers/json", headers)
        for node, key in [(self.b, b"id-b"), (self.c, b"id-c")]:
            h = node.seen[0].headers
            self.assertEqual(h.getRawHeaders(b"x-portaineragent-target"), [key])
            self.assertEqual(h.getRawHeaders(b"x-swarmagent-hop"), [b"id-a"])
            self.assertEqual(h.getRawHeaders(b"x-portaineragent-signature"), [b"sig"])
            self.assertEqual(h.getRawHeaders(b"authorization"), [b"Bearer t"])
            self.assertEqual(h.getRawHeaders(b"x-forwarded-for"), [b"10.9.9.9"])
        own = self.a.seen[0].headers
        self.assertEqual(own.getRawHeaders(b"authorization"), [b"Bearer t"])
        names = [n.lower() for n, _ in own.getAllRawHeaders()]
        self.assertFalse([n for n in names if n.startswith((b"x-portaineragent", b"x-swarmagent"))])

    def test_each_node_its_own_host(self) -> None:
        """Every copy goes to its own node (portainer/portainer#1867)."""
        for _ in range(3):
            self.get("images", "/images/json")
        self.assertEqual((len(self.a.seen), len(self.b.seen), len(self.c.seen)), (3, 3, 3))


class MissingNodeTests(FanOutCase):
    def test_error_answer_left_out(self) -> None:
        self.c.code = 500
        self.c.answer = {"message": "boom"}
        response = self.get("containers", "/containers/json").response()
        self.assertEqual(response.code, 200)
        self.assertEqual(self.items(response), [("a1", "a"), ("b1", "b"), ("b2", "b")])
        self.assertEqual(response.header(MISSING), "c")

    def test_unusable_answers_left_out(self) -> None:
        self.a.answer = {"not": "a list"}
        self.c.answer = "text"
        response = self.get("containers", "/containers/json").response()
        self.assertEqual(self.items(response), [("b1", "b"), ("b2", "b")])
        self.assertEqual(response.header(MISSING), "a, c")

    def test_unreachable_agent_left_out(self) -> None:
        self.table.seen("10.0.0.4", 9001, worker("d"))  # no such host behind the stub
        response = self.get("containers", "/containers/json").response()
        self.assertEqual(len(self.items(response)), 4)
        self.assertEqual(response.header(MISSING), "d")

    def test_answer_at_the_deadline(self) -> None:
        self.c.answer = None  # never answers
        client = self.get("containers", "/containers/json")
        self.clock.advance(TIMEOUT - 0.01)
        self.assertEqual(client.raw, b"")
        self.clock.advance(0.01)
        response = client.response()
        self.assertTrue(response.complete)
        self.assertEqual(self.items(response), [("a1", "a"), ("b1", "b"), ("b2", "b")])
        self.assertEqual(response.header(MISSING), "c")

    def test_volume_warning_names_the_missing(self) -> None:
        self.a.answer = {"Volumes": [], "Warnings": []}
        self.b.answer = {"Volumes": [{"Name": "vb"}], "Warnings": []}
        self.c.answer = None
        client = self.get("volumes", "/volumes")
        self.clock.advance(TIMEOUT)
        response = client.response()
        self.assertEqual(response.header(MISSING), "c")
        self.assertEqual(
            response.json()["Warnings"], [f"node c did not answer: no answer within {TIMEOUT:g} s"]
        )

    def test_all_failing_with_engine_4xx_passes_it_through(self) -> None:
        for node in (self.a, self.b, self.c):
            node.code = 400
            node.answer = {"message": "invalid filter 'x'"}
        response = self.get("containers", "/containers/json?filters=x").response()
        self.assertEqual(response.code, 400)
        self.assertEqual(response.json(), {"message": "invalid filter 'x'"})
        self.assertEqual(response.header("content-type"), "application/json")

    def test_all_failing_otherwise_is_502(self) -> None:
        self.a.code = self.b.code = 500
        self.c.answer = None
        client = self.get("networks", "/networks")
        self.clock.advance(TIMEOUT)
        response = client.response()
        self.assertEqual(response.code, 502)
        doc = response.json()
        self.assertEqual(set(doc), {"message", "details"})
        self.assertEqual(
            doc["details"], f"A: answered 500, b: answered 500, c: no answer within {TIMEOUT:g} s"
        )

    def test_client_gone_before_the_answer(self) -> None:
        self.c.answer = None
        client = self.get("containers", "/containers/json")
        client.disconnect()
        self.clock.advance(TIMEOUT)
        self.assertEqual(client.raw, b"")


class AgentlessNodeTests(FanOutCase):
    """Swarm nodes expected to run an agent (from a manager's node list)."""

    def test_node_without_an_agent_named(self) -> None:
        logs = observe_logs(self)
        self.table.expect({"id-a": "a", "id-b": "b", "id-c": "c", "id-d": "d"})
        response = self.get("containers", "/containers/json").response()
        self.assertEqual(response.code, 200)
        self.assertEqual(self.items(response), [("a1", "a"), ("b1", "b"), ("b2", "b"), ("c1", "c")])
        self.assertEqual(response.header(MISSING), "d")
        lines = [formatEvent(event) for event in logs]
        self.assertIn("containers list: node d left out: no agent reachable", lines)

    def test_every_node_with_an_agent(self) -> None:
        self.table.expect({"id-a": "a", "id-b": "b", "id-c": "c"})
        response = self.get("containers", "/containers/json").response()
        self.assertIsNone(response.header(MISSING))

    def test_matched_by_node_id_not_name(self) -> None:
        """A node named like one with an agent is still a node without one."""
        self.table.expect({"id-a": "a", "id-b": "b", "id-c": "c", "id-c2": "c"})
        response = self.get("images", "/images/json").response()
        self.assertEqual(response.header(MISSING), "c")

    def test_named_after_the_nodes_that_failed(self) -> None:
        self.table.expect({"id-a": "a", "id-b": "b", "id-c": "c", "id-e": "e", "id-d": "d"})
        self.b.code = 500
        response = self.get("networks", "/networks").response()
        self.assertEqual(response.header(MISSING), "b, d, e")

    def test_volume_warning(self) -> None:
        self.table.expect({"id-a": "a", "id-b": "b", "id-c": "c", "id-d": "d"})
        self.a.answer = {"Volumes": [], "Warnings": []}
        self.b.answer = {"Volumes": [{"Name": "vb"}], "Warnings": ["w"]}
        self.c.answer = {"Volumes": [], "Warnings": []}
        response = self.get("volumes", "/volumes").response()
        self.assertEqual(response.header(MISSING), "d")
        self.assertEqual(
            response.json()["Warnings"], ["b: w", "node d did not answer: no agent reachable"]
        )

    def test_all_agents_failing(self) -> None:
        self.table.expect({"id-a": "a", "id-b": "b", "id-c": "c", "id-d": "d"})
        self.a.code = self.b.code = self.c.code = 500
        response = self.get("containers", "/containers/json").response()
        self.assertEqual(response.code, 502)
        self.assertTrue(response.json()["details"].endswith(", d: no agent reachable"))

    def test_outside_a_swarm(self) -> None:
        table = make_table(standalone("a"))
        table.expect({"id-d": "d"})
        self.fanout = make_fanout(table, RequestTraversalAgent(self.a), FakeAgent(), self.clock, 1)
        response = self.get("containers", "/containers/json").response()
        self.assertEqual(self.items(response), [("a1", "a")])
        self.assertIsNone(response.header(MISSING))


class IPv6PeerTests(FanOutCase):
    def test_ipv6_peer(self) -> None:
        self.table.retain(["10.0.0.2"])
        self.table.seen("fd00::3", 9001, worker("c"))
        peers = ByHost({b"10.0.0.2:9001": self.b, b"[fd00::3]:9001": self.c})
        self.fanout = make_fanout(
            self.table,
            RequestTraversalAgent(self.a),
            RequestTraversalAgent(peers),
            self.clock,
            TIMEOUT,
        )
        response = self.get("containers", "/containers/json").response()
        self.assertIsNone(response.header(MISSING))
        self.assertIn(("c1", "c"), self.items(response))


class UnitTests(SynchronousTestCase):
    def test_tag_skips_non_objects(self) -> None:
        self.assertEqual(
            tag([{"Id": 1}, "x", 3], "n"),
            [{"Id": 1, "Portainer": {"Agent": {"NodeName": "n"}}}, "x", 3],
        )


class SwarmNetworkTests(FanOutCase):
    """An overlay network is listed by every node running one of its tasks."""

    def setUp(self) -> None:
        super().setUp()
        overlay = {"Id": "ov", "Name": "stack_front", "Scope": "swarm"}
        # b lists it first, but a is the manager: a's copy is the one kept.
        self.a.answer = [{"Id": "a1", "Scope": "local"}, dict(overlay)]
        self.b.answer = [dict(overlay), {"Id": "b1", "Scope": "local"}]
        self.c.answer = [dict(overlay)]

    def test_once_for_the_docker_cli(self) -> None:
        """Once, from a manager, so that `docker stack rm` removes it once."""
        response = self.get("networks", "/networks").response()
        self.assertEqual(response.code, 200)
        self.assertEqual(self.items(response), [("a1", "a"), ("b1", "b"), ("ov", "a")])

    def test_per_node_for_portainer(self) -> None:
        """Portainer groups the copies itself, as the reference agent sends them."""
        signed = [("X-PortainerAgent-PublicKey", "k"), ("X-PortainerAgent-Signature", "s")]
        response = self.get("networks", "/networks", signed).response()
        self.assertEqual(
            self.items(response),
            [("a1", "a"), ("ov", "a"), ("ov", "b"), ("b1", "b"), ("ov", "c")],
        )

    def test_other_lists_keep_every_item(self) -> None:
        response = self.get("containers", "/containers/json").response()
        self.assertEqual(len(response.json()), 5)


class NodeLabelTests(FanOutCase):
    def test_label_beside_the_tag(self) -> None:
        """``Labels`` null, absent or set: the node's label is added, the others kept."""
        self.a.answer = [{"Id": "a1", "Labels": None}]
        self.b.answer = [{"Id": "b1", "Labels": {"com.docker.compose.project": "p"}}]
        self.c.answer = [{"Id": "c1"}]
        for kind, path in [("containers", "/containers/json"), ("images", "/images/json")]:
            with self.subTest(kind=kind):
                doc = self.get(kind, path).response().json()
                self.assertEqual(
                    [(i["Id"], i["Labels"]) for i in doc],
                    [
                        ("a1", {"swarmagent.node": "a"}),
                        ("b1", {"com.docker.compose.project": "p", "swarmagent.node": "b"}),
                        ("c1", {"swarmagent.node": "c"}),
                    ],
                )

    def test_a_label_of_that_name_is_replaced(self) -> None:
        self.b.answer = [{"Id": "b1", "Labels": {"swarmagent.node": "liar"}}]
        doc = self.get("networks", "/networks").response().json()
        self.assertEqual(doc[1]["Labels"], {"swarmagent.node": "b"})


class SelectionTests(FanOutCase):
    def get_only(self, uri: str, selection: Selection) -> Response:
        site = make_site(self.fanout.resource("containers", selection))
        return Client(site).send("GET", uri).response()

    def test_only_the_chosen_nodes_asked_with_the_query_given(self) -> None:
        c = self.table.find("c")
        assert c is not None and not isinstance(c, Ambiguous)
        response = self.get_only(
            "/v1.41/containers/json?all=1&filters=x", Selection((c,), (), "all=1")
        )
        self.assertEqual(self.items(response), [("c1", "c")])
        self.assertEqual((self.a.seen, self.b.seen), ([], []))
        self.assertEqual([s.uri for s in self.c.seen], [b"/v1.41/containers/json?all=1"])
        self.assertIsNone(response.header(MISSING))

    def test_empty_query(self) -> None:
        self.get_only("/containers/json?filters=x", Selection((self.table.me,), (), ""))
        self.assertEqual([s.uri for s in self.a.seen], [b"/containers/json"])

    def test_chosen_nodes_without_an_agent_named(self) -> None:
        response = self.get_only("/containers/json", Selection((self.table.me,), ("z",), ""))
        self.assertEqual(self.items(response), [("a1", "a")])
        self.assertEqual(response.header(MISSING), "z")
        self.assertEqual((self.b.seen, self.c.seen), ([], []))
