"""The container health check: exit 0 when this agent answers ``GET /ping``.

Run as ``python -m swarmagent.healthcheck``; reads the same ``AGENT_HOST`` and
``AGENT_PORT`` as the agent. The certificate is not verified: the check only
asks whether the local listener is alive, and ``/ping`` needs no credential.
"""

from __future__ import annotations

import http.client
import os
import ssl
import sys
from collections.abc import Mapping

LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def ping(environ: Mapping[str, str], timeout: float = 3.0) -> int:
    """The status ``GET /ping`` gets from the agent that ``environ`` configures."""
    host = environ.get("AGENT_HOST", "0.0.0.0")
    host = LOOPBACK.get(host, host)
    port = int(environ.get("AGENT_PORT", "9001"))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    try:
        conn.request("GET", "/ping")
        return conn.getresponse().status
    finally:
        conn.close()


def main() -> None:
    try:
        status = ping(os.environ)
    except (OSError, ValueError) as e:
        sys.exit(f"unhealthy: {e}")
    if status != 204:
        sys.exit(f"unhealthy: /ping answered {status}")


if __name__ == "__main__":
    main()
