"""The authentication gate: every route but the ping handshake needs credentials.

The agent is built as ``twistd swarmagent`` builds it (``makeService`` on an injected
reactor), and requests go through a real ``Site`` over a StringTransport.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from swarmagent.api import AgentRoot
from swarmagent.config import Options
from swarmagent.signature import PUBLIC_KEY_HEADER, SIGNATURE_HEADER, Signer, public_key_hex
from swarmagent.tap import makeService
from swarmagent.wire import IDENTITY_PATH, TARGET
from tests.helpers import Client, Response, StubResolver, agent_reactor, make_site

ENGINE_PATHS = Path(__file__).parent / "data" / "engine-api-1.41-paths.txt"
OPEN = {"/ping", "/v2/ping"}
MISSING = {"message": "Missing request signature headers", "details": "Unauthorized"}
MISSING_BODY = b'{"message":"Missing request signature headers","details":"Unauthorized"}'
AGENT_HEADER_NAMES = ("portainer-agent", "portainer-agent-api-version", "portainer-agent-platform")
SECRET = "s3cret"
SIGNER = Signer.generate(SECRET)


def engine_routes() -> list[tuple[str, str]]:
    """(method, path) for every path template of the Engine API, unversioned."""
    routes = []
    for line in ENGINE_PATHS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            method, path = line.split()
            routes.append((method, path))
    return routes


def agent_root(test: SynchronousTestCase, *argv: str) -> AgentRoot:
    """The AgentRoot of a service made by makeService (no secret, no CA unless given)."""
    options = Options(environ={})
    # twisted.web serving the client (the relay's tree is the same AgentRoot;
    # tests/test_relay.py checks that the relay hands it every refusal).
    options.parseOptions(["--data-path", test.mktemp(), "--relay", "web", *argv])
    service = makeService(
        options,
        reactor=agent_reactor(MemoryReactorClock()),
        resolver=StubResolver(),
        hostname="node-a",
    )
    assert isinstance(service, MultiService)
    [listener] = [s for s in service if isinstance(s, StreamServerEndpointService)]
    site = listener.factory.wrappedFactory  # under the TLS wrapper
    assert isinstance(site, Site)
    root = site.resource
    assert isinstance(root, AgentRoot)
    return root


class GateCase(SynchronousTestCase):
    argv: Sequence[str] = ()

    def setUp(self) -> None:
        self.root = agent_root(self, *self.argv)
        self.site = make_site(self.root)

    def tearDown(self) -> None:
        self.assertEqual(self.flushLoggedErrors(), [])

    def send(
        self, method: str, uri: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
    ) -> Client:
        return Client(self.site).send(method, uri, headers, body)

    def assertAgentHeaders(self, response: Response) -> None:
        for name in AGENT_HEADER_NAMES:
            self.assertEqual(len(response.headers.get(name, [])), 1, name)

    def assertRefused(self, response: Response, method: str = "GET") -> None:
        """The reference agent's answer to a request without signature headers."""
        self.assertEqual(response.code, 403)
        self.assertEqual(response.header("content-type"), "application/json")
        # A HEAD answer has the same head, and no body.
        self.assertEqual(response.body, b"" if method == "HEAD" else MISSING_BODY)
        self.assertAgentHeaders(response)


class RouteEnumerationTests(GateCase):
    """Every route the agent serves, its own and the engine's, needs credentials.

    The routes are enumerated from the AgentRoot itself and from the Engine API's
    swagger, so a route added later is covered without editing this test. With a secret
    agents authenticate to each other, so only the ping handshake is open.
    """

    argv: Sequence[str] = ("--secret", SECRET)
    open_paths: set[str] = OPEN

    def routes(self) -> Iterator[tuple[str, str]]:
        own = sorted(p.decode("ascii") for p in self.root.own_paths())
        self.assertTrue(set(own) >= OPEN | {IDENTITY_PATH.decode()}, own)
        for path in own:
            for method in ("GET", "HEAD", "POST", "PUT", "DELETE"):
                yield method, path
        engine = engine_routes()
        self.assertGreater(len(engine), 100)
        for method, path in engine:
            yield method, path
            yield method, "/v1.41" + path
            yield method, "/v1.24" + path + "?all=1"

    def test_every_route_but_ping_needs_credentials(self) -> None:
        checked = 0
        for method, path in self.routes():
            if path in self.open_paths:
                continue
            with self.subTest(method=method, path=path):
                self.assertRefused(self.send(method, path).response(), method)
                checked += 1
        self.assertGreater(checked, 300)

    def test_engine_routes_refused_with_a_target_too(self) -> None:
        for method, path in engine_routes():
            with self.subTest(method=method, path=path):
                response = self.send(method, path, [("X-PortainerAgent-Target", "node-a")])
                self.assertRefused(response.response(), method)

    def test_ping_is_open(self) -> None:
        for path in sorted(OPEN):
            for method in ("GET", "HEAD"):
                with self.subTest(method=method, path=path):
                    response = self.send(method, path).response()
                    self.assertEqual(response.code, 204)
                    self.assertEqual(response.body, b"")
                    self.assertAgentHeaders(response)

    def test_ping_variants_are_not_open(self) -> None:
        """Only the exact paths are open: no prefix, suffix, encoding or case trick."""
        for path in ("/ping/", "//ping", "/PING", "/%70ing", "/v2//ping", "/v1/ping", "/_ping"):
            with self.subTest(path=path):
                self.assertRefused(self.send("GET", path).response())

    def test_signed_ping_and_agents(self) -> None:
        """With credentials the same routes answer (the gate is not simply shut)."""
        root = agent_root(self, "--secret", SECRET)
        client = Client(make_site(root)).send("GET", "/agents", list(SIGNER.headers().items()))
        response = client.response()
        self.assertEqual(response.code, 200)
        self.assertEqual([a["NodeName"] for a in response.json()], ["node-a"])


class UnauthenticatedAgentsRouteTests(RouteEnumerationTests):
    """No secret and no CA: the same, but agents may read each other's identity."""

    argv = ()
    open_paths = OPEN | {IDENTITY_PATH.decode()}


class IdentityTests(SynchronousTestCase):
    def get(self, root: AgentRoot, headers: Sequence[tuple[str, str]] = ()) -> Response:
        return Client(make_site(root)).send("GET", IDENTITY_PATH.decode(), headers).response()

    def test_open_without_a_common_credential(self) -> None:
        """No secret and no CA: agents could not prove themselves, so it stays open."""
        response = self.get(agent_root(self))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.json()["NodeName"], "node-a")

    def test_closed_with_a_secret(self) -> None:
        root = agent_root(self, "--secret", SECRET)
        response = self.get(root)
        self.assertEqual(response.code, 403)
        self.assertEqual(response.json(), MISSING)
        signed = self.get(root, list(SIGNER.headers().items()))
        self.assertEqual(signed.code, 200)
        self.assertEqual(signed.json()["NodeName"], "node-a")

    def test_only_the_exact_path_is_open(self) -> None:
        site = make_site(agent_root(self))
        for path in ("/swarmagent/identity/", "/swarmagent/%69dentity", "//swarmagent/identity"):
            with self.subTest(path=path):
                response = Client(site).send("GET", path).response()
                self.assertEqual((response.code, response.json()), (403, MISSING))


def p384_key_hex() -> str:
    return public_key_hex(ec.generate_private_key(ec.SECP384R1()).public_key())


class HostileInputTests(GateCase):
    """Nothing a client sends makes a 5xx or an unhandled error; the site keeps serving."""

    argv: Sequence[str] = ("--secret", SECRET)

    def assertServing(self) -> None:
        self.assertRefused(self.send("GET", "/containers/json").response())
        signed = self.send("GET", "/v2/agents", list(SIGNER.headers().items())).response()
        self.assertEqual(signed.code, 200)

    def assertClear4xx(self, client: Client) -> Response:
        response = client.response()
        self.assertTrue(400 <= response.code < 500, response)
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertIsInstance(response.json()["message"], str)
        return response

    def assertClosedWith4xx(self, client: Client) -> None:
        """Refused by the HTTP parser: a bare 4xx, then the connection closed."""
        self.assertTrue(client.transport.disconnecting)
        if client.raw:
            code = int(client.raw.split(b" ")[1])
            self.assertTrue(400 <= code < 500, client.raw)

    def test_bad_signature_headers(self) -> None:
        key = SIGNER.public_key_hex
        signature = SIGNER.sign()
        cases = {
            "bad hex": [(PUBLIC_KEY_HEADER, "zz" + key[2:]), (SIGNATURE_HEADER, signature)],
            "odd hex": [(PUBLIC_KEY_HEADER, key[:-1]), (SIGNATURE_HEADER, signature)],
            "not DER": [(PUBLIC_KEY_HEADER, "00" * 91), (SIGNATURE_HEADER, signature)],
            "P-384 key": [(PUBLIC_KEY_HEADER, p384_key_hex()), (SIGNATURE_HEADER, signature)],
            "bad base64": [(PUBLIC_KEY_HEADER, key), (SIGNATURE_HEADER, "!!!" + signature)],
            "padded base64": [(PUBLIC_KEY_HEADER, key), (SIGNATURE_HEADER, signature + "==")],
            "short signature": [(PUBLIC_KEY_HEADER, key), (SIGNATURE_HEADER, signature[:40])],
            "huge key": [(PUBLIC_KEY_HEADER, "ab" * 5000), (SIGNATURE_HEADER, signature)],
            "huge signature": [(PUBLIC_KEY_HEADER, key), (SIGNATURE_HEADER, "A" * 8000)],
            "non-ASCII": [(PUBLIC_KEY_HEADER, "é" * 10), (SIGNATURE_HEADER, "ÿ" * 86)],
            "key only": [(PUBLIC_KEY_HEADER, key)],
            "signature only": [(SIGNATURE_HEADER, signature)],
            "empty values": [(PUBLIC_KEY_HEADER, ""), (SIGNATURE_HEADER, "")],
            "other secret": list(Signer.generate("wrong").headers().items()),
        }
        for name, headers in cases.items():
            with self.subTest(name):
                response = self.assertClear4xx(self.send("GET", "/containers/json", headers))
                self.assertEqual(response.code, 403)
                self.assertAgentHeaders(response)
        self.assertServing()

    def test_dot_segments(self) -> None:
        signed = list(SIGNER.headers().items())
        for path in (
            "/containers/../secrets",
            "/containers/%2e%2e/secrets",
            "/containers/%2E%2E/secrets",
            "/containers/%2e./x",
            "/v1.41/./info",
            "/containers/%2E/json",
            "/a/%2e%2e%2f%2e%2e%2fsecrets",
            "/..",
        ):
            with self.subTest(path=path):
                self.assertRefused(self.send("GET", path).response())
                response = self.assertClear4xx(self.send("GET", path, signed))
                self.assertEqual(response.code, 400)
        self.assertServing()

    def test_garbage_body(self) -> None:
        for body in (b"\x00\xff" * 5000, b"{" * 1000, bytes(range(256))):
            client = self.send("POST", "/containers/create", [("Content-Type", "x")], body)
            self.assertRefused(client.response())
        self.assertServing()

    def test_oversized_headers(self) -> None:
        for headers in (
            [("X-Big", "a" * 70000)],
            [(f"X-H{i}", "v") for i in range(600)],
            [(PUBLIC_KEY_HEADER, "ab" * 40000), (SIGNATURE_HEADER, "A" * 100)],
        ):
            self.assertClosedWith4xx(self.send("GET", "/containers/json", headers))
        self.assertServing()

    def test_malformed_requests(self) -> None:
        for raw in (
            b"GET /containers/json HTTP/1.1\r\nHost: a\r\nNo-Colon-Here\r\n\r\n",
            b"GET /containers/json HTTP/1.1\r\nHost: a\r\nContent-Length: -5\r\n\r\n",
            b"GET /containers/json HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 2\r\n\r\n",
            b"GET /containers/json HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET /containers/json HTTP/9\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n",
            b"GET\r\n\r\n",
        ):
            with self.subTest(raw=raw):
                client = Client(self.site)
                client.channel.dataReceived(raw)
                if client.transport.disconnecting:
                    self.assertClosedWith4xx(client)
                else:
                    self.assertEqual(client.raw, b"")  # still waiting for a sane request
        self.assertServing()

    def test_odd_request_targets(self) -> None:
        """Targets outside the usual /path form still meet the gate ("*" never reaches the
        resource tree: Twisted answers it itself, 405 to all but OPTIONS)."""
        for uri in ("*", "ping", "containers/json", "http://agent.test/containers/json", "/"):
            with self.subTest(uri=uri):
                response = self.send("GET", uri).response()
                self.assertLess(response.code, 500)
                self.assertNotEqual(response.code // 100, 2)
        self.assertServing()

    def test_keeps_serving_on_the_same_connection(self) -> None:
        client = self.send("GET", "/containers/%2e%2e/x", list(SIGNER.headers().items()))
        client.send("GET", "/ping")
        raw = client.raw
        first, _, rest = raw.partition(b"\r\n\r\n")
        self.assertIn(b" 400 ", first.split(b"\r\n")[0])
        self.assertIn(b"HTTP/1.1 204 ", rest)


# Header values a client could put on the wire: no CR, LF or NUL; any other latin-1.
_VALUE = st.text(st.characters(codec="latin-1", exclude_characters="\r\n\x00"), max_size=300).map(
    str.strip
)


def _near(valid: str) -> st.SearchStrategy[str]:
    """Values close to a valid one: cut, extended, one character changed."""
    return st.one_of(
        st.just(valid),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
        _VALUE.map(lambda extra: valid + extra),
        st.tuples(st.integers(0, len(valid) - 1), st.sampled_from("0aA+/=.-")).map(
            lambda t: valid[: t[0]] + t[1] + valid[t[0] + 1 :]
        ),
    )


_KEY = st.one_of(
    _VALUE, _near(SIGNER.public_key_hex), st.from_regex(r"[0-9a-f]{0,400}", fullmatch=True)
)
_SIGNATURE = st.one_of(
    _VALUE, _near(SIGNER.sign()), st.from_regex(r"[A-Za-z0-9+/]{0,120}", fullmatch=True)
)
_TARGET = st.one_of(_VALUE, st.sampled_from(["node-a", "id-x", "", " ", "*", "node-a\t"]))


class HeaderPropertyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.site = make_site(agent_root(self, "--secret", SECRET))

    @given(
        key=st.none() | _KEY,
        signature=st.none() | _SIGNATURE,
        target=st.none() | _TARGET,
        path=st.sampled_from(["/containers/json", "/v1.41/info", "/agents", "/version"]),
    )
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_never_a_server_error(
        self, key: str | None, signature: str | None, target: str | None, path: str
    ) -> None:
        headers = [
            (name, value)
            for name, value in (
                (PUBLIC_KEY_HEADER, key),
                (SIGNATURE_HEADER, signature),
                (TARGET, target),
            )
            if value is not None
        ]
        client = Client(self.site).send("GET", path, headers)
        if client.raw:  # else still with the engine, which never answers here
            code = int(client.raw.split(b" ")[1])
            self.assertLess(code, 500, client.raw)
        self.assertEqual(self.flushLoggedErrors(), [])
