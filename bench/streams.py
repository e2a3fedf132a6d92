"""Part 3: large and chatty streams through the agent vs the engine; the agent's RSS."""

from __future__ import annotations

import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.client import Target, get
from bench.measure import RssSampler, cpu_seconds, rss_mb, spread
from tests.lab import IMAGE, Node

BLOB_IMAGE = "benchblob:latest"
CHUNK = 256 * 1024


@dataclass(frozen=True)
class StreamPlan:
    """Image size, log volume and repetitions."""

    image_mb: int = 300
    log_lines: int = 400_000
    repetitions: int = 3


def make_blob_image(node: Node, folder: Path, megabytes: int) -> int:
    """``docker import`` a tarball holding ``megabytes`` MB of random data; its size."""
    tar_path = folder / f"blob-{megabytes}.tar"
    data = folder / "blob.bin"
    with open(data, "wb") as f:
        for _ in range(megabytes):
            f.write(os.urandom(1 << 20))
    with tarfile.open(tar_path, "w") as tar:
        tar.add(str(data), "blob.bin")
    data.unlink()
    client = node.docker(timeout=300)
    try:
        client.api.import_image(src=str(tar_path), repository="benchblob", tag="latest")
        size = int(client.api.inspect_image(BLOB_IMAGE)["Size"])
    finally:
        client.close()
        tar_path.unlink()
    return size


def _stream(target: Target, path: str) -> tuple[float, int, float]:
    """GET a stream to its end: (seconds from first byte, bytes, seconds to first byte)."""
    conn = target.connect(300)
    try:
        t0 = time.perf_counter()
        conn.request("GET", path, headers=dict(target.headers))
        r = conn.getresponse()
        first = r.read(1)
        t1 = time.perf_counter()
        total = len(first)
        while data := r.read(CHUNK):
            total += len(data)
        if r.status != 200:
            raise RuntimeError(f"{target.name} {path}: {r.status}")
        return time.perf_counter() - t1, total, t1 - t0
    finally:
        conn.close()


def _chatty_container(node: Node, lines: int) -> str:
    client = node.docker()
    try:
        line = "chatty " + "x" * 72
        cmd = ["sh", "-c", f"sleep 0.3; yes '{line}' | head -n {lines}"]
        c = client.api.create_container(IMAGE, cmd)
        client.api.start(c["Id"])
        return str(c["Id"])
    finally:
        client.close()


def _remove(node: Node, cid: str) -> None:
    client = node.docker()
    try:
        client.api.remove_container(cid, force=True)
    finally:
        client.close()


def run_streams(
    node: Node, targets: list[Target], pid: int, plan: StreamPlan, folder: Path, log: Any
) -> dict[str, Any]:
    """Image export and followed logs through each target in turn (engine first, agent last)."""
    agent = targets[-1]
    t0 = time.monotonic()
    size = make_blob_image(node, folder, plan.image_mb)
    log(f"  image of {size / 1e6:.0f} MB imported in {time.monotonic() - t0:.1f} s")
    out: dict[str, Any] = {"plan": plan.__dict__, "image_bytes": size}
    get(agent.connect(), "/_ping", dict(agent.headers))  # the agent is warm
    for label in ("image_get", "logs_follow"):
        rates: dict[str, list[float]] = {t.name: [] for t in targets}
        peaks: list[float] = []
        busy: list[float] = []
        before: list[float] = []
        nbytes = 0
        for _ in range(plan.repetitions):
            for t in targets:
                cid = ""
                if label == "image_get":
                    path = f"/images/{BLOB_IMAGE}/get"
                else:
                    cid = _chatty_container(node, plan.log_lines)
                    path = f"/containers/{cid}/logs?follow=1&stdout=1&stderr=1"
                rss0 = rss_mb(pid)
                cpu0 = cpu_seconds(pid)
                with RssSampler(pid, 0.02) as sampler:
                    seconds, nbytes, ttfb = _stream(t, path)
                cpu = cpu_seconds(pid) - cpu0
                if cid:
                    _remove(node, cid)
                rates[t.name].append(nbytes / seconds / 1e6)
                if t.name == "agent":
                    before.append(rss0)
                    peaks.append(sampler.peak)
                    busy.append(100 * cpu / (seconds + ttfb))
        cell: dict[str, Any] = {
            "bytes": nbytes,
            **{f"{name}_MBps": spread(r, 1) for name, r in rates.items()},
            "agent_rss_before_mb": spread(before, 1),
            "agent_rss_peak_mb": spread(peaks, 1),
            "agent_cpu_pct": spread(busy, 0),
        }
        cell["agent/engine"] = round(
            cell["agent_MBps"]["median"] / cell["engine_MBps"]["median"], 2
        )
        cell["rss_growth_mb"] = round(max(peaks) - min(before), 1)
        speeds = ", ".join(f"{n} {cell[n + '_MBps']['median']:.0f}" for n in rates)
        log(
            f"  {label:11} MB/s: {speeds} (agent x{cell['agent/engine']}), agent RSS "
            f"{min(before):.0f} -> peak {max(peaks):.0f} MB, agent CPU {max(busy):.0f}%"
        )
        out[label] = cell
    return out
