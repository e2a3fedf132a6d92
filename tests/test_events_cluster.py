"""The merged event stream, WebSocket consoles and stream leaks, in a real swarm.

Everything goes through node1's agent with real clients: the docker SDK for
events, ``websocket-client`` for a Portainer console, raw TLS sockets for the
leak check. Run as root: ``SALAB_ID=4 python -m twisted.trial tests.test_events_cluster``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import docker
import websocket

from tests.lab import AGENT_PORT, IMAGE, Agent, Node, run, sdk_client, wait_until
from tests.labcase import TARGET, LabTestCase, explain, knows_exactly

#: Sockets that 100 open streams add to each agent, at least.
EXTRA_SOCKETS = {"node1": 200, "node3": 100}


def label() -> str:
    return f"events-test={time.monotonic_ns()}"


def event_listeners(nodes: list[Node]) -> dict[str, int]:
    """How many event streams each node's engine serves, by node name."""
    out = {}
    for node in nodes:
        client = node.docker()
        try:
            out[node.name] = int(client.info()["NEventsListener"])
        finally:
            client.close()
    return out


def upstreams_open(nodes: list[Node], before: dict[str, int], timeout: float = 10) -> None:
    """Wait until every node's engine serves one event stream more than ``before``.

    The agent opens one upstream per node for a client's stream. The wait is
    a bound, not a check: the tests' own assertions tell what went wrong.
    """
    with contextlib.suppress(TimeoutError):
        wait_until(
            lambda: all(n > before[name] for name, n in event_listeners(nodes).items()),
            timeout,
            0.05,
            "the agent's upstream event streams",
        )


def take(seen: queue.Queue[dict[str, Any]], container: str) -> bool:
    """Take ``container``'s event out of ``seen``, if it has arrived."""
    with seen.mutex:
        for event in seen.queue:
            if event["id"] == container:
                seen.queue.remove(event)
                return True
    return False


def agent_usage(agent: Agent, node: Node) -> dict[str, int]:
    """What an agent process holds: fds, sockets, TCP connections, RSS (KiB)."""
    pid = agent.proc.pid
    fds = os.listdir(f"/proc/{pid}/fd")
    sockets = 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                sockets += 1
        except OSError:
            pass
    ss = run("nsenter", "-t", str(node.pid), "--net", "ss", "-tnpH", "state", "established")
    tcp = [line for line in ss.stdout.splitlines() if f"pid={pid}," in line]
    peers = [line for line in tcp if re.search(rf"\s\S+:{AGENT_PORT}\s+users", line)]
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return {
        "fds": len(fds),
        "sockets": sockets,
        "tcp": len(tcp),
        "tcp_to_peers": len(peers),
        "rss_kib": rss,
    }


def text_frame(ws: websocket.WebSocket) -> str:
    """The next message of a console: Text (bytes would be a Binary frame)."""
    frame = ws.recv()
    assert isinstance(frame, str), frame
    return frame


class ClusterStreamTests(LabTestCase):
    """Three nodes, an agent on each; clients talk to node1's agent."""

    NODES = 3

    def sdk(self, target: str = "", timeout: int = 15) -> docker.APIClient:
        client = sdk_client(
            self.agent("node1").url, self.the_lab.tls, target=target, timeout=timeout
        )
        self.addCleanup(client.close)
        return client.api

    def run_on_each_node(self, tag: str, cmd: list[str]) -> dict[str, str]:
        """Start a container on every node; container ID → node name."""
        out = {}
        for node in self.the_lab.nodes:
            client = node.docker()
            try:
                c = client.containers.run(
                    IMAGE, cmd, labels={tag.split("=")[0]: tag.split("=")[1]}, detach=True
                )
                out[c.id] = node.name
            finally:
                client.close()
        return out

    @explain
    def test_live_events_from_every_node(self) -> None:
        """The SDK's `events(decode=True)` sees a start on each node, tagged with it."""
        tag = label()
        api = self.sdk()
        listening = event_listeners(self.the_lab.nodes)
        stream = api.events(decode=True, filters={"event": "start", "label": tag})
        seen: queue.Queue[dict[str, Any]] = queue.Queue()

        def read() -> None:
            try:
                for event in stream:
                    seen.put(event)
            except Exception:  # closed by the test
                pass

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        self.addCleanup(stream.close)
        upstreams_open(self.the_lab.nodes, listening)
        started = self.run_on_each_node(tag, ["sleep", "3600"])
        got: dict[str, str] = {}
        deadline = time.monotonic() + 15
        while len(got) < len(started) and time.monotonic() < deadline:
            try:
                event = seen.get(timeout=0.5)
            except queue.Empty:
                continue
            got[event["id"]] = event["Portainer"]["Agent"]["NodeName"]
        self.assertEqual(got, started)

    @explain
    def test_node_back_resumes_where_it_stopped(self) -> None:
        """A node that leaves the stream and comes back: what it saw meanwhile
        arrives, what it sent before does not arrive twice."""
        tag = label()
        key, value = tag.split("=")
        lab = self.the_lab
        listening = event_listeners(lab.nodes)
        stream = self.sdk().events(decode=True, filters={"event": "start", "label": tag})
        seen: queue.Queue[dict[str, Any]] = queue.Queue()

        def read() -> None:
            try:
                for event in stream:
                    seen.put(event)
            except Exception:  # closed by the test
                pass

        threading.Thread(target=read, daemon=True).start()
        self.addCleanup(stream.close)
        upstreams_open(lab.nodes, listening)
        node3 = self.node("node3").docker()
        self.addCleanup(node3.close)
        before = node3.containers.run(IMAGE, ["true"], labels={key: value}, detach=True).id
        self.assertEqual(seen.get(timeout=10)["id"], before)

        agent1 = self.agent("node1")
        others = {"node1", "node2"}
        lab.set_dns([n for n in lab.nodes if n.name in others])
        wait_until(lambda: knows_exactly(agent1, others), 10, 0.1, "node3 to leave")
        # The stream follows the table each second: it lets go of node3's.
        with contextlib.suppress(TimeoutError):
            wait_until(
                lambda: event_listeners([self.node("node3")])["node3"] <= listening["node3"],
                10,
                0.05,
                "the stream to let go of node3",
            )
        meanwhile = node3.containers.run(IMAGE, ["true"], labels={key: value}, detach=True).id
        lab.set_dns(lab.nodes)
        wait_until(lambda: knows_exactly(agent1, others | {"node3"}), 10, 0.1, "node3 back")
        self.assertEqual(seen.get(timeout=10)["id"], meanwhile)
        # node3's events come in order: a replay of the first would come
        # before this one, whose arrival ends the look.
        end = node3.containers.run(IMAGE, ["true"], labels={key: value}, detach=True).id
        wait_until(lambda: take(seen, end), 10, 0.05, "the closing event")
        self.assertTrue(seen.empty(), [e["id"] for e in list(seen.queue)])

    @explain
    def test_until_ends_the_merged_stream(self) -> None:
        """With `since` and `until`, the merged stream holds each node's past
        events and ends once every node's stream has ended."""
        tag = label()
        since = time.time() - 1
        started = self.run_on_each_node(tag, ["true"])
        until = time.time() + 1
        api = self.sdk()
        began = time.monotonic()
        events = list(
            api.events(
                since=since, until=until, decode=True, filters={"event": "start", "label": tag}
            )
        )
        self.assertLess(time.monotonic() - began, 10, "the stream ended")
        got = {e["id"]: e["Portainer"]["Agent"]["NodeName"] for e in events}
        self.assertEqual(got, started)

    @explain
    def test_targeted_events_are_one_nodes(self) -> None:
        tag = label()
        since = time.time() - 1
        started = self.run_on_each_node(tag, ["true"])
        api = self.sdk(target="node3")
        events = list(
            api.events(since=since, until=time.time() + 1, decode=True, filters={"label": tag})
        )
        ids = {e["id"] for e in events if e.get("Type") == "container"}
        self.assertEqual(ids, {c for c, n in started.items() if n == "node3"})

    @explain
    def test_exec_console_on_node3(self) -> None:
        """Portainer's way: create the exec through the agent with the target,
        then open /websocket/exec on node1's agent; node3 runs it."""
        node3 = self.node("node3")
        client = node3.docker()
        self.addCleanup(client.close)
        c = client.containers.run(IMAGE, ["sleep", "3600"], detach=True)
        created = self.agent("node1").request(
            "POST",
            f"/v1.41/containers/{c.id}/exec",
            body={
                "Cmd": ["sh"],
                "AttachStdin": True,
                "AttachStdout": True,
                "AttachStderr": True,
                "Tty": True,
            },
            headers={TARGET: "node3"},
        )
        self.assertEqual(created.status, 201, created.body)
        exec_id = created.json()["Id"]
        tls = self.the_lab.tls
        ws = websocket.create_connection(
            f"wss://{self.node('node1').ip}:{AGENT_PORT}/websocket/exec?id={exec_id}",
            header=[f"{TARGET}: node3"],
            sslopt={
                "certfile": str(tls / "cert.pem"),
                "keyfile": str(tls / "key.pem"),
                "ca_certs": str(tls / "ca.pem"),
                "cert_reqs": ssl.CERT_REQUIRED,
            },
            timeout=10,
        )
        self.addCleanup(ws.close)
        ws.send("echo $((6*7))-é-ok\n")
        output = ""
        deadline = time.monotonic() + 10
        while "42-é-ok" not in output and time.monotonic() < deadline:
            output += text_frame(ws)
        self.assertIn("42-é-ok", output)
        # A paste bigger than the reference's 2048-byte limit, in one message
        # (lines kept under the terminal's 4096-byte line limit).
        paste = "".join(f"echo line-{i}-done\n" for i in range(400))
        self.assertGreater(len(paste), 6000)
        ws.send(paste)
        while "line-399-done\r\n" not in output and time.monotonic() < deadline + 10:
            output += text_frame(ws)
        self.assertIn("line-399-done\r\n", output)
        self.assertTrue(client.api.exec_inspect(exec_id)["Running"], "node3 runs the exec")
        ws.send("exit\n")
        while ws.connected and time.monotonic() < deadline:
            try:
                ws.recv()
            except websocket.WebSocketConnectionClosedException:
                break
        self.assertFalse(client.api.exec_inspect(exec_id)["Running"])

    @explain
    def test_console_refusal(self) -> None:
        r = self.agent("node1").request("GET", "/websocket/exec?id=zz", headers={TARGET: "node3"})
        self.assertEqual(r.status, 400)
        self.assertEqual(r.json()["message"], "Invalid query parameter: id")

    @explain
    def test_abandoned_streams_leak_nothing(self) -> None:
        """100 followed logs and event streams, some to node3, abandoned at once."""
        node1, node3 = self.node("node1"), self.node("node3")
        containers = {}
        for node in (node1, node3):
            client = node.docker()
            try:
                c = client.containers.run(
                    IMAGE, ["sh", "-c", "while true; do echo tick; sleep 0.1; done"], detach=True
                )
                containers[node.name] = c.id
            finally:
                client.close()
        agent1, agent3 = self.agent("node1"), self.agent("node3")
        context = self.the_lab.client_context()
        context.check_hostname = False

        def open_stream(path: str, target: str) -> ssl.SSLSocket:
            raw = socket.create_connection((node1.ip, AGENT_PORT), timeout=10)
            s = context.wrap_socket(raw)
            head = f"GET {path} HTTP/1.1\r\nHost: agent\r\n"
            if target:
                head += f"{TARGET}: {target}\r\n"
            s.sendall((head + "\r\n").encode())
            got = b""
            while b"\r\n\r\n" not in got:
                got += s.recv(4096)
            self.assertTrue(got.startswith(b"HTTP/1.1 200"), got[:200])
            return s

        kinds = [
            (f"/v1.41/containers/{containers['node3']}/logs?follow=1&stdout=1", "node3"),
            (f"/v1.41/containers/{containers['node1']}/logs?follow=1&stdout=1", ""),
            ("/v1.41/events", ""),
            ("/v1.41/events", "node3"),
        ]
        # Warm up (pooled connections, first imports), then measure.
        for path, target in kinds:
            open_stream(path, target).close()

        def usage() -> dict[str, dict[str, int]]:
            return {"node1": agent_usage(agent1, node1), "node3": agent_usage(agent3, node3)}

        def settle(enough: Callable[[dict[str, dict[str, int]]], bool], what: str) -> None:
            """Until usage is ``enough`` and alike in two looks in a row (bounded:
            the assertions below tell what went wrong)."""
            looks = [usage()]

            def still() -> bool:
                looks.append(usage())
                a, b = looks[-2:]
                alike = all(a[n][k] == b[n][k] for n in a for k in ("sockets", "tcp", "fds"))
                return alike and enough(b)

            with contextlib.suppress(TimeoutError):
                wait_until(still, 10, 0.5, what)

        # Back to their usual: the warm-up streams gone, a pooled connection
        # to every agent (between probes, one may be being replaced).
        peers = len(self.the_lab.nodes)
        settle(
            lambda now: all(now[name]["tcp_to_peers"] >= peers for name in now),
            "the agents to let go of the warm-up streams",
        )
        before = usage()

        def settled() -> dict[str, dict[str, int]] | None:
            now = usage()
            for name in now:
                if now[name]["sockets"] > before[name]["sockets"] + 2:
                    return None
            return now

        # Two rounds: CPython keeps its heap's high-water mark, so the first
        # round's RSS stays; a leak would grow it again in the second.
        rounds = []
        for _ in range(2):
            streams = [open_stream(*kinds[i % 4]) for i in range(100)]
            settle(
                lambda now: all(
                    now[name]["sockets"] > before[name]["sockets"] + extra
                    for name, extra in EXTRA_SOCKETS.items()
                ),
                "the agents to hold every upstream",
            )
            during = usage()
            for s in streams:
                s.close()
            after = wait_until(settled, 15, 0.5, "the agents to let go of the streams")
            rounds.append({"during": during, "after": after})
        sys.stderr.write(f"\nleak check: {json.dumps({'before': before, 'rounds': rounds})}\n")
        first, second = rounds[0]["after"], rounds[1]["after"]
        for name, extra in EXTRA_SOCKETS.items():
            self.assertGreater(
                rounds[0]["during"][name]["sockets"], before[name]["sockets"] + extra, name
            )
            self.assertLessEqual(second[name]["tcp"], before[name]["tcp"] + 2, name)
            self.assertLessEqual(second[name]["fds"], before[name]["fds"] + 2, name)
            self.assertLessEqual(second[name]["rss_kib"], before[name]["rss_kib"] + 32 * 1024, name)
            self.assertLessEqual(second[name]["rss_kib"], first[name]["rss_kib"] + 8 * 1024, name)
