"""The container health check: exit 0 when this agent answers ``GET /ping``.

Run as ``python -m swarmagent.healthcheck``; reads the same ``AGENT_HOST`` and
``AGENT_PORT`` as the agent. The certificate is not verified: the check only
asks whether the local listener is alive, and ``/ping`` needs no credential.

It runs every 10 s on every node, so it is kept cheap: the request is written
on a bare TLS socket (no ``http.client``, which imports the ``email``
package), and no CA bundle is loaded (``create_default_context`` reads the
system's, for a verification this check does not do). About 20 ms of CPU
over the interpreter's start (README, "Monitoring").
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
from collections.abc import Mapping

LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def ping(environ: Mapping[str, str], timeout: float = 3.0) -> int:
    """The status ``GET /ping`` gets from the agent that ``environ`` configures."""
    host = environ.get("AGENT_HOST", "0.0.0.0")
    host = LOOPBACK.get(host, host)
    port = int(environ.get("AGENT_PORT", "9001"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"GET /ping HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        head = b""
        while b"\r\n" not in head and len(head) < 1024:
            chunk = tls.recv(1024)
            if not chunk:
                break
            head += chunk
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer: {head[:40]!r}")
    return int(parts[1])


def main() -> None:
    try:
        status = ping(os.environ)
    except (OSError, ValueError) as e:
        sys.exit(f"unhealthy: {e}")
    if status != 204:
        sys.exit(f"unhealthy: /ping answered {status}")


if __name__ == "__main__":
    main()
