"""Who this node is, which agents it knows, and how to find one of them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

MANAGER = "manager"
WORKER = "worker"


@dataclass(frozen=True)
class NodeIdentity:
    """A node as its engine describes it."""

    name: str
    node_id: str = ""
    role: str = MANAGER
    leader: bool = False
    engine_version: str = ""
    #: The agent's version, as its identity document says (not part of what the node is).
    agent_version: str = field(default="", compare=False)

    @property
    def swarm(self) -> bool:
        """True when the engine is part of a swarm."""
        return bool(self.node_id)

    @property
    def key(self) -> str:
        """A unique name: the swarm node ID, or the hostname outside a swarm."""
        return self.node_id or self.name

    def to_json(self) -> dict[str, object]:
        """The agent-to-agent identity document."""
        return {
            "NodeName": self.name,
            "NodeID": self.node_id,
            "NodeRole": self.role,
            "Leader": self.leader,
            "EngineVersion": self.engine_version,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> NodeIdentity:
        """Read an identity document; raise ValueError if it is not one."""
        try:
            name, node_id, role = doc["NodeName"], doc["NodeID"], doc["NodeRole"]
        except (KeyError, TypeError):
            raise ValueError("not an identity document") from None
        if not isinstance(name, str) or not name or not isinstance(node_id, str):
            raise ValueError("identity document without a node name")
        if role not in (MANAGER, WORKER):
            raise ValueError(f"unknown node role {role!r}")
        return cls(
            name=name,
            node_id=node_id,
            role=role,
            leader=bool(doc.get("Leader", False)),
            engine_version=str(doc.get("EngineVersion", "")),
            agent_version=str(doc.get("AgentVersion", "")),
        )


@dataclass(frozen=True)
class Peer:
    """An agent reachable at an address, and the node it serves."""

    address: str
    port: int
    identity: NodeIdentity
    failures: int = 0
    is_self: bool = False

    @property
    def name(self) -> str:
        """The node's name, as Portainer shows it."""
        return self.identity.name


@dataclass(frozen=True)
class Ambiguous:
    """A node name that more than one node answers to."""

    name: str
    node_ids: tuple[str, ...]


@dataclass
class PeerTable:
    """The agents of the cluster as last seen, this one included.

    Peers are keyed by address: DNS gives addresses, and an agent's address
    is what a request is sent to. ``me`` is this node, always present.
    Watchers are told when a node joins, leaves or changes.
    """

    me: Peer
    max_failures: int = 3
    _peers: dict[str, Peer] = field(default_factory=dict)
    #: The swarm's nodes that should have an agent: node ID → hostname.
    _expected: dict[str, str] = field(default_factory=dict)
    #: Raft's leader ("" unknown) and unreachable managers, by node ID, as the
    #: last node list said.
    _leader: str = ""
    _unreachable: frozenset[str] = field(default_factory=frozenset)
    _watchers: list[Callable[[], object]] = field(default_factory=list, repr=False, compare=False)

    def watch(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` (no arguments) after each join, leave or change."""
        self._watchers.append(callback)

    def unwatch(self, callback: Callable[[], object]) -> None:
        """Stop calling ``callback``; nothing happens if it was not watching."""
        if callback in self._watchers:
            self._watchers.remove(callback)

    def _changed(self) -> None:
        for callback in list(self._watchers):
            callback()

    def set_me(self, identity: NodeIdentity, address: str | None = None) -> None:
        """Record this node's identity, re-read from its engine."""
        old = self.me
        self.me = replace(self.me, identity=identity, address=address or self.me.address)
        self._hear_leadership(old.identity, identity)
        if self.me != old:
            self._changed()

    def seen(self, address: str, port: int, identity: NodeIdentity) -> str | None:
        """Record a successful probe; return "join" or "change" when news."""
        if identity.key == self.me.identity.key:
            old_me = self.me
            stale = self._peers.pop(address, None)
            if address != self.me.address:
                self.me = replace(self.me, address=address, port=port)
            if stale is not None or self.me != old_me:
                self._changed()
            return None
        old = self._peers.get(address)
        self._peers[address] = Peer(address, port, identity)
        if old is not None:
            self._hear_leadership(old.identity, identity)
        if old is None or (old.identity, old.port) != (identity, port):
            self._changed()
        if old is None:
            return "join"
        return "change" if old.identity != identity else None

    def failed(self, address: str) -> Peer | None:
        """Count a failed probe; return the peer if this one removed it."""
        old = self._peers.get(address)
        if old is None:
            return None
        if old.failures + 1 >= self.max_failures:
            del self._peers[address]
            self._changed()
            return old
        self._peers[address] = replace(old, failures=old.failures + 1)
        return None

    def retain(self, addresses: Iterable[str]) -> list[Peer]:
        """Drop the peers whose address is not among ``addresses``; return them."""
        keep = set(addresses)
        gone = [p for a, p in self._peers.items() if a not in keep]
        for peer in gone:
            del self._peers[peer.address]
        if gone:
            self._changed()
        return gone

    def nodes(self) -> list[Peer]:
        """This node then the others, one entry per node (the newest if an
        agent was replaced and its old address has not expired yet)."""
        by_node: dict[str, Peer] = {}
        for peer in self._peers.values():
            current = by_node.get(peer.identity.key)
            if current is None or peer.failures < current.failures:
                by_node[peer.identity.key] = peer
        by_node.pop(self.me.identity.key, None)
        return [self.me, *sorted(by_node.values(), key=lambda p: (p.name, p.identity.key))]

    def find(self, target: str) -> Peer | Ambiguous | None:
        """The node a target header names: by node ID first, then by name."""
        nodes = self.nodes()
        for peer in nodes:
            if peer.identity.node_id and peer.identity.node_id == target:
                return peer
        named = [p for p in nodes if p.name == target]
        if len(named) == 1:
            return named[0]
        if named:
            return Ambiguous(target, tuple(p.identity.node_id for p in named))
        return None

    def expect(self, nodes: Mapping[str, str]) -> bool:
        """Record the swarm's nodes that should each run an agent (node ID →
        hostname; drained nodes left out); return True if the set changed."""
        new = dict(nodes)
        if new == self._expected:
            return False
        self._expected = new
        return True

    @property
    def expected(self) -> Mapping[str, str]:
        """The swarm's nodes that should each run an agent, as last recorded."""
        return dict(self._expected)

    def agentless(self) -> list[tuple[str, str]]:
        """The expected nodes with no agent in the table, as (node ID,
        hostname) sorted by hostname; none outside a swarm."""
        if not self.me.identity.swarm:
            return []
        present = {p.identity.node_id for p in self.nodes()}
        found = [(i, h) for i, h in self._expected.items() if i not in present]
        return sorted(found, key=lambda n: (n[1], n[0]))

    def follow(self, leader: str, unreachable: frozenset[str]) -> None:
        """Record Raft's view from a manager engine's node list: the leader's
        node ID ("" if none) and the managers it cannot reach."""
        self._leader, self._unreachable = leader, unreachable

    def _hear_leadership(self, old: NodeIdentity, new: NodeIdentity) -> None:
        # A manager's identity that just changed its leadership was read from
        # its engine after the last node list when no list could be read since
        # (an election holds every manager's list): without this, the old
        # leader, back and still electing, stays first. The next list read
        # overrides it. A join says nothing new: its identity may be stale.
        if new.role != MANAGER or old.leader == new.leader or old.node_id != new.node_id:
            return
        if new.leader:
            self._leader = new.node_id
        elif self._leader == new.node_id:
            self._leader = ""

    def managers(self) -> list[Peer]:
        """The managers with an agent: those answering first, the leader first among them.

        A manager whose last probe failed, or that Raft cannot reach, comes
        after the others at once (not once its probes have all failed). The
        leader is the one Raft last named, which the managers' own identities
        only say a refresh or two later, or a manager whose identity changed
        to leader since (when no list could be read, as in an election); else
        the one whose identity says so.
        """
        found = [p for p in self.nodes() if p.identity.role == MANAGER and p.identity.swarm]

        def order(p: Peer) -> tuple[bool, bool, int]:
            down = p.failures > 0 or p.identity.node_id in self._unreachable
            leads = p.identity.node_id == self._leader if self._leader else p.identity.leader
            return (down, not leads, p.failures)

        return sorted(found, key=order)
