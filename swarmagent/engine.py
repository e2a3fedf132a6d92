"""The local Docker engine, asked for what the agent needs to know about its node."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from treq.client import HTTPClient
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IAgent

from swarmagent.clients import ENGINE_BASE
from swarmagent.peers import MANAGER, WORKER, NodeIdentity

SERVICE_LABEL = "com.docker.swarm.service.name"
#: The swarm's node list, on a manager's engine (or through its agent).
NODES_PATH = "/nodes"
DRAIN = "drain"


class EngineError(Exception):
    """The engine could not be reached or answered with an error."""


def expected_nodes(doc: object) -> dict[str, str]:
    """Node ID → hostname of the nodes in a ``GET /nodes`` answer that should
    run an agent: every node but the drained ones (whose tasks, the agent's
    included, are moved off on purpose). Raise ValueError if it is not a list."""
    if not isinstance(doc, list):
        raise ValueError("node list is not a list")
    found: dict[str, str] = {}
    for node in doc:
        if not isinstance(node, dict):
            continue
        node_id = node.get("ID")
        if not isinstance(node_id, str) or not node_id:
            continue
        if (node.get("Spec") or {}).get("Availability") == DRAIN:
            continue
        hostname = (node.get("Description") or {}).get("Hostname")
        found[node_id] = hostname if isinstance(hostname, str) and hostname else node_id
    return found


@dataclass(frozen=True)
class SwarmNodes:
    """What the agents take from a ``GET /nodes`` answer."""

    #: The nodes that should run an agent (see :func:`expected_nodes`).
    expected: dict[str, str]
    #: The leader's node ID as Raft names it ("" if none does).
    leader: str = ""
    #: The managers Raft cannot reach, by node ID.
    unreachable: frozenset[str] = field(default_factory=frozenset)


def read_nodes(doc: object) -> SwarmNodes:
    """A ``GET /nodes`` answer's expected nodes and Raft's view of the
    managers; raise ValueError if it is not a list."""
    expected = expected_nodes(doc)
    assert isinstance(doc, list)  # expected_nodes checked it
    leader = ""
    unreachable: set[str] = set()
    for node in doc:
        status = node.get("ManagerStatus") if isinstance(node, dict) else None
        node_id = node.get("ID") if isinstance(node, dict) else None
        if not isinstance(status, dict) or not isinstance(node_id, str) or not node_id:
            continue
        if status.get("Leader") is True:
            leader = node_id
        if status.get("Reachability") == "unreachable":
            unreachable.add(node_id)
    return SwarmNodes(expected, leader, frozenset(unreachable))


class Engine:
    """JSON calls to the local engine, each with a deadline."""

    def __init__(self, client: IAgent, clock: IReactorTime, timeout: float) -> None:
        self._http = HTTPClient(client)
        self._clock = clock
        self._timeout = timeout

    async def get_json(self, path: str) -> Any:
        """GET ``path`` from the engine and decode its JSON answer."""
        d = self._http.get(ENGINE_BASE + path.encode("ascii"))
        d.addTimeout(self._timeout, self._clock)
        try:
            response = await d
            body = await response.content()
        except Exception as e:
            raise EngineError(f"engine unreachable: {e}") from e
        if response.code != 200:
            raise EngineError(f"engine answered {response.code} to {path}: {body[:200]!r}")
        try:
            return json.loads(body)
        except ValueError as e:
            raise EngineError(f"engine sent bad JSON for {path}") from e

    async def identity(self) -> NodeIdentity:
        """This node's name, swarm node ID, role and leadership, read now."""
        info = await self.get_json("/info")
        swarm = info.get("Swarm") or {}
        node_id = swarm.get("NodeID") or ""
        if swarm.get("LocalNodeState") != "active":
            node_id = ""
        manager = bool(swarm.get("ControlAvailable"))
        leader = False
        if node_id and manager:
            node = await self.get_json(f"/nodes/{quote(node_id)}")
            leader = bool((node.get("ManagerStatus") or {}).get("Leader"))
        return NodeIdentity(
            name=str(info.get("Name", "")),
            node_id=node_id,
            role=MANAGER if manager or not node_id else WORKER,
            leader=leader,
            engine_version=str(info.get("ServerVersion", "")),
        )

    async def swarm_nodes(self) -> SwarmNodes:
        """The swarm's nodes that should run an agent and Raft's view of the
        managers (see :func:`read_nodes`); only a manager's engine can answer."""
        doc = await self.get_json(NODES_PATH)
        try:
            return read_nodes(doc)
        except ValueError as e:
            raise EngineError(f"engine sent a bad node list: {e}") from e

    async def service_tasks(self, service: str) -> dict[str, tuple[str, str]]:
        """Node ID → (state, error) of the newest task of ``service`` on each
        node (``GET /tasks``, a manager's engine only)."""
        query = quote(json.dumps({"service": [service]}), safe="")
        doc = await self.get_json(f"/tasks?filters={query}")
        newest: dict[str, tuple[str, str, str]] = {}
        for task in doc if isinstance(doc, list) else []:
            node = task.get("NodeID") if isinstance(task, dict) else None
            if not isinstance(node, str) or not node:
                continue
            status = task.get("Status") or {}
            when = str(status.get("Timestamp") or task.get("UpdatedAt") or "")
            if node not in newest or when > newest[node][0]:
                newest[node] = (when, str(status.get("State", "")), str(status.get("Err", "")))
        return {node: (state, err) for node, (_, state, err) in newest.items()}

    async def service_name(self, container: str) -> str | None:
        """The swarm service a container belongs to, from its label."""
        doc = await self.get_json(f"/containers/{quote(container, safe='')}/json")
        labels = (doc.get("Config") or {}).get("Labels") or {}
        name = labels.get(SERVICE_LABEL)
        return name if isinstance(name, str) and name else None
