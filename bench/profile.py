"""Sampling the agent with py-spy under a load, and where its time goes."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

_LINE = re.compile(r":\d+\)$")

#: Buckets for the summary: first matching pattern of a stack's frames, leaf first.
BUCKETS: tuple[tuple[str, str], ...] = (
    ("json encode/decode", "json/"),
    ("TLS (pyOpenSSL / twisted.protocols.tls)", "OpenSSL/"),
    ("TLS (pyOpenSSL / twisted.protocols.tls)", "protocols/tls.py"),
    ("header copying (http_headers)", "http_headers.py"),
    ("swarmagent.fanout", "swarmagent/fanout.py"),
    ("swarmagent.nodelist (the merge: split, tag, encode)", "swarmagent/nodelist.py"),
    ("swarmagent.locations", "swarmagent/locations.py"),
    ("swarmagent.relay (the byte front door)", "swarmagent/relay.py"),
    # Its own time is the socket's send(2), called at once instead of on the next poll.
    ("socket writes (swarmagent.eager)", "swarmagent/eager.py"),
    ("TLS (pyOpenSSL / twisted.protocols.tls)", "swarmagent/halfclose.py"),
    ("swarmagent.nodes", "swarmagent/nodes.py"),
    ("swarmagent.proxy", "swarmagent/proxy.py"),
    ("swarmagent.api/routing/auth", "swarmagent/"),
    ("twisted.web client (_newclient)", "web/_newclient.py"),
    ("twisted.web client (client.py)", "web/client.py"),
    ("twisted.web server (http.py/server.py)", "web/http.py"),
    ("twisted.web server (http.py/server.py)", "web/server.py"),
    ("Deferred machinery", "internet/defer.py"),
    ("reactor, sockets (epoll, tcp, unix)", "internet/"),
)


def available() -> bool:
    return shutil.which("py-spy") is not None


def record(pid: int, seconds: int, out: Path, work: Callable[[], Any]) -> Any:
    """Run ``work()`` while py-spy samples ``pid`` for ``seconds``; returns its result."""
    cmd = [
        "py-spy", "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200",
        "--format", "raw", "--output", str(out), "--nonblocking",
    ]  # fmt: skip
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        return work()
    finally:
        try:
            spy.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(5)


def summarize(raw: Path, top: int = 12) -> dict[str, Any]:
    """Own-time and inclusive-time shares per function, and per bucket, of a raw profile."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    total = 0
    if not raw.exists():
        return {"samples": 0}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        # Drop the thread/process label py-spy may put first.
        frames = [f for f in frames if "(" in f]
        if not frames:
            continue
        total += count
        own[_short(frames[-1])] += count
        for f in set(frames):
            incl[_short(f)] += count
        buckets[_bucket(frames)] += count

    def share(c: Counter[str]) -> list[list[Any]]:
        return [[k, round(100 * v / total, 1)] for k, v in c.most_common(top)]

    return {
        "samples": total,
        "own_pct": share(own),
        "inclusive_pct": share(incl),
        "buckets_pct": share(buckets),
    }


def _short(frame: str) -> str:
    name, _, where = frame.partition(" (")
    parts = where.rstrip(")").split("/")
    return f"{name} ({'/'.join(parts[-2:])})"


def _bucket(frames: list[str]) -> str:
    for frame in reversed(frames):
        for label, pattern in BUCKETS:
            if pattern in frame:
                return label
    return "other"
