"""The aims of issue #12 checked against one run's figures, and parts 8-10 in Markdown."""

from __future__ import annotations

from typing import Any

from bench import obstacles

#: Passthrough CPU per request over nginx TLS's, by endpoint (c=16 and c=64).
CPU_LIMIT = {"ping": 3.0, "list100": 1.0}
#: At c=1, p50 over nginx TLS's (ms).
P50_MARGIN_MS = 0.1
#: Peers: the same aims, this much looser.
PEER_FACTOR = 1.5
FANOUT_LIMIT = 1.2
FANOUT_CPU_MS = 15.0
FANOUT_CPU_CELL = (10, 500)
SNAPSHOT_LIMIT = 1.5
SNAPSHOT_NODES = 30
IDLE_RSS_MB = 60.0
FLAT_RSS_MB = 10.0


def _wrk_cells(results: dict[str, Any], generator: str = "wrk") -> list[dict[str, Any]]:
    cells = results.get("wrk", {}).get("cells", [])
    return [c for c in cells if c["generator"] == generator]


def _med(cell: dict[str, Any], way: str, key: str) -> float:
    value: float = cell[way][key]["median"]
    return value


def _ways(cell: dict[str, Any], kind: str) -> list[str]:
    """The cell's ways in of ``kind`` (``agent``, ``peer``): one per relay mode measured."""
    return [w for w in cell if w == kind or w.startswith(kind + "_")]


def relay_of(way: str) -> str:
    """The relay mode a way in was measured with (``agent`` is ``web``, ``agent_bytes`` bytes)."""
    return way.partition("_")[2] or "web"


def _passthrough_aim(add: Any, c: dict[str, Any], way: str, factor: float) -> None:
    """The aim one wrk cell sets ``way``: CPU at c=16 and 64, p50 at c=1."""
    label, conc = c["endpoint"], c["concurrency"]
    kind = way.partition("_")[0]
    who = f"{kind} (--relay {relay_of(way)})"
    area = "passthrough" if kind == "agent" else "peer"
    base_cpu, base_p50 = _med(c, "nginx_tls", "cpu_us"), _med(c, "nginx_tls", "p50_ms")
    cpu, p50 = _med(c, way, "cpu_us"), _med(c, way, "p50_ms")
    both = f"; both agents {_med(c, way, 'cpu_us_all'):g} µs" if kind == "peer" else ""
    if conc in (16, 64):
        limit = CPU_LIMIT[label] * factor
        add(
            f"{who}: {label} c={conc} CPU/request <= {limit:g}x nginx TLS",
            f"{cpu:g} vs {base_cpu:g} µs{both}; {_med(c, way, 'rps'):g} vs "
            f"{_med(c, 'nginx_tls', 'rps'):g} req/s",
            f"x{cpu / base_cpu:.1f}",
            cpu <= limit * base_cpu,
            area,
        )
    elif conc == 1:
        margin = P50_MARGIN_MS * factor
        add(
            f"{who}: {label} c=1 p50 within {margin:g} ms of nginx TLS",
            f"{p50:.3f} vs {base_p50:.3f} ms; CPU {cpu:g} vs {base_cpu:g} µs{both}",
            f"{p50 - base_p50:+.3f} ms",
            p50 - base_p50 <= margin,
            area,
        )


def aims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each aim: what it asks, the figure, the ratio, whether it is met (None: not measured)."""
    out: list[dict[str, Any]] = []

    def add(aim: str, measured: str, ratio: str, met: bool | None, area: str) -> None:
        out.append({"aim": aim, "measured": measured, "ratio": ratio, "met": met, "area": area})

    cells = _wrk_cells(results)
    for kind, factor in (("agent", 1.0), ("peer", PEER_FACTOR)):
        for c in cells:
            for way in _ways(c, kind):
                _passthrough_aim(add, c, way, factor)
    every = results.get("grid", {}).get("cells", [])
    grid = [c for c in every if "error" not in c]
    for c in every:
        if "error" in c:
            add(
                f"cluster list at {c['nodes']} x {c['per_node']} (fake grid)",
                c["error"],
                "-",
                False,
                "fan-out",
            )
    if grid:
        worst = max(grid, key=lambda c: c["agent/parallel"])
        ok = sum(c["agent/parallel"] <= FANOUT_LIMIT for c in grid)
        add(
            f"cluster list within {FANOUT_LIMIT}x the client's parallel direct query, every "
            "cell (fake grid, 1-30 nodes x 10-500)",
            f"worst {worst['ms']['agent']['median']:g} vs {worst['ms']['parallel']['median']:g}"
            f" ms at {worst['nodes']} x {worst['per_node']}; {ok}/{len(grid)} cells met",
            f"x{worst['agent/parallel']}",
            ok == len(grid),
            "fan-out",
        )
        big = [c for c in grid if (c["nodes"], c["per_node"]) == FANOUT_CPU_CELL]
        if big:
            cpu = big[0]["agent_cpu_ms_per_request"]
            add(
                f"entry agent CPU per {FANOUT_CPU_CELL[0]} x {FANOUT_CPU_CELL[1]} list "
                f"< {FANOUT_CPU_MS:g} ms",
                f"{cpu:g} ms (all agents {big[0]['all_agents_cpu_ms_per_request']:g} ms)",
                f"x{cpu / FANOUT_CPU_MS:.1f} of the aim",
                cpu < FANOUT_CPU_MS,
                "fan-out",
            )
    lab = results.get("fanout", {}).get("cells", [])
    if lab:
        worst = max(lab, key=lambda c: c["agent/parallel"])
        ok = sum(c["agent/parallel"] <= FANOUT_LIMIT for c in lab)
        add(
            f"(cross-check) the same on real engines, lab grid up to "
            f"{max(c['nodes'] for c in lab)} nodes",
            f"worst at {worst['nodes']} x {worst['per_node']}; {ok}/{len(lab)} cells met",
            f"x{worst['agent/parallel']}",
            ok == len(lab),
            "fan-out",
        )
    snaps = results.get("snapshot", {}).get("cells", [])
    for s in snaps:
        add(
            f"snapshot untargeted within {SNAPSHOT_LIMIT}x targeted"
            + (" (the aim's size)" if s["nodes"] == SNAPSHOT_NODES else " (smaller cluster)"),
            f"{s['nodes']} nodes, {s['inspects']} inspects: {s['ms']['untargeted']:g} vs "
            f"{s['ms']['targeted']:g} ms",
            f"x{s['untargeted/targeted']}",
            s["untargeted/targeted"] <= SNAPSHOT_LIMIT,
            "snapshot",
        )
    streams = results.get("streams", {})
    for label in ("image_get", "logs_follow"):
        s = streams.get(label)
        if not s or "nginx_tls_MBps" not in s:
            continue
        agent, ng = s["agent_MBps"]["median"], s["nginx_tls_MBps"]["median"]
        add(
            f"stream {label} at least as fast as nginx TLS, RSS flat",
            f"{agent:g} vs {ng:g} MB/s; RSS +{s['rss_growth_mb']} MB",
            f"x{agent / ng:.2f}",
            agent >= ng and s["rss_growth_mb"] <= FLAT_RSS_MB,
            "streams",
        )
    mem = results.get("passthrough", {}).get("memory")
    if mem:
        add(
            f"idle RSS < {IDLE_RSS_MB:g} MB (one node)",
            f"{mem['idle_mb']} MB",
            f"x{mem['idle_mb'] / IDLE_RSS_MB:.2f}",
            mem["idle_mb"] < IDLE_RSS_MB,
            "memory",
        )
    grid_part = results.get("grid", {})
    idle, newest = grid_part.get("idle_rss_mb", {}), grid_part.get("idle_rss_newest_mb", {})
    if newest:
        n = max(newest, key=int)
        add(
            f"idle RSS < {IDLE_RSS_MB:g} MB in a {n}-node cluster (fake grid: the agent "
            "started last, idle, knowing every node; no list served yet)",
            f"{newest[n]} MB (the entry agent, after its lists up to 10 x 500: {idle[n]} MB, "
            "a high-water mark)",
            f"x{newest[n] / IDLE_RSS_MB:.2f}",
            newest[n] < IDLE_RSS_MB,
            "memory",
        )
    elif idle:
        n = max(idle, key=int)
        add(
            f"idle RSS < {IDLE_RSS_MB:g} MB in a {n}-node cluster (fake grid's entry agent, "
            "after the smaller clusters' lists: a high-water mark)",
            f"{idle[n]} MB",
            f"x{idle[n] / IDLE_RSS_MB:.2f}",
            idle[n] < IDLE_RSS_MB,
            "memory",
        )
    return out


#: Which profiles say where the time goes for each area.
PROFILE_AREAS = {
    "passthrough": ("wrk agent", "passthrough"),
    "peer": ("wrk peer",),
    "fan-out": ("fan-out",),
    "snapshot": ("snapshot",),
}


def profiles(results: dict[str, Any]) -> dict[str, Any]:
    """Every profile of the run, by name."""
    found: dict[str, Any] = dict(results.get("profile", {}))
    for part in ("wrk", "grid", "snapshot"):
        found.update(results.get(part, {}).get("profiles", {}))
    return found


def _profile_lines(name: str, p: dict[str, Any]) -> list[str]:
    if not p.get("samples"):
        return []
    return [
        f"**{name}** ({p['samples']} samples)",
        "",
        "- by area: " + ", ".join(f"{k} {v}%" for k, v in p["buckets_pct"][:8]),
        "- own time: " + ", ".join(f"`{k}` {v}%" for k, v in p["own_pct"][:8]),
        "",
    ]


def markdown(results: dict[str, Any]) -> list[str]:
    """The aims table, where the time goes for those not met, and parts 8-10."""
    checked = aims(results)
    if not checked:
        return []
    lines = [
        "## Issue #12's aims",
        "",
        "| Aim | Measured | Ratio | Met? |",
        "|---|---|---|---|",
    ]
    for a in checked:
        met = {True: "yes", False: "**no**", None: "-"}[a["met"]]
        lines.append(f"| {a['aim']} | {a['measured']} | {a['ratio']} | {met} |")
    missed = list(dict.fromkeys(a["area"] for a in checked if a["met"] is False))
    found = profiles(results)
    if missed:
        lines += [
            "",
            "### Where the time goes, for the aims not met",
            "",
            "For each area with an aim not met: what stands in the way, with this run's "
            "figures, then the py-spy profiles it reads (share of the agent's samples by "
            "area, and by function's own time).",
            "",
        ]
        for area in missed:
            lines += [f"#### {area}", ""]
            said = obstacles.statement(area, results, found)
            lines += [said or "Nothing in this run says more than the figures above.", ""]
            names = [n for n in found if n.startswith(PROFILE_AREAS.get(area, ()))]
            for name in names:
                lines += _profile_lines(name, found[name])
    lines += _wrk_section(results) + _grid_section(results) + _snapshot_section(results)
    return lines


def _s(spread: dict[str, Any]) -> str:
    if spread.get("median") is None:
        return "-"
    return f"{spread['median']:g} ({spread['min']:g}-{spread['max']:g})"


def _wrk_section(results: dict[str, Any]) -> list[str]:
    part = results.get("wrk")
    if not part:
        return []
    lines = [
        "",
        "## 8. Passthrough CPU per request, wrk and http.client (fake engine, loopback)",
        "",
        "CPU µs per request of the serving process (Δ utime+stime from /proc ÷ requests), "
        "req/s, p50 and p99 ms; median (min-max) of the rounds. nginx_tls: nginx as a TLS "
        "reverse proxy to a fake engine, one process. agent: an agent whose engine is "
        '"not in a swarm". peer: a swarm agent with `X-PortainerAgent-Target` naming '
        "another, the entry agent's CPU (and both agents'). Without a suffix `--relay web`, "
        "`_bytes` `--relay bytes`, each on agents of its own. Signature: "
        + part["signature"]
        + ".",
        "",
        "| Generator | Request | c | Way in | CPU µs/req | both agents µs | req/s | p50 ms "
        "| p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in part["cells"]:
        for way in ("nginx_tls", *_ways(c, "agent"), *_ways(c, "peer")):
            w = c[way]
            peer = way.startswith("peer")
            lines.append(
                f"| {c['generator']} | {c['endpoint']} | {c['concurrency']} | {way} | "
                f"{_s(w['cpu_us'])} | {_s(w['cpu_us_all']) if peer else ''} | "
                f"{_s(w['rps'])} | {_s(w['p50_ms'])} | {_s(w['p99_ms'])} | {w['errors']} |"
            )
    return lines


def _grid_section(results: dict[str, Any]) -> list[str]:
    part = results.get("grid")
    if not part:
        return []
    lines = [
        "",
        "## 9. Cluster-wide list, 1-30 fake nodes",
        "",
        "Each cell: N fake engines (nginx, a static list of C synthetic containers per "
        "node) with a real agent each; `GET /containers/json?all=1` through node1's agent "
        "vs the client reading the N engine sockets itself, in parallel and in sequence; "
        "ms median (min-max); CPU ms per list of the entry agent and of all agents.",
        "",
        "| Nodes | per node | agent ms | parallel ms | sequential ms | agent/parallel | "
        "entry CPU ms | all agents CPU ms | body bytes | reps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in part["cells"]:
        if "error" in c:
            lines.append(f"| {c['nodes']} | {c['per_node']} | {c['error']} |" + " |" * 7)
            continue
        lines.append(
            f"| {c['nodes']} | {c['per_node']} | {_s(c['ms']['agent'])} | "
            f"{_s(c['ms']['parallel'])} | {_s(c['ms']['sequential'])} | "
            f"x{c['agent/parallel']} | {c['agent_cpu_ms_per_request']} | "
            f"{c['all_agents_cpu_ms_per_request']} | {c['agent_body_bytes']} | "
            f"{c['repetitions']} |"
        )
    idle = part.get("idle_rss_mb")
    if idle:
        lines += [
            "",
            "Entry agent's VmRSS once each cluster is known, before its lists (but after "
            "the smaller clusters' lists, whose high-water mark CPython keeps: only the "
            "first is a fresh idle figure): "
            + ", ".join(f"{n} nodes {mb} MB" for n, mb in idle.items())
            + ".",
        ]
    newest = part.get("idle_rss_newest_mb")
    if newest:
        lines += [
            "",
            "The agent started last at each N, idle, before any list of that N (a fresh "
            "figure): " + ", ".join(f"{n} nodes {mb} MB" for n, mb in newest.items()) + ".",
        ]
    return lines


def _snapshot_section(results: dict[str, Any]) -> list[str]:
    part = results.get("snapshot")
    if not part:
        return []
    lines = [
        "",
        "## 10. Portainer's snapshot on a lab swarm",
        "",
        f"The list, then an inspect of each running container ({part['plan']['running']} "
        "running per node), through node1's agent: untargeted (the agent locates each "
        "container) and targeted (the node the list named); ms of a whole snapshot, "
        "median [min, max] of the rounds, interleaved.",
        "",
        "| Nodes | inspects | untargeted ms | targeted ms | ratio |",
        "|---|---|---|---|---|",
    ]
    for s in part["cells"]:
        u, t = s["spread_ms"]["untargeted"], s["spread_ms"]["targeted"]
        lines.append(
            f"| {s['nodes']} | {s['inspects']} | {s['ms']['untargeted']} {u} | "
            f"{s['ms']['targeted']} {t} | x{s['untargeted/targeted']} |"
        )
    return lines
