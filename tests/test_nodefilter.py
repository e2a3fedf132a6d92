"""The ``node`` filter of cluster-wide lists: taken out, the rest sent on unchanged."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlencode

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from swarmagent.nodefilter import NodeFilter, take_node_filter

names = st.lists(st.text(min_size=1, max_size=8), max_size=4)
# The two shapes an engine reads: {"k": ["v", ...]} and {"k": {"v": true}}.
values = st.one_of(
    st.lists(st.text(max_size=8), max_size=3),
    st.dictionaries(st.text(max_size=8), st.booleans(), max_size=3),
)
other_filters = st.dictionaries(st.text(max_size=8).filter(lambda k: k != "node"), values)
other_params = st.lists(
    st.tuples(st.sampled_from(["all", "size", "limit", "digests"]), st.text(max_size=4)),
    max_size=3,
)


def node_value(found: list[str], as_map: bool) -> Any:
    return dict.fromkeys(found, True) if as_map else found


def params_of(query: str) -> list[tuple[str, str]]:
    return parse_qsl(query, keep_blank_values=True)


class TakeNodeFilterTests(SynchronousTestCase):
    @given(names, st.booleans(), other_filters, other_params, other_params)
    def test_taken_and_the_rest_kept(
        self,
        nodes: list[str],
        as_map: bool,
        others: dict[str, Any],
        before: list[tuple[str, str]],
        after: list[tuple[str, str]],
    ) -> None:
        filters = {**others, "node": node_value(nodes, as_map)}
        query = urlencode([*before, ("filters", json.dumps(filters)), *after])
        taken = take_node_filter(query)
        assert taken is not None
        self.assertEqual(taken.names, tuple(dict.fromkeys(nodes)))
        sent = params_of(taken.query)
        if others:
            self.assertEqual(sent[: len(before)], before)
            self.assertEqual(sent[len(before)][0], "filters")
            self.assertEqual(json.loads(sent[len(before)][1]), others)
            self.assertEqual(sent[len(before) + 1 :], after)
        else:
            self.assertEqual(sent, [*before, *after])

    @given(st.text(max_size=40), other_params)
    def test_anything_else_is_left_alone(self, raw: str, params: list[tuple[str, str]]) -> None:
        """Whatever ``filters`` holds, the agent either reads a node filter
        out of it or leaves the query for the engine to judge; it never fails."""
        query = urlencode([*params, ("filters", raw)])
        taken = take_node_filter(query)
        try:
            doc = json.loads(raw)
        except ValueError:
            self.assertIsNone(taken)
            return
        if taken is not None:
            self.assertIsInstance(doc, dict)
            self.assertIn("node", doc)

    def test_malformed(self) -> None:
        for raw in ['{"node":', "node=x", "[]", '"node"', "null", '{"node": "node3"}',
                    '{"node": [3]}', '{"node": {"node3": "yes"}}', '{"node": null}']:  # fmt: skip
            with self.subTest(raw=raw):
                self.assertIsNone(take_node_filter(urlencode({"filters": raw})))

    def test_no_node_filter(self) -> None:
        for query in ["", "all=1", urlencode({"filters": '{"status":["running"]}'})]:
            with self.subTest(query=query):
                self.assertIsNone(take_node_filter(query))

    def test_what_the_docker_cli_sends(self) -> None:
        """``docker ps -a --filter node=node3 --filter status=running``."""
        query = (
            "all=1&filters=%7B%22node%22%3A%7B%22node3%22%3Atrue%7D%2C"
            "%22status%22%3A%7B%22running%22%3Atrue%7D%7D"
        )
        self.assertEqual(
            take_node_filter(query),
            NodeFilter(("node3",), "all=1&filters=%7B%22status%22%3A%7B%22running%22%3Atrue%7D%7D"),
        )

    def test_several_nodes_and_only_node(self) -> None:
        query = urlencode({"filters": '{"node":["node1","id-3","node1"]}'})
        self.assertEqual(take_node_filter(query), NodeFilter(("node1", "id-3"), ""))

    def test_first_filters_parameter_only(self) -> None:
        query = urlencode([("filters", '{"node":["a"]}'), ("filters", '{"node":["b"]}')])
        taken = take_node_filter(query)
        assert taken is not None
        self.assertEqual(taken.names, ("a",))
        self.assertEqual(params_of(taken.query), [("filters", '{"node":["b"]}')])
