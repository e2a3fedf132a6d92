"""Tests for :mod:`swarmagent.dockerhub`, against a fake Docker Hub over real TLS on 127.0.0.1.

The HTTP client is a real ``Agent`` trusting the test CA; the clock bounding
each check is a ``MemoryReactorClock``, so a hanging hub times out when a
test advances it, not after real seconds.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
from typing import Any
from urllib.parse import urlencode

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.ssl import Certificate
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.test.requesthelper import DummyRequest

from swarmagent import certs
from swarmagent.dockerhub import (
    LIMITS_FAILED,
    MANIFEST_PATH,
    TIMEOUT,
    TOKEN_FAILED,
    BadPayload,
    DockerHub,
    DockerHubResource,
    HubCredentials,
    make_hub_client,
    parse_payload,
    rate_limit,
)
from swarmagent.logs import set_level
from swarmagent.tls import HTTP11Site, Identity, ServerTLS
from swarmagent.twisted_types import request_args
from tests.helpers import TrackingTLSFactory, log_lines, observe_logs

reactor: Any = _reactor

USER, PASSWORD = "octo-user", "s3cret-Pa55:word"


class PostRequest(DummyRequest):
    """A POST with a body (a DummyRequest has no ``content``)."""

    def __init__(self, body: bytes) -> None:
        super().__init__([b""])
        self.method = b"POST"
        self.content = io.BytesIO(body)


class FakeHub(Resource):
    """Docker Hub's token service and registry, as far as the rate-limit check goes.

    A token is given anonymously, or for USER with PASSWORD (else 401); the
    manifest's ``HEAD`` wants one of those tokens and answers with the limits
    of whoever it was given to.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, dict[bytes, list[bytes]], bytes | None]] = []
        self.limits = {
            b"anonymous": {
                b"RateLimit-Limit": b"100;w=21600",
                b"RateLimit-Remaining": b"76;w=21600",
            },
            b"user": {b"RateLimit-Limit": b"200;w=21600", b"RateLimit-Remaining": b"199;w=21600"},
        }
        self.token_answer: tuple[int, bytes] | None = None  # instead of a token
        self.manifest_code = 200
        self.hang: set[bytes] = set()  # paths that get no answer
        self.held: list[Request] = []
        self.arrived: Deferred[Request] = Deferred()
        self.left: Deferred[None] = Deferred()

    def render(self, request: Request) -> Any:
        authorization = request.getHeader(b"authorization")
        self.seen.append((request.method, request.path, dict(request_args(request)), authorization))
        if request.path in self.hang:
            self.held.append(request)
            request.notifyFinish().addErrback(lambda _: self.left.callback(None))
            self.arrived, arrived = Deferred(), self.arrived
            arrived.callback(request)
            return NOT_DONE_YET
        if request.path == b"/token":
            return self.token(request, authorization)
        if request.path == b"/moved":
            # To /token at ``to`` (https://host:port), with the rest of the query.
            args = dict(request_args(request))
            target = args.pop(b"to")[0] + b"/token?" + urlencode(args, doseq=True).encode()
            request.redirect(target)
            return b""
        if request.path == MANIFEST_PATH.encode():
            return self.manifest(request, authorization)
        request.setResponseCode(404)
        return b""

    def token(self, request: Request, authorization: bytes | None) -> bytes:
        if self.token_answer is not None:
            request.setResponseCode(self.token_answer[0])
            return self.token_answer[1]
        assert request_args(request) == {
            b"service": [b"registry.docker.io"],
            b"scope": [b"repository:ratelimitpreview/test:pull"],
        }, request.args
        who = b"anonymous"
        if authorization is not None:
            if authorization != b"Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()):
                request.setResponseCode(401)
                return b'{"details":"incorrect username or password"}'
            who = b"user"
        token = b"token-for-" + who
        return json.dumps({"token": token.decode(), "access_token": token.decode()}).encode()

    def manifest(self, request: Request, authorization: bytes | None) -> bytes:
        if request.method != b"HEAD":
            request.setResponseCode(405)
            return b""
        who = (authorization or b"").removeprefix(b"Bearer token-for-")
        if who not in self.limits:
            request.setResponseCode(401)
            return b""
        request.setResponseCode(self.manifest_code)
        for name, value in self.limits[who].items():
            request.responseHeaders.setRawHeaders(name, [value])
        return b""

    def answer_held(self) -> None:
        """Let the held request (a token request) through after all."""
        request = self.held.pop()
        request.write(self.token(request, request.getHeader(b"authorization")))
        request.finish()


class Ca:
    """A test CA and a certificate it issued for 127.0.0.1."""

    def __init__(self) -> None:
        self.cert, key = certs.make_ca("Test Hub CA")
        leaf, leaf_key = certs.issue(
            self.cert,
            key,
            "hub",
            dns_names=["localhost"],
            ips=[ipaddress.ip_address("127.0.0.1")],
            server=True,
        )
        self.identity = Identity(leaf, leaf_key)

    def client(self) -> IAgent:
        """The production client, trusting this CA instead of the system's."""
        trust = Certificate.loadPEM(certs.cert_pem(self.cert))
        return make_hub_client(reactor, BrowserLikePolicyForHTTPS(trustRoot=trust))


class HubCase(unittest.TestCase):
    """A fake hub on a free port; every test checks that no credential was logged."""

    def setUp(self) -> None:
        self.hub = FakeHub()
        self.ca = Ca()
        factory = TrackingTLSFactory(ServerTLS(self.ca.identity), False, HTTP11Site(self.hub))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(factory.idle)
        self.addCleanup(port.stopListening)
        self.base = f"https://127.0.0.1:{port.getHost().port}"
        self.clock = MemoryReactorClock()
        set_level(LogLevel.debug)
        self.addCleanup(set_level, LogLevel.info)
        self.logs = observe_logs(self)
        self.addCleanup(self.assert_no_credentials_in_logs)

    def assert_no_credentials_in_logs(self) -> None:
        basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        for line in log_lines(self.logs):
            for secret in (USER, PASSWORD, basic):
                self.assertNotIn(secret, line)

    def resource(
        self, client: IAgent | None = None, auth_url: str = "", registry_url: str = ""
    ) -> DockerHubResource:
        return DockerHubResource(
            DockerHub(
                client or self.ca.client(),
                self.clock,
                auth_url or self.base + "/token",
                registry_url or self.base,
            )
        )

    async def post(self, body: bytes, resource: DockerHubResource | None = None) -> Answer:
        request = PostRequest(body)
        result = (resource or self.resource()).render(request)
        if result is NOT_DONE_YET:
            await request.notifyFinish()
        else:
            request.write(result)
        answer = Answer(request)
        self.assertNotIn(PASSWORD.encode(), answer.body)
        return answer


class Answer:
    def __init__(self, request: DummyRequest) -> None:
        self.code = request.responseCode or 200
        self.content_type = request.responseHeaders.getRawHeaders(b"content-type")
        self.body = b"".join(request.written)
        self.json = json.loads(self.body)


def credentials(authentication: bool = True, **fields: Any) -> bytes:
    doc = {"authentication": authentication, "username": USER, "password": PASSWORD}
    doc.update(fields)
    return json.dumps(doc).encode()


class RateLimitTests(HubCase):
    async def test_anonymous(self) -> None:
        answer = await self.post(b'{"authentication":false}')
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.content_type, [b"application/json"])
        self.assertEqual(answer.json, {"remaining": 76, "limit": 100})
        self.assertEqual(
            [(method, path, auth) for method, path, _, auth in self.hub.seen],
            [
                (b"GET", b"/token", None),
                (b"HEAD", MANIFEST_PATH.encode(), b"Bearer token-for-anonymous"),
            ],
        )

    async def test_logged_in(self) -> None:
        answer = await self.post(credentials())
        self.assertEqual(answer.json, {"remaining": 199, "limit": 200})

    async def test_credentials_sent_only_when_asked(self) -> None:
        answer = await self.post(credentials(authentication=False))
        self.assertEqual(answer.json, {"remaining": 76, "limit": 100})
        self.assertIsNone(self.hub.seen[0][3])

    async def test_field_names_match_case_insensitively(self) -> None:
        body = json.dumps({"Authentication": True, "UserName": USER, "PASSWORD": PASSWORD})
        answer = await self.post(body.encode())
        self.assertEqual(answer.json, {"remaining": 199, "limit": 200})

    async def test_wrong_password(self) -> None:
        answer = await self.post(credentials(password="not-" + PASSWORD))
        self.assertEqual(answer.code, 500)
        self.assertEqual(answer.content_type, [b"application/json"])
        self.assertEqual(answer.json["message"], TOKEN_FAILED)
        self.assertIn("HTTP 401", answer.json["details"])
        self.assertNotIn(b"not-", answer.body)
        self.assertEqual(len(self.hub.seen), 1)

    async def test_token_answer_not_json(self) -> None:
        self.hub.token_answer = (200, b"<html>maintenance</html>")
        answer = await self.post(b"{}")
        self.assertEqual((answer.code, answer.json["message"]), (500, TOKEN_FAILED))
        self.assertIn("not JSON", answer.json["details"])

    async def test_registry_refuses(self) -> None:
        self.hub.manifest_code = 429
        answer = await self.post(b"{}")
        self.assertEqual((answer.code, answer.json["message"]), (500, LIMITS_FAILED))
        self.assertIn("HTTP 429", answer.json["details"])

    async def test_no_limit_headers_is_null(self) -> None:
        # Docker Hub sends none to Pro accounts: the reference answers null.
        self.hub.limits[b"anonymous"] = {b"RateLimit-Limit": b"100;w=21600"}
        answer = await self.post(b"{}")
        self.assertEqual((answer.code, answer.body), (200, b"null"))
        self.assertEqual(answer.content_type, [b"application/json"])
        self.hub.limits[b"anonymous"] = {}
        self.assertEqual((await self.post(b"{}")).body, b"null")
        self.hub.limits[b"anonymous"] = {b"RateLimit-Limit": b"x", b"RateLimit-Remaining": b"1"}
        self.assertEqual((await self.post(b"{}")).body, b"null")

    async def test_addresses_are_settings(self) -> None:
        # Any path and an existing query on the token service's address.
        answer = await self.post(
            b"{}", self.resource(auth_url=self.base + "/nowhere?x=1", registry_url=self.base + "/")
        )
        self.assertEqual((answer.code, answer.json["message"]), (500, TOKEN_FAILED))
        self.assertEqual(self.hub.seen[0][1], b"/nowhere")
        self.assertEqual(self.hub.seen[0][2][b"x"], [b"1"])
        self.assertEqual(self.hub.seen[0][2][b"service"], [b"registry.docker.io"])

    async def test_redirects_followed_credentials_kept_on_the_host(self) -> None:
        resource = self.resource(auth_url=f"{self.base}/moved?to={self.base}")
        answer = await self.post(credentials(), resource)
        self.assertEqual(answer.json, {"remaining": 199, "limit": 200})
        self.assertEqual([path for _, path, _, _ in self.hub.seen[:2]], [b"/moved", b"/token"])
        self.assertIsNotNone(self.hub.seen[1][3])

    async def test_credentials_not_sent_to_another_host(self) -> None:
        elsewhere = self.base.replace("127.0.0.1", "localhost")
        resource = self.resource(auth_url=f"{self.base}/moved?to={elsewhere}")
        answer = await self.post(credentials(), resource)
        self.assertEqual(answer.json, {"remaining": 76, "limit": 100})  # anonymous
        self.assertEqual(self.hub.seen[1][1], b"/token")
        self.assertIsNone(self.hub.seen[1][3])

    async def test_hub_unreachable(self) -> None:
        closed = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        where = f"127.0.0.1:{closed.getHost().port}"
        await closed.stopListening()
        answer = await self.post(credentials(), self.resource(auth_url=f"https://{where}/token"))
        self.assertEqual((answer.code, answer.json["message"]), (500, TOKEN_FAILED))
        self.assertTrue(answer.json["details"].startswith(where + ": "), answer.json["details"])
        self.assertIn("refused", answer.json["details"])
        self.assertEqual(self.hub.seen, [])

    async def test_untrusted_hub_certificate(self) -> None:
        # The production client trusts the system's CAs, not this test CA.
        answer = await self.post(b"{}", self.resource(client=make_hub_client(reactor)))
        self.assertEqual((answer.code, answer.json["message"]), (500, TOKEN_FAILED))
        self.assertIn("certificate verify failed", answer.json["details"])

    async def test_token_service_hangs(self) -> None:
        self.hub.hang = {b"/token"}
        pending = Deferred.fromCoroutine(self.post(credentials()))
        await self.hub.arrived
        self.clock.advance(TIMEOUT)
        await self.hub.left  # the call was given up, not only its answer
        answer = await pending
        self.assertEqual((answer.code, answer.json["message"]), (500, TOKEN_FAILED))
        self.assertIn(f"no answer within {TIMEOUT:g} s", answer.json["details"])

    async def test_one_deadline_for_both_calls(self) -> None:
        self.hub.hang = {b"/token", MANIFEST_PATH.encode()}
        pending = Deferred.fromCoroutine(self.post(b"{}"))
        await self.hub.arrived
        self.clock.advance(TIMEOUT - 0.5)
        self.hub.answer_held()
        await self.hub.arrived  # now the manifest's HEAD
        self.clock.advance(0.5)
        await self.hub.left
        answer = await pending
        self.assertEqual((answer.code, answer.json["message"]), (500, LIMITS_FAILED))
        self.assertIn("no answer within", answer.json["details"])

    async def test_client_gone_before_the_answer(self) -> None:
        self.hub.hang = {b"/token"}
        request = PostRequest(b"{}")
        self.resource().render(request)
        await self.hub.arrived
        request.processingFailed(ConnectionError("client left"))
        self.clock.advance(TIMEOUT)
        await self.hub.left
        self.assertEqual((request.written, request.finished), ([], 0))


class MethodTests(HubCase):
    def test_head_is_405(self) -> None:
        """Not the 500 of Resource's HEAD-as-GET, which this resource has not."""
        root = Resource()
        root.putChild(b"dockerhub", self.resource())
        channel = Site(root, reactor=self.clock).buildProtocol(None)
        assert channel is not None
        transport = StringTransport()
        channel.makeConnection(transport)
        for method in (b"HEAD", b"GET"):
            transport.clear()
            channel.dataReceived(method + b" /dockerhub HTTP/1.1\r\nHost: agent\r\n\r\n")
            head = transport.value().split(b"\r\n\r\n")[0]
            self.assertTrue(head.startswith(b"HTTP/1.1 405 "), head)
            self.assertIn(b"\r\nAllow: POST\r\n", head)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.hub.seen, [])


class PayloadTests(HubCase):
    async def test_bad_payloads_are_400(self) -> None:
        for body, why in [
            (b"", "empty body"),
            (b"  \n", "empty body"),
            (b"{nope", "not JSON"),
            (b"NaN", "not JSON"),
            (b'{"password": Infinity}', "not JSON"),
            (b"[]", "cannot unmarshal array"),
            (b'"x"', "cannot unmarshal string"),
            (b'{"authentication": "true"}', "field authentication of type bool"),
            (b'{"authentication": 1}', "cannot unmarshal number"),
            (b'{"username": 5}', "field username of type string"),
            (b'{"password": {}}', "cannot unmarshal object"),
            (b'{"authentication": true, "username": "u"}', "Missing username or password"),
            (b'{"authentication": true, "password": "p", "username": ""}', "Missing username"),
        ]:
            answer = await self.post(body)
            self.assertEqual(answer.code, 400, body)
            self.assertEqual(answer.content_type, [b"application/json"])
            self.assertEqual(answer.json["message"], "Invalid request payload")
            self.assertIn(why.lower(), answer.json["details"].lower(), body)
        self.assertEqual(self.hub.seen, [])

    def test_as_gos_decoder_reads_it(self) -> None:
        self.assertEqual(parse_payload(b"null"), HubCredentials())
        self.assertEqual(parse_payload(b"{}"), HubCredentials())
        # Unknown members are ignored, null leaves a field unset.
        self.assertEqual(
            parse_payload(b'{"Name":"Docker Hub","Type":6,"authentication":null}'),
            HubCredentials(),
        )
        # The last duplicate wins, whatever its case.
        self.assertEqual(
            parse_payload(b'{"username":"a","USERNAME":"b","password":"p","Authentication":true}'),
            HubCredentials(True, "b", "p"),
        )
        # Simple case folding: the long s is an s; a sharp s is no "ss".
        self.assertEqual(
            parse_payload('{"u\u017fername":"u","pa\u00dfword":"x"}'.encode()),
            HubCredentials(False, "u", ""),
        )
        # Only the first JSON value is read.
        self.assertEqual(parse_payload(b' {"username":"u"} trailing'), HubCredentials(False, "u"))
        with self.assertRaises(BadPayload):
            parse_payload(b"[" * 100_000)

    def test_repr_hides_the_credentials(self) -> None:
        text = repr(HubCredentials(True, USER, PASSWORD))
        self.assertNotIn(USER, text)
        self.assertNotIn(PASSWORD, text)
        self.assertIn("authentication=True", text)


class HeaderTests(unittest.TestCase):
    def test_rate_limit_as_go_parses_it(self) -> None:
        def parse(*values: bytes) -> int | None:
            return rate_limit(Headers({b"RateLimit-Limit": list(values)}), b"ratelimit-limit")

        self.assertEqual(parse(b"100;w=21600"), 100)
        self.assertEqual(parse(b"100"), 100)
        self.assertEqual(parse(b"+7;w=1", b"8"), 7)
        self.assertEqual(parse(b"-1"), -1)
        for bad in (b"", b"x;w=1", b"1_000", b"1.5", b" 1", "٣".encode(), b"9" * 19):
            self.assertIsNone(parse(bad), bad)
        self.assertIsNone(rate_limit(Headers(), b"RateLimit-Limit"))
