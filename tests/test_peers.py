"""The peer table: joins, changes, failures, self detection and lookups."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from swarmagent.peers import Ambiguous, NodeIdentity, Peer, PeerTable
from tests.helpers import AGENT_PORT, make_table, manager, standalone, worker


def names(peers: list[Peer]) -> list[str]:
    return [p.name for p in peers]


class IdentityTests(SynchronousTestCase):
    def test_json_round_trip(self) -> None:
        identity = worker("node-b")
        self.assertEqual(
            identity.to_json(),
            {
                "NodeName": "node-b",
                "NodeID": "id-node-b",
                "NodeRole": "worker",
                "Leader": False,
                "EngineVersion": "27.0.0",
            },
        )
        self.assertEqual(NodeIdentity.from_json(identity.to_json()), identity)

    def test_not_an_identity(self) -> None:
        good = manager("a").to_json()
        for doc in [
            [],
            {},
            {**good, "NodeName": ""},
            {**good, "NodeName": 7},
            {**good, "NodeID": None},
            {**good, "NodeRole": "boss"},
            {k: v for k, v in good.items() if k != "NodeRole"},
        ]:
            with self.subTest(doc=doc), self.assertRaises(ValueError):
                # ``[]`` is no mapping: on purpose, as a peer may send anything.
                NodeIdentity.from_json(doc)  # type: ignore[arg-type]

    def test_key_is_node_id_in_a_swarm_else_name(self) -> None:
        self.assertEqual(manager("a", "n1").key, "n1")
        self.assertTrue(manager("a").swarm)
        self.assertEqual(standalone("a").key, "a")
        self.assertFalse(standalone("a").swarm)


class SeenTests(SynchronousTestCase):
    def test_join_then_nothing_new(self) -> None:
        table = make_table(manager("a"))
        self.assertEqual(table.seen("10.0.0.2", AGENT_PORT, worker("b")), "join")
        self.assertIsNone(table.seen("10.0.0.2", AGENT_PORT, worker("b")))
        self.assertEqual(names(table.nodes()), ["a", "b"])

    def test_change(self) -> None:
        table = make_table(manager("a"), {"10.0.0.2": worker("b")})
        promoted = manager("b")
        self.assertEqual(table.seen("10.0.0.2", AGENT_PORT, promoted), "change")
        self.assertEqual(table.nodes()[1].identity, promoted)

    def test_own_identity_is_not_a_peer(self) -> None:
        """Found by node ID, though the name differs and the address is new:
        this node's address becomes the one DNS gave."""
        table = make_table(manager("a", "n1"), address="0.0.0.0")
        renamed = manager("a-renamed", "n1")
        self.assertIsNone(table.seen("10.0.0.1", 9100, renamed))
        self.assertEqual(len(table.nodes()), 1)
        self.assertEqual((table.me.address, table.me.port), ("10.0.0.1", 9100))
        self.assertTrue(table.me.is_self)

    def test_same_name_other_id_is_a_peer(self) -> None:
        table = make_table(manager("a", "n1"))
        self.assertEqual(table.seen("10.0.0.2", AGENT_PORT, worker("a", "n2")), "join")
        self.assertEqual([p.identity.key for p in table.nodes()], ["n1", "n2"])

    def test_address_that_becomes_me_is_dropped(self) -> None:
        table = make_table(manager("a", "n1"), {"10.0.0.2": worker("b")})
        table.seen("10.0.0.2", AGENT_PORT, manager("a", "n1"))
        self.assertEqual(names(table.nodes()), ["a"])

    def test_success_resets_failures(self) -> None:
        table = make_table(manager("a"), {"10.0.0.2": worker("b")})
        table.failed("10.0.0.2")
        table.failed("10.0.0.2")
        table.seen("10.0.0.2", AGENT_PORT, worker("b"))
        self.assertEqual(table.nodes()[1].failures, 0)
        self.assertIsNone(table.failed("10.0.0.2"))
        self.assertIsNone(table.failed("10.0.0.2"))
        self.assertEqual(names(table.nodes()), ["a", "b"])


class FailedTests(SynchronousTestCase):
    def test_removed_after_max_failures_in_a_row(self) -> None:
        for limit in (1, 3, 5):
            with self.subTest(limit=limit):
                table = make_table(manager("a"), {"10.0.0.2": worker("b")}, max_failures=limit)
                for _ in range(limit - 1):
                    self.assertIsNone(table.failed("10.0.0.2"))
                    self.assertEqual(names(table.nodes()), ["a", "b"])
                gone = table.failed("10.0.0.2")
                assert gone is not None
                self.assertEqual(gone.name, "b")
                self.assertEqual(names(table.nodes()), ["a"])

    def test_unknown_address(self) -> None:
        table = make_table(manager("a"))
        self.assertIsNone(table.failed("10.0.0.9"))
        self.assertEqual(names(table.nodes()), ["a"])

    def test_failures_counted(self) -> None:
        table = make_table(manager("a"), {"10.0.0.2": worker("b")})
        table.failed("10.0.0.2")
        self.assertEqual(table.nodes()[1].failures, 1)


class RetainTests(SynchronousTestCase):
    def test_drops_the_others(self) -> None:
        table = make_table(
            manager("a"),
            {"10.0.0.2": worker("b"), "10.0.0.3": worker("c"), "10.0.0.4": worker("d")},
        )
        gone = table.retain(iter(["10.0.0.3", "10.0.0.99"]))
        self.assertEqual(sorted(names(gone)), ["b", "d"])
        self.assertEqual(names(table.nodes()), ["a", "c"])

    def test_never_drops_me(self) -> None:
        table = make_table(manager("a"), {"10.0.0.2": worker("b")})
        self.assertEqual(names(table.retain([])), ["b"])
        self.assertEqual(names(table.nodes()), ["a"])


class NodesTests(SynchronousTestCase):
    def test_me_first_then_by_name(self) -> None:
        table = make_table(
            manager("m"),
            {"10.0.0.4": worker("z"), "10.0.0.2": worker("b"), "10.0.0.3": worker("k")},
        )
        self.assertEqual(names(table.nodes()), ["m", "b", "k", "z"])
        self.assertTrue(table.nodes()[0].is_self)
        self.assertFalse(any(p.is_self for p in table.nodes()[1:]))

    def test_same_name_ordered_by_node_id(self) -> None:
        table = make_table(
            manager("a"), {"10.0.0.2": worker("b", "n9"), "10.0.0.3": worker("b", "n1")}
        )
        self.assertEqual([p.identity.key for p in table.nodes()], ["id-a", "n1", "n9"])

    def test_one_entry_per_node(self) -> None:
        """A replaced agent whose old address is still listed counts once,
        as the address that is failing least."""
        table = make_table(manager("a"), {"10.0.0.2": worker("b"), "10.0.0.7": worker("b")})
        table.failed("10.0.0.2")
        nodes = table.nodes()
        self.assertEqual(names(nodes), ["a", "b"])
        self.assertEqual(nodes[1].address, "10.0.0.7")


class FindTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.table = make_table(
            manager("a", "n1"),
            {
                "10.0.0.2": worker("b", "n2"),
                "10.0.0.3": worker("dup", "n3"),
                "10.0.0.4": worker("dup", "n4"),
                # A node named like another node's ID: the ID wins.
                "10.0.0.5": worker("n2", "n5"),
            },
        )

    def test_by_node_id(self) -> None:
        found = self.table.find("n4")
        assert isinstance(found, Peer)
        self.assertEqual(found.address, "10.0.0.4")

    def test_by_name(self) -> None:
        found = self.table.find("b")
        assert isinstance(found, Peer)
        self.assertEqual(found.identity.node_id, "n2")

    def test_id_before_name(self) -> None:
        found = self.table.find("n2")
        assert isinstance(found, Peer)
        self.assertEqual(found.name, "b")

    def test_me(self) -> None:
        self.assertIs(self.table.find("a"), self.table.me)
        self.assertIs(self.table.find("n1"), self.table.me)

    def test_ambiguous_name(self) -> None:
        self.assertEqual(self.table.find("dup"), Ambiguous("dup", ("n3", "n4")))

    def test_unknown(self) -> None:
        self.assertIsNone(self.table.find("zz"))
        self.assertIsNone(self.table.find(""))

    def test_outside_a_swarm_by_name(self) -> None:
        table = make_table(standalone("solo"))
        self.assertIs(table.find("solo"), table.me)
        self.assertIsNone(table.find(""))


def three_managers() -> PeerTable:
    """A worker and three managers, m1 the leader by its identity."""
    return make_table(
        worker("w"),
        {
            "10.0.0.2": manager("m1", leader=True),
            "10.0.0.3": manager("m2"),
            "10.0.0.4": manager("m3"),
        },
    )


class ManagersTests(SynchronousTestCase):
    def test_leader_first(self) -> None:
        table = make_table(
            worker("w"),
            {
                "10.0.0.2": manager("m1"),
                "10.0.0.3": manager("m2", leader=True),
                "10.0.0.4": worker("w2"),
                "10.0.0.5": manager("m3"),
            },
        )
        managers = names(table.managers())
        self.assertEqual(managers[0], "m2")
        self.assertEqual(sorted(managers), ["m1", "m2", "m3"])

    def test_then_fewest_failures(self) -> None:
        table = make_table(worker("w"), {"10.0.0.2": manager("m1"), "10.0.0.3": manager("m2")})
        table.failed("10.0.0.2")
        self.assertEqual(names(table.managers()), ["m2", "m1"])

    def test_a_leader_that_failed_a_probe_is_passed_over(self) -> None:
        """At its first failed probe, not once all have failed (issue #14, item 5)."""
        table = make_table(
            worker("w"),
            {"10.0.0.2": manager("m1", leader=True), "10.0.0.3": manager("m2")},
        )
        table.failed("10.0.0.2")
        self.assertEqual(names(table.managers()), ["m2", "m1"])
        table.seen("10.0.0.2", AGENT_PORT, manager("m1", leader=True))
        self.assertEqual(names(table.managers()), ["m1", "m2"])

    def test_raft_names_the_leader(self) -> None:
        """The node list's leader wins over the identities, which lag behind an election."""
        table = three_managers()
        table.follow("id-m3", frozenset())
        self.assertEqual(names(table.managers()), ["m3", "m1", "m2"])
        table.follow("", frozenset())  # no leader named: the identities say
        self.assertEqual(names(table.managers())[0], "m1")

    def test_a_new_leader_heard_after_the_last_list(self) -> None:
        """The old leader, back from a cut and still electing, keeps its stale
        identity; the list that named it cannot be read during the election.
        A manager whose identity becomes leader is the news (found by the soak:
        manager requests went to the old leader, 500 "no leader")."""
        table = three_managers()
        table.follow("id-m1", frozenset())
        table.failed("10.0.0.2")
        table.seen("10.0.0.4", AGENT_PORT, manager("m3", leader=True))
        table.seen("10.0.0.2", AGENT_PORT, manager("m1", leader=True))  # back, stale
        self.assertEqual(names(table.managers()), ["m3", "m1", "m2"])
        table.follow("id-m2", frozenset())  # the next list read wins
        self.assertEqual(names(table.managers())[0], "m2")

    def test_the_leader_stepping_down_is_heard(self) -> None:
        table = make_table(
            worker("w"),
            {"10.0.0.2": manager("m1", leader=True), "10.0.0.3": manager("m2")},
        )
        table.follow("id-m1", frozenset())
        table.seen("10.0.0.3", AGENT_PORT, manager("m2", leader=True))
        table.seen("10.0.0.2", AGENT_PORT, manager("m1"))
        self.assertEqual(names(table.managers()), ["m2", "m1"])
        table.seen("10.0.0.3", AGENT_PORT, manager("m2"))  # no leader named: none first
        self.assertEqual(sorted(names(table.managers())), ["m1", "m2"])

    def test_this_manager_becoming_leader_is_heard(self) -> None:
        table = make_table(manager("a"), {"10.0.0.2": manager("b", leader=True)})
        table.follow("id-b", frozenset())
        table.set_me(manager("a", leader=True))
        self.assertEqual(names(table.managers()), ["a", "b"])

    def test_unreachable_to_raft_is_passed_over(self) -> None:
        table = make_table(
            worker("w"),
            {"10.0.0.2": manager("m1", leader=True), "10.0.0.3": manager("m2")},
        )
        table.follow("id-m1", frozenset({"id-m1"}))
        self.assertEqual(names(table.managers()), ["m2", "m1"])

    def test_all_down_still_listed(self) -> None:
        """The next is tried if one fails: the least failed first."""
        table = make_table(worker("w"), {"10.0.0.2": manager("m1"), "10.0.0.3": manager("m2")})
        table.failed("10.0.0.2")
        table.failed("10.0.0.2")
        table.failed("10.0.0.3")
        self.assertEqual(names(table.managers()), ["m2", "m1"])

    def test_me_included(self) -> None:
        table = make_table(manager("a", leader=True), {"10.0.0.2": manager("b")})
        self.assertEqual(names(table.managers()), ["a", "b"])

    def test_none(self) -> None:
        table = make_table(worker("w1"), {"10.0.0.2": worker("w2")})
        self.assertEqual(table.managers(), [])

    def test_standalone_engines_are_not_managers(self) -> None:
        """Outside a swarm a node reports role "manager", but manages nothing."""
        table = make_table(worker("w"), {"10.0.0.2": standalone("s")})
        self.assertEqual(table.managers(), [])


class SetMeTests(SynchronousTestCase):
    def test_promotion(self) -> None:
        table = make_table(worker("a"))
        table.set_me(manager("a", leader=True))
        self.assertEqual(table.me.identity.role, "manager")
        self.assertEqual(table.me.address, "10.0.0.1")
        self.assertTrue(table.me.is_self)

    def test_address(self) -> None:
        table = make_table(worker("a"))
        table.set_me(worker("a"), "10.0.0.8")
        self.assertEqual(table.me.address, "10.0.0.8")
        table.set_me(worker("a"))
        self.assertEqual(table.me.address, "10.0.0.8")


class ExpectedNodeTests(SynchronousTestCase):
    def test_expect_reports_a_change(self) -> None:
        table = make_table(manager("a"))
        self.assertFalse(table.expect({}))
        self.assertTrue(table.expect({"id-a": "a", "id-b": "b"}))
        self.assertFalse(table.expect({"id-b": "b", "id-a": "a"}))
        self.assertEqual(table.expected, {"id-a": "a", "id-b": "b"})

    def test_agentless_by_node_id(self) -> None:
        table = make_table(manager("a"), {"10.0.0.2": worker("b"), "10.0.0.3": worker("c", "n3")})
        table.expect({"id-a": "a", "id-b": "b", "id-c": "c", "id-z": "z", "id-y": "y"})
        # c's agent serves node n3, not id-c; this node always counts as present.
        self.assertEqual(table.agentless(), [("id-c", "c"), ("id-y", "y"), ("id-z", "z")])

    def test_a_failing_agent_is_still_present(self) -> None:
        table = make_table(manager("a"), {"10.0.0.2": worker("b")})
        table.expect({"id-a": "a", "id-b": "b"})
        table.failed("10.0.0.2")
        self.assertEqual(table.agentless(), [])
        for _ in range(table.max_failures):
            table.failed("10.0.0.2")
        self.assertEqual(table.agentless(), [("id-b", "b")])

    def test_none_outside_a_swarm(self) -> None:
        table = make_table(standalone("a"))
        table.expect({"id-b": "b"})
        self.assertEqual(table.agentless(), [])


class WatchTests(SynchronousTestCase):
    """Watchers hear of each join, leave and change, and of nothing else."""

    def setUp(self) -> None:
        self.table = make_table(manager("a"), {"10.0.0.2": worker("b")}, max_failures=2)
        self.told: list[list[str]] = []
        self.table.watch(self.changed)

    def changed(self) -> None:
        self.told.append(names(self.table.nodes()))

    def test_join(self) -> None:
        self.table.seen("10.0.0.3", AGENT_PORT, worker("c"))
        self.assertEqual(self.told, [["a", "b", "c"]])

    def test_same_answer_is_no_news(self) -> None:
        self.table.seen("10.0.0.2", AGENT_PORT, worker("b"))
        self.table.failed("10.0.0.2")  # one failure: still there
        self.assertEqual(self.told, [])

    def test_change(self) -> None:
        self.table.seen("10.0.0.2", AGENT_PORT, manager("b"))
        self.assertEqual(self.told, [["a", "b"]])

    def test_leave_after_failures(self) -> None:
        self.table.failed("10.0.0.2")
        self.table.failed("10.0.0.2")
        self.assertEqual(self.told, [["a"]])

    def test_leave_from_dns(self) -> None:
        self.table.retain(["10.0.0.2"])
        self.assertEqual(self.told, [])
        self.table.retain([])
        self.assertEqual(self.told, [["a"]])

    def test_own_identity(self) -> None:
        self.table.set_me(manager("a"))
        self.assertEqual(self.told, [])
        self.table.set_me(manager("a", "id-a2"))
        self.assertEqual(len(self.told), 1)
        self.assertEqual(self.table.nodes()[0].identity.key, "id-a2")

    def test_unwatch(self) -> None:
        self.table.unwatch(self.changed)
        self.table.unwatch(self.changed)  # twice is harmless
        self.table.seen("10.0.0.3", AGENT_PORT, worker("c"))
        self.assertEqual(self.told, [])

    def test_a_watcher_may_unwatch_while_told(self) -> None:
        later: list[str] = []

        def once() -> None:
            self.table.unwatch(once)
            later.append("once")

        self.table.watch(once)
        self.table.seen("10.0.0.3", AGENT_PORT, worker("c"))
        self.table.seen("10.0.0.4", AGENT_PORT, worker("d"))
        self.assertEqual(later, ["once"])
        self.assertEqual(len(self.told), 2)
