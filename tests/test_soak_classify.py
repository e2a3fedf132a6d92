"""The soak's verdict on each failure (bench/soak.py): expected only when it
named a node a fault had down, in time."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from bench.soak import DEADLINE, Journal, Record, classify


def record(outcome: str, *, took: float = 0.5, at: float = 100.0, **kw: object) -> Record:
    defaults: dict[str, object] = {"kind": "list /containers/json", "entry": "node4", "node": ""}
    defaults.update(kw)
    return Record(at, at + took, outcome=outcome, **defaults)  # type: ignore[arg-type]


class ClassifyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.journal = Journal()
        # node3 was down from 90 s to 110 s.
        self.journal.down.append(["node3", 90.0, 110.0])

    def verdict(self, rec: Record) -> str:
        return classify(rec, self.journal)

    def test_ok(self) -> None:
        self.assertEqual(self.verdict(record("ok")), "ok")

    def test_missing_the_down_node(self) -> None:
        self.assertEqual(self.verdict(record("missing", missing=("node3",))), "expected")

    def test_missing_a_healthy_node(self) -> None:
        rec = record("missing", missing=("node3", "node2"))
        self.assertEqual(self.verdict(rec), "unexpected")

    def test_missing_a_node_whose_engine_was_slow_itself(self) -> None:
        rec = record("missing", missing=("node2",), slow=("node2",))
        self.assertEqual(self.verdict(rec), "expected")

    def test_missing_after_the_fault_healed(self) -> None:
        rec = record("missing", at=120.0, missing=("node3",))
        self.assertEqual(self.verdict(rec), "unexpected")

    def test_a_hang_is_unexpected_even_for_the_down_node(self) -> None:
        rec = record("timeout", took=DEADLINE + 1, node="node3", kind="inspect-targeted")
        self.assertEqual(self.verdict(rec), "unexpected")

    def test_several_requests_are_bounded_each_not_together(self) -> None:
        # create, start, stop and remove: the stop hit the fault and took its
        # bounded wait; the four together took longer than one request may.
        rec = record(
            "http-504",
            took=DEADLINE + 1,
            node="node3",
            kind="create-start-stop-rm",
            step_s=DEADLINE - 3,
        )
        self.assertEqual(self.verdict(rec), "expected")

    def test_one_of_several_requests_hanging_is_unexpected(self) -> None:
        rec = record(
            "http-504",
            took=DEADLINE + 2,
            node="node3",
            kind="create-start-stop-rm",
            step_s=DEADLINE + 1,
        )
        self.assertEqual(self.verdict(rec), "unexpected")

    def test_targeted_at_the_down_node_in_time(self) -> None:
        rec = record("http-502", node="node3", kind="inspect-targeted")
        self.assertEqual(self.verdict(rec), "expected")

    def test_the_entry_down(self) -> None:
        rec = record("conn-error", entry="node3")
        self.assertEqual(self.verdict(rec), "expected")

    def test_wrong_answers_are_never_expected(self) -> None:
        rec = record("wrong", node="node3", kind="exec")
        self.assertEqual(self.verdict(rec), "unexpected")

    def test_a_managers_500_only_while_no_manager_names_a_leader(self) -> None:
        rec = record("http-500", kind="list /services")
        self.assertEqual(self.verdict(rec), "unexpected")
        self.journal.leaderless.append(100.2)
        self.assertEqual(self.verdict(rec), "expected")

    def test_a_stream_on_a_healthy_node_that_ends(self) -> None:
        rec = record("stream-drop", took=50, node="node2", kind="logs-follow")
        self.assertEqual(self.verdict(rec), "unexpected")
        rec = record("stream-drop", took=50, node="node3", kind="logs-follow")
        self.assertEqual(self.verdict(rec), "expected")

    def test_a_manager_missing_from_a_raft_list_while_it_had_no_leader(self) -> None:
        rec = record("missing", kind="list /networks", missing=("node1",))
        self.assertEqual(self.verdict(rec), "unexpected")
        self.journal.no_leader["node1"] = [101.0]
        self.assertEqual(self.verdict(rec), "expected")
        # Not for lists an engine answers without Raft.
        rec = record("missing", kind="list /containers/json", missing=("node1",))
        self.assertEqual(self.verdict(rec), "unexpected")
