"""Part 5: seconds for an agent to join another agent's ``/agents``, and to leave it."""

from __future__ import annotations

import time
from typing import Any

from bench.cluster import LAB_AGENT_SETTINGS, agent_names
from bench.measure import spread
from tests.lab import Agent, Lab, Node

POLL = 0.05
LIMIT = 60.0


def _until(cond: Any, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > LIMIT:
            raise TimeoutError(f"{what} not seen within {LIMIT} s")
        time.sleep(POLL)
    return time.monotonic() - t0


def run_discovery(
    lab: Lab, observer: Agent, node: Node, repetitions: int, log: Any
) -> dict[str, Any]:
    """Start an agent on ``node`` (already in DNS), time its join; SIGKILL it, time its leave."""
    joins: list[float] = []
    leaves: list[float] = []

    def listed() -> bool:
        try:
            return node.name in agent_names(lab, observer)
        except (OSError, RuntimeError):
            return False

    for _ in range(repetitions):
        _until(lambda: not listed(), "an earlier agent's leave")
        agent = lab.start_agent(node)
        joins.append(_until(listed, "join"))
        agent.kill()
        leaves.append(_until(lambda: not listed(), "leave"))
        lab.agents.remove(agent)
        log(f"  join {joins[-1]:.2f} s, leave {leaves[-1]:.2f} s")
    return {
        "join_s": spread(joins, 2),
        "leave_s": spread(leaves, 2),
        "settings": LAB_AGENT_SETTINGS,
        "note": "join: from starting the agent process (python + twistd start-up included) "
        "to it being listed; leave: from SIGKILL to it being gone",
    }
