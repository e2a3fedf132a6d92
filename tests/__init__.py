"""swarmagent tests: unit tests and real multi-node swarm tests."""
