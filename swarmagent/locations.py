"""Where recently seen containers, exec instances and images are: a hint for the lookup.

Filled by the cluster lists the agent serves and by the lookups that found
an object on one node; bounded in size (the oldest entries go first) and in
age. An entry is only a hint: the lookup asks that node's inspect before
serving there, and drops the entry when the node denies it.

Only exact idents are kept (a container's full ID or its name, an image's
ID, an exec instance's ID), never a prefix, and never one that a list shows
on several nodes: such a request keeps today's full search, which answers
409 or picks by the rules of ``locate.py``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from twisted.internet.interfaces import IReactorTime

#: The kinds of object the lookup can find through an entry.
KINDS = frozenset({"containers", "exec", "images"})
#: Container names, kept apart from IDs: a name can be taken on this node
#: after a list placed it elsewhere, so this node's engine is asked first.
NAMES = "container names"


class Locations:
    """A bounded map of (kind, ident) → the node ID that holds it."""

    def __init__(
        self, clock: IReactorTime, max_entries: int = 20_000, max_age: float = 120.0
    ) -> None:
        """``max_entries`` bounds the memory (about 300 bytes each); ``max_age``
        (seconds) how long an entry is trusted enough to be asked first."""
        self._clock = clock
        self._max_entries = max_entries
        self._max_age = max_age
        # Oldest write first: eviction and expiry both take from the front.
        self._entries: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def where(self, kind: str, ident: str) -> str | None:
        """The node ID last seen holding ``ident``, if recent enough."""
        key = (kind, ident)
        entry = self._entries.get(key)
        if entry is None:
            return None
        node, stamp = entry
        if self._clock.seconds() - stamp > self._max_age:
            del self._entries[key]
            return None
        return node

    def remember(self, kind: str, ident: str, node: str) -> None:
        """``ident`` is on ``node`` now."""
        self._put((kind, ident), node, self._clock.seconds())
        self._trim()

    def forget(self, kind: str, ident: str) -> None:
        self._entries.pop((kind, ident), None)

    def learn(self, kind: str, lists: Sequence[tuple[str, Iterable[str]]]) -> None:
        """Take in one cluster list: each answering node's ID with the idents it listed.

        An ident listed by several nodes is forgotten, not remembered.
        """
        if kind not in KINDS and kind != NAMES:
            return
        holders: dict[str, str | None] = {}
        for node, idents in lists:
            for ident in idents:
                seen = holders.get(ident, node)
                holders[ident] = node if seen == node else None
        now = self._clock.seconds()
        for ident, holder in holders.items():
            if holder is None:
                self._entries.pop((kind, ident), None)
            else:
                self._put((kind, ident), holder, now)
        self._trim()

    def _put(self, key: tuple[str, str], node: str, now: float) -> None:
        self._entries[key] = (node, now)
        self._entries.move_to_end(key)

    def _trim(self) -> None:
        oldest = self._clock.seconds() - self._max_age
        while self._entries:
            key, (_, stamp) = next(iter(self._entries.items()))
            if len(self._entries) <= self._max_entries and stamp >= oldest:
                break
            del self._entries[key]
