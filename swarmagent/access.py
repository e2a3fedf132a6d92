"""Each request, once it ends: its metrics and its access log line.

``AgentRoot`` opens a :class:`Served` record when a request arrives and says
how it was routed (:func:`mark`); the record closes when the answer's last
byte is written, when the client leaves, or when the connection is taken
over for a tunnel or console (:func:`taken_over`). The log line holds the
method, the path without its query, the route, the node(s), the status, the
bytes, the duration, the client's identity and the missing nodes: never a
header value, a query or a body. It is written by :class:`~swarmagent.logfile.LogFile`,
built with one format string (twisted.logger's formatting cost more than the
rest of a small request).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime
from twisted.logger import LogLevel
from twisted.web.server import Request
from zope.interface import Interface

from swarmagent.logfile import LogFile
from swarmagent.logs import shows
from swarmagent.metrics import Metrics
from swarmagent.wire import MISSING_NODES

#: The access log's namespace (filtered by LOG_LEVEL like every other: its lines are INFO).
NAMESPACE = "swarmagent.access"


class IServed(Interface):
    """The :class:`Served` record of a request (a component of it)."""


@dataclass
class Served:
    """What the agent did with one request."""

    started: float
    route: str = "own"
    nodes: tuple[str, ...] = ()
    #: Where the record is closed (no reference back to the request: no cycle).
    log: RequestLog | None = field(default=None, repr=False)
    ended: bool = field(default=False, repr=False)


class RequestLog:
    """Closes each request's record into the metrics and, if on, the access log."""

    def __init__(
        self,
        metrics: Metrics,
        clock: IReactorTime,
        who: Callable[[Request], str],
        access_log: LogFile | None = None,
    ) -> None:
        """``who`` names a request's client (certificate subject, key fingerprint);
        ``access_log`` is where the lines go (None: no access log)."""
        self._metrics = metrics
        self._clock = clock
        self._who = who
        self._access_log = access_log

    def start(self, request: Request) -> Served:
        """Open ``request``'s record; it closes itself when the request ends."""
        served = Served(self._clock.seconds(), log=self)
        request.setComponent(IServed, served)
        request.notifyFinish().addBoth(self._finished, request, served)
        return served

    def _finished(self, result: object, request: Request, served: Served) -> None:
        # A client that left before the status line went out got none.
        code = request.code if request.startedWriting else 0
        self.end(request, served, code, request.sentLength)

    def end(self, request: Request, served: Served, code: int, sent: int) -> None:
        """Close ``served`` once (later calls do nothing)."""
        if served.ended:
            return
        served.ended = True
        seconds = self._clock.seconds() - served.started
        self._metrics.request_done(served.route, code, seconds)
        if self._access_log is not None and shows(NAMESPACE, LogLevel.info):
            self._write(self._access_log, request, served, code, sent, seconds)

    def _write(
        self,
        out: LogFile,
        request: Request,
        served: Served,
        code: int,
        sent: int,
        seconds: float,
    ) -> None:
        missing = request.responseHeaders.getRawHeaders(MISSING_NODES, [b""])[0]
        # request.path never holds the query.
        self.line(
            out,
            request.method,
            request.path,
            served.route,
            served.nodes,
            code,
            sent,
            seconds,
            self._who(request),
            missing,
        )

    def done(
        self,
        method: bytes,
        path: bytes,
        route: str,
        nodes: tuple[str, ...],
        code: int,
        sent: int,
        started: float,
        who: Callable[[], str],
        missing: bytes = b"",
    ) -> None:
        """Count, and log if on, a request served outside twisted.web (the relay's);
        ``who`` names its client, asked only for a line that is written;
        ``missing``: the nodes its answer named missing."""
        seconds = self._clock.seconds() - started
        self._metrics.request_done(route, code, seconds)
        out = self._access_log
        if out is not None and shows(NAMESPACE, LogLevel.info):
            self.line(out, method, path, route, nodes, code, sent, seconds, who(), missing)

    def line(
        self,
        out: LogFile,
        method: bytes,
        path: bytes,
        route: str,
        nodes: tuple[str, ...],
        code: int,
        sent: int,
        seconds: float,
        client: str,
        missing: bytes,
    ) -> None:
        """Write one access log line."""
        m = method.decode("latin-1")
        p = path.decode("latin-1")
        names = ",".join(nodes) or "-"
        missed = missing.decode("utf-8", "replace") or "-"
        ms = round(seconds * 1000, 1)
        client_part = f"client={client} missing={missed}"
        line = f"{m} {p} {route} nodes={names} {code} {sent}B {ms}ms {client_part}"
        # The fields are keys of the line's JSON object (--log-format json).
        fields: dict[str, object] = {
            "method": m,
            "path": p,
            "route": route,
            "nodes": names,
            "status": code,
            "bytes": sent,
            "ms": ms,
            "client": client,
            "missing": missed,
        }
        out.info(NAMESPACE, line, fields)


def served_of(request: object) -> Served | None:
    """``request``'s record, if it has one."""
    getter = getattr(request, "getComponent", None)
    return getter(IServed) if getter is not None else None


def mark(request: Request, route: str, nodes: tuple[str, ...] = ()) -> None:
    """Say how ``request`` is served (a route of ``metrics.ROUTES``) and by which node(s)."""
    served = served_of(request)
    if served is not None:
        served.route = route
        if nodes:
            served.nodes = nodes


def taken_over(request: Request, code: int) -> None:
    """``request``'s connection has left twisted.web (a tunnel, a console),
    which will not finish it: close its record now, with the status ``code``."""
    served = served_of(request)
    if served is not None and served.log is not None:
        served.log.end(request, served, code, 0)
