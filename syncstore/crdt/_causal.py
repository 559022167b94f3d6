"""Causal contexts and the observed-remove machinery of ORSet and CRDTMap.

A *dot* ``(replica, n)`` names the n-th event of a replica.  Every add (or
field update) gets a fresh dot; an entry stays only while one of its dots
does.  A *causal context* is the set of dots a state has seen, stored as a
version vector (replica r has seen its dots 1..vv[r]) plus a *cloud* of the
dots beyond it, which appear only while deltas arrive out of order.

Join rule (Riak DT's ORSWOT, delta-state form): a dot present on one side
only survives if the other side has not seen it -- had it seen it, it saw the
dot removed.  Removing therefore just drops dots that stay in the context:
no tombstone, and the state is bounded by live entries and replicas.

Body layouts (see ``_wire`` for the frame and the building blocks)::

    context    pairs: version vector (replica, n), strictly ascending by replica
               pairs: cloud dots, strictly ascending, each with n > vv[replica] + 1
    entries    u32 k, then k entries strictly ascending by value order:
                 value key, u32 m >= 1, then m times: dot, payload
               dots strictly ascending, seen by the context, each in one entry only

    ORSet      context, entries (key: the element; payload: empty)
    CRDTMap    context, entries (key: the field name, a str; payload: crdt)
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Self

from ._base import CRDT, combine
from ._values import Value, check_replica, pointwise_max, value_key
from ._wire import PAIR_SIZE, U8_SIZE, U32_SIZE, Reader, Writer

Dot = tuple[int, int]  # (replica, n)


@dataclass(frozen=True, slots=True)
class DotContext:
    """The dots a state has seen: a version vector plus the dots beyond it."""

    vv: tuple[tuple[int, int], ...] = ()  # (replica, n): dots 1..n seen
    cloud: tuple[Dot, ...] = ()  # sorted; never contiguous with vv

    @staticmethod
    def of(vv: dict[int, int], dots: Iterable[Dot]) -> DotContext:
        """The canonical context of ``vv`` (consumed) plus ``dots``."""
        cloud = []
        for replica, n in sorted(set(dots)):  # ascending, so runs fold in one pass
            top = vv.get(replica, 0)
            if n == top + 1:
                vv[replica] = n
            elif n > top + 1:
                cloud.append((replica, n))
        return DotContext(tuple(sorted(vv.items())), tuple(cloud))

    def seen(self) -> Callable[[Dot], bool]:
        """A fast membership test for dots."""
        vv = dict(self.vv)
        cloud = frozenset(self.cloud)
        return lambda dot: dot[1] <= vv.get(dot[0], 0) or dot in cloud

    def next_dot(self, replica: int) -> Dot:
        """A dot of ``replica`` that this context has not seen."""
        n = dict(self.vv).get(replica, 0)
        n = max([n] + [m for r, m in self.cloud if r == replica])
        return (replica, n + 1)

    def union(self, other: DotContext) -> DotContext:
        """Every dot seen by either context."""
        if other == self or not (other.vv or other.cloud):
            return self
        return DotContext.of(pointwise_max(self.vv, other.vv), self.cloud + other.cloud)

    def write(self, writer: Writer) -> None:
        """Append the context's layout."""
        writer.pairs(self.vv)
        writer.pairs(self.cloud)

    @staticmethod
    def read(reader: Reader) -> DotContext:
        """Read a context, accepting only the canonical form."""
        vv = reader.pairs(strict_replicas=True)
        at = reader.pos
        cloud = reader.pairs(strict_replicas=False)
        tops = dict(vv)
        for replica, n in cloud:
            if n <= tops.get(replica, 0) + 1:
                raise reader.corrupt(f"cloud dot {(replica, n)} belongs in the version vector", at)
        return DotContext(vv, cloud)


EMPTY_CONTEXT = DotContext()

Entries = tuple[tuple[Value, tuple[tuple[Dot, Any], ...]], ...]


def _entry_key(entry: tuple[Value, Any]) -> tuple[int, Value]:
    return value_key(entry[0])


@dataclass(frozen=True, slots=True)
class ObservedRemove(CRDT):
    """Entries keyed by value, each alive while one of its dots survives.

    Each dot carries a payload (None for ORSet elements, the field's value
    for CRDTMap), written once by the replica that made the dot.
    """

    entries: Entries = ()  # sorted by value order; dots sorted
    context: DotContext = EMPTY_CONTEXT

    def remove(self, key: Value) -> Self:
        """Remove ``key`` as observed here; a concurrent add elsewhere wins."""
        return self.merge(self.remove_delta(key))

    def remove_delta(self, key: Value) -> Self:
        """The delta of :meth:`remove`: no entries, the removed dots as context."""
        self._check_arg(key)
        return type(self)((), DotContext.of({}, (dot for dot, _ in self._entry(key))))

    def merge(self, other: Self) -> Self:
        """The ORSWOT join (see the module docstring)."""
        self._check_peer(other)
        if other is self:
            return self
        seen_here, seen_there = self.context.seen(), other.context.seen()
        only_there = dict(other.entries)
        merged = []
        for key, mine in self.entries:  # already in order
            kept = _join_dots(mine, only_there.pop(key, ()), seen_here, seen_there)
            if kept:
                merged.append((key, kept))
        if only_there:
            for key, theirs in only_there.items():
                kept = _join_dots((), theirs, seen_here, seen_there)
                if kept:
                    merged.append((key, kept))
            merged.sort(key=_entry_key)
        return type(self)(tuple(merged), self.context.union(other.context))

    def _entry(self, key: Value) -> tuple[tuple[Dot, Any], ...]:
        """The (dot, payload) pairs of ``key``, or () if absent."""
        i = bisect_left(self.entries, value_key(key), key=_entry_key)
        if i < len(self.entries) and self.entries[i][0] == key:
            return self.entries[i][1]
        return ()

    def _add_delta(self, replica: int, key: Value, payload: Any) -> Self:
        """A delta adding ``key`` with a fresh dot, replacing the dots seen here."""
        check_replica(replica)
        dot = self.context.next_dot(replica)
        replaced = (old for old, _ in self._entry(key))
        return type(self)(((key, ((dot, payload),)),), DotContext.of({}, (dot, *replaced)))

    def _write_body(self, writer: Writer, depth: int) -> None:
        self.context.write(writer)
        writer.u32(len(self.entries))
        for key, dots in self.entries:
            writer.value(key)
            writer.u32(len(dots))
            for (replica, n), payload in dots:
                writer.pair(replica, n)
                self._write_payload(writer, payload, depth)

    @classmethod
    def _read_body(cls, reader: Reader, depth: int) -> Self:
        context = DotContext.read(reader)
        seen = context.seen()
        taken: set[Dot] = set()
        entries: list[tuple[Value, tuple[tuple[Dot, Any], ...]]] = []
        previous: tuple[int, Value] | None = None
        # An entry takes at least a value kind and length, a count and a dot.
        for _ in range(reader.count(U8_SIZE + U32_SIZE + U32_SIZE + PAIR_SIZE)):
            at = reader.pos
            key = cls._check_key(reader.value(), reader, at)
            order = value_key(key)
            if previous is not None and order <= previous:
                raise reader.corrupt(f"entry {key!r} is out of order or repeated", at)
            previous = order
            dots: list[tuple[Dot, Any]] = []
            count = reader.count(PAIR_SIZE)
            if count == 0:
                raise reader.corrupt(f"entry {key!r} has no dots", at)
            for _ in range(count):
                dot_at = reader.pos
                dot = reader.pair()
                if dots and dot <= dots[-1][0] or dot in taken or not seen(dot):
                    raise reader.corrupt(f"dot {dot} is out of order, repeated or not in the context", dot_at)
                taken.add(dot)
                dots.append((dot, cls._read_payload(reader, depth)))
            entries.append((key, tuple(dots)))
        return cls(tuple(entries), context)

    def _write_payload(self, writer: Writer, payload: Any, depth: int) -> None:
        """Append one dot's payload (ORSet: nothing)."""

    @classmethod
    def _read_payload(cls, reader: Reader, depth: int) -> Any:
        """Read one dot's payload (ORSet: nothing)."""
        return None

    @classmethod
    def _check_arg(cls, key: object) -> Value:
        """Refuse a key argument this type cannot hold (InvalidArgument)."""
        raise NotImplementedError

    @classmethod
    def _check_key(cls, key: Value, reader: Reader, at: int) -> Value:
        """Refuse a decoded key this type never holds (ORSet: any value is fine)."""
        return key


def _dot_of(pair: tuple[Dot, Any]) -> Dot:
    return pair[0]


def _join_dots(
    mine: tuple[tuple[Dot, Any], ...],
    theirs: tuple[tuple[Dot, Any], ...],
    seen_here: Callable[[Dot], bool],
    seen_there: Callable[[Dot], bool],
) -> tuple[tuple[Dot, Any], ...]:
    """The (dot, payload) pairs of one key that survive a join, sorted."""
    # Fast paths for what dominates: converged keys and keys one side lacks.
    if mine == theirs:
        return mine
    if not theirs:
        return _unseen(mine, seen_there)
    if not mine:
        return _unseen(theirs, seen_here)
    only_theirs = dict(theirs)
    kept = []
    for dot, payload in mine:
        if dot in only_theirs:
            other = only_theirs.pop(dot)
            # Equal unless two replicas share an id; combine keeps it symmetric.
            kept.append((dot, payload if payload == other else combine(payload, other)))
        elif not seen_there(dot):
            kept.append((dot, payload))
    kept.extend((dot, payload) for dot, payload in only_theirs.items() if not seen_here(dot))
    return tuple(sorted(kept, key=_dot_of))


def _unseen(dots: tuple[tuple[Dot, Any], ...], seen: Callable[[Dot], bool]) -> tuple[tuple[Dot, Any], ...]:
    """The pairs whose dot ``seen`` does not know (``dots`` itself if all)."""
    kept = tuple(pair for pair in dots if not seen(pair[0]))
    return dots if len(kept) == len(dots) else kept
