"""The front door's cost per request with ``wrk``: agents side by side, no lab, no root.

A fake engine (nginx on a unix socket: ``/_ping`` and an 84 KB container
list) and one agent per variant, each ``--relay bytes`` or ``--relay web``
and run from a source tree of its own (``--variant NAME=MODE[@SRC]``; a
commit to compare is exported with ``git archive``). Every cell is ``wrk``
over TLS with Portainer's signature for ``--seconds``, the variants
interleaved in each of ``--rounds`` rounds; the agent's CPU per request is
its ``/proc/PID/stat`` user + system time over wrk's request count.

    python -m bench.relay                       # bytes against web, this tree
    python -m bench.relay --variant old=bytes@/tmp/old --rounds 5
    python -m bench.relay --profile /tmp/prof   # then py-spy on each under ping c=64

Figures on a shared machine are noisy: compare variants of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from bench import profile
from bench.measure import cpu_seconds, spread
from swarmagent.signature import Signer

ENGINE_CONF = """\
daemon off;
worker_processes 1;
pid {tmp}/engine.pid;
error_log {tmp}/engine-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    keepalive_requests 1000000;
    server {{
        listen unix:{tmp}/engine.sock;
        location = /_ping {{ default_type text/plain; return 200 "OK"; }}
        location = /containers/json {{ default_type application/json; alias {tmp}/list.json; }}
        location / {{ default_type application/json; return 200 "{{}}"; }}
    }}
}}
"""
PATHS = {"ping": "/_ping", "list84k": "/containers/json"}
SECRET = "bench-relay"
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _list(path: Path) -> None:
    """An 84 KB JSON container list."""
    items = [
        {
            "Id": f"{i:064x}",
            "Names": [f"/c{i}"],
            "Image": "nginx:latest",
            "State": "running",
            "Labels": {"a": "b" * 20},
        }
        for i in range(465)
    ]
    path.write_text(json.dumps(items))


def _wait(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on {port}")


def _wrk(url: str, conc: int, seconds: float, headers: dict[str, str]) -> int:
    args = ["wrk", "-t2", f"-c{conc}", f"-d{seconds:g}s"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m is None or bad is not None or not int(m.group(1)):
        raise RuntimeError(f"wrk: {out}")
    return int(m.group(1))


def _profile(
    out: Path, agents: dict[str, tuple[int, int]], seconds: float, headers: dict[str, str]
) -> None:
    """Each variant sampled by py-spy under ``GET /_ping`` at c=64: its top functions."""
    out.mkdir(parents=True, exist_ok=True)
    for name, (port, pid) in agents.items():
        raw = out / f"{name}.txt"
        url = f"https://127.0.0.1:{port}{PATHS['ping']}"
        profile.record(pid, int(seconds), raw, partial(_wrk, url, 64, seconds, headers))
        summary = profile.summarize(raw, top=25)
        print(f"\n{name}: {summary['samples']} samples ({raw})")
        for kind in ("own_pct", "inclusive_pct"):
            print(f"  {kind}:")
            for where, pct in summary.get(kind, []):
                print(f"    {pct:5.1f}  {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], help="NAME=bytes|web[@SRC]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, action="append", default=[])
    parser.add_argument("--path", action="append", default=[], choices=sorted(PATHS))
    parser.add_argument(
        "--profile", type=Path, help="after the rounds, py-spy each variant under ping c=64 (DIR)"
    )
    args = parser.parse_args()
    variants = args.variant or ["bytes=bytes", "web=web"]
    concurrencies = args.concurrency or [16, 64]
    tmp = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    tmp.chmod(0o755)  # nginx's worker (nobody) reads the list
    procs: list[subprocess.Popen[bytes]] = []
    try:
        _list(tmp / "list.json")
        (tmp / "engine.conf").write_text(ENGINE_CONF.format(tmp=tmp))
        procs.append(subprocess.Popen(["nginx", "-p", str(tmp), "-c", str(tmp / "engine.conf")]))
        agents: dict[str, tuple[int, int]] = {}
        for spec in variants:
            name, _, rest = spec.partition("=")
            mode, _, src = rest.partition("@")
            src = src or str(ROOT)
            port = _free_port()
            data = tmp / f"data-{name}"
            data.mkdir()
            env = {
                **os.environ,
                "PYTHONPATH": src,
                "AGENT_SECRET": SECRET,
                "LOG_LEVEL": "ERROR",
            }
            cmd = [
                sys.executable, "-m", "twisted", "--log-file", str(tmp / f"{name}.log"),
                "swarmagent", "--host", "127.0.0.1", "--port", str(port),
                "--docker-host", f"unix://{tmp}/engine.sock", "--data-path", str(data),
                "--relay", mode,
            ]  # fmt: skip
            proc = subprocess.Popen(cmd, cwd=src, env=env)
            procs.append(proc)
            _wait(port, proc, name)
            agents[name] = (port, proc.pid)
        headers = Signer.generate(SECRET).headers()
        cells: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for label in args.path or PATHS:
                path = PATHS[label]
                for conc in concurrencies:
                    for name, (port, pid) in agents.items():
                        before = cpu_seconds(pid)
                        count = _wrk(f"https://127.0.0.1:{port}{path}", conc, args.seconds, headers)
                        cpu_us = 1e6 * (cpu_seconds(pid) - before) / count
                        key = f"{label} c={conc} {name}"
                        cells.setdefault(key, []).append(cpu_us)
                        cells.setdefault(key + " req/s", []).append(count / args.seconds)
        for key, values in cells.items():
            s = spread(values, 1)
            unit = "" if key.endswith("req/s") else " CPU us/request"
            print(f"{key:32} median {s['median']:>9}{unit}  (min {s['min']}, max {s['max']})")
        if args.profile is not None:
            _profile(args.profile, agents, args.seconds, headers)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
