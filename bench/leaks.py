"""Part 6: abandoned streams, round after round: does the agent's memory settle?

Each round opens ``streams`` followed streams through one agent (logs of a
container on this node and on another, the merged and one node's events),
waits for their heads, drops them all at once, and records the agent's RSS
and open sockets once it has let go. CPython keeps its heap's high-water
mark, so the first round's growth stays; a leak shows as growth that goes
on round after round.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.client import Target, tls_context
from bench.measure import rss_mb
from tests.lab import IMAGE, Node, wait_until


@dataclass(frozen=True)
class LeakPlan:
    rounds: int = 8
    streams: int = 100


def _sockets(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def _open(target: Target, path: str, header: str) -> ssl.SSLSocket:
    raw = socket.create_connection((target.host, target.port), timeout=30)
    s = tls_context(target.tls).wrap_socket(raw, server_hostname=target.host)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: agent\r\n{header}\r\n".encode())
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError(f"{path}: closed before the head")
        got += chunk
    if not got.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{path}: {got[:100]!r}")
    return s


def _ticker(node: Node) -> str:
    client = node.docker()
    try:
        c = client.containers.run(
            IMAGE, ["sh", "-c", "while true; do echo tick; sleep 0.1; done"], detach=True
        )
        return str(c.id)
    finally:
        client.close()


def run_leaks(
    entry: Target,
    pid: int,
    here: Node,
    there: Node,
    plan: LeakPlan,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """RSS (MB) and sockets of the agent at ``pid`` before and after each round."""
    local, remote = _ticker(here), _ticker(there)
    target = f"X-PortainerAgent-Target: {there.name}\r\n"
    kinds = [
        (f"/v1.41/containers/{remote}/logs?follow=1&stdout=1", target),
        (f"/v1.41/containers/{local}/logs?follow=1&stdout=1", ""),
        ("/v1.41/events", ""),
        ("/v1.41/events", target),
    ]
    for path, header in kinds:  # warm up: pooled connections, first imports
        _open(entry, path, header).close()
    time.sleep(2)
    base_sockets = _sockets(pid)
    result: dict[str, Any] = {
        "streams_per_round": plan.streams,
        "before": {"rss_mb": round(rss_mb(pid), 1), "sockets": base_sockets},
        "rounds": [],
    }
    for n in range(plan.rounds):
        streams = [_open(entry, *kinds[i % len(kinds)]) for i in range(plan.streams)]
        during = _sockets(pid)
        for s in streams:
            s.close()
        wait_until(lambda: _sockets(pid) <= base_sockets + 2, 30, 0.2, "streams let go")
        after = {"rss_mb": round(rss_mb(pid), 1), "sockets": _sockets(pid), "during": during}
        result["rounds"].append(after)
        log(f"  round {n + 1}: {during} sockets open, then {after['sockets']}; "
            f"RSS {after['rss_mb']} MB")  # fmt: skip
    return result
