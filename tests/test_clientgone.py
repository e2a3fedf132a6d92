"""Tests for :mod:`swarmagent.clientgone` on twisted.web's own requests."""

from __future__ import annotations

from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from swarmagent.clientgone import watch_gone
from tests.helpers import Client, make_site


class Held(Resource):
    """Answers nothing yet: keeps each request, watched."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []
        self.watches: list[Callable[[], bool]] = []
        self.calls = 0

    def render(self, request: Request) -> object:
        self.requests.append(request)
        self.watches.append(watch_gone(request, then=self.called))
        return NOT_DONE_YET

    def called(self) -> None:
        self.calls += 1


class WatchGoneTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resource = Held()
        self.client = Client(make_site(self.resource)).send("GET", "/x")
        [self.gone] = self.resource.watches

    def test_there_while_waiting(self) -> None:
        self.assertFalse(self.gone())
        self.assertEqual(self.resource.calls, 0)

    def test_gone_when_the_client_leaves(self) -> None:
        self.client.disconnect()
        self.assertTrue(self.gone())
        self.assertEqual(self.resource.calls, 1)

    def test_not_gone_once_answered(self) -> None:
        [request] = self.resource.requests
        request.finish()
        self.client.disconnect()
        self.assertFalse(self.gone())
        self.assertEqual(self.resource.calls, 0)

    def test_without_a_callback(self) -> None:
        [request] = self.resource.requests
        gone = watch_gone(request)
        self.client.disconnect()
        self.assertTrue(gone())
