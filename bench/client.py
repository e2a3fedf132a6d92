"""The one client library every compared path uses: ``http.client`` keep-alive connections.

A :class:`Target` says how to reach a server (unix socket, TCP or TLS); the
load generator runs ``processes x threads`` workers, one persistent connection
each, for a bounded time and count, and returns every latency measured in the
timed window.
"""

from __future__ import annotations

import http.client
import multiprocessing
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a unix socket (the engine's)."""

    def __init__(self, path: str, timeout: float = 60) -> None:
        super().__init__("docker", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


@dataclass(frozen=True)
class Target:
    """One way to reach a Docker API: the engine, nginx or an agent."""

    name: str
    unix: str = ""
    host: str = ""
    port: int = 0
    #: Lab TLS folder (ca.pem, cert.pem, key.pem): https with a client certificate.
    tls: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    def connect(self, timeout: float = 60) -> http.client.HTTPConnection:
        """A new (lazy) keep-alive connection."""
        if self.unix:
            return UnixHTTPConnection(self.unix, timeout)
        if self.tls:
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout, context=tls_context(self.tls)
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


_contexts: dict[tuple[str, int], ssl.SSLContext] = {}


def tls_context(folder: str) -> ssl.SSLContext:
    """Verify against the lab CA and present its client certificate (cached per CA file)."""
    key = (folder, os.stat(f"{folder}/ca.pem").st_mtime_ns)
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = ssl.create_default_context(cafile=f"{folder}/ca.pem")
        ctx.check_hostname = False
        ctx.load_cert_chain(f"{folder}/cert.pem", f"{folder}/key.pem")
        _contexts[key] = ctx
    return ctx


def get(
    conn: http.client.HTTPConnection, path: str, headers: dict[str, str], chunk: int = 0
) -> tuple[int, int]:
    """GET ``path`` on ``conn``; read the whole body. Returns (status, bytes)."""
    conn.request("GET", path, headers=headers)
    r = conn.getresponse()
    if not chunk:
        return r.status, len(r.read())
    total = 0
    while data := r.read(chunk):
        total += len(data)
    return r.status, total


def fetch(target: Target, path: str, timeout: float = 60) -> tuple[int, bytes]:
    """One request on a fresh connection, body returned."""
    conn = target.connect(timeout)
    try:
        conn.request("GET", path, headers=dict(target.headers))
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@dataclass
class LoadResult:
    """Latencies (seconds) of requests completed in the window, and errors."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    window: float = 0.0


def _thread_loop(
    target: Target,
    path: str,
    start: float,
    stop: float,
    max_requests: int,
    out: LoadResult,
    lock: threading.Lock,
) -> None:
    conn = target.connect(30)
    headers = dict(target.headers)
    mine: list[float] = []
    errors = 0
    try:
        for _ in range(3):  # warm up: connect, TLS handshake, first allocations
            get(conn, path, headers)
        while time.time() < start:
            time.sleep(0.001)
        for _ in range(max_requests):
            t0 = time.perf_counter()
            if time.time() >= stop:
                break
            try:
                status, _n = get(conn, path, headers)
                if status >= 400:
                    errors += 1
            except (OSError, http.client.HTTPException):
                errors += 1
                conn.close()
                conn = target.connect(30)
                continue
            if time.time() <= stop:
                mine.append(time.perf_counter() - t0)
    except (OSError, http.client.HTTPException):
        errors += 1
    finally:
        conn.close()
    with lock:
        out.latencies.extend(mine)
        out.errors += errors


def _process_main(args: tuple[Target, str, int, float, float, int]) -> tuple[list[float], int]:
    target, path, threads, start, stop, max_requests = args
    out = LoadResult()
    lock = threading.Lock()
    workers = [
        threading.Thread(
            target=_thread_loop, args=(target, path, start, stop, max_requests, out, lock)
        )
        for _ in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=stop - time.time() + 60)
    return out.latencies, out.errors


def load(
    target: Target,
    path: str,
    concurrency: int,
    duration: float,
    max_requests: int = 20_000,
    processes: int = 2,
) -> LoadResult:
    """``concurrency`` keep-alive connections GET ``path`` for ``duration`` s.

    Spread over ``processes`` client processes (the GIL would otherwise cap
    the client), each request count bounded by ``max_requests`` per connection.
    """
    procs = max(1, min(processes, concurrency))
    per = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    # Leave time for the warm-up (connect + handshake) before the window opens.
    start = time.time() + 0.5 + 0.01 * concurrency
    stop = start + duration
    result = LoadResult(window=duration)
    if procs == 1:
        lat, err = _process_main((target, path, per[0], start, stop, max_requests))
        result.latencies, result.errors = lat, err
        return result
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(procs) as pool:
        parts: list[Any] = pool.map(
            _process_main, [(target, path, n, start, stop, max_requests) for n in per]
        )
    for lat, err in parts:
        result.latencies.extend(lat)
        result.errors += err
    return result
