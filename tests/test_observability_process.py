"""A real agent process under twistd: JSON logs on stdout, and the plain metrics listener."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import TestCase

from swarmagent.signature import Signer
from tests.lab import REPO_ROOT, http_request, wait_until
from tests.test_healthcheck import free_port

TWISTD = "from twisted.scripts.twistd import run; run()"
#: Far below the agent's idle timeout (120 s), far above its TLS close grace.
CLOSE_BUDGET = 10.0


def send_until_closed(port: int, head: bytes) -> tuple[bytes, bool]:
    """Write ``head`` to the agent over TLS, then go on writing, reading as it comes:
    what the agent answered, and whether it closed the TCP connection within
    :data:`CLOSE_BUDGET` seconds."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port))) as s:
        s.settimeout(0.05)
        answer, sent, tls_ended = b"", 0, False
        end = time.monotonic() + CLOSE_BUDGET
        while time.monotonic() < end:
            try:
                chunk = head[sent : sent + 16_384] if sent < len(head) else b"a" * 16_384
                sent += s.send(chunk)
            except TimeoutError:
                pass
            except OSError:
                return answer, True
            if not tls_ended:
                try:
                    data = s.recv(65_536)
                except (TimeoutError, ssl.SSLWantReadError):
                    continue
                except OSError:
                    return answer, True
                answer += data
                tls_ended = not data  # the agent's close_notify
            elif select.select([s], [], [], 0)[0]:
                # Below TLS: the TCP connection's end (b"", or a reset).
                try:
                    if not socket.socket.recv(s, 1):
                        return answer, True
                except OSError:
                    return answer, True
        return answer, False


class ProcessTests(TestCase):
    def start_agent(self, **env: str) -> tuple[str, Path]:
        """Start ``twistd -n swarmagent`` on a free port; its URL and stdout file."""
        port = free_port()
        out = Path(self.mktemp())
        full = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(REPO_ROOT),
            "AGENT_HOST": "127.0.0.1",
            "AGENT_PORT": str(port),
            "DATA_PATH": os.path.abspath(self.mktemp()),
            "DOCKER_HOST": "unix:///nonexistent/docker.sock",
            **env,
        }
        with out.open("wb") as stdout:
            agent = subprocess.Popen(
                [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "swarmagent"],
                env=full,
                stdout=stdout,
                stderr=subprocess.STDOUT,
            )
        self.addCleanup(agent.wait, 10)
        self.addCleanup(agent.terminate)
        url = f"https://127.0.0.1:{port}"
        wait_until(lambda: self.get(url, "/ping") == 204, 20, 0.2, "the agent to answer")
        return url, out

    def get(self, url: str, path: str, headers: dict[str, str] | None = None) -> int:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            return http_request(
                url, "GET", path, headers=headers, timeout=2, context=context
            ).status
        except OSError:
            return 0

    def test_json_logs_and_metrics_port(self) -> None:
        metrics_port = free_port()
        url, out = self.start_agent(LOG_FORMAT="json", AGENT_METRICS_PORT=str(metrics_port))
        signer = Signer.generate()
        self.assertEqual(self.get(url, "/agents?token=hunter2", signer.headers()), 200)
        self.assertEqual(self.get(url, "/metrics"), 403)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        names = {f.name for f in text_string_to_metric_families(text)}
        self.assertIn("swarmagent_requests", names)
        self.assertIn("process_resident_memory_bytes", names)

        def logged() -> list[dict[str, object]]:
            lines = out.read_text().splitlines()
            return [json.loads(line) for line in lines if line.strip()]

        wait_until(
            lambda: any(e.get("route") == "own" and e.get("path") == "/agents" for e in logged()),
            10,
            0.2,
            "the access line of /agents",
        )
        raw = out.read_text()
        for value in signer.headers().values():
            self.assertNotIn(value, raw)
        self.assertNotIn("hunter2", raw)
        # twisted.web's own combined-log line is gone.
        self.assertNotIn(' HTTP/1.1\\" ', raw)

    def test_text_access_lines_under_twistd(self) -> None:
        """The access line as twistd's text lines look, on stdout beside them
        (flushed without more traffic), and no twisted.web combined-log line."""
        url, out = self.start_agent()
        signer = Signer.generate()
        self.assertEqual(self.get(url, "/agents?token=hunter2", signer.headers()), 200)
        access = re.compile(
            r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[swarmagent\.access#info\] "
            r"GET /agents own nodes=\S+ 200 \d+B [\d.]+ms client=key:[0-9a-f]{16} missing=-$",
            re.MULTILINE,
        )
        wait_until(lambda: access.search(out.read_text()), 10, 0.2, "the access line of /agents")
        raw = out.read_text()
        # twistd's own lines, in the same format, around it.
        self.assertRegex(raw, r"\[-\] |\[twisted|\[swarmagent\.(?!access#)")
        self.assertNotIn("hunter2", raw)
        self.assertNotIn(' HTTP/1.1" ', raw)

    def test_head_too_large_is_answered_and_closed(self) -> None:
        """Issue #14 item 6: a client that keeps sending a head of 20 KB, 200 KB or
        2 MB gets 431 and a closed connection, not a wait for the idle timeout."""
        url, _ = self.start_agent(AGENT_ACCESS_LOG="off")
        port = int(url.rsplit(":", 1)[1])
        for size in (20_000, 200_000, 2_000_000):
            for head in (
                b"GET /ping HTTP/1.1\r\nHost: agent\r\nX-Big: " + b"a" * size,
                b"GET /ping HTTP/1.1\r\n"
                + b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 990) for i in range(size // 1000)),
            ):
                with self.subTest(size=size, lines=head.count(b"\r\n")):
                    answer, closed = send_until_closed(port, head)
                    self.assertTrue(closed)
                    self.assertTrue(answer.startswith(b"HTTP/1.1 431 "), answer[:80])
        # And the agent serves the next client as before.
        self.assertEqual(self.get(url, "/ping"), 204)

    def test_status_command_signs_with_the_secret(self) -> None:
        """``python -m swarmagent.status`` proves itself as the agents do (here: the secret)."""
        url, _ = self.start_agent(AGENT_SECRET="s3cret", AGENT_ACCESS_LOG="off")
        port = url.rsplit(":", 1)[1]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(REPO_ROOT),
            "AGENT_HOST": "0.0.0.0",
            "AGENT_PORT": port,
        }

        def status(**extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "swarmagent.status", *extra.pop("args", "").split()],
                env={**env, **extra},
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )

        refused = status()
        self.assertEqual(refused.returncode, 1)
        self.assertIn("answered 403", refused.stderr)
        table = status(AGENT_SECRET="s3cret")
        self.assertEqual(table.returncode, 0, table.stderr)
        self.assertIn("Swarm nodes expected to run an agent", table.stdout)
        self.assertRegex(table.stdout, r"secret +set")
        self.assertNotIn("s3cret", table.stdout)
        doc = json.loads(status(AGENT_SECRET="s3cret", args="--json").stdout)
        self.assertEqual(doc["Settings"]["access-log"], False)
        self.assertEqual(doc["Peers"], [])
