"""Single-value registers: last-writer-wins and max.

Body layouts (see ``_wire`` for the frame and the building blocks)::

    LWWRegister  u8 present (0 or 1); if 1: stamp (u64 physical ms,
                 u32 logical, u64 replica >= 1), then value
    MaxRegister  u8 present (0 or 1); if 1: value
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import InvalidArgument
from ._base import CRDT
from ._hlc import Stamp
from ._values import Value, check_value, value_key
from ._wire import Reader, Writer, register


def _read_present(reader: Reader) -> bool:
    at = reader.pos
    present = reader.u8()
    if present > 1:
        raise reader.corrupt(f"presence flag {present} is neither 0 nor 1", at)
    return present == 1


@register
@dataclass(frozen=True, slots=True)
class LWWRegister(CRDT):
    """A value whose latest write, by HLC stamp, wins (mute flags, drafts).

    Stamps of different replicas never tie (the replica id is part of the
    stamp).  Should one replica reuse a stamp for two values, the larger value
    wins, so the merge still agrees everywhere.  A write with an older stamp
    than the current one loses, exactly as it would arriving from elsewhere.
    """

    TAG: ClassVar[int] = 3
    stamp: Stamp | None = None  # None: never assigned
    payload: Value | None = None

    @property
    def value(self) -> Value | None:
        """The winning value, or None if never assigned."""
        return self.payload

    def assign(self, value: Value, stamp: Stamp) -> LWWRegister:
        """Write ``value`` at ``stamp`` (from ``HLC.now()``)."""
        return self.merge(self.assign_delta(value, stamp))

    def assign_delta(self, value: Value, stamp: Stamp) -> LWWRegister:
        """The delta of :meth:`assign`: a register holding just this write."""
        check_value(value)
        if type(stamp) is not Stamp:
            raise InvalidArgument(f"stamp must be a Stamp from HLC.now(), not {type(stamp).__name__}", key="stamp")
        return LWWRegister(stamp, value)

    def merge(self, other: LWWRegister) -> LWWRegister:
        """The write with the greater (stamp, value)."""
        self._check_peer(other)
        if other.stamp is None:
            return self
        if self.stamp is None:
            return other
        mine = (self.stamp, value_key(self.payload))  # type: ignore[arg-type]
        theirs = (other.stamp, value_key(other.payload))  # type: ignore[arg-type]
        return self if mine >= theirs else other

    def _write_body(self, writer: Writer, depth: int) -> None:
        if self.stamp is None:
            writer.u8(0)
            return
        writer.u8(1)
        writer.stamp(self.stamp.physical, self.stamp.logical, self.stamp.replica)
        writer.value(self.payload)  # type: ignore[arg-type]

    @classmethod
    def _read_body(cls, reader: Reader, depth: int) -> LWWRegister:
        if not _read_present(reader):
            return cls()
        stamp = Stamp(*reader.stamp())
        return cls(stamp, reader.value())


@register
@dataclass(frozen=True, slots=True)
class MaxRegister(CRDT):
    """A value that only moves forward (read markers).

    Values compare naturally within a kind; keep one kind per register (a
    message sequence number, say).  Across kinds the fixed order int < bytes
    < str applies, so merges still agree.
    """

    TAG: ClassVar[int] = 4
    payload: Value | None = None  # None: never assigned

    @property
    def value(self) -> Value | None:
        """The greatest value assigned anywhere, or None."""
        return self.payload

    def assign(self, value: Value) -> MaxRegister:
        """Raise the register to ``value``; a smaller value changes nothing."""
        return self.merge(self.assign_delta(value))

    def assign_delta(self, value: Value) -> MaxRegister:
        """The delta of :meth:`assign`: a register holding ``value``."""
        return MaxRegister(check_value(value))

    def merge(self, other: MaxRegister) -> MaxRegister:
        """The greater value."""
        self._check_peer(other)
        if other.payload is None:
            return self
        if self.payload is None or value_key(other.payload) > value_key(self.payload):
            return other
        return self

    def _write_body(self, writer: Writer, depth: int) -> None:
        writer.u8(self.payload is not None)
        if self.payload is not None:
            writer.value(self.payload)

    @classmethod
    def _read_body(cls, reader: Reader, depth: int) -> MaxRegister:
        return cls(reader.value() if _read_present(reader) else None)
