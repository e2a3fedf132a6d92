"""What stands in the way of each issue #12 aim not met: a paragraph per area, with figures.

The reasons are the bench's reading of its own profiles (py-spy shares by
area, ``bench/profile.py``) and figures; each paragraph names the figures it
uses, so a later run re-states them with its own numbers.
"""

from __future__ import annotations

from typing import Any

#: The profile buckets (bench/profile.py) that are the cost of Python doing I/O.
REACTOR = ("reactor, sockets", "socket writes")
TLS = "TLS ("
WEB = ("twisted.web server", "twisted.web client", "header copying")


def share(profile: dict[str, Any] | None, *prefixes: str) -> float:
    """Percent of ``profile``'s samples in buckets whose label starts with any of ``prefixes``."""
    if not profile or not profile.get("samples"):
        return 0.0
    total: float = sum(v for k, v in profile["buckets_pct"] if k.startswith(prefixes))
    return round(total, 1)


def own(profile: dict[str, Any] | None, prefix: str) -> float:
    """Percent of ``profile``'s samples in the own time of functions named ``prefix``..."""
    if not profile or not profile.get("samples"):
        return 0.0
    total: float = sum(v for k, v in profile["own_pct"] if k.startswith(prefix))
    return round(total, 1)


def _median(cell: dict[str, Any], way: str, key: str) -> float:
    value: float = cell[way][key]["median"]
    return value


def _cell(results: dict[str, Any], endpoint: str, conc: int) -> dict[str, Any] | None:
    for c in results.get("wrk", {}).get("cells", []):
        if c["generator"] == "wrk" and c["endpoint"] == endpoint and c["concurrency"] == conc:
            found: dict[str, Any] = c
            return found
    return None


def _found(profiles: dict[str, Any], name: str) -> dict[str, Any] | None:
    p = profiles.get(name)
    return p if p and p.get("samples") else None


def passthrough(results: dict[str, Any], profiles: dict[str, Any], kind: str) -> str:
    """``kind`` ``agent`` (a local passthrough) or ``peer`` (forwarded to another agent)."""
    top = max((c["concurrency"] for c in results.get("wrk", {}).get("cells", [])), default=0)
    cell = _cell(results, "ping", top)
    if cell is None:
        return ""
    base = _median(cell, "nginx_tls", "cpu_us")
    said: list[str] = []
    io_us: list[float] = []
    for way, relay in ((kind, "web"), (f"{kind}_bytes", "bytes")):
        if way not in cell:
            said.append(
                f"`--relay {relay}` was not measured in this run's part 8 "
                "(`python -m bench --parts wrk` measures both side by side)."
            )
            continue
        cpu = _median(cell, way, "cpu_us")
        p = _found(profiles, f"wrk {way} ping c={top}")
        text = (
            f"With `--relay {relay}` a signed `_ping` at c={top} costs the "
            f"{'entry ' if kind == 'peer' else ''}agent {cpu:g} µs of CPU against nginx "
            f"TLS's {base:g} (x{cpu / base:.1f})"
        )
        if p is None:
            said.append(text + "; no profile of it in this run.")
            continue
        io = share(p, *REACTOR, TLS)
        io_us.append(io * cpu / 100)
        said.append(
            text + f"; py-spy ({p['samples']} samples): the reactor and sockets "
            f"{share(p, *REACTOR)}%, TLS {share(p, TLS)}%, twisted.web's server and client "
            f"{share(p, *WEB)}%, Deferreds {share(p, 'Deferred')}%, swarmagent's own code "
            f"{share(p, 'swarmagent')}%: about {io * cpu / 100:.0f} µs a request in the "
            "reactor and TLS alone" + _handshakes(own(p, "Connection.do_handshake"))
        )
    limit = 3 * base * (1.5 if kind == "peer" else 1)
    least = f" (at least {min(io_us):.0f} µs here)" if io_us else ""
    hops = (
        " A peer request crosses two agents and two TLS connections (client to entry, "
        "entry to the node's agent), so it pays this twice."
        if kind == "peer"
        else ""
    )
    return (
        " ".join(said)
        + " What stands in the way: every socket read and write goes through Twisted's "
        "reactor in Python (`epoll` dispatch, `doRead`, `untilConcludes(send)`), and every "
        "TLS record through pyOpenSSL's cffi calls (`recv`, `send`, `bio_read`, "
        "`bio_write`); nginx does the same in C. That fixed cost per request"
        f"{least} is already over the aim's {limit:.0f} µs before any HTTP is parsed, "
        "whichever front door parses it; `--relay bytes` removes twisted.web's share, not "
        "this one. Meeting the aim needs the TLS and the socket loop out of Python "
        "(issue #12's option 4: server TLS on the standard library's `ssl`, or a C front "
        "end)." + hops
    )


def _handshakes(pct: float) -> str:
    if pct < 2:
        return "."
    return (
        f", of which TLS handshakes (`do_handshake`'s own time) {pct}%: connections opened "
        "anew, by the generator or between agents beyond their pools."
    )


def fanout(results: dict[str, Any], profiles: dict[str, Any]) -> str:
    """The cluster-wide list: the ratio to the direct query, and the entry's CPU at 10 x 500."""
    cells = {(c["nodes"], c["per_node"]): c for c in results.get("grid", {}).get("cells", [])
             if "error" not in c}  # fmt: skip
    big, small = cells.get((10, 500)), cells.get((1, 10))
    if big is None:
        return ""
    cpu = big["agent_cpu_ms_per_request"]
    p = _found(profiles, "fan-out (fake) 10 x 500")
    parts = [
        f"At 10 x 500 the list takes {big['ms']['agent']['median']:g} ms through the agent "
        f"against {big['ms']['parallel']['median']:g} ms for the client's parallel query "
        f"of the 10 engine sockets; the entry agent spends {cpu:g} ms of CPU on it and all "
        f"ten agents {big['all_agents_cpu_ms_per_request']:g} ms, on 2 shared cores."
    ]
    if small is not None:
        parts.append(
            f"Even one node and 10 containers, with nothing to merge, is "
            f"x{small['agent/parallel']} ({small['ms']['agent']['median']:g} vs "
            f"{small['ms']['parallel']['median']:g} ms): the fake engine is nginx sending a "
            "static file on a unix socket, so the direct query costs almost nothing, while "
            "the agent's answer is encrypted for the client in Python (pyOpenSSL), and each "
            "other node's list crosses one more TLS hop in Python (its agent to the entry)."
        )
    rest = ""
    if p is not None:
        merge = share(p, "swarmagent.nodelist")
        left = cpu * (100 - merge - share(p, "swarmagent.locations")) / 100
        rest = (
            f" Even a free merge and no locations would leave about {left:.0f} ms of "
            "TLS, reactor and HTTP-client work per list, so both are needed."
        )
        parts.append(
            f"py-spy on the entry ({p['samples']} samples): the merge (msgspec splitting "
            f"each item by key, the node label spliced in, the items encoded again) "
            f"{merge}%, about {merge * cpu / 100:.0f} ms a list; the locations learning "
            f"every ID and name {share(p, 'swarmagent.locations')}%; the fan-out's own "
            f"code {share(p, 'swarmagent.fanout')}%; TLS {share(p, TLS)}%; the reactor "
            f"{share(p, *REACTOR)}%; twisted.web's client {share(p, 'twisted.web client')}%."
        )
    parts.append(
        "What stands in the way: the per-item work in Python (about 5000 items at 10 x "
        "500: split, tag, label, re-encode, remember), and TLS and socket I/O in Python for "
        "4.6 MB in and out. The issue's `list[msgspec.Raw]` with the tag spliced before "
        "each closing brace (2.7 ms) leaves out the label inside `Labels`: kept as `Raw`, "
        "with a small `Struct` read of each item and the label spliced in by byte search, "
        "the merge gave the same bytes but was no faster (59 vs 52 ms at 10 x 500, "
        "2026-11-30), the per-item Python work dominating either way. The 15 ms aim needs "
        "the per-item work out of Python (or peers that tag their own lists) and the TLS "
        "and socket I/O out of Python (as for the passthrough aims)." + rest + " The 1.2x "
        "ratio against a static answer is out "
        "of reach of any TLS hop in Python, and is better judged on real engines (part 2)."
    )
    return " ".join(parts)


def memory(results: dict[str, Any]) -> str:
    """Idle RSS: one node (part 4) and the fake grid's largest cluster."""
    grid = results.get("grid", {})
    newest, idle = grid.get("idle_rss_newest_mb", {}), grid.get("idle_rss_mb", {})
    if not newest and not idle:
        return ""
    figures = newest or idle
    first, last = min(figures, key=int), max(figures, key=int)
    return (
        f"The fresh idle figures grow from {figures[first]} MB at {first} node(s) to "
        f"{figures[last]} MB at {last} ({'the agent started last' if newest else 'the entry'}"
        "). No memory profile is taken: what an agent holds at rest is CPython with "
        "Twisted, pyOpenSSL and cryptography, msgspec and httptools imported, plus its "
        "table of peers and their pooled TLS connections; CPython keeps the high-water "
        "mark of a large list (the entry's figures). What stands in the way is that base, "
        "not yet measured by module (`tracemalloc` at start-up would say)."
    )


def streams(results: dict[str, Any]) -> str:
    if not results.get("streams"):
        return ""
    return (
        "Part 3 was not re-run with part 8's method and has no profile in this run; each "
        "chunk of a stream crosses the same Python reactor and pyOpenSSL calls as a "
        "passthrough request (see above), which is the likely cost, not yet measured."
    )


def statement(area: str, results: dict[str, Any], profiles: dict[str, Any]) -> str:
    """The paragraph for ``area`` ("" when the run has nothing to say it with)."""
    if area == "passthrough":
        return passthrough(results, profiles, "agent")
    if area == "peer":
        return passthrough(results, profiles, "peer")
    if area == "fan-out":
        return fanout(results, profiles)
    if area == "memory":
        return memory(results)
    if area == "streams":
        return streams(results)
    return ""
