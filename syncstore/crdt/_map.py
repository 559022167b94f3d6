"""A document of named CRDT fields (a per-user settings document).

The layout and the join rule are in ``_causal``; each dot's payload is the
value of the field as written by the update that made the dot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from typing import Any, ClassVar, TypeVar

from ..errors import InvalidArgument
from ._base import CRDT, combine
from ._causal import ObservedRemove
from ._values import Value, check_value
from ._wire import KINDS, Reader, Writer, register

T = TypeVar("T", bound=CRDT)


@register
@dataclass(frozen=True, slots=True)
class CRDTMap(ObservedRemove):
    """Named fields, each a CRDT of one of the types above, merged field by field.

    Every update of a field writes the field's whole new value under a fresh
    dot and replaces the dots it observed, so a field holds one value per
    replica that updated it concurrently; reading merges them.  Removing a
    field follows the ORSet rule: an update concurrent with the remove wins
    and keeps the updater's whole value.  Two replicas that create one field
    with different kinds (a schema bug) resolve to the higher type tag.
    """

    TAG: ClassVar[int] = 6

    @property
    def value(self) -> dict[str, object]:
        """``{name: plain value of the field}``."""
        return {name: _join(dots).value for name, dots in self.entries}  # type: ignore[misc]

    def get(self, name: str) -> CRDT | None:
        """The field's CRDT value, or None if the field is absent."""
        dots = self._entry(_check_name(name))
        return _join(dots) if dots else None

    def update(self, *args: Any, replica: int | None = None) -> CRDTMap:
        """Set a field to ``fn(current)``: ``update(replica, name, kind, fn)``.

        ``current`` is the field's value, or ``kind()`` when absent; ``fn``
        must return a ``kind``.  A field of another kind is refused.  The
        writing replica's id is needed because the update takes a fresh causal
        dot (so that a later remove can observe it); it may also be passed as
        a keyword: ``update(name, kind, fn, replica=r)``.
        """
        return self.merge(self.update_delta(*args, replica=replica))

    def update_delta(self, *args: Any, replica: int | None = None) -> CRDTMap:
        """The delta of :meth:`update` (same arguments): the field's new value under a fresh dot."""
        if replica is None and len(args) == 4:
            replica, name, kind, fn = args
        elif replica is not None and len(args) == 3:
            name, kind, fn = args
        else:
            raise InvalidArgument(
                "CRDTMap.update takes (replica, name, kind, fn), or (name, kind, fn, replica=...)",
                key="replica",
                hint="a field update takes a causal dot, which is made from the writing replica's id",
            )
        if kind not in KINDS.values():
            raise InvalidArgument(f"kind must be one of the CRDT types, got {kind!r}", key="kind")
        current = self.get(name)
        if current is None:
            current = kind()
        elif type(current) is not kind:
            raise InvalidArgument(
                f"field {name!r} is a {type(current).__name__}, not a {kind.__name__}",
                key=name,
                hint="remove the field first to change its kind",
            )
        new = fn(current)
        if type(new) is not kind:
            raise InvalidArgument(f"fn returned a {type(new).__name__}, not a {kind.__name__}", key=name)
        return self._add_delta(replica, name, new)

    @classmethod
    def _check_arg(cls, key: object) -> Value:
        return _check_name(key)

    def _write_payload(self, writer: Writer, payload: Any, depth: int) -> None:
        writer.crdt(payload, depth)

    @classmethod
    def _read_payload(cls, reader: Reader, depth: int) -> Any:
        return reader.crdt(depth)

    @classmethod
    def _check_key(cls, key: Value, reader: Reader, at: int) -> Value:
        if type(key) is not str:
            raise reader.corrupt(f"field name {key!r} is not a str", at)
        return key


def _check_name(name: object) -> str:
    if type(name) is not str:
        raise InvalidArgument(f"field name must be a str, not {type(name).__name__}", key="name")
    return check_value(name, "name")  # type: ignore[return-value]


def _join(dots: tuple[tuple[Any, CRDT], ...]) -> CRDT:
    """The field's value: its concurrent writes merged."""
    return reduce(combine, (payload for _, payload in dots))
