"""syncstore.aio: the asyncio API -- twins of every Store method, agreement with the threaded API, no thread per
pending call, nothing blocking the loop, cancellation and close.

Each test runs its own event loop with ``asyncio.run``.  Where a test needs
deliveries to stay pending, the WAL's ``pwrite`` is held by a FileSystem seam
(:class:`HeldFS`) until the test lets it go: no sleeps, no timing.
"""

from __future__ import annotations

import asyncio
import inspect
import pathlib
import random
import shutil
import tempfile
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import syncstore
import syncstore.aio
from syncstore import IdempotencyConflict, InvalidArgument, Message, ReadOnlyStore, StoreClosed, SyncStoreError
from syncstore._fileio import FileSystem
from syncstore.aio import AsyncConsumer, AsyncStore
from syncstore.store import Store

#: Store members that stay properties on AsyncStore (no I/O in a writable store) rather than coroutines.
PROPERTIES = {"epoch", "lsn"}
#: Store methods whose twins return async iterators (``async for``) instead of being coroutines.
ASYNC_ITERATORS = {"changes", "feed"}


def run(coro):
    return asyncio.run(coro)


class HeldFS(FileSystem):
    """Holds WAL writes (``pwrite``) while ``hold`` is set, and tells an event loop when one arrives."""

    def __init__(self) -> None:
        self.open_gate = threading.Event()
        self.open_gate.set()
        self.arrived: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None

    def hold(self) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        self.arrived = (loop, loop.create_future())
        self.open_gate.clear()
        return self.arrived[1]

    def release(self) -> None:
        self.open_gate.set()

    def pwrite(self, fd, data, offset):
        if not self.open_gate.is_set() and self.arrived is not None:
            loop, future = self.arrived
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))
            self.open_gate.wait()
        super().pwrite(fd, data, offset)


def public_members(cls) -> dict[str, object]:
    return {name: inspect.getattr_static(cls, name) for name in dir(cls) if not name.startswith("_")}


# --- the surface ------------------------------------------------------------------------------------


def test_every_public_store_method_has_a_coroutine_twin():
    twins = public_members(AsyncStore)
    missing = []
    for name, member in public_members(Store).items():
        twin = twins.get(name)
        if isinstance(member, property):
            ok = name in PROPERTIES and isinstance(twin, property)
        elif name in ASYNC_ITERATORS:
            ok = callable(twin) and not inspect.iscoroutinefunction(twin)
        else:
            ok = inspect.iscoroutinefunction(twin)
        if not ok:
            missing.append(name)
    assert missing == [], f"Store methods without an AsyncStore twin: {missing}"
    assert inspect.iscoroutinefunction(AsyncStore.close) and inspect.iscoroutinefunction(AsyncStore.__aexit__)


def test_twins_carry_the_store_docs():
    assert "Store.sync" in AsyncStore.sync.__doc__ and "limit" in AsyncStore.sync.__doc__
    assert AsyncStore.history.__name__ == "history"


# --- agreement with the threaded API --------------------------------------------------------------------


def _operations(seed: int, count: int) -> list[tuple]:
    """A random mix of deliveries, retries (same content) and reused keys (other content), reads in between."""
    rng = random.Random(seed)
    ops: list[tuple] = []
    sent: list[tuple] = []
    for seq in range(1, count + 1):
        roll = rng.random()
        if sent and roll < 0.15:
            ops.append(("deliver", *rng.choice(sent)))  # a retry: duplicate
        elif sent and roll < 0.2:
            sender, conv, client_seq, body, to = rng.choice(sent)
            ops.append(("deliver", sender, conv, client_seq, body + b"!", to))  # reused key: conflict
        else:
            sender = rng.randrange(6)
            to = tuple(rng.sample(range(6), rng.randint(1, 3)))
            item = (sender, rng.randrange(3), seq, rng.randbytes(rng.randrange(40)), to)
            sent.append(item)
            ops.append(("deliver", *item))
        if rng.random() < 0.3:
            ops.append(("sync", rng.randrange(6), rng.randrange(5), rng.randint(1, 4)))
        if rng.random() < 0.2:
            ops.append(("history", rng.randrange(6), rng.randrange(3), rng.choice([None, 3, 8]), rng.randint(1, 5)))
    return ops


def _outcome(call):
    try:
        result = call()
    except SyncStoreError as error:
        return ("error", type(error).__name__)
    return ("ok", result)


def _fields(m: syncstore.StoredMessage) -> tuple:
    return (m.cursor, m.sender, m.conv, m.client_seq, m.priority, m.body)


def _normal(result):
    """Make results of the two stores comparable (msg_ids and their timestamps differ between stores: left out)."""
    if isinstance(result, syncstore.Delivery):
        return (result.duplicate, dict(result.cursors))
    if isinstance(result, syncstore.Page):
        return ([_fields(m) for m in result.messages], result.next, result.has_more, result.reset)
    if isinstance(result, syncstore.HistoryPage):
        return ([_fields(m) for m in result.messages], result.before, result.has_more)
    return result


@settings(max_examples=6)
@given(st.integers(0, 2**32))
def test_same_answers_as_the_threaded_api(seed):
    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix="syncstore-aio-"))
    try:
        _compare_apis(tmp_path, _operations(seed, 150))
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _compare_apis(tmp_path, ops):
    with syncstore.open(str(tmp_path / "threaded")) as threaded:
        expected = []
        for op in ops:
            if op[0] == "deliver":
                _kind, sender, conv, seq, body, to = op
                expected.append(_outcome(lambda: threaded.deliver(Message(sender, conv, seq, body), to)))
            elif op[0] == "sync":
                expected.append(_outcome(lambda: threaded.sync(op[1], since=op[2], limit=op[3])))
            else:
                expected.append(_outcome(lambda: threaded.history(op[1], op[2], before=op[3], limit=op[4])))
        expected_heads = [threaded.head(uid) for uid in range(6)]
        expected_changes = [(c.kind, dict(c.data.cursors), c.data.message.body) for c in threaded.changes()]

    async def main():
        got = []
        async with await syncstore.aio.open(str(tmp_path / "async")) as store:
            for op in ops:
                try:
                    if op[0] == "deliver":
                        _kind, sender, conv, seq, body, to = op
                        got.append(("ok", await store.deliver(Message(sender, conv, seq, body), to)))
                    elif op[0] == "sync":
                        got.append(("ok", await store.sync(op[1], since=op[2], limit=op[3])))
                    else:
                        got.append(("ok", await store.history(op[1], op[2], before=op[3], limit=op[4])))
                except SyncStoreError as error:
                    got.append(("error", type(error).__name__))
            heads = [await store.head(uid) for uid in range(6)]
            changes = [(c.kind, dict(c.data.cursors), c.data.message.body) async for c in store.changes()]
            assert (await store.check())["pending"] >= 0
        return got, heads, changes

    got, heads, changes = run(main())
    assert [(kind, _normal(r)) for kind, r in got] == [(kind, _normal(r)) for kind, r in expected]
    assert heads == expected_heads
    assert changes == expected_changes


def test_concurrent_deliveries_each_get_their_own_answer(store_path):
    """2,000 coroutines at once: new keys, retries of one key racing each other, and one conflict per key."""

    async def main():
        async with await syncstore.aio.open(store_path) as store:
            calls = []
            for seq in range(1, 501):
                message = Message(seq % 7, 1, seq, b"m%d" % seq)
                calls += [store.deliver(message, [1, 2]), store.deliver(message, [2, 1])]  # the same delivery twice
                calls.append(store.deliver(Message(seq % 7, 1, seq, b"other"), [1, 2]))  # same key, other body
                calls.append(store.deliver(Message(100, 1, seq, b"n"), [3]))
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert await store.head(1) == await store.head(2) == 500
            assert await store.head(3) == 500
            page = await store.sync(1, limit=10_000)
        return results, page

    results, page = run(main())
    for index in range(500):
        first, second, conflict, solo = results[4 * index : 4 * index + 4]
        assert isinstance(first, syncstore.Delivery) and isinstance(second, syncstore.Delivery)
        assert first.msg_id == second.msg_id and first.cursors == second.cursors
        assert (first.duplicate, second.duplicate) == (False, True)
        assert isinstance(conflict, IdempotencyConflict) and conflict.msg_id == first.msg_id
        assert isinstance(solo, syncstore.Delivery) and not solo.duplicate
    assert [m.cursor for m in page.messages] == list(range(1, 501))
    assert [m.body for m in page.messages] == [b"m%d" % seq for seq in range(1, 501)]


def test_bad_input_raises_at_the_call_and_writes_nothing(store_path):
    async def main():
        async with await syncstore.aio.open(store_path) as store:
            with pytest.raises(InvalidArgument):
                await store.deliver("not a message", [1])  # type: ignore[arg-type]
            with pytest.raises(InvalidArgument):
                await store.deliver(Message(1, 1, 1, b"x"), [])
            with pytest.raises(InvalidArgument):
                await store.sync(-1)
            with pytest.raises(InvalidArgument):
                store.changes(since=-1)  # checked at the call, before any iteration
            with pytest.raises(InvalidArgument):
                store.changes(timeout=1)  # timeout without follow
            with pytest.raises(InvalidArgument):
                await store.wait(1, -5)
            with pytest.raises(InvalidArgument):
                store.feed(follow="yes")  # type: ignore[arg-type]
            assert store.lsn == 0

    run(main())


def test_follower_and_view_refuse_deliveries(tmp_path):
    async def main():
        async with await syncstore.aio.open(str(tmp_path / "f"), follower=True) as follower:
            with pytest.raises(ReadOnlyStore):
                await follower.deliver(Message(1, 1, 1, b"x"), [1])
        async with await syncstore.aio.open(str(tmp_path / "f"), readonly=True) as view:
            with pytest.raises(ReadOnlyStore):
                await view.deliver(Message(1, 1, 1, b"x"), [1])
            assert await view.head(1) == 0

    run(main())


def test_an_async_store_belongs_to_its_loop(store_path):
    async def opened():
        return await syncstore.aio.open(store_path)

    loop = asyncio.new_event_loop()
    try:
        store = loop.run_until_complete(opened())
        with pytest.raises(SyncStoreError, match="another event loop"):
            run(store.head(1))
        loop.run_until_complete(store.close())
    finally:
        loop.close()


# --- no thread per call, nothing blocking on the loop -------------------------------------------------


def test_ten_thousand_pending_deliveries_use_no_more_threads(store_path):
    fs = HeldFS()

    async def main():
        async with await syncstore.aio.open(store_path, fs=fs) as store:
            await store.deliver(Message(1, 1, 1, b"warm"), [1])
            threads = threading.active_count()
            arrived = fs.hold()
            tasks = [asyncio.ensure_future(store.deliver(Message(2, 1, seq, b"x"), [seq % 50, 50])) for seq in range(1, 10_001)]
            await arrived  # the flusher is inside its write: every delivery is sequenced and pending
            assert threading.active_count() == threads
            assert len(store.store._writer._waiters) == 10_000
            assert not any(task.done() for task in tasks)
            fs.release()
            results = await asyncio.gather(*tasks)
            assert threading.active_count() == threads
            assert sorted(r.cursors[50] for r in results) == list(range(1, 10_001))
            assert await store.head(50) == 10_000

    run(main())


def test_a_busy_sequencing_lock_never_blocks_the_loop(store_path):
    """Another thread holds the writer's lock: the batch goes to the worker, and the loop keeps running."""

    async def main():
        async with await syncstore.aio.open(store_path) as store:
            writer = store.store._writer
            writer.lock.acquire()  # as a long check() or promote() would hold it
            try:
                task = asyncio.ensure_future(store.deliver(Message(1, 1, 1, b"x"), [1]))
                for _ in range(5):  # the loop goes round: nothing on it waits for the lock
                    await asyncio.sleep(0)
                assert not task.done()
            finally:
                writer.lock.release()
            delivery = await task
            assert delivery.cursors == {1: 1}
            # Later deliveries go back to the loop's own sequencing.
            assert (await store.deliver(Message(1, 1, 2, b"y"), [1])).cursors == {1: 2}

    run(main())


def test_a_closed_lmdb_gate_never_blocks_the_loop(store_path):
    async def main():
        async with await syncstore.aio.open(store_path) as store:
            gate = store.store._state.gate
            gate._lock.acquire()  # as during a map resize
            try:
                task = asyncio.ensure_future(store.deliver(Message(1, 1, 1, b"x"), [1]))
                for _ in range(5):
                    await asyncio.sleep(0)
                assert not task.done()
            finally:
                gate._lock.release()
            assert (await task).cursors == {1: 1}

    run(main())


def test_back_pressure_is_waited_out_in_the_worker(store_path, monkeypatch):
    import syncstore._writer as writer_module

    monkeypatch.setattr(writer_module, "_MAX_PENDING", 10)

    async def main():
        async with await syncstore.aio.open(store_path) as store:
            results = await asyncio.gather(*(store.deliver(Message(1, 1, seq, b"x"), [seq % 3]) for seq in range(1, 201)))
            assert sorted(r.cursors[seq % 3] for seq, r in zip(range(1, 201), results)) == sorted(
                cursor for user in range(3) for cursor in range(1, 1 + sum(1 for s in range(1, 201) if s % 3 == user))
            )

    run(main())


# --- waiting --------------------------------------------------------------------------------------------


def test_wait_wakes_on_the_users_write_and_times_out_otherwise(store_path):
    async def main():
        async with await syncstore.aio.open(store_path) as store:
            waiting = asyncio.ensure_future(store.wait(9, 0))
            other = asyncio.ensure_future(store.wait(8, 0, timeout=0.01))
            await store.deliver(Message(1, 1, 1, b"for 7"), [7])
            assert not waiting.done()
            await store.deliver(Message(1, 1, 2, b"for 9"), [9])
            assert await waiting is True
            assert await other is False
            assert await store.wait(9, 0, timeout=0) is True  # already there
            watchers = store.store._writer.watchers
            assert not watchers.active  # every waiter unregistered

    run(main())


def test_follow_yields_new_changes_without_polling(store_path):
    async def main():
        async with await syncstore.aio.open(store_path) as store:
            got = []

            async def tail():
                async for change in store.changes(since=0, follow=True, limit=30):
                    got.append(change.lsn)

            task = asyncio.ensure_future(tail())
            for seq in range(1, 31):
                await store.deliver(Message(1, 1, seq, b"x"), [1])
            await task
            assert got == list(range(1, 31))
            timed = [c.lsn async for c in store.changes(since=30, follow=True, timeout=0.01)]
            assert timed == []

    run(main())


def test_feed_and_consumers(tmp_path):
    async def main():
        async with await syncstore.aio.open(str(tmp_path / "leader")) as leader, await syncstore.aio.open(str(tmp_path / "follower"), follower=True) as follower:
            for seq in range(1, 11):
                await leader.deliver(Message(1, 1, seq, b"x%d" % seq), [1, 2])
            consumer = await leader.consumer("mirror", start=0)
            assert isinstance(consumer, AsyncConsumer) and consumer.lag == 10
            seen = [change async for change in consumer.changes()]
            assert [c.lsn for c in seen] == list(range(1, 11))
            await consumer.ack(10)
            assert consumer.position == 10 and [s.name for s in await leader.consumers()] == ["mirror"]
            applied = 0
            async for event in leader.feed(since=0):
                applied += await follower.apply(event)
            assert applied == 10 and follower.lsn == 10
            assert (await follower.sync(2)).messages == (await leader.sync(2)).messages
            followed = []
            await leader.deliver(Message(1, 1, 100, b"late"), [2])
            async for event in leader.feed(since=10, follow=True):
                followed.append(event.lsn)
                if len(followed) == 2:
                    break
                await leader.deliver(Message(1, 1, 101, b"later"), [2])  # while the feed follows
            assert followed == [11, 12]
            assert await leader.drop_consumer("mirror") is True

    run(main())


# --- cancellation and close -------------------------------------------------------------------------------


def test_cancelling_waiters_leaks_nothing(store_path):
    async def main():
        async with await syncstore.aio.open(store_path) as store:
            threads = threading.active_count()
            watchers = store.store._writer.watchers

            async def tail():
                async for _change in store.changes(follow=True):
                    pass

            tasks = [asyncio.ensure_future(store.wait(uid, 0)) for uid in range(100)] + [asyncio.ensure_future(tail()) for _ in range(5)]
            await asyncio.sleep(0)  # one pass of the loop: each task registers at its first step
            assert watchers.wait_registered(105, timeout=0)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert not watchers.active and watchers._users == {} and watchers._tails == []
            assert threading.active_count() == threads
            # and the store still works, wakes still reach new waiters
            waiting = asyncio.ensure_future(store.wait(3, 0))
            await store.deliver(Message(1, 1, 1, b"x"), [3])
            assert await waiting

    run(main())


def test_cancelled_deliveries_lose_no_write(store_path):
    fs = HeldFS()

    async def main():
        async with await syncstore.aio.open(store_path, fs=fs) as store:
            # Cancelled before its batch was sequenced: nothing written.
            early = asyncio.ensure_future(store.deliver(Message(1, 1, 1, b"never"), [5]))
            early.cancel()
            # Cancelled while waiting for its acknowledgement: written all the same.
            arrived = fs.hold()
            late = asyncio.ensure_future(store.deliver(Message(1, 1, 2, b"kept"), [5]))
            await arrived
            late.cancel()
            fs.release()
            for task in (early, late):
                with pytest.raises(asyncio.CancelledError):
                    await task
            await store.flush()
            page = await store.sync(5)
            assert [m.body for m in page.messages] == [b"kept"]
            retry = await store.deliver(Message(1, 1, 2, b"kept"), [5])
            assert retry.duplicate and retry.cursors == {5: 1}
            assert not store.store._writer._waiters

    run(main())


def test_close_fails_pending_calls_cleanly_and_loses_nothing_acknowledged(store_path):
    fs = HeldFS()

    async def main():
        store = await syncstore.aio.open(store_path, fs=fs)
        arrived = fs.hold()
        sequenced = [asyncio.ensure_future(store.deliver(Message(1, 1, seq, b"s%d" % seq), [7])) for seq in range(1, 51)]
        await arrived  # these 50 are sequenced, their write held
        waiting = asyncio.ensure_future(store.wait(99, 0))
        follow = asyncio.ensure_future(_drain(store.changes(since=0, follow=True)))
        queued = [asyncio.ensure_future(store.deliver(Message(1, 1, seq, b"q"), [7])) for seq in range(100, 110)]
        closing = asyncio.ensure_future(store.close())
        await asyncio.sleep(0)  # one pass: the queued deliveries queue, then close() refuses them before their batch is sequenced
        with pytest.raises(StoreClosed):
            await store.deliver(Message(1, 1, 500, b"after"), [7])
        with pytest.raises(StoreClosed):
            await store.head(7)
        fs.release()
        await closing
        results = await asyncio.gather(*sequenced, *queued, return_exceptions=True)
        acknowledged = [r for r in results if isinstance(r, syncstore.Delivery)]
        refused = [r for r in results if isinstance(r, StoreClosed)]
        assert len(acknowledged) == 50 and len(refused) == 10, results
        assert all(isinstance(r, syncstore.Delivery) for r in results[:50])  # sequenced before close: acknowledged
        assert await waiting is False
        await follow  # the follow ended
        await store.close()  # idempotent
        return [r.cursors[7] for r in acknowledged]

    cursors = run(main())
    with syncstore.open(store_path) as reopened:  # nothing acknowledged is lost, nothing refused was written
        page = reopened.sync(7, limit=1000)
        assert [m.cursor for m in page.messages] == sorted(cursors) == list(range(1, len(cursors) + 1))
        assert all(m.body != b"after" for m in page.messages)


async def _drain(iterator) -> list:
    return [item async for item in iterator]


def test_open_errors_and_worker_threads_go_away(tmp_path):
    async def main():
        before = threading.active_count()
        store = await syncstore.aio.open(str(tmp_path / "s"))
        with pytest.raises(syncstore.StoreLocked):
            await syncstore.aio.open(str(tmp_path / "s"))
        with pytest.raises(InvalidArgument):
            await syncstore.aio.open(str(tmp_path / "t"), durability="sometimes")
        await store.close()
        assert threading.active_count() == before
        with pytest.raises(StoreClosed):
            await store.sync(1)
        assert isinstance(store, AsyncStore)

    run(main())


def test_cancelling_open_leaves_the_store_closed(store_path):
    async def main():
        before = threading.active_count()
        task = asyncio.ensure_future(syncstore.aio.open(store_path))
        await asyncio.sleep(0)  # one pass: the opening is handed to the worker
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert threading.active_count() == before  # the worker and the store's threads are gone
        with syncstore.open(store_path) as store:  # not left open (and locked) in this process
            assert store.lsn == 0

    run(main())


@pytest.mark.parametrize("durability", ["interval", "none"])
def test_timer_durability_modes(store_path, durability):
    """Acknowledged when written; visible (and durable) at the syncer's timer or at flush -- never synced on the loop."""

    async def main():
        async with await syncstore.aio.open(store_path, durability=durability) as store:
            results = await asyncio.gather(*(store.deliver(Message(1, 1, seq, b"x"), [4]) for seq in range(1, 101)))
            assert sorted(r.cursors[4] for r in results) == list(range(1, 101))
            await store.flush()
            assert await store.head(4) == 100 and store.lsn == 100

    run(main())
