"""Discovery driven by a MemoryReactorClock: DNS, probes, own identity."""

from __future__ import annotations

from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent
from twisted.names.error import DNSNameError
from twisted.trial.unittest import SynchronousTestCase

from swarmagent.discovery import IDENTITY_PATH, Discovery, HTTPProbe, ManagerNodeList, NodeList
from swarmagent.engine import Engine, SwarmNodes, expected_nodes, read_nodes
from swarmagent.nodes import Nodes
from swarmagent.peers import NodeIdentity, Peer, PeerTable
from tests.helpers import (
    AGENT_PORT,
    ByHost,
    FakeEngineResource,
    FakeNode,
    StubResolver,
    a_record,
    callable_probe,
    manager,
    node_doc,
    observe_logs,
    srv_record,
    worker,
)

INTERVAL = 5.0
NAME = "tasks.agent"
HOSTNAME = "c0ffee"  # inside a task, the hostname is the container ID
ME = manager("a")
B = worker("b")
C = worker("c")


class DiscoveryCase(SynchronousTestCase):
    """A discovery service on a fake clock, engine, resolver and probe.

    The DNS name lists this node (10.0.0.1) and b (10.0.0.2); every listed
    agent answers its probe.
    """

    name: str | None = NAME
    max_failures = 3

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.engine = FakeEngineResource(ME, {HOSTNAME: "agent"})
        self.resolver = StubResolver()
        self.resolver.names[NAME] = ["10.0.0.1", "10.0.0.2"]
        self.answers: dict[str, NodeIdentity | Exception] = {"10.0.0.1": ME, "10.0.0.2": B}
        me = Peer("0.0.0.0", AGENT_PORT, NodeIdentity(HOSTNAME), is_self=True)
        self.table = self.make_table(me)
        self.discovery = Discovery(
            self.table,
            Engine(RequestTraversalAgent(self.engine), self.clock, timeout=10),
            self.resolver,
            callable_probe(self.answers),
            self.clock,
            name=self.name,
            port=AGENT_PORT,
            hostname=HOSTNAME,
            node_list=self.make_node_list(),
        )

    def make_node_list(self) -> NodeList | None:
        return None

    def make_table(self, me: Peer) -> PeerTable:
        return PeerTable(me, max_failures=self.max_failures)

    def start(self) -> None:
        service = self.discovery.service(INTERVAL)
        service.startService()
        self.addCleanup(service.stopService)

    def tick(self) -> None:
        self.clock.advance(INTERVAL)

    def nodes(self) -> list[tuple[str, str]]:
        return [(p.name, p.address) for p in self.table.nodes()]


class MembershipTests(DiscoveryCase):
    def test_first_tick_at_start(self) -> None:
        self.start()
        self.assertEqual(self.nodes(), [("a", "10.0.0.1"), ("b", "10.0.0.2")])
        self.assertEqual(self.table.me.identity, ME)

    def test_new_record_joins_within_one_interval(self) -> None:
        self.start()
        self.resolver.names[NAME].append("10.0.0.3")
        self.answers["10.0.0.3"] = C
        self.clock.advance(INTERVAL - 0.1)
        self.assertNotIn(("c", "10.0.0.3"), self.nodes())
        self.clock.advance(0.1)
        self.assertIn(("c", "10.0.0.3"), self.nodes())

    def test_vanished_record_leaves(self) -> None:
        """Gone from DNS means gone, even if the agent still answers."""
        self.start()
        self.resolver.names[NAME] = ["10.0.0.1"]
        self.tick()
        self.assertEqual(self.nodes(), [("a", "10.0.0.1")])

    def test_empty_answer_empties_the_table(self) -> None:
        """A name with no records is an honest answer, unlike a failure."""
        self.start()
        self.resolver.names[NAME] = []
        self.tick()
        self.assertEqual(self.nodes(), [("a", "10.0.0.1")])

    def test_dns_failure_keeps_the_last_set(self) -> None:
        self.start()
        self.resolver.broken.add(NAME)
        for _ in range(5):
            self.tick()
        self.assertEqual(self.nodes(), [("a", "10.0.0.1"), ("b", "10.0.0.2")])

    def test_nxdomain_keeps_the_last_set(self) -> None:
        """The service being redeployed can make its name vanish for a while."""
        self.start()
        del self.resolver.names[NAME]
        self.tick()
        self.assertEqual(self.nodes(), [("a", "10.0.0.1"), ("b", "10.0.0.2")])

    def test_known_peers_still_probed_while_dns_fails(self) -> None:
        self.start()
        self.resolver.broken.add(NAME)
        self.answers["10.0.0.2"] = ConnectionRefusedError()
        for _ in range(self.max_failures):
            self.tick()
        self.assertEqual(self.nodes(), [("a", "10.0.0.1")])

    def test_change_of_identity_at_an_address(self) -> None:
        self.start()
        self.answers["10.0.0.2"] = manager("b")
        self.tick()
        self.assertEqual(self.table.nodes()[1].identity.role, "manager")

    def test_ipv6(self) -> None:
        self.resolver.names[NAME] = ["10.0.0.1", "fd00::2"]
        self.answers["fd00::2"] = B
        self.start()
        self.assertEqual(self.nodes(), [("a", "10.0.0.1"), ("b", "fd00::2")])
        self.assertEqual([q for q, n in self.resolver.queries if n == NAME], ["A", "AAAA"])

    def test_own_address_learnt_from_dns(self) -> None:
        self.start()
        self.assertEqual((self.table.me.address, self.table.me.port), ("10.0.0.1", AGENT_PORT))


class ProbeFailureTests(DiscoveryCase):
    def test_dropped_after_n_failures_in_a_row(self) -> None:
        self.start()
        self.answers["10.0.0.2"] = TimeoutError()
        for _ in range(self.max_failures - 1):
            self.tick()
            self.assertIn(("b", "10.0.0.2"), self.nodes())
        self.tick()
        self.assertEqual(self.nodes(), [("a", "10.0.0.1")])

    def test_back_when_it_answers_again(self) -> None:
        self.start()
        self.answers["10.0.0.2"] = TimeoutError()
        for _ in range(self.max_failures):
            self.tick()
        self.answers["10.0.0.2"] = B
        self.tick()
        self.assertIn(("b", "10.0.0.2"), self.nodes())

    def test_failures_not_in_a_row_are_forgiven(self) -> None:
        self.start()
        for _ in range(3):
            self.answers["10.0.0.2"] = TimeoutError()
            for _ in range(self.max_failures - 1):
                self.tick()
            self.answers["10.0.0.2"] = B
            self.tick()
        self.assertIn(("b", "10.0.0.2"), self.nodes())

    def test_never_answering_address_never_joins(self) -> None:
        self.resolver.names[NAME].append("10.0.0.9")
        self.start()
        self.tick()
        self.assertEqual(len(self.nodes()), 2)


class OneFailureTests(DiscoveryCase):
    max_failures = 1

    def test_limit_is_the_table_setting(self) -> None:
        self.start()
        self.answers["10.0.0.2"] = TimeoutError()
        self.tick()
        self.assertEqual(self.nodes(), [("a", "10.0.0.1")])


class SRVTests(DiscoveryCase):
    name = "_agent._tcp.swarm"

    def setUp(self) -> None:
        super().setUp()
        self.resolver.srv[self.name] = (
            [
                srv_record(self.name, "n1.swarm", 9101),
                srv_record(self.name, "n2.swarm", 9102),
                a_record(self.name, "10.9.9.9"),  # not an SRV record: ignored
            ],
            [a_record("N1.Swarm", "10.0.0.1")],  # glue, whatever its case
        )
        self.resolver.names["n2.swarm"] = ["10.0.0.2", "fd00::2"]
        self.answers["fd00::2"] = B

    def test_record_ports_and_glue(self) -> None:
        found = self.successResultOf(Deferred.fromCoroutine(self.discovery.resolve(self.name)))
        self.assertEqual(sorted(found), [("10.0.0.1", 9101), ("10.0.0.2", 9102), ("fd00::2", 9102)])
        self.assertNotIn(("A", "n1.swarm"), self.resolver.queries)
        self.assertIn(("A", "n2.swarm"), self.resolver.queries)

    def test_peers_at_record_ports(self) -> None:
        self.start()
        peers = {(p.name, p.address, p.port) for p in self.table.nodes()}
        self.assertIn(("a", "10.0.0.1", 9101), peers)
        self.assertIn(("b", "10.0.0.2", 9102), peers)

    def test_srv_failure_keeps_the_last_set(self) -> None:
        self.start()
        self.resolver.broken.add(self.name)
        self.tick()
        self.assertIn(("b", "10.0.0.2"), self.nodes())


class IdentityTests(DiscoveryCase):
    def test_promotion_seen_on_next_tick(self) -> None:
        self.engine.identity = worker("a", "id-a")
        self.start()
        self.assertEqual(self.table.me.identity.role, "worker")
        self.engine.identity = manager("a", leader=True)
        self.tick()
        self.assertEqual(self.table.me.identity, manager("a", leader=True))

    def test_engine_down_keeps_identity_and_discovery(self) -> None:
        self.start()
        self.engine.down = True
        self.resolver.names[NAME].append("10.0.0.3")
        self.answers["10.0.0.3"] = C
        self.tick()
        self.assertEqual(self.table.me.identity, ME)
        self.assertIn(("c", "10.0.0.3"), self.nodes())

    def test_identity_read_every_tick(self) -> None:
        self.start()
        for _ in range(3):
            self.tick()
        self.assertEqual(self.engine.paths.count(b"/info"), 4)


class RaisingTable(PeerTable):
    """A table whose retain() fails once, as a bug in a tick would."""

    broken = True

    def retain(self, addresses: Any) -> list[Peer]:
        if self.broken:
            self.broken = False
            raise RuntimeError("bug")
        return super().retain(addresses)


class LoopSurvivesTests(DiscoveryCase):
    def make_table(self, me: Peer) -> PeerTable:
        return RaisingTable(me, max_failures=self.max_failures)

    def test_raising_tick_does_not_stop_the_loop(self) -> None:
        self.start()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.nodes(), [("a", "0.0.0.0")])
        self.tick()
        self.assertEqual(self.nodes(), [("a", "10.0.0.1"), ("b", "10.0.0.2")])

    def test_resolver_raising_synchronously(self) -> None:
        def boom(name: str, timeout: Any = None) -> Any:
            raise TypeError("resolver bug")

        self.start()
        self.flushLoggedErrors(RuntimeError)
        self.patch(self.resolver, "lookupAddress", boom)
        self.tick()
        del self.resolver.lookupAddress
        self.resolver.names[NAME].append("10.0.0.3")
        self.answers["10.0.0.3"] = C
        self.tick()
        self.assertIn(("c", "10.0.0.3"), self.nodes())


class DefaultNameTests(DiscoveryCase):
    name = None

    def test_found_from_service_label(self) -> None:
        self.start()
        self.assertEqual(self.discovery.name, NAME)
        self.assertIn(f"/containers/{HOSTNAME}/json".encode(), self.engine.paths)
        self.assertEqual(self.nodes(), [("a", "10.0.0.1"), ("b", "10.0.0.2")])

    def test_looked_up_once(self) -> None:
        self.start()
        self.tick()
        self.tick()
        self.assertEqual(self.engine.paths.count(f"/containers/{HOSTNAME}/json".encode()), 1)

    def test_not_a_service_task(self) -> None:
        self.engine.containers = {HOSTNAME: ""}
        self.start()
        self.tick()
        self.assertIsNone(self.discovery.name)
        self.assertEqual(self.resolver.queries, [])
        self.assertEqual(self.nodes(), [("a", "0.0.0.0")])

    def test_not_a_container(self) -> None:
        self.engine.containers = {}
        self.start()
        self.assertIsNone(self.discovery.name)
        self.assertEqual(self.resolver.queries, [])

    def test_outside_a_swarm_until_it_joins(self) -> None:
        self.engine.identity = NodeIdentity("a")
        self.start()
        self.tick()
        self.assertIsNone(self.discovery.name)
        self.assertNotIn(f"/containers/{HOSTNAME}/json".encode(), self.engine.paths)
        self.engine.identity = ME
        self.tick()
        self.assertEqual(self.discovery.name, NAME)
        self.assertIn(("b", "10.0.0.2"), self.nodes())


D = worker("d")
NOT_READ = "Cannot read the swarm's node list"


def not_read(logs: EventLoggingObserver) -> list[str]:
    """The text of each event logged about the node list not being read."""
    lines = (formatEvent(event) for event in logs)
    return [line for line in lines if NOT_READ in line]


class ManagerNodeListTests(DiscoveryCase):
    """This node is a manager: the swarm's nodes come from its own engine."""

    def setUp(self) -> None:
        super().setUp()
        self.engine.nodes = [node_doc(ME), node_doc(B), node_doc(D)]
        self.asked: list[tuple[Peer, str]] = []
        self.logs = observe_logs(self)

    def make_node_list(self) -> NodeList:
        async def node_list(manager: Peer) -> SwarmNodes:
            self.asked.append((manager, self.table.me.identity.key))
            return SwarmNodes({})

        return node_list

    def test_read_from_own_engine(self) -> None:
        self.start()
        self.assertIn(b"/nodes", self.engine.paths)
        self.assertEqual(self.asked, [])
        self.assertEqual(self.table.expected, {"id-a": "a", "id-b": "b", "id-d": "d"})
        self.assertEqual(self.table.agentless(), [("id-d", "d")])

    def test_read_every_tick(self) -> None:
        self.start()
        self.tick()
        self.tick()
        self.assertEqual(self.engine.paths.count(b"/nodes"), 3)

    def test_drained_node_not_expected(self) -> None:
        self.engine.nodes = [node_doc(ME), node_doc(B), node_doc(D, "drain")]
        self.start()
        self.assertEqual(self.table.expected, {"id-a": "a", "id-b": "b"})
        self.assertEqual(self.table.agentless(), [])

    def test_paused_node_expected(self) -> None:
        self.engine.nodes = [node_doc(ME), node_doc(B), node_doc(D, "pause")]
        self.start()
        self.assertEqual(self.table.agentless(), [("id-d", "d")])

    def test_agent_found_later_is_not_missing(self) -> None:
        self.start()
        self.resolver.names[NAME].append("10.0.0.4")
        self.answers["10.0.0.4"] = D
        self.tick()
        self.assertEqual(self.table.agentless(), [])

    def test_node_added_to_the_swarm(self) -> None:
        self.start()
        assert self.engine.nodes is not None
        self.engine.nodes.append(node_doc(C))
        self.tick()
        self.assertEqual(self.table.agentless(), [("id-c", "c"), ("id-d", "d")])

    def test_last_list_kept_and_failure_logged_once(self) -> None:
        self.start()
        self.engine.nodes = None  # the engine refuses (503)
        for _ in range(3):
            self.tick()
        self.assertEqual(self.table.agentless(), [("id-d", "d")])
        self.assertEqual(len(not_read(self.logs)), 1)
        # Readable again, then failing again: news each time.
        self.engine.nodes = [node_doc(ME), node_doc(B)]
        self.tick()
        self.assertEqual(self.table.agentless(), [])
        self.engine.nodes = None
        self.tick()
        self.tick()
        self.assertEqual(len(not_read(self.logs)), 2)

    def test_engine_down_at_start(self) -> None:
        self.engine.nodes = None
        self.start()
        self.assertEqual(self.table.expected, {})
        self.assertEqual(self.table.agentless(), [])

    def test_outside_a_swarm_nothing_fetched(self) -> None:
        self.engine.identity = NodeIdentity("a")
        self.start()
        self.tick()
        self.assertNotIn(b"/nodes", self.engine.paths)
        self.assertEqual((self.asked, self.table.expected), ([], {}))
        self.assertFalse(not_read(self.logs))

    def test_leaving_the_swarm_forgets_the_list(self) -> None:
        self.start()
        self.engine.identity = NodeIdentity("a")
        self.tick()
        self.assertEqual((self.table.expected, self.table.agentless()), ({}, []))

    def test_without_a_discovery_name(self) -> None:
        """Not a service task: no peers, so every other node has no agent."""
        self.engine.containers = {}
        self.discovery.name = None
        self.discovery._name_sought = True
        self.start()
        self.assertEqual(self.table.agentless(), [("id-b", "b"), ("id-d", "d")])


class WorkerNodeListTests(DiscoveryCase):
    """This node is a worker: it asks a manager's agent, the leader's first."""

    def setUp(self) -> None:
        # Two views of the swarm, to tell which manager's agent was asked.
        a, b, c = worker("a"), manager("b"), manager("c", leader=True)
        self.b_agent = FakeNode([node_doc(a), node_doc(b), node_doc(D)])
        self.c_agent = FakeNode([node_doc(a), node_doc(b), node_doc(c), node_doc(D, "drain")])
        super().setUp()
        self.engine.identity = worker("a")
        self.answers.update(
            {
                "10.0.0.1": worker("a"),
                "10.0.0.2": manager("b"),
                "10.0.0.3": manager("c", leader=True),
            }
        )
        self.resolver.names[NAME].append("10.0.0.3")
        self.logs = observe_logs(self)

    def make_node_list(self) -> NodeList:
        hosts = {b"10.0.0.2:9001": self.b_agent, b"10.0.0.3:9001": self.c_agent}
        nodes = Nodes(
            self.table,
            RequestTraversalAgent(self.engine),
            RequestTraversalAgent(ByHost(hosts)),
            self.clock,
            99,
            credentials={"X-PortainerAgent-Signature": "sig"},
            ping_timeout=2,  # as the agent's: a ping is bounded like the list
        )
        return ManagerNodeList(nodes, timeout=2)

    def test_asks_the_leaders_agent(self) -> None:
        self.start()
        self.assertNotIn(b"/nodes", self.engine.paths)
        self.assertEqual(self.b_agent.seen, [])
        [seen] = self.c_agent.seen
        self.assertEqual(seen.uri, b"/nodes")
        h = seen.headers
        self.assertEqual(h.getRawHeaders(b"x-portaineragent-target"), [b"id-c"])
        self.assertEqual(h.getRawHeaders(b"x-swarmagent-hop"), [b"id-a"])
        self.assertEqual(h.getRawHeaders(b"x-portaineragent-signature"), [b"sig"])
        self.assertEqual(self.table.expected, {"id-a": "a", "id-b": "b", "id-c": "c"})
        self.assertEqual(self.table.agentless(), [])

    def test_another_manager_when_the_leader_fails(self) -> None:
        self.c_agent.code = 403
        self.start()
        self.assertEqual(len(self.c_agent.seen), 1)
        self.assertEqual(len(self.b_agent.seen), 1)
        self.assertEqual(self.table.expected, {"id-a": "a", "id-b": "b", "id-d": "d"})
        self.assertEqual(self.table.agentless(), [("id-d", "d")])

    def test_deadline_keeps_the_last_list(self) -> None:
        self.start()
        views = self.c_agent.answer
        self.b_agent.answer = self.c_agent.answer = None  # neither answers
        self.tick()
        self.assertEqual((len(self.c_agent.seen), len(self.b_agent.seen)), (2, 0))
        self.clock.advance(2)  # the leader's deadline: the other manager is asked
        self.assertEqual(len(self.b_agent.seen), 1)
        self.clock.advance(2)
        self.assertEqual(self.table.expected, {"id-a": "a", "id-b": "b", "id-c": "c"})
        [line] = not_read(self.logs)
        self.assertIn("no answer within 2 s", line)
        # The leader answers again, with news. Having run out a deadline, and
        # its ping too, it is silent: the next tick finds it so and asks it in
        # the background (the other manager, whose ping is still out, is
        # asked again)...
        self.c_agent.answer = [*views, node_doc(worker("e"))]
        self.tick()
        self.assertEqual(self.table.agentless(), [])
        # (Each manager was pinged as it ran out; neither ping was answered.)
        self.assertEqual([x.uri for x in self.b_agent.seen], [b"/nodes", b"/_ping", b"/nodes"])
        self.assertEqual(
            [x.uri for x in self.c_agent.seen], [b"/nodes", b"/nodes", b"/_ping", b"/nodes"]
        )
        # ... and, once that tick has waited out the other manager's deadline
        # (not yet known silent, it was asked), the next reads its list.
        self.tick()
        self.tick()
        self.assertEqual(self.table.agentless(), [("id-e", "e")])

    def test_learns_the_leader_from_the_node_list(self) -> None:
        """A new leader named by the manager's engine leads the choice at once,
        though the managers' identities still name the old one."""
        self.start()
        new_leader = {**node_doc(manager("b")), "ManagerStatus": {"Leader": True}}
        old_leader = {
            **node_doc(manager("c")),
            "ManagerStatus": {"Leader": False, "Reachability": "unreachable"},
        }
        self.c_agent.answer = [node_doc(worker("a")), new_leader, old_leader]
        self.assertEqual([p.name for p in self.table.managers()], ["c", "b"])
        self.tick()
        self.assertEqual([p.name for p in self.table.managers()], ["b", "c"])
        self.assertTrue(self.table.managers()[1].identity.leader)

    def test_bad_answer_keeps_the_last_list(self) -> None:
        self.start()
        self.c_agent.answer = {"message": "not a list"}
        self.b_agent.code = 421
        self.tick()
        self.assertEqual(self.table.expected, {"id-a": "a", "id-b": "b", "id-c": "c"})
        [line] = not_read(self.logs)
        self.assertIn("the agent of c sent a bad node list", line)
        self.assertIn("the agent of b answered 421", line)

    def test_no_manager_known(self) -> None:
        self.resolver.names[NAME] = ["10.0.0.1"]
        self.start()
        self.tick()
        self.assertEqual(self.table.expected, {})
        self.assertEqual(len(not_read(self.logs)), 1)


class ExpectedNodesTests(SynchronousTestCase):
    def test_drained_and_malformed_entries_left_out(self) -> None:
        doc = [
            node_doc(ME),
            node_doc(B, "drain"),
            {"ID": "id-x", "Spec": {"Availability": "active"}},  # no hostname: its ID
            {"ID": ""},
            {"Description": {"Hostname": "no-id"}},
            "junk",
        ]
        self.assertEqual(expected_nodes(doc), {"id-a": "a", "id-x": "id-x"})

    def test_not_a_list(self) -> None:
        with self.assertRaises(ValueError):
            expected_nodes({"message": "nope"})
        with self.assertRaises(ValueError):
            read_nodes({"message": "nope"})

    def test_raft_view(self) -> None:
        doc = [
            {**node_doc(ME), "ManagerStatus": {"Leader": True, "Reachability": "reachable"}},
            {**node_doc(B), "ManagerStatus": {"Reachability": "unreachable"}},
            {**node_doc(D), "ManagerStatus": "junk"},
            {"ManagerStatus": {"Leader": True}},  # no ID: not the leader
        ]
        swarm = read_nodes(doc)
        self.assertEqual(swarm.expected, {"id-a": "a", "id-b": "b", "id-d": "d"})
        self.assertEqual((swarm.leader, swarm.unreachable), ("id-a", frozenset({"id-b"})))

    def test_no_leader(self) -> None:
        """Between a leader's loss and the election the list names none."""
        swarm = read_nodes([node_doc(ME), node_doc(B)])
        self.assertEqual((swarm.leader, swarm.unreachable), ("", frozenset()))


class HTTPProbeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.agent = FakeNode(B.to_json())
        self.v6 = FakeNode(C.to_json())
        hosts = {b"10.0.0.2:9001": self.agent, b"[fd00::3]:9001": self.v6}
        self.probe = HTTPProbe(RequestTraversalAgent(ByHost(hosts)), self.clock, timeout=2)

    def ask(self, address: str) -> Deferred[NodeIdentity]:
        return Deferred.fromCoroutine(self.probe(address, AGENT_PORT))

    def test_identity(self) -> None:
        self.assertEqual(self.successResultOf(self.ask("10.0.0.2")), B)
        self.assertEqual(self.agent.seen[0].uri, IDENTITY_PATH)

    def test_ipv6(self) -> None:
        self.assertEqual(self.successResultOf(self.ask("fd00::3")), C)

    def test_error_status(self) -> None:
        self.agent.code = 503
        self.failureResultOf(self.ask("10.0.0.2"), ValueError)

    def test_not_an_identity(self) -> None:
        self.agent.answer = {"message": "page not found"}
        self.failureResultOf(self.ask("10.0.0.2"), ValueError)

    def test_deadline(self) -> None:
        self.agent.answer = None
        d = self.ask("10.0.0.2")
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.failureResultOf(d)


class NotFoundTests(SynchronousTestCase):
    def test_stub_resolver_nxdomain(self) -> None:
        """The fake answers unknown names as twisted.names does."""
        self.failureResultOf(StubResolver().lookupAddress("nope"), DNSNameError)
