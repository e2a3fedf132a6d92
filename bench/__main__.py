"""``python -m bench [--smoke]``: every benchmark, results in bench/results/.

``python -m bench soak [--short]`` is the fault soak instead (bench/soak.py).

Runs as root on the lab (tests/lab.py): set ``SALAB_ID`` to keep clear of other labs.
Exits 0 when the bench ran (targets met or not), non-zero when it crashed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import aims, profile, report
from bench.client import Target, get, load
from bench.cluster import (
    agent_pid,
    agent_target,
    engine_target,
    ensure_containers,
    start_agents,
)
from bench.discovery import run_discovery
from bench.fanout import PATH as LIST_PATH
from bench.fanout import FanoutPlan, run_fanout
from bench.grid import GridPlan, run_grid
from bench.leaks import LeakPlan, run_leaks
from bench.nginx import Nginx
from bench.observability import ObservabilityPlan, run_observability
from bench.passthrough import PassthroughPlan, run_passthrough
from bench.snapshot import SnapshotPlan, run_snapshot
from bench.streams import StreamPlan, run_streams
from bench.wrk import WrkPlan, fake_cluster, run_wrk
from tests.lab import Lab

HERE = Path(__file__).resolve().parent
NGINX_PORT = 9080
#: The reference nginx TLS proxy's port on the fake node1's loopback address.
PROXY_PORT = 9443
PARTS = "wrk,grid,snapshot,single,cluster,observability"
DESCRIPTIONS = {
    "wrk": "part 8, passthrough CPU per request, wrk and http.client, fake cluster",
    "grid": "part 9, cluster-wide list over fake nodes",
    "snapshot": "part 10, Portainer's snapshot on a lab swarm",
    "single": "parts 1, 3, 4 on a one-node lab",
    "cluster": "parts 2, 5, 6 on a lab",
    "observability": "part 7, metrics and access log, per request, in process",
}


@dataclass(frozen=True)
class Plan:
    """Everything one run does."""

    mode: str
    passthrough: PassthroughPlan
    streams: StreamPlan
    fanout: FanoutPlan
    discovery_reps: int
    profile: bool
    leaks: LeakPlan
    observability: ObservabilityPlan
    wrk: WrkPlan
    grid: GridPlan
    snapshot: SnapshotPlan


FULL = Plan(
    "full",
    PassthroughPlan(),
    StreamPlan(),
    FanoutPlan(node_counts=(1, 3, 10)),
    discovery_reps=5,
    profile=True,
    leaks=LeakPlan(),
    observability=ObservabilityPlan(),
    wrk=WrkPlan(),
    grid=GridPlan(),
    snapshot=SnapshotPlan(),
)
SMOKE = Plan(
    "smoke",
    PassthroughPlan(concurrencies=(1, 8), repetitions=1, duration=0.5, max_requests=2000),
    StreamPlan(image_mb=16, log_lines=20_000, repetitions=1),
    FanoutPlan(node_counts=(1, 2), containers=(5,), repetitions=(3,)),
    discovery_reps=1,
    profile=False,
    leaks=LeakPlan(rounds=2, streams=20),
    observability=ObservabilityPlan(requests=500, repetitions=2),
    wrk=WrkPlan(
        concurrencies=(16,), endpoints=("ping",), rounds=1, warmup=0, duration=1,
        http_client_duration=0.5, profile=False,
    ),
    grid=GridPlan(node_counts=(2,), containers=(5,), repetitions=(3,), refresh=2,
                  profile_cell=None, idle_wait=0.5),
    snapshot=SnapshotPlan(node_counts=(2,), running=2, rounds=1, profile=False),
)  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def single_node(plan: Plan, results: dict[str, Any]) -> None:
    """Parts 1, 3 and 4 on a one-node lab."""
    with Lab(nodes=1) as lab:
        node = lab.nodes[0]
        (agent,) = start_agents(lab, [node])
        pid = agent_pid(agent)
        time.sleep(3)  # let start-up settle before the idle figure
        ids = ensure_containers(node, 100)
        # The target header makes the list a passthrough; sent to every path alike.
        headers = (("X-PortainerAgent-Target", node.name),)
        engine = engine_target(node, headers)
        agent_t = agent_target(lab, agent, headers)
        log("part 1+4: passthrough on one node")
        with contextlib.ExitStack() as stack:
            targets = [engine]
            if Nginx.available():
                ng = Nginx(node.socket, node.ip, NGINX_PORT, str(lab.tls), node.netns)
                stack.enter_context(ng)
                targets += [ng.plain, ng.secure]
            else:
                log("  nginx not installed: engine and agent only")
            targets.append(agent_t)
            results["passthrough"] = run_passthrough(targets, ids[0], pid, plan.passthrough, log)
            if plan.profile and profile.available():
                log("profile: agent under c=64 GET /_ping and /containers/json (100)")
                prof = results.setdefault("profile", {})
                cases = {"/_ping": "/_ping", "list100": "/containers/json?all=1"}
                for label, path in cases.items():
                    with tempfile.TemporaryDirectory() as tmp:
                        raw = Path(tmp) / "passthrough.raw"
                        work = functools.partial(load, agent_t, path, 64, 5.0)
                        profile.record(pid, 6, raw, work)
                        prof[f"passthrough {label} c=64"] = profile.summarize(raw)
            log("part 3: streams")
            results["streams"] = run_streams(node, targets, pid, plan.streams, lab.root, log)


def cluster(plan: Plan, results: dict[str, Any]) -> None:
    """Parts 2, 5 and 6 on a lab of as many nodes as the biggest fan-out."""
    n = max(plan.fanout.node_counts)
    t0 = time.monotonic()
    with Lab(nodes=n) as lab:
        agents = start_agents(lab, lab.nodes)
        log(f"lab of {n} nodes with agents up in {time.monotonic() - t0:.1f} s")
        log("part 2: fan-out")
        results["fanout"] = run_fanout(lab, agents, plan.fanout, log)
        if plan.profile and profile.available():
            big = max(plan.fanout.containers)
            lab.set_dns(lab.nodes)
            log(f"profile: agent under sequential cluster-wide lists, {n} x {big}")
            entry: Target = agent_target(lab, agents[0])
            tmp = tempfile.TemporaryDirectory()
            raw = Path(tmp.name) / "fanout.raw"

            def lists() -> None:
                conn = entry.connect(60)
                deadline = time.monotonic() + 8
                for _ in range(200):
                    if time.monotonic() > deadline:
                        break
                    get(conn, LIST_PATH, {})
                conn.close()

            time.sleep(2)
            profile.record(agent_pid(agents[0]), 8, raw, lists)
            results.setdefault("profile", {})[f"fan-out {n} x {big}"] = profile.summarize(raw)
            tmp.cleanup()
        if n > 1:
            log(f"part 6: {plan.leaks.rounds} rounds of {plan.leaks.streams} abandoned streams")
            lab.set_dns(lab.nodes)
            first = agents[0]
            results["leaks"] = run_leaks(
                agent_target(lab, first), agent_pid(first), first.node, lab.nodes[-1],
                plan.leaks, log,
            )  # fmt: skip
        log("part 5: discovery")
        lab.set_dns(lab.nodes)
        other = agents[-1]
        other.kill()
        lab.agents.remove(other)
        results["discovery"] = run_discovery(lab, agents[0], other.node, plan.discovery_reps, log)


def wrk_part(plan: Plan, results: dict[str, Any]) -> None:
    """Part 8 on a fake cluster: a standalone node and a pair of swarm nodes per relay mode."""
    with fake_cluster(plan.wrk) as fc:
        fc.start_agents(fc.nodes)
        swarm = fc.nodes[len(plan.wrk.relays) :]
        for entry in swarm[::2]:
            fc.wait_members(entry, {n.name for n in swarm})
        proxy = fc.start_proxy(fc.nodes[0], PROXY_PORT)
        time.sleep(2)
        results["wrk"] = run_wrk(fc, proxy, plan.wrk, log)


def save(
    out: Path, results: dict[str, Any], started: float, status: int, final: bool = False
) -> None:
    """Write latest.json and latest.md as they stand (complete: the last write, no crash)."""
    results["meta"]["seconds"] = round(time.monotonic() - started, 1)
    results["meta"]["loadavg_end"] = loadavg()
    results["meta"]["complete"] = final and status == 0
    results["targets"] = report.targets(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "latest.md").write_text(report.markdown(results))


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["soak"]:
        from bench import soak  # its own options: python -m bench soak --help

        return soak.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny counts, 1-2 nodes, for CI")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results[/smoke])")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    parser.add_argument(
        "--parts",
        default=PARTS,
        help="wrk (8, fake cluster), grid (9, fake cluster), snapshot (10, lab), single "
        "(1,3,4), cluster (2,5,6), observability (7, in process), comma-separated",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the other parts' figures from the results folder's latest.json",
    )
    parser.add_argument(
        "--note", default="", help="what else ran on the machine, for the results' header"
    )
    parser.add_argument(
        "--render", type=Path, help="only re-write latest.md and the plot from JSON"
    )
    args = parser.parse_args(argv)
    if args.render:
        saved: dict[str, Any] = json.loads(args.render.read_text())
        saved["targets"] = report.targets(saved)
        args.render.write_text(json.dumps(saved, indent=1) + "\n")
        (args.render.parent / "latest.md").write_text(report.markdown(saved))
        report.plot(saved, args.render.parent / "fanout.png")
        return 0
    plan = SMOKE if args.smoke else FULL
    if args.no_profile:
        plan = Plan(
            **{
                **plan.__dict__,
                "profile": False,
                "wrk": WrkPlan(**{**plan.wrk.__dict__, "profile": False}),
                "grid": GridPlan(**{**plan.grid.__dict__, "profile_cell": None}),
                "snapshot": SnapshotPlan(**{**plan.snapshot.__dict__, "profile": False}),
            }
        )
    out: Path = args.out or (HERE / "results" / ("smoke" if args.smoke else ""))
    ok, why = Lab.can_run()
    if not ok:
        log(f"cannot run the lab: {why}")
        return 2
    started = time.monotonic()
    results: dict[str, Any] = {
        "meta": {
            "mode": plan.mode,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python "
            f"{platform.python_version()}, SALAB_ID={os.environ.get('SALAB_ID', '0')}",
            "loadavg_start": loadavg(),
            "noise": args.note,
        }
    }
    parts = args.parts.split(",")
    if args.update and (out / "latest.json").exists():
        earlier: dict[str, Any] = json.loads((out / "latest.json").read_text())
        kept = {k: v for k, v in earlier.items() if k not in ("meta", "targets")}
        results = {**kept, "meta": results["meta"]}
        results["meta"]["kept_from"] = f"{earlier['meta']['date']} ({', '.join(kept)})"
        results["meta"]["loadavg_parts"] = dict(earlier["meta"].get("loadavg_parts", {}))
    runs: dict[str, Callable[[], None]] = {
        "wrk": lambda: wrk_part(plan, results),
        "grid": lambda: results.update(grid=run_grid(plan.grid, log)),
        "snapshot": lambda: results.update(snapshot=run_snapshot(plan.snapshot, log)),
        "single": lambda: single_node(plan, results),
        "cluster": lambda: cluster(plan, results),
        "observability": lambda: results.update(
            observability=run_observability(plan.observability, log)
        ),
    }
    status = 0
    try:
        for part in PARTS.split(","):
            if part not in parts:
                continue
            now = datetime.datetime.now(datetime.UTC).strftime("%H:%M UTC")
            results["meta"].setdefault("loadavg_parts", {})[part] = f"{loadavg()} at {now}"
            log(f"{part}: {DESCRIPTIONS[part]}")
            runs[part]()
            save(out, results, started, status)  # a later crash keeps this part
    except Exception:
        traceback.print_exc()
        status = 1
    save(out, results, started, status, final=True)
    plotted = report.plot(results, out / "fanout.png")
    log(f"results in {out} ({'with' if plotted else 'without'} plot), "
        f"{results['meta']['seconds']:.0f} s")  # fmt: skip
    for t in results["targets"]:
        log(f"  {'MET ' if t['met'] else 'MISS'} {t['target']}: {t['figure']}")
    for a in aims.aims(results):
        log(f"  {'MET ' if a['met'] else 'MISS'} {a['aim']}: {a['measured']} ({a['ratio']})")
    return status


if __name__ == "__main__":
    sys.exit(main())
