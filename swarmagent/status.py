"""``python -m swarmagent.status``: this node's agent's status document, as tables.

For an operator on a node (``docker exec`` into the agent). It reaches the
agent as the health check does (``AGENT_HOST``/``AGENT_PORT``, loopback for a
wildcard address, the certificate not verified: it asks the local listener)
and proves itself as the agent proves itself to the other agents: with
``AGENT_TLS_CERT``/``AGENT_TLS_KEY`` when a CA is set, else by signing over
``AGENT_SECRET`` (or ``AGENT_SECRET_FILE``). With neither, the agent shares no
credential with anyone but the paired Portainer, and the status is refused.
``--json`` prints the document itself.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from swarmagent.healthcheck import LOOPBACK

PATH = "/swarmagent/status"
PEER_HEADINGS = (
    "NAME", "NODE ID", "ROLE", "ADDRESS", "VERSION", "IN TABLE", "LAST PROBE", "FAILS", "RTT",
    "LAST ERROR AT", "LAST ERROR",
)  # fmt: skip
PEER_FIELDS = (
    "Name", "NodeID", "Role", "Address", "AgentVersion", "InTable", "LastProbe",
    "ConsecutiveFailures", "ProbeRTT", "LastErrorAt", "LastError",
)  # fmt: skip


def _secret(environ: Mapping[str, str]) -> str:
    secret = environ.get("AGENT_SECRET", "")
    path = environ.get("AGENT_SECRET_FILE", "")
    if not secret and path:
        with open(path, encoding="utf-8") as f:
            secret = f.read().removesuffix("\n").removesuffix("\r")
    return secret


def fetch(environ: Mapping[str, str], timeout: float = 10.0) -> tuple[int, bytes]:
    """The agent's answer to ``GET /swarmagent/status``: status and body."""
    host = environ.get("AGENT_HOST", "0.0.0.0")
    host = LOOPBACK.get(host, host)
    port = int(environ.get("AGENT_PORT", "9001"))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    headers: dict[str, str] = {}
    cert, key = environ.get("AGENT_TLS_CERT", ""), environ.get("AGENT_TLS_KEY", "")
    if environ.get("AGENT_TLS_CA") and cert and key:
        context.load_cert_chain(cert, key)
    else:
        secret = _secret(environ)
        if secret:
            # Only in secret mode: the signing code (cryptography) is not needed otherwise.
            from swarmagent.signature import Signer

            headers = Signer.generate(secret).headers()
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    try:
        conn.request("GET", PATH, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value * 1000:.1f}ms"
    return str(value)


def table(headings: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Rows under their headings, in columns."""
    cells = [list(headings), *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headings))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def render(doc: Mapping[str, Any]) -> str:
    """The status document as an operator reads it."""
    me = doc["Node"]
    out = [
        f"Node {me['Name']} ({me['Role']}{', leader' if me['Leader'] else ''}) "
        f"ID {me['NodeID'] or '-'} at {me['Address']}:{me['Port']}, agent {me['AgentVersion']}, "
        f"engine {me['EngineVersion'] or '-'}, cluster address {me['ClusterAddr'] or '-'}",
        "",
        "Peers",
        table(PEER_HEADINGS, [[p[k] for k in PEER_FIELDS] for p in doc["Peers"]]),
        "",
        "Swarm nodes expected to run an agent",
        table(
            ["NAME", "NODE ID", "AGENT", "WHY NOT"],
            [[n["Name"], n["NodeID"], n["HasAgent"], n["Why"]] for n in doc["Expected"]],
        ),
        "",
        "Silent nodes (left out at once until they answer again)",
        table(
            ["NAME", "NODE ID", "SINCE", "WHY"],
            [[n["Name"], n["NodeID"], n["Since"], n["Why"]] for n in doc.get("Silent", [])],
        ),
        "",
        "Settings",
        # Settings as given (seconds stay seconds).
        table(["SETTING", "VALUE"], [[k, str(v)] for k, v in sorted(doc["Settings"].items())]),
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code, body = fetch(os.environ)
    except (OSError, ValueError) as e:
        sys.exit(f"swarmagent.status: cannot reach the agent: {e}")
    if code != 200:
        sys.exit(f"swarmagent.status: the agent answered {code}: {body.decode(errors='replace')}")
    doc = json.loads(body)
    print(json.dumps(doc, indent=1) if "--json" in args else render(doc))


if __name__ == "__main__":
    main()
