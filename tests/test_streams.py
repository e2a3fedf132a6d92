"""Interactive and streaming Docker traffic through the agents, with real clients.

The docker CLI runs in a pseudo-terminal (pexpect) against node1's agent, with
the target header from its ``config.json``; the container is on node3, so
every byte crosses two agents. Run as root:
``python -m twisted.trial tests.test_streams``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import ClassVar

import docker
import pexpect

from tests.lab import DOCKER_CLI, IMAGE, Lab, Node, sdk_client, wait_until
from tests.labcase import LabTestCase, explain


class StreamTests(LabTestCase):
    """A container on node3, reached through node1's agent."""

    NODES = 3
    container: ClassVar[str] = ""

    @classmethod
    def setUpLab(cls, lab: Lab) -> None:
        super().setUpLab(lab)
        client = lab.node("node3").docker()
        try:
            c = client.containers.run(
                IMAGE,
                ["sh", "-c", "i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.2; done"],
                name="ticker",
                detach=True,
            )
            cls.container = c.id
        finally:
            client.close()

    def cli(self, *args: str, target: str = "node3") -> pexpect.spawn:
        """The docker CLI in a pty, pointed at node1's agent, targeting ``target``."""
        config = tempfile.mkdtemp(prefix="dockercfg-")
        self.addCleanup(shutil.rmtree, config, True)
        with open(os.path.join(config, "config.json"), "w") as f:
            json.dump({"HttpHeaders": {"X-PortainerAgent-Target": target}}, f)
        url = self.agent("node1").url.replace("https://", "tcp://")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DOCKER_HOST": url,
            # The lab's client certificate, as for a TLS-protected engine.
            "DOCKER_TLS_VERIFY": "1",
            "DOCKER_CERT_PATH": str(self.the_lab.tls),
        }
        child = pexpect.spawn(
            DOCKER_CLI,
            ["--config", config, *args],
            env=env,
            encoding="utf-8",
            timeout=15,
            dimensions=(24, 80),
        )
        self.addCleanup(child.close, True)
        return child

    def sdk(self, target: str = "node3") -> docker.APIClient:
        client = sdk_client(self.agent("node1").url, self.the_lab.tls, target=target, timeout=15)
        self.addCleanup(client.close)
        return client.api

    @explain
    def test_exec_it_on_another_node(self) -> None:
        """`docker exec -it` runs a shell on node3 and reads its output."""
        child = self.cli("exec", "-it", self.container, "sh")
        child.expect_exact("#")
        child.sendline("echo $((6*7)) on $(hostname)")
        child.expect(r"42 on \w+")
        child.sendline("exit 7")
        child.expect(pexpect.EOF)
        child.close()
        self.assertEqual(child.exitstatus, 7)

    @explain
    def test_exec_stdin_half_close(self) -> None:
        """Without a TTY, the end of stdin reaches the process (half-close)."""
        child = self.cli("exec", "-i", self.container, "sh", "-c", "cat; echo after-eof")
        child.sendline("through-two-agents")
        child.expect_exact("through-two-agents")
        child.sendeof()
        child.expect_exact("after-eof")
        child.expect(pexpect.EOF)
        child.close()
        self.assertEqual(child.exitstatus, 0)

    @explain
    def test_attach_sees_output_and_sends_input(self) -> None:
        """`docker attach` to an interactive container on node3."""
        client = self.the_lab.node("node3").docker()
        try:
            c = client.containers.run(
                IMAGE,
                ["sh", "-c", "while read l; do echo echo:$l; done"],
                name=f"attach-{time.monotonic_ns()}",
                stdin_open=True,
                detach=True,
            )
        finally:
            client.close()
        since = time.time() - 1
        child = self.cli("attach", c.id)
        # The CLI relays stdin once attached; the engine says when it is.
        wait_until(
            lambda: attached(self.the_lab.node("node3"), c.id, since),
            10,
            0.1,
            "the CLI to attach on node3",
        )
        child.sendline("ping-from-node1")
        child.expect_exact("echo:ping-from-node1")
        child.sendcontrol("c")

    @explain
    def test_run_it_on_another_node(self) -> None:
        """`docker run -it --rm` creates, attaches, starts and waits on node3."""
        label = f"run-it={time.monotonic_ns()}"
        child = self.cli("run", "-it", "--rm", "--label", label, IMAGE, "sh")
        child.expect_exact("#")
        client = self.the_lab.node("node3").docker()
        self.addCleanup(client.close)
        running = client.containers.list(filters={"label": label})
        self.assertEqual(len(running), 1, "the container runs on node3")
        child.sendline("hostname; exit 3")
        child.expect(pexpect.EOF)
        child.close()
        self.assertEqual(child.exitstatus, 3)
        # The engine removes an --rm container just after it exits.
        wait_until(
            lambda: not client.containers.list(all=True, filters={"label": label}),
            5,
            0.1,
            "the --rm container to be removed",
        )

    @explain
    def test_logs_follow_is_live(self) -> None:
        """`docker logs -f` shows a line written after it started, within a second."""
        client = self.the_lab.node("node3").docker()
        try:
            c = client.containers.run(
                IMAGE,
                ["sh", "-c", "read x < /tmp/never 2>/dev/null; sleep 3600"],
                name=f"quiet-{time.monotonic_ns()}",
                detach=True,
            )
            child = self.cli("logs", "-f", c.id)
            # A first line through is the sign that the CLI follows.
            ready = f"ready-{time.monotonic_ns()}"
            c.exec_run(["sh", "-c", f"echo {ready} > /proc/1/fd/1"])
            child.expect_exact(ready, timeout=10)
            marker = f"marker-{time.monotonic_ns()}"
            c.exec_run(["sh", "-c", f"echo {marker} > /proc/1/fd/1"])
            written = time.monotonic()
            child.expect_exact(marker, timeout=5)
            self.assertLess(time.monotonic() - written, 1.0)
        finally:
            client.close()

    @explain
    def test_sdk_streams(self) -> None:
        """The SDK's followed logs and streamed stats deliver as it happens."""
        api = self.sdk()
        lines = api.logs(self.container, stream=True, follow=True, tail=0)
        started = time.monotonic()
        first = next(iter(lines))
        self.assertTrue(first.startswith(b"line-"), first)
        self.assertLess(time.monotonic() - started, 2.0)
        lines.close()
        stats = api.stats(self.container, stream=True, decode=True)
        samples = [next(stats), next(stats)]
        self.assertNotEqual(samples[0]["read"], samples[1]["read"])
        self.assertEqual(samples[1]["id"], self.container)
        stats.close()


def attached(node: Node, container: str, since: float) -> bool:
    """Whether ``node``'s engine had a client attach to ``container`` since ``since``."""
    client = node.docker()
    try:
        events = client.events(
            since=since,
            until=time.time(),
            decode=True,
            filters={"container": container, "event": "attach"},
        )
        return any(True for _ in events)
    finally:
        client.close()
