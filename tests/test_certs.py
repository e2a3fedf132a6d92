"""Tests for :mod:`swarmagent.certs`, ending with the Docker CLI and SDK as real clients."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Request

from swarmagent import certs, tls
from swarmagent.tls import HTTP11Site, Identity, ServerTLS

reactor: Any = _reactor

ALL_FILES = {
    certs.CA_CERT: 0o644,
    certs.CA_KEY: 0o600,
    certs.SERVER_CERT: 0o644,
    certs.SERVER_KEY: 0o600,
    certs.CLIENT_CERT: 0o644,
    certs.CLIENT_KEY: 0o600,
}


def _usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _run(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = certs.main(list(argv))
        except SystemExit as e:
            code = int(e.code or 0)
    return code, err.getvalue()


class InitTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.out = Path(self.mktemp())
        code, err = _run(
            "init", "--out", str(self.out), "--name", "agent", "--name", "mgr1.example",
            "--ip", "10.0.0.5", "--ip", "fd00::5",
        )  # fmt: skip
        self.assertEqual((code, err), (0, ""))
        self.ca = certs.load_cert(self.out / certs.CA_CERT)

    def test_files_and_modes(self) -> None:
        modes = {p.name: p.stat().st_mode & 0o777 for p in self.out.iterdir()}
        self.assertEqual(modes, ALL_FILES)

    def test_ca(self) -> None:
        bc = self.ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        self.assertEqual((bc.ca, bc.path_length), (True, 0))
        self.assertEqual(self.ca.issuer, self.ca.subject)

    def test_server_certificate_chains_for_every_name(self) -> None:
        server = certs.load_cert(self.out / certs.SERVER_CERT)
        verifier = PolicyBuilder().store(Store([self.ca]))
        names: list[x509.DNSName | x509.IPAddress] = [
            x509.DNSName("agent"),
            x509.DNSName("mgr1.example"),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("10.0.0.5")),
            x509.IPAddress(ipaddress.ip_address("fd00::5")),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        for name in names:
            with self.subTest(name=name):
                chain = verifier.build_server_verifier(name).verify(server, [])
                self.assertEqual(chain, [server, self.ca])
        self.assertRaises(
            VerificationError,
            verifier.build_server_verifier(x509.DNSName("elsewhere")).verify,
            server,
            [],
        )
        self.assertEqual(
            _usages(server), [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        )

    def test_client_certificate(self) -> None:
        client = certs.load_cert(self.out / certs.CLIENT_CERT)
        key = certs.load_key(self.out / certs.CLIENT_KEY)
        self.assertTrue(tls.chains_to(Identity(client, key), [self.ca]))
        self.assertEqual(_usages(client), [ExtendedKeyUsageOID.CLIENT_AUTH])
        other_ca, _ = certs.make_ca("Other")
        self.assertFalse(tls.chains_to(Identity(client, key), [other_ca]))

    def test_keys_match_and_load_in_python_ssl(self) -> None:
        import ssl

        for cert, key in [
            (certs.SERVER_CERT, certs.SERVER_KEY),
            (certs.CLIENT_CERT, certs.CLIENT_KEY),
        ]:
            tls.load_identity(self.out / cert, self.out / key)
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(self.out / cert, self.out / key)

    def test_refuses_overwrite(self) -> None:
        before = _contents(self.out)
        code, err = _run("init", "--out", str(self.out))
        self.assertEqual(code, 1)
        self.assertIn("already has", err)
        self.assertIn("--force", err)
        self.assertEqual(_contents(self.out), before)

    def test_refuses_overwrite_of_any_one_file(self) -> None:
        other = Path(self.mktemp())
        other.mkdir()
        (other / certs.CLIENT_KEY).write_bytes(b"precious")
        code, err = _run("init", "--out", str(other))
        self.assertEqual(code, 1)
        self.assertIn(certs.CLIENT_KEY, err)
        self.assertEqual(_contents(other), {certs.CLIENT_KEY: b"precious"})

    def test_force(self) -> None:
        before = _contents(self.out)
        self.assertEqual(_run("init", "--out", str(self.out), "--force"), (0, ""))
        after = _contents(self.out)
        self.assertEqual(set(after), set(before))
        for name in before:
            self.assertNotEqual(after[name], before[name], name)

    def test_client_subcommand(self) -> None:
        out = Path(self.mktemp())
        code, err = _run(
            "client", "--ca-dir", str(self.out), "--out", str(out), "--name", "ci-runner"
        )
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()},
            {certs.CA_CERT: 0o644, certs.CLIENT_CERT: 0o644, certs.CLIENT_KEY: 0o600},
        )
        self.assertEqual(
            (out / certs.CA_CERT).read_bytes(), (self.out / certs.CA_CERT).read_bytes()
        )
        cert = certs.load_cert(out / certs.CLIENT_CERT)
        key = certs.load_key(out / certs.CLIENT_KEY)
        self.assertEqual(
            cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "ci-runner"
        )
        self.assertTrue(tls.chains_to(Identity(cert, key), [self.ca]))
        self.assertEqual(_run("client", "--ca-dir", str(self.out), "--out", str(out))[0], 1)

    def test_client_subcommand_without_ca(self) -> None:
        code, err = _run("client", "--ca-dir", self.mktemp(), "--out", self.mktemp())
        self.assertEqual(code, 1)
        self.assertIn("No such file", err)

    def test_bad_arguments(self) -> None:
        for argv in [
            ["init", "--out", "x", "--ip", "10.0.0.300"],
            ["init", "--out", "x", "--name", "bad name"],
            ["init", "--out", "x", "--days", "0"],
            ["init"],
            ["renew"],
        ]:
            with self.subTest(argv=argv):
                self.assertEqual(_run(*argv)[0], 2)

    def test_dns_names(self) -> None:
        for good in ["a", "agent", "node-1.example.com", "*.example.com", "x." * 100 + "y"]:
            self.assertTrue(certs.is_dns_name(good), good)
        for bad in ["", "bad name", "-a", "a-", "a..b", "é.example", "a" * 64, "x." * 127 + "y"]:
            self.assertFalse(certs.is_dns_name(bad), bad)


class _FakeEngine(Resource):
    """Just enough Docker API for ``docker version``, saying who the client was."""

    isLeaf = True

    def __init__(self, server: ServerTLS) -> None:
        super().__init__()
        self._server = server

    def render(self, request: Request) -> bytes:
        request.setHeader(b"api-version", b"1.41")
        if request.path.endswith(b"/_ping"):
            request.setHeader(b"content-type", b"text/plain")
            return b"OK"
        who = "verified" if self._server.verified_client(request) else "anonymous"
        request.setHeader(b"content-type", b"application/json")
        doc = {
            "Version": who,
            "ApiVersion": "1.41",
            "MinAPIVersion": "1.12",
            "Os": "linux",
            "Arch": "amd64",
            "GitCommit": "0",
            "GoVersion": "go",
            "KernelVersion": "0",
            "BuildTime": "",
            "Components": [{"Name": "Engine", "Version": who, "Details": {}}],
        }
        return json.dumps(doc).encode()


class DockerClientTests(unittest.TestCase):
    """The files of ``init`` work as DOCKER_CERT_PATH for the CLI and as the SDK's TLSConfig."""

    def setUp(self) -> None:
        self.out = Path(self.mktemp())
        certs.init(self.out, ["agent"], [ipaddress.ip_address("127.0.0.1")])
        identity = tls.load_identity(self.out / certs.SERVER_CERT, self.out / certs.SERVER_KEY)
        server = ServerTLS(identity, [certs.load_cert(self.out / certs.CA_CERT)])
        listening = reactor.listenSSL(
            0, HTTP11Site(_FakeEngine(server)), server, interface="127.0.0.1"
        )
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port

    async def test_docker_cli(self) -> None:
        docker = shutil.which("docker")
        if docker is None:
            raise unittest.SkipTest("no docker command")
        config = Path(self.mktemp())
        config.mkdir()
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(config),
            "DOCKER_CONFIG": str(config),
            "DOCKER_HOST": f"tcp://localhost:{self.port}",
            "DOCKER_TLS_VERIFY": "1",
            "DOCKER_CERT_PATH": str(self.out),
        }
        args = ["version", "--format", "{{.Server.Version}}"]
        out, err, code = await getProcessOutputAndValue(docker, args, env=env)
        self.assertEqual((code, out.strip()), (0, b"verified"), err)

    async def test_docker_sdk(self) -> None:
        try:
            import docker
            import docker.tls
        except ImportError:
            raise unittest.SkipTest("no docker SDK") from None
        # requests lets these override a session's own CA file (psf/requests#3829), which
        # would test the environment rather than our files.
        saved = {
            k: os.environ.pop(k)
            for k in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
            if k in os.environ
        }
        self.addCleanup(os.environ.update, saved)
        config = docker.tls.TLSConfig(
            client_cert=(str(self.out / certs.CLIENT_CERT), str(self.out / certs.CLIENT_KEY)),
            ca_cert=str(self.out / certs.CA_CERT),
            verify=True,
        )

        def call() -> dict[str, Any]:
            client = docker.APIClient(
                base_url=f"https://localhost:{self.port}", tls=config, version="1.41"
            )
            try:
                return dict(client.version())
            finally:
                client.close()

        self.assertEqual((await deferToThread(call))["Version"], "verified")


class ModuleTests(unittest.TestCase):
    async def test_python_dash_m(self) -> None:
        out = Path(self.mktemp())
        root = str(Path(__file__).resolve().parent.parent)
        _out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "swarmagent.certs", "init", "--out", str(out), "--name", "agent"],
            env={**os.environ, "PYTHONPATH": root},
        )
        self.assertEqual(code, 0, err)
        self.assertEqual({p.name for p in out.iterdir()}, set(ALL_FILES))
