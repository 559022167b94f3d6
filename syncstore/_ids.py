"""64-bit message ids: time-ordered, unique per replica, monotonic under clock steps.

Layout (most significant bit first)::

    bits 63..22  (42 bits)  milliseconds since 2020-01-01T00:00:00Z (good until 2159)
    bits 21..12  (10 bits)  replica id (0..1023), unique per datacenter/replica
    bits 11..0   (12 bits)  sequence within the millisecond (0..4095)

Ids from one replica strictly increase, even when the wall clock steps back
(the generator keeps using its last millisecond) or more than 4096 ids are
needed in one millisecond (it borrows the next millisecond).  Ids from
different replicas never collide because the replica id is part of the id.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import InvalidArgument, SyncStoreError

EPOCH_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z
REPLICA_BITS = 10
SEQUENCE_BITS = 12
MAX_REPLICA = (1 << REPLICA_BITS) - 1
_MAX_SEQUENCE = (1 << SEQUENCE_BITS) - 1
_TIME_SHIFT = REPLICA_BITS + SEQUENCE_BITS
_MAX_TIME = (1 << (64 - _TIME_SHIFT)) - 1


def msg_id_ms(msg_id: int) -> int:
    """Unix-epoch milliseconds encoded in ``msg_id``."""
    return (msg_id >> _TIME_SHIFT) + EPOCH_MS


def msg_id_replica(msg_id: int) -> int:
    """Replica id encoded in ``msg_id``."""
    return (msg_id >> SEQUENCE_BITS) & MAX_REPLICA


class MessageIds:
    """Generator of message ids for one replica.

    ``floor`` is the largest id already issued (e.g. recovered from the
    store; None if there is none), so ids stay monotonic across restarts even
    if the clock went back.  A clock before 2020 counts as 2020-01-01.
    Not locked itself: the store calls it under its sequencing lock, and the
    ids must be issued in the same order as the WAL records anyway.
    """

    def __init__(self, replica_id: int, clock_ms: Callable[[], int], floor: int | None = None) -> None:
        if not 0 <= replica_id <= MAX_REPLICA:
            raise InvalidArgument(f"replica_id must be in 0..{MAX_REPLICA}, got {replica_id}", key="replica_id")
        self._replica = replica_id
        self._clock = clock_ms
        self._last_ms = 0 if floor is None else floor >> _TIME_SHIFT
        self._seq = -1 if floor is None else floor & _MAX_SEQUENCE

    def next(self) -> int:
        """A new id, greater than every id this generator issued before.

        Raises :class:`SyncStoreError` (and issues nothing) if the clock is
        past the id space (year 2159) -- typically a clock in microseconds.
        """
        now = self._clock() - EPOCH_MS
        if now > self._last_ms:
            ms, seq = now, 0
        elif self._seq < _MAX_SEQUENCE:
            ms, seq = self._last_ms, self._seq + 1
        else:  # sequence exhausted (or clock behind): borrow the next millisecond
            ms, seq = self._last_ms + 1, 0
        if ms > _MAX_TIME:  # checked before any state changes: a bad reading wedges nothing
            raise SyncStoreError(
                f"the clock reads {now + EPOCH_MS} ms, beyond the message id range (year 2159)",
                hint="clock_ms must return milliseconds since the Unix epoch",
            )
        self._last_ms, self._seq = ms, seq
        return (self._last_ms << _TIME_SHIFT) | (self._replica << SEQUENCE_BITS) | self._seq

    def observe(self, msg_id: int) -> None:
        """Raise the floor to ``msg_id`` (a follower saw its leader issue it): ids issued later are greater."""
        ms, seq = msg_id >> _TIME_SHIFT, msg_id & _MAX_SEQUENCE
        if (ms, seq) > (self._last_ms, self._seq):
            self._last_ms, self._seq = ms, seq
