"""Grow-only and positive-negative counters (badge and unread counts).

Body layouts (see ``_wire`` for the frame and the building blocks)::

    GCounter   pairs: (replica, count) strictly ascending by replica, count >= 1
    PNCounter  GCounter body of the increments, GCounter body of the decrements
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import InvalidArgument
from ._base import CRDT
from ._values import U64_MAX, check_amount, check_replica, pointwise_max
from ._wire import Reader, Writer, register


@register
@dataclass(frozen=True, slots=True)
class GCounter(CRDT):
    """A counter that only grows: one count per replica, summed.

    Each replica only ever raises its own count, so merging takes the
    per-replica maximum.  A count is bounded by 2**64-1; an increment past it
    raises ``InvalidArgument`` instead of wrapping, which would make the
    count go down and be overwritten by the maximum on the next merge.
    """

    TAG: ClassVar[int] = 1
    counts: tuple[tuple[int, int], ...] = ()  # (replica, count), by replica; no zero counts

    @property
    def value(self) -> int:
        """The total over all replicas."""
        return sum(count for _, count in self.counts)

    def increment(self, replica: int, n: int = 1) -> GCounter:
        """Add ``n`` (0..2**64-1) on behalf of ``replica``."""
        return self.merge(self.increment_delta(replica, n))

    def increment_delta(self, replica: int, n: int = 1) -> GCounter:
        """The delta of :meth:`increment`: the replica's new count alone."""
        check_replica(replica)
        check_amount(n)
        count = dict(self.counts).get(replica, 0) + n
        if count > U64_MAX:
            raise InvalidArgument(
                f"{type(self).__name__} overflow: replica {replica} would count {count} > 2**64-1",
                key=replica,
                hint="a per-replica count is bounded by 2**64-1; nothing was changed",
            )
        return GCounter(((replica, count),) if count else ())

    def merge(self, other: GCounter) -> GCounter:
        """Per-replica maximum."""
        self._check_peer(other)
        return GCounter(tuple(sorted(pointwise_max(self.counts, other.counts).items())))

    def _write_body(self, writer: Writer, depth: int) -> None:
        writer.pairs(self.counts)

    @classmethod
    def _read_body(cls, reader: Reader, depth: int) -> GCounter:
        return cls(reader.pairs(strict_replicas=True))


@register
@dataclass(frozen=True, slots=True)
class PNCounter(CRDT):
    """A counter that goes both ways: a GCounter of increments minus one of decrements."""

    TAG: ClassVar[int] = 2
    plus: GCounter = GCounter()
    minus: GCounter = GCounter()

    @property
    def value(self) -> int:
        """Increments minus decrements, over all replicas."""
        return self.plus.value - self.minus.value

    def increment(self, replica: int, n: int = 1) -> PNCounter:
        """Add ``n`` (0..2**64-1) on behalf of ``replica``."""
        return self.merge(self.increment_delta(replica, n))

    def increment_delta(self, replica: int, n: int = 1) -> PNCounter:
        """The delta of :meth:`increment`."""
        return PNCounter(plus=self.plus.increment_delta(replica, n))

    def decrement(self, replica: int, n: int = 1) -> PNCounter:
        """Subtract ``n`` (0..2**64-1) on behalf of ``replica``."""
        return self.merge(self.decrement_delta(replica, n))

    def decrement_delta(self, replica: int, n: int = 1) -> PNCounter:
        """The delta of :meth:`decrement`."""
        return PNCounter(minus=self.minus.increment_delta(replica, n))

    def merge(self, other: PNCounter) -> PNCounter:
        """Merge increments and decrements separately."""
        self._check_peer(other)
        return PNCounter(self.plus.merge(other.plus), self.minus.merge(other.minus))

    def _write_body(self, writer: Writer, depth: int) -> None:
        self.plus._write_body(writer, depth)
        self.minus._write_body(writer, depth)

    @classmethod
    def _read_body(cls, reader: Reader, depth: int) -> PNCounter:
        return cls(GCounter._read_body(reader, depth), GCounter._read_body(reader, depth))
