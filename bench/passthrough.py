"""Part 1 and 4: passthrough latency and throughput on one node; the agent's memory."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from bench.client import Target, load
from bench.measure import RssSampler, cpu_seconds, percentile, rss_mb, spread


@dataclass(frozen=True)
class PassthroughPlan:
    """What to run: endpoints, concurrencies, repetitions and window length."""

    concurrencies: tuple[int, ...] = (1, 16, 64)
    repetitions: int = 3
    duration: float = 2.0
    max_requests: int = 20_000


def endpoints(container_id: str) -> dict[str, str]:
    """The three small requests, by label."""
    return {
        "ping": "/_ping",
        "list100": "/containers/json?all=1",
        "inspect": f"/containers/{container_id}/json",
    }


def run_passthrough(
    targets: list[Target], container_id: str, agent_pid: int, plan: PassthroughPlan, log: Any
) -> dict[str, Any]:
    """Every endpoint x concurrency x target, targets interleaved within each repetition."""
    cells: list[dict[str, Any]] = []
    memory: dict[str, Any] = {"idle_mb": round(rss_mb(agent_pid), 1)}
    peak_under_load = 0.0
    for label, path in endpoints(container_id).items():
        for conc in plan.concurrencies:
            runs: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
            for _ in range(plan.repetitions):
                for t in targets:
                    sampler = RssSampler(agent_pid, 0.05)
                    cpu0 = cpu_seconds(agent_pid)
                    with sampler:
                        r = load(t, path, conc, plan.duration, plan.max_requests)
                    cpu = cpu_seconds(agent_pid) - cpu0
                    if t.name == "agent" and conc == max(plan.concurrencies):
                        peak_under_load = max(peak_under_load, sampler.peak)
                    lat = r.latencies
                    runs[t.name].append(
                        {
                            "p50_ms": percentile(lat, 50) * 1000,
                            "p99_ms": percentile(lat, 99) * 1000,
                            "rps": len(lat) / r.window,
                            "errors": r.errors,
                            # Warm-up requests (3 per connection) are in the CPU time too.
                            "cpu_ms": 1000 * cpu / max(1, len(lat) + 3 * conc),
                        }
                    )
            cell: dict[str, Any] = {"endpoint": label, "path": path, "concurrency": conc}
            for name, rs in runs.items():
                cell[name] = {
                    "p50_ms": spread([x["p50_ms"] for x in rs], 3),
                    "p99_ms": spread([x["p99_ms"] for x in rs], 3),
                    "rps": spread([x["rps"] for x in rs], 0),
                    "errors": int(sum(x["errors"] for x in rs)),
                }
                if name == "agent":
                    cell[name]["agent_cpu_ms_per_request"] = spread([x["cpu_ms"] for x in rs], 3)
            add_ratios(cell)
            log(
                f"  {label:8} c={conc:<3} "
                + "  ".join(
                    f"{n}: p50 {cell[n]['p50_ms']['median']:.2f} ms "
                    f"{cell[n]['rps']['median']:.0f}/s"
                    for n in runs
                )
            )
            cells.append(cell)
    memory["peak_under_c64_mb"] = round(peak_under_load, 1)
    time.sleep(2)
    memory["after_load_mb"] = round(rss_mb(agent_pid), 1)
    return {"plan": plan.__dict__, "cells": cells, "memory": memory}


def add_ratios(cell: dict[str, Any]) -> None:
    """Agent over engine and over nginx: p50 latency, throughput, added ms."""
    a = cell.get("agent")
    if not a:
        return
    for base in ("engine", "nginx", "nginx_tls"):
        b = cell.get(base)
        if not b:
            continue
        cell[f"agent/{base}"] = {
            "p50": round(a["p50_ms"]["median"] / b["p50_ms"]["median"], 2),
            "rps": round(a["rps"]["median"] / b["rps"]["median"], 2),
            "added_p50_ms": round(a["p50_ms"]["median"] - b["p50_ms"]["median"], 3),
        }
