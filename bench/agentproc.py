"""One agent as ``makeService`` builds it, run as ``twistd -n`` runs it, with a hosts file for DNS.

``python -m bench.agentproc HOSTS_FILE`` with the agent's settings in the
environment. The only difference from ``twistd -n swarmagent``: the resolver
is a hosts file the bench rewrites (the fake cluster's "DNS"), so agents on
loopback addresses find each other without root or a DNS server. Logging
starts as twistd starts it (text lines on stdout), so twisted.web's own
access log costs what it costs under twistd.
"""

from __future__ import annotations

import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.logger import globalLogBeginner, textFileLogObserver  # noqa: E402
from twisted.names import hosts  # noqa: E402

from swarmagent.config import Options  # noqa: E402
from swarmagent.tap import makeService  # noqa: E402
from swarmagent.twisted_types import installed_reactor  # noqa: E402


def main(argv: list[str]) -> None:
    reactor = installed_reactor()
    options = Options()
    options.parseOptions([])
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    service = makeService(options, reactor, hosts.Resolver(argv[1].encode()))
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
