"""Part 8: passthrough CPU per request with ``wrk`` (and ``http.client``) on the fake cluster.

The method of performance-options.md §0: keep-alive over TLS, Portainer's
signature headers on every request, the agent as ``makeService`` builds it,
nginx on a unix socket as the engine, nginx as a TLS reverse proxy (one
process) as the reference. Three kinds of way in, each measured as the CPU time
(utime+stime from ``/proc``) of the process(es) that serve, per request:

- ``nginx_tls``: the reference proxy, in front of node1's engine;
- ``agent``: an agent whose engine says "not in a swarm" (so every
  request is served locally, as a passthrough);
- ``peer``: an agent in the swarm with ``X-PortainerAgent-Target`` naming
  another, so each request is forwarded to that node's agent: the entry
  agent's CPU, and both agents' together.

Each of those once per relay mode of the plan (``--relay web``: ``agent``,
``peer``; ``--relay bytes``: ``agent_bytes``, ``peer_bytes``), each on its
own agents, so both front doors are measured side by side in one run.

Every round runs each (generator, way in) pair once, in an order shuffled per
round; figures are medians over rounds with their spread.
"""

from __future__ import annotations

import functools
import json
import random
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import profile
from bench.client import Target, load
from bench.fake import FakeCluster
from bench.measure import cpu_seconds, percentile, spread

#: ``list100`` is the 84 KB list of 100 containers, asked on an inspect path
#: (the fake engine answers it there too) so that the peer's target forwards
#: it: route() fans out a list whatever its target, unless it names the entry.
ENDPOINTS = {"ping": "/_ping", "list100": "/containers/list100/json"}

#: wrk's report, one JSON line, from its ``done`` hook.
DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,' ..
    '"errors":%d,"non2xx":%d,"bytes":%d}\\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status, summary.bytes))
end
"""


@dataclass(frozen=True)
class WrkPlan:
    """Loads, rounds and windows (seconds)."""

    concurrencies: tuple[int, ...] = (1, 16, 64)
    endpoints: tuple[str, ...] = ("ping", "list100")
    rounds: int = 3
    warmup: float = 1.0
    duration: float = 3.0
    #: Also drive each way in with the bench's own http.client generator.
    http_client: bool = True
    http_client_duration: float = 2.0
    #: py-spy the agents under the highest load, if py-spy is there.
    profile: bool = True
    #: The agents' front doors (``AGENT_RELAY``) measured, each with ways in of its own.
    relays: tuple[str, ...] = ("web", "bytes")


@dataclass(frozen=True)
class Way:
    """One way in: a target and the PIDs whose CPU it costs (the first is "the" server)."""

    name: str
    target: Target
    pids: tuple[int, ...]


def script(folder: Path, target: Target) -> Path:
    """A wrk Lua script sending ``target``'s headers on every request."""
    lines = [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in target.headers]
    path = folder / f"{target.name}-{abs(hash(target.headers))}.lua"
    path.write_text("\n".join(lines) + "\n" + DONE)
    return path


def wrk(target: Target, path: str, conc: int, seconds: float, lua: Path) -> dict[str, Any]:
    """One wrk run (one thread, ``conc`` keep-alive TLS connections); its report."""
    url = f"https://{target.host}:{target.port}{path}"
    # wrk takes whole seconds.
    window = f"-d{max(1, round(seconds))}s"
    cmd = ["wrk", "-t1", f"-c{conc}", window, "--timeout", "10s", "-s", str(lua), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("WRK "):
            report: dict[str, Any] = json.loads(line[4:])
            return report
    raise RuntimeError(f"wrk gave no report: {out.stdout[-500:]} {out.stderr[-500:]}")


#: What one run gives: requests served (for the CPU), req/s, p50 and p99 (ms), errors.
Run = tuple[int, float, float, float, int]


def _measure(way: Way, run: Callable[[], Run]) -> dict[str, float]:
    before = [cpu_seconds(p) for p in way.pids]
    requests, rps, p50, p99, errors = run()
    cpu = [cpu_seconds(p) - b for p, b in zip(way.pids, before, strict=True)]
    n = max(1, requests)
    return {
        "cpu_us": 1e6 * cpu[0] / n,
        "cpu_us_all": 1e6 * sum(cpu) / n,
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "errors": errors,
    }


def _wrk_run(target: Target, path: str, conc: int, seconds: float, lua: Path) -> Run:
    r = wrk(target, path, conc, seconds, lua)
    return (r["requests"], r["requests"] / (r["duration_us"] / 1e6),
            r["p50_us"] / 1000, r["p99_us"] / 1000, r["errors"] + r["non2xx"])  # fmt: skip


def _client_run(target: Target, path: str, conc: int, seconds: float) -> Run:
    r = load(target, path, conc, seconds)
    lat = r.latencies
    # Its 3 warm-up requests per connection cost CPU too (so do the handshakes
    # and the requests that end past the window: the CPU figure is an upper bound).
    return (len(lat) + 3 * conc, len(lat) / r.window,
            percentile(lat, 50) * 1000, percentile(lat, 99) * 1000, r.errors)  # fmt: skip


def way_name(kind: str, relay: str) -> str:
    """``agent``/``peer`` for ``--relay web`` (as before there was a choice), else suffixed."""
    return kind if relay == "web" else f"{kind}_{relay}"


def layout(relays: tuple[str, ...]) -> list[str]:
    """The fake cluster's nodes, by relay mode: one standalone node per mode,
    then an (entry, target) pair of swarm nodes per mode."""
    return [*relays, *[r for r in relays for _ in range(2)]]


def fake_cluster(plan: WrkPlan) -> FakeCluster:
    """The fake cluster :func:`run_wrk` needs (discovery every 10 s: the peers
    find each other at start)."""
    return FakeCluster(
        len(layout(plan.relays)), 100, standalone=len(plan.relays), refresh=10,
        relay=layout(plan.relays),
    )  # fmt: skip


def ways_in(fc: FakeCluster, proxy: Target, relays: tuple[str, ...]) -> list[Way]:
    """nginx TLS first, then per relay mode its ``agent`` and its ``peer``."""
    signed = fc.agent(fc.nodes[0]).headers  # the signature headers, as the agents get them
    ways = [
        Way("nginx_tls", Target("nginx_tls", host=proxy.host, port=proxy.port,
                                tls=proxy.tls, headers=signed), (_proxy_pid(fc),)),
    ]  # fmt: skip
    alone, pairs = fc.nodes[: len(relays)], fc.nodes[len(relays) :]
    for i, relay in enumerate(relays):
        solo, entry, target = alone[i], pairs[2 * i], pairs[2 * i + 1]
        assert solo.relay == entry.relay == target.relay == relay, "fake_cluster's layout"
        agent, peer = way_name("agent", relay), way_name("peer", relay)
        ways += [
            Way(agent, replace(fc.agent(solo), name=agent), (solo.pid,)),
            Way(peer, replace(fc.agent(entry, target.name), name=peer), (entry.pid, target.pid)),
        ]
    return ways


def run_wrk(fc: FakeCluster, proxy: Target, plan: WrkPlan, log: Any) -> dict[str, Any]:
    """Every endpoint x concurrency, each generator x way in, rounds shuffled."""
    ways = ways_in(fc, proxy, plan.relays)
    generators = ["wrk"] + (["http.client"] if plan.http_client else [])
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        scripts = {w.name: script(Path(tmp), w.target) for w in ways}
        return _run(ways, scripts, generators, plan, log)


def _run(
    ways: list[Way], scripts: dict[str, Path], generators: list[str], plan: WrkPlan, log: Any
) -> dict[str, Any]:
    cells: list[dict[str, Any]] = []
    for label in plan.endpoints:
        path = ENDPOINTS[label]
        for conc in plan.concurrencies:
            runs: dict[tuple[str, str], list[dict[str, float]]] = {
                (g, w.name): [] for g in generators for w in ways
            }
            for _ in range(plan.rounds):
                order = [(g, w) for g in generators for w in ways]
                random.shuffle(order)
                for g, w in order:
                    if g == "wrk":
                        lua = scripts[w.name]
                        if plan.warmup:
                            wrk(w.target, path, conc, plan.warmup, lua)
                        go = functools.partial(_wrk_run, w.target, path, conc, plan.duration, lua)
                    else:
                        go = functools.partial(
                            _client_run, w.target, path, conc, plan.http_client_duration
                        )
                    runs[(g, w.name)].append(_measure(w, go))
            for g in generators:
                cell: dict[str, Any] = {
                    "endpoint": label, "path": path, "concurrency": conc, "generator": g,
                }  # fmt: skip
                for w in ways:
                    rs = runs[(g, w.name)]
                    cell[w.name] = {
                        k: spread([x[k] for x in rs], 3 if k.endswith("_ms") else 1)
                        for k in ("cpu_us", "cpu_us_all", "rps", "p50_ms", "p99_ms")
                    }
                    cell[w.name]["errors"] = int(sum(x["errors"] for x in rs))
                cells.append(cell)
                log(
                    f"  {g:11} {label:7} c={conc:<3} "
                    + "  ".join(
                        f"{w.name}: {cell[w.name]['cpu_us']['median']:.0f} us/req "
                        f"{cell[w.name]['rps']['median']:.0f}/s "
                        f"p50 {cell[w.name]['p50_ms']['median']:.2f} ms"
                        for w in ways
                    )
                )
    profiles: dict[str, Any] = {}
    if plan.profile and profile.available():
        top = max(plan.concurrencies)
        for way in ways[1:]:
            for label in plan.endpoints:
                log(f"  profile: {way.name} under wrk c={top} {label}")
                with tempfile.TemporaryDirectory() as tmp:
                    raw = Path(tmp) / "wrk.raw"
                    work = functools.partial(
                        wrk, way.target, ENDPOINTS[label], top, 5, scripts[way.name]
                    )
                    profile.record(way.pids[0], 5, raw, work)
                    profiles[f"wrk {way.name} {label} c={top}"] = profile.summarize(raw)
    return {
        "plan": plan.__dict__,
        "profiles": profiles,
        "signature": "Portainer's two signature headers (P-256 key, signing MD5(AGENT_SECRET)), "
        "the same pair on every request: the agent verifies it once and then serves it "
        "from its cache, as it does for Portainer's reused signatures",
        "ways": [w.name for w in ways],
        "cells": cells,
    }


def _proxy_pid(fc: FakeCluster) -> int:
    assert fc.proxy is not None
    return fc.proxy.pid
