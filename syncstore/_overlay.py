"""Records that are sequenced (cursors assigned) but not yet applied to LMDB.

Why it exists: a durable ``deliver`` costs one WAL ``fdatasync``; applying to
LMDB costs another (its commit syncs the data pages).  Paying both per group
commit would halve throughput, so LMDB is updated by a background applier in
larger batches and this overlay answers, in the meantime, the three questions
the LMDB state cannot: a user's latest cursor (to assign the next one), an
idempotency key's first delivery (to dedup exactly), and a user's newest
messages (so ``sync``, ``history`` and ``get`` see every durable write at once).

Size is bounded: the store stops sequencing new records while the overlay
holds more than its budget, until the applier catches up.  All methods must be
called with the store's sequencing lock held.
"""

from __future__ import annotations

import itertools
from collections import deque

from ._codec import Deliver, Record
from .model import MessageRecord, StoredMessage

#: First delivery of an idempotency key still in the overlay: (lsn, record).  The
#: record (msg_id, conv, body, pairs) is what a retry is compared with -- exactly,
#: not by fingerprint: it is in memory anyway, and comparing costs no hashing.
PendingDedup = tuple[int, Deliver]


class Overlay:
    """Unapplied records, indexed by user and by idempotency key."""

    def __init__(self) -> None:
        self._records: deque[tuple[int, Record]] = deque()  # every kind, in LSN order
        # uid -> [(cursor, lsn, record)], ascending in both cursor and lsn; the
        # StoredMessage is built only if read (most records are applied unread).
        self._inbox: dict[int, list[tuple[int, int, Deliver]]] = {}
        self._dedup: dict[tuple[int, int], PendingDedup] = {}
        self._by_id: dict[int, tuple[int, Deliver]] = {}  # msg_id -> (lsn, record)

    def __len__(self) -> int:
        return len(self._records)

    def add(self, lsn: int, record: Record) -> None:
        """Index a newly sequenced record (only deliveries have anything to index)."""
        self._records.append((lsn, record))
        if type(record) is not Deliver:
            return
        inbox = self._inbox
        for uid, cursor in record.pairs:
            entry = (cursor, lsn, record)
            entries = inbox.get(uid)
            if entries is None:
                inbox[uid] = [entry]
            else:
                entries.append(entry)
        self._dedup[(record.sender, record.client_seq)] = (lsn, record)
        self._by_id[record.msg_id] = (lsn, record)

    def head(self, uid: int) -> int | None:
        """The user's latest assigned cursor, acknowledged or not (None if not here)."""
        entries = self._inbox.get(uid)
        return entries[-1][0] if entries else None

    def dedup(self, sender: int, client_seq: int) -> PendingDedup | None:
        """The pending first delivery of an idempotency key, if any."""
        return self._dedup.get((sender, client_seq))

    def visible(self, uid: int, since: int, upto_lsn: int) -> tuple[list[StoredMessage], int]:
        """Messages of ``uid`` with cursor > ``since`` and LSN <= ``upto_lsn``, and the visible head (0 if none)."""
        out: list[StoredMessage] = []
        head = 0
        for cursor, lsn, record in self._inbox.get(uid, ()):
            if lsn > upto_lsn:
                break
            head = cursor
            if cursor > since:
                out.append(StoredMessage.from_record(cursor, record))
        return out, head

    def message(self, msg_id: int, upto_lsn: int) -> MessageRecord | None:
        """The message ``msg_id`` if it is here with LSN <= ``upto_lsn``."""
        found = self._by_id.get(msg_id)
        if found is None or found[0] > upto_lsn:
            return None
        return MessageRecord.from_record(found[1])

    def history(self, uid: int, conv: int, before: int, upto_lsn: int) -> tuple[list[StoredMessage], int | None]:
        """Messages of ``uid`` in ``conv`` with cursor < ``before`` and LSN <= ``upto_lsn``, newest first; and the
        lowest cursor of ``uid`` held here (None if none): LMDB has every older one, and none from it on."""
        entries = self._inbox.get(uid)
        if not entries:
            return [], None
        out = [
            StoredMessage.from_record(cursor, record)
            for cursor, lsn, record in reversed(entries)
            if cursor < before and lsn <= upto_lsn and record.conv == conv
        ]
        return out, entries[0][0]

    def take(self, upto_lsn: int, limit: int, max_users: int | None = None) -> tuple[list[Record], int]:
        """Up to ``limit`` oldest records with LSN <= ``upto_lsn``, and the LSN of the last one (0 if none).

        ``max_users`` also stops once the records taken reach that many
        distinct recipients (each one's inbox and history pages are dirtied by
        the apply).  They stay indexed until :meth:`forget`.
        """
        out = []
        last = 0
        users: set[int] = set()
        for lsn, record in itertools.islice(self._records, limit):
            if lsn > upto_lsn or (max_users is not None and len(users) >= max_users):
                break
            out.append(record)
            last = lsn
            if max_users is not None and type(record) is Deliver:
                users.update(uid for uid, _cursor in record.pairs)
        return out, last

    def forget(self, upto_lsn: int) -> None:
        """Drop the records with LSN <= ``upto_lsn``: LMDB has them now."""
        records = self._records
        while records and records[0][0] <= upto_lsn:
            self._unindex(*records.popleft(), 0)

    def rollback(self, after_lsn: int) -> int:
        """Drop the newest records, those with LSN > ``after_lsn`` (their write failed); return how many.

        Sound only because no reader was shown them (only durable records are
        visible) and no caller was acknowledged: their cursors may be reused.
        """
        records = self._records
        dropped = 0
        while records and records[-1][0] > after_lsn:
            self._unindex(*records.pop(), -1)
            dropped += 1
        return dropped

    def _unindex(self, lsn: int, record: Record, end: int) -> None:
        """Remove a record taken off one ``end`` of the queue (0: oldest, -1: newest) from the indexes."""
        if type(record) is not Deliver:
            return
        inbox = self._inbox
        for uid, _cursor in record.pairs:
            entries = inbox.get(uid)
            if entries and entries[end][1] == lsn:
                del entries[end]
                if not entries:
                    del inbox[uid]
        if self._by_id.get(record.msg_id, (0,))[0] == lsn:
            del self._by_id[record.msg_id]
        key = (record.sender, record.client_seq)
        pending = self._dedup.get(key)
        if pending is not None and pending[0] == lsn:
            del self._dedup[key]

    def since(self, after_lsn: int) -> list[tuple[int, Record]]:
        """The records with LSN > ``after_lsn``, oldest first (a short tail: read from the newest end)."""
        out = []
        for item in reversed(self._records):
            if item[0] <= after_lsn:
                break
            out.append(item)
        out.reverse()
        return out

    def check_continues(self, heads: dict[int, int], applied_lsn: int) -> str | None:
        """Describe the first user whose pending cursors do not densely continue ``heads``, else None.

        ``heads`` and ``applied_lsn`` come from one LMDB snapshot; entries the
        applier already committed (LSN <= ``applied_lsn``) are skipped.
        """
        for uid, entries in self._inbox.items():
            expected = heads.get(uid, 0) + 1
            for cursor, lsn, _record in entries:
                if lsn <= applied_lsn:
                    continue
                if cursor != expected:
                    return f"user {uid}: pending cursor {cursor}, expected {expected}"
                expected += 1
        return None
