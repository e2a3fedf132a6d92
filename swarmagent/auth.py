"""Who may use the agent: a CA-verified client certificate, or Portainer's signature."""

from __future__ import annotations

from twisted.web.server import Request

from swarmagent.signature import ACCEPTED, Verdict, Verifier
from swarmagent.tls import ServerTLS

# Portainer's handshake: the only routes served without credentials.
OPEN_PATHS = frozenset({b"/ping", b"/v2/ping"})


class Authorizer:
    """Decides, once per request, whether it may reach an engine."""

    def __init__(self, verifier: Verifier, tls: ServerTLS | None) -> None:
        self._verifier = verifier
        self._tls = tls

    def check(self, request: Request) -> Verdict:
        """ACCEPTED, or the reference agent's 403 answer."""
        if self._tls is not None and self._tls.verified_client(request):
            return ACCEPTED
        return self._verifier.verify_request(request)
