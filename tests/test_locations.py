"""The bounded map of where recently seen objects are."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from swarmagent.locations import Locations


class LocationsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.locations = Locations(self.clock, max_entries=3, max_age=10)

    def test_remember_and_forget(self) -> None:
        self.locations.remember("exec", "e1", "n2")
        self.assertEqual(self.locations.where("exec", "e1"), "n2")
        self.assertIsNone(self.locations.where("containers", "e1"))
        self.locations.forget("exec", "e1")
        self.assertIsNone(self.locations.where("exec", "e1"))

    def test_bounded_in_size_oldest_first(self) -> None:
        for i in range(3):
            self.locations.remember("containers", f"c{i}", "n1")
            self.clock.advance(1)
        # Written again: no longer the oldest.
        self.locations.remember("containers", "c0", "n2")
        self.locations.remember("containers", "c3", "n1")
        self.assertEqual(len(self.locations), 3)
        self.assertIsNone(self.locations.where("containers", "c1"))
        self.assertEqual(self.locations.where("containers", "c0"), "n2")
        self.assertEqual(self.locations.where("containers", "c3"), "n1")

    def test_bounded_in_age(self) -> None:
        self.locations.remember("containers", "old", "n1")
        self.clock.advance(6)
        self.locations.remember("containers", "new", "n1")
        self.clock.advance(5)
        self.assertIsNone(self.locations.where("containers", "old"))
        self.assertEqual(self.locations.where("containers", "new"), "n1")
        self.clock.advance(6)
        # Expired entries leave on the next write, looked up or not.
        self.locations.remember("exec", "e", "n1")
        self.assertEqual(len(self.locations), 1)

    def test_a_list_places_what_one_node_holds(self) -> None:
        self.locations.remember("containers", "both", "n9")
        self.locations.learn("containers", [("n1", ["a", "both"]), ("n2", ["b", "both"])])
        self.assertEqual(self.locations.where("containers", "a"), "n1")
        self.assertEqual(self.locations.where("containers", "b"), "n2")
        # On several nodes: no entry, even an older one.
        self.assertIsNone(self.locations.where("containers", "both"))

    def test_a_list_of_another_kind_is_ignored(self) -> None:
        self.locations.learn("volumes", [("n1", ["v"])])
        self.assertEqual(len(self.locations), 0)

    def test_a_list_over_the_bound_keeps_the_bound(self) -> None:
        self.locations.learn("images", [("n1", [f"sha256:{i}" for i in range(5)])])
        self.assertEqual(len(self.locations), 3)
