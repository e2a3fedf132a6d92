"""The agent's loggers, all behind one LOG_LEVEL filter."""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

# Log level is process-wide by nature (one LOG_LEVEL per agent), so the
# filter is the one piece of module state: loggers are made at import time.
_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])
# shows() answers, until the level changes: the access log asks at each
# request, and the predicate walks the namespace and compares constants.
_shown: dict[tuple[str, LogLevel], bool] = {}


def logger(namespace: str) -> Logger:
    """A logger whose events pass the LOG_LEVEL filter."""
    return Logger(namespace=namespace, observer=_observer)


def set_level(level: LogLevel) -> None:
    """Show the agent's events at ``level`` and above."""
    _predicate.setLogLevelForNamespace("", level)
    _shown.clear()


def shows(namespace: str, level: LogLevel) -> bool:
    """Whether an event of ``level`` from ``namespace`` passes the LOG_LEVEL filter."""
    key = (namespace, level)
    shown = _shown.get(key)
    if shown is None:
        threshold: LogLevel = _predicate.logLevelForNamespace(namespace)
        shown = _shown[key] = bool(level >= threshold)
    return shown
