"""The demo's reads beyond catch-up: scrolling back in a chat, and showing a quoted message.

After the main run of ``syncstore demo`` is verified, a sample of clients do
what an IM app does once it has caught up:

1. *Scroll back in one conversation*: ``store.history(user, conv)`` page by
   page (pages of 20, ``before=page.before``) until ``has_more`` is False.
   The pages together must be exactly the client's own received messages of
   that conversation, newest first -- served from the history index, not by
   filtering the inbox.
2. *Show a quoted or replied-to message*: ``store.get(msg_id)`` for messages
   the client holds.  Every answer must equal what the client received (as a
   :class:`MessageRecord`, without the per-recipient cursor); an id never
   delivered must give None.

It also checks the layout's promise that a message is stored once however
many recipients it has: ``check()`` counts one stored message per delivery.

Pure orchestration over the public API; failures go through ``fail``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from . import store as _store
from .model import MessageRecord, StoredMessage

__all__ = ["ReadsResult", "scroll_back_and_quote"]

HISTORY_PAGE = 20
Fail = Callable[[str], None]


@dataclass(frozen=True)
class ReadsResult:
    """What the reads phase exercised (each verified, or a failure was reported)."""

    conversations: int  # (user, conversation) histories scrolled to their start
    history_pages: int
    history_messages: int
    quotes: int  # get(msg_id) answers compared


def scroll_back_and_quote(store: _store.Store, received: Mapping[int, Sequence[StoredMessage]], rng: random.Random, sample: int, fail: Fail) -> ReadsResult:
    """Scroll back through up to three conversations and quote up to five messages, for ``sample`` random clients."""
    conversations = pages = messages = quotes = 0
    users = [uid for uid, held in received.items() if held]
    for uid in rng.sample(users, min(sample, len(users))):
        held = received[uid]
        convs = sorted({m.conv for m in held})
        for conv in rng.sample(convs, min(3, len(convs))):
            expected = [m for m in reversed(held) if m.conv == conv]
            got: list[StoredMessage] = []
            before = None
            while True:
                page = store.history(uid, conv, before=before, limit=HISTORY_PAGE)
                pages += 1
                got.extend(page.messages)
                if not page.has_more or len(got) > len(expected):
                    break
                before = page.before
            if got != expected:
                fail(f"user {uid}: history of conversation {conv} gave {len(got)} messages, the client received {len(expected)} (or another order)")
            conversations += 1
            messages += len(got)
        for message in rng.sample(list(held), min(5, len(held))):
            quoted = store.get(message.msg_id)
            if quoted != MessageRecord(*message[1:]):
                fail(f"user {uid}: get({message.msg_id}) gave {quoted!r}, the client received {message!r}")
            quotes += 1
    unknown = max(m.msg_id for held in received.values() for m in held) + 1 if users else 1
    if store.get(unknown) is not None:
        fail(f"get({unknown}), an id never delivered, returned a message")
    return ReadsResult(conversations, pages, messages, quotes)
