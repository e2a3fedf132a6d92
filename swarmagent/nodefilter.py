"""The ``node`` filter of a cluster-wide list: which nodes to ask, and what they are asked.

Classic Swarm took ``docker ps --filter node=node3``; an engine rejects a
filter it does not know, so the agent consumes it and sends the other
filters on unchanged. The engine's ``filters`` parameter is JSON in one of
two shapes, ``{"node": ["node3"]}`` or ``{"node": {"node3": true}}`` (what
the docker CLI sends); both are read as the engine reads them (the map's
keys, whatever their values). Anything the agent cannot read as filters
(not JSON, not an object, a ``node`` value of another shape) is left as it
is, for the engines to answer with their own error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import unquote_plus, urlencode

NODE_FILTER = "node"


@dataclass(frozen=True)
class NodeFilter:
    """The nodes a list's filter names, and the query without that filter."""

    #: Node names or IDs, in the order given, each once; empty: every node.
    names: tuple[str, ...]
    query: str


def _names(value: object) -> tuple[str, ...] | None:
    """The node names of a ``node`` filter value, or None if it is not one."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        names = value
    elif isinstance(value, dict) and all(isinstance(v, bool) for v in value.values()):
        names = list(value)
    else:
        return None
    return tuple(dict.fromkeys(names))


def take_node_filter(query: str) -> NodeFilter | None:
    """The node filter of a raw (percent-encoded) query, or None if it has none.

    The first ``filters`` parameter is the one an engine reads; it is
    rewritten without ``node`` (dropped when nothing is left), and every
    other byte of the query is kept.
    """
    params = query.split("&") if query else []
    for i, param in enumerate(params):
        key, _, raw = param.partition("=")
        if unquote_plus(key) != "filters":
            continue
        try:
            doc = json.loads(unquote_plus(raw))
        except ValueError:
            return None
        if not isinstance(doc, dict) or NODE_FILTER not in doc:
            return None
        names = _names(doc.pop(NODE_FILTER))
        if names is None:
            return None
        rest = params[:i] + params[i + 1 :]
        if doc:
            rest.insert(i, urlencode({"filters": json.dumps(doc, separators=(",", ":"))}))
        return NodeFilter(names, "&".join(rest))
    return None
