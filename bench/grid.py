"""Part 9: the cluster-wide list over 1 to 30 fake nodes (bench/fake.py), no root.

Every cell is: N fake nodes (nginx on a unix socket per node, a static
``/containers/json`` of C synthetic containers in Docker's shape, an active
swarm worker in ``/info``), a real agent per node (``makeService``, TLS,
discovery through a hosts file), and ``GET /containers/json?all=1`` through
node1's agent, with Portainer's signature headers and no target, against the
bench client reading the N engine sockets itself (in parallel threads, and one
after the other), interleaved. A static answer costs the engine almost
nothing, so the ratio is stricter than on real engines (the lab grid of part
2). Node counts grow (agents are added, never removed, so no idle agent
probes the cluster); the container count changes under each node count.
"""

from __future__ import annotations

import functools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import profile
from bench.client import Target, get
from bench.fake import FakeCluster
from bench.fanout import PATH, measure_cell
from bench.measure import rss_mb


@dataclass(frozen=True)
class GridPlan:
    """Node counts, containers per node, repetitions per container count."""

    node_counts: tuple[int, ...] = (1, 3, 10, 30)
    containers: tuple[int, ...] = (10, 100, 500)
    repetitions: tuple[int, ...] = (20, 10, 6)
    #: The agents' discovery interval: each tick probes every other agent.
    refresh: int = 10
    #: The agents' --fanout-timeout: 30 lists of 500 at once take long on 2 cores.
    fanout_timeout: int = 30
    #: Profile the entry agent at this (nodes, containers) cell, if py-spy is there.
    profile_cell: tuple[int, int] | None = (10, 500)
    #: Seconds the cluster idles before the entry agent's (and the newest agent's) RSS is read.
    idle_wait: float = 3.0


def _lists(entry: Target, seconds: float) -> None:
    conn = entry.connect(60)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        get(conn, PATH, dict(entry.headers))
    conn.close()


def run_grid(plan: GridPlan, log: Any) -> dict[str, Any]:
    """Every node count x container count on one fake cluster."""
    cells: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    idle: dict[str, float] = {}
    newest: dict[str, float] = {}
    biggest = max(plan.node_counts)
    with FakeCluster(
        biggest, plan.containers[0], refresh=plan.refresh, fanout_timeout=plan.fanout_timeout
    ) as fc:
        entry = fc.nodes[0]
        started: list[Any] = []
        for n in sorted(plan.node_counts):
            members = fc.nodes[:n]
            t0 = time.monotonic()
            fc.set_members(members)
            try:
                fc.start_agents([m for m in members if m not in started])
                started = list(members)
                fc.wait_members(entry, {m.name for m in members}, timeout=3 * plan.refresh + 30)
            except (RuntimeError, OSError) as e:
                # Too busy a machine to start the agents: say so, keep the smaller cells.
                log(f"  {n} fake nodes: not started ({e!s:.300})")
                cells += [{"nodes": n, "per_node": c, "error": f"agents did not start: {e!s:.200}"}
                          for c in plan.containers]  # fmt: skip
                break
            log(f"  {n} fake nodes with agents in {time.monotonic() - t0:.1f} s")
            time.sleep(plan.idle_wait)  # idle: discovery ticks only
            idle[str(n)] = round(rss_mb(entry.pid), 1)
            # The agent started last has served no list yet: a fresh idle figure
            # of an agent that knows the whole cluster.
            newest[str(n)] = round(rss_mb(members[-1].pid), 1)
            pids = [m.pid for m in members]
            engines = [Target("engine", unix=m.socket) for m in members]
            for count, reps in zip(plan.containers, plan.repetitions, strict=True):
                fc.set_containers(count)
                target = fc.agent(entry)
                try:
                    cells.append(measure_cell(target, entry.pid, pids, engines, count, reps, log))
                except RuntimeError as e:  # a failed list: say so, go on with the grid
                    log(f"  N={n:<2} x{count:<4} failed: {e}")
                    cells.append({"nodes": n, "per_node": count, "error": str(e)})
                if plan.profile_cell == (n, count) and profile.available():
                    log(f"  profile: entry agent under sequential lists, {n} x {count}")
                    with tempfile.TemporaryDirectory() as tmp:
                        raw = Path(tmp) / "grid.raw"
                        profile.record(entry.pid, 6, raw, functools.partial(_lists, target, 6))
                        profiles[f"fan-out (fake) {n} x {count}"] = profile.summarize(raw)
    return {
        "plan": plan.__dict__,
        "path": PATH,
        "cells": cells,
        "idle_rss_mb": idle,
        "idle_rss_newest_mb": newest,
        "profiles": profiles,
    }
