"""The values users pass in and get back: Message, Delivery, Page, StoredMessage, MessageRecord, HistoryPage.

Messages validate themselves on construction, so an invalid ``Message`` cannot
exist and ``deliver`` only has to check store-specific limits.
"""

from __future__ import annotations

import base64

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple, overload

from ._codec import STORED_HEAD_SIZE, Deliver, Expire, ExpiredKey, Record, unpack_inbox_entry, unpack_stored_head
from .errors import InvalidArgument

__all__ = ["Message", "Delivery", "Page", "StoredMessage", "Messages", "MessageRecord", "HistoryPage", "Change", "Delivered", "Expired", "SnapshotChunk", "Event", "MAX_U64", "check_u64", "RESET_AHEAD", "RESET_EPOCH", "RESET_REASONS"]

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


class StoredMessage(NamedTuple):
    """A message as stored in one user's inbox, as ``Store.sync`` returns it.

    A tuple type, not a dataclass: a sync page holds up to ``limit`` of
    these and the tuple is several times cheaper to build.
    """

    cursor: int
    msg_id: int
    sender: int
    conv: int
    client_seq: int
    ts_ms: int
    priority: int
    body: bytes

    @classmethod
    def from_record(cls, cursor: int, record: Deliver) -> StoredMessage:
        """The inbox entry ``record`` produces for the recipient at ``cursor``."""
        return cls(cursor, record.msg_id, record.sender, record.conv, record.client_seq, record.ts_ms, record.priority, record.body)

    @classmethod
    def from_ref(cls, ref: InboxRef) -> StoredMessage:
        """Decode an inbox entry and the message it references (formats in docs/format.md)."""
        entry, (key, value) = ref
        cursor, msg_id = unpack_inbox_entry(entry)
        _refs, sender, conv, client_seq, ts_ms, priority = unpack_stored_head(value)
        return tuple.__new__(cls, (cursor, msg_id, sender, conv, client_seq, ts_ms, priority, value[STORED_HEAD_SIZE:]))


#: How a page holds a stored message until it is accessed: the 16-byte inbox
#: entry and the ``(msg_id key, message value)`` pair that LMDB's ``getmulti`` returned.
InboxRef = tuple[bytes, tuple[bytes, bytes]]


class MessageRecord(NamedTuple):
    """A message as stored once for all its recipients, as ``Store.get(msg_id)`` returns it (no cursor: cursors are per recipient)."""

    msg_id: int
    sender: int
    conv: int
    client_seq: int
    ts_ms: int
    priority: int
    body: bytes

    @classmethod
    def from_record(cls, record: Deliver) -> MessageRecord:
        """The stored message of a DELIVER record."""
        return cls(record.msg_id, record.sender, record.conv, record.client_seq, record.ts_ms, record.priority, record.body)

    @classmethod
    def from_value(cls, msg_id: int, value: bytes) -> MessageRecord:
        """Decode a ``messages`` value (format in docs/format.md)."""
        _refs, sender, conv, client_seq, ts_ms, priority = unpack_stored_head(value)
        return tuple.__new__(cls, (msg_id, sender, conv, client_seq, ts_ms, priority, value[STORED_HEAD_SIZE:]))


class Messages(Sequence[StoredMessage]):
    """An immutable sequence of :class:`StoredMessage`, decoded on access.

    ``sync`` hands back the stored bytes of a page without decoding them:
    decoding 100 messages costs as much as reading them from LMDB, and a
    server that forwards only some fields, or stops early, should not pay it
    all up front.  Indexing, iteration, slicing, ``len`` and ``==`` behave as on
    a tuple of StoredMessage.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Sequence[InboxRef | StoredMessage] = ()) -> None:
        self._items = tuple(items)

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> StoredMessage: ...

    @overload
    def __getitem__(self, index: slice) -> Messages: ...

    def __getitem__(self, index: int | slice) -> StoredMessage | Messages:
        if isinstance(index, slice):
            return Messages(self._items[index])
        return _decode(self._items[index])

    def __iter__(self) -> Iterator[StoredMessage]:
        return map(_decode, self._items)  # a C-level loop: no generator frame per message

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Messages, tuple, list)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"Messages({list(self)!r})"


def _decode(item: InboxRef | StoredMessage) -> StoredMessage:
    """A page item as a StoredMessage: overlay items already are one; LMDB items are decoded."""
    return item if type(item) is StoredMessage else StoredMessage.from_ref(item)  # type: ignore[arg-type]


#: Why a page is a reset page (``Page.reset_reason``).
RESET_AHEAD = "ahead"  # since > the user's head: the store was rewound (restored) under the client
RESET_EPOCH = "epoch"  # the client's epoch is not the store's: another history (a restore, another store)
RESET_REASONS = (RESET_AHEAD, RESET_EPOCH)


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a user's inbox, from ``sync``.

    ``messages`` are in ascending cursor order; pass ``next`` as ``since`` to
    get the following page; ``has_more`` says whether there is one.
    ``epoch`` is the store's epoch (random, made when the store was created,
    changed by anything that rewinds its history): a client keeps
    ``(epoch, cursor)`` and passes its epoch back to ``sync``.

    A *reset page* (``reset`` True) says the client's position is not in this
    store's history -- ``reset_reason`` is ``"ahead"`` (``since`` is beyond the
    user's head: the store was rewound) or ``"epoch"`` (the epoch passed to
    ``sync`` is not the store's).  It holds no messages and ``next`` is where
    to resync from (0: the client discards what it holds for this user and
    reads the inbox again); ``has_more`` says whether there is anything to
    read.  The client protocol is in docs/design.md ("Cursors, epochs and
    reset pages").
    """

    messages: Messages
    next: int
    has_more: bool
    reset: bool = False
    reset_reason: str | None = None
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """One page of a user's messages in one conversation, from ``Store.history``, newest first.

    Pass ``before`` back as ``before`` for the next, older page; ``has_more``
    says whether there is one.  With no messages, ``before`` is the ``before``
    that was asked for (or 0 when there was none).
    """

    messages: Messages
    before: int
    has_more: bool


@dataclass(frozen=True, slots=True)
class Delivered:
    """The data of a ``"deliver"`` change: the message, and the cursor each recipient got (in delivery order)."""

    message: MessageRecord
    cursors: Mapping[int, int]


@dataclass(frozen=True, slots=True)
class Expired:
    """The data of an ``"expire"`` change: idempotency keys whose dedup window ended.

    ``keys`` are ``(first-delivery ms, sender, client_seq)``: a retry of one of
    them is a new delivery from now on.
    """

    keys: tuple[ExpiredKey, ...]


@dataclass(frozen=True, slots=True)
class Change:
    """One write of the change log, as ``Store.changes`` yields it.

    ``lsn`` is its log sequence number (dense: each change is the previous
    + 1); ``kind`` names the kind of write and ``data`` holds it:

    ==========  ================================================================
    kind        data
    ==========  ================================================================
    "deliver"   :class:`Delivered`: the message and every recipient's cursor
    "expire"    :class:`Expired`: idempotency keys that left the dedup window
    ==========  ================================================================

    Later kinds of write add a kind and its data class, nothing else.
    """

    lsn: int
    kind: str
    data: Delivered | Expired

    @classmethod
    def of(cls, lsn: int, record: Record) -> Change:
        """The change of a decoded WAL record."""
        if type(record) is Deliver:
            return cls(lsn, "deliver", Delivered(MessageRecord.from_record(record), MappingProxyType(dict(record.pairs))))
        return cls(lsn, "expire", Expired(record.keys))  # type: ignore[union-attr]

    def record(self) -> Record:
        """The WAL record this change is (what a follower appends to its own log)."""
        data = self.data
        if type(data) is Delivered:
            m = data.message
            return Deliver(m.msg_id, m.sender, m.conv, m.client_seq, m.ts_ms, m.priority, m.body, tuple(data.cursors.items()))
        return Expire(data.keys)  # type: ignore[union-attr]

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (the body as UTF-8 text when it is, else base64; ``body_encoding`` says which)."""
        data = self.data
        if type(data) is Delivered:
            m = data.message
            try:
                body, encoding = m.body.decode("utf-8"), "utf-8"
            except UnicodeDecodeError:
                body, encoding = base64.b64encode(m.body).decode("ascii"), "base64"
            return {
                "lsn": self.lsn,
                "kind": self.kind,
                "msg_id": m.msg_id,
                "sender": m.sender,
                "conv": m.conv,
                "client_seq": m.client_seq,
                "ts_ms": m.ts_ms,
                "priority": m.priority,
                "body": body,
                "body_encoding": encoding,
                "cursors": {str(uid): cursor for uid, cursor in data.cursors.items()},
            }
        return {"lsn": self.lsn, "kind": self.kind, "keys": [list(key) for key in data.keys]}  # type: ignore[union-attr]

    def encode(self) -> bytes:
        """This change as a feed event: versioned bytes, CRC-checked (docs/format.md, "Feed events")."""
        from . import _events  # noqa: PLC0415 - the event codec builds on these values

        return _events.encode_change(self)


#: A row of a snapshot: (op 1 put | 2 delete, database id, key, value or duplicate), as in snapshot files.
SnapshotRow = tuple[int, int, bytes, bytes]


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """A piece of a snapshot's contents in a feed (``Store.feed``): rows to apply, in order.

    A feed that cannot serve a position from the log sends the newest
    snapshot at ``snapshot_lsn`` as chunks ``index`` 0, 1, ...; the one with
    ``final`` completes it, carrying ``last_msg_id`` (the id generator's
    floor; None when no message was ever applied).  ``epoch`` and
    ``replica_id`` are the source store's.  ``rows`` are snapshot rows (op,
    database id, key, value) as docs/format.md describes them.  A follower
    applies the chunks in order (``apply``) and shows nothing of them until
    the final one.
    """

    snapshot_lsn: int
    index: int
    final: bool
    epoch: int
    replica_id: int
    last_msg_id: int | None
    rows: tuple[SnapshotRow, ...]

    def encode(self) -> bytes:
        """This chunk as a feed event: versioned bytes, CRC-checked (docs/format.md, "Feed events")."""
        from . import _events  # noqa: PLC0415

        return _events.encode_chunk(self)


#: What ``Store.feed`` yields and ``Store.apply`` takes.
Event = Change | SnapshotChunk
