"""Idempotency: what a delivery's key (sender, client_seq) means -- new, a duplicate, or a conflict.

One job: under the writer's sequencing lock, find the live first delivery of
a key (the overlay, then LMDB's ``dedup`` index, within the dedup window),
check that a retry repeats its conv, body and set of recipients (or raise
:class:`IdempotencyConflict`), check a whole ``deliver_many`` batch before
anything of it is sequenced, and keep the *claims* of the batch's later
chunks until they are sequenced.  The :class:`~syncstore._writer.Writer`
owns one :class:`Idempotency` and calls it on its hot path; docs/design.md
("Exact dedup") tells why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lmdb

from . import _codec
from ._codec import Pairs
from ._ids import msg_id_ms
from ._overlay import Overlay
from .errors import IdempotencyConflict
from .model import Message
from .state import State

__all__ = ["Idempotency", "Key"]

#: An idempotency key: (sender, client_seq).
Key = tuple[int, int]


class Idempotency:
    """The dedup decisions of one writable store.  Every method: sequencing lock held."""

    def __init__(self, overlay: Overlay, state: State, *, clock_ms: Callable[[], int], dedup_window_ms: int) -> None:
        self._overlay = overlay
        self._state = state
        self._clock = clock_ms
        self._dedup_window_ms = dedup_window_ms
        # Keys of deliver_many items not sequenced yet (chunks after the first):
        # key -> [message, recipients, how many batches claim it]; see Writer.deliver_many.
        self._claims: dict[Key, list] = {}
        self._dedup_now = 0  # the clock as dedup sees it: never backwards (see first_delivery)
        # Keys check_batch just found new, valid only inside its read transaction (see first_delivery).
        self._fresh: tuple[lmdb.Transaction, set[Key]] | None = None

    def first_delivery(self, txn: lmdb.Transaction, message: Message, recipients: tuple[int, ...]) -> tuple[int, Pairs, int] | None:
        """The live first delivery of ``message``'s key as (msg_id, pairs, lsn), or None if the key is new.

        Raises :class:`IdempotencyConflict` if that delivery's conv, body or
        set of recipients differ from ``message``'s.  The LSN is that of a
        pending (unapplied) first delivery, 0 if applied.  Sequencing lock held.
        """
        key = (message.sender, message.client_seq)
        fresh = self._fresh
        if fresh is not None and fresh[0] is txn and key in fresh[1]:
            # deliver_many's check found the key new a moment ago, in this very transaction
            # and lock hold: nothing can have delivered it since (but its own earlier item,
            # hence discard: a repeat of the key is looked up).  Saves the lookups twice.
            fresh[1].discard(key)
            return None
        pending = self._overlay.dedup(*key)
        if pending is not None and self._live(pending[1].msg_id):
            lsn, first = pending
            differs = [name for name, same in (("conv", first.conv == message.conv), ("body", first.body == message.body)) if not same]
            if not _same_recipients(first.pairs, recipients):
                differs.append("recipients")
            if differs:
                raise _conflict(key, first.msg_id, f"differs from the first delivery (msg_id {first.msg_id}) in {', '.join(differs)}")
            return first.msg_id, first.pairs, lsn
        # An expired pending entry is the newest of its key: LMDB can only hold an older one.
        seen = None if pending is not None else self._state.dedup_entry(txn, *key)
        if seen is not None and self._live(seen.msg_id):
            differs = [] if seen.fingerprint == _codec.dedup_fingerprint(message.conv, message.body) else ["conv or body"]
            if not _same_recipients(seen.pairs, recipients):
                differs.append("recipients")
            if differs:
                raise _conflict(key, seen.msg_id, f"differs from the first delivery (msg_id {seen.msg_id}) in {', '.join(differs)}")
            return seen.msg_id, seen.pairs, 0
        claim = self._claims.get(key) if self._claims else None
        if claim is not None and not _same_content(claim[0], claim[1], message, recipients):
            raise _conflict(key, None, "a concurrent deliver_many is delivering it with other content")
        return None

    def _live(self, msg_id: int) -> bool:
        """Whether a first delivery with this msg_id is inside the dedup window.  Sequencing lock held.

        The clock used never goes backwards: an entry once expired stays so
        (the purge may have removed it already), and deliver_many's check
        and its sequencing cannot disagree about a key.
        """
        now = self._clock()
        if now > self._dedup_now:
            self._dedup_now = now
        return self._dedup_now - msg_id_ms(msg_id) <= self._dedup_window_ms

    def check_batch(self, txn: lmdb.Transaction, items: Sequence[tuple[Message, tuple[int, ...]]], first_chunk: int) -> None:
        """Raise :class:`IdempotencyConflict` if any item conflicts with its key's first delivery or an earlier item.

        A repeat of a key within the batch with the same content is fine (a
        duplicate, as in :meth:`Writer.deliver`).  The first ``first_chunk``
        items are sequenced next, in this same transaction and lock hold:
        the keys of those found new are remembered, so that
        :meth:`first_delivery` need not look them up again (until
        :meth:`forget_fresh`).  Sequencing lock held.
        """
        firsts: dict[Key, int] = {}  # key -> index of its first item in this batch
        fresh: set[Key] = set()  # keys of the first chunk found new (sequenced in this same lock hold)
        pending, claims = self._overlay.dedup, self._claims
        keys = [(message.sender, message.client_seq) for message, _recipients in items]
        stored = self._state.dedup_keys_present(txn, keys)  # one C-level lookup loop for the whole batch
        for index, (message, recipients) in enumerate(items):
            key = keys[index]
            earlier = firsts.setdefault(key, index)
            if earlier == index:
                # Most keys of a bulk load are new: tell so without first_delivery's call.
                if pending(*key) is None and key not in stored and key not in claims:
                    if index < first_chunk:
                        fresh.add(key)
                elif self.first_delivery(txn, message, recipients) is None and index < first_chunk:
                    fresh.add(key)
            elif not _same_content(*items[earlier], message, recipients):
                self.first_delivery(txn, message, recipients)  # names the stored first delivery, if any
                raise _conflict(key, None, f"items[{earlier}] and items[{index}] of the batch differ in conv, body or recipients")
        # Only this transaction's sequencing may use it; a memo left behind by an error
        # names a transaction no one else holds, and the next batch replaces it.
        self._fresh = (txn, fresh)

    def forget_fresh(self) -> None:
        """The first chunk is sequenced: drop :meth:`check_batch`'s memo of new keys.  Sequencing lock held."""
        self._fresh = None

    def claim(self, items: Sequence[tuple[Message, tuple[int, ...]]], change: int) -> None:
        """Add (change=1) or drop (change=-1) the claims of ``items`` on their keys.  Sequencing lock held.

        Claims on one key always carry the same content: a batch whose item
        differs from a claim fails its check before claiming anything.
        """
        claims = self._claims
        for message, recipients in items:
            key = (message.sender, message.client_seq)
            claim = claims.get(key)
            if claim is None:
                if change > 0:
                    claims[key] = [message, recipients, change]
            elif claim[2] + change > 0:
                claim[2] += change
            else:
                del claims[key]


def _same_recipients(pairs: Pairs, recipients: tuple[int, ...]) -> bool:
    """Whether a first delivery's (user, cursor) pairs name the same set of users as ``recipients``.

    Both sides list each user once (deliver drops repeats), so equal sizes and
    equal sets are the test; the order of ``to`` is not part of the content.
    """
    if len(pairs) != len(recipients):
        return False
    if len(pairs) == 1:
        return pairs[0][0] == recipients[0]
    return {uid for uid, _cursor in pairs} == set(recipients)


def _same_content(first: Message, first_to: tuple[int, ...], message: Message, to: tuple[int, ...]) -> bool:
    """Whether two deliveries of one key carry the same conv, body and set of recipients."""
    return first.conv == message.conv and first.body == message.body and (first_to == to or set(first_to) == set(to))


def _conflict(key: Key, msg_id: int | None, detail: str) -> IdempotencyConflict:
    return IdempotencyConflict(f"idempotency key reused with different content: {detail}", key=key, msg_id=msg_id)
