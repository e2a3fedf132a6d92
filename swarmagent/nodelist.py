"""One node's list answer, each item marked with its node without re-encoding its values.

msgspec validates the answer and splits each object item into its top-level
keys, every value kept as the engine's own bytes (``msgspec.Raw``): only the
keys are written anew, values (Go's escaping included) go out as the engine
sent them. The Portainer tag is put in as bytes, and the node label spliced
into ``Labels`` as bytes; an item that is not an object is left as it is.
Nothing of an item is decoded but what the caller asks for: its ``Id`` and
``Names`` for the locations, its ``Scope`` for a network list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
from msgspec import Raw

from swarmagent.nodes import NodeFailed
from swarmagent.wire import NODE_LABEL

#: An object item: its top-level keys, each value as sent.
Item = dict[str, Raw]


class _Volumes(msgspec.Struct):
    """A volume list answer: ``{"Volumes": [...], "Warnings": [...]}``."""

    Volumes: list[Item] | None = None
    Warnings: list[Any] | None = None


class _LooseVolumes(msgspec.Struct):
    Volumes: list[Raw] | None = None
    Warnings: list[Any] | None = None


_ITEMS = msgspec.json.Decoder(list[Item])
_LOOSE_ITEMS = msgspec.json.Decoder(list[Raw])
_VOLUMES = msgspec.json.Decoder(_Volumes)
_LOOSE_VOLUMES = msgspec.json.Decoder(_LooseVolumes)
_OBJECT = msgspec.json.Decoder(Item)
_VALUE = msgspec.json.Decoder()
_ENCODER = msgspec.json.Encoder()
_LABEL_KEY = _ENCODER.encode(NODE_LABEL)
_NULL = Raw(b"null")


@dataclass
class NodeList:
    """One node's list, tagged: what the merge and the locations need of it."""

    #: The tagged items, JSON without the enclosing brackets (b"" for none).
    items: bytes
    warnings: list[str] = field(default_factory=list)
    #: Swarm-scoped networks taken out (when asked), encoded, by ID.
    swarm: dict[str, bytes] = field(default_factory=dict)
    #: The items' IDs (when asked).
    ids: list[str] = field(default_factory=list)
    #: The containers' names, as a request spells them (when asked).
    names: list[str] = field(default_factory=list)


def node_list(
    kind: str,
    body: bytes,
    node_name: str,
    *,
    once: bool = False,
    ids: bool = False,
    names: bool = False,
) -> NodeList:
    """``body``, one node's answer to a list of ``kind``, tagged with ``node_name``.

    ``once`` takes swarm-scoped items out (see ``fanout.once_per_swarm``);
    ``ids`` and ``names`` collect the items' IDs and container names.
    Raises :class:`NodeFailed` for an answer that is not a list of that kind.
    """
    items, warnings = _split(kind, body)
    objects = [i for i in items if isinstance(i, dict)]
    out = NodeList(b"", warnings)
    if ids:
        out.ids = [i for i in _values(objects, "Id") if isinstance(i, str) and i]
    if names:
        out.names = _container_names(_values(objects, "Names"))
    _Marker(node_name).mark(objects)
    if once:
        scopes = _values(objects, "Scope")
        swarm = [o for o, scope in zip(objects, scopes, strict=True) if scope == "swarm"]
        if swarm:
            out.swarm = {str(_values([o], "Id")[0]): _ENCODER.encode(o) for o in swarm}
            taken = {id(o) for o in swarm}
            items = [i for i in items if id(i) not in taken]
    out.items = _ENCODER.encode(items)[1:-1]
    return out


def _split(kind: str, body: bytes) -> tuple[list[Item | Raw], list[str]]:
    """The answer's items (objects split by key, anything else whole) and warnings."""
    volumes = kind == "volumes"
    doc: _Volumes | _LooseVolumes | list[Item] | list[Raw]
    try:
        try:
            doc = _VOLUMES.decode(body) if volumes else _ITEMS.decode(body)
        except msgspec.ValidationError:
            # Not every item is an object (or the shape is wrong): split them
            # one by one, to tell which.
            doc = _LOOSE_VOLUMES.decode(body) if volumes else _LOOSE_ITEMS.decode(body)
    except msgspec.ValidationError:
        raise NodeFailed(
            "volume answer has the wrong shape" if volumes else "answer is not a list"
        ) from None
    except msgspec.DecodeError:
        raise NodeFailed("answer is not JSON") from None
    listed: list[Item] | list[Raw] = doc if isinstance(doc, list) else doc.Volumes or []
    items = [_object(i) for i in listed]
    if isinstance(doc, list):
        return items, []
    return items, [str(w) for w in doc.Warnings or []]


def _object(item: Item | Raw) -> Item | Raw:
    """An item split by key if it is an object, else as it is."""
    if isinstance(item, dict) or bytes(item)[:1] != b"{":
        return item
    return _OBJECT.decode(item)


class _Marker:
    """Puts one node's tag and label into items."""

    def __init__(self, node_name: str) -> None:
        name = _ENCODER.encode(node_name)
        self._tag = Raw(b'{"Agent":{"NodeName":' + name + b"}}")
        self._pair = _LABEL_KEY + b":" + name
        self._name = Raw(name)
        self._only = Raw(b"{" + self._pair + b"}")

    def mark(self, items: list[Item]) -> None:
        """Tag each item and add the node label to its ``Labels`` (null, absent or other: set)."""
        tag, only, labelled = self._tag, self._only, self._labelled
        for item in items:
            item["Portainer"] = tag
            labels = item.get("Labels")
            item["Labels"] = only if labels is None else labelled(bytes(labels))

    def _labelled(self, labels: bytes) -> Raw:
        if labels[:1] != b"{":
            return self._only
        if _LABEL_KEY in labels:
            # A label of that name (or a value spelling it): replaced where it is.
            split = _OBJECT.decode(labels)
            split[NODE_LABEL] = self._name
            return Raw(_ENCODER.encode(split))
        if not labels[1:-1].strip():
            return self._only
        return Raw(labels[:-1] + b"," + self._pair + b"}")


def _values(objects: list[Item], key: str) -> list[object]:
    """Each object's value of ``key`` (None where it has none), decoded in one go."""
    return list(_VALUE.decode(b"[" + b",".join([o.get(key, _NULL) for o in objects]) + b"]"))


def _container_names(values: list[object]) -> list[str]:
    """Containers' names as a request spells them (``/web`` → ``web``; a link's
    ``/a/b`` is not one)."""
    return [
        n[1:]
        for names in values
        if isinstance(names, list)
        for n in names
        if isinstance(n, str) and n.startswith("/") and n.count("/") == 1 and n[1:]
    ]
