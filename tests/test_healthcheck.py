"""The image's health check against a real agent process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from twisted.trial.unittest import TestCase

from swarmagent.healthcheck import ping
from tests.lab import REPO_ROOT, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HealthCheckTests(TestCase):
    def setUp(self) -> None:
        self.port = free_port()
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(REPO_ROOT),
            "AGENT_HOST": "0.0.0.0",
            "AGENT_PORT": str(self.port),
        }

    def check(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "swarmagent.healthcheck"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def start_agent(self) -> None:
        env = {
            **self.env,
            "DATA_PATH": self.mktemp(),
            "DOCKER_HOST": "unix:///nonexistent/docker.sock",
        }
        agent = subprocess.Popen(
            [sys.executable, "-m", "twisted", "swarmagent"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(agent.wait, 10)
        self.addCleanup(agent.kill)
        wait_until(lambda: self.check().returncode == 0, 20, 0.2, "the agent to answer")

    def test_healthy(self) -> None:
        self.start_agent()
        self.assertEqual(ping(self.env), 204)
        self.assertEqual(self.check().returncode, 0)

    def test_nothing_listening(self) -> None:
        result = self.check()
        self.assertEqual(result.returncode, 1)
        self.assertIn("unhealthy", result.stderr)
