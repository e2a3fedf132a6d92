"""``GET /swarmagent/status``: this agent, its peers, the nodes with no agent and why."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from swarmagent import __version__
from swarmagent.config import LOG_LEVELS, SETTINGS, EngineAddress
from swarmagent.discovery import Discovery, ProbeRecord
from swarmagent.nodes import iso_seconds
from swarmagent.peers import Peer

#: Settings never shown, only whether they are set.
SECRET_SETTINGS = frozenset({"secret"})
#: Task states after which a task no longer runs.
_ENDED = frozenset({"failed", "rejected", "orphaned", "shutdown", "complete", "remove"})


def _when(seconds: float | None) -> str | None:
    return None if seconds is None else iso_seconds(seconds)


def _setting(value: Any) -> Any:
    if isinstance(value, EngineAddress):
        if value.scheme == "unix":
            return f"unix://{value.path}"
        return f"tcp://{value.host}:{value.port}"
    if any(value is level for level in LOG_LEVELS.values()):
        return value.name.upper()
    return value


def settings_in_force(options: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting by flag, as validated; secrets only as set or not."""
    out: dict[str, Any] = {}
    for s in SETTINGS:
        value = options.get(s.flag)
        out[s.flag] = ("set" if value else "") if s.flag in SECRET_SETTINGS else _setting(value)
    return out


def why_agentless(
    node_id: str,
    name: str,
    tasks: Mapping[str, tuple[str, str]] | None,
    probes: Mapping[str, ProbeRecord],
) -> str:
    """Why a swarm node expected to run an agent has none in the table."""
    seen = next((r for r in probes.values() if r.node == name and r.failures), None)
    unreachable = f"unreachable: {seen.last_error}" if seen is not None else ""
    if tasks is not None:
        task = tasks.get(node_id)
        if task is None:
            return "no task scheduled"
        state, err = task
        if state in _ENDED:
            return f"task failing: {state}" + (f": {err}" if err else "")
        if state == "running":
            return unreachable or "task running, agent unreachable"
        return f"task {state}"
    return unreachable or "no agent reachable"


def _peer(peer: Peer | None, address: str, record: ProbeRecord | None) -> dict[str, Any]:
    return {
        "Name": peer.name if peer else (record.node if record else ""),
        "NodeID": peer.identity.node_id if peer else "",
        "Role": peer.identity.role if peer else "",
        "Address": address,
        "Port": peer.port if peer else None,
        "AgentVersion": peer.identity.agent_version if peer else "",
        "InTable": peer is not None,
        "LastProbe": _when(record.last_ok) if record else None,
        "ConsecutiveFailures": record.failures if record else 0,
        "ProbeRTT": record.rtt if record else None,
        "LastError": record.last_error if record else "",
        "LastErrorAt": _when(record.last_error_at) if record else None,
    }


def status_document(discovery: Discovery, options: Mapping[str, Any]) -> dict[str, Any]:
    """The whole status document."""
    table = discovery.table
    me = table.me
    peers = [p for p in table.nodes() if not p.is_self]
    probes = discovery.probes
    listed = {p.address for p in peers}
    rows = [_peer(p, p.address, probes.get(p.address)) for p in peers]
    rows += [
        _peer(None, a, r) for a, r in sorted(probes.items()) if a not in listed and a != me.address
    ]
    with_agent = {p.identity.node_id for p in table.nodes()}
    expected = [
        {
            "NodeID": node_id,
            "Name": name,
            "HasAgent": node_id in with_agent,
            "Why": ""
            if node_id in with_agent
            else why_agentless(node_id, name, discovery.tasks, probes),
        }
        for node_id, name in sorted(table.expected.items(), key=lambda n: (n[1], n[0]))
    ]
    silences = discovery.nodes.silences() if discovery.nodes is not None else {}
    silent = [
        {"Name": s.name, "NodeID": key, "Since": _when(s.since), "Why": s.why}
        for key, s in sorted(silences.items(), key=lambda k: (k[1].name, k[0]))
    ]
    return {
        "Node": {
            "Name": me.name,
            "NodeID": me.identity.node_id,
            "Role": me.identity.role,
            "Leader": me.identity.leader,
            "Address": me.address,
            "Port": me.port,
            "AgentVersion": __version__,
            "EngineVersion": me.identity.engine_version,
            "ClusterAddr": discovery.name,
        },
        "Peers": rows,
        "Expected": expected,
        "Silent": silent,
        "Settings": settings_in_force(options),
    }


class StatusResource(Resource):
    """Serves :func:`status_document` as JSON."""

    isLeaf = True

    def __init__(self, discovery: Discovery, options: Mapping[str, Any]) -> None:
        super().__init__()
        self._discovery = discovery
        self._options = options

    def render_GET(self, request: Request) -> bytes:
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        doc = status_document(self._discovery, self._options)
        return json.dumps(doc, indent=1).encode("utf-8")
