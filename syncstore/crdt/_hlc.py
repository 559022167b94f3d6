"""Hybrid logical clock (Kulkarni et al., 2014) stamping LWWRegister writes.

A stamp is (physical ms, logical counter, replica id), compared in that
order.  The physical part follows the wall clock whenever the wall clock is
ahead, so stamps stay close to real time; the logical counter orders events
within one millisecond and keeps the clock monotonic when the wall clock
steps back.  The replica id makes stamps of different replicas unequal, so
"last writer" is decided identically everywhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InvalidArgument
from ._values import U32_MAX, U64_MAX, check_replica

#: Default bound on how far a remote stamp may be ahead of the local wall clock.
DEFAULT_MAX_DRIFT_MS = 60_000


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch (the default HLC clock)."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True, order=True)
class Stamp:
    """An HLC timestamp, totally ordered by (physical, logical, replica)."""

    physical: int  # ms since the Unix epoch
    logical: int  # events within the same physical ms
    replica: int  # the replica that issued it: the final tie-break

    def __post_init__(self) -> None:
        if type(self.physical) is not int or not 0 <= self.physical <= U64_MAX:
            raise InvalidArgument(f"stamp physical time must be in 0..2**64-1 ms, got {self.physical!r}", key="physical")
        if type(self.logical) is not int or not 0 <= self.logical <= U32_MAX:
            raise InvalidArgument(f"stamp logical counter must be in 0..2**32-1, got {self.logical!r}", key="logical")
        check_replica(self.replica)


class HLC:
    """The hybrid logical clock of one replica; thread-safe.

    ``clock`` returns wall-clock milliseconds (inject a fake in tests);
    ``max_drift_ms`` bounds how far ahead of it a remote stamp may be;
    ``last`` resumes after a restart from the last stamp issued or received,
    so stamps stay monotonic even if the wall clock went back meanwhile.
    """

    __slots__ = ("_clock", "_lock", "_logical", "_physical", "max_drift_ms", "replica")

    def __init__(
        self,
        replica: int,
        clock: Callable[[], int] = wall_clock_ms,
        *,
        max_drift_ms: int = DEFAULT_MAX_DRIFT_MS,
        last: Stamp | None = None,
    ) -> None:
        self.replica = check_replica(replica)
        if type(max_drift_ms) is not int or max_drift_ms < 0:
            raise InvalidArgument(f"max_drift_ms must be a non-negative int, got {max_drift_ms!r}", key="max_drift_ms")
        if last is not None and type(last) is not Stamp:
            raise InvalidArgument(f"last must be a Stamp, got {type(last).__name__}", key="last")
        self.max_drift_ms = max_drift_ms
        self._clock = clock
        self._physical, self._logical = (last.physical, last.logical) if last else (0, 0)
        self._lock = threading.Lock()

    def now(self) -> Stamp:
        """A stamp for a local event, greater than every stamp seen before."""
        with self._lock:
            wall = self._wall()
            if wall > self._physical:
                return self._advance(wall, 0)
            return self._advance(self._physical, self._logical + 1)

    def update(self, remote: Stamp) -> Stamp:
        """Observe ``remote`` (a received stamp); return a stamp for the receipt.

        The result is greater than ``remote`` and than every earlier stamp of
        this clock.  A remote stamp more than ``max_drift_ms`` ahead of the
        local wall clock is refused with ``InvalidArgument`` and changes
        nothing: accepting it would drag every later local stamp into the
        sender's future.
        """
        if type(remote) is not Stamp:
            raise InvalidArgument(f"remote must be a Stamp, got {type(remote).__name__}", key="remote")
        with self._lock:
            wall = self._wall()
            if remote.physical > wall + self.max_drift_ms:
                raise InvalidArgument(
                    f"remote stamp is {remote.physical - wall} ms ahead of the local clock "
                    f"(limit {self.max_drift_ms} ms)",
                    key=remote.replica,
                    hint="check the clocks (NTP) of both replicas; the stamp was not applied",
                )
            physical = max(self._physical, remote.physical, wall)
            logical = -1  # both inputs behind the wall clock: restart the counter at 0
            if physical == self._physical:
                logical = self._logical
            if physical == remote.physical:
                logical = max(logical, remote.logical)
            return self._advance(physical, logical + 1)

    def _wall(self) -> int:
        wall = self._clock()
        if type(wall) is not int or not 0 <= wall <= U64_MAX:
            raise InvalidArgument(f"HLC clock returned {wall!r}; it must return ms as an int in 0..2**64-1", key="clock")
        return wall

    def _advance(self, physical: int, logical: int) -> Stamp:
        if logical > U32_MAX:
            # 2**32 events in one millisecond: borrow the next millisecond
            # rather than wrap, which would make the clock go backwards.
            physical, logical = physical + 1, 0
        self._physical, self._logical = physical, logical
        return Stamp(physical, logical, self.replica)
