"""Integration: Portainer's agent-only routes and plain-CLI stack deploys, in a real swarm.

Run as root: ``python -m twisted.trial tests.test_parity_cluster``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.lab import (
    CLIS,
    DOCKER_CLI,
    IMAGE,
    Lab,
    Response,
    multipart,
    rss_kib,
    run_in_volume,
    wait_until,
)
from tests.labcase import TARGET, LabTestCase, explain

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
        return self.docker_cli(*args, cli=cli, via=via, timeout=90)

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
                def on_every_node(stack: str = stack) -> bool:
                    return len(self.node_networks(stack)) == 3

                def gone(stack: str = stack) -> bool:
                    return self.manager_state(stack) == (set(), set())

                wait_until(
                    on_every_node,
                    60,
                    0.5,
                    f"{stack}_front on every node",
                )
                rm = self.cli(cli, "stack", "rm", stack)
                self.assertEqual(rm.returncode, 0, rm.stdout + rm.stderr)
                wait_until(
                    gone,
                    60,
                    0.5,
                    f"{stack} gone from the manager",
                )


VOLUME = "parity-data"


class BrowseTests(LabTestCase):
    """A volume on node3, browsed through node1's agent as Portainer's volume
    browser does, each change read back by a container on node3."""

    @classmethod
    def setUpLab(cls, lab: Lab) -> None:
        super().setUpLab(lab)
        client = lab.node("node3").docker()
        try:
            client.volumes.create(VOLUME)
        finally:
            client.close()

    def setUp(self) -> None:
        super().setUp()
        self.fill()

    def fill(self) -> None:
        """The same content before every test."""
        self.in_volume(
            "rm -rf /data/* && mkdir -p /data/sub && printf hello > /data/a.txt"
            " && printf deep > /data/sub/b.txt"
        )

    def in_volume(self, script: str) -> str:
        """Run ``script`` in a container on node3 that mounts the volume at /data."""
        return run_in_volume(self.node("node3"), VOLUME, script)

    def browse(
        self,
        method: str,
        path: str,
        body: bytes | dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        target: str | None = "node3",
    ) -> Response:
        hdrs = dict(headers or {})
        if target:
            hdrs[TARGET] = target
        return self.agent("node1").request(method, path, body=body, headers=hdrs, timeout=60)

    @explain
    def test_list_in_every_route_form(self) -> None:
        for path, target in [
            (f"/v2/browse/ls?volumeID={VOLUME}&path=/", "node3"),
            (f"/browse/ls?volumeID={VOLUME}&path=/", "node3"),
            (f"/v1/browse/{VOLUME}/ls?path=/", "node3"),
            (f"/v1.41/v2/browse/ls?volumeID={VOLUME}&path=/", "node3"),
            # No target: the volume's node is found as a container's is.
            (f"/v2/browse/ls?volumeID={VOLUME}&path=/", None),
        ]:
            with self.subTest(path=path, target=target):
                r = self.browse("GET", path, target=target)
                self.assertEqual(r.status, 200, r.body[:300])
                listing = {e["Name"]: e for e in r.json()}
                self.assertEqual(set(listing), {"a.txt", "sub"})
                self.assertEqual(listing["a.txt"]["Size"], 5)
                self.assertFalse(listing["a.txt"]["Dir"])
                self.assertTrue(listing["sub"]["Dir"])
                self.assertIsInstance(listing["a.txt"]["ModTime"], int)
        r = self.browse("GET", f"/v2/browse/ls?volumeID={VOLUME}&path=/sub")
        self.assertEqual([e["Name"] for e in r.json()], ["b.txt"])

    @explain
    def test_download_with_a_range(self) -> None:
        r = self.browse("GET", f"/v2/browse/get?volumeID={VOLUME}&path=/sub/b.txt")
        self.assertEqual((r.status, r.body), (200, b"deep"))
        self.assertIsNotNone(r.headers.get("Last-Modified"))
        r = self.browse(
            "GET", f"/v2/browse/get?volumeID={VOLUME}&path=a.txt", headers={"Range": "bytes=1-3"}
        )
        self.assertEqual((r.status, r.body), (206, b"ell"))

    @explain
    def test_upload_rename_delete(self) -> None:
        """A 50 MB upload through node1 to node3, streamed (both agents' RSS
        stay flat), then renamed and deleted; each checked on node3."""
        content = os.urandom(1024) * (50 * 1024)
        body, ctype = multipart({"Path": "/up"}, "big.bin", content)
        pids = [self.agent(n).proc.pid for n in ("node1", "node3")]
        before = [rss_kib(p) for p in pids]
        r = self.browse(
            "POST",
            f"/v2/browse/put?volumeID={VOLUME}",
            body=body,
            headers={"Content-Type": ctype},
        )
        self.assertEqual(r.status, 204, r.body[:300])
        grown = [rss_kib(p) - b for p, b in zip(pids, before, strict=True)]
        # A whole copy of the upload would be 50 MB.
        self.assertLess(max(grown), 20 * 1024, f"RSS grew by {grown} KiB")
        expected = hashlib.md5(content).hexdigest()
        self.assertEqual(self.in_volume("md5sum /data/up/big.bin").split()[0], expected)

        r = self.browse(
            "PUT",
            f"/browse/rename?volumeID={VOLUME}",
            body={"CurrentFilePath": "a.txt", "NewFilePath": "c.txt"},
        )
        self.assertEqual(r.status, 204, r.body[:300])
        self.assertEqual(self.in_volume("cat /data/c.txt; ls /data"), "helloc.txt\nsub\nup\n")

        r = self.browse("DELETE", f"/v1/browse/{VOLUME}/delete?path=/sub")
        self.assertEqual(r.status, 204, r.body[:300])
        self.assertEqual(self.in_volume("ls /data"), "c.txt\nup\n")

    @explain
    def test_every_operation_in_every_route_form(self) -> None:
        """Portainer's v2 routes, the same without /v2, and the legacy v1 routes
        with the volume in the path: list, download, upload, rename, delete."""
        forms = {
            "v2": lambda op, query: f"/v2/browse/{op}?volumeID={VOLUME}&{query}",
            "plain": lambda op, query: f"/browse/{op}?volumeID={VOLUME}&{query}",
            "v1": lambda op, query: f"/v1/browse/{VOLUME}/{op}?{query}",
        }
        for form, url in forms.items():
            with self.subTest(form=form):
                self.fill()
                r = self.browse("GET", url("ls", "path=/sub"))
                self.assertEqual([e["Name"] for e in r.json()], ["b.txt"])
                r = self.browse("GET", url("get", "path=a.txt"), headers={"Range": "bytes=1-"})
                self.assertEqual((r.status, r.body), (206, b"ello"))
                body, ctype = multipart({"Path": "/sub"}, "new.txt", form.encode() + b"\n")
                r = self.browse("POST", url("put", ""), body=body, headers={"Content-Type": ctype})
                self.assertEqual(r.status, 204, r.body[:300])
                self.assertEqual(self.in_volume("cat /data/sub/new.txt"), f"{form}\n")
                r = self.browse(
                    "PUT", url("rename", ""),
                    body={"CurrentFilePath": "/sub/new.txt", "NewFilePath": "top.txt"},
                )  # fmt: skip
                self.assertEqual(r.status, 204, r.body[:300])
                r = self.browse("DELETE", url("delete", "path=/sub"))
                self.assertEqual(r.status, 204, r.body[:300])
                self.assertEqual(self.in_volume("ls /data"), "a.txt\ntop.txt\n")

    @explain
    def test_symlinks_planted_by_a_container_are_refused(self) -> None:
        self.in_volume("ln -s / /data/root && ln -s /etc/passwd /data/pw && ln -s .. /data/sub/up")
        for method, path in [
            ("GET", f"/v2/browse/ls?volumeID={VOLUME}&path=/root"),
            ("GET", f"/v2/browse/ls?volumeID={VOLUME}&path=/root/etc"),
            ("GET", f"/v2/browse/get?volumeID={VOLUME}&path=pw"),
            ("GET", f"/v2/browse/get?volumeID={VOLUME}&path=/sub/up/a.txt"),
            ("DELETE", f"/v2/browse/delete?volumeID={VOLUME}&path=/root/etc/hostname"),
            ("GET", f"/v2/browse/get?volumeID={VOLUME}&path=/sub/../../a.txt"),
        ]:
            with self.subTest(path=path):
                r = self.browse(method, path)
                self.assertIn(r.status, range(400, 500), r.body[:300])
                self.assertNotIn(b"root:", r.body)
        self.assertEqual(self.in_volume("cat /data/a.txt; echo"), "hello\n")

    @explain
    def test_host_info_from_each_node(self) -> None:
        for name in ("node1", "node2", "node3"):
            with self.subTest(node=name):
                r = self.browse("GET", "/v2/host/info", target=name)
                self.assertEqual(r.status, 200, r.body[:300])
                doc = r.json()
                self.assertEqual(set(doc), {"PCIDevices", "PhysicalDisks"})
