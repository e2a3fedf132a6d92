"""``POST /v2/dockerhub``: Docker Hub's pull rate limit, read as the reference agent does.

A token for ``ratelimitpreview/test`` from Docker Hub's token service (with
the user's credentials when the payload asks for them), then a ``HEAD`` of
that image's manifest, whose ``RateLimit-*`` headers are the answer. The
credentials go into the token request's ``Authorization`` header only: they
are never logged, repeated in an error, or shown by ``repr``.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    RedirectAgent,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
    readBody,
)
from twisted.web.error import UnsupportedMethod
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from swarmagent import __version__
from swarmagent.errors import describe, write_error
from swarmagent.logs import logger
from swarmagent.twisted_types import ClientReactor, Rendered, request_body

log = logger(__name__)

T = TypeVar("T")

#: The reference's bound (its ``http.Client`` timeout); here on the whole check.
TIMEOUT = 3.0

TOKEN_QUERY = "service=registry.docker.io&scope=repository:ratelimitpreview/test:pull"
MANIFEST_PATH = "/v2/ratelimitpreview/test/manifests/latest"

# The reference's messages.
BAD_PAYLOAD = "Invalid request payload"
MISSING_CREDENTIALS = "Missing username or password"
TOKEN_FAILED = "Unable to retrieve DockerHub token from DockerHub"
LIMITS_FAILED = "Unable to retrieve DockerHub rate limits from DockerHub"

USER_AGENT = f"swarmagent/{__version__}".encode("ascii")

_INT = re.compile(rb"[+-]?[0-9]+")  # what Go's strconv.Atoi takes
_INT64 = range(-(2**63), 2**63)


@dataclass(frozen=True)
class HubCredentials:
    """The payload: whether to log in to Docker Hub, and as whom (hidden from ``repr``)."""

    authentication: bool = False
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)


class BadPayload(ValueError):
    """The request body is not the reference's payload; the message says why."""


class HubError(Exception):
    """Docker Hub could not be asked: the reference's message, and why."""

    def __init__(self, message: str, details: str) -> None:
        super().__init__(message, details)
        self.message = message
        self.details = details


class _Object(list[tuple[str, object]]):
    """A JSON object's members in order (duplicates kept), as Go's decoder sees them."""


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"invalid value {name}")


_DECODER = json.JSONDecoder(object_pairs_hook=_Object, parse_constant=_reject_constant)


def _json_kind(value: object) -> str:
    """A JSON value's type in Go's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object" if isinstance(value, _Object) else "array"


def _decode_first(body: bytes) -> object:
    """The first JSON value of ``body``, as Go's ``json.Decoder.Decode`` reads it.

    What follows that value is not read, so it is not checked; invalid UTF-8
    inside strings becomes U+FFFD, as in Go.
    """
    text = body.decode("utf-8", "replace")
    start = len(text) - len(text.lstrip(" \t\r\n"))
    if start == len(text):
        raise ValueError("empty body")
    try:
        return _DECODER.raw_decode(text, start)[0]
    except (ValueError, RecursionError) as e:
        raise ValueError(f"not JSON: {e}") from None


def _members(doc: object, names: dict[str, type], what: str) -> dict[str, Any]:
    """The fields of a Go struct (``what``) decoded from ``doc``, by lower-case name.

    As encoding/json does: a ``null`` document or member leaves fields unset,
    names match case-insensitively (with Unicode simple folding: U+017F, the
    long s, is an ``s``), the last duplicate wins, and a value of another type
    is an error.
    """
    if doc is None:
        return {}
    if not isinstance(doc, _Object):
        raise ValueError(f"cannot unmarshal {_json_kind(doc)} into {what}, an object")
    out: dict[str, Any] = {}
    for key, value in doc:
        folded = key.casefold()
        # casefold's expansions (ß to ss) are no simple folds: not a match.
        if len(folded) != len(key) or folded not in names or value is None:
            continue
        kind = names[folded]
        if type(value) is not kind:  # True is an int, but no JSON number
            wanted = "bool" if kind is bool else "string"
            raise ValueError(
                f"cannot unmarshal {_json_kind(value)} into {what} field {folded} of type {wanted}"
            )
        out[folded] = value
    return out


def parse_payload(body: bytes) -> HubCredentials:
    """The reference's payload, decoded as Go would; :class:`BadPayload` if it is none."""
    fields = {"authentication": bool, "username": str, "password": str}
    try:
        credentials = HubCredentials(**_members(_decode_first(body), fields, "the payload"))
    except ValueError as e:
        raise BadPayload(str(e)) from None
    if credentials.authentication and not (credentials.username and credentials.password):
        raise BadPayload(MISSING_CREDENTIALS)
    return credentials


def basic_auth(username: str, password: str) -> bytes:
    """An ``Authorization`` value, as Go's ``SetBasicAuth`` writes it."""
    pair = f"{username}:{password}".encode("utf-8", "replace")
    return b"Basic " + base64.b64encode(pair)


def rate_limit(headers: Headers, name: bytes) -> int | None:
    """The number in ``<name>: 100;w=21600`` (the first such header), or None."""
    values = headers.getRawHeaders(name)
    if not values:
        return None
    number = values[0].split(b";", 1)[0]
    if not _INT.fullmatch(number):
        return None
    value = int(number)
    return value if value in _INT64 else None


def _where(url: str) -> str:
    """A URL's host and port, without any user info."""
    return urlsplit(url).netloc.rpartition("@")[2]


def _reason(e: BaseException) -> str:
    """Why a call failed, from the first reason twisted.web's wrappers hold."""
    while isinstance(e, ResponseFailed | RequestTransmissionFailed | RequestGenerationFailed):
        if not e.reasons:
            break
        e = e.reasons[0].value
    return describe(e)


class DockerHub:
    """Asks Docker Hub for the pull rate limit; each check bounded by ``timeout`` seconds."""

    def __init__(
        self,
        client: IAgent,
        clock: IReactorTime,
        auth_url: str,
        registry_url: str,
        timeout: float = TIMEOUT,
    ) -> None:
        self._client = client
        self._clock = clock
        self._token_url = auth_url + ("&" if "?" in auth_url else "?") + TOKEN_QUERY
        self._manifest_url = registry_url.rstrip("/") + MANIFEST_PATH
        self._timeout = timeout

    async def rate_limits(self, credentials: HubCredentials) -> dict[str, int] | None:
        """``{"remaining", "limit"}``, or None when Docker Hub sends no limits (Pro accounts).

        :raises HubError: with the reference's message for the step that failed.
        """
        deadline = self._clock.seconds() + self._timeout
        try:
            token = await self._within(self._token(credentials), deadline)
        except Exception as e:
            raise HubError(TOKEN_FAILED, f"{_where(self._token_url)}: {_reason(e)}") from None
        try:
            headers = await self._within(self._manifest_headers(token), deadline)
        except Exception as e:
            raise HubError(LIMITS_FAILED, f"{_where(self._manifest_url)}: {_reason(e)}") from None
        limit = rate_limit(headers, b"RateLimit-Limit")
        remaining = rate_limit(headers, b"RateLimit-Remaining")
        if limit is None or remaining is None:
            return None
        return {"remaining": remaining, "limit": limit}

    def _within(self, call: Coroutine[Deferred[object], object, T], deadline: float) -> Deferred[T]:
        def timed_out(result: object, timeout: float) -> NoReturn:
            raise TimeoutError(f"no answer within {self._timeout:g} s")

        left = max(0.0, deadline - self._clock.seconds())
        return Deferred.fromCoroutine(call).addTimeout(left, self._clock, timed_out)

    async def _token(self, credentials: HubCredentials) -> str:
        headers = Headers({b"user-agent": [USER_AGENT]})
        if credentials.authentication:
            auth = basic_auth(credentials.username, credentials.password)
            headers.setRawHeaders(b"authorization", [auth])
        url = self._token_url.encode("ascii")
        response = await self._client.request(b"GET", url, headers)
        body = await readBody(response)
        if response.code != 200:
            raise ValueError(f"failed fetching dockerhub token: HTTP {response.code}")
        # No token is no error: the registry will refuse the empty one.
        token: str = _members(_decode_first(body), {"token": str}, "the token").get("token", "")
        return token

    async def _manifest_headers(self, token: str) -> Headers:
        headers = Headers(
            {b"user-agent": [USER_AGENT], b"authorization": [b"Bearer " + token.encode("utf-8")]}
        )
        response = await self._client.request(b"HEAD", self._manifest_url.encode("ascii"), headers)
        await readBody(response)
        if response.code != 200:
            raise ValueError(f"failed fetching dockerhub limits: HTTP {response.code}")
        answered: Headers = response.headers  # IResponse's attribute is untyped
        return answered


class DockerHubResource(Resource):
    """``POST /v2/dockerhub``: ``{"remaining", "limit"}``, ``null``, or the reference's errors."""

    isLeaf = True
    #: What a 405 names (else twisted.web's own list, HEAD included).
    allowedMethods = (b"POST",)

    def __init__(self, hub: DockerHub) -> None:
        super().__init__()
        self._hub = hub

    def render_HEAD(self, request: Request) -> Rendered:
        # Resource's HEAD is its GET, which this one has not (a 500 until bench/fuzz.py found it).
        raise UnsupportedMethod(self.allowedMethods)

    def render_POST(self, request: Request) -> Rendered:
        content = request_body(request)
        assert content is not None
        try:
            credentials = parse_payload(content.read())
        except BadPayload as e:
            return write_error(request, 400, BAD_PAYLOAD, str(e))
        Deferred.fromCoroutine(self._serve(request, credentials))
        return NOT_DONE_YET

    async def _serve(self, request: Request, credentials: HubCredentials) -> None:
        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)
        try:
            limits = await self._hub.rate_limits(credentials)
        except HubError as e:
            log.warn(
                "Docker Hub rate limits: {message}: {details}", message=e.message, details=e.details
            )
            body = write_error(request, 500, e.message, e.details)
        else:
            request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
            body = json.dumps(limits, separators=(",", ":")).encode("ascii")
        if not gone:
            request.write(body)
            request.finish()


def make_hub_client(reactor: ClientReactor, tls: IPolicyForHTTPS | None = None) -> IAgent:
    """The HTTP client for Docker Hub: by default the system's CAs; a new connection per call.

    Calls are rare (Portainer asks when a pull form opens), so no pool.
    Redirects are followed as Go's client does (up to 10; credentials are
    not sent on to another host).
    """
    policy = tls if tls is not None else BrowserLikePolicyForHTTPS()
    agent = Agent(reactor, contextFactory=policy, connectTimeout=TIMEOUT)
    return RedirectAgent(agent, redirectLimit=10)
