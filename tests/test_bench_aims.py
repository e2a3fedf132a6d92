"""The bench's part 8 harness: both front doors side by side, and the aims they are held to."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from bench import aims, obstacles
from bench.fake import relays
from bench.wrk import layout, way_name


def _way(cpu: float, p50: float = 1.0, cpu_all: float = 0.0) -> dict[str, Any]:
    def med(v: float) -> dict[str, float]:
        return {"median": v, "min": v, "max": v}

    return {
        "cpu_us": med(cpu),
        "cpu_us_all": med(cpu_all or cpu),
        "rps": med(1000.0),
        "p50_ms": med(p50),
        "p99_ms": med(2 * p50),
        "errors": 0,
    }


def _cell(conc: int, **ways: dict[str, Any]) -> dict[str, Any]:
    return {"endpoint": "ping", "path": "/_ping", "concurrency": conc, "generator": "wrk", **ways}


class RelaysTests(SynchronousTestCase):
    def test_the_runs_mode_for_every_node_not_given(self) -> None:
        self.assertEqual(relays(3, ("web",), default="bytes"), ["web", "bytes", "bytes"])

    def test_an_unknown_mode_or_too_many_refused(self) -> None:
        self.assertRaises(ValueError, relays, 2, ("web", "tcp"), "web")
        self.assertRaises(ValueError, relays, 1, ("web", "bytes"), "web")
        self.assertRaises(ValueError, relays, 2, (), "tcp")


class LayoutTests(SynchronousTestCase):
    def test_a_standalone_node_then_a_pair_per_mode(self) -> None:
        self.assertEqual(layout(("web", "bytes")), ["web", "bytes", "web", "web", "bytes", "bytes"])

    def test_web_keeps_the_old_names(self) -> None:
        self.assertEqual(
            [way_name("agent", "web"), way_name("peer", "bytes")], ["agent", "peer_bytes"]
        )


class PassthroughAimsTests(SynchronousTestCase):
    def test_both_relays_held_to_the_aim_side_by_side(self) -> None:
        results = {
            "wrk": {
                "cells": [
                    _cell(
                        16,
                        nginx_tls=_way(20),
                        agent=_way(700),
                        agent_bytes=_way(55),
                        peer=_way(1000, cpu_all=2000),
                        peer_bytes=_way(95, cpu_all=190),
                    )
                ]
            }
        }
        checked = [(a["aim"].split(" CPU")[0], a["met"], a["area"]) for a in aims.aims(results)]
        self.assertEqual(
            checked,
            [
                ("agent (--relay web): ping c=16", False, "passthrough"),
                ("agent (--relay bytes): ping c=16", True, "passthrough"),
                ("peer (--relay web): ping c=16", False, "peer"),
                ("peer (--relay bytes): ping c=16", False, "peer"),
            ],
        )

    def test_p50_at_c1_for_each_relay(self) -> None:
        results = {
            "wrk": {
                "cells": [
                    _cell(1, nginx_tls=_way(100, 0.2), agent=_way(900, 1.3),
                          agent_bytes=_way(300, 0.25)),
                ]
            }
        }  # fmt: skip
        met = {a["aim"].partition(":")[0]: a["met"] for a in aims.aims(results)}
        self.assertEqual(met, {"agent (--relay web)": False, "agent (--relay bytes)": True})

    def test_a_run_from_before_the_bytes_relay_still_reads(self) -> None:
        cell = _cell(64, nginx_tls=_way(20), agent=_way(50), peer=_way(80))
        results = {"wrk": {"signature": "signed", "cells": [cell]}}
        self.assertEqual([a["met"] for a in aims.aims(results)], [True, True])
        table = "\n".join(aims.markdown(results))
        self.assertIn("| wrk | ping | 64 | peer |", table)
        self.assertNotIn("| agent_bytes |", table)

    def test_every_way_in_tabled(self) -> None:
        results = {
            "wrk": {
                "signature": "signed",
                "cells": [_cell(16, nginx_tls=_way(20), agent=_way(700), agent_bytes=_way(55))],
            }
        }
        table = "\n".join(aims.markdown(results))
        for way in ("nginx_tls", "agent", "agent_bytes"):
            self.assertIn(f"| wrk | ping | 16 | {way} |", table)


class WhatStandsInTheWayTests(SynchronousTestCase):
    def _profile(self, **buckets: float) -> dict[str, Any]:
        names = {
            "reactor": "reactor, sockets (epoll, tcp, unix)",
            "tls": "TLS (pyOpenSSL / twisted.protocols.tls)",
            "merge": "swarmagent.nodelist (the merge: split, tag, encode)",
        }
        return {
            "samples": 500,
            "buckets_pct": [[names[k], v] for k, v in buckets.items()],
            "own_pct": [["Connection.do_handshake (OpenSSL/SSL.py)", 10.0]],
        }

    def test_each_relay_read_from_its_profile(self) -> None:
        results = {
            "wrk": {
                "signature": "signed",
                "cells": [_cell(64, nginx_tls=_way(20), agent=_way(800), agent_bytes=_way(400))],
                "profiles": {
                    "wrk agent ping c=64": self._profile(reactor=30, tls=10),
                    "wrk agent_bytes ping c=64": self._profile(reactor=40, tls=20),
                },
            }
        }
        said = "\n".join(aims.markdown(results))
        self.assertIn("#### passthrough", said)
        # 40% of 800 µs for web, 60% of 400 µs for bytes: the least of them.
        self.assertIn("(at least 240 µs here)", said)
        self.assertIn("over the aim's 60 µs", said)
        self.assertIn("x20.0", said)
        self.assertIn("TLS handshakes (`do_handshake`'s own time) 10.0%", said)

    def test_a_relay_not_measured_said_so(self) -> None:
        results = {
            "wrk": {"signature": "s", "cells": [_cell(64, nginx_tls=_way(20), peer=_way(900))]}
        }
        said = "\n".join(aims.markdown(results))
        self.assertIn("#### peer", said)
        self.assertIn("`--relay bytes` was not measured", said)
        self.assertIn("no profile of it in this run", said)

    def test_the_merge_share_in_ms(self) -> None:
        cell = {
            "nodes": 10, "per_node": 500, "agent_cpu_ms_per_request": 80.0,
            "all_agents_cpu_ms_per_request": 160.0, "agent/parallel": 16.0,
            "ms": {"agent": {"median": 136.0}, "parallel": {"median": 8.5}},
        }  # fmt: skip
        results = {"grid": {"cells": [cell]}}
        profiles = {"fan-out (fake) 10 x 500": self._profile(merge=40, tls=15)}
        said = obstacles.statement("fan-out", results, profiles)
        self.assertIn("the entry agent spends 80 ms of CPU", said)
        self.assertIn("40%, about 32 ms a list", said)
