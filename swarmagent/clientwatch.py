"""Whether a twisted.web request's client has gone."""

from __future__ import annotations

from collections.abc import Callable

from twisted.python.failure import Failure
from twisted.web.server import Request


class ClientWatch:
    """``gone`` once the client has left before its answer was finished.

    twisted.web says so by failing ``notifyFinish``'s Deferred (it succeeds
    when the answer is finished); ``on_gone`` is called then, to stop the work
    done for that client.
    """

    def __init__(self, request: Request, on_gone: Callable[[], object] | None = None) -> None:
        self.gone = False
        self._on_gone = on_gone
        request.notifyFinish().addErrback(self._left)

    def _left(self, reason: Failure) -> None:
        self.gone = True
        if self._on_gone is not None:
            self._on_gone()
