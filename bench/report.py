"""Targets checked against the figures, the Markdown table and the fan-out plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import aims

FANOUT_LIMIT = 1.2
ADDED_P50_MS = 0.5
NGINX_SHARE = 0.5
STREAM_SHARE = 0.8
FLAT_RSS_MB = 10.0
IDLE_RSS_MB = 60.0


def _cells(results: dict[str, Any], part: str) -> list[dict[str, Any]]:
    return list(results.get(part, {}).get("cells", []))


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured figure and whether it is met."""
    out: list[dict[str, Any]] = []

    def add(name: str, figure: str, met: bool | None) -> None:
        out.append({"target": name, "figure": figure, "met": met})

    fan = _cells(results, "fanout")
    if fan:
        worst = max(fan, key=lambda c: c["agent/parallel"])
        add(
            f"cluster-wide list within {FANOUT_LIMIT}x the client's parallel direct query "
            "(N <= 10, every container count)",
            f"worst x{worst['agent/parallel']} at N={worst['nodes']} x {worst['per_node']} "
            f"containers; met in {sum(c['agent/parallel'] <= FANOUT_LIMIT for c in fan)}"
            f"/{len(fan)} cells",
            worst["agent/parallel"] <= FANOUT_LIMIT,
        )
    cells = _cells(results, "passthrough")
    small = [c for c in cells if c["endpoint"] in ("ping", "inspect") and c["concurrency"] == 1]
    if small:
        added = [(c["endpoint"], c["agent/engine"]["added_p50_ms"]) for c in small]
        add(
            f"passthrough adds < {ADDED_P50_MS} ms at p50 to small requests (c=1, vs engine)",
            ", ".join(f"{e}: +{a:.2f} ms" for e, a in added),
            all(a < ADDED_P50_MS for _, a in added),
        )
    top = max((c["concurrency"] for c in cells), default=0)
    for base in ("nginx_tls", "nginx"):
        at64 = [c for c in cells if c["concurrency"] == top and f"agent/{base}" in c]
        if at64:
            shares = [(c["endpoint"], c[f"agent/{base}"]["rps"]) for c in at64]
            add(
                f"throughput >= {NGINX_SHARE:.0%} of {base} at c={top}",
                ", ".join(f"{e}: x{s}" for e, s in shares),
                all(s >= NGINX_SHARE for _, s in shares),
            )
    streams = results.get("streams")
    if streams:
        for label in ("image_get", "logs_follow"):
            s = streams[label]
            add(
                f"{label}: >= {STREAM_SHARE:.0%} of direct throughput, RSS flat "
                f"(peak within {FLAT_RSS_MB:g} MB of before)",
                f"x{s['agent/engine']} ({s['agent_MBps']['median']} vs "
                f"{s['engine_MBps']['median']} MB/s)"
                + (
                    f"; x{s['agent_MBps']['median'] / s['nginx_tls_MBps']['median']:.2f} "
                    "of nginx_tls"
                    if "nginx_tls_MBps" in s
                    else ""
                )
                + f"; RSS +{s['rss_growth_mb']} MB",
                s["agent/engine"] >= STREAM_SHARE and s["rss_growth_mb"] <= FLAT_RSS_MB,
            )
    mem = results.get("passthrough", {}).get("memory")
    if mem:
        add(
            f"RSS idle < {IDLE_RSS_MB:g} MB",
            f"{mem['idle_mb']} MB",
            mem["idle_mb"] < IDLE_RSS_MB,
        )
    return out


def _spread(s: dict[str, Any], unit: str = "") -> str:
    if s.get("median") is None:
        return "-"
    return f"{s['median']:g}{unit} ({s['p25']:g}-{s['p75']:g})"


def markdown(results: dict[str, Any]) -> str:
    """``latest.md``: targets first, then one table per part."""
    meta = results["meta"]
    lines = [
        f"# swarmagent bench — {meta['mode']} run, {meta['date']}",
        "",
        f"Machine: {meta['machine']}. Run time {meta['seconds']:.0f} s. "
        + (
            f"Load average {meta['loadavg_start']} at the start and {meta['loadavg_end']} "
            "at the end: "
            + (meta.get("noise") or "the run shares the machine with whatever else runs")
            + ". "
            if "loadavg_start" in meta
            else ""
        )
        + (
            "Load average (1, 5, 15 min) and time at the start of each part: "
            + ", ".join(f"{k} {v}" for k, v in meta["loadavg_parts"].items())
            + ". "
            if meta.get("loadavg_parts")
            else ""
        )
        + (f"Parts kept from the run of {meta['kept_from']}. " if meta.get("kept_from") else "")
        + "Parts 1-7 drive every path with one client library (`http.client`, keep-alive; "
        "the agent over HTTPS with a client certificate, the engine on its unix socket), "
        "medians with p25-p75 in brackets; parts 8-10 are issue #12's method (wrk, CPU per "
        "request, a fake cluster, the snapshot on a lab swarm), medians with min-max.",
        "",
        *aims.markdown(results),
        "",
        "## Targets (before issue #12)",
        "",
        "| Target | Measured | Met |",
        "|---|---|---|",
    ]
    for t in results.get("targets", []):
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {t['figure']} | {met} |")
    cells = _cells(results, "passthrough")
    if cells:
        names = [n for n in ("engine", "nginx", "nginx_tls", "agent") if n in cells[0]]
        lines += [
            "",
            "## 1. Passthrough, one node",
            "",
            "Latency in ms, requests/s over the window; median of the repetitions with "
            "p25-p75 in brackets. nginx: one worker, plain HTTP and HTTPS on the same "
            "certificate as the agent. The agent gets `X-PortainerAgent-Target` (sent "
            "to every path), so the list is a passthrough too.",
            "",
            "| Request | c | Path | p50 ms | p99 ms | req/s | agent CPU ms/req |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in cells:
            for n in names:
                cpu = c[n].get("agent_cpu_ms_per_request")
                lines.append(
                    f"| {c['endpoint']} | {c['concurrency']} | {n} | {_spread(c[n]['p50_ms'])} | "
                    f"{_spread(c[n]['p99_ms'])} | {_spread(c[n]['rps'])} | "
                    f"{_spread(cpu) if cpu else ''} |"
                )
        lines += [
            "",
            "Ratios of medians, agent over each baseline (p50 latency; req/s; p50 ms added):",
            "",
            "| Request | c | " + " | ".join(f"agent/{b}" for b in names[:-1]) + " |",
            "|---|---|" + "---|" * (len(names) - 1),
        ]
        for c in cells:
            row = [c["endpoint"], str(c["concurrency"])]
            for b in names[:-1]:
                r = c.get(f"agent/{b}")
                row.append(f"x{r['p50']}; x{r['rps']}; {r['added_p50_ms']:+g} ms" if r else "-")
            lines.append("| " + " | ".join(row) + " |")
    mem = results.get("passthrough", {}).get("memory")
    if mem:
        lines += [
            "",
            "## 4. Agent memory (VmRSS)",
            "",
            f"Idle {mem['idle_mb']} MB; peak under the c=64 load {mem['peak_under_c64_mb']} MB; "
            f"2 s after the load {mem['after_load_mb']} MB.",
        ]
    fan = _cells(results, "fanout")
    if fan:
        lines += [
            "",
            "## 2. Fan-out: `GET /containers/json?all=1` through one agent",
            "",
            "Wall time (ms) of the agent's answer vs the bench client asking the same engines "
            "directly, in parallel (threads) and one after the other; the agent's CPU per "
            "request (entry agent, and all agents together).",
            "",
            "| Nodes | per node | agent ms | parallel ms | sequential ms | agent/parallel "
            "| agent/sequential | entry agent CPU ms | all agents CPU ms | reps |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in fan:
            lines.append(
                f"| {c['nodes']} | {c['per_node']} | {_spread(c['ms']['agent'])} | "
                f"{_spread(c['ms']['parallel'])} | {_spread(c['ms']['sequential'])} | "
                f"x{c['agent/parallel']} | x{c['agent/sequential']} | "
                f"{c['agent_cpu_ms_per_request']} | {c['all_agents_cpu_ms_per_request']} | "
                f"{c['repetitions']} |"
            )
        made = results["fanout"].get("creation", [])
        if made:
            lines += [
                "",
                "Container creation: "
                + "; ".join(
                    f"{m['per_node']}/node on {m['nodes']} nodes in {m['seconds']} s" for m in made
                )
                + ".",
            ]
    streams = results.get("streams")
    if streams:
        lines += [
            "",
            "## 3. Streams",
            "",
            "MB/s from the first byte to the end; agent RSS sampled every 20 ms; agent CPU "
            "as a share of one core over the stream.",
            "",
            "| Stream | MB | Path | MB/s | agent/path | agent RSS before MB | agent RSS peak MB "
            "| agent CPU % |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label in ("image_get", "logs_follow"):
            s = streams[label]
            names = [k[: -len("_MBps")] for k in s if k.endswith("_MBps")]
            agent = s["agent_MBps"]["median"]
            for n in names:
                ratio = round(agent / s[n + "_MBps"]["median"], 2) if n != "agent" else ""
                extra = (
                    f"{_spread(s['agent_rss_before_mb'])} | {_spread(s['agent_rss_peak_mb'])} | "
                    f"{_spread(s['agent_cpu_pct'])}"
                    if n == "agent"
                    else " | | "
                )
                lines.append(
                    f"| {label} | {s['bytes'] / 1e6:.0f} | {n} | {_spread(s[n + '_MBps'])} | "
                    f"{'x' + str(ratio) if ratio else ''} | {extra} |"
                )
    disc = results.get("discovery")
    if disc:
        settings = ", ".join(f"{k}={v}" for k, v in disc["settings"].items())
        lines += [
            "",
            "## 5. Discovery",
            "",
            f"Join {_spread(disc['join_s'], ' s')}; leave {_spread(disc['leave_s'], ' s')} "
            f"(n={disc['join_s']['n']}). {disc['note']}. Settings: {settings}.",
        ]
    leaks = results.get("leaks")
    if leaks:
        lines += [
            "",
            f"## 6. Abandoned streams ({leaks['streams_per_round']} per round, through one agent)",
            "",
            "| after round | 0 | "
            + " | ".join(str(i + 1) for i in range(len(leaks["rounds"])))
            + " |",
            "|---|---|" + "---|" * len(leaks["rounds"]),
            f"| RSS (MB) | {leaks['before']['rss_mb']} | "
            + " | ".join(str(r["rss_mb"]) for r in leaks["rounds"])
            + " |",
            f"| sockets (open during the round) | {leaks['before']['sockets']} | "
            + " | ".join(f"{r['sockets']} ({r['during']})" for r in leaks["rounds"])
            + " |",
        ]
    obs = results.get("observability")
    if obs:
        setups = ("none", "metrics", "metrics+text_log", "metrics+json_log")
        lines += [
            "",
            "## 7. Metrics and the access log, CPU per request (in process)",
            "",
            "The agent's root on an in-memory connection and engine (`bench/observability.py`): "
            "no accounting, metrics only (`--access-log off`), metrics and the access log as "
            "text or JSON. µs of CPU per request (median), and what each adds; add it to "
            "part 1's per-request CPU.",
            "",
            "| Request | " + " | ".join(setups) + " |",
            "|---|" + "---|" * len(setups),
        ]
        for cell in obs["cells"]:
            row = [
                f"{cell[n]['cpu_us']:g} µs"
                + (f" (+{cell[n]['added_us']:g})" if n != "none" else "")
                for n in setups
            ]
            lines.append(f"| {cell['endpoint']} | " + " | ".join(row) + " |")
    prof = aims.profiles(results)
    if prof:
        lines += ["", "## Profiles (py-spy, share of the agent's samples)", ""]
        for name, p in prof.items():
            if not p.get("samples"):
                continue
            lines.append(f"**{name}** ({p['samples']} samples)")
            lines.append("")
            lines.append("- by area: " + ", ".join(f"{k} {v}%" for k, v in p["buckets_pct"][:8]))
            lines.append("- own time: " + ", ".join(f"`{k}` {v}%" for k, v in p["own_pct"][:8]))
            lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> bool:
    """Fan-out latency vs node count, one colour per container count; False without matplotlib."""
    fan = _cells(results, "fanout")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not fan:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=90)
    counts = sorted({c["per_node"] for c in fan})
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    styles = {"agent": "-o", "parallel": "--s", "sequential": ":^"}
    for i, count in enumerate(counts):
        rows = sorted((c for c in fan if c["per_node"] == count), key=lambda c: c["nodes"])
        xs = [c["nodes"] for c in rows]
        for kind, style in styles.items():
            med = [c["ms"][kind]["median"] for c in rows]
            lo = [c["ms"][kind]["median"] - c["ms"][kind]["p25"] for c in rows]
            hi = [c["ms"][kind]["p75"] - c["ms"][kind]["median"] for c in rows]
            ax.errorbar(
                xs,
                med,
                yerr=[lo, hi],
                fmt=style,
                color=colours[i % len(colours)],
                label=f"{kind}, {count}/node",
                markersize=4,
                capsize=2,
            )
    ax.set_xlabel("nodes")
    ax.set_ylabel("GET /containers/json?all=1, ms (median, p25-p75)")
    ax.set_yscale("log")
    ax.set_xticks(sorted({c["nodes"] for c in fan}))
    ax.set_title("Cluster-wide list: agent vs direct parallel / sequential")
    ax.legend(fontsize=7, ncol=len(counts))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
