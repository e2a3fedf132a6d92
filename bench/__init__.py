"""Benchmarks of swarmagent against the engine and nginx: ``python -m bench``."""
