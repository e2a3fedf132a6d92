"""Who may use the agent: a CA-verified client certificate, or Portainer's signature."""

from __future__ import annotations

from dataclasses import replace

from twisted.web.server import Request

from swarmagent.signature import (
    ACCEPTED,
    PUBLIC_KEY_HEADER,
    SignatureError,
    Verdict,
    Verifier,
    decode_public_key,
    fingerprint,
)
from swarmagent.tls import ServerTLS

# Portainer's handshake: the only routes served without credentials.
OPEN_PATHS = frozenset({b"/ping", b"/v2/ping"})

_KEY = PUBLIC_KEY_HEADER.encode("ascii")


class Authorizer:
    """Decides, once per request, whether it may reach an engine."""

    def __init__(self, verifier: Verifier, tls: ServerTLS | None) -> None:
        self._verifier = verifier
        self._tls = tls

    def check(self, request: Request) -> Verdict:
        """ACCEPTED, or the reference agent's 403 answer (with its reason)."""
        if self._tls is not None and self._tls.verified_client(request):
            return ACCEPTED
        verdict = self._verifier.verify_request(request)
        if (
            verdict.reason == "no_credential"
            and self._tls is not None
            and self._tls.untrusted_client(request)
        ):
            return replace(verdict, reason="untrusted_cert")
        return verdict

    def who(self, request: Request) -> str:
        """The client, for the access log: its certificate's subject, else its
        signing key's fingerprint (never the key or the signature), else ``-``."""
        if self._tls is not None:
            cert = self._tls.verified_peer(request)
            if cert is not None:
                return cert.subject.rfc4514_string()
        key = request.requestHeaders.getRawHeaders(_KEY)
        if key:
            try:
                return "key:" + fingerprint(decode_public_key(key[0]))
            except SignatureError:
                return "key:invalid"
        return "-"
