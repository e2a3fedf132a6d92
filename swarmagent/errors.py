"""The agent's one error shape: ``{"message", "details"}`` JSON, as the reference agent sends."""

from __future__ import annotations

import json

from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request


def error_body(message: str, details: str = "") -> bytes:
    """The JSON body; empty fields are left out and details start upper-case."""
    doc = {"message": message}
    if details:
        doc["details"] = details[:1].upper() + details[1:]
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def describe(e: BaseException) -> str:
    """An exception as a short reason: its message, else its type's name.

    twisted.web's client wraps what went wrong (``ResponseNeverReceived``,
    ``ResponseFailed``, ``RequestTransmissionFailed``) in a list of failures
    whose ``str`` is their reprs: their own messages are the reason.
    """
    reasons = getattr(e, "reasons", None)
    if isinstance(reasons, list) and reasons:
        return "; ".join(describe(r.value) if isinstance(r, Failure) else str(r) for r in reasons)
    return str(e) or type(e).__name__


def write_error(request: Request, code: int, message: str, details: str = "") -> bytes:
    """Set the status and content type of an error answer; return its body."""
    request.setResponseCode(code)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    return error_body(message, details)


class ErrorResource(Resource):
    """A leaf that answers every method with one JSON error."""

    isLeaf = True

    def __init__(self, code: int, message: str, details: str = "") -> None:
        super().__init__()
        self.code = code
        self.message = message
        self.details = details

    def render(self, request: Request) -> bytes:
        return write_error(request, self.code, self.message, self.details)
