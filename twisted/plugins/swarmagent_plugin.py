"""The ``twistd swarmagent`` plugin."""

from twisted.application.service import ServiceMaker

swarmagent = ServiceMaker(
    "swarmagent",
    "swarmagent.tap",
    "A Docker Swarm cluster agent, wire-compatible with the Portainer agent",
    "swarmagent",
)
