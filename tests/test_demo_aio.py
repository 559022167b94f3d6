"""The demo's asyncio phase: it passes on a healthy store, and its checks catch what they are there to catch."""

from __future__ import annotations

import asyncio

import syncstore.aio
from syncstore import Message, _demo_aio


def test_the_phase_passes_and_exercises_the_gateway():
    failures: list[str] = []
    result = _demo_aio.run_aio_phase(12, seed=3, fail=failures.append)
    assert failures == []
    assert result.messages == 12 * _demo_aio.PER_USER and result.tail_changes == result.messages
    assert result.inboxes == 12 and result.duplicates > 0
    assert result.gateway_clients == _demo_aio.GATEWAY_CLIENTS and result.reconnects == 1


def test_the_inbox_check_reports_a_missing_or_an_extra_message(store_path):
    failures: list[str] = []

    async def main():
        async with await syncstore.aio.open(store_path) as store:
            first = await store.deliver(Message(1, 1, 1, b"a"), [2])
            second = await store.deliver(Message(1, 1, 2, b"b"), [2])
            exact = {first.msg_id: (1, 1), second.msg_id: (1, 2)}
            assert await _demo_aio._verify_inbox(store, 2, exact, failures.append) == 1
            assert await _demo_aio._verify_inbox(store, 2, {first.msg_id: (1, 1)}, failures.append) == 0
            assert await _demo_aio._verify_inbox(store, 2, {**exact, 12345: (9, 9)}, failures.append) == 0

    asyncio.run(main())
    assert len(failures) == 2 and all("not exactly" in f for f in failures)
