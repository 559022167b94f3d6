"""A real full disk (a size-limited tmpfs) and a full LMDB map.

The disk tests mount tmpfs file systems, so they need root; without it (or if
``mount`` fails) they are skipped with the reason.  Each fills the disk with
ordinary deliveries until a write fails and then requires what docs/errors.md
promises: the failing write raises ``StoreFull``, later writes re-probe and are
refused while the disk is still full, reads on the open store still return
every acknowledged message, and once space is freed the *open* store accepts
writes again by itself -- no reopen -- with nothing lost and ``check()`` clean;
a reopen afterwards finds everything too.

Three places can run out of space first, and each has its own test so that the
outcome does not depend on timing:

* the whole store on one small file system (whichever of WAL and LMDB is first);
* only the WAL directory, sized so that the first rotation's
  ``posix_fallocate`` of the next segment fails (and a big group write whose
  ``pwrite`` runs past the free space);
* only the LMDB directory (``state/``), so the background applier's commit
  fails.

The map tests need no mount: a store opened with the smallest map
(``map_size=1 << 20``) must grow it on its own, and with growth capped
(``max_map_size``) fail with ``StoreFull`` telling to raise the map size,
without losing anything acknowledged.
"""

from __future__ import annotations

import os
import random
import subprocess

import pytest

import syncstore
from syncstore import Message, StoreFull, SyncStoreError

MiB = 1 << 20
MAX_WRITES = 200_000  # a disk that never fills within this many deliveries fails the test


# --- mounting ---------------------------------------------------------------------------


@pytest.fixture
def tmpfs():
    """``mount(directory, size)`` mounts a size-limited tmpfs there; all are unmounted at teardown."""
    mounted: list[str] = []

    def mount(directory: str, size: str) -> str:
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a size-limited tmpfs: not running as root")
        os.makedirs(directory, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "syncstore-test", directory],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"needs root to mount a size-limited tmpfs: mount failed: {done.stderr.strip()}")
        mounted.append(directory)
        return directory

    yield mount
    for directory in reversed(mounted):
        if subprocess.run(["umount", directory], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", directory], capture_output=True, check=False)  # still busy: detach


def remount(directory: str, size: str) -> None:
    """Grow (or shrink) a mounted tmpfs in place."""
    subprocess.run(["mount", "-o", f"remount,size={size}", directory], check=True, capture_output=True)


def write_ballast(path: str, size: int) -> None:
    """A file occupying ``size`` bytes, deleted later to free space."""
    with open(path, "wb") as f:
        f.write(b"\xa5" * size)
        f.flush()
        os.fsync(f.fileno())


# --- workload and verification ----------------------------------------------------------

Acked = dict[tuple[int, int], tuple[syncstore.Delivery, bytes]]


def fill(store: syncstore.Store, rng: random.Random, acked: Acked, sender: int) -> SyncStoreError:
    """Deliver 1:1 and group messages (bodies of a few KB), single and batched, until a write fails."""
    seq = 0
    for _ in range(MAX_WRITES):
        try:
            if rng.random() < 0.2:
                batch = []
                for _ in range(rng.randrange(2, 20)):
                    seq += 1
                    batch.append((Message(sender, seq % 7, seq, rng.randbytes(rng.randrange(1000, 6000))), rng.sample(range(1, 9), rng.choice((1, 2, 4)))))
                for (message, _to), delivery in zip(batch, store.deliver_many(batch)):
                    acked[(sender, message.client_seq)] = (delivery, message.body)
            else:
                seq += 1
                message = Message(sender, seq % 7, seq, rng.randbytes(rng.randrange(1000, 6000)))
                acked[(sender, seq)] = (store.deliver(message, to=rng.sample(range(1, 9), rng.choice((1, 2, 3)))), message.body)
        except SyncStoreError as error:
            return error
    pytest.fail(f"the disk never filled in {MAX_WRITES} deliveries")


def assert_all_present(store: syncstore.Store, acked: Acked) -> None:
    """Every acknowledged message is at its acknowledged cursor of every recipient, unchanged."""
    heads: dict[int, int] = {}
    for (sender, seq), (delivery, body) in acked.items():
        assert not delivery.duplicate
        for uid, cursor in delivery.cursors.items():
            page = store.sync(uid, since=cursor - 1, limit=1)
            assert page.messages, f"acknowledged ({sender}, {seq}) missing for user {uid} at cursor {cursor}"
            stored = page.messages[0]
            assert (stored.cursor, stored.msg_id, stored.sender, stored.client_seq, stored.body) == (cursor, delivery.msg_id, sender, seq, body)
            heads[uid] = max(heads.get(uid, 0), cursor)
    for uid, cursor in heads.items():
        assert store.head(uid) >= cursor


def assert_still_full(store: syncstore.Store, acked: Acked, *, reopen_hint: bool = False) -> None:
    """While the disk is full, writes that need space are refused, single or batched, with a hint that fits.

    The bodies are near the 1 MiB limit, so each needs room of its own; what
    still fits (a little space can come back, e.g. LMDB's aborted transaction)
    is accepted and must be kept, but within a few writes the disk is full again.
    """
    big = b"\xee" * 1_048_000
    for attempt in range(32):
        for batch in (False, True):
            try:
                if batch:
                    items = [(Message(999, 1, 1000 + 2 * attempt + i, big), [1]) for i in range(2)]
                    for (message, _to), delivery in zip(items, store.deliver_many(items)):
                        acked[(999, message.client_seq)] = (delivery, message.body)
                else:
                    acked[(999, attempt + 1)] = (store.deliver(Message(999, 1, attempt + 1, big), to=[1]), big)
            except StoreFull as refused:
                assert not isinstance(refused, syncstore.DurabilityError), "a full disk does not break the store"
                assert ("reopen" in str(refused)) == reopen_hint, str(refused)
                return
    pytest.fail("writes of 1 MB kept succeeding on a full disk")


def assert_heals(store: syncstore.Store, acked: Acked, sender: int) -> None:
    """Space is back: 20 more deliveries succeed on the open store, nothing is lost, check() is clean."""
    for seq in range(1, 21):
        message = Message(sender, 3, seq, os.urandom(2000))
        acked[(sender, seq)] = (store.deliver(message, to=[1, 2]), message.body)
    store.flush()
    assert_all_present(store, acked)
    store.check()


def assert_recovers(path: str, acked: Acked, **options: object) -> None:
    """Reopen: nothing acknowledged is lost, retries are duplicates, writes resume and survive a reopen."""
    with syncstore.open(path, **options) as store:
        store.check()
        assert_all_present(store, acked)
        for (sender, seq), (delivery, body) in list(acked.items())[-20:]:
            uid, cursor = next(iter(delivery.cursors.items()))
            conv = store.sync(uid, cursor - 1, 1).messages[0].conv  # a retry repeats the content (issue 7)
            retry = store.deliver(Message(sender, conv, seq, body), to=list(delivery.cursors))
            assert retry.duplicate and retry.msg_id == delivery.msg_id
        more: Acked = {}
        for seq in range(1, 201):
            message = Message(1000, 1, seq, os.urandom(2000))
            more[(1000, seq)] = (store.deliver(message, to=[1, 2]), message.body)
        store.check()
    with syncstore.open(path, **options) as store:
        store.check()
        assert_all_present(store, {**acked, **more})


# --- a real full disk -------------------------------------------------------------------


def test_whole_store_on_a_full_disk(tmp_path, tmpfs):
    mount = tmpfs(str(tmp_path / "disk"), "32m")
    path = os.path.join(mount, "store")
    ballast = os.path.join(mount, "ballast")
    write_ballast(ballast, 4 * MiB)
    acked: Acked = {}
    store = syncstore.open(path, segment_bytes=MiB)
    try:
        failure = fill(store, random.Random(1), acked, sender=1)
        assert isinstance(failure, StoreFull), f"a write on a full disk raised {type(failure).__name__}, not StoreFull: {failure}"
        assert len(acked) > 100  # the disk really took writes before it filled
        assert_still_full(store, acked)
        assert_all_present(store, acked)  # reads keep working on the open store
        os.unlink(ballast)
        remount(mount, "128m")
        assert_heals(store, acked, sender=101)
    finally:
        store.close()
    assert_recovers(path, acked, segment_bytes=MiB)


def test_full_wal_disk_fails_at_segment_preallocation_and_recovers_when_space_is_freed(tmp_path, tmpfs):
    path = str(tmp_path / "store")
    # Room for one 1 MiB segment plus the ballast: the first rotation's posix_fallocate fails.
    wal = tmpfs(os.path.join(path, "wal"), "2560k")
    # In the volume's lost+found, which recovery ignores (any other stray file in wal/ is refused, issue 7).
    os.makedirs(os.path.join(wal, "lost+found"), exist_ok=True)
    ballast = os.path.join(wal, "lost+found", "ballast")
    write_ballast(ballast, MiB)
    acked: Acked = {}
    store = syncstore.open(path, segment_bytes=MiB)
    try:
        failure = fill(store, random.Random(2), acked, sender=2)
        assert isinstance(failure, StoreFull), f"{type(failure).__name__}: {failure}"
        assert "disk full" in str(failure) and "No space left" in str(failure)
        segments = sorted(n for n in os.listdir(wal) if n.startswith("wal-"))
        assert len(segments) == 1, f"the half-made segment was left behind: {segments}"
        assert_still_full(store, acked)
        assert_all_present(store, acked)
        os.unlink(ballast)  # free space; the mount stays as small as it was
        assert_heals(store, acked, sender=102)
    finally:
        store.close()
    assert_recovers(path, acked, segment_bytes=MiB)


def test_group_write_past_the_free_space_raises_store_full(tmp_path, tmpfs):
    path = str(tmp_path / "store")
    wal = tmpfs(os.path.join(path, "wal"), "1536k")
    store = syncstore.open(path, segment_bytes=MiB)
    try:
        acked: Acked = {}
        for seq in range(1, 11):
            message = Message(3, 1, seq, os.urandom(3000))
            acked[(3, seq)] = (store.deliver(message, to=[1, 2]), message.body)
        # One group of ~1.8 MB: written into the current segment in one pwrite, past the free space.
        batch = [(Message(3, 2, seq, os.urandom(3000)), [3]) for seq in range(11, 611)]
        with pytest.raises(StoreFull):
            store.deliver_many(batch)
        assert_still_full(store, acked)
        assert_all_present(store, acked)
        assert store.head(3) == 0  # nothing of the failed group is visible
        remount(wal, "16m")
        retried = store.deliver_many(batch)  # the refused batch took nothing: it is new, from cursor 1
        assert [d.cursors for d in retried] == [{3: c} for c in range(1, 601)] and not any(d.duplicate for d in retried)
        for (message, _to), delivery in zip(batch, retried):
            acked[(3, message.client_seq)] = (delivery, message.body)
        assert_heals(store, acked, sender=103)
    finally:
        store.close()
    assert_recovers(path, acked, segment_bytes=MiB)


def test_full_lmdb_disk_fails_in_the_applier_as_store_full(tmp_path, tmpfs):
    path = str(tmp_path / "store")
    tmpfs(os.path.join(path, "state"), "2m")
    acked: Acked = {}
    store = syncstore.open(path, segment_bytes=MiB)
    try:
        failure = fill(store, random.Random(3), acked, sender=4)
        assert isinstance(failure, StoreFull), f"LMDB on a full disk made the write raise {type(failure).__name__}, not StoreFull: {failure}"
        assert_still_full(store, acked)
        assert_all_present(store, acked)  # the unapplied records are still served from memory
        remount(os.path.join(path, "state"), "256m")  # room for up to a second of writes the applier holds
        assert_heals(store, acked, sender=104)
    finally:
        store.close()
    assert_recovers(path, acked, segment_bytes=MiB)


# --- a full LMDB map --------------------------------------------------------------------


def deliver_batches(store: syncstore.Store, acked: Acked, sender: int, count: int, body_size: int) -> None:
    """``count`` messages to two recipients each, in batches of 50, recorded in ``acked``."""
    rng = random.Random(sender)
    for start in range(0, count, 50):
        batch = [(Message(sender, 1, seq, rng.randbytes(body_size)), [seq % 5 + 1, 6]) for seq in range(start + 1, min(start + 51, count + 1))]
        for (message, _to), delivery in zip(batch, store.deliver_many(batch)):
            acked[(sender, message.client_seq)] = (delivery, message.body)


def test_small_map_grows_on_its_own(store_path):
    acked: Acked = {}
    with syncstore.open(store_path, map_size=MiB) as store:
        deliver_batches(store, acked, sender=5, count=4000, body_size=1000)  # ~4 MB of messages (each stored once)
        store._writer.apply_pending()  # what the applier does within a second anyway
        store.check()
        assert store._state.env.info()["map_size"] > MiB
        assert_all_present(store, acked)
    with syncstore.open(store_path, map_size=MiB) as store:  # the grown file opens with the small setting too
        store.check()
        assert_all_present(store, acked)


def test_capped_map_raises_store_full_and_a_larger_map_recovers_everything(store_path):
    acked: Acked = {}
    store = syncstore.open(store_path, map_size=MiB, max_map_size=2 * MiB)
    try:
        rng = random.Random(6)
        failure = None
        for seq in range(1, 20_000):
            message = Message(6, 1, seq, rng.randbytes(1000))
            try:
                acked[(6, seq)] = (store.deliver(message, to=[1, 2]), message.body)
            except SyncStoreError as error:
                failure = error
                break
        assert isinstance(failure, StoreFull), f"{type(failure).__name__}: {failure}"
        assert "map_size" in str(failure)
        assert store._state.env.info()["map_size"] <= 2 * MiB
        assert_still_full(store, acked, reopen_hint=True)  # a capped map stays full until reopened with a larger one
        assert_all_present(store, acked)
    finally:
        store.close()
    assert_recovers(store_path, acked, map_size=64 * MiB)
