"""The agent's Prometheus metrics: every metric object, and the small API the other modules call.

Label values come from small fixed sets (route kinds, reasons, stream kinds)
or from node names, which the cluster bounds: never a path, an ID or a query.
Each ``Metrics`` has its own registry, so tests (and several agents in one
process) never share counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from OpenSSL import SSL
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import Metric, StateSetMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from twisted.internet import error as neterror
from twisted.web._newclient import RequestTransmissionFailed, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import Request

#: How a request was served (the ``route`` label).
ROUTES = (
    "own",  # the agent's own routes: /ping, /agents, /metrics, /swarmagent/status, ...
    "local",  # this node's engine
    "forwarded",  # another node's agent, by target
    "cluster_list",  # a cluster-wide list (system df too)
    "broadcast",  # an image load, pull, tag or prune sent to every node
    "locate",  # looked up, then served where found
    "events",  # the merged event stream
    "console",  # a Portainer console
    "tunnel",  # a hijacked (Upgrade) attach or exec
    "browse",  # Portainer's volume and host browser
    "refused",  # no valid credential
    "error",  # an answer the agent gave itself (unknown node, no manager, ...)
)
#: Why a node gave no usable answer (the ``reason`` label).
NODE_FAILURES = ("timeout", "refused", "tls", "connection", "http_status", "other", "silent")
#: Why a request was refused (the ``reason`` label).
AUTH_REFUSALS = ("no_credential", "bad_signature", "other_key", "pairing_closed", "untrusted_cert")
#: Long-lived relays (the ``kind`` label).
STREAMS = ("stream", "tunnel", "console", "events")
#: Pairing states (``swarmagent_pairing``).
PAIRING = ("secret", "paired", "open", "closed")
#: Answers a node gives that count as its failure: server errors and agent refusals.
FAILED_STATUS = frozenset({401, 403, 407, 421})

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def code_class(code: int) -> str:
    """``2xx``…``5xx``; ``none`` when no status was sent (the client left first)."""
    return f"{code // 100}xx" if 100 <= code <= 599 else "none"


def failure_reason(e: BaseException) -> str:
    """A bounded reason for why a call to a node failed."""
    if isinstance(e, ResponseNeverReceived | RequestTransmissionFailed) and e.reasons:
        return failure_reason(e.reasons[0].value)
    if isinstance(e, TimeoutError | neterror.TimeoutError | neterror.TCPTimedOutError):
        return "timeout"
    if isinstance(e, neterror.ConnectionRefusedError):
        return "refused"
    if isinstance(e, SSL.Error):
        return "tls"
    if isinstance(e, neterror.ConnectError | neterror.ConnectionLost | neterror.ConnectionDone):
        return "connection"
    return "other"


def status_failed(code: int) -> bool:
    """Whether a node's answer with ``code`` is its failure (not the client's)."""
    return code >= 500 or code in FAILED_STATUS


class Metrics:
    """Every metric of one agent, in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None, process: bool = False) -> None:
        """``process``: also export the process's CPU, memory and file descriptors."""
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)
        self.requests = Counter(
            "swarmagent_requests",
            "Requests served, by how they were routed and status class.",
            ["route", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "swarmagent_request_seconds",
            "Time from a request's arrival to its last byte, by route.",
            ["route"],
            buckets=_LATENCY,
            registry=r,
        )
        self.node_seconds = Histogram(
            "swarmagent_node_call_seconds",
            "Time of one bounded call to a node (list, lookup, node list), failures included.",
            ["node"],
            buckets=_LATENCY,
            registry=r,
        )
        self.node_failures = Counter(
            "swarmagent_node_failures",
            "Calls to a node that gave no usable answer, by reason.",
            ["node", "reason"],
            registry=r,
        )
        self.probe_rtt = Gauge(
            "swarmagent_peer_probe_rtt_seconds",
            "Round-trip time of the last successful identity probe of each peer.",
            ["node"],
            registry=r,
        )
        self.silent_since = Gauge(
            "swarmagent_node_silent_since_seconds",
            "When each silent node (left out at once until it answers again) fell silent.",
            ["node"],
            registry=r,
        )
        self.peers = Gauge("swarmagent_peers", "Other agents in the peer table.", registry=r)
        self.agentless = Gauge(
            "swarmagent_agentless_nodes",
            "Swarm nodes expected to run an agent with none in the peer table.",
            registry=r,
        )
        self.tick_seconds = Histogram(
            "swarmagent_discovery_tick_seconds",
            "Duration of one discovery round (identity, DNS, probes, node list).",
            buckets=_LATENCY,
            registry=r,
        )
        self.dns_failures = Counter(
            "swarmagent_dns_failures", "Failed lookups of the cluster address.", registry=r
        )
        self.joins = Counter("swarmagent_peer_joins", "Agents that joined the table.", registry=r)
        self.leaves = Counter("swarmagent_peer_leaves", "Agents that left the table.", registry=r)
        self.open = Gauge(
            "swarmagent_open_streams",
            "Relays in progress: streamed answers, tunnels, consoles, event streams.",
            ["kind"],
            registry=r,
        )
        self.relayed = Counter(
            "swarmagent_relayed_bytes",
            "Bytes relayed by streamed answers, tunnels, consoles and event streams.",
            ["kind"],
            registry=r,
        )
        self.refusals = Counter(
            "swarmagent_auth_refusals",
            "Requests refused for their credentials, by reason.",
            ["reason"],
            registry=r,
        )
        # Each request's two series, found once per (route, class): labels()
        # validates and locks on every call.
        self._request_series: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._relayed: dict[str, Any] = {}
        # Open streams counted in plain ints, read at each scrape: the relay
        # opens and closes one per answer, and a gauge locks at each change.
        self._open = dict.fromkeys(STREAMS, 0)
        for route in ROUTES:
            self.request_seconds.labels(route)
        for reason in AUTH_REFUSALS:
            self.refusals.labels(reason)
        for kind in STREAMS:
            self.open.labels(kind).set_function(partial(self._open.__getitem__, kind))
            self._relayed[kind] = self.relayed.labels(kind)

    # -- requests ---------------------------------------------------------------

    def request_done(self, route: str, code: int, seconds: float) -> None:
        """One request answered (or abandoned by its client)."""
        key = (route, code_class(code))
        series = self._request_series.get(key)
        if series is None:
            series = (self.requests.labels(*key), self.request_seconds.labels(route))
            self._request_series[key] = series
        series[0].inc()
        series[1].observe(seconds)

    def refused(self, reason: str) -> None:
        """One request refused for its credentials (a reason of :data:`AUTH_REFUSALS`)."""
        self.refusals.labels(reason).inc()

    # -- nodes ------------------------------------------------------------------

    def node_call(self, node: str, seconds: float) -> None:
        """One bounded call to ``node`` ended, answered or not."""
        self.node_seconds.labels(node).observe(seconds)

    def node_failed(self, node: str, reason: str) -> None:
        """One call to ``node`` gave no usable answer (a reason of :data:`NODE_FAILURES`)."""
        self.node_failures.labels(node, reason).inc()

    # -- discovery ----------------------------------------------------------------

    def silent(self, node: str, since: float) -> None:
        """``node`` ran out a deadline at ``since`` (the clock's seconds): it is silent."""
        self.silent_since.labels(node).set(since)

    def answering(self, node: str) -> None:
        """``node`` is silent no more."""
        with contextlib.suppress(KeyError):
            self.silent_since.remove(node)

    def probed(self, node: str, seconds: float) -> None:
        """A successful identity probe of ``node`` took ``seconds``."""
        self.probe_rtt.labels(node).set(seconds)

    def joined(self) -> None:
        self.joins.inc()

    def left(self, node: str) -> None:
        """An agent left: count it, and drop its gauge."""
        self.leaves.inc()
        with contextlib.suppress(KeyError):
            self.probe_rtt.remove(node)

    def dns_failed(self) -> None:
        self.dns_failures.inc()

    def tick(self, seconds: float) -> None:
        self.tick_seconds.observe(seconds)

    def watch_table(self, peers: Callable[[], int], agentless: Callable[[], int]) -> None:
        """Read the table's counts at each scrape."""
        self.peers.set_function(peers)
        self.agentless.set_function(agentless)

    def watch_pairing(self, state: Callable[[], str]) -> None:
        """Read the pairing state (one of :data:`PAIRING`) at each scrape."""
        self.registry.register(_PairingCollector(state))

    # -- streams ------------------------------------------------------------------

    def stream_opened(self, kind: str) -> None:
        """One more stream of ``kind`` (one of :data:`STREAMS`)."""
        self._open[kind] += 1

    def stream_closed(self, kind: str) -> None:
        self._open[kind] -= 1

    def relayed_bytes(self, kind: str, count: int) -> None:
        # Found once per kind, as the request series are (the relay counts each answer).
        self._relayed[kind].inc(count)

    # -- exposition ---------------------------------------------------------------

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The registry's text (Prometheus or OpenMetrics, as ``accept`` asks) and its type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class _PairingCollector(Collector):
    def __init__(self, state: Callable[[], str]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        now = self._state()
        yield StateSetMetricFamily(
            "swarmagent_pairing",
            "Portainer pairing: secret (AGENT_SECRET), paired, open (first key pairs), closed.",
            {s: s == now for s in PAIRING},
        )


class MetricsResource(Resource):
    """``/metrics``: the registry in the text format the scraper asks for.

    Made on the reactor thread, in well under a millisecond for the agent's
    few series; ``prometheus_client.twisted.MetricsResource`` would use the
    global reactor's thread pool through WSGI.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        body, content_type = self._metrics.exposition(accept)
        request.responseHeaders.setRawHeaders(b"content-type", [content_type.encode("ascii")])
        return body
