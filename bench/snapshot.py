"""Portainer's snapshot through one agent: list every container, then inspect each running one.

``SALAB_ID=7 python -m bench.snapshot [--nodes 3] [--running 20] [--rounds 5] [--src DIR ...]``

For each agent source tree given (default: this one), agents from it are
started on every node of one lab, and each round times, interleaved:

- *untargeted*: the list, then every inspect without a target header (the
  agent locates each container);
- *targeted*: the same with ``X-PortainerAgent-Target`` set to the node the
  list named, as a client that kept the list's tags would.

Prints the medians (ms) and the ratio untargeted / targeted for each tree.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import profile
from bench.client import get
from bench.cluster import agent_pid, agent_target, start_agents, wait_members
from tests.lab import IMAGE, Lab, Node

LIST = "/containers/json?all=1"


def run_containers(node: Node, count: int) -> None:
    client = node.docker(timeout=120)
    try:
        for _ in range(count):
            c = client.api.create_container(IMAGE, ["sleep", "3600"], labels={"bench": "snapshot"})
            client.api.start(c["Id"])
    finally:
        client.close()


def snapshot(conn: Any, targeted: bool) -> tuple[float, int]:
    """One snapshot on ``conn``: seconds taken, inspects made."""
    t0 = time.perf_counter()
    conn.request("GET", LIST)
    response = conn.getresponse()
    items = json.loads(response.read())
    if response.status != 200:
        raise RuntimeError(f"list answered {response.status}")
    running = [i for i in items if i.get("State") == "running"]
    for item in running:
        headers = {}
        if targeted:
            headers["X-PortainerAgent-Target"] = item["Portainer"]["Agent"]["NodeName"]
        status, _ = get(conn, f"/containers/{item['Id']}/json", headers)
        if status != 200:
            raise RuntimeError(f"inspect answered {status}")
    return time.perf_counter() - t0, len(running)


def time_snapshots(conn: Any, rounds: int) -> dict[str, Any]:
    """``rounds`` of (untargeted, targeted) snapshots on ``conn``, interleaved; medians."""
    times: dict[str, list[float]] = {"untargeted": [], "targeted": []}
    inspects = 0
    snapshot(conn, True)  # warm the connections up
    for _ in range(rounds):
        for kind in ("untargeted", "targeted"):
            seconds, inspects = snapshot(conn, kind == "targeted")
            times[kind].append(seconds * 1000)
    med = {k: round(statistics.median(v), 1) for k, v in times.items()}
    return {
        "inspects": inspects,
        "ms": med,
        "spread_ms": {k: [round(min(v), 1), round(max(v), 1)] for k, v in times.items()},
        "untargeted/targeted": round(med["untargeted"] / med["targeted"], 2),
    }


def measure(lab: Lab, src: str, rounds: int) -> dict[str, Any]:
    agents = start_agents(lab, lab.nodes) if not src else []
    if src:
        agents = [lab.start_agent(n, PYTHONPATH=src) for n in lab.nodes]
        for a in agents:
            a.wait_ready(30)
    try:
        wait_members(lab, agents[0], {n.name for n in lab.nodes})
        conn = agent_target(lab, agents[0]).connect(60)
        result = time_snapshots(conn, rounds)
        conn.close()
    finally:
        for a in agents:
            a.stop()
    return {"src": src or "this tree", **result}


@dataclass(frozen=True)
class SnapshotPlan:
    """Node counts (one lab of the largest), running containers per node, rounds."""

    node_counts: tuple[int, ...] = (10, 30)
    running: int = 10
    rounds: int = 3
    profile: bool = True


def run_snapshot(plan: SnapshotPlan, log: Any) -> dict[str, Any]:
    """Part 10: the snapshot pattern at each node count, on one lab swarm (this tree's agents).

    The lab's DNS lists the first N nodes; the entry agent must know exactly
    those before timing. With py-spy, the entry agent is profiled under
    untargeted snapshots at the largest N.
    """
    cells: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    t0 = time.monotonic()
    with Lab(nodes=max(plan.node_counts)) as lab:
        log(f"  lab of {len(lab.nodes)} nodes in {time.monotonic() - t0:.1f} s")
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: run_containers(n, plan.running), lab.nodes))
        log(f"  {plan.running} running containers per node, {time.monotonic() - t0:.1f} s")
        lab.set_dns(lab.nodes[: min(plan.node_counts)])
        agents = start_agents(lab, lab.nodes)
        entry = agent_target(lab, agents[0])
        for n in sorted(plan.node_counts):
            lab.set_dns(lab.nodes[:n])
            wait_members(lab, agents[0], {m.name for m in lab.nodes[:n]}, timeout=60)
            conn = entry.connect(60)
            cell = {
                "nodes": n,
                "running_per_node": plan.running,
                **time_snapshots(conn, plan.rounds),
            }
            conn.close()
            cells.append(cell)
            log(
                f"  N={n:<2} {cell['inspects']} inspects: "
                f"untargeted {cell['ms']['untargeted']} ms, "
                f"targeted {cell['ms']['targeted']} ms -> x{cell['untargeted/targeted']}"
            )
            if plan.profile and n == max(plan.node_counts) and profile.available():
                with tempfile.TemporaryDirectory() as tmp:
                    raw = Path(tmp) / "snapshot.raw"
                    conn = entry.connect(60)
                    seconds = max(4, int(cell["ms"]["untargeted"] / 1000) + 1)
                    profile.record(
                        agent_pid(agents[0]), seconds, raw, functools.partial(snapshot, conn, False)
                    )
                    conn.close()
                    profiles[f"snapshot untargeted N={n}"] = profile.summarize(raw)
    return {"plan": plan.__dict__, "cells": cells, "profiles": profiles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--running", type=int, default=20, help="running containers per node")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--src", action="append", default=[], help="agent source tree (default: this one)"
    )
    args = parser.parse_args()
    with Lab(nodes=args.nodes) as lab:
        lab.set_dns(lab.nodes)
        for node in lab.nodes:
            run_containers(node, args.running)
        for src in args.src or [""]:
            src = str(Path(src).resolve()) if src else ""
            print(json.dumps(measure(lab, src, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
