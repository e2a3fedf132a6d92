"""The resource tree: the agent's own routes, error answers, and the agent headers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Cooperator
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from swarmagent import __version__
from swarmagent.api import AgentRoot
from swarmagent.auth import Authorizer
from swarmagent.broadcaster import Broadcaster
from swarmagent.clients import EngineEndpoints
from swarmagent.config import EngineAddress
from swarmagent.diskusage import ClusterDiskUsage
from swarmagent.fanout import FanOut
from swarmagent.locate import Locator
from swarmagent.locations import NAMES, Locations
from swarmagent.nodes import Nodes
from swarmagent.peers import NodeIdentity, PeerTable
from swarmagent.proxy import Relay
from swarmagent.signature import Signer, Verifier
from swarmagent.tap import IDLE_TIMEOUT
from swarmagent.tunnel import _ClientSide
from tests.helpers import (
    ByHost,
    Client,
    FakeAgent,
    FakeNode,
    Response,
    UpstreamCall,
    body_of,
    make_site,
    make_table,
    manager,
    worker,
)

SECRET = "s"


class _Wire(StringTransport):
    protocol: Any = None


@implementer(IAgentEndpointFactory)
class FakeEndpoints:
    """Connects each URI's protocol at once to an in-memory transport."""

    def __init__(self) -> None:
        self.connected: list[tuple[URI, _Wire]] = []

    def endpointForURI(self, uri: URI) -> Any:
        endpoints = self

        class Endpoint:
            def connect(self, factory: Any) -> Deferred[Any]:
                protocol = factory.buildProtocol(None)
                wire = _Wire()
                wire.protocol = protocol
                protocol.makeConnection(wire)
                endpoints.connected.append((uri, wire))
                return succeed(protocol)

        return Endpoint()


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
        self.locations = self.make_locations()
        self.engine = FakeAgent()
        self.peers = FakeAgent()
        self.peer_endpoints = FakeEndpoints()
        cooperator = Cooperator(scheduler=lambda work: self.clock.callLater(0, work))
        self.addCleanup(cooperator.stop)
        self.own_list = FakeNode([{"Id": "a1"}])
        self.lists = {i: FakeNode([{"Id": f"x{i}"}]) for i in range(2, 6)}
        nodes = {f"10.0.0.{i}:9001".encode(): node for i, node in self.lists.items()}
        # Lists are served by in-memory nodes; everything else by fakes
        # that record each upstream call.
        lists = Nodes(
            self.table,
            RequestTraversalAgent(self.own_list),
            RequestTraversalAgent(ByHost(nodes)),
            self.clock,
            2,
        )
        node_calls = Nodes(self.table, self.engine, self.peers, self.clock, 2)
        endpoints = EngineEndpoints(self.clock, EngineAddress("unix", path="/x.sock"), 5)
        root = AgentRoot(
            node_calls,
            Relay(self.engine, endpoints, cooperator),
            Relay(self.peers, self.peer_endpoints, cooperator),
            FanOut(lists, self.locations),
            Authorizer(Verifier(secret=SECRET), None),
            Locator(node_calls, self.locations),
            Broadcaster(node_calls, cooperator),
            ClusterDiskUsage(lists),
            **self.agent_routes(),
        )
        self.site = make_site(root, self.clock)

    def make_locations(self) -> Locations | None:
        """Where lists and lookups place objects (None: lookups always search)."""
        return None

    def agent_routes(self) -> dict[str, Any]:
        """The agent-only resources (browse, host info, Docker Hub) the test gives."""
        return {}

    def request(
        self, method: str, uri: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
    ) -> Client:
        """Send a request signed as Portainer signs it (with the agent's secret)."""
        signed = [*SIGNER.headers().items(), *headers]
        return Client(self.site).send(method, uri, signed, body)

    def get(self, uri: str, headers: Sequence[tuple[str, str]] = ()) -> Response:
        return self.request("GET", uri, headers).response()

    def assertAgentHeaders(self, response: Response) -> None:
        for name, values in AGENT_HEADERS.items():
            self.assertEqual(response.headers.get(name), values, name)

    def assertInspectHeaders(self, response: Response) -> None:
        """An inspect served from the lookup's answer: the engine's headers, this
        agent's own (not the peer's), no hop-by-hop header."""
        self.assertAgentHeaders(response)
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertEqual(response.header("api-version"), "1.41")
        self.assertIsNone(response.header("x-hop"))

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
            {"IPAddress": "10.0.0.1", "Port": "9001", "NodeName": "a", "NodeID": "id-a",
             "NodeRole": "manager", "EdgeKeySet": False},
            {"IPAddress": "10.0.0.2", "Port": "9001", "NodeName": "b", "NodeID": "id-b",
             "NodeRole": "manager", "EdgeKeySet": False},
            {"IPAddress": "10.0.0.3", "Port": "9001", "NodeName": "c", "NodeID": "id-c",
             "NodeRole": "worker", "EdgeKeySet": False},
            {"IPAddress": "10.0.0.4", "Port": "9001", "NodeName": "dup", "NodeID": "n4",
             "NodeRole": "worker", "EdgeKeySet": False},
            {"IPAddress": "10.0.0.5", "Port": "9001", "NodeName": "dup", "NodeID": "n5",
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
        """The node's identity document, with the agent's version, which the
        other agents read back."""
        response = self.get("/swarmagent/identity")
        self.assertEqual(response.json(), {**manager("a").to_json(), "AgentVersion": __version__})
        self.assertEqual(NodeIdentity.from_json(response.json()).agent_version, __version__)

    def test_own_routes_answer_get_only(self) -> None:
        response = self.request("POST", "/ping").response()
        self.assertEqual(response.code, 405)
        self.assertAgentHeaders(response)
        self.assertEqual(self.engine.calls, [])


class DockerRoutesTests(AgentCase):
    def test_local(self) -> None:
        client = self.request(
            "GET", "/v1.41/containers/abc/json?size=1", [("X-PortainerAgent-Target", "a")]
        )
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

    def test_node_filter(self) -> None:
        """The agent takes the ``node`` filter: only c is asked, without it."""
        response = self.get(
            "/v1.41/containers/json?all=1&filters=%7B%22node%22%3A%7B%22c%22%3Atrue%7D%7D"
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(
            [(i["Id"], i["Labels"]["swarmagent.node"]) for i in response.json()], [("x3", "c")]
        )
        self.assertEqual(self.own_list.seen, [])

    def test_node_filter_unknown_node(self) -> None:
        response = self.get("/images/json?filters=%7B%22node%22%3A%5B%22zz%22%5D%7D")
        self.assertError(
            response,
            404,
            "No agent known for node 'zz'; known nodes: a, b, c, dup, dup",
            "Known nodes: a, b, c, dup, dup",
        )

    def test_broadcast_refused(self) -> None:
        response = self.get("/containers/json", [("X-SwarmAgent-Broadcast", "all")])
        self.assertError(
            response,
            400,
            "This request cannot be broadcast: GET /containers/json cannot be sent to several "
            "nodes: only image load, pull (or import), tag and the prunes can",
            "Drop the X-SwarmAgent-Broadcast header (the CLI's config.json HttpHeaders)",
        )

    def test_broadcast(self) -> None:
        client = self.request("POST", "/v1.41/images/prune", [("X-SwarmAgent-Broadcast", "c")])
        self.assertEqual(self.engine.calls, [])
        [call] = self.peers.calls
        self.assertEqual(call.url, b"https://10.0.0.3:9001/v1.41/images/prune")
        answer = call.respond(200, {b"content-type": [b"application/json"]})
        answer.deliver(b'{"ImagesDeleted":null,"SpaceReclaimed":0}')
        answer.end()
        response = client.response()
        self.assertEqual(response.json(), {"ImagesDeleted": None, "SpaceReclaimed": 0})
        self.assertAgentHeaders(response)

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
            response,
            404,
            "No agent known for node 'zz'; known nodes: a, b, c, dup, dup",
            "Known nodes: a, b, c, dup, dup",
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


NOT_FOUND = b'{"message":"No such container: abc"}'


def answer(call: UpstreamCall, code: int, body: bytes = b"{}") -> None:
    """Answer an inspect call whole."""
    response = call.respond(code, {b"Content-Type": [b"application/json"]})
    response.deliver(body)
    response.end()


def answer_with_headers(call: UpstreamCall, code: int, body: bytes) -> None:
    """Answer an inspect whole, as a peer's agent does: the engine's headers,
    that agent's own, and framing."""
    headers = {
        b"Content-Type": [b"application/json"],
        b"Api-Version": [b"1.41"],
        b"Portainer-Agent": [b"0.0-other"],
        b"Connection": [b"close, X-Hop"],
        b"X-Hop": [b"1"],
    }
    response = call.respond(code, headers, length=len(body))
    response.deliver(body)
    response.end()


class LocateTests(AgentCase):
    """A request naming one container or exec instance, with no target header,
    is served where that object is. Peers are asked in table order: b, c, n4, n5."""

    PEERS = [b"10.0.0.2", b"10.0.0.3", b"10.0.0.4", b"10.0.0.5"]

    def peer_answers(self, *codes: int | None) -> None:
        """Answer the four peer inspects in order (None: never answer)."""
        calls = list(self.peers.calls)  # answering the last may forward at once
        self.assertEqual(len(calls), 4)
        for call, code in zip(calls, codes, strict=True):
            if code is not None:
                answer(call, code, b'{"Id":"abc"}' if code == 200 else NOT_FOUND)

    def test_found_here_is_served_here(self) -> None:
        client = self.request("GET", "/v1.41/containers/abc/top?ps_args=aux")
        [inspect] = self.engine.calls
        self.assertEqual(inspect.url, b"http://docker/v1.41/containers/abc/json")
        self.assertEqual(inspect.method, b"GET")
        answer(inspect, 200)
        self.assertEqual(self.peers.calls, [])
        [_, call] = self.engine.calls
        self.assertEqual(call.url, b"http://docker/v1.41/containers/abc/top?ps_args=aux")
        call.respond(200, {b"Content-Type": [b"application/json"]}).end()
        self.assertEqual(client.response().code, 200)

    def test_inspect_is_its_own_lookup(self) -> None:
        """An untargeted inspect is asked once: the engine's 200 is the
        answer, with its headers and the agent's own."""
        client = self.request("GET", "/v1.41/containers/abc/json")
        [inspect] = self.engine.calls
        self.assertEqual(inspect.url, b"http://docker/v1.41/containers/abc/json")
        answer_with_headers(inspect, 200, b'{"Id":"abc"}')
        self.assertEqual(len(self.engine.calls), 1)
        self.assertEqual(self.peers.calls, [])
        response = client.response()
        self.assertEqual((response.code, response.body), (200, b'{"Id":"abc"}'))
        self.assertInspectHeaders(response)

    def test_inspect_with_a_query_is_located_then_sent(self) -> None:
        """``size=1`` may take longer than the lookup's deadline: it is sent
        once found, as any other request."""
        client = self.request("GET", "/v1.41/containers/abc/json?size=1")
        [inspect] = self.engine.calls
        self.assertEqual(inspect.url, b"http://docker/v1.41/containers/abc/json")
        answer(inspect, 200, b'{"Id":"abc"}')
        [_, call] = self.engine.calls
        self.assertEqual(call.url, b"http://docker/v1.41/containers/abc/json?size=1")
        call.respond(200, {b"Content-Type": [b"application/json"]}, length=2).deliver(b"{}")
        self.assertEqual(client.response().body, b"{}")

    def test_found_on_another_node_is_forwarded_there(self) -> None:
        client = self.request("GET", "/v1.41/containers/abc/logs?follow=1")
        answer(self.engine.calls[0], 404, NOT_FOUND)
        for address, call in zip(self.PEERS, self.peers.calls, strict=True):
            self.assertEqual(call.url, b"https://" + address + b":9001/v1.41/containers/abc/json")
            self.assertEqual(call.header(b"x-swarmagent-hop"), [b"id-a"])
            # The credentials a forward carries.
            self.assertIsNotNone(call.header(b"x-portaineragent-signature"))
        self.assertEqual(
            [c.header(b"x-portaineragent-target") for c in self.peers.calls],
            [[b"id-b"], [b"id-c"], [b"n4"], [b"n5"]],
        )
        self.peer_answers(404, 200, 404, 404)
        [forward] = self.peers.calls[4:]
        self.assertEqual(forward.url, b"https://10.0.0.3:9001/v1.41/containers/abc/logs?follow=1")
        self.assertEqual(forward.header(b"x-portaineragent-target"), [b"id-c"])
        self.assertEqual(forward.header(b"x-swarmagent-hop"), [b"id-a"])
        self.assertEqual(len(self.engine.calls), 1)
        stream = forward.respond(200, {b"Content-Type": [b"application/vnd.docker.raw-stream"]})
        stream.deliver(b"line-1\n")
        self.assertEqual(client.response().body, b"line-1\n")
        stream.end()
        response = client.response()
        self.assertTrue(response.complete)
        self.assertAgentHeaders(response)

    def test_body_is_forwarded(self) -> None:
        body = b'{"Cmd":["echo","hi"]}'
        self.request(
            "POST", "/containers/abc/exec", [("Content-Type", "application/json")], body=body
        )
        answer(self.engine.calls[0], 404, NOT_FOUND)
        self.peer_answers(200, 404, 404, 404)
        forward = self.peers.calls[4]
        self.assertEqual(forward.method, b"POST")
        self.assertEqual(forward.url, b"https://10.0.0.2:9001/containers/abc/exec")
        self.assertEqual(body_of(forward.body, self.clock), body)

    def test_nowhere_is_the_engines_404(self) -> None:
        client = self.request("POST", "/containers/abc/stop")
        answer(self.engine.calls[0], 404, NOT_FOUND)
        self.peer_answers(404, 404, 404, 404)
        response = client.response()
        self.assertEqual(response.code, 404)
        self.assertEqual(response.body, NOT_FOUND)
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertIsNone(response.header("x-swarmagent-missing-nodes"))
        self.assertAgentHeaders(response)
        self.assertEqual(len(self.engine.calls) + len(self.peers.calls), 5)

    def test_several_is_409(self) -> None:
        client = self.request("GET", "/containers/web/json")
        answer(self.engine.calls[0], 404, NOT_FOUND)
        self.peer_answers(200, 404, 200, 404)
        self.assertError(
            client.response(),
            409,
            "Several nodes have a container matching 'web': b, dup",
            "Set the X-PortainerAgent-Target header to one of their node IDs: id-b, n4",
        )
        self.assertEqual(len(self.peers.calls), 4)

    def test_one_image_on_several_nodes_is_read_from_the_first(self) -> None:
        """The same image on several nodes: a read is served by any (the first)."""
        client = self.request("GET", "/v1.41/images/busybox/json")
        [inspect] = self.engine.calls
        self.assertEqual(inspect.url, b"http://docker/v1.41/images/busybox/json")
        answer(inspect, 404, NOT_FOUND)
        self.peer_answers(404, 200, 200, 404)
        # The first holder's inspect is the answer: nothing is asked again.
        self.assertEqual(len(self.peers.calls), 4)
        self.assertEqual(client.response().code, 200)
        self.assertEqual(client.response().json(), {"Id": "abc"})

    def test_different_images_by_one_name_is_409(self) -> None:
        client = self.request("GET", "/images/app/json")
        answer(self.engine.calls[0], 404, NOT_FOUND)
        calls = list(self.peers.calls)
        answer(calls[0], 200, b'{"Id":"sha256:one"}')
        answer(calls[1], 404, NOT_FOUND)
        answer(calls[2], 200, b'{"Id":"sha256:two"}')
        answer(calls[3], 404, NOT_FOUND)
        self.assertEqual(client.response().code, 409)
        self.assertEqual(len(self.peers.calls), 4)

    def test_image_write_on_several_nodes_is_409(self) -> None:
        """Which node's copy to delete is the client's choice, not the agent's."""
        client = self.request("DELETE", "/images/busybox")
        answer(self.engine.calls[0], 404, NOT_FOUND)
        self.peer_answers(200, 200, 404, 404)
        self.assertEqual(client.response().code, 409)
        self.assertIn(b"image matching 'busybox'", client.response().body)

    def test_silent_peer_is_bounded(self) -> None:
        """A peer that never answers costs the fan-out deadline, then is named missing."""
        client = self.request("GET", "/containers/abc/json")
        answer(self.engine.calls[0], 404, NOT_FOUND)
        self.peer_answers(404, None, 404, 404)
        self.assertEqual(client.raw, b"")
        self.clock.advance(2)
        self.assertTrue(self.peers.calls[1].cancelled)
        response = client.response()
        self.assertEqual(response.code, 404)
        self.assertEqual(response.body, NOT_FOUND)
        self.assertEqual(response.header("x-swarmagent-missing-nodes"), "c")

    def test_found_despite_a_silent_peer(self) -> None:
        client = self.request("POST", "/containers/abc/start")
        answer(self.engine.calls[0], 404, NOT_FOUND)
        self.peer_answers(None, 404, 200, 404)
        self.clock.advance(2)
        # After the ping sent to the silent peer when it ran out.
        [forward] = [c for c in self.peers.calls[4:] if c.url.endswith(b"/start")]
        self.assertEqual(forward.url, b"https://10.0.0.4:9001/containers/abc/start")
        forward.respond(204, phrase=b"No Content").end()
        self.assertEqual(client.response().code, 204)

    def test_failing_peer_is_named_missing(self) -> None:
        client = self.request("GET", "/containers/abc/json")
        answer(self.engine.calls[0], 404, NOT_FOUND)
        self.peers.calls[0].result.errback(ConnectionRefusedError())
        answer(self.peers.calls[1], 502, b"{}")
        for call in self.peers.calls[2:]:
            answer(call, 404, NOT_FOUND)
        response = client.response()
        self.assertEqual(response.code, 404)
        self.assertEqual(response.header("x-swarmagent-missing-nodes"), "b, c")

    def test_agentless_nodes_are_named_missing(self) -> None:
        self.table.expect({"id-a": "a", "id-z": "z"})
        client = self.request("GET", "/containers/abc/json")
        answer(self.engine.calls[0], 404, NOT_FOUND)
        self.peer_answers(404, 404, 404, 404)
        self.assertEqual(client.response().header("x-swarmagent-missing-nodes"), "z")

    def test_other_engine_answers_are_served_here(self) -> None:
        """Not a 404 (a bad name, a broken engine): the engine's answer is the answer."""
        for code in (400, 500):
            with self.subTest(code=code):
                self.engine.calls.clear()
                self.request("GET", "/containers/abc/json")
                answer(self.engine.calls[0], code)
                self.assertEqual(self.peers.calls, [])
                self.assertEqual(self.engine.calls[1].url, b"http://docker/containers/abc/json")

    def test_engine_unreachable_is_served_here(self) -> None:
        client = self.request("GET", "/containers/abc/json")
        self.engine.calls[0].result.errback(ConnectionRefusedError())
        self.engine.calls[1].result.errback(ConnectionRefusedError())
        self.assertEqual(client.response().code, 502)
        self.assertEqual(self.peers.calls, [])

    def test_target_header_means_no_lookup(self) -> None:
        self.request("GET", "/containers/abc/json", [("X-PortainerAgent-Target", "c")])
        self.assertEqual(self.engine.calls, [])
        [call] = self.peers.calls
        self.assertEqual(call.url, b"https://10.0.0.3:9001/containers/abc/json")

    def test_hop_means_no_lookup(self) -> None:
        self.request("GET", "/containers/abc/json", [("X-SwarmAgent-Hop", "id-b")])
        [call] = self.engine.calls
        self.assertEqual(call.url, b"http://docker/containers/abc/json")

    def test_exec_instance(self) -> None:
        self.request("POST", "/v1.41/exec/e1/resize?h=24&w=80")
        self.assertEqual(self.engine.calls[0].url, b"http://docker/v1.41/exec/e1/json")
        answer(self.engine.calls[0], 404, b'{"message":"No such exec instance: e1"}')
        self.assertEqual(self.peers.calls[0].url, b"https://10.0.0.2:9001/v1.41/exec/e1/json")
        self.peer_answers(404, 404, 404, 200)
        self.assertEqual(
            self.peers.calls[4].url, b"https://10.0.0.5:9001/v1.41/exec/e1/resize?h=24&w=80"
        )

    def test_client_gone_during_the_lookup(self) -> None:
        client = self.request("GET", "/containers/abc/json")
        answer(self.engine.calls[0], 404, NOT_FOUND)
        client.disconnect()
        self.peer_answers(404, 200, 404, 404)
        self.assertEqual(len(self.peers.calls), 4)

    def test_hijack_is_located(self) -> None:
        """An ``Upgrade: tcp`` exec start is spliced to the node holding the exec."""
        client = self.request(
            "POST",
            "/v1.41/exec/e1/start",
            [("Connection", "Upgrade"), ("Upgrade", "tcp"), ("Content-Type", "application/json")],
            body=b'{"Tty":false}',
        )
        answer(self.engine.calls[0], 404, b'{"message":"No such exec instance: e1"}')
        self.assertEqual(client.raw, b"")
        client.channel.dataReceived(b"early-stdin")  # sent before the upgrade answer
        self.peer_answers(404, 200, 404, 404)
        self.assertEqual(len(self.peers.calls), 4)  # a raw connection, not a pooled call
        [(uri, wire)] = self.peer_endpoints.connected
        self.assertEqual((uri.host, uri.port), (b"10.0.0.3", 9001))
        # Taken over from twisted.web.
        self.assertIsInstance(client.transport.protocol, _ClientSide)
        head, _, rest = wire.value().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"POST /v1.41/exec/e1/start HTTP/1.1")
        self.assertIn(b"x-portaineragent-target: id-c", [line.lower() for line in lines])
        self.assertIn(b"x-swarmagent-hop: id-a", [line.lower() for line in lines])
        self.assertIn(b"Upgrade: tcp", lines)
        self.assertEqual(rest, b'{"Tty":false}early-stdin')
        wire.protocol.dataReceived(b"HTTP/1.1 101 UPGRADED\r\nUpgrade: tcp\r\n\r\nout")
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 101 UPGRADED\r\n"))
        self.assertTrue(client.raw.endswith(b"\r\n\r\nout"))

    def test_early_flood_is_read_on(self) -> None:
        """More stdin than twisted.web buffers before the upgrade: reading resumes."""
        client = self.request(
            "POST", "/exec/e1/start", [("Connection", "Upgrade"), ("Upgrade", "tcp")]
        )
        answer(self.engine.calls[0], 404, b'{"message":"No such exec instance: e1"}')
        flood = b"x" * 0x5000
        client.channel.dataReceived(flood)
        self.assertEqual(client.transport.producerState, "paused")
        self.peer_answers(404, 200, 404, 404)
        [(_, wire)] = self.peer_endpoints.connected
        self.assertTrue(wire.value().endswith(flood))
        self.assertEqual(client.transport.producerState, "producing")


class CachedLocateTests(AgentCase):
    """An object a cluster list (or lookup) placed on another node costs one
    inspect there; anything but its 200 falls back to the full search."""

    PEERS = LocateTests.PEERS

    def make_locations(self) -> Locations:
        return Locations(self.clock, max_entries=100, max_age=60)

    def list_containers(self, query: str = "?all=1") -> None:
        self.lists[3].answer = [{"Id": "x3full", "Names": ["/web", "/db/alias"]}]
        self.lists[5].answer = [{"Id": "x5full", "Names": ["/shared"]}]
        self.own_list.answer = [{"Id": "a1full", "Names": ["/shared"]}]
        self.assertEqual(self.get("/v1.41/containers/json" + query).code, 200)

    def assertFullSearch(self, inspect: bytes) -> None:
        """The local engine asked first (then, on its 404, every peer)."""
        self.assertEqual(self.engine.calls[0].url, b"http://docker" + inspect)
        answer(self.engine.calls[0], 404, NOT_FOUND)
        self.assertEqual(
            [c.url for c in self.peers.calls],
            [b"https://" + p + b":9001" + inspect for p in self.PEERS],
        )

    def where(self, ident: str) -> str | None:
        """The node an ID, else a name, is placed on."""
        assert self.locations is not None
        found = self.locations.where("containers", ident)
        return found or self.locations.where(NAMES, ident)

    def answer_peers(self, codes: Sequence[int], found: bytes) -> None:
        """Answer the four peer inspects: ``found`` with a 200, else a 404."""
        calls = list(self.peers.calls)  # answering the last may forward at once
        for call, code in zip(calls, codes, strict=True):
            answer(call, code, found if code == 200 else NOT_FOUND)

    def test_a_whole_list_fills_the_locations(self) -> None:
        self.list_containers()
        self.assertEqual(
            {i: self.where(i) for i in ("a1full", "x2", "x3full", "web", "x4", "x5full")},
            {
                "a1full": "id-a",
                "x2": "id-b",
                "x3full": "id-c",
                "web": "id-c",
                "x4": "n4",
                "x5full": "n5",
            },
        )
        # A name on two nodes, and a link's name, are not kept.
        self.assertIsNone(self.where("shared"))
        self.assertIsNone(self.where("db/alias"))

    def test_listed_container_inspect_costs_one_request(self) -> None:
        """Portainer's snapshot: the inspect is asked of the listed node alone,
        and its answer is served."""
        self.list_containers()
        client = self.request("GET", "/v1.41/containers/x3full/json")
        [inspect] = self.peers.calls
        self.assertEqual(inspect.url, b"https://10.0.0.3:9001/v1.41/containers/x3full/json")
        self.assertEqual(inspect.header(b"x-portaineragent-target"), [b"id-c"])
        self.assertEqual(inspect.header(b"x-swarmagent-hop"), [b"id-a"])
        self.assertIsNotNone(inspect.header(b"x-portaineragent-signature"))
        self.assertEqual(self.engine.calls, [])
        answer_with_headers(inspect, 200, b'{"Id":"x3full"}')
        self.assertEqual(len(self.peers.calls), 1)
        response = client.response()
        self.assertEqual((response.code, response.body), (200, b'{"Id":"x3full"}'))
        self.assertInspectHeaders(response)
        self.assertEqual(self.where("x3full"), "id-c")

    def test_listed_container_other_request_is_confirmed_then_sent(self) -> None:
        """Anything but a plain inspect: one inspect of the listed node, then
        the request itself, there (never replayed elsewhere after a 404)."""
        self.list_containers()
        self.request("POST", "/v1.41/containers/x3full/stop")
        [inspect] = self.peers.calls
        self.assertEqual(inspect.url, b"https://10.0.0.3:9001/v1.41/containers/x3full/json")
        answer(inspect, 200, b'{"Id":"x3full"}')
        [forward] = self.peers.calls[1:]
        self.assertEqual(forward.url, b"https://10.0.0.3:9001/v1.41/containers/x3full/stop")
        self.assertEqual(forward.method, b"POST")
        self.assertEqual(self.engine.calls, [])

    def test_moved_inspect_is_served_from_where_the_search_finds_it(self) -> None:
        """The listed node answers 404: never served from there; the search's
        one holder answers."""
        self.list_containers()
        client = self.request("GET", "/containers/x3full/json")
        answer(self.peers.calls.pop(0), 404, NOT_FOUND)
        self.assertFullSearch(b"/containers/x3full/json")
        self.answer_peers((404, 404, 200, 404), b'{"Id":"x3full","Moved":true}')
        self.assertEqual(len(self.peers.calls), 4)
        self.assertEqual(client.response().json(), {"Id": "x3full", "Moved": True})
        self.assertEqual(self.where("x3full"), "n4")

    def test_listed_node_failing_is_never_served(self) -> None:
        """A 500 (or any answer but a 200) from the listed node is not the answer."""
        self.list_containers()
        client = self.request("GET", "/containers/x3full/json")
        answer(self.peers.calls.pop(0), 500, b'{"message":"boom"}')
        self.assertFullSearch(b"/containers/x3full/json")
        self.answer_peers((404, 404, 404, 404), b"")
        self.assertEqual(client.response().code, 404)
        self.assertIsNone(self.where("x3full"))

    def test_name_from_a_whole_list(self) -> None:
        """A name costs this node's inspect (it may have been taken here since
        the list), then one inspect on the node the list placed it on."""
        self.list_containers()
        self.request("POST", "/containers/web/stop")
        [here] = self.engine.calls
        self.assertEqual(here.url, b"http://docker/containers/web/json")
        self.assertEqual(self.peers.calls, [])
        answer(here, 404, NOT_FOUND)
        [inspect] = self.peers.calls
        self.assertEqual(inspect.url, b"https://10.0.0.3:9001/containers/web/json")
        answer(inspect, 200, b'{"Id":"x3full","Name":"/web"}')
        self.assertEqual(self.peers.calls[1].url, b"https://10.0.0.3:9001/containers/web/stop")
        self.assertEqual(len(self.engine.calls), 1)

    def test_name_taken_here_since_the_list_is_served_here(self) -> None:
        self.list_containers()
        client = self.request("GET", "/containers/web/json")
        answer(self.engine.calls[0], 200, b'{"Id":"a9full","Name":"/web"}')
        self.assertEqual(self.peers.calls, [])
        self.assertEqual([c.url for c in self.engine.calls], [b"http://docker/containers/web/json"])
        self.assertEqual(client.response().json()["Id"], "a9full")

    def test_no_link_names(self) -> None:
        self.list_containers()
        self.request("GET", "/containers/db%2Falias/json")
        self.assertEqual(len(self.engine.calls), 1)
        self.assertEqual(self.peers.calls, [])
        # A link name is not placed: on the engine's 404, every peer is asked.
        self.assertFullSearch(b"/containers/db%2Falias/json")

    def test_name_on_several_nodes_is_searched(self) -> None:
        self.list_containers()
        self.request("GET", "/containers/shared/json")
        self.assertFullSearch(b"/containers/shared/json")

    def assertNoNamesFrom(self, query: str) -> None:
        """A list that may leave some containers out: its names may not be unique."""
        self.list_containers(query)
        self.assertIsNotNone(self.where("x3full"))
        self.assertIsNone(self.where("web"))
        self.request("GET", "/containers/web/json")
        self.assertFullSearch(b"/containers/web/json")

    def test_no_names_from_a_list_of_running_containers(self) -> None:
        self.assertNoNamesFrom("?all=0")

    def test_no_names_from_a_filtered_list(self) -> None:
        self.assertNoNamesFrom("?all=1&filters=%7B%22status%22%3A%5B%22running%22%5D%7D")

    def test_no_names_from_a_list_with_a_missing_node(self) -> None:
        self.lists[2].code = 500
        self.assertNoNamesFrom("?all=true")

    def test_ids_from_a_filtered_list(self) -> None:
        self.list_containers("?filters=%7B%22status%22%3A%5B%22running%22%5D%7D")
        self.request("GET", "/containers/x3full/json")
        self.assertEqual(self.peers.calls[0].url, b"https://10.0.0.3:9001/containers/x3full/json")
        self.assertEqual(self.engine.calls, [])

    def test_no_prefix(self) -> None:
        self.list_containers()
        self.request("GET", "/containers/x3/json")
        self.assertFullSearch(b"/containers/x3/json")

    def test_stale_entry_falls_back_to_the_search(self) -> None:
        """The container moved: c's 404 drops the entry, the search finds it on n4."""
        self.list_containers()
        client = self.request("GET", "/containers/x3full/logs")
        answer(self.peers.calls[0], 404, NOT_FOUND)
        self.peers.calls.pop(0)
        self.assertFullSearch(b"/containers/x3full/json")
        self.answer_peers((404, 404, 200, 404), b'{"Id":"x3full"}')
        [forward] = self.peers.calls[4:]
        self.assertEqual(forward.url, b"https://10.0.0.4:9001/containers/x3full/logs")
        forward.respond(200, length=0).end()
        self.assertEqual(client.response().code, 200)
        # The search's find is the new entry.
        self.assertEqual(self.where("x3full"), "n4")

    def test_failed_node_falls_back_to_the_search(self) -> None:
        self.list_containers()
        self.request("GET", "/containers/x3full/json")
        self.peers.calls.pop(0).result.errback(ConnectionRefusedError())
        self.assertFullSearch(b"/containers/x3full/json")

    def test_gone_everywhere_is_the_engines_404(self) -> None:
        self.list_containers()
        client = self.request("GET", "/containers/x3full/json")
        answer(self.peers.calls.pop(0), 404, NOT_FOUND)
        self.assertFullSearch(b"/containers/x3full/json")
        self.answer_peers((404, 404, 404, 404), b"")
        self.assertEqual(client.response().code, 404)
        self.assertIsNone(self.where("x3full"))

    def test_entry_too_old_is_searched(self) -> None:
        self.list_containers()
        self.clock.advance(61)
        self.request("GET", "/containers/x3full/json")
        self.assertFullSearch(b"/containers/x3full/json")

    def test_entry_for_this_node_asks_the_engine(self) -> None:
        self.list_containers()
        self.request("GET", "/containers/a1full/top")
        answer(self.engine.calls[0], 200, b'{"Id":"a1full"}')
        self.assertEqual(self.peers.calls, [])
        self.assertEqual(self.engine.calls[1].url, b"http://docker/containers/a1full/top")

    def test_exec_found_by_a_search_costs_one_inspect_next(self) -> None:
        self.request("POST", "/exec/e1full/start")
        self.assertFullSearch(b"/exec/e1full/json")
        self.answer_peers((404, 404, 404, 200), b'{"ID":"e1full"}')
        self.peers.calls.clear()
        self.engine.calls.clear()
        self.request("POST", "/exec/e1full/resize?h=1&w=1")
        [inspect] = self.peers.calls
        self.assertEqual(inspect.url, b"https://10.0.0.5:9001/exec/e1full/json")
        self.assertEqual(self.engine.calls, [])
        self.peers.calls.clear()
        client = self.request("GET", "/exec/e1full/json")
        [inspect] = self.peers.calls
        answer_with_headers(inspect, 200, b'{"ID":"e1full","Running":true}')
        self.assertEqual(len(self.peers.calls), 1)
        self.assertEqual(client.response().json(), {"ID": "e1full", "Running": True})

    def test_prefix_found_by_a_search_is_not_kept(self) -> None:
        self.request("GET", "/containers/x3/json")
        self.assertFullSearch(b"/containers/x3/json")
        self.answer_peers((404, 200, 404, 404), b'{"Id":"x3full","Name":"/web"}')
        self.assertIsNone(self.where("x3"))

    def test_listed_image_read_costs_one_inspect_write_searches(self) -> None:
        self.lists[3].answer = [{"Id": "sha256:i3"}]
        self.assertEqual(self.get("/images/json").code, 200)
        client = self.request("GET", "/images/sha256:i3/json")
        [inspect] = self.peers.calls
        self.assertEqual(inspect.url, b"https://10.0.0.3:9001/images/sha256:i3/json")
        answer_with_headers(inspect, 200, b'{"Id":"sha256:i3"}')
        self.assertEqual(client.response().json(), {"Id": "sha256:i3"})
        self.assertEqual(len(self.peers.calls), 1)
        self.peers.calls.clear()
        self.request("DELETE", "/images/sha256:i3")
        self.assertFullSearch(b"/images/sha256:i3/json")


class IdleTimeoutTests(AgentCase):
    """The Site's idle timeout closes silent connections, never a quiet stream."""

    def setUp(self) -> None:
        super().setUp()
        self.site.timeOut = IDLE_TIMEOUT

    def test_silent_connection_is_closed(self) -> None:
        client = Client(self.site)
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(client.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(client.transport.disconnecting)

    def test_quiet_stream_lives_on(self) -> None:
        client = self.request(
            "GET", "/containers/abc/logs?follow=1", [("X-PortainerAgent-Target", "a")]
        )
        [call] = self.engine.calls
        stream = call.respond(200, {b"Content-Type": [b"application/vnd.docker.raw-stream"]})
        self.clock.advance(IDLE_TIMEOUT * 30)  # an hour without a byte
        self.assertFalse(client.transport.disconnecting)
        stream.deliver(b"at last\n")
        self.assertEqual(client.response().body, b"at last\n")


class _Named(Resource):
    """Answers with its name and the path it was asked, to show who served."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def render(self, request: Request) -> bytes:
        return f"{self.name} {request.method.decode()} {request.uri.decode()}".encode()


class AgentOnlyRoutesTests(AgentCase):
    """Browse, host info and Docker Hub: the agent's own, with or without a
    Docker version prefix; browse and host info go where the target says."""

    def make_locations(self) -> Locations | None:
        """Where lists and lookups place objects (None: lookups always search)."""
        return None

    def agent_routes(self) -> dict[str, Any]:
        return {
            "browse": _Named("browse"),
            "host_info": _Named("host"),
            "dockerhub": _Named("hub"),
        }

    def test_version_prefixed_ping_is_open(self) -> None:
        for uri in ("/v1.41/ping", "/v1.41/v2/ping", "/v1.24/ping"):
            with self.subTest(uri=uri):
                response = Client(self.site).send("GET", uri, []).response()
                self.assertEqual(response.code, 204)
                self.assertAgentHeaders(response)
        self.assertEqual(self.engine.calls, [])

    def test_version_prefixed_own_routes(self) -> None:
        self.assertEqual(self.get("/v1.41/v2/agents").code, 200)
        self.assertEqual(self.get("/v1.41/v2/agents").json()[0]["Port"], "9001")
        hub = self.request("POST", "/v1.41/v2/dockerhub", body=b"{}").response()
        self.assertEqual(hub.body, b"hub POST /v1.41/v2/dockerhub")
        self.assertEqual(self.get("/v1.41/v2/host/info").body, b"host GET /v1.41/v2/host/info")
        self.assertEqual(self.engine.calls, [])

    def test_own_routes_still_need_credentials(self) -> None:
        for uri in ("/v1.41/v2/agents", "/v2/browse/ls?path=/", "/v2/host/info"):
            with self.subTest(uri=uri):
                response = Client(self.site).send("GET", uri, []).response()
                self.assertEqual(response.code, 403)

    def test_docker_routes_keep_their_prefix(self) -> None:
        self.request("GET", "/v1.41/_ping")
        self.assertEqual([c.url for c in self.engine.calls], [b"http://docker/v1.41/_ping"])

    def test_host_info_goes_to_the_target(self) -> None:
        self.assertEqual(self.get("/host/info").body, b"host GET /host/info")
        self.request("GET", "/v2/host/info", [("X-PortainerAgent-Target", "c")])
        [call] = self.peers.calls
        self.assertEqual(call.url, b"https://10.0.0.3:9001/v2/host/info")
        self.assertEqual(call.header(b"x-swarmagent-hop"), [b"id-a"])

    def test_host_browser_is_served_here_or_at_the_target(self) -> None:
        self.assertEqual(
            self.get("/v2/browse/ls?path=/host").body, b"browse GET /v2/browse/ls?path=/host"
        )
        self.request("DELETE", "/browse/delete?path=/host/x", [("X-PortainerAgent-Target", "b")])
        [call] = self.peers.calls
        self.assertEqual(call.method, b"DELETE")
        self.assertEqual(call.url, b"https://10.0.0.2:9001/browse/delete?path=/host/x")

    def test_untargeted_volume_here(self) -> None:
        client = self.request("GET", "/v2/browse/ls?volumeID=data&path=/")
        [inspect] = self.engine.calls
        self.assertEqual(inspect.url, b"http://docker/volumes/data")
        answer(inspect, 200, b'{"Name":"data"}')
        self.assertEqual(self.peers.calls, [])
        self.assertEqual(client.response().body, b"browse GET /v2/browse/ls?volumeID=data&path=/")

    def test_untargeted_volume_elsewhere_is_forwarded(self) -> None:
        """In each route form, the volume's node serves it."""
        for uri, ident in [
            ("/v2/browse/get?volumeID=my%20data&path=/a.txt", b"my%20data"),
            ("/v1.41/browse/ls?volumeID=data", b"data"),
            ("/v1/browse/data/ls?path=/sub", b"data"),
        ]:
            with self.subTest(uri=uri):
                self.engine.calls.clear()
                self.peers.calls.clear()
                self.request("GET", uri)
                [inspect] = self.engine.calls
                self.assertEqual(inspect.url, b"http://docker/volumes/" + ident)
                answer(inspect, 404, b'{"message":"get data: no such volume"}')
                self.assertEqual(
                    [c.url for c in self.peers.calls],
                    [b"https://10.0.0.%d:9001/volumes/%s" % (i, ident) for i in range(2, 6)],
                )
                for call, code in zip(list(self.peers.calls), (404, 404, 200, 404), strict=True):
                    answer(call, code)
                [forward] = self.peers.calls[4:]
                self.assertEqual(forward.url, b"https://10.0.0.4:9001" + uri.encode())
                self.assertEqual(forward.header(b"x-portaineragent-target"), [b"n4"])

    def test_volume_on_several_nodes_is_409(self) -> None:
        client = self.request("PUT", "/v2/browse/rename?volumeID=data", body=b"{}")
        answer(self.engine.calls[0], 404, b'{"message":"get data: no such volume"}')
        for call, code in zip(list(self.peers.calls), (200, 404, 200, 404), strict=True):
            answer(call, code)
        self.assertError(
            client.response(),
            409,
            "Several nodes have a volume matching 'data': b, dup",
            "Set the X-PortainerAgent-Target header to one of their node IDs: id-b, n4",
        )


class WorkerNetworkTests(AgentCase):
    """On a worker, swarm networks are created, inspected and removed on a
    manager with no header (the docker CLI's stack deploy and stack rm)."""

    def make_table(self) -> PeerTable:
        return make_table(
            worker("a"), {"10.0.0.2": manager("b", leader=True), "10.0.0.3": worker("c")}
        )

    def test_overlay_create_goes_to_the_leader(self) -> None:
        body = b'{"Name":"web","Driver":"overlay","Attachable":true}'
        self.request("POST", "/v1.41/networks/create", [("Content-Type", "application/json")], body)
        self.assertEqual(self.engine.calls, [])
        [call] = self.peers.calls
        self.assertEqual(call.url, b"https://10.0.0.2:9001/v1.41/networks/create")
        self.assertEqual(body_of(call.body, self.clock), body)

    def test_bridge_create_stays_here(self) -> None:
        body = b'{"Name":"web","Driver":"bridge"}'
        self.request("POST", "/networks/create", [("Content-Type", "application/json")], body)
        self.assertEqual([c.url for c in self.engine.calls], [b"http://docker/networks/create"])
        self.assertEqual(self.peers.calls, [])

    def test_swarm_network_removed_on_the_leader(self) -> None:
        client = self.request("DELETE", "/v1.41/networks/stack_web")
        [inspect] = self.engine.calls
        self.assertEqual(inspect.url, b"http://docker/networks/stack_web")
        answer(inspect, 200, b'{"Id":"n1","Scope":"swarm"}')
        [ask] = self.peers.calls
        self.assertEqual(ask.method, b"GET")
        self.assertEqual(ask.url, b"https://10.0.0.2:9001/networks/stack_web")
        answer(ask, 200, b'{"Id":"n1","Scope":"swarm"}')
        [_, remove] = self.peers.calls
        self.assertEqual(remove.method, b"DELETE")
        self.assertEqual(remove.url, b"https://10.0.0.2:9001/v1.41/networks/stack_web")
        remove.respond(204, {}).end()
        self.assertEqual(client.response().code, 204)

    def test_local_network_stays_here(self) -> None:
        self.request("GET", "/networks/bridge")
        answer(self.engine.calls[0], 200, b'{"Id":"n2","Scope":"local"}')
        self.assertEqual(self.peers.calls, [])
        self.assertEqual(
            [c.url for c in self.engine.calls],
            [b"http://docker/networks/bridge", b"http://docker/networks/bridge"],
        )

    def test_unknown_everywhere_is_the_local_404(self) -> None:
        client = self.request("DELETE", "/networks/nope")
        answer(self.engine.calls[0], 404, b'{"message":"network nope not found"}')
        answer(self.peers.calls[0], 404, b'{"message":"network nope not found"}')
        [_, delete] = self.engine.calls
        self.assertEqual(delete.method, b"DELETE")
        answer(delete, 404, b'{"message":"network nope not found"}')
        self.assertEqual(client.response().code, 404)
