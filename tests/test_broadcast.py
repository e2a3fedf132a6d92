"""Broadcasts: the header and the operations that take it, each node's copy of
the body, the merged progress stream, prunes added up, a tag's one status."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Cooperator
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived

from swarmagent.broadcast import LOAD, PRUNE, PULL, TAG, Operation, operation, parse_broadcast
from swarmagent.broadcaster import Broadcaster, SpooledReader
from swarmagent.nodes import NodeFailed, Nodes, add_up
from swarmagent.progress import final_error, tag_progress
from tests.helpers import (
    Client,
    FakeAgent,
    Response,
    UpstreamCall,
    body_of,
    make_site,
    make_table,
    manager,
    worker,
)

MISSING = "x-swarmagent-missing-nodes"
JSON = {b"content-type": [b"application/json"]}


class HeaderTests(SynchronousTestCase):
    def test_every_node(self) -> None:
        for value in ("all", " all ", "all,", ",all"):
            with self.subTest(value=value):
                self.assertEqual(parse_broadcast(value), ())

    def test_listed_nodes(self) -> None:
        self.assertEqual(parse_broadcast("node3, node1 ,node3"), ("node3", "node1"))

    def test_refused(self) -> None:
        for value in ("", " ", ",,", "all,node1", "node1,all"):
            with self.subTest(value=value):
                self.assertRaises(ValueError, parse_broadcast, value)

    @given(st.lists(st.text(min_size=1).filter(lambda t: "," not in t and t.strip() != "all")))
    def test_any_list_of_names(self, names: list[str]) -> None:
        value = ",".join(names)
        wanted = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
        if wanted:
            self.assertEqual(parse_broadcast(value), wanted)
        else:
            self.assertRaises(ValueError, parse_broadcast, value)


class OperationTableTests(SynchronousTestCase):
    def test_allowed(self) -> None:
        for path, op in [
            ("/images/load", LOAD),
            ("/images/create", PULL),
            ("/images/team/app:1/tag", TAG),
            ("/containers/prune", PRUNE),
            ("/images/prune", PRUNE),
            ("/volumes/prune", PRUNE),
            ("/networks/prune", PRUNE),
            ("/build/prune", PRUNE),
        ]:
            with self.subTest(path=path):
                self.assertEqual(operation("POST", path), op)
        self.assertTrue(LOAD.streams and PULL.streams)
        self.assertFalse(TAG.streams or PRUNE.streams)

    @given(st.sampled_from(["GET", "HEAD", "PUT", "DELETE"]), st.text())
    def test_only_posts(self, method: str, path: str) -> None:
        self.assertIsNone(operation(method, path))

    def test_others_refused(self) -> None:
        for path in ["/images/load/x", "/images/json", "/containers/create", "/system/prune",
                     "/images/x/push", "/build", "/images/tag", "/exec/x/start"]:  # fmt: skip
            with self.subTest(path=path):
                self.assertIsNone(operation("POST", path))


class ProgressLineTests(SynchronousTestCase):
    def parse(self, line: bytes, node: str = "n2") -> tuple[dict[str, Any], str | None]:
        tagged = tag_progress(line, node)
        assert tagged is not None
        encoded, error = tagged
        self.assertTrue(encoded.endswith(b"\n"))
        return json.loads(encoded), error

    def test_id_named_after_the_node(self) -> None:
        doc, error = self.parse(b'{"status":"Loading layer","id":"5b0d","progress":"[=> ]"}')
        self.assertIsNone(error)
        self.assertEqual(
            doc,
            {
                "status": "Loading layer",
                "id": "n2 5b0d",
                "progress": "[=> ]",
                "Portainer": {"Agent": {"NodeName": "n2"}},
            },
        )

    def test_lines_without_an_id(self) -> None:
        doc, _ = self.parse(b'{"stream":"Loaded image: app:1\\n"}')
        self.assertEqual((doc["id"], doc["stream"]), ("n2", "Loaded image: app:1\n"))

    def test_error_line_becomes_a_status(self) -> None:
        doc, error = self.parse(
            b'{"errorDetail":{"message":"no space left"},"error":"no space left"}'
        )
        self.assertEqual(error, "no space left")
        self.assertEqual(
            doc,
            {
                "status": "failed: no space left",
                "id": "n2",
                "Portainer": {"Agent": {"NodeName": "n2"}},
            },
        )
        self.assertEqual(self.parse(b'{"error":"boom"}')[1], "boom")

    def test_not_objects(self) -> None:
        for line in (b"not json", b"[1]", b'"x"', b"3"):
            with self.subTest(line=line):
                self.assertIsNone(tag_progress(line, "n"))

    def test_final_error_is_what_the_cli_reports(self) -> None:
        doc = json.loads(
            final_error([NodeFailed("refused", node="n3"), NodeFailed("x", node="n4")])
        )
        message = "failed on n3: refused; n4: x"
        self.assertEqual(doc, {"errorDetail": {"message": message}, "error": message})


class AddUpTests(SynchronousTestCase):
    def test_sums_lists_and_nulls(self) -> None:
        merged = add_up(
            [
                ("a", {"ImagesDeleted": None, "SpaceReclaimed": 10, "Name": "x"}),
                ("b", {"ImagesDeleted": [{"Deleted": "sha256:1"}], "SpaceReclaimed": 5}),
                ("c", {"ImagesDeleted": [{"Untagged": "t"}], "SpaceReclaimed": 0, "Name": "y"}),
                ("d", ["not", "an object"]),
            ]
        )
        self.assertEqual(
            merged,
            {
                "ImagesDeleted": [
                    {"Deleted": "sha256:1", "Portainer": {"Agent": {"NodeName": "b"}}},
                    {"Untagged": "t", "Portainer": {"Agent": {"NodeName": "c"}}},
                ],
                "SpaceReclaimed": 15,
                "Name": "x",
            },
        )

    def test_nothing_but_nulls(self) -> None:
        self.assertEqual(
            add_up([("a", {"VolumesDeleted": None}), ("b", {"VolumesDeleted": None})]),
            {"VolumesDeleted": None},
        )

    def test_strings_concatenated(self) -> None:
        self.assertEqual(
            add_up([("a", {"ContainersDeleted": ["c1"]}), ("b", {"ContainersDeleted": ["c2"]})]),
            {"ContainersDeleted": ["c1", "c2"]},
        )


class SpooledReaderTests(SynchronousTestCase):
    def spool(self, data: bytes) -> Any:
        content = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the cleanup)
        self.addCleanup(content.close)
        content.write(data)
        content.seek(17)
        return content

    def test_readers_of_a_file_each_at_their_own_offset(self) -> None:
        data = os.urandom(300_000)
        content = self.spool(data)
        one, two = SpooledReader(content.fileno()), SpooledReader(content.fileno())
        self.addCleanup(one.close)
        self.addCleanup(two.close)
        self.assertEqual(one.read(1000), data[:1000])
        self.assertEqual(two.read(10), data[:10])
        self.assertEqual(one.read(), data[1000:])
        self.assertEqual(one.read(10), b"")
        self.assertEqual(two.seek(0, os.SEEK_END), len(data))
        self.assertEqual(two.seek(5), 5)
        self.assertEqual(two.read(5), data[5:10])
        one.close()
        self.assertEqual(two.read(5), data[10:15])
        self.assertEqual(content.tell(), 17)

    def test_readable_after_the_request_closed_its_file(self) -> None:
        """A node may answer before it has read the body: the request can
        finish, and twisted.web close its file, while another still reads."""
        data = os.urandom(200_000)
        content = self.spool(data)
        reader = SpooledReader(content.fileno())
        self.addCleanup(reader.close)
        content.close()
        self.assertEqual(reader.read(), data)

    def test_own_descriptor_closed(self) -> None:
        content = self.spool(b"x" * 10)
        reader = SpooledReader(content.fileno())
        reader.close()
        reader.close()  # a producer stopped after its end closes it again
        self.assertRaises(OSError, reader.read, 1)
        content.seek(0)
        self.assertEqual(content.read(), b"x" * 10)


class BroadcastCase(SynchronousTestCase):
    """This node a (its engine), b and c (their agents)."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.table = make_table(manager("a"), {"10.0.0.2": worker("b"), "10.0.0.3": worker("c")})
        self.engine = FakeAgent()
        self.peers = FakeAgent()
        self.cooperator = Cooperator(scheduler=lambda work: self.clock.callLater(0, work))
        self.addCleanup(self.cooperator.stop)
        nodes = Nodes(self.table, self.engine, self.peers, self.clock, 2)
        self.broadcaster = Broadcaster(nodes, self.cooperator)

    def send(
        self,
        op: Operation,
        uri: str,
        body: bytes = b"",
        absent: Sequence[str] = (),
        headers: Sequence[tuple[str, str]] = (),
    ) -> Client:
        resource = self.broadcaster.resource(op, self.table.nodes(), absent)
        hdrs = [("X-SwarmAgent-Broadcast", "all"), *headers]
        return Client(make_site(resource, self.clock)).send("POST", uri, hdrs, body)

    def calls(self) -> dict[str, UpstreamCall]:
        """Each node's call, by node name."""
        out: dict[str, UpstreamCall] = {}
        for call in self.engine.calls:
            out["a"] = call
        for call in self.peers.calls:
            out["b" if b"10.0.0.2" in call.url else "c"] = call
        self.assertEqual(len(out), len(self.engine.calls) + len(self.peers.calls))
        return out

    def lines(self, response: Response) -> list[dict[str, Any]]:
        return [json.loads(line) for line in response.body.splitlines()]


class CopiesTests(BroadcastCase):
    def test_each_node_its_copy_of_the_body(self) -> None:
        """A body over twisted.web's in-memory limit is spooled to a file and
        each node reads all of it."""
        body = os.urandom(250_000)
        self.send(LOAD, "/v1.41/images/load?quiet=1", body)
        calls = self.calls()
        self.assertEqual(sorted(calls), ["a", "b", "c"])
        for name, call in calls.items():
            with self.subTest(node=name):
                self.assertEqual(call.method, b"POST")
                self.assertTrue(call.url.endswith(b"/v1.41/images/load?quiet=1"))
                self.assertEqual(body_of(call.body, self.clock), body)
                self.assertIsNone(call.header(b"x-swarmagent-broadcast"))
        self.assertEqual(calls["b"].header(b"x-portaineragent-target"), [b"id-b"])
        self.assertEqual(calls["c"].header(b"x-swarmagent-hop"), [b"id-a"])

    def test_each_node_its_copy_of_a_small_body(self) -> None:
        """twisted.web keeps a small body in memory: each node reads it whole too."""
        self.send(PULL, "/images/create?fromSrc=-", b"small tarball")
        self.assertEqual(
            [body_of(c.body, self.clock) for c in self.calls().values()], [b"small tarball"] * 3
        )

    def test_no_body(self) -> None:
        self.send(PULL, "/images/create?fromImage=busybox&tag=1")
        self.assertEqual([c.body for c in self.calls().values()], [None, None, None])


class ProgressTests(BroadcastCase):
    def start(self, absent: Sequence[str] = ()) -> tuple[Client, dict[str, UpstreamCall]]:
        client = self.send(PULL, "/images/create?fromImage=app&tag=1", absent=absent)
        return client, self.calls()

    def test_lines_merged_as_they_come(self) -> None:
        client, calls = self.start()
        a = calls["a"].respond(200, JSON)
        b = calls["b"].respond(200, JSON)
        c = calls["c"].respond(200, JSON)
        a.deliver(b'{"status":"Pulling from app","id":"1"}\n{"status":"Dow')
        b.deliver(b'{"status":"Pulling from app","id":"1"}\n')
        a.deliver(b'nloading","id":"l1"}\n')
        c.deliver(b'{"status":"Digest: sha256:x"}\n')
        for node in (a, b, c):
            node.end()
        response = client.response()
        self.assertEqual((response.code, response.complete), (200, True))
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertEqual(
            [
                (d["id"], d["status"], d["Portainer"]["Agent"]["NodeName"])
                for d in self.lines(response)
            ],
            [
                ("a 1", "Pulling from app", "a"),
                ("b 1", "Pulling from app", "b"),
                ("a l1", "Downloading", "a"),
                ("c", "Digest: sha256:x", "c"),
            ],
        )

    def test_a_node_unreachable(self) -> None:
        """The others complete; the node is named in the stream and at the end."""
        client, calls = self.start()
        calls["c"].result.errback(ConnectionRefusedError("no route"))
        a = calls["a"].respond(200, JSON)
        b = calls["b"].respond(200, JSON)
        a.deliver(b'{"status":"done a"}\n')
        a.end()
        b.deliver(b'{"status":"done b"}\n')
        b.end()
        response = client.response()
        self.assertTrue(response.complete)
        lines = self.lines(response)
        self.assertEqual(lines[0]["id"], "c")
        self.assertTrue(lines[0]["status"].startswith("failed: Connection was refused"))
        self.assertEqual([d.get("status") for d in lines[1:3]], ["done a", "done b"])
        self.assertEqual(set(lines[-1]), {"errorDetail", "error"})
        self.assertTrue(lines[-1]["error"].startswith("failed on c: Connection was refused"))

    def test_a_wrapped_failure_said_plainly(self) -> None:
        """twisted.web's client wraps why a request failed; the reason shown is inside."""
        client, calls = self.start()
        lost = Failure(ConnectionLost("link cut"))
        calls["c"].result.errback(ResponseNeverReceived([lost]))
        for name in ("a", "b"):
            calls[name].respond(200, JSON).end()
        lines = self.lines(client.response())
        why = "Connection to the other side was lost in a non-clean fashion: link cut."
        self.assertEqual(lines[0]["status"], f"failed: {why}")
        self.assertEqual(lines[-1]["error"], f"failed on c: {why}")

    def test_a_nodes_own_error_line(self) -> None:
        client, calls = self.start()
        for name, call in calls.items():
            response = call.respond(200, JSON)
            if name == "b":
                response.deliver(b'{"errorDetail":{"message":"denied"},"error":"denied"}\n')
            else:
                response.deliver(b'{"status":"ok"}\n')
            response.end()
        lines = self.lines(client.response())
        self.assertEqual(
            [(d.get("id"), d.get("status"), d.get("error")) for d in lines],
            [
                ("a", "ok", None),
                ("b", "failed: denied", None),
                ("c", "ok", None),
                (None, None, "failed on b: denied"),
            ],
        )

    def test_refusal_and_broken_stream_after_the_head(self) -> None:
        client, calls = self.start()
        a = calls["a"].respond(200, JSON)
        b = calls["b"].respond(500, JSON)
        b.deliver(b'{"message":"engine broke"}')
        b.end()
        c = calls["c"].respond(200, JSON)
        c.broken()
        a.end()
        lines = self.lines(client.response())
        self.assertEqual(lines[0]["status"], "failed: answered 500: engine broke")
        self.assertEqual(lines[1]["id"], "c")
        self.assertIn("stream broken: Connection to the other side was lost", lines[1]["status"])
        self.assertEqual(lines[-1]["error"], "failed on b: answered 500: engine broke; "
                         "c: stream broken: Connection to the other side was lost in a non-clean "
                         "fashion: upstream died.")  # fmt: skip

    def test_nodes_without_an_agent_named_first(self) -> None:
        client, calls = self.start(absent=["z"])
        for call in calls.values():
            call.respond(200, JSON).end()
        lines = self.lines(client.response())
        self.assertEqual(lines[0], {"id": "z", "status": "failed: no agent reachable",
                                    "Portainer": {"Agent": {"NodeName": "z"}}})  # fmt: skip
        self.assertEqual(lines[-1]["error"], "failed on z: no agent reachable")

    def test_every_node_refuses_with_the_engines_answer(self) -> None:
        client, calls = self.start()
        for call in calls.values():
            upstream = call.respond(404, JSON)
            upstream.deliver(b'{"message":"pull access denied for app"}')
            upstream.end()
        response = client.response()
        self.assertEqual(response.code, 404)
        self.assertEqual(response.json(), {"message": "pull access denied for app"})

    def test_every_node_unreachable(self) -> None:
        client, calls = self.start()
        for call in calls.values():
            call.result.errback(ConnectionRefusedError())
        response = client.response()
        self.assertEqual(response.code, 502)
        why = "Connection was refused by other side."
        self.assertEqual(response.json()["message"], f"Failed on a: {why}; b: {why}; c: {why}")

    def test_slow_client_pauses_every_node(self) -> None:
        client, calls = self.start()
        streams = {name: call.respond(200, JSON) for name, call in calls.items()}
        client.pause()
        self.assertEqual({s.transport.producerState for s in streams.values()}, {"paused"})
        client.resume()
        self.assertEqual({s.transport.producerState for s in streams.values()}, {"producing"})

    def test_client_gone_stops_every_node(self) -> None:
        client, calls = self.start()
        a = calls["a"].respond(200, JSON)
        client.disconnect()
        self.assertEqual(a.transport.producerState, "stopped")
        self.assertTrue(calls["b"].cancelled and calls["c"].cancelled)


class WholeAnswerTests(BroadcastCase):
    def answer(self, call: UpstreamCall, code: int, doc: Any) -> None:
        response = call.respond(code, JSON)
        response.deliver(json.dumps(doc).encode())
        response.end()

    def test_prunes_added_up(self) -> None:
        client = self.send(PRUNE, "/v1.41/images/prune?filters=%7B%7D")
        calls = self.calls()
        self.answer(calls["a"], 200, {"ImagesDeleted": [{"Deleted": "1"}], "SpaceReclaimed": 3})
        self.answer(calls["b"], 200, {"ImagesDeleted": None, "SpaceReclaimed": 0})
        self.answer(calls["c"], 200, {"ImagesDeleted": [{"Deleted": "2"}], "SpaceReclaimed": 4})
        response = client.response()
        self.assertEqual(response.code, 200)
        self.assertIsNone(response.header(MISSING))
        self.assertEqual(
            response.json(),
            {
                "ImagesDeleted": [
                    {"Deleted": "1", "Portainer": {"Agent": {"NodeName": "a"}}},
                    {"Deleted": "2", "Portainer": {"Agent": {"NodeName": "c"}}},
                ],
                "SpaceReclaimed": 7,
            },
        )
        self.assertTrue(
            all(c.url.endswith(b"/v1.41/images/prune?filters=%7B%7D") for c in calls.values())
        )

    def test_prune_with_a_node_failing(self) -> None:
        client = self.send(PRUNE, "/volumes/prune", absent=["z"])
        calls = self.calls()
        self.answer(calls["a"], 200, {"VolumesDeleted": ["v1"], "SpaceReclaimed": 1})
        self.answer(calls["b"], 500, {"message": "busy"})
        calls["c"].result.errback(ConnectionRefusedError())
        response = client.response()
        self.assertEqual(response.code, 200)
        self.assertEqual(response.json(), {"VolumesDeleted": ["v1"], "SpaceReclaimed": 1})
        self.assertEqual(response.header(MISSING), "z, b, c")

    def test_prune_every_node_failing(self) -> None:
        client = self.send(PRUNE, "/containers/prune?filters=bad")
        for call in self.calls().values():
            self.answer(call, 400, {"message": "invalid filter"})
        response = client.response()
        self.assertEqual((response.code, response.json()), (400, {"message": "invalid filter"}))

    def test_tag_everywhere(self) -> None:
        client = self.send(TAG, "/images/app/tag?repo=team/app&tag=2")
        for call in self.calls().values():
            call.respond(201).end()
        response = client.response()
        self.assertEqual((response.code, response.body), (201, b""))

    def test_tag_missing_somewhere(self) -> None:
        client = self.send(TAG, "/images/app/tag?repo=team/app&tag=2")
        calls = self.calls()
        calls["a"].respond(201).end()
        calls["b"].respond(201).end()
        self.answer(calls["c"], 404, {"message": "No such image: app:latest"})
        response = client.response()
        self.assertEqual(response.code, 404)
        self.assertEqual(
            response.json(),
            {
                "message": "Tagged on a, b only",
                "details": "Failed on c: answered 404: No such image: app:latest",
            },
        )
