"""The values users pass in and get back: Message, Delivery, Page (and StoredMessage).

Messages validate themselves on construction, so an invalid ``Message`` cannot
exist and ``deliver`` only has to check store-specific limits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .errors import InvalidArgument
from .state import StoredMessage

__all__ = ["Message", "Delivery", "Page", "StoredMessage", "MAX_U64", "check_u64"]

MAX_U64 = (1 << 64) - 1


def check_u64(name: str, value: object) -> int:
    """``value`` if it is an int in 0..2**64-1, else :class:`InvalidArgument` naming ``name``."""
    if type(value) is not int:  # bool is an int subclass, and True is not a user id
        raise InvalidArgument(f"{name} must be an int, got {type(value).__name__}", key=name)
    if not 0 <= value <= MAX_U64:  # type: ignore[operator]
        raise InvalidArgument(f"{name} must be in 0..2**64-1, got {value}", key=name)
    return value  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Message:
    """A message to deliver.

    ``(sender, client_seq)`` is the idempotency key: the client picks a new
    ``client_seq`` per message and reuses it when it retries.  ``ts_ms``
    defaults to the time the store accepts it; ``priority`` is 0..255.
    """

    sender: int
    conv: int
    client_seq: int
    body: bytes
    ts_ms: int | None = None
    priority: int = 0

    def __post_init__(self) -> None:
        sender, conv, client_seq = self.sender, self.conv, self.client_seq
        if not (
            type(sender) is int
            and type(conv) is int
            and type(client_seq) is int
            and 0 <= sender <= MAX_U64
            and 0 <= conv <= MAX_U64
            and 0 <= client_seq <= MAX_U64
        ):  # one fast test on the hot path; the slow path names the bad field
            check_u64("sender", sender)
            check_u64("conv", conv)
            check_u64("client_seq", client_seq)
        if type(self.body) is not bytes:
            raise InvalidArgument(f"body must be bytes, got {type(self.body).__name__}", key="body")
        if self.ts_ms is not None:
            check_u64("ts_ms", self.ts_ms)
        if type(self.priority) is not int or not 0 <= self.priority <= 255:
            raise InvalidArgument(f"priority must be an int in 0..255, got {self.priority!r}", key="priority")


@dataclass(frozen=True, slots=True)
class Delivery:
    """The result of ``deliver``: the message id and each recipient's new cursor.

    ``duplicate`` is True when the idempotency key was seen before inside the
    dedup window; ``msg_id`` and ``cursors`` are then the first delivery's.
    """

    msg_id: int
    duplicate: bool
    cursors: Mapping[int, int]

    @classmethod
    def of(cls, msg_id: int, duplicate: bool, pairs: tuple[tuple[int, int], ...]) -> Delivery:
        """Build from (user id, cursor) pairs, with a read-only cursor mapping."""
        return cls(msg_id, duplicate, MappingProxyType(dict(pairs)))


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a user's inbox, from ``sync``.

    ``messages`` are in ascending cursor order; pass ``next`` as ``since`` to
    get the following page; ``has_more`` says whether there is one.
    """

    messages: tuple[StoredMessage, ...]
    next: int
    has_more: bool
