"""Statistics over repeated runs, and a process's CPU time and memory from /proc."""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any

TICK = 1.0 / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (0-100), linear between closest ranks."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def spread(values: list[float], digits: int = 4) -> dict[str, Any]:
    """Median with p25-p75 and min-max of repeated runs."""
    if not values:
        return {"median": None, "p25": None, "p75": None, "min": None, "max": None, "n": 0}

    def r(x: float) -> float:
        return round(x, digits)

    return {
        "median": r(statistics.median(values)),
        "p25": r(percentile(values, 25)),
        "p75": r(percentile(values, 75)),
        "min": r(min(values)),
        "max": r(max(values)),
        "n": len(values),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (clock-tick resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After "pid (comm)": state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) * TICK


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler:
    """Samples a process's VmRSS every ``interval`` s in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(rss_mb(self.pid))
            except OSError:
                return
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def peak(self) -> float:
        return max(self.samples, default=float("nan"))

    @property
    def first(self) -> float:
        return self.samples[0] if self.samples else float("nan")
