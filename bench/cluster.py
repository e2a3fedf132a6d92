"""The lab (tests/lab.py) seen from the bench: targets, agents, containers."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.client import Target, fetch
from tests.lab import AGENT_PORT, IMAGE, Agent, Lab, Node, wait_until

#: The agent settings the lab gives every agent (Lab.agent_env), stated in the results.
LAB_AGENT_SETTINGS = {
    "AGENT_REFRESH_INTERVAL": "1",
    "AGENT_FANOUT_TIMEOUT": "3",
    "AGENT_PROBE_FAILURES": "3 (default)",
    "AGENT_CONNECT_TIMEOUT": "5 (default)",
    "TLS": "agent certificate and client certificate from the lab CA",
}


def engine_target(node: Node, headers: tuple[tuple[str, str], ...] = ()) -> Target:
    """The node's engine, directly on its unix socket."""
    return Target("engine", unix=node.socket, headers=headers)


def agent_target(lab: Lab, agent: Agent, headers: tuple[tuple[str, str], ...] = ()) -> Target:
    """The agent, over HTTPS with the lab's client certificate."""
    return Target("agent", host=agent.node.ip, port=AGENT_PORT, tls=str(lab.tls), headers=headers)


def agent_pid(agent: Agent) -> int:
    """PID of the agent's Python process (the lab execs through sh and nsenter)."""
    pid = agent.proc.pid
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    if not comm.startswith("python"):
        raise RuntimeError(f"agent pid {pid} is {comm!r}, not python")
    return pid


def agent_names(lab: Lab, agent: Agent) -> set[str]:
    """Node names in the agent's ``/agents``."""
    status, body = fetch(agent_target(lab, agent), "/agents", 5)
    if status != 200:
        raise RuntimeError(f"/agents answered {status}")
    return {a["NodeName"] for a in json.loads(body)}


def wait_members(lab: Lab, agent: Agent, names: set[str], timeout: float = 30) -> None:
    """Wait until ``agent`` knows exactly the nodes ``names``."""
    wait_until(lambda: agent_names(lab, agent) == names, timeout, 0.1, f"agents {names}")


def start_agents(lab: Lab, nodes: list[Node]) -> list[Agent]:
    """An agent on each node, all answering."""
    agents = [lab.start_agent(n) for n in nodes]
    for a in agents:
        a.wait_ready(30)
    return agents


def ensure_containers(node: Node, count: int, prefix: str = "bench") -> list[str]:
    """Top the node up to ``count`` created (not started) containers; their IDs."""
    client = node.docker(timeout=120)
    try:
        have = [c["Id"] for c in client.api.containers(all=True, filters={"label": "bench"})]
        for _ in range(count - len(have)):
            c = client.api.create_container(IMAGE, ["sleep", "3600"], labels={"bench": prefix})
            have.append(c["Id"])
        return have[:count]
    finally:
        client.close()


def fill(nodes: list[Node], count: int) -> float:
    """Top every node up to ``count`` containers, one thread per node; seconds taken."""
    t0 = time.monotonic()
    with ThreadPoolExecutor(max(1, len(nodes))) as pool:
        list(pool.map(lambda n: ensure_containers(n, count), nodes))
    return time.monotonic() - t0
