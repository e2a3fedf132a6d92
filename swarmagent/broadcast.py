"""Which requests may be sent to every node at once, and to which nodes.

A request carrying ``X-SwarmAgent-Broadcast`` (``all``, or node names or
IDs separated by commas) is sent to each of those nodes instead of one.
Only operations that mean the same on every node and that a registry-less
swarm needs everywhere accept it: loading, pulling (or importing) and
tagging an image, and the prunes. Anything else carrying it is refused, so
that a write is never repeated on nodes by mistake.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The header value that names every node.
EVERY_NODE = "all"


@dataclass(frozen=True)
class Operation:
    """What a broadcast request does, and how the nodes' answers are merged."""

    name: str
    #: The answer is a progress stream of JSON lines (else one JSON document).
    streams: bool


LOAD = Operation("load", streams=True)
PULL = Operation("pull", streams=True)
TAG = Operation("tag", streams=False)
PRUNE = Operation("prune", streams=False)

# On the bare path (no /vX.Y); every one is a POST.
_OPERATIONS: tuple[tuple[re.Pattern[str], Operation], ...] = (
    (re.compile(r"^/images/load$"), LOAD),
    (re.compile(r"^/images/create$"), PULL),
    (re.compile(r"^/images/.+/tag$"), TAG),
    (re.compile(r"^/(containers|images|volumes|networks|build)/prune$"), PRUNE),
)


def operation(method: str, bare: str) -> Operation | None:
    """The broadcast operation a request is, or None if it may not be broadcast."""
    if method != "POST":
        return None
    for pattern, op in _OPERATIONS:
        if pattern.match(bare):
            return op
    return None


def parse_broadcast(value: str) -> tuple[str, ...]:
    """The nodes a header value names, each once; empty for every node.

    Raises ValueError for a value that names none, or ``all`` beside names.
    """
    names = tuple(dict.fromkeys(t.strip() for t in value.split(",") if t.strip()))
    if not names:
        raise ValueError(f"names no node: say {EVERY_NODE!r} or node names or IDs")
    if EVERY_NODE in names:
        if len(names) > 1:
            raise ValueError(f"{EVERY_NODE!r} means every node: give it alone")
        return ()
    return names
