"""Part 7: what the metrics and the access log cost per request, in process.

The agent's own root (``AgentRoot``) serves requests on a ``Site`` over an
in-memory transport, with an in-memory engine, in four set-ups: no request
accounting at all, metrics only (``--access-log off``), metrics and the text
access log, metrics and the JSON access log (each written to a discarded
file). The difference in CPU per request is the cost of each; no network or
engine time blurs it, so it is a floor to add to the passthrough figures of
part 1, not a replacement for them. On a shared 2-core machine a difference
under about 50 µs on the inspect (which costs ~0.8 ms) is within the noise.
"""

from __future__ import annotations

import gc
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from statistics import median
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.task import Cooperator
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from swarmagent.access import RequestLog
from swarmagent.api import AgentRoot
from swarmagent.auth import Authorizer
from swarmagent.broadcaster import Broadcaster
from swarmagent.clients import EngineEndpoints
from swarmagent.config import EngineAddress
from swarmagent.diskusage import ClusterDiskUsage
from swarmagent.fanout import FanOut
from swarmagent.locate import Locator
from swarmagent.logfile import LogFile
from swarmagent.metrics import Metrics
from swarmagent.nodes import Nodes
from swarmagent.peers import MANAGER, NodeIdentity, Peer, PeerTable
from swarmagent.proxy import Relay
from swarmagent.signature import Verifier


@dataclass(frozen=True)
class ObservabilityPlan:
    requests: int = 1000
    repetitions: int = 7


class _Engine(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(200)
        return b'{"Id":"abc"}'


def _site(clock: MemoryReactorClock, metrics: Metrics | None, lines: LogFile | None) -> Site:
    """``metrics`` None: no accounting; ``lines`` None: metrics only."""
    table = PeerTable(Peer("10.0.0.1", 9001, NodeIdentity("a", "id-a", MANAGER), is_self=True))
    engine = RequestTraversalAgent(_Engine())
    nodes = Nodes(table, engine, engine, clock, 5, metrics=metrics)
    cooperator = Cooperator(scheduler=lambda work: clock.callLater(0, work))
    endpoints = EngineEndpoints(clock, EngineAddress("unix", path="/x.sock"), 5)
    authorizer = Authorizer(Verifier(secret="bench"), None)
    requests = None
    if metrics is not None:
        requests = RequestLog(metrics, clock, authorizer.who, lines)
    root = AgentRoot(
        nodes,
        Relay(engine, endpoints, cooperator, metrics),
        Relay(engine, endpoints, cooperator, metrics),
        FanOut(nodes),
        authorizer,
        Locator(nodes),
        Broadcaster(nodes, cooperator),
        ClusterDiskUsage(nodes),
        metrics=metrics,
        requests=requests,
    )
    return Site(root, reactor=clock)


def _cpu_per_request(site: Site, path: bytes, count: int, headers: bytes) -> float:
    """CPU seconds per request: ``count`` requests on one keep-alive connection."""
    transport = StringTransport()
    channel = site.buildProtocol(None)
    channel.makeConnection(transport)
    raw = b"GET " + path + b" HTTP/1.1\r\nHost: agent\r\n" + headers + b"\r\n"
    # Garbage left by the previous set-up is not this one's cost.
    gc.collect()
    started = time.process_time()
    for _ in range(count):
        channel.dataReceived(raw)
        transport.clear()
    return (time.process_time() - started) / count


def run_observability(plan: ObservabilityPlan, log: Callable[[str], None]) -> dict[str, Any]:
    """µs of CPU per request for each set-up, and the cost over no accounting."""
    from swarmagent.signature import Signer

    signed = b"".join(
        k.encode() + b": " + v.encode() + b"\r\n"
        for k, v in Signer.generate("bench").headers().items()
    )
    sink = io.StringIO()
    # The metrics, and the access lines' format (None: no lines).
    setups: dict[str, tuple[Metrics | None, bool | None]] = {
        "none": (None, None),
        "metrics": (Metrics(), None),
        "metrics+text_log": (Metrics(), False),
        "metrics+json_log": (Metrics(), True),
    }
    paths = {"ping": b"/ping", "local_inspect": b"/containers/abc/json"}
    out: dict[str, Any] = {"plan": plan.__dict__, "cells": []}
    for label, path in paths.items():
        runs: dict[str, list[float]] = {name: [] for name in setups}
        for _ in range(plan.repetitions):
            for name, (metrics, as_json) in setups.items():
                clock = MemoryReactorClock()
                lines = None if as_json is None else LogFile(sink, clock, json=as_json)
                site = _site(clock, metrics, lines)
                # The lines' flush (once a reactor turn) is not run: as for a
                # StringIO, it costs nothing.
                runs[name].append(_cpu_per_request(site, path, plan.requests, signed))
                sink.seek(0)
                sink.truncate()
        cell: dict[str, Any] = {"endpoint": label}
        base = median(runs["none"])
        for name, values in runs.items():
            us = median(values) * 1e6
            cell[name] = {"cpu_us": round(us, 1), "added_us": round(us - base * 1e6, 1)}
        out["cells"].append(cell)
        log(f"  {label:14} " + "  ".join(f"{n}: {cell[n]['cpu_us']:.0f} µs" for n in setups))
    return out
