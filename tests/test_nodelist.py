"""One node's list tagged as bytes: the same document as decoding, tagging and encoding it."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from swarmagent.nodelist import NodeList, node_list
from swarmagent.nodes import NodeFailed, tag
from swarmagent.wire import NODE_LABEL


def stdlib_list(kind: str, body: bytes, node: str) -> tuple[list[object], list[str]]:
    """The merge as it was: the whole answer decoded, each item tagged and labelled."""
    doc = json.loads(body)
    if kind == "volumes":
        items, warnings = doc.get("Volumes") or [], [str(w) for w in doc.get("Warnings") or []]
    else:
        items, warnings = doc, []
    for item in tag(items, node):
        if isinstance(item, dict):
            labels = item.get("Labels")
            if not isinstance(labels, dict):
                labels = item["Labels"] = {}
            labels[NODE_LABEL] = node
    return items, warnings


def decoded(tagged: NodeList) -> list[object]:
    return list(json.loads(b"[" + tagged.items + b"]"))


def go_escaped(text: str) -> str:
    """JSON as Go's encoder writes it: ``<``, ``>`` and ``&`` escaped."""
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
label_maps = st.dictionaries(
    st.one_of(st.text(max_size=10), st.just(NODE_LABEL), st.just("com.docker.stack.namespace")),
    st.text(max_size=12),
    max_size=4,
)
keys = st.one_of(
    st.text(max_size=10), st.sampled_from(["Id", "Names", "Scope", "Portainer", "Labels", "é✓"])
)


@st.composite
def items(draw: st.DrawFn) -> object:
    """A list item: an object (with Labels of any shape, or none) or anything else."""
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    item: dict[str, Any] = draw(st.dictionaries(keys, values, max_size=6))
    choice = draw(st.integers(0, 3))
    if choice == 0:
        item["Labels"] = draw(label_maps)
        # A nested object spelling Labels too, with the same value.
        if draw(st.booleans()):
            item["Nested"] = {"Labels": dict(item["Labels"])}
    elif choice == 1:
        item["Labels"] = draw(st.one_of(st.none(), values))
    elif choice == 2:
        item.pop("Labels", None)
    return item


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """A list encoded as an engine (or a stranger one) might: Go's escapes,
    ASCII-only or raw UTF-8, compact or indented."""
    doc = draw(st.lists(items(), max_size=8))
    indent = draw(st.sampled_from([None, None, 1]))
    text = json.dumps(
        doc,
        ensure_ascii=draw(st.booleans()),
        indent=indent,
        separators=None if indent else (",", ":"),
    )
    return (go_escaped(text) + "\n").encode("utf-8")


class EquivalenceTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(bodies(), st.text(min_size=1, max_size=10))
    def test_same_document_as_decoding_and_encoding(self, body: bytes, node: str) -> None:
        expected, _ = stdlib_list("containers", body, node)
        self.assertEqual(decoded(node_list("containers", body, node)), expected)

    @settings(max_examples=50, deadline=None)
    @given(bodies(), st.lists(st.one_of(st.text(max_size=5), st.integers()), max_size=3))
    def test_volumes(self, inner: bytes, warnings: list[object]) -> None:
        body = b'{"Volumes":' + inner + b',"Warnings":' + json.dumps(warnings).encode() + b"}"
        expected, expected_warnings = stdlib_list("volumes", body, "n")
        tagged = node_list("volumes", body, "n")
        self.assertEqual((decoded(tagged), tagged.warnings), (expected, expected_warnings))

    def test_values_keep_the_engines_bytes(self) -> None:
        """Go's escapes stay as sent; only the tag and label are new."""
        body = b'[{"Id":"a","Command":"x \\u003e y","Labels":{"k":"\\u0026"}}]\n'
        self.assertEqual(
            node_list("containers", body, "n1").items,
            b'{"Id":"a","Command":"x \\u003e y","Labels":{"k":"\\u0026",'
            b'"swarmagent.node":"n1"},"Portainer":{"Agent":{"NodeName":"n1"}}}',
        )

    def test_empty_object_and_non_objects(self) -> None:
        tagged = node_list("images", b'[{},3,null,"s",[1]]', "n")
        self.assertEqual(
            tagged.items,
            b'{"Portainer":{"Agent":{"NodeName":"n"}},"Labels":{"swarmagent.node":"n"}},'
            b'3,null,"s",[1]',
        )

    def test_no_items(self) -> None:
        self.assertEqual(node_list("images", b"[]", "n").items, b"")
        self.assertEqual(node_list("volumes", b'{"Volumes":null}', "n").items, b"")


class ShapeTests(SynchronousTestCase):
    def test_malformed_or_misshapen_answers_fail(self) -> None:
        for kind, body in [
            ("images", b"{}"),
            ("images", b"nope"),
            ("images", b'[{"Id":"a"},'),
            ("images", b'[{"Id":"a"}] trailing'),
            ("volumes", b"[]"),
            ("volumes", b'{"Volumes":{"v":1}}'),
            ("volumes", b'{"Warnings":"w"}'),
        ]:
            with self.subTest(kind=kind, body=body), self.assertRaises(NodeFailed):
                node_list(kind, body, "n")

    def test_warnings(self) -> None:
        tagged = node_list("volumes", b'{"Volumes":[1],"Warnings":["w",2]}', "n")
        self.assertEqual((tagged.items, tagged.warnings), (b"1", ["w", "2"]))


class CollectTests(SynchronousTestCase):
    def test_ids_only_when_asked(self) -> None:
        body = b'[{"Id":"a"},{"Id":""},{"Id":null},{},"x",{"Id":"b"}]'
        self.assertEqual(node_list("images", body, "n", ids=True).ids, ["a", "b"])
        self.assertEqual(node_list("images", body, "n").ids, [])

    def test_container_names(self) -> None:
        body = json.dumps(
            [
                {"Names": ["/web", "/db/alias"]},
                {"Names": None},
                {"Names": ["/", "bare", 7]},
                {},
                {"Names": ["/x"]},
            ]
        ).encode()
        self.assertEqual(node_list("containers", body, "n", names=True).names, ["web", "x"])

    def test_swarm_scoped_taken_out(self) -> None:
        body = b'[{"Id":"l","Scope":"local"},{"Id":"ov","Scope":"swarm"},{"Scope":"swarm"}]'
        tagged = node_list("networks", body, "n", once=True)
        self.assertEqual([i["Id"] for i in decoded(tagged)], ["l"])  # type: ignore[index]
        self.assertEqual(sorted(tagged.swarm), ["None", "ov"])
        self.assertEqual(json.loads(tagged.swarm["ov"])["Portainer"]["Agent"]["NodeName"], "n")
        kept = node_list("networks", body, "n")
        self.assertEqual((len(decoded(kept)), kept.swarm), (3, {}))
