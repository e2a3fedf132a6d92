"""Names on the wire: headers and paths shared by the agent's modules."""

from __future__ import annotations

from swarmagent import __version__

# Request headers Portainer sends (matched case-insensitively).
TARGET = "x-portaineragent-target"
MANAGER_OPERATION = "x-portaineragent-manageroperation"
# Set by an agent on every request it forwards: the receiver must serve it
# itself, never forward it again, so no request can loop between agents.
HOP = "x-swarmagent-hop"

# On every answer, as the Portainer agent sends them.
AGENT_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"Portainer-Agent", __version__.encode("ascii")),
    (b"Portainer-Agent-API-Version", b"2"),
    (b"Portainer-Agent-Platform", b"1"),
)
# Names the nodes a cluster-wide list left out.
MISSING_NODES = b"X-SwarmAgent-Missing-Nodes"
# Sends an image load, pull, tag or prune to every node ("all") or to the
# nodes it lists (names or IDs, comma-separated); consumed by the agent.
BROADCAST = "x-swarmagent-broadcast"
# The label naming its node on every item of a cluster-wide list.
NODE_LABEL = "swarmagent.node"

# The agent-to-agent identity document.
IDENTITY_PATH = b"/swarmagent/identity"
# The operator's status document, and the Prometheus metrics.
STATUS_PATH = b"/swarmagent/status"
METRICS_PATH = b"/metrics"

# Portainer's console routes, and what each attaches to.
CONSOLE_PATHS = {
    b"/websocket/exec": "exec",
    b"/v2/websocket/exec": "exec",
    b"/websocket/attach": "attach",
    b"/v2/websocket/attach": "attach",
}

# Portainer's host view and node details (targeted like a Docker request).
HOST_INFO_PATHS = (b"/host/info", b"/v1/host/info", b"/v2/host/info")
# The pull rate-limit hint (answered by the agent Portainer talks to).
DOCKERHUB_PATH = b"/v2/dockerhub"
