"""The routing table: where each Docker API request is served."""

from __future__ import annotations

from itertools import product
from urllib.parse import urlencode

from twisted.trial.unittest import SynchronousTestCase

from swarmagent.broadcast import LOAD, PRUNE, PULL, TAG
from swarmagent.peers import Peer, PeerTable
from swarmagent.routing import (
    FANOUT_PATHS,
    HOP,
    MANAGER_OPERATION,
    MANAGER_PREFIXES,
    TARGET,
    AmbiguousNode,
    BadBroadcast,
    Broadcast,
    ClusterDF,
    ClusterList,
    Forward,
    Local,
    Locate,
    MergedEvents,
    Misdirected,
    NoManager,
    Route,
    UnknownNode,
    creates_swarm_network,
    route,
    single_object,
    strip_version,
    swarm_network,
)
from swarmagent.wire import BROADCAST
from tests.helpers import AGENT_PORT, make_table, manager, standalone, worker

LIST_KINDS = {
    "/containers/json": "containers",
    "/images/json": "images",
    "/volumes": "volumes",
    "/networks": "networks",
}
MANAGER_PATHS = [
    "/services",
    "/services/abc/update",
    "/tasks",
    "/secrets/s1",
    "/configs",
    "/swarm/init",
    "/nodes/n1",
    "/info",
]
NODE_PATHS = [
    "/_ping",
    "/version",
    "/events",
    "/containers/abc/json",
    "/containers/create",
    "/images/create",
    "/volumes/create",
    "/networks/create",
    "/system/df",
    "/infoX",
    "/servicesfoo",
    "/nodesx/1",
    "/containers/json/extra",
    "/",
]


def versions(path: str) -> list[str]:
    return [path, "/v1.41" + path, "/v1.24" + path]


def cluster(me: str = "manager") -> PeerTable:
    """Three nodes: a (this one), b and c; a is a manager or a worker."""
    identity = manager("a") if me == "manager" else worker("a")
    return make_table(
        identity,
        {"10.0.0.2": manager("b", leader=True), "10.0.0.3": worker("c")},
    )


def peer(table: PeerTable, name: str) -> Peer:
    found = table.find(name)
    assert isinstance(found, Peer)
    return found


def go(
    table: PeerTable,
    path: str,
    method: str = "GET",
    **headers: str,
) -> Route:
    names = {"target": TARGET, "manager": MANAGER_OPERATION, "hop": HOP}
    return route(method, path, {names[k]: v for k, v in headers.items()}, table)


class StripVersionTests(SynchronousTestCase):
    def test_strip(self) -> None:
        for given, expected in [
            ("/v1.41/containers/json", "/containers/json"),
            ("/v1.41", "/"),
            ("/v10.100/info", "/info"),
            ("/containers/json", "/containers/json"),
            ("/v1.41x/info", "/v1.41x/info"),
            ("/v1/agents", "/v1/agents"),
            ("/api/v1.41/info", "/api/v1.41/info"),
            ("/v1.41/v1.40/info", "/v1.40/info"),
        ]:
            with self.subTest(path=given):
                self.assertEqual(strip_version(given), expected)

    def test_tables_agree(self) -> None:
        self.assertEqual(FANOUT_PATHS, LIST_KINDS)
        self.assertEqual(
            set(MANAGER_PREFIXES),
            {"/services", "/tasks", "/secrets", "/configs", "/swarm", "/nodes", "/info"},
        )


class StandaloneTests(SynchronousTestCase):
    def test_always_local(self) -> None:
        """Outside a swarm there is no one else: targets and headers are moot."""
        table = make_table(standalone("solo"), {"10.0.0.2": standalone("other")})
        paths = [*LIST_KINDS, *MANAGER_PATHS, *NODE_PATHS]
        for path, method, headers in product(
            paths,
            ["GET", "POST", "DELETE"],
            [{}, {"target": "other"}, {"target": "nobody"}, {"manager": "1"}, {"hop": "x"}],
        ):
            with self.subTest(path=path, method=method, headers=headers):
                self.assertEqual(go(table, path, method, **headers), Local())


class FanOutTests(SynchronousTestCase):
    def test_get_on_list_paths(self) -> None:
        for path, kind in LIST_KINDS.items():
            for versioned in versions(path):
                with self.subTest(path=versioned):
                    self.assertEqual(go(cluster(), versioned), ClusterList(kind))

    def test_other_methods_are_not_fanned_out(self) -> None:
        for path, method in product(LIST_KINDS, ["POST", "HEAD", "DELETE", "PUT"]):
            with self.subTest(path=path, method=method):
                self.assertEqual(go(cluster(), path, method), Local())

    def test_on_a_worker_too(self) -> None:
        self.assertEqual(go(cluster("worker"), "/v1.41/containers/json"), ClusterList("containers"))

    def test_target_me_is_served_here(self) -> None:
        for target in ("a", "id-a", " a "):
            with self.subTest(target=target):
                self.assertEqual(go(cluster(), "/containers/json", target=target), Local())

    def test_target_other_still_fans_out(self) -> None:
        """As the reference agent does: only one's own name means "just mine"."""
        for target in ("b", "id-c", "nobody"):
            with self.subTest(target=target):
                self.assertEqual(
                    go(cluster(), "/images/json", target=target), ClusterList("images")
                )

    def test_other_paths_are_not_fanned_out(self) -> None:
        for path in NODE_PATHS:
            with self.subTest(path=path):
                self.assertNotIsInstance(go(cluster(), path), ClusterList)

    def test_manager_operation_wins(self) -> None:
        self.assertEqual(go(cluster(), "/containers/json", manager="1"), Local())
        self.assertEqual(
            go(cluster("worker"), "/containers/json", manager="1"), Forward(peer(cluster(), "b"))
        )


class ManagerTests(SynchronousTestCase):
    def test_manager_serves_manager_paths(self) -> None:
        for path in MANAGER_PATHS:
            for versioned in versions(path):
                for method in ("GET", "POST"):
                    with self.subTest(path=versioned, method=method):
                        self.assertEqual(go(cluster(), versioned, method), Local())

    def test_worker_forwards_to_the_leader(self) -> None:
        table = cluster("worker")
        leader = peer(table, "b")
        for path in MANAGER_PATHS:
            for versioned in versions(path):
                with self.subTest(path=versioned):
                    self.assertEqual(go(table, versioned, "POST"), Forward(leader))

    def test_leader_even_if_listed_last(self) -> None:
        table = make_table(
            worker("a"),
            {
                "10.0.0.2": manager("m1"),
                "10.0.0.3": manager("m2"),
                "10.0.0.4": manager("zz", leader=True),
            },
        )
        decision = go(table, "/services")
        assert isinstance(decision, Forward)
        self.assertEqual(decision.peer.name, "zz")

    def test_a_leader_that_stopped_answering_is_passed_over(self) -> None:
        """At its first failed probe, for the next manager (issue #14, item 5);
        back first once it answers."""
        table = make_table(
            worker("a"),
            {"10.0.0.2": manager("m1", leader=True), "10.0.0.3": manager("m2")},
        )
        table.failed("10.0.0.2")
        self.assertEqual(go(table, "/services"), Forward(peer(table, "m2")))
        table.seen("10.0.0.2", AGENT_PORT, manager("m1", leader=True))
        self.assertEqual(go(table, "/services"), Forward(peer(table, "m1")))

    def test_the_leader_raft_names(self) -> None:
        """A new leader, named by the node list before the identities say so."""
        table = make_table(
            worker("a"),
            {"10.0.0.2": manager("m1", leader=True), "10.0.0.3": manager("m2")},
        )
        table.follow("id-m2", frozenset({"id-m1"}))
        self.assertEqual(go(table, "/services"), Forward(peer(table, "m2")))

    def test_target_does_not_matter(self) -> None:
        """Swarm-scoped calls describe the swarm, not a node."""
        table = cluster("worker")
        self.assertEqual(go(table, "/info", target="c"), Forward(peer(table, "b")))
        self.assertEqual(go(cluster(), "/info", target="c"), Local())

    def test_manager_operation_header(self) -> None:
        """Any non-empty value moves any path to a manager, whatever the target."""
        table = cluster("worker")
        for path in ["/containers/abc/json", "/version", "/volumes", "/_ping"]:
            with self.subTest(path=path):
                self.assertEqual(
                    go(table, path, "POST", manager="1", target="c"),
                    Forward(peer(table, "b")),
                )
                self.assertEqual(go(cluster(), path, manager="true"), Local())

    def test_empty_manager_operation_header_is_no_header(self) -> None:
        self.assertEqual(go(cluster("worker"), "/version", manager=""), Local())

    def test_prefix_is_a_whole_segment(self) -> None:
        table = cluster("worker")
        for path in ["/infoX", "/servicesfoo", "/v1.41/infos", "/tasksx/1", "/swarmy"]:
            with self.subTest(path=path):
                self.assertEqual(go(table, path), Local())

    def test_no_manager(self) -> None:
        table = make_table(worker("a"), {"10.0.0.3": worker("c")})
        self.assertEqual(go(table, "/services"), NoManager())
        self.assertEqual(go(table, "/version", manager="1"), NoManager())


class TargetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.table = make_table(
            manager("a"),
            {
                "10.0.0.2": worker("b"),
                "10.0.0.3": worker("dup", "n3"),
                "10.0.0.4": worker("dup", "n4"),
            },
        )

    def test_no_target(self) -> None:
        self.assertEqual(go(self.table, "/containers/abc/logs"), Locate("containers", "abc"))
        self.assertEqual(go(self.table, "/version"), Local())

    def test_own_name_and_id(self) -> None:
        for target in ("a", "id-a"):
            with self.subTest(target=target):
                self.assertEqual(go(self.table, "/v1.41/containers/x/json", target=target), Local())

    def test_other_name_and_id(self) -> None:
        b = peer(self.table, "b")
        for target in ("b", "id-b", "  b"):
            with self.subTest(target=target):
                self.assertEqual(
                    go(self.table, "/containers/x/start", "POST", target=target), Forward(b)
                )

    def test_duplicate_name_by_id(self) -> None:
        decision = go(self.table, "/containers/x/json", target="n4")
        assert isinstance(decision, Forward)
        self.assertEqual(decision.peer.address, "10.0.0.4")

    def test_unknown(self) -> None:
        self.assertEqual(
            go(self.table, "/containers/x/json", target="zz"),
            UnknownNode("zz", ("a", "b", "dup", "dup")),
        )

    def test_ambiguous(self) -> None:
        self.assertEqual(
            go(self.table, "/containers/x/json", target="dup"),
            AmbiguousNode("dup", ("n3", "n4")),
        )

    def test_on_a_worker(self) -> None:
        table = cluster("worker")
        self.assertEqual(go(table, "/exec/e1/start", "POST", target="b"), Forward(peer(table, "b")))


class HopTests(SynchronousTestCase):
    """A request another agent forwarded is served here or refused, never sent on."""

    def test_never_forwarded_again(self) -> None:
        paths = [*LIST_KINDS, *MANAGER_PATHS, *NODE_PATHS, "/v1.41/containers/json"]
        targets = ["", "a", "id-a", "b", "id-b", "c", "nobody"]
        for role, path, method, target, op in product(
            ("manager", "worker"), paths, ("GET", "POST"), targets, ("", "1")
        ):
            with self.subTest(role=role, path=path, method=method, target=target, op=op):
                decision = go(cluster(role), path, method, target=target, manager=op, hop="id-b")
                self.assertIsInstance(decision, (Local, Misdirected))

    def test_served_when_it_is_for_me(self) -> None:
        self.assertEqual(go(cluster(), "/containers/json", target="id-a", hop="id-b"), Local())
        self.assertEqual(go(cluster(), "/services", target="id-a", hop="id-b"), Local())
        self.assertEqual(
            go(cluster("worker"), "/containers/x/json", target="id-a", hop="id-b"), Local()
        )

    def test_misdirected(self) -> None:
        cases = [
            (cluster("worker"), "/services", "id-a"),  # manager work reached a worker
            (cluster(), "/containers/json", ""),  # a fan-out copy without a target
            (cluster(), "/containers/json", "id-c"),  # a fan-out copy for someone else
            (cluster(), "/containers/x/json", "id-c"),  # a targeted call for someone else
        ]
        for table, path, target in cases:
            with self.subTest(path=path, target=target):
                self.assertIsInstance(go(table, path, target=target, hop="id-b"), Misdirected)

    def test_without_hop_the_same_requests_move_on(self) -> None:
        """The control for the tests above: the hop header alone makes the difference."""
        self.assertIsInstance(go(cluster("worker"), "/services"), Forward)
        self.assertIsInstance(go(cluster(), "/containers/json", target="id-c"), ClusterList)
        self.assertIsInstance(go(cluster(), "/containers/x/json", target="id-c"), Forward)


class EventsTests(SynchronousTestCase):
    """``GET /events`` with no target is the whole cluster's stream."""

    def test_untargeted_is_merged(self) -> None:
        for role, path in product(("manager", "worker"), versions("/events")):
            with self.subTest(role=role, path=path):
                self.assertEqual(go(cluster(role), path), MergedEvents())
                self.assertEqual(go(cluster(role), path, target="  "), MergedEvents())

    def test_targeted_is_one_node(self) -> None:
        table = cluster()
        self.assertEqual(go(table, "/events", target="a"), Local())
        self.assertEqual(go(table, "/v1.41/events", target="c"), Forward(peer(table, "c")))

    def test_forwarded_never_merged(self) -> None:
        for target in ("", "id-a"):
            with self.subTest(target=target):
                self.assertNotIsInstance(
                    go(cluster(), "/events", target=target, hop="id-b"), MergedEvents
                )

    def test_only_get_and_only_in_a_swarm(self) -> None:
        self.assertEqual(go(cluster(), "/events", "POST"), Local())
        self.assertEqual(go(cluster(), "/events/x"), Local())
        self.assertEqual(go(make_table(standalone("s")), "/events"), Local())


class LocateTests(SynchronousTestCase):
    """An untargeted request about one container or exec instance is looked up."""

    OBJECT_PATHS = [
        ("GET", "/containers/abc/json", "containers", "abc"),
        ("GET", "/containers/web/logs", "containers", "web"),
        ("POST", "/containers/abc/start", "containers", "abc"),
        ("POST", "/containers/abc/stop", "containers", "abc"),
        ("POST", "/containers/abc/attach", "containers", "abc"),
        ("POST", "/containers/abc/exec", "containers", "abc"),
        ("PUT", "/containers/abc/archive", "containers", "abc"),
        ("GET", "/containers/abc/stats", "containers", "abc"),
        ("DELETE", "/containers/abc", "containers", "abc"),
        ("GET", "/containers/create/json", "containers", "create"),
        ("GET", "/containers/abc/attach/ws", "containers", "abc"),
        ("POST", "/exec/e1/start", "exec", "e1"),
        ("POST", "/exec/e1/resize", "exec", "e1"),
        ("GET", "/exec/e1/json", "exec", "e1"),
        ("GET", "/images/abc/json", "images", "abc"),
        ("GET", "/images/busybox:latest/history", "images", "busybox:latest"),
        ("GET", "/images/reg:5000/team/app:1/json", "images", "reg:5000/team/app:1"),
        ("GET", "/images/sha256:abc/get", "images", "sha256:abc"),
        ("POST", "/images/app/tag", "images", "app"),
        ("POST", "/images/team/app/push", "images", "team/app"),
        ("DELETE", "/images/team/app:1", "images", "team/app:1"),
    ]
    OTHER_PATHS = [
        "/containers/json",
        "/containers/create",
        "/containers/prune",
        "/containers",
        "/containers/",
        "/exec",
        "/images/json",
        "/images/create",
        "/images/load",
        "/images/search",
        "/images/prune",
        "/images/get",
        "/images/abc",
        "/volumes/abc",
        "/version",
    ]

    def test_object_paths(self) -> None:
        for (method, path, kind, ident), version in product(self.OBJECT_PATHS, ("", "/v1.41")):
            with self.subTest(path=version + path, method=method):
                self.assertEqual(go(cluster(), version + path, method), Locate(kind, ident))
                self.assertEqual(go(cluster("worker"), version + path, method), Locate(kind, ident))

    def test_other_paths(self) -> None:
        for path, method in product(self.OTHER_PATHS, ("GET", "POST")):
            with self.subTest(path=path, method=method):
                self.assertNotIsInstance(go(cluster(), path, method), Locate)
                self.assertIsNone(single_object(path, method))

    def test_target_decides(self) -> None:
        table = cluster()
        self.assertEqual(go(table, "/containers/abc/json", target="a"), Local())
        self.assertEqual(go(table, "/containers/abc/json", target="c"), Forward(peer(table, "c")))

    def test_forwarded_is_never_looked_up(self) -> None:
        self.assertEqual(go(cluster(), "/containers/abc/json", hop="id-b"), Local())
        self.assertEqual(go(cluster(), "/exec/e1/start", "POST", hop="id-b"), Local())

    def test_alone_in_the_table(self) -> None:
        """With no other agent known, there is no one to ask."""
        self.assertEqual(go(make_table(manager("a")), "/containers/abc/json"), Local())

    def test_manager_operation_wins(self) -> None:
        self.assertEqual(go(cluster(), "/containers/abc/json", manager="1"), Local())


class SwarmNetworkTests(SynchronousTestCase):
    """Overlay networks are a manager's: created there, and found there when no
    header says where (the docker CLI's `stack deploy` and `stack rm`)."""

    def test_overlay_create_goes_to_a_manager(self) -> None:
        table = cluster("worker")
        for body in (b'{"Name":"n","Driver":"overlay"}', b'{"Name":"n","Scope":"swarm"}'):
            with self.subTest(body=body):
                self.assertTrue(creates_swarm_network("POST", "/networks/create", body))
                decision = route("POST", "/v1.41/networks/create", {}, table, for_manager=True)
                self.assertEqual(decision, Forward(peer(table, "b")))

    def test_other_creates_stay(self) -> None:
        for method, bare, body in [
            ("POST", "/networks/create", b'{"Name":"n","Driver":"bridge"}'),
            ("POST", "/networks/create", b'{"Name":"n"}'),
            ("POST", "/networks/create", b"not json"),
            ("POST", "/networks/create", b'["overlay"]'),
            ("POST", "/volumes/create", b'{"Driver":"overlay"}'),
            ("GET", "/networks/create", b'{"Driver":"overlay"}'),
        ]:
            with self.subTest(body=body, bare=bare):
                self.assertFalse(creates_swarm_network(method, bare, body))

    def test_untargeted_network_on_a_worker_is_looked_up(self) -> None:
        for method in ("GET", "DELETE"):
            with self.subTest(method=method):
                self.assertEqual(
                    go(cluster("worker"), "/v1.41/networks/web_net", method),
                    Locate("networks", "web_net"),
                )

    def test_network_stays_put_otherwise(self) -> None:
        """A manager knows every swarm network; a target or a hop decides; other
        network paths are not one network's."""
        self.assertEqual(go(cluster(), "/networks/web_net", "DELETE"), Local())
        self.assertEqual(go(cluster("worker"), "/networks/n", target="a"), Local())
        self.assertEqual(go(cluster("worker"), "/networks/n", hop="id-b"), Local())
        for path, method in [
            ("/networks/create", "POST"),
            ("/networks/prune", "POST"),
            ("/networks/n/connect", "POST"),
            ("/networks/n", "POST"),
        ]:
            with self.subTest(path=path):
                self.assertNotIsInstance(go(cluster("worker"), path, method), Locate)
        self.assertIsNone(swarm_network("/networks/prune", "DELETE"))

    def test_about_names_the_object(self) -> None:
        """A browse request names its volume in the query."""
        table = cluster("worker")
        decision = route("GET", "/v2/browse/ls", {}, table, about=("volumes", "data"))
        self.assertEqual(decision, Locate("volumes", "data"))
        targeted = route("GET", "/v2/browse/ls", {TARGET: "c"}, table, about=("volumes", "data"))
        self.assertEqual(targeted, Forward(peer(table, "c")))


def filters(doc: str, extra: str = "") -> str:
    return extra + urlencode({"filters": doc})


class NodeFilterTests(SynchronousTestCase):
    def test_only_the_named_nodes(self) -> None:
        table = cluster()
        for path, kind in LIST_KINDS.items():
            with self.subTest(path=path):
                decision = route(
                    "GET", path, {}, table, query=filters('{"node":["c"],"status":["running"]}')
                )
                self.assertEqual(
                    decision,
                    ClusterList(
                        kind,
                        (peer(table, "c"),),
                        (),
                        urlencode({"filters": '{"status":["running"]}'}),
                    ),
                )

    def test_by_name_or_id_each_once(self) -> None:
        table = cluster()
        decision = route("GET", "/containers/json", {}, table, query=filters(
            '{"node":{"id-b":true,"a":true,"b":true}}', "all=1&"
        ))  # fmt: skip
        self.assertEqual(
            decision, ClusterList("containers", (peer(table, "b"), table.me), (), "all=1")
        )

    def test_unknown_node(self) -> None:
        decision = route("GET", "/images/json", {}, cluster(), query=filters('{"node":["zz"]}'))
        self.assertEqual(decision, UnknownNode("zz", ("a", "b", "c")))

    def test_ambiguous_node(self) -> None:
        table = make_table(
            manager("a"), {"10.0.0.4": worker("dup", "n4"), "10.0.0.5": worker("dup", "n5")}
        )
        decision = route("GET", "/networks", {}, table, query=filters('{"node":["dup"]}'))
        self.assertEqual(decision, AmbiguousNode("dup", ("n4", "n5")))

    def test_named_node_without_an_agent(self) -> None:
        table = cluster()
        table.expect({"id-a": "a", "id-b": "b", "id-c": "c", "id-z": "z"})
        decision = route("GET", "/volumes", {}, table, query=filters('{"node":["c","id-z"]}'))
        self.assertEqual(decision, ClusterList("volumes", (peer(table, "c"),), ("z",), ""))

    def test_empty_node_filter_is_every_node(self) -> None:
        table = cluster()
        decision = route("GET", "/volumes", {}, table, query=filters('{"node":[]}'))
        self.assertEqual(decision, ClusterList("volumes", tuple(table.nodes()), (), ""))

    def test_unreadable_filters_go_to_the_engines(self) -> None:
        for doc in ['{"node":', '{"node":"c"}', "[1]"]:
            with self.subTest(doc=doc):
                decision = route("GET", "/containers/json", {}, cluster(), query=filters(doc))
                self.assertEqual(decision, ClusterList("containers"))

    def test_not_on_one_node(self) -> None:
        """With this node's target the list is this node's: the engine judges the filter."""
        decision = route(
            "GET", "/containers/json", {TARGET: "a"}, cluster(), query=filters('{"node":["c"]}')
        )
        self.assertEqual(decision, Local())


class DiskUsageTests(SynchronousTestCase):
    def test_untargeted_is_the_cluster(self) -> None:
        for path in versions("/system/df"):
            with self.subTest(path=path):
                self.assertEqual(go(cluster("worker"), path), ClusterDF())

    def test_targeted_is_one_node(self) -> None:
        table = cluster()
        self.assertEqual(go(table, "/system/df", target="a"), Local())
        self.assertEqual(go(table, "/system/df", target="c"), Forward(peer(table, "c")))
        self.assertEqual(go(table, "/system/df", target="c", hop="id-b"), Misdirected(
            "a was sent a request for 'c'"
        ))  # fmt: skip

    def test_only_get(self) -> None:
        self.assertEqual(go(cluster(), "/system/df", "POST"), Local())


ALLOWED = [
    ("/images/load", LOAD),
    ("/images/create", PULL),
    ("/images/busybox:latest/tag", TAG),
    ("/images/registry:5000/team/app:1/tag", TAG),
    ("/containers/prune", PRUNE),
    ("/images/prune", PRUNE),
    ("/volumes/prune", PRUNE),
    ("/networks/prune", PRUNE),
    ("/build/prune", PRUNE),
]
REFUSED = [
    ("POST", "/containers/create"),
    ("POST", "/containers/abc/start"),
    ("DELETE", "/images/busybox"),
    ("GET", "/images/json"),
    ("GET", "/images/load"),
    ("POST", "/images/busybox/push"),
    ("POST", "/images/busybox/tag/x"),
    ("POST", "/volumes/create"),
    ("POST", "/swarm/init"),
    ("POST", "/build"),
    ("GET", "/containers/prune"),
    ("POST", "/system/prune"),
]


def broadcast(table: PeerTable, method: str, path: str, value: str, **more: str) -> Route:
    headers = {BROADCAST: value, **{HOP if k == "hop" else TARGET: v for k, v in more.items()}}
    return route(method, path, headers, table)


class BroadcastTests(SynchronousTestCase):
    def test_allowed_operations_to_every_node(self) -> None:
        table = cluster("worker")
        for (_path, op), versioned in [(a, v) for a in ALLOWED for v in versions(a[0])]:
            with self.subTest(path=versioned):
                self.assertEqual(
                    broadcast(table, "POST", versioned, "all"),
                    Broadcast(op, tuple(table.nodes())),
                )

    def test_listed_nodes(self) -> None:
        table = cluster()
        self.assertEqual(
            broadcast(table, "POST", "/images/load", " c, id-b ,c,"),
            Broadcast(LOAD, (peer(table, "c"), peer(table, "b"))),
        )

    def test_target_does_not_matter(self) -> None:
        table = cluster()
        self.assertEqual(
            broadcast(table, "POST", "/images/prune", "all", target="c"),
            Broadcast(PRUNE, tuple(table.nodes())),
        )

    def test_nodes_without_an_agent(self) -> None:
        table = cluster()
        table.expect({"id-a": "a", "id-b": "b", "id-c": "c", "id-z": "z"})
        self.assertEqual(
            broadcast(table, "POST", "/images/load", "all"),
            Broadcast(LOAD, tuple(table.nodes()), ("z",)),
        )
        self.assertEqual(broadcast(table, "POST", "/images/load", "z"), Broadcast(LOAD, (), ("z",)))

    def test_other_requests_refused(self) -> None:
        for method, path in REFUSED:
            with self.subTest(method=method, path=path):
                decision = broadcast(cluster(), method, path, "all")
                self.assertIsInstance(decision, BadBroadcast)
                assert isinstance(decision, BadBroadcast)
                self.assertIn(f"{method} {path} cannot be sent to several nodes", decision.why)

    def test_bad_values(self) -> None:
        for value in ["", " , ", "all,b"]:
            with self.subTest(value=value):
                self.assertIsInstance(
                    broadcast(cluster(), "POST", "/images/load", value), BadBroadcast
                )

    def test_unknown_node(self) -> None:
        self.assertEqual(
            broadcast(cluster(), "POST", "/images/load", "b,zz"),
            UnknownNode("zz", ("a", "b", "c")),
        )

    def test_outside_a_swarm(self) -> None:
        table = make_table(standalone("solo"))
        self.assertEqual(
            broadcast(table, "POST", "/images/load", "all"), Broadcast(LOAD, (table.me,))
        )
        self.assertIsInstance(broadcast(table, "POST", "/build", "all"), BadBroadcast)

    def test_the_clis_ping_is_answered(self) -> None:
        for method in ("HEAD", "GET"):
            with self.subTest(method=method):
                self.assertEqual(broadcast(cluster(), method, "/_ping", "all"), Local())

    def test_a_forwarded_copy_is_not_broadcast_again(self) -> None:
        self.assertEqual(
            broadcast(cluster(), "POST", "/images/load", "all", target="a", hop="id-b"), Local()
        )
