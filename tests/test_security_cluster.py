"""Authentication through real agents: client certificates, Portainer's signature, forwards.

Run as root: ``python -m twisted.trial tests.test_security_cluster``.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import ssl
import tempfile
from pathlib import Path

import docker
import docker.errors

from swarmagent import certs
from swarmagent.signature import Signer
from tests.lab import IMAGE, Agent, Lab, Response, sdk_client, wait_until
from tests.labcase import TARGET, LabTestCase, explain

MISSING = {"message": "Missing request signature headers", "details": "Unauthorized"}
UNAUTHORIZED = {"message": "Invalid request signature", "details": "Unauthorized"}
REPAIR = "docker service update --env-add AGENT_PAIRING_RESET=$(date +%s) <agent service>"
HOP = "X-SwarmAgent-Hop"
# Agents with no CA: a self-signed certificate each, Portainer's pairing.
PORTAINER_MODE = {"AGENT_TLS_CERT": "", "AGENT_TLS_KEY": "", "AGENT_TLS_CA": ""}


def key_fingerprint(signer: Signer) -> str:
    """How the agent names a key: the first 16 hex digits of the SHA-256 of its DER."""
    return hashlib.sha256(bytes.fromhex(signer.public_key_hex)).hexdigest()[:16]


def unverified() -> ssl.SSLContext:
    """TLS as Portainer does it: no server check, no client certificate."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def one_container_per_node(lab: Lab) -> None:
    for node in lab.nodes:
        client = node.docker()
        try:
            client.containers.create(IMAGE, ["true"], name=f"sec-{node.name}")
        finally:
            client.close()


class ClientCertificateTests(LabTestCase):
    """Agents with the lab's CA (AGENT_TLS_CA): the docker SDK's way in."""

    @classmethod
    def setUpLab(cls, lab: Lab) -> None:
        one_container_per_node(lab)
        super().setUpLab(lab)

    def sdk(self, agent: Agent, tls_dir: Path) -> docker.APIClient:
        client = sdk_client(agent.url, tls_dir, timeout=10, ca=self.the_lab.tls)
        self.addCleanup(client.close)
        return client.api

    @explain
    def test_sdk_with_certificate_lists_cluster(self) -> None:
        """The SDK with a certificate from the CA lists every node's containers."""
        listed = self.sdk(self.agent("node2"), self.the_lab.tls).containers(all=True)
        nodes = {c["Portainer"]["Agent"]["NodeName"] for c in listed}
        self.assertEqual(nodes, {n.name for n in self.the_lab.nodes})

    @explain
    def test_no_certificate_refused(self) -> None:
        """No certificate and no signature: 403 with the reference's body."""
        r = self.agent("node1").request(
            "GET", "/containers/json", context=self.the_lab.client_context(certificate=False)
        )
        self.assertEqual(r.status, 403)
        self.assertEqual(r.json(), MISSING)
        self.assertIsNotNone(r.headers.get("Portainer-Agent"))

    @explain
    def test_certificate_from_another_ca_refused(self) -> None:
        """A certificate signed by another CA proves nothing."""
        other = Path(tempfile.mkdtemp(prefix="other-ca-"))
        self.addCleanup(shutil.rmtree, other, True)
        certs.init(other, ["node1"], [], force=True)
        with self.assertRaises(docker.errors.APIError) as caught:
            self.sdk(self.agent("node1"), other).containers()
        self.assertEqual(caught.exception.status_code, 403)

    @explain
    def test_forged_forward_refused(self) -> None:
        """A request dressed as an agent's forward still needs credentials."""
        node3 = self.agent("node3")
        forged = {HOP: "node1", TARGET: "node3"}
        bare = self.the_lab.client_context(certificate=False)
        r = node3.request("GET", "/containers/json", headers=forged, context=bare)
        self.assertEqual(r.status, 403)
        # The same forward from a holder of a certificate is served.
        r = node3.request("GET", "/containers/json", headers=forged)
        self.assertEqual(r.status, 200, r.body)

    @explain
    def test_forward_between_agents_authenticated(self) -> None:
        """node1 forwards to node3 with its own certificate: served there."""
        r = self.agent("node1").request("GET", "/info", headers={TARGET: "node3"})
        self.assertEqual(r.status, 200, r.body)
        r = self.agent("node1").request("GET", "/version", headers={TARGET: "node3"})
        self.assertEqual(r.status, 200, r.body)


class PortainerSignatureTests(LabTestCase):
    """Agents without a CA, paired with Portainer's key on first use."""

    #: Portainer's key pair; the baseline's first signed call pairs every agent.
    portainer = Signer.generate()

    @classmethod
    def setUpLab(cls, lab: Lab) -> None:
        one_container_per_node(lab)
        cls.agents = {n.name: lab.start_agent(n, **PORTAINER_MODE) for n in lab.nodes}
        for agent in cls.agents.values():
            agent.wait_ready(20)

    def baseline(self, lab: Lab) -> None:
        for name in list(lab.cut):
            lab.restore_link(lab.node(name))
        lab.set_dns(lab.nodes)
        everyone = {n.name for n in lab.nodes}
        for agent in self.agents.values():
            wait_until(functools.partial(self.knows, agent, everyone), 20, 0.2, f"{agent} peers")

    def knows(self, agent: Agent, names: set[str]) -> bool:
        r = self.call(agent, "/agents", self.portainer)
        return r.status == 200 and {a["NodeName"] for a in r.json()} == names

    def assertPairedElsewhere(self, r: Response, paired: Signer) -> None:
        """The reference's message (Portainer's "already paired"), then what to do."""
        self.assertEqual(r.status, 403, r.body)
        body = r.json()
        self.assertEqual(body["message"], "Invalid request signature")
        self.assertIn(f"(key {key_fingerprint(paired)})", body["details"])
        self.assertIn(REPAIR, body["details"])

    def call(self, agent: Agent, path: str, signer: Signer | None, **headers: str) -> Response:
        all_headers = {**(signer.headers() if signer else {}), **headers}
        return agent.request("GET", path, headers=all_headers, context=unverified())

    def restart(self, agent: Agent, **env: str) -> Agent:
        agent.stop()
        fresh = self.the_lab.start_agent(agent.node, **PORTAINER_MODE, **env)
        type(self).agents[agent.node.name] = fresh
        fresh.wait_ready(20)
        return fresh

    @explain
    def test_signed_cluster_list_and_inspect(self) -> None:
        """Portainer's flow: ping, the cluster list, an inspect sent back by node name."""
        node1 = self.agent("node1")
        r = self.call(node1, "/ping", None)
        self.assertEqual(r.status, 204)
        self.assertIsNotNone(r.headers.get("Portainer-Agent"))
        r = self.call(node1, "/containers/json", None)
        self.assertEqual((r.status, r.json()), (403, MISSING))
        r = self.call(node1, "/containers/json?all=1", self.portainer)
        self.assertEqual(r.status, 200, r.body)
        self.assertIsNone(r.headers.get("X-SwarmAgent-Missing-Nodes"))
        items = r.json()
        nodes = {item["Portainer"]["Agent"]["NodeName"] for item in items}
        self.assertEqual(nodes, {n.name for n in self.the_lab.nodes})
        for item in items:
            node = item["Portainer"]["Agent"]["NodeName"]
            r = self.call(node1, f"/containers/{item['Id']}/json", self.portainer, **{TARGET: node})
            self.assertEqual(r.status, 200, r.body)

    @explain
    def test_paired_key_only_and_kept_across_restart(self) -> None:
        """Once paired, another key is refused, also after a restart."""
        intruder = Signer.generate()
        node1 = self.agent("node1")
        r = self.call(node1, "/containers/json", intruder)
        self.assertPairedElsewhere(r, self.portainer)
        node1 = self.restart(node1)
        r = self.call(node1, "/version", intruder)
        self.assertPairedElsewhere(r, self.portainer)
        r = self.call(node1, "/version", self.portainer)
        self.assertEqual(r.status, 200, r.body)

    @explain
    def test_bad_signature_never_pairs(self) -> None:
        """On a fresh agent, a bad signature is refused and claims nothing."""
        fresh_data = tempfile.mkdtemp(prefix="agent-data-")
        self.addCleanup(shutil.rmtree, fresh_data, True)
        node2 = self.restart(self.agent("node2"), DATA_PATH=fresh_data)
        self.addCleanup(self.restart, node2)
        first, second = Signer.generate(), Signer.generate()
        forged = {**first.headers(), "X-PortainerAgent-Signature": second.sign()}
        r = node2.request("GET", "/version", headers=forged, context=unverified())
        self.assertEqual((r.status, r.json()), (403, UNAUTHORIZED))
        r = self.call(node2, "/version", second)
        self.assertEqual(r.status, 200, r.body)
        r = self.call(node2, "/version", first)
        self.assertPairedElsewhere(r, second)

    @explain
    def test_pairing_reset_pairs_a_reinstalled_portainer(self) -> None:
        """A new AGENT_PAIRING_RESET forgets the old key once; the same value keeps the new."""
        fresh_data = tempfile.mkdtemp(prefix="agent-data-")
        self.addCleanup(shutil.rmtree, fresh_data, True)
        node2 = self.restart(self.agent("node2"), DATA_PATH=fresh_data)
        # Back to its own data path, whichever agent is running then.
        self.addCleanup(lambda: self.restart(self.agent("node2")))
        old, new = Signer.generate(), Signer.generate()
        self.assertEqual(self.call(node2, "/version", old).status, 200)
        self.assertPairedElsewhere(self.call(node2, "/version", new), old)

        node2 = self.restart(node2, DATA_PATH=fresh_data, AGENT_PAIRING_RESET="1764432000")
        self.assertIn(f"forgot key {key_fingerprint(old)}", node2.log.read_text())
        r = self.call(node2, "/version", new)
        self.assertEqual(r.status, 200, r.body)
        self.assertPairedElsewhere(self.call(node2, "/version", old), new)

        node2 = self.restart(node2, DATA_PATH=fresh_data, AGENT_PAIRING_RESET="1764432000")
        self.assertEqual(self.call(node2, "/version", new).status, 200)
        self.assertPairedElsewhere(self.call(node2, "/version", old), new)

    @explain
    def test_forged_forward_refused(self) -> None:
        """Straight to node3 as if from node1's agent, unsigned: refused."""
        r = self.call(self.agent("node3"), "/containers/json", None, **{HOP: "x", TARGET: "node3"})
        self.assertEqual((r.status, r.json()), (403, MISSING))
