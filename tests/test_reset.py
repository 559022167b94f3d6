"""Issue 7, section 10: a cursor from the future, or from another history, gets an explicit answer.

A store restored from an older copy rewinds users' heads under clients that
hold later cursors; with new messages arriving, those cursors are reused for
other messages.  ``sync`` never answers such a position with a silent empty
page: ``since > head(user)`` is a reset page ("ahead"), and an epoch that is
not the store's is a reset page ("epoch").  A restore changes the epoch
(``syncstore._layout.renew_epoch``).  Written against ``head()`` as the
public contract.
"""

from __future__ import annotations

import os
import shutil

import pytest

import syncstore
from syncstore import InvalidArgument, Message, StoreLocked
from syncstore._layout import MARKER, MARKER_TEMP, decode_marker, renew_epoch
from syncstore.model import RESET_AHEAD, RESET_EPOCH

from _tree import read_bytes

USER = 9


def deliver(store: syncstore.Store, seq: int, body: bytes | None = None) -> int:
    return store.deliver(Message(sender=1, conv=1, client_seq=seq, body=body or b"m%d" % seq), to=[USER]).cursors[USER]


def assert_reset(page: syncstore.Page, reason: str, epoch: int, has_more: bool) -> None:
    assert page.reset is True and page.reset_reason == reason
    assert len(page.messages) == 0 and page.next == 0
    assert page.has_more is has_more
    assert page.epoch == epoch


def test_pages_carry_the_store_epoch(tmp_path):
    path = str(tmp_path / "s")
    with syncstore.open(path) as store:
        deliver(store, 1)
        page = store.sync(USER, 0)
        assert page.epoch == store.epoch != 0
        assert page.reset is False and page.reset_reason is None
        assert store.sync(USER, 0, epoch=store.epoch).messages == page.messages
        epoch = store.epoch
    with syncstore.open(path, readonly=True) as view:
        assert view.epoch == epoch and view.sync(USER, 0).epoch == epoch


def test_since_beyond_the_head_is_a_reset_page(tmp_path):
    with syncstore.open(str(tmp_path / "s")) as store:
        for seq in range(1, 4):
            deliver(store, seq)
        assert store.head(USER) == 3
        assert store.sync(USER, 3).reset is False  # at the head: simply nothing new
        assert_reset(store.sync(USER, 4), RESET_AHEAD, store.epoch, True)
        assert_reset(store.sync(USER, 2**64 - 1), RESET_AHEAD, store.epoch, True)
        assert_reset(store.sync(77, 1), RESET_AHEAD, store.epoch, False)  # a user with no messages at all
        assert store.sync(77, 0).reset is False


def test_reset_holds_for_records_not_yet_applied_to_lmdb(tmp_path):
    """The head includes what the writer acknowledged and has not applied yet: no false reset."""
    with syncstore.open(str(tmp_path / "s")) as store:
        for seq in range(1, 50):
            deliver(store, seq)
            head = store.head(USER)
            assert store.sync(USER, head).reset is False
            assert store.sync(USER, head + 1).reset is True


def test_another_epoch_is_a_reset_page_and_none_skips_the_check(tmp_path):
    with syncstore.open(str(tmp_path / "s")) as store:
        deliver(store, 1)
        other = store.epoch ^ 1
        assert_reset(store.sync(USER, 0, epoch=other), RESET_EPOCH, store.epoch, True)
        assert_reset(store.sync(USER, 1, epoch=other), RESET_EPOCH, store.epoch, True)
        assert [m.cursor for m in store.sync(USER, 0, epoch=None).messages] == [1]


@pytest.mark.parametrize("epoch", [-1, 2**64, 1.0, "1", True])
def test_epoch_must_be_a_u64(tmp_path, epoch):
    with syncstore.open(str(tmp_path / "s")) as store:
        with pytest.raises(InvalidArgument) as info:
            store.sync(USER, 0, epoch=epoch)
        assert info.value.key == "epoch"


def test_restore_from_an_older_copy(tmp_path):
    """The issue's case: a restore takes user 9 back to head 3 while a client holds cursor 5."""
    path, backup = str(tmp_path / "s"), str(tmp_path / "backup")
    with syncstore.open(path) as store:
        for seq in range(1, 4):
            deliver(store, seq)
    shutil.copytree(path, backup)  # the older copy: head 3
    with syncstore.open(path) as store:
        for seq in range(4, 6):
            deliver(store, seq)
        page = store.sync(USER, 0)
        client = (page.epoch, page.next)  # what a client keeps
        assert client[1] == 5
    # Restore the older copy; the restore gives it a new epoch.
    shutil.rmtree(path)
    shutil.copytree(backup, path)
    new_epoch = renew_epoch(path)
    assert new_epoch != client[0]
    with syncstore.open(path) as store:
        assert store.epoch == new_epoch and store.head(USER) == 3
        # Before anything new arrives the cursor is simply ahead of the head ...
        assert_reset(store.sync(USER, client[1]), RESET_AHEAD, new_epoch, True)
        # ... and once cursors 4 and 5 are reused, only the epoch tells the client.
        deliver(store, 104, b"new 4")
        deliver(store, 105, b"new 5")
        assert store.head(USER) == 5
        page = store.sync(USER, client[1], epoch=client[0])
        assert_reset(page, RESET_EPOCH, new_epoch, True)
        # The client follows the protocol: discard, resync from `next`, keep the new epoch.
        resynced = store.sync(USER, page.next, epoch=page.epoch)
        assert [m.body for m in resynced.messages] == [b"m1", b"m2", b"m3", b"new 4", b"new 5"]
        assert resynced.reset is False and resynced.epoch == new_epoch


def test_renew_epoch_refuses_an_open_store_and_rewrites_the_marker_atomically(tmp_path):
    path = str(tmp_path / "s")
    store = syncstore.open(path, replica_id=12)
    try:
        with pytest.raises(StoreLocked):
            renew_epoch(path)
        old = store.epoch
    finally:
        store.close()
    new = renew_epoch(path)
    assert new not in (0, old)
    marker = decode_marker(read_bytes(os.path.join(path, MARKER)))
    assert marker.epoch == new and marker.replica_id == 12
    assert not os.path.exists(os.path.join(path, MARKER_TEMP))
    assert os.stat(os.path.join(path, MARKER)).st_mode & 0o777 == 0o600
    with syncstore.open(path, replica_id=12) as store:
        assert store.epoch == new


def test_renew_epoch_of_a_directory_that_is_not_a_store(tmp_path):
    with pytest.raises(syncstore.StoreNotFound):
        renew_epoch(str(tmp_path))
    with pytest.raises(syncstore.StoreNotFound):
        renew_epoch(str(tmp_path / "missing"))


def test_client_protocol_over_many_restores(tmp_path):
    """A client that keeps (epoch, cursor), resyncs on reset and advances only from pages ends up
    with exactly the inbox of whichever history it last synced against."""
    path, backup = str(tmp_path / "s"), str(tmp_path / "b")
    seq = 0
    client_epoch, client_cursor, client_inbox = None, 0, []
    resets = []

    def client_sync(store):
        nonlocal client_epoch, client_cursor, client_inbox
        while True:
            page = store.sync(USER, client_cursor, limit=3, epoch=client_epoch)
            if page.reset:
                resets.append(page.reset_reason)
                client_epoch, client_cursor, client_inbox = page.epoch, page.next, []
                continue
            client_epoch = page.epoch
            client_inbox += [m.body for m in page.messages]
            client_cursor = page.next
            if not page.has_more:
                return

    for round_ in range(4):
        with syncstore.open(path) as store:
            for _ in range(3 + round_):
                seq += 1
                deliver(store, seq)
            client_sync(store)
            assert client_inbox == [m.body for m in store.sync(USER, 0, limit=1000).messages]
        if round_ == 0:
            shutil.copytree(path, backup)
        if round_ == 2:  # restore the copy taken after round 0
            shutil.rmtree(path)
            shutil.copytree(backup, path)
            renew_epoch(path)
    assert resets == [RESET_EPOCH]
