"""Integration: the cluster from the plain docker CLI, in a real swarm.

Node filters, the node label on listed items, images loaded and pruned on
every node with the broadcast header, and the cluster-wide ``system df``;
with both docker CLIs the machine has and the docker SDK.

Run as root: ``SALAB_ID=7 python -m twisted.trial tests.test_cluster_cli``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import Any

from tests.lab import CLIS, IMAGE, Lab, Node, rss_kib, sdk_client, wait_until
from tests.labcase import LabTestCase, explain

#: Both docker CLIs the machine has: Debian's 20.10 and a current one.
BROADCAST = "X-SwarmAgent-Broadcast"
LABEL = "swarmagent.node"
NODES = ("node1", "node2", "node3")


def engine(node: Node) -> Any:
    return node.docker(timeout=300)


class ClusterCLITests(LabTestCase):
    """node1 (manager), node2 and node3 (workers), an agent on each; on each
    node a running and a stopped container and a volume."""

    @classmethod
    def setUpLab(cls, lab: Lab) -> None:
        super().setUpLab(lab)
        for node in lab.nodes:
            client = engine(node)
            try:
                client.containers.run(IMAGE, ["sleep", "3600"], name=f"up-{node.name}", detach=True)
                client.containers.create(IMAGE, ["true"], name=f"down-{node.name}")
                client.volumes.create(f"vol-{node.name}")
            finally:
                client.close()

    def cli(
        self,
        cli: str,
        *args: str,
        via: str = "node1",
        headers: dict[str, str] | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """``cli`` against ``via``'s agent, with ``headers`` in its config.json."""
        return self.docker_cli(*args, cli=cli, via=via, headers=headers, timeout=timeout)

    def ok(self, result: subprocess.CompletedProcess[str]) -> str:
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        return result.stdout

    def each_engine(self, fn: Any) -> dict[str, Any]:
        """``fn(client)`` on every node's engine, by node name."""
        out = {}
        for node in self.the_lab.nodes:
            client = engine(node)
            try:
                out[node.name] = fn(client)
            finally:
                client.close()
        return out

    # -- the node filter and the node label ---------------------------------

    @explain
    def test_ps_node_filter_is_that_nodes_list(self) -> None:
        """``docker ps --filter node=node3`` lists what node3's engine lists,
        with other filters applied there; by name or node ID, several allowed."""
        everyone = self.each_engine(lambda c: {x.id[:12] for x in c.containers.list(all=True)})
        running = self.each_engine(lambda c: {x.id[:12] for x in c.containers.list()})
        node3_id = self.the_lab.node_ids()["node3"]
        for cli in CLIS:
            with self.subTest(cli=cli):
                out = self.ok(self.cli(cli, "ps", "-aq", "--filter", "node=node3"))
                self.assertEqual(set(out.split()), everyone["node3"])
                out = self.ok(
                    self.cli(
                        cli, "ps", "-q", "--filter", "node=node3", "--filter", "status=running"
                    )
                )
                self.assertEqual(set(out.split()), running["node3"])
                out = self.ok(
                    self.cli(
                        cli, "ps", "-aq", "--filter", f"node={node3_id}", "--filter", "node=node1"
                    )
                )
                self.assertEqual(set(out.split()), everyone["node3"] | everyone["node1"])

    @explain
    def test_other_lists_node_filter(self) -> None:
        images = self.each_engine(lambda c: {i.id.split(":")[1][:12] for i in c.images.list()})
        volumes = self.each_engine(lambda c: {v.name for v in c.volumes.list()})
        networks = self.each_engine(lambda c: {n.id[:12] for n in c.networks.list()})
        for cli in CLIS:
            for node in ("node2", "node3"):
                with self.subTest(cli=cli, node=node):
                    out = self.ok(self.cli(cli, "images", "-q", "--filter", f"node={node}"))
                    self.assertEqual(set(out.split()), images[node])
                    out = self.ok(self.cli(cli, "volume", "ls", "-q", "--filter", f"node={node}"))
                    self.assertEqual(set(out.split()), volumes[node])
                    out = self.ok(self.cli(cli, "network", "ls", "-q", "--filter", f"node={node}"))
                    self.assertEqual(set(out.split()), networks[node])

    @explain
    def test_unknown_node_named(self) -> None:
        for cli in CLIS:
            with self.subTest(cli=cli):
                r = self.cli(cli, "ps", "--filter", "node=node9")
                self.assertNotEqual(r.returncode, 0)
                self.assertIn("No agent known for node 'node9'", r.stderr)
                self.assertIn("known nodes: node1, node2, node3", r.stderr)

    @explain
    def test_node_label_on_every_item(self) -> None:
        """The CLI's format line shows each container's node; the SDK sees the
        label on every container, image, volume and network, and the rest of
        the labels unchanged."""
        owners = self.each_engine(lambda c: {x.id: x.labels for x in c.containers.list(all=True)})
        for cli in CLIS:
            with self.subTest(cli=cli):
                out = self.ok(
                    self.cli(
                        cli, "ps", "-a", "--no-trunc", "--format",
                        '{{.Label "swarmagent.node"}}\t{{.ID}}',
                    )
                )  # fmt: skip
                rows = (line.split("\t") for line in out.splitlines())
                shown = {cid: node for node, cid in rows}
                expected = {cid: node for node, ids in owners.items() for cid in ids}
                self.assertEqual(shown, expected)
        client = sdk_client(self.agent("node2").url, self.the_lab.tls)
        self.addCleanup(client.close)
        # The SDK's own lists (its models inspect each item again).
        for container in client.api.containers(all=True):
            node = container["Portainer"]["Agent"]["NodeName"]
            self.assertEqual(
                container["Labels"], {**owners[node][container["Id"]], LABEL: node}, container
            )
        listed = {
            "images": client.api.images(),
            "volumes": client.api.volumes()["Volumes"],
            "networks": client.api.networks(),
        }
        for kind, items in listed.items():
            with self.subTest(kind=kind):
                self.assertTrue(items)
                for item in items:
                    node = item["Portainer"]["Agent"]["NodeName"]
                    self.assertEqual(item["Labels"][LABEL], node, item)
        # Every volume is where its name says (made on that node in setUpLab).
        mine = {v["Name"]: v["Labels"][LABEL] for v in listed["volumes"]}
        self.assertEqual({n: mine[f"vol-{n}"] for n in NODES}, {n: n for n in NODES})

    # -- broadcast ------------------------------------------------------------

    def save_as(self, tag: str, folder: Path, big: int = 0) -> Path:
        """A tarball (``docker save``) of the lab's busybox image under ``tag``,
        with a layer of ``big`` random bytes on top if asked; the image is
        then removed from the engine that made it, so no node has it."""
        node = self.node("node2")
        client = engine(node)
        try:
            if big:
                context = folder / "context"
                context.mkdir()
                with open(context / "big.bin", "wb") as f:
                    for _ in range(big // (1 << 20)):
                        f.write(os.urandom(1 << 20))
                (context / "Dockerfile").write_text(f"FROM {IMAGE}\nCOPY big.bin /big.bin\n")
                client.images.build(path=str(context), tag=tag, rm=True)
                shutil.rmtree(context)
            else:
                client.images.get(IMAGE).tag(tag)
            out = folder / "image.tar"
            with open(out, "wb") as f:
                for chunk in client.images.get(tag).save(named=tag):
                    f.write(chunk)
            client.images.remove(tag)
        finally:
            client.close()
        return out

    def holders(self, tag: str) -> set[str]:
        """The nodes whose engine has ``tag``."""

        def has(client: Any) -> bool:
            return any(tag in i.tags for i in client.images.list())

        return {name for name, yes in self.each_engine(has).items() if yes}

    def forget(self, tag: str) -> None:
        def remove(client: Any) -> None:
            if any(tag in i.tags for i in client.images.list()):
                client.images.remove(tag, force=True)

        self.each_engine(remove)

    @explain
    def test_load_on_every_node(self) -> None:
        """``docker load -i`` with the broadcast header in config.json loads
        the image on every engine; each node's lines are named."""
        folder = Path(tempfile.mkdtemp(prefix="load-"))
        self.addCleanup(shutil.rmtree, folder, True)
        for i, cli in enumerate(CLIS):
            tag = f"salab/loaded:{i}"
            self.addCleanup(self.forget, tag)
            tarball = self.save_as(tag, folder)
            self.assertEqual(self.holders(tag), set())
            with self.subTest(cli=cli):
                out = self.ok(self.cli(cli, "load", "-i", str(tarball), headers={BROADCAST: "all"}))
                self.assertEqual(self.holders(tag), set(NODES), out)
                for node in NODES:
                    self.assertIn(f"{node}: Loaded image: {tag}", out)
            tarball.unlink()

    @explain
    def test_load_to_listed_nodes(self) -> None:
        folder = Path(tempfile.mkdtemp(prefix="load-"))
        self.addCleanup(shutil.rmtree, folder, True)
        tag = "salab/loaded:some"
        self.addCleanup(self.forget, tag)
        tarball = self.save_as(tag, folder)
        node3_id = self.the_lab.node_ids()["node3"]
        self.ok(
            self.cli(CLIS[-1], "load", "-i", str(tarball), headers={BROADCAST: f"node2,{node3_id}"})
        )
        self.assertEqual(self.holders(tag), {"node2", "node3"})

    @explain
    def test_big_load_streams(self) -> None:
        """A 200 MB tarball reaches every engine through node1's agent, whose
        memory stays flat: the upload is spooled to disk and streamed."""
        folder = Path(tempfile.mkdtemp(prefix="load-"))
        self.addCleanup(shutil.rmtree, folder, True)
        tag = "salab/big:1"
        self.addCleanup(self.forget, tag)
        tarball = self.save_as(tag, folder, big=200 << 20)
        self.assertGreater(tarball.stat().st_size, 200 << 20)
        pid = self.agent("node1").proc.pid
        before = rss_kib(pid)
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], rss_kib(pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            out = self.ok(
                self.cli(CLIS[-1], "load", "-i", str(tarball), headers={BROADCAST: "all"})
            )
        finally:
            done.set()
            sampler.join()
        self.assertEqual(self.holders(tag), set(NODES), out)
        grown = peak[0] - before
        # One copy of the upload in memory would be 200 MB, three 600 MB.
        self.assertLess(grown, 40 * 1024, f"RSS grew by {grown} KiB")

    @explain
    def test_load_with_a_node_cut_off(self) -> None:
        """The others load; the cut node is named; the command fails."""
        folder = Path(tempfile.mkdtemp(prefix="load-"))
        self.addCleanup(shutil.rmtree, folder, True)
        for i, cli in enumerate(CLIS):
            tag = f"salab/cut:{i}"
            self.addCleanup(self.forget, tag)
            tarball = self.save_as(tag, folder)
            with self.subTest(cli=cli):
                self.the_lab.cut_link(self.node("node3"))
                try:
                    r = self.cli(cli, "load", "-i", str(tarball), headers={BROADCAST: "all"})
                finally:
                    self.the_lab.restore_link(self.node("node3"))
                self.assertNotEqual(r.returncode, 0, r.stdout)
                self.assertIn("failed on node3", r.stderr)
                self.assertIn("node1: Loaded image", r.stdout)
                self.assertIn("node2: Loaded image", r.stdout)
                self.assertEqual(self.holders(tag), {"node1", "node2"})
            tarball.unlink()
            self.baseline(self.the_lab)

    @explain
    def test_image_prune_everywhere(self) -> None:
        """``docker image prune -f`` with the header removes every node's
        dangling images; the answer adds up what each node deleted."""

        def dangle(client: Any) -> str:
            container = client.containers.create(IMAGE, ["true"])
            try:
                return str(container.commit().id)
            finally:
                container.remove()

        for cli in CLIS:
            with self.subTest(cli=cli):
                made = self.each_engine(dangle)
                out = self.ok(self.cli(cli, "image", "prune", "-f", headers={BROADCAST: "all"}))
                for node, image_id in made.items():
                    self.assertIn(f"deleted: {image_id}", out, node)
                left = self.each_engine(
                    lambda c: [i.id for i in c.images.list(filters={"dangling": True})]
                )
                self.assertEqual(left, {n: [] for n in NODES})
                self.assertIn("Total reclaimed space", out)

    @explain
    def test_loaded_image_deploys_everywhere(self) -> None:
        """A stack whose image was loaded this way (no registry) runs a task
        on every node with ``--resolve-image never``."""
        folder = Path(tempfile.mkdtemp(prefix="stack-"))
        self.addCleanup(shutil.rmtree, folder, True)
        tag = "salab/app:1"
        self.addCleanup(self.forget, tag)
        tarball = self.save_as(tag, folder)
        self.ok(self.cli(CLIS[-1], "load", "-i", str(tarball), headers={BROADCAST: "all"}))
        (folder / "stack.yml").write_text(
            f'version: "3.8"\nservices:\n  app:\n    image: {tag}\n'
            '    command: ["sleep", "3600"]\n    deploy:\n      mode: global\n'
        )
        self.addCleanup(self.cli, CLIS[-1], "stack", "rm", "loaded")
        self.ok(
            self.cli(
                CLIS[-1], "stack", "deploy", "-c", str(folder / "stack.yml"),
                "--resolve-image", "never", "--detach=true", "loaded", via="node2",
            )
        )  # fmt: skip

        def running() -> set[str]:
            client = engine(self.node("node1"))
            try:
                names = {n.id: n.attrs["Description"]["Hostname"] for n in client.nodes.list()}
                service = client.services.get("loaded_app")
                return {
                    names[t["NodeID"]] for t in service.tasks() if t["Status"]["State"] == "running"
                }
            finally:
                client.close()

        wait_until(lambda: running() == set(NODES), 60, 0.5, "a running task on every node")
        self.ok(self.cli(CLIS[-1], "stack", "rm", "loaded"))

    @explain
    def test_import_on_every_node(self) -> None:
        """``docker import`` (``POST /images/create?fromSrc=-``, a pull's
        route, with a body) reaches every node; each node's status line is named."""
        folder = Path(tempfile.mkdtemp(prefix="import-"))
        self.addCleanup(shutil.rmtree, folder, True)
        (folder / "hello.txt").write_text("hello\n")
        tarball = folder / "rootfs.tar"
        with tarfile.open(tarball, "w") as tar:
            tar.add(folder / "hello.txt", "hello.txt")
        for i, cli in enumerate(CLIS):
            tag = f"salab/imported:{i}"
            self.addCleanup(self.forget, tag)
            with self.subTest(cli=cli):
                out = self.ok(
                    self.cli(cli, "import", str(tarball), tag, headers={BROADCAST: "all"})
                )
                self.assertEqual(self.holders(tag), set(NODES))
                ids = self.each_engine(lambda c, tag=tag: c.images.get(tag).id)
                for node, image_id in ids.items():
                    self.assertIn(f"{node}: {image_id}", out)

    @explain
    def test_pull_failing_everywhere(self) -> None:
        """No registry in the lab: every node's failure is named and the CLI fails."""
        for cli in CLIS:
            with self.subTest(cli=cli):
                r = self.cli(cli, "pull", "salab/nowhere:1", headers={BROADCAST: "all"})
                self.assertNotEqual(r.returncode, 0, r.stdout)
                for node in NODES:
                    self.assertIn(f"{node}: ", r.stdout + r.stderr)

    @explain
    def test_tag_everywhere(self) -> None:
        tag = "salab/retagged:1"
        self.addCleanup(self.forget, tag)
        self.ok(self.cli(CLIS[-1], "tag", IMAGE, tag, headers={BROADCAST: "all"}))
        self.assertEqual(self.holders(tag), set(NODES))

    @explain
    def test_other_requests_refused(self) -> None:
        for cli in CLIS:
            with self.subTest(cli=cli):
                r = self.cli(cli, "ps", headers={BROADCAST: "all"})
                self.assertNotEqual(r.returncode, 0)
                self.assertIn("This request cannot be broadcast", r.stderr)

    # -- disk usage -----------------------------------------------------------

    @explain
    def test_system_df_adds_up(self) -> None:
        """``docker system df`` counts every node's objects; the SDK's df
        equals the sum of the engines'."""
        usages = self.each_engine(lambda c: c.df())
        total = {
            "Images": sum(len(u["Images"] or []) for u in usages.values()),
            "Containers": sum(len(u["Containers"] or []) for u in usages.values()),
            "Local Volumes": sum(len(u["Volumes"] or []) for u in usages.values()),
            "Build Cache": sum(len(u["BuildCache"] or []) for u in usages.values()),
        }
        for cli in CLIS:
            with self.subTest(cli=cli):
                out = self.ok(self.cli(cli, "system", "df", "--format", "{{json .}}"))
                shown = {}
                for line in out.splitlines():
                    row = json.loads(line)
                    shown[row["Type"]] = int(row["TotalCount"])
                self.assertEqual(shown, total)
                verbose = self.ok(self.cli(cli, "system", "df", "-v"))
                for node in NODES:
                    self.assertIn(f"vol-{node}", verbose)
        client = sdk_client(self.agent("node3").url, self.the_lab.tls)
        self.addCleanup(client.close)
        merged = client.df()
        self.assertEqual(merged["LayersSize"], sum(u["LayersSize"] for u in usages.values()))
        self.assertEqual(
            sorted((i["Id"], i["Portainer"]["Agent"]["NodeName"]) for i in merged["Images"]),
            sorted((i["Id"], n) for n, u in usages.items() for i in u["Images"]),
        )
        one = sdk_client(self.agent("node1").url, self.the_lab.tls, target="node2")
        self.addCleanup(one.close)
        self.assertEqual(
            sorted(i["Id"] for i in one.df()["Images"]),
            sorted(i["Id"] for i in usages["node2"]["Images"]),
        )
