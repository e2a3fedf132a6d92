"""The agent's log output: twisted.logger's events and the access lines, on one buffered stream.

twistd's own observer formats each event with twisted.logger (a format
string parsed per event, the time formatted per event) and flushes it: about
100 µs a line, as much again as serving a small request. Access lines (one a
request) are built here with one format string instead, the time formatted
once a second, and written to the same stream, flushed once per reactor
turn; any other event is formatted as twistd formats it and flushed at once.
Both look as before: twistd's text lines, or ``eventAsJSON``'s objects.
"""

from __future__ import annotations

import json
from typing import IO

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    eventAsJSON,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from zope.interface import implementer

#: ``LogLevel.info`` as ``eventAsJSON`` writes it.
_INFO_JSON = json.loads(eventAsJSON({"log_level": LogLevel.info}))["log_level"]


@implementer(ILogObserver)
class LogFile:
    """Writes every event (as twistd would) and the access lines (cheaply) to ``out``."""

    def __init__(self, out: IO[str], clock: IReactorTime, json: bool = False) -> None:
        """``json``: one ``eventAsJSON`` object per line, else twistd's text lines."""
        self._out = out
        self._clock = clock
        self._json = json
        self._flushing: IDelayedCall | None = None
        # The time prefix of text lines, made once a second.
        self._second = -1
        self._stamp = ""

    def __call__(self, event: LogEvent) -> None:
        if self._json:
            text: str | None = eventAsJSON(event) + "\n"
        else:
            text = formatEventAsClassicLogText(event, lambda t: formatTime(t, timeFormatRFC3339))
        if text:
            self._out.write(text)
            self._out.flush()

    def info(self, namespace: str, line: str, fields: dict[str, object]) -> None:
        """An INFO event of ``namespace`` whose text is ``line``, with ``fields``
        (keys in JSON), written as twistd would write ``log.info("{line}", ...)``."""
        now = self._clock.seconds()
        if self._json:
            event = {
                "line": line,
                **fields,
                "log_logger": {"unpersistable": True},
                "log_level": _INFO_JSON,
                "log_namespace": namespace,
                "log_source": None,
                "log_format": "{line}",
                "log_time": now,
                "log_flattened": {"line!s:": line, "line!:": line},
            }
            self._out.write(json.dumps(event) + "\n")
        else:
            second = int(now)
            if second != self._second:
                self._second, self._stamp = second, formatTime(second, timeFormatRFC3339)
            self._out.write(f"{self._stamp} [{namespace}#info] {line}\n")
        if self._flushing is None:
            self._flushing = self._clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flushing = None
        self._out.flush()
