"""Docker Compose against the agents, as against a TLS-protected engine.

The real ``docker-compose`` (1.29, Debian's) runs with ``DOCKER_HOST`` on
node1's agent, ``DOCKER_TLS_VERIFY=1`` and ``DOCKER_CERT_PATH`` on the lab's
client certificate: no signature headers, only the certificate. Each engine is
then asked directly (``Node.docker()``) what compose really made. Run as root:
``python -m twisted.trial tests.test_compose_cluster``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from swarmagent import certs
from tests.lab import IMAGE, Node
from tests.labcase import TARGET, LabTestCase, explain

COMPOSE = shutil.which("docker-compose", path="/usr/bin") or "/usr/bin/docker-compose"
#: Compose's ``exec`` calls the docker CLI found on PATH; the Debian one.
PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
PROJECT = "salabcompose"
PROJECT_LABEL = f"com.docker.compose.project={PROJECT}"
COMPOSE_FILE = f"""\
version: "3.7"
services:
  app:
    image: {IMAGE}
    command: ["sh", "-c", "echo app-started; echo data > /data/file; exec sleep 3600"]
    volumes:
      - data:/data
    networks:
      - back
volumes:
  data: {{}}
networks:
  back: {{}}
"""


def project_objects(node: Node) -> dict[str, list[str]]:
    """Names of the project's containers, volumes and networks on ``node``'s engine."""
    client = node.docker()
    label = {"label": PROJECT_LABEL}
    try:
        return {
            "containers": sorted(c.name for c in client.containers.list(all=True, filters=label)),
            "volumes": sorted(v.name for v in client.volumes.list(filters=label)),
            "networks": sorted(n.name for n in client.networks.list(filters=label)),
        }
    finally:
        client.close()


NOTHING: dict[str, list[str]] = {"containers": [], "volumes": [], "networks": []}


class ComposeTests(LabTestCase):
    """docker-compose with the lab's client certificate, through node1's agent."""

    def setUp(self) -> None:
        super().setUp()
        self.project = Path(tempfile.mkdtemp(prefix="compose-"))
        self.addCleanup(shutil.rmtree, self.project, True)
        (self.project / "docker-compose.yml").write_text(COMPOSE_FILE)
        self.config = self.project / "docker-config"
        self.config.mkdir()
        # Whatever a test leaves behind, straight on the engines.
        self.addCleanup(self.remove_project)

    def remove_project(self) -> None:
        lab = self.lab
        if lab is None:
            return
        label = {"label": PROJECT_LABEL}
        for node in lab.nodes:
            client = node.docker()
            try:
                for c in client.containers.list(all=True, filters=label):
                    c.remove(force=True)
                for v in client.volumes.list(filters=label):
                    v.remove(force=True)
                for n in client.networks.list(filters=label):
                    n.remove()
            finally:
                client.close()

    def env(self, cert_path: Path | None = None, verify: bool = True) -> dict[str, str]:
        """A clean environment for compose, pointed at node1's agent.

        Nothing is inherited: requests (under compose and the docker SDK)
        would prefer REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE over the CA in
        ``DOCKER_CERT_PATH`` (psf/requests#3829).
        """
        env = {
            "PATH": PATH,
            "HOME": str(self.project),
            "LANG": "C.UTF-8",
            # Compose's SDK and the docker CLI it calls for exec read this.
            "DOCKER_CONFIG": str(self.config),
            "DOCKER_HOST": self.agent("node1").url.replace("https://", "tcp://"),
            "COMPOSE_PROJECT_NAME": PROJECT,
        }
        if verify:
            env["DOCKER_TLS_VERIFY"] = "1"
            env["DOCKER_CERT_PATH"] = str(cert_path or self.the_lab.tls)
        return env

    def compose(
        self, *args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 90
    ) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(
            [COMPOSE, *args],
            cwd=self.project,
            env=env if env is not None else self.env(),
            # `exec -T` runs `docker exec --interactive`: stdin ends at once,
            # and the output must still come back (TLS close_notify).
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and p.returncode != 0:
            raise AssertionError(
                f"docker-compose {' '.join(args)} exited {p.returncode}\n"
                f"stdout: {p.stdout}\nstderr: {p.stderr}"
            )
        return p

    def set_target(self, node: str) -> None:
        """``X-PortainerAgent-Target`` in config.json, read by compose's SDK and the CLI."""
        with open(self.config / "config.json", "w") as f:
            json.dump({"HttpHeaders": {TARGET: node}}, f)

    def running(self, node: Node) -> list[dict[str, Any]]:
        client = node.docker()
        try:
            return [
                {"name": c.name, "status": c.status}
                for c in client.containers.list(filters={"label": PROJECT_LABEL})
            ]
        finally:
            client.close()

    def lifecycle(self, where: str) -> None:
        """up -d, ps, exec -T (the CLI's and compose's own), logs, down -v; on ``where``."""
        lab = self.the_lab
        here = lab.node(where)
        container = f"{PROJECT}_app_1"
        self.compose("up", "-d")
        made = project_objects(here)
        self.assertEqual(
            made,
            {
                "containers": [container],
                "volumes": [f"{PROJECT}_data"],
                "networks": [f"{PROJECT}_back"],
            },
        )
        for other in lab.nodes:
            if other is not here:
                self.assertEqual(project_objects(other), NOTHING, other.name)
        self.assertEqual(self.running(here), [{"name": container, "status": "running"}])

        ps = self.compose("ps")
        self.assertRegex(ps.stdout, rf"{container}\s.*\bUp\b")
        self.assertEqual(self.compose("ps", "-q").stdout.split(), [self.container_id(here)])
        self.assertEqual(self.compose("ps", "--services").stdout.split(), ["app"])

        # Compose runs `docker exec` (the CLI, with the same TLS options)...
        p = self.compose("exec", "-T", "app", "sh", "-c", "echo exec-$((6*7)) $(cat /data/file)")
        self.assertEqual(p.stdout.strip(), "exec-42 data")
        # ...or, with COMPOSE_INTERACTIVE_NO_CLI, the exec itself through the SDK.
        env = {**self.env(), "COMPOSE_INTERACTIVE_NO_CLI": "1"}
        p = self.compose("exec", "-T", "app", "echo", "sdk-exec", env=env)
        self.assertEqual(p.stdout.strip(), "sdk-exec")
        p = self.compose("exec", "-T", "app", "sh", "-c", "exit 3", env=env, check=False)
        self.assertEqual(p.returncode, 3, p.stderr)

        logs = self.compose("logs", "--no-color", "app")
        self.assertIn("app-started", logs.stdout)

        self.compose("down", "-v")
        self.assertEqual(project_objects(here), NOTHING)
        self.assertEqual(self.compose("ps", "-q").stdout.split(), [])

    def container_id(self, node: Node) -> str:
        client = node.docker()
        try:
            (c,) = client.containers.list(all=True, filters={"label": PROJECT_LABEL})
            return str(c.id)
        finally:
            client.close()

    @explain
    def test_lifecycle_on_the_agents_node(self) -> None:
        """No target header: the project lives on node1, whose agent compose talks to."""
        self.lifecycle("node1")

    @explain
    def test_lifecycle_on_another_node(self) -> None:
        """config.json's target header: the project lives on node3, through two agents."""
        self.set_target("node3")
        self.lifecycle("node3")

    def assert_refused(self, p: subprocess.CompletedProcess[str]) -> None:
        self.assertNotEqual(p.returncode, 0, p.stdout)
        for node in self.the_lab.nodes:
            self.assertEqual(project_objects(node), NOTHING, node.name)

    @explain
    def test_plain_http_refused(self) -> None:
        """No DOCKER_TLS_VERIFY: plain HTTP, which the HTTPS-only port does not answer.

        (Compose 1.29 has no TLS-without-a-certificate mode: its ``--tls``
        flag is ignored for its own client, and DOCKER_CERT_PATH always
        brings a certificate.)
        """
        p = self.compose("up", "-d", env=self.env(verify=False), check=False)
        self.assert_refused(p)
        self.assertIn("Connection aborted", p.stderr)

    @explain
    def test_certificate_from_another_ca_refused(self) -> None:
        """A client certificate from another CA (the lab's CA still checks the agent): 403."""
        other = Path(tempfile.mkdtemp(prefix="other-ca-"))
        self.addCleanup(shutil.rmtree, other, True)
        certs.init(other, ["node1"], [], force=True)
        mixed = Path(tempfile.mkdtemp(prefix="mixed-certs-"))
        self.addCleanup(shutil.rmtree, mixed, True)
        shutil.copy(self.the_lab.tls / certs.CA_CERT, mixed / "ca.pem")
        shutil.copy(other / certs.CLIENT_CERT, mixed / "cert.pem")
        shutil.copy(other / certs.CLIENT_KEY, mixed / "key.pem")
        p = self.compose("up", "-d", env=self.env(cert_path=mixed), check=False)
        self.assert_refused(p)
        self.assertIn("403 Client Error", p.stderr)
        self.assertIn("Missing request signature headers", p.stderr)

    @explain
    def test_agent_from_another_ca_refused_by_compose(self) -> None:
        """With another CA in DOCKER_CERT_PATH, compose does not trust the agent."""
        other = Path(tempfile.mkdtemp(prefix="other-ca-"))
        self.addCleanup(shutil.rmtree, other, True)
        certs.init(other, ["node1"], [], force=True)
        p = self.compose("up", "-d", env=self.env(cert_path=other), check=False)
        self.assert_refused(p)
        self.assertRegex(p.stderr, r"(?i)ssl|certificate")
