"""swarmagent: one Docker Engine API for a whole Swarm, served by any node's agent."""

__version__ = "0.1.0"
