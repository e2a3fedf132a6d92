"""Who may use the agent: a CA-verified client certificate, or Portainer's signature."""

from __future__ import annotations

from dataclasses import replace
from typing import cast

from twisted.web.server import Request
from zope.interface import Interface

from swarmagent.signature import (
    ACCEPTED,
    PUBLIC_KEY_HEADER,
    SIGNATURE_HEADER,
    SignatureError,
    Verdict,
    Verifier,
    decode_public_key,
    fingerprint,
)
from swarmagent.tls import NO_CERT, ClientCert, ServerTLS

# Portainer's handshake: the only routes served without credentials.
OPEN_PATHS = frozenset({b"/ping", b"/v2/ping"})

_KEY = PUBLIC_KEY_HEADER.encode("ascii")
_SIGNATURE = SIGNATURE_HEADER.encode("ascii")


class IClientCert(Interface):
    """A request's :class:`~swarmagent.tls.ClientCert`, vouched for by the front door
    (a component of a request that did not come over the client's own TLS connection)."""


class Authorizer:
    """Decides, once per request, whether it may reach an engine.

    From a twisted.web request (:meth:`check`, :meth:`who`), or from its
    parts (:meth:`judge`, :meth:`name`): the connection's client certificate
    (:meth:`client_cert`) and the signature headers.
    """

    def __init__(self, verifier: Verifier, tls: ServerTLS | None) -> None:
        self._verifier = verifier
        self._tls = tls

    def client_cert(self, transport: object) -> ClientCert:
        """What the client certificate of ``transport`` (a TLS connection) proved."""
        return self._tls.client_cert(transport) if self._tls is not None else NO_CERT

    def _cert_of(self, request: Request) -> ClientCert:
        vouched = cast("ClientCert | None", IClientCert(request, None))
        return vouched if vouched is not None else self.client_cert(request.transport)

    def judge(self, cert: ClientCert, key: bytes | None, signature: bytes | None) -> Verdict:
        """ACCEPTED, or the reference agent's 403 answer (with its reason)."""
        if cert.subject is not None:
            return ACCEPTED
        verdict = self._verifier.verify(key, signature)
        if verdict.reason == "no_credential" and cert.untrusted:
            return replace(verdict, reason="untrusted_cert")
        return verdict

    def check(self, request: Request) -> Verdict:
        """:meth:`judge` for a twisted.web request."""
        headers = request.requestHeaders
        # Go's Header.Get reads the first value.
        key = headers.getRawHeaders(_KEY, [None])[0]
        signature = headers.getRawHeaders(_SIGNATURE, [None])[0]
        return self.judge(self._cert_of(request), key, signature)

    def name(self, cert: ClientCert, key: bytes | None) -> str:
        """The client, for the access log: its certificate's subject, else its
        signing key's fingerprint (never the key or the signature), else ``-``."""
        if cert.subject is not None:
            return cert.subject
        if key:
            try:
                return "key:" + fingerprint(decode_public_key(key))
            except SignatureError:
                return "key:invalid"
        return "-"

    def who(self, request: Request) -> str:
        """:meth:`name` for a twisted.web request."""
        key = request.requestHeaders.getRawHeaders(_KEY, [None])[0]
        return self.name(self._cert_of(request), key)
