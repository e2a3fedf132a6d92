"""The cluster's ``system df``: every node's disk usage added up."""

from __future__ import annotations

from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from swarmagent.diskusage import ClusterDiskUsage
from swarmagent.nodes import Nodes
from tests.helpers import ByHost, Client, FakeNode, Response, make_site, make_table, manager, worker

MISSING = "x-swarmagent-missing-nodes"


def usage(layers: int, image: str, volume: str) -> dict[str, Any]:
    return {
        "LayersSize": layers,
        "Images": [{"Id": image, "Size": layers}],
        "Containers": [],
        "Volumes": [{"Name": volume, "UsageData": {"Size": 1, "RefCount": 0}}],
        "BuildCache": None,
        "BuilderSize": 0,
    }


class DiskUsageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.table = make_table(manager("a"), {"10.0.0.2": worker("b"), "10.0.0.3": worker("c")})
        self.a = FakeNode(usage(100, "ia", "va"))
        self.b = FakeNode(usage(20, "ib", "vb"))
        self.c = FakeNode(usage(3, "ic", "vc"))
        peers = ByHost({b"10.0.0.2:9001": self.b, b"10.0.0.3:9001": self.c})
        nodes = Nodes(
            self.table, RequestTraversalAgent(self.a), RequestTraversalAgent(peers), self.clock, 2
        )
        self.usage = ClusterDiskUsage(nodes)

    def get(self, uri: str = "/v1.41/system/df") -> Response:
        return Client(make_site(self.usage.resource(), self.clock)).send("GET", uri).response()

    def test_added_up(self) -> None:
        response = self.get()
        self.assertEqual(response.code, 200)
        self.assertIsNone(response.header(MISSING))
        doc = response.json()
        self.assertEqual((doc["LayersSize"], doc["BuilderSize"]), (123, 0))
        self.assertEqual(
            [(i["Id"], i["Portainer"]["Agent"]["NodeName"]) for i in doc["Images"]],
            [("ia", "a"), ("ib", "b"), ("ic", "c")],
        )
        self.assertEqual([v["Name"] for v in doc["Volumes"]], ["va", "vb", "vc"])
        self.assertEqual((doc["Containers"], doc["BuildCache"]), ([], None))

    def test_query_sent_to_each(self) -> None:
        self.get("/v1.44/system/df?type=image")
        for node in (self.a, self.b, self.c):
            self.assertEqual([s.uri for s in node.seen], [b"/v1.44/system/df?type=image"])

    def test_missing_nodes_named(self) -> None:
        self.c.code = 500
        self.c.answer = {"message": "boom"}
        self.table.expect({"id-a": "a", "id-b": "b", "id-c": "c", "id-z": "z"})
        response = self.get()
        self.assertEqual(response.json()["LayersSize"], 120)
        self.assertEqual(response.header(MISSING), "z, c")

    def test_late_node_left_out(self) -> None:
        self.b.answer = None
        client = Client(make_site(self.usage.resource(), self.clock)).send("GET", "/system/df")
        self.clock.advance(2)
        response = client.response()
        self.assertEqual(response.json()["LayersSize"], 103)
        self.assertEqual(response.header(MISSING), "b")

    def test_no_node_answering(self) -> None:
        for node in (self.a, self.b, self.c):
            node.code = 400
            node.answer = {"message": "bad type"}
        response = self.get()
        self.assertEqual((response.code, response.json()), (400, {"message": "bad type"}))
