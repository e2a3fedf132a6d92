"""The stack files: valid for Docker's compose schema, and kept in step.

``tests.test_stack`` deploys ``agent-stack.yml`` with the TLS and secret
overlays; the Portainer stack cannot run here (no registry for its image), so
this checks it with docker-compose's own schema validation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from twisted.trial.unittest import SkipTest, TestCase

from tests.lab import REPO_ROOT
from tests.labcase import IN_CI

COMPOSE = REPO_ROOT / "compose"

#: Every way the README deploys the stack files.
DEPLOYMENTS = [
    ["agent-stack.yml"],
    ["agent-stack.yml", "agent-stack.tls.yml"],
    ["agent-stack.yml", "agent-stack.secret.yml"],
    ["agent-stack.yml", "agent-stack.tls.yml", "agent-stack.secret.yml"],
    ["agent-stack.yml", "agent-stack.host.yml"],
    ["portainer-agent-stack.yml"],
]


def load(name: str) -> Any:
    return yaml.safe_load((COMPOSE / name).read_text())


class StackFileTests(TestCase):
    def compose_config(self, files: list[str]) -> Any:
        """``docker-compose config`` of ``files``: the schema check, then the merged file."""
        binary = shutil.which("docker-compose")
        if binary is None:
            if IN_CI:
                self.fail("CI=true but docker-compose is not installed")
            raise SkipTest("docker-compose not installed")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SWARMAGENT_TLS": str(Path(self.mktemp()).resolve()),
        }
        args = [a for f in files for a in ("-f", str(COMPOSE / f))]
        p = subprocess.run(
            [binary, *args, "config"], env=env, capture_output=True, text=True, check=False
        )
        self.assertEqual(p.returncode, 0, f"{files}: {p.stderr}")
        return yaml.safe_load(p.stdout)

    def test_every_deployment_is_valid(self) -> None:
        for files in DEPLOYMENTS:
            with self.subTest(files=files):
                doc = self.compose_config(files)
                agent = doc["services"]["agent"]
                self.assertEqual(agent["deploy"]["mode"], "global")
                self.assertIn("/var/run/docker.sock:/var/run/docker.sock:rw", agent["volumes"])

    def test_overlays_add_their_secrets(self) -> None:
        env = self.compose_config(DEPLOYMENTS[3])["services"]["agent"]["environment"]
        self.assertEqual(env["AGENT_TLS_CA"], "/run/secrets/swarmagent_ca")
        self.assertEqual(env["AGENT_SECRET_FILE"], "/run/secrets/swarmagent_secret")
        self.assertEqual(env["AGENT_CLUSTER_ADDR"], "tasks.agent")

    def test_host_overlay_mounts_the_host_root(self) -> None:
        agent = self.compose_config(DEPLOYMENTS[4])["services"]["agent"]
        self.assertEqual(agent["environment"]["AGENT_HOST_ROOT"], "/host")
        self.assertIn("/:/host:rw", agent["volumes"])
        # The volumes the browser reads stay where the engine says they are.
        self.assertIn("/var/lib/docker/volumes:/var/lib/docker/volumes:rw", agent["volumes"])

    def test_portainer_stack_runs_the_same_agent(self) -> None:
        self.assertEqual(
            load("portainer-agent-stack.yml")["services"]["agent"],
            load("agent-stack.yml")["services"]["agent"],
        )

    def test_portainer_points_at_the_agents(self) -> None:
        portainer = load("portainer-agent-stack.yml")["services"]["portainer"]
        self.assertIn("tcp://tasks.agent:9001", portainer["command"])
        self.assertEqual(portainer["networks"], ["agent_network"])
