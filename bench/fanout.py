"""Part 2: a cluster-wide container list through one agent vs the engines asked directly."""

from __future__ import annotations

import http.client
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bench.client import Target, get
from bench.cluster import agent_pid, agent_target, engine_target, fill, wait_members
from bench.measure import cpu_seconds, spread
from tests.lab import Agent, Lab

PATH = "/containers/json?all=1"


@dataclass(frozen=True)
class FanoutPlan:
    """Node counts, containers per node, and repetitions per container count."""

    node_counts: tuple[int, ...] = (1, 3, 5, 10)
    containers: tuple[int, ...] = (10, 100, 500)
    #: Repetitions for each container count (fewer for the big lists).
    repetitions: tuple[int, ...] = (30, 15, 7)


class Direct:
    """The bench client's own query of N engines: one keep-alive connection per engine."""

    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets
        self.conns = [t.connect(60) for t in targets]
        self.pool = ThreadPoolExecutor(max(1, len(targets)))

    def _one(self, i: int) -> int:
        status, n = get(self.conns[i], PATH, {})
        if status != 200:
            raise RuntimeError(f"{self.targets[i].name}: {status}")
        return n

    def parallel(self) -> int:
        """All engines at once (threads); total bytes."""
        return sum(self.pool.map(self._one, range(len(self.conns))))

    def sequential(self) -> int:
        """One engine after the other; total bytes."""
        return sum(self._one(i) for i in range(len(self.conns)))

    def close(self) -> None:
        self.pool.shutdown()
        for c in self.conns:
            c.close()


def _timed(fn: Any) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def run_fanout(lab: Lab, agents: list[Agent], plan: FanoutPlan, log: Any) -> dict[str, Any]:
    """Every container count x node count; agent, direct parallel and sequential interleaved."""
    entry = agents[0]
    pid = agent_pid(entry)
    pids = [agent_pid(a) for a in agents]
    cells: list[dict[str, Any]] = []
    creation: list[dict[str, Any]] = []
    for count, reps in zip(plan.containers, plan.repetitions, strict=True):
        nodes = lab.nodes[: max(plan.node_counts)]
        seconds = fill(nodes, count)
        creation.append({"per_node": count, "nodes": len(nodes), "seconds": round(seconds, 1)})
        log(f"  {count} containers on each of {len(nodes)} nodes: {seconds:.1f} s to create")
        for n in plan.node_counts:
            members = lab.nodes[:n]
            lab.set_dns(members)
            wait_members(lab, entry, {m.name for m in members})
            engines = [engine_target(m) for m in members]
            cell = measure_cell(agent_target(lab, entry), pid, pids[:n], engines, count, reps, log)
            cells.append(cell)
    return {"plan": plan.__dict__, "path": PATH, "creation": creation, "cells": cells}


def measure_cell(
    entry: Target,
    pid: int,
    pids: list[int],
    engines: list[Target],
    count: int,
    reps: int,
    log: Any,
) -> dict[str, Any]:
    """One grid cell: the list through ``entry`` (agent PID ``pid``, all agents
    ``pids``) against the client's own query of ``engines``, interleaved."""
    direct = Direct(engines)
    conn: http.client.HTTPConnection = entry.connect(60)
    headers = dict(entry.headers)
    expected = count * len(engines)
    try:
        for _ in range(2):  # warm up every connection
            get(conn, PATH, headers)
            direct.parallel()
        times: dict[str, list[float]] = {"agent": [], "parallel": [], "sequential": []}
        cpu = 0.0
        cpu_all = 0.0
        size = 0
        for _ in range(reps):
            before = cpu_seconds(pid)
            before_all = sum(cpu_seconds(p) for p in pids)
            t0 = time.perf_counter()
            status, size = get(conn, PATH, headers)
            times["agent"].append(time.perf_counter() - t0)
            cpu += cpu_seconds(pid) - before
            cpu_all += sum(cpu_seconds(p) for p in pids) - before_all
            if status != 200:
                raise RuntimeError(f"agent list answered {status}")
            dt, _ = _timed(direct.parallel)
            times["parallel"].append(dt)
            dt, _ = _timed(direct.sequential)
            times["sequential"].append(dt)
    finally:
        conn.close()
        direct.close()
    med = {k: spread([x * 1000 for x in v], 2) for k, v in times.items()}
    cell = {
        "nodes": len(engines),
        "per_node": count,
        "containers": expected,
        "agent_body_bytes": size,
        "ms": med,
        "agent/parallel": round(med["agent"]["median"] / med["parallel"]["median"], 2),
        "agent/sequential": round(med["agent"]["median"] / med["sequential"]["median"], 2),
        "agent_cpu_ms_per_request": round(cpu / reps * 1000, 1),
        "all_agents_cpu_ms_per_request": round(cpu_all / reps * 1000, 1),
        "repetitions": reps,
    }
    log(
        f"  N={len(engines):<2} x{count:<4} agent {med['agent']['median']:.1f} ms, "
        f"parallel {med['parallel']['median']:.1f} ms, sequential "
        f"{med['sequential']['median']:.1f} ms -> x{cell['agent/parallel']} / "
        f"x{cell['agent/sequential']}; agent CPU {cell['agent_cpu_ms_per_request']} ms/req"
    )
    return cell
