"""Whether the client of a request has gone: one way to ask, for every module that waits."""

from __future__ import annotations

from collections.abc import Callable

from twisted.python.failure import Failure
from twisted.web.server import Request


def watch_gone(request: Request, then: Callable[[], object] | None = None) -> Callable[[], bool]:
    """Watch for ``request``'s client leaving before its answer is finished.

    The function returned tells whether it has; ``then`` (if given) runs
    once when it does, to stop the work done for it.
    """
    gone: list[Failure] = []

    def left(reason: Failure) -> None:
        gone.append(reason)
        if then is not None:
            then()

    request.notifyFinish().addErrback(left)
    return lambda: bool(gone)
