"""Integration: Portainer's agent-only routes and plain-CLI stack deploys, in a real swarm.

Run as root: ``python -m twisted.trial tests.test_parity_cluster``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.lab import DOCKER_CLI, IMAGE, wait_until
from tests.labcase import LabTestCase, explain

#: Both docker CLIs the machine has: Debian's 20.10 and a current one.
CLIS = [cli for cli in (DOCKER_CLI, "/usr/local/bin/docker") if os.path.exists(cli)]

STACK_FILE = f"""\
version: "3.8"
services:
  web:
    image: {IMAGE}
    command: ["sleep", "3600"]
    networks: [front]
    deploy:
      mode: global
networks:
  front:
    driver: overlay
"""


class ParityTests(LabTestCase):
    """node1 (manager), node2 and node3 (workers), an agent on each."""

    def cli(self, cli: str, *args: str, via: str = "node2") -> subprocess.CompletedProcess[str]:
        """A docker CLI against ``via``'s agent, with an empty config (no HttpHeaders)."""
        config = tempfile.mkdtemp(prefix="dockercfg-")
        self.addCleanup(shutil.rmtree, config, True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": config,
            "DOCKER_HOST": self.agent(via).url.replace("https://", "tcp://"),
            "DOCKER_TLS_VERIFY": "1",
            "DOCKER_CERT_PATH": str(self.the_lab.tls),
        }
        return subprocess.run(
            [cli, "--config", config, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            stdin=subprocess.DEVNULL,
        )

    @explain
    def test_version_prefixed_ping(self) -> None:
        """Portainer's UI sends /v1.41/ping unsigned; a 404 would make it think API v1."""
        plain = self.the_lab.client_context(certificate=False)
        for path in ("/v1.41/ping", "/v1.41/v2/ping", "/ping"):
            r = self.agent("node2").request("GET", path, context=plain)
            self.assertEqual(r.status, 204, f"{path}: {r.body[:200]!r}")
            self.assertEqual(r.headers.get("Portainer-Agent-API-Version"), "2")
        r = self.agent("node2").request("GET", "/v1.41/v2/agents")
        self.assertEqual(r.status, 200)
        self.assertEqual({a["Port"] for a in r.json()}, {"9001"})

    def manager_state(self, stack: str) -> tuple[set[str], set[str]]:
        """The stack's services and networks, as the manager's engine has them."""
        client = self.node("node1").docker()
        try:
            label = {"label": f"com.docker.stack.namespace={stack}"}
            services = {s.name for s in client.services.list(filters=label)}
            networks = {n.name for n in client.networks.list(filters=label)}
            return services, networks
        finally:
            client.close()

    def remove_stack(self, stack: str) -> None:
        client = self.node("node1").docker()
        try:
            label = {"label": f"com.docker.stack.namespace={stack}"}
            for service in client.services.list(filters=label):
                service.remove()
            wait_until(lambda: not self.node_networks(stack), 30, 0.5, f"{stack}'s tasks to leave")
            for network in client.networks.list(filters=label):
                network.remove()
        finally:
            client.close()

    def node_networks(self, stack: str) -> set[tuple[str, str]]:
        """(node, network) for each node whose engine lists one of the stack's networks."""
        found = set()
        for node in self.the_lab.nodes:
            client = node.docker()
            try:
                label = {"label": f"com.docker.stack.namespace={stack}"}
                found |= {(node.name, n.name) for n in client.networks.list(filters=label)}
            finally:
                client.close()
        return found

    @explain
    def test_stack_deploy_and_rm_through_a_worker(self) -> None:
        """The docker CLI, with no header, deploys and removes a stack with an
        overlay network through a worker's agent (both CLIs)."""
        folder = Path(tempfile.mkdtemp(prefix="stack-"))
        self.addCleanup(shutil.rmtree, folder, True)
        (folder / "stack.yml").write_text(STACK_FILE)
        for i, cli in enumerate(CLIS):
            stack = f"par{i}"
            self.addCleanup(self.remove_stack, stack)
            with self.subTest(cli=cli):
                extra = ["--detach=true"] if cli != DOCKER_CLI else []
                deploy = self.cli(
                    cli, "stack", "deploy", "-c", str(folder / "stack.yml"),
                    "--resolve-image", "never", *extra, stack,
                )  # fmt: skip
                self.assertEqual(deploy.returncode, 0, deploy.stderr)
                self.assertEqual(self.manager_state(stack), ({f"{stack}_web"}, {f"{stack}_front"}))
                # Let the tasks start, so workers list the overlay network too
                # and the cluster-wide list holds it once per node.
                wait_until(
                    lambda stack=stack: len(self.node_networks(stack)) == 3,
                    60,
                    0.5,
                    f"{stack}_front on every node",
                )
                rm = self.cli(cli, "stack", "rm", stack)
                self.assertEqual(rm.returncode, 0, rm.stdout + rm.stderr)
                wait_until(
                    lambda stack=stack: self.manager_state(stack) == (set(), set()),
                    60,
                    0.5,
                    f"{stack} gone from the manager",
                )
