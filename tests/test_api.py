"""The resource tree: the agent's own routes, error answers, and the agent headers."""

from __future__ import annotations

from collections.abc import Sequence

from treq.testing import RequestTraversalAgent
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Cooperator
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from swarmagent import __version__
from swarmagent.api import AgentRoot
from swarmagent.auth import Authorizer
from swarmagent.clients import EngineEndpoints, PeerEndpoints
from swarmagent.config import EngineAddress
from swarmagent.fanout import FanOut
from swarmagent.peers import PeerTable
from swarmagent.proxy import Relay
from swarmagent.signature import Signer, Verifier
from swarmagent.tls import ClientTLS
from tests.helpers import (
    ByHost,
    Client,
    FakeAgent,
    FakeNode,
    Response,
    make_site,
    make_table,
    manager,
    worker,
)

SECRET = "s"
SIGNER = Signer.generate(SECRET)

AGENT_HEADERS = {
    "portainer-agent": [__version__],
    "portainer-agent-api-version": ["2"],
    "portainer-agent-platform": ["1"],
}


class AgentCase(SynchronousTestCase):
    """This node is a (manager), with b (leader) and c; two more nodes are
    both named "dup"."""

    def make_table(self) -> PeerTable:
        return make_table(
            manager("a"),
            {
                "10.0.0.2": manager("b", leader=True),
                "10.0.0.3": worker("c"),
                "10.0.0.4": worker("dup", "n4"),
                "10.0.0.5": worker("dup", "n5"),
            },
        )

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.table = self.make_table()
        self.engine = FakeAgent()
        self.peers = FakeAgent()
        cooperator = Cooperator(scheduler=lambda work: self.clock.callLater(0, work))
        self.addCleanup(cooperator.stop)
        self.own_list = FakeNode([{"Id": "a1"}])
        nodes = {f"10.0.0.{i}:9001".encode(): FakeNode([{"Id": f"x{i}"}]) for i in range(2, 6)}
        fanout = FanOut(
            self.table,
            RequestTraversalAgent(self.own_list),
            RequestTraversalAgent(ByHost(nodes)),
            self.clock,
            2,
        )
        endpoints = EngineEndpoints(self.clock, EngineAddress("unix", path="/x.sock"), 5)
        root = AgentRoot(
            self.table,
            Relay(self.engine, endpoints, cooperator),
            Relay(self.peers, PeerEndpoints(self.clock, 5, ClientTLS()), cooperator),
            fanout,
            self.clock,
            Authorizer(Verifier(secret=SECRET), None),
        )
        self.site = make_site(root, self.clock)

    def request(self, method: str, uri: str, headers: Sequence[tuple[str, str]] = ()) -> Client:
        """Send a request signed as Portainer signs it (with the agent's secret)."""
        signed = [*SIGNER.headers().items(), *headers]
        return Client(self.site).send(method, uri, signed)

    def get(self, uri: str, headers: Sequence[tuple[str, str]] = ()) -> Response:
        return self.request("GET", uri, headers).response()

    def assertAgentHeaders(self, response: Response) -> None:
        for name, values in AGENT_HEADERS.items():
            self.assertEqual(response.headers.get(name), values, name)

    def assertError(self, response: Response, code: int, message: str, details: str) -> None:
        self.assertEqual(response.code, code)
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertEqual(response.json(), {"message": message, "details": details})
        self.assertAgentHeaders(response)


class OwnRoutesTests(AgentCase):
    def test_ping(self) -> None:
        for uri in ("/ping", "/v2/ping"):
            with self.subTest(uri=uri):
                response = self.get(uri)
                self.assertEqual(response.code, 204)
                self.assertEqual(response.body, b"")
                self.assertAgentHeaders(response)
        self.assertEqual(self.engine.calls, [])

    def test_agents(self) -> None:
        expected = [
            {"IPAddress": "10.0.0.1", "Port": 9001, "NodeName": "a", "NodeID": "id-a",
             "NodeRole": "manager", "EdgeKeySet": False},
            {"IPAddress": "10.0.0.2", "Port": 9001, "NodeName": "b", "NodeID": "id-b",
             "NodeRole": "manager", "EdgeKeySet": False},
            {"IPAddress": "10.0.0.3", "Port": 9001, "NodeName": "c", "NodeID": "id-c",
             "NodeRole": "worker", "EdgeKeySet": False},
            {"IPAddress": "10.0.0.4", "Port": 9001, "NodeName": "dup", "NodeID": "n4",
             "NodeRole": "worker", "EdgeKeySet": False},
            {"IPAddress": "10.0.0.5", "Port": 9001, "NodeName": "dup", "NodeID": "n5",
             "NodeRole": "worker", "EdgeKeySet": False},
        ]  # fmt: skip
        for uri in ("/agents", "/v1/agents", "/v2/agents"):
            with self.subTest(uri=uri):
                response = self.get(uri)
                self.assertEqual(response.code, 200)
                self.assertEqual(response.header("content-type"), "application/json")
                self.assertEqual(response.json(), expected)
                self.assertAgentHeaders(response)

    def test_agents_follow_the_table(self) -> None:
        self.table.retain([])
        self.assertEqual([a["NodeName"] for a in self.get("/agents").json()], ["a"])

    def test_agents_leave_out_agentless_nodes(self) -> None:
        """Expected nodes without an agent are not agents: the list is unchanged."""
        before = self.get("/agents").json()
        self.table.expect({"id-a": "a", "id-b": "b", "id-z": "z"})
        self.assertEqual(self.table.agentless(), [("id-z", "z")])
        self.assertEqual(self.get("/agents").json(), before)

    def test_identity(self) -> None:
        response = self.get("/swarmagent/identity")
        self.assertEqual(response.json(), manager("a").to_json())

    def test_own_routes_answer_get_only(self) -> None:
        response = self.request("POST", "/ping").response()
        self.assertEqual(response.code, 405)
        self.assertAgentHeaders(response)
        self.assertEqual(self.engine.calls, [])


class DockerRoutesTests(AgentCase):
    def test_local(self) -> None:
        client = self.request("GET", "/v1.41/containers/abc/json?size=1")
        [call] = self.engine.calls
        self.assertEqual(call.url, b"http://docker/v1.41/containers/abc/json?size=1")
        call.respond(200, {b"Content-Type": [b"application/json"]}).end()
        self.assertAgentHeaders(client.response())

    def test_docker_ping_is_proxied(self) -> None:
        self.request("GET", "/_ping")
        self.assertEqual([c.url for c in self.engine.calls], [b"http://docker/_ping"])

    def test_forwarded(self) -> None:
        client = self.request("POST", "/containers/abc/start", [("X-PortainerAgent-Target", "c")])
        self.assertEqual(self.engine.calls, [])
        [call] = self.peers.calls
        self.assertEqual(call.url, b"https://10.0.0.3:9001/containers/abc/start")
        self.assertEqual(call.header(b"x-portaineragent-target"), [b"id-c"])
        self.assertEqual(call.header(b"x-swarmagent-hop"), [b"id-a"])
        call.respond(204, {b"Portainer-Agent": [b"0.0.1-peer"]}, b"No Content").end()
        response = client.response()
        self.assertEqual(response.code, 204)
        self.assertAgentHeaders(response)

    def test_fan_out(self) -> None:
        response = self.get("/v1.41/containers/json?all=1")
        self.assertEqual(response.code, 200)
        self.assertAgentHeaders(response)
        self.assertEqual(
            [(i["Id"], i["Portainer"]["Agent"]["NodeName"]) for i in response.json()],
            [("a1", "a"), ("x2", "b"), ("x3", "c"), ("x4", "dup"), ("x5", "dup")],
        )
        self.assertEqual(self.own_list.seen[0].uri, b"/v1.41/containers/json?all=1")

    def test_engine_unreachable(self) -> None:
        client = self.request("GET", "/version")
        self.engine.calls[0].result.errback(ConnectionRefusedError())
        response = client.response()
        self.assertEqual(response.code, 502)
        self.assertEqual(response.json()["message"], "Unable to reach the Docker engine")
        self.assertAgentHeaders(response)


class ErrorTests(AgentCase):
    def test_unknown_target(self) -> None:
        response = self.get("/containers/x/json", [("X-PortainerAgent-Target", "zz")])
        self.assertError(
            response, 404, "No agent known for node 'zz'", "Known nodes: a, b, c, dup, dup"
        )

    def test_ambiguous_target(self) -> None:
        response = self.get("/containers/x/json", [("x-portaineragent-target", "dup")])
        self.assertError(
            response, 409, "Several nodes are named 'dup'", "Target one by node ID: n4, n5"
        )

    def test_misdirected(self) -> None:
        response = self.get(
            "/containers/x/json", [("X-PortainerAgent-Target", "c"), ("X-SwarmAgent-Hop", "id-b")]
        )
        self.assertEqual(response.code, 421)
        self.assertEqual(response.json()["message"], "A forwarded request reached the wrong agent")
        self.assertAgentHeaders(response)
        self.assertEqual((self.engine.calls, self.peers.calls), ([], []))


class NoManagerTests(AgentCase):
    def make_table(self) -> PeerTable:
        return make_table(worker("a"), {"10.0.0.3": worker("c")})

    def test_no_manager(self) -> None:
        self.assertError(
            self.get("/services"),
            503,
            "The agent was unable to contact any other agent located on a manager node",
            "Unable to find an agent on any manager node",
        )
