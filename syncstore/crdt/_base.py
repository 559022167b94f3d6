"""The CRDT base class: the merge contract and the codec every type shares."""

from __future__ import annotations

from typing import ClassVar, Self

from ..errors import InvalidArgument
from . import _wire


class CRDT:
    """Base of every CRDT value: immutable, mergeable, encodable.

    Subclasses are frozen, slotted dataclasses whose fields hold a canonical
    representation (sorted tuples), so ``==`` and ``hash`` compare states.
    Every mutating operation ``op`` comes with ``op_delta`` returning a small
    value ``d`` such that ``x.op(...) == x.merge(d)``; operations are defined
    that way, so shipping ``d`` to any replica has the effect of the operation.
    """

    __slots__ = ()

    #: Type tag of the binary encoding (see ``_wire``).
    TAG: ClassVar[int]

    def merge(self, other: Self) -> Self:
        """The least state that includes both: commutative, associative, idempotent."""
        raise NotImplementedError

    @property
    def value(self) -> object:
        """The plain Python value this state stands for."""
        raise NotImplementedError

    def encode(self) -> bytes:
        """Compact, checksummed binary encoding (see ``docs/crdt.md``)."""
        return _wire.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Decode an encoding of this type.

        Raises ``CorruptionError`` for damaged or foreign bytes and
        ``InvalidArgument`` if ``data`` is not bytes-like; never anything else.
        """
        return _wire.decode(data, cls)  # type: ignore[return-value]

    def _check_peer(self, other: object) -> None:
        """Refuse to merge values of different types."""
        if type(other) is not type(self):
            raise InvalidArgument(
                f"cannot merge a {type(other).__name__} into a {type(self).__name__}",
                key="other",
            )

    def _write_body(self, writer: _wire.Writer, depth: int) -> None:
        raise NotImplementedError

    @classmethod
    def _read_body(cls, reader: _wire.Reader, depth: int) -> Self:
        raise NotImplementedError


def combine(a: CRDT, b: CRDT) -> CRDT:
    """Join two values that may differ in type (CRDTMap field values).

    Same type: their merge.  Different types -- two replicas created a field
    with different kinds, a schema bug -- the higher type tag wins, so every
    replica still picks the same one.
    """
    if type(a) is type(b):
        return a.merge(b)
    return a if a.TAG > b.TAG else b
