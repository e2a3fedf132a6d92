"""A tiny authoritative DNS server for the test lab, on ``twisted.names``.

It stands in for Docker's embedded DNS (``tasks.<service>``), which only
containers can query: the agents under test run directly in the lab's node
namespaces and resolve through this server instead.

Records come from a JSON file that is re-read whenever it changes, so a test
can move nodes in and out of "the service" by rewriting the file::

    {
      "zone": "lab.test",
      "records": {
        "tasks.agent.lab.test": {"A": ["10.213.0.11", "10.213.0.12"]},
        "_agent._tcp.lab.test": {"SRV": [[0, 0, 9001, "node1.lab.test"]]},
        "node1.lab.test": {"A": ["10.213.0.11"]}
      }
    }

Every record has TTL 0 so that no resolver may cache a stale answer. Names in
the zone without records get NXDOMAIN.

Run: ``python -m tests.lab_dns --records FILE --listen 10.213.0.1 --port 53``
(or ``python path/to/lab_dns.py ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.names import authority, dns, server
from twisted.python import log

#: Supported record types and how to build each from its JSON value.
_BUILDERS = {
    "A": lambda v: dns.Record_A(v, ttl=0),
    "AAAA": lambda v: dns.Record_AAAA(v, ttl=0),
    "CNAME": lambda v: dns.Record_CNAME(v, ttl=0),
    # [priority, weight, port, target]
    "SRV": lambda v: dns.Record_SRV(int(v[0]), int(v[1]), int(v[2]), v[3], ttl=0),
}


def parse_records(data: dict[str, Any]) -> tuple[tuple[bytes, dns.Record_SOA], dict[bytes, list]]:
    """Turn the JSON document into ``FileAuthority``'s ``soa`` and ``records``."""
    zone = data.get("zone", "lab.test")
    soa = dns.Record_SOA(
        mname="ns." + zone,
        rname="root." + zone,
        serial=1,
        refresh=1,
        retry=1,
        expire=1,
        minimum=0,
        ttl=0,
    )
    records: dict[bytes, list] = {zone.lower().encode(): [soa]}
    for name, by_type in data.get("records", {}).items():
        key = name.rstrip(".").lower().encode()
        for rtype, values in by_type.items():
            build = _BUILDERS[rtype.upper()]
            records.setdefault(key, []).extend(build(v) for v in values)
    return (zone.encode(), soa), records


class JsonAuthority(authority.FileAuthority):
    """An authority whose zone is a JSON file, reloaded when the file changes."""

    soa: Any = None
    records: Any = None

    def __init__(self, filename: str) -> None:
        self._filename = filename
        self._stamp: tuple[int, int, int] | None = None
        super().__init__(filename)

    def loadFile(self, filename: str) -> None:
        """Load (or reload) the zone; keep the old one if the file is unreadable."""
        try:
            st = os.stat(filename)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            with open(filename, encoding="utf-8") as f:
                self.soa, self.records = parse_records(json.load(f))
            self._stamp = stamp
            log.msg(f"lab_dns: loaded {len(self.records)} names from {filename}")
        except (OSError, ValueError, KeyError, IndexError) as e:
            log.msg(f"lab_dns: cannot load {filename}: {e!r}")
            if self.soa is None:
                self.soa, self.records = parse_records({})

    # Overrides of twisted.names' untyped internals, with their signatures.
    def _additionalRecords(self, answer, authority, ttl):  # type: ignore[no-untyped-def]
        # Hand out SRV targets' addresses too, as real servers do (the base
        # class only knows CNAME/MX/NS, whose payload has ``.name``).
        yield from super()._additionalRecords(answer, authority, ttl)
        for record in answer:
            if record.type == dns.SRV:
                target = record.payload.target.name
                for rec in self.records.get(target.lower(), ()):
                    if rec.TYPE in self._ADDRESS_TYPES:
                        yield dns.RRHeader(target, rec.TYPE, dns.IN, 0, rec, auth=True)

    # As _additionalRecords: an untyped base method.
    def _lookup(self, name, cls, type, timeout=None):  # type: ignore[no-untyped-def]
        # Cheap (one stat) and makes every answer reflect the file right now.
        self.loadFile(self._filename)
        return super()._lookup(name, cls, type, timeout)


def main(argv: list[str] | None = None) -> None:
    """Serve the zone over UDP and TCP until killed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", required=True, help="JSON zone file")
    p.add_argument("--listen", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=53)
    args = p.parse_args(argv)

    reactor: Any = _reactor
    log.startLogging(sys.stdout)
    factory = server.DNSServerFactory(authorities=[JsonAuthority(args.records)])
    reactor.listenUDP(args.port, dns.DNSDatagramProtocol(factory), interface=args.listen)
    reactor.listenTCP(args.port, factory, interface=args.listen)
    reactor.run()


if __name__ == "__main__":
    main()
