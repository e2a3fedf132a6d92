"""The agent's log output: access lines built cheaply, looking as twisted.logger writes them."""

from __future__ import annotations

import io
import json

from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import (
    LogEvent,
    Logger,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.trial.unittest import SynchronousTestCase

from swarmagent.logfile import LogFile

LINE = "GET /containers/abc/json local nodes=a 200 12B 0.3ms client=key:0123 missing=-"
FIELDS: dict[str, object] = {
    "method": "GET",
    "path": "/containers/abc/json",
    "route": "local",
    "nodes": "a",
    "status": 200,
    "bytes": 12,
    "ms": 0.3,
    "client": "key:0123",
    "missing": "-",
}


class Flushes(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


def logged(when: float) -> LogEvent:
    """The event ``log.info("{line}", line=..., **fields)`` makes, at ``when``."""
    events = EventLoggingObserver()
    Logger(namespace="swarmagent.access", observer=events).info("{line}", line=LINE, **FIELDS)
    [event] = events
    event["log_time"] = when
    return event


def twistd_writes(event: LogEvent, as_json: bool) -> str:
    """What twistd's text observer (or the JSON one) writes for ``event``."""
    out = io.StringIO()
    observer = jsonFileLogObserver(out, recordSeparator="") if as_json else textFileLogObserver(out)
    observer(event)
    return out.getvalue()


class AccessLineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_795_000_000.25)

    def test_text_line_as_twistd_writes_it(self) -> None:
        out = io.StringIO()
        LogFile(out, self.clock).info("swarmagent.access", LINE, FIELDS)
        self.assertEqual(out.getvalue(), twistd_writes(logged(self.clock.seconds()), False))

    def test_json_line_as_event_as_json_writes_it(self) -> None:
        out = io.StringIO()
        LogFile(out, self.clock, json=True).info("swarmagent.access", LINE, FIELDS)
        expected = twistd_writes(logged(self.clock.seconds()), True)
        self.assertEqual(out.getvalue().count("\n"), 1)
        self.assertEqual(json.loads(out.getvalue()), json.loads(expected))

    def test_time_made_again_each_second(self) -> None:
        out = io.StringIO()
        log_file = LogFile(out, self.clock)
        expected = []
        for step in (0.5, 0.3, 1.0, 60.0):
            self.clock.advance(step)
            log_file.info("swarmagent.access", LINE, FIELDS)
            expected.append(twistd_writes(logged(self.clock.seconds()), False))
        self.assertEqual(out.getvalue(), "".join(expected))

    def test_flushed_once_per_reactor_turn(self) -> None:
        out = Flushes()
        log_file = LogFile(out, self.clock)
        log_file.info("swarmagent.access", LINE, FIELDS)
        log_file.info("swarmagent.access", LINE, FIELDS)
        self.assertEqual(out.flushes, 0)
        self.clock.advance(0)
        self.assertEqual(out.flushes, 1)
        log_file.info("swarmagent.access", LINE, FIELDS)
        self.clock.advance(0)
        self.assertEqual(out.flushes, 2)
        self.assertEqual(out.getvalue().count("\n"), 3)


class OtherEventTests(SynchronousTestCase):
    def test_written_as_twistd_does_and_flushed_at_once(self) -> None:
        events = EventLoggingObserver()
        Logger(namespace="swarmagent.nodes", observer=events).warn(
            "Node {node} is not answering", node="n3"
        )
        [event] = events
        for as_json in (False, True):
            with self.subTest(json=as_json):
                out = Flushes()
                LogFile(out, MemoryReactorClock(), json=as_json)(event)
                self.assertEqual(out.getvalue(), twistd_writes(event, as_json))
                self.assertEqual(out.flushes, 1)

    def test_order_kept(self) -> None:
        """An access line buffered before another event is written before it."""
        out = io.StringIO()
        log_file = LogFile(out, MemoryReactorClock())
        log_file.info("swarmagent.access", "first", {})
        log_file({"log_format": "second", "log_namespace": "x", "log_time": 0.0})
        lines = out.getvalue().splitlines()
        self.assertEqual([line.rsplit(" ", 1)[1] for line in lines], ["first", "second"])
