"""Issue 7, sections 11 and 12: private files, permissions, and read-only views of files one may not write.

A store is created private whatever the umask (directories 0700, files 0600)
or with the group access ``file_mode`` asks for; later files keep the store's
mode; opening a store whose files others may read logs a warning naming them.
An open without the access it needs is a PermissionDenied naming the path
and the access -- not a DurabilityError -- and changes nothing.  A read-only
view on files it may not write opens in LMDB's lock-free mode, which keeps
writers out while it is open.  Permission tests run a child as ``nobody``.
"""

from __future__ import annotations

import logging
import os
import stat
import tarfile

import pytest

import syncstore
from syncstore import InvalidArgument, Message, StoreLocked
from syncstore._layout import MARKER

from _tree import segments, tree_digest
from _users import chown_tree, nobody, read_event, run_as, shared_tmp, start_as  # noqa: F401 - shared_tmp is a fixture

LEGACY = os.path.join(os.path.dirname(__file__), "data", "legacy-stores-38dff88.tar.gz")
SEGMENT = 4096


def modes(store: str) -> dict[str, int]:
    """Permission bits of every entry of the store, by path relative to it."""
    result = {".": stat.S_IMODE(os.stat(store).st_mode)}
    for root, dirs, files in os.walk(store):
        for name in dirs + files:
            path = os.path.join(root, name)
            result[os.path.relpath(path, store)] = stat.S_IMODE(os.lstat(path).st_mode)
    return result


def fill(store: syncstore.Store, count: int = 40, first: int = 1) -> None:
    for seq in range(first, first + count):
        store.deliver(Message(1, 1, seq, b"p" * 300), to=[1, 2])


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


# --- private whatever the umask -----------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o000], ids=oct)
def test_store_is_private_whatever_the_umask(tmp_path, umask, mask):
    umask(mask)
    path = str(tmp_path / "s")
    with syncstore.open(path, segment_bytes=SEGMENT) as store:
        fill(store)  # several segments: rotation creates files too
    got = modes(path)
    for name, mode in got.items():
        expected = 0o700 if os.path.isdir(os.path.join(path, name)) else 0o600
        assert mode == expected, (name, oct(mode))
    assert {"LOCK", MARKER, "wal", "state", "state/data.mdb", "state/lock.mdb"} <= set(got)
    assert len([name for name in got if name.startswith("wal/wal-")]) >= 1


def test_group_mode_applies_whatever_the_umask_and_sticks(tmp_path, umask):
    umask(0o077)
    path = str(tmp_path / "s")
    with syncstore.open(path, segment_bytes=SEGMENT, file_mode=0o640) as store:
        fill(store, 10)
    # Reopened without file_mode: new files (segments) keep the store's mode.
    with syncstore.open(path, segment_bytes=SEGMENT) as store:
        fill(store, 40, first=100)
    got = modes(path)
    assert len([n for n in got if n.startswith("wal/")]) >= 1
    for name, mode in got.items():
        expected = 0o750 if os.path.isdir(os.path.join(path, name)) else 0o640
        assert mode == expected, (name, oct(mode))


def test_an_empty_directory_handed_to_open_is_made_private(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "given"
    path.mkdir(mode=0o755)
    syncstore.open(str(path)).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o644, 0o666, 0o604, 0o700, 0o400, 0o200, 0o1600, -1, 0o600 + 0.0, "0600", True, None.__class__], ids=repr)
def test_file_mode_must_keep_others_out(tmp_path, mode):
    with pytest.raises(InvalidArgument) as info:
        syncstore.open(str(tmp_path / "s"), file_mode=mode)
    assert info.value.key == "file_mode"
    assert not (tmp_path / "s").exists()


def test_files_others_may_read_are_named_in_a_warning(tmp_path, caplog):
    path = str(tmp_path / "s")
    with syncstore.open(path, segment_bytes=SEGMENT) as store:
        fill(store, 3)
    with caplog.at_level(logging.WARNING, logger="syncstore"):
        syncstore.open(path, segment_bytes=SEGMENT).close()
    assert not [r for r in caplog.records if "other users" in r.getMessage()]
    (segment,) = segments(path)
    os.chmod(segment, 0o644)
    os.chmod(os.path.join(path, "state"), 0o755)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="syncstore"):
        syncstore.open(path, segment_bytes=SEGMENT).close()
        syncstore.open(path, readonly=True).close()
    warnings = [r.getMessage() for r in caplog.records if "other users" in r.getMessage()]
    assert len(warnings) == 2
    for text in warnings:
        assert segment in text and os.path.join(path, "state") in text
        assert os.path.join(path, "state", "data.mdb") not in text  # still 0600


def test_legacy_store_files_readable_by_others_are_named(tmp_path, caplog):
    with tarfile.open(LEGACY) as tar:
        tar.extractall(tmp_path, filter="data")
    path = str(tmp_path / "legacy-closed")
    (segment,) = (os.path.join(path, "wal", name) for name in os.listdir(os.path.join(path, "wal")))
    os.chmod(segment, 0o644)
    os.chmod(os.path.join(path, "state", "data.mdb"), 0o644)
    with caplog.at_level(logging.WARNING, logger="syncstore"):
        syncstore.open(path, segment_bytes=65536).close()
    (text,) = [r.getMessage() for r in caplog.records if "other users" in r.getMessage()]
    assert segment in text
    # The migration to state format 3 rebuilt the state: its files are private now, whatever the old ones were.
    assert os.path.join(path, "state", "data.mdb") not in text
    assert stat.S_IMODE(os.stat(os.path.join(path, "state", "data.mdb")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.join(path, MARKER)).st_mode) == 0o600  # what migration adds is private


# --- permission denied --------------------------------------------------------------------------


OPEN = """
store = syncstore.open(sys.argv[1], readonly=sys.argv[2] == "ro")
emit(opened=True, head=store.head(1))
store.close()
"""


@pytest.mark.parametrize("readonly", [False, True], ids=["writer", "reader"])
def test_private_store_of_another_user_is_permission_denied(shared_tmp, readonly):
    user = nobody()
    path = os.path.join(shared_tmp, "s")
    with syncstore.open(path) as store:
        fill(store, 2)
    before = tree_digest(path)
    (result,) = run_as(user.pw_uid, user.pw_gid, OPEN, path, "ro" if readonly else "rw")
    assert result["error"] == "PermissionDenied", result
    assert path in result["message"] and "access" in result["message"]
    assert "check the disk" not in result["message"]
    assert tree_digest(path) == before


def test_one_file_the_writer_may_not_write_is_named_and_nothing_changes(shared_tmp):
    user = nobody()
    path = os.path.join(shared_tmp, "s")
    with syncstore.open(path, segment_bytes=SEGMENT) as store:
        fill(store, 2)
    chown_tree(path, user.pw_uid, user.pw_gid)
    (segment,) = segments(path)
    os.chown(segment, 0, 0)  # root's, 0600: nobody may neither read nor write it
    before = tree_digest(path)
    (result,) = run_as(user.pw_uid, user.pw_gid, OPEN, path, "rw")
    assert result["error"] == "PermissionDenied", result
    assert result["path"] == segment and "read and write" in result["message"]
    assert tree_digest(path) == before
    os.chown(segment, user.pw_uid, user.pw_gid)
    (result,) = run_as(user.pw_uid, user.pw_gid, OPEN, path, "rw")
    assert result == {"opened": True, "head": 2}


def test_creating_a_store_where_one_may_not_write(shared_tmp):
    user = nobody()
    (result,) = run_as(user.pw_uid, user.pw_gid, OPEN, os.path.join(shared_tmp, "new", "s"), "rw")
    assert result["error"] == "PermissionDenied", result
    assert shared_tmp in result["message"]
    assert os.listdir(shared_tmp) == []


# --- read-only views on files one may not write ----------------------------------------------------


HOLD_VIEW = """
view = syncstore.open(sys.argv[1], readonly=True)
page = view.sync(1, 0, 1000)
emit(event="open", lock_free=view.lock_free, head=view.head(1), cursors=[m.cursor for m in page.messages], epoch=view.epoch)
sys.stdin.readline()
emit(event="read again", head=view.head(1))
view.close()
emit(event="closed")
"""


def _group_readable_store(shared_tmp: str, user, file_mode: int) -> str:
    path = os.path.join(shared_tmp, "s")
    with syncstore.open(path, file_mode=file_mode) as store:
        fill(store, 5)
    chown_tree(path, 0, user.pw_gid)  # root's files, shared with nobody's group
    return path


def test_read_only_view_without_write_access_is_lock_free_and_keeps_writers_out(shared_tmp):
    user = nobody()
    path = _group_readable_store(shared_tmp, user, 0o640)
    before = tree_digest(path)
    view = start_as(user.pw_uid, user.pw_gid, HOLD_VIEW, path)
    try:
        opened = read_event(view)
        assert opened == {"event": "open", "lock_free": True, "head": 5, "cursors": [1, 2, 3, 4, 5], "epoch": opened["epoch"]}
        # No reader slot protects the view's pages, so no writer may open meanwhile.
        with pytest.raises(StoreLocked) as info:
            syncstore.open(path)
        assert "lock-free" in str(info.value)
        assert tree_digest(path) == before  # the view wrote nothing, not even LMDB's lock file
        view.stdin.write("go\n")
        view.stdin.flush()
        assert read_event(view) == {"event": "read again", "head": 5}
        assert read_event(view) == {"event": "closed"}
    finally:
        view.communicate(timeout=120)
    with syncstore.open(path) as store:  # released: the writer opens
        assert store.epoch == opened["epoch"]
        fill(store, 1, first=50)


def test_lock_free_view_is_refused_while_a_writer_runs(shared_tmp):
    user = nobody()
    path = _group_readable_store(shared_tmp, user, 0o640)
    with syncstore.open(path) as store:
        (result,) = run_as(user.pw_uid, user.pw_gid, OPEN, path, "ro")
        assert result["error"] == "StoreLocked", result
        assert "lock.mdb" in result["message"]
        fill(store, 1, first=60)


def test_read_only_view_with_write_access_to_the_lock_file_reads_beside_the_writer(shared_tmp):
    user = nobody()
    path = _group_readable_store(shared_tmp, user, 0o660)
    with syncstore.open(path) as store:
        view = start_as(user.pw_uid, user.pw_gid, HOLD_VIEW, path)
        try:
            opened = read_event(view)
            assert opened["lock_free"] is False and opened["head"] == 5
            fill(store, 1, first=70)  # the writer keeps writing while the view is open
            view.stdin.write("go\n")
            view.stdin.flush()
            assert read_event(view)["event"] == "read again"
            assert read_event(view) == {"event": "closed"}
        finally:
            view.communicate(timeout=120)


def test_read_only_view_needs_no_access_to_the_wal(shared_tmp):
    user = nobody()
    path = _group_readable_store(shared_tmp, user, 0o640)
    os.chmod(os.path.join(path, "wal"), 0o700)  # root's alone
    (result,) = run_as(user.pw_uid, user.pw_gid, OPEN, path, "ro")
    assert result == {"opened": True, "head": 5}
    (result,) = run_as(user.pw_uid, user.pw_gid, OPEN, path, "rw")
    assert result["error"] == "PermissionDenied"  # a writer needs write access (to the store directory first)
