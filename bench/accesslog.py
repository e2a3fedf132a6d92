"""Micro-benchmark: one access line through twisted.logger vs through ``LogFile``.

No lab, no request: only the line's cost. *twisted.logger* is how the line
was written before ``logfile.py``: ``log.info("{line}", **fields)`` through
the LOG_LEVEL filter to twistd's observer (text, or ``eventAsJSON``), flushed
per line. *LogFile* is the agent's way now. Both write to an in-memory file
(so no system call is counted: the old way's flush per line costs one more
under twistd). CPU µs per line, medians with p25-p75 over interleaved rounds::

    python -m bench.accesslog [--lines 20000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher, jsonFileLogObserver, textFileLogObserver

from swarmagent.access import NAMESPACE
from swarmagent.logfile import LogFile
from swarmagent.logs import logger

LINE = "GET /v1.41/containers/abc/json local nodes=node1 200 5120B 0.8ms client=key:0123 missing=-"
FIELDS: dict[str, object] = {
    "method": "GET",
    "path": "/v1.41/containers/abc/json",
    "route": "local",
    "nodes": "node1",
    "status": 200,
    "bytes": 5120,
    "ms": 0.8,
    "client": "key:0123456789abcdef",
    "missing": "-",
}


def through_twisted_logger(as_json: bool, lines: int) -> float:
    out = io.StringIO()
    observer = jsonFileLogObserver(out, recordSeparator="") if as_json else textFileLogObserver(out)
    globalLogPublisher.addObserver(observer)
    log = logger(NAMESPACE)
    try:
        started = time.process_time()
        for _ in range(lines):
            log.info("{line}", line=LINE, **FIELDS)
        return time.process_time() - started
    finally:
        globalLogPublisher.removeObserver(observer)


def through_log_file(as_json: bool, lines: int) -> float:
    clock = MemoryReactorClock()
    log_file = LogFile(io.StringIO(), clock, json=as_json)
    started = time.process_time()
    for _ in range(lines):
        log_file.info(NAMESPACE, LINE, FIELDS)
        # The flush once per reactor turn, as if each line had a turn of its own.
        clock.advance(0)
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    ways: dict[str, Callable[[bool, int], float]] = {
        "twisted.logger": through_twisted_logger,
        "LogFile": through_log_file,
    }
    for as_json in (False, True):
        runs: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, way in ways.items():
                runs[name].append(way(as_json, args.lines) / args.lines * 1e6)
        print("json" if as_json else "text")
        for name, us in runs.items():
            q = statistics.quantiles(us, n=4)
            print(
                f"  {name:15} {statistics.median(us):6.1f} µs/line (p25 {q[0]:.1f}, p75 {q[2]:.1f})"
            )


if __name__ == "__main__":
    main()
