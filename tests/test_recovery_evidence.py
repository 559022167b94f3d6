"""Issue 7, section 3: recovery never trusts missing evidence.

The LMDB state says which WAL records it still needs (``applied_lsn + 1`` on);
the log must reach from there to its end.  Every way it can fail to -- no
segment, a segment cut short or zeroed, a missing first or middle segment, a
log that ends before the state, an incomplete segment that is not a crash
during rotation, stray files -- is a CorruptionError naming the LSNs the state
needs and the files found, and the store's files are left exactly as they
were (restoring the original files then recovers everything).

The one loss no recovery can see is documented in docs/reliability.md: the
newest segment removed whole (or cut at a frame boundary) while its records
were unapplied -- nothing else records that they existed.
"""

from __future__ import annotations

import os
import shutil

import pytest

import syncstore
from syncstore import CorruptionError, Message, _codec
from syncstore._codec import Deliver
from syncstore.wal import WriteAheadLog, segment_name

from _tree import deliver_records, frame_lsns, read_bytes, segments, tree_digest, write_bytes, write_log

SEGMENT = 4096
RECORDS = 40
USER = 9


def _records(count: int) -> list[Deliver]:
    return deliver_records(count, USER)


def _write_log(wal_dir: str, records: list[Deliver], first_lsn: int = 1) -> None:
    write_log(wal_dir, records, first_lsn, SEGMENT)


@pytest.fixture
def unapplied(tmp_path):
    """A store whose state is initialised but has applied nothing, and a log of 40 records in several segments.

    As after a crash with 40 acknowledged deliveries not yet applied to LMDB.
    """
    path = str(tmp_path / "unapplied")
    syncstore.open(path, segment_bytes=SEGMENT).close()
    wal_dir = os.path.join(path, "wal")
    for name in os.listdir(wal_dir):
        os.unlink(os.path.join(wal_dir, name))
    _write_log(wal_dir, _records(RECORDS))
    assert len(segments(path)) >= 4
    return path


@pytest.fixture
def applied(unapplied):
    """The same store with every record applied (applied LSN 40); only the newest segment is left."""
    with syncstore.open(unapplied, segment_bytes=SEGMENT, log_retention_bytes=0, log_retention_ms=0) as store:
        assert store.head(USER) == RECORDS
    assert len(segments(unapplied)) == 1
    return unapplied


def _lsns(path: str) -> tuple[int, int]:
    """(first, last) LSN of the frames in a segment file."""
    return frame_lsns(path)[:2]


def _refused(path: str, needed_from: int) -> CorruptionError:
    """Open must raise CorruptionError naming the LSNs needed and every file found, changing nothing."""
    before = tree_digest(path)
    wal_files = sorted(os.listdir(os.path.join(path, "wal"))) if os.path.isdir(os.path.join(path, "wal")) else []
    with pytest.raises(CorruptionError) as info:
        syncstore.open(path, segment_bytes=SEGMENT)
    text = str(info.value)
    assert f"from LSN {needed_from} on" in text, text
    for name in wal_files:
        assert name in text, (name, text)
    assert "nothing was dropped silently" in text or info.value.hint
    assert tree_digest(path) == before, "a refused open changed the store's files"
    return info.value


def _reopens_with_everything(path: str, originals: dict[str, bytes], expected: int = RECORDS) -> None:
    """Put the original segment files back: the store opens with every record and continues."""
    wal_dir = os.path.join(path, "wal")
    shutil.rmtree(wal_dir, ignore_errors=True)
    os.makedirs(wal_dir)
    for name, data in originals.items():
        write_bytes(os.path.join(wal_dir, name), data)
    with syncstore.open(path, segment_bytes=SEGMENT) as store:
        assert store.head(USER) == expected
        assert [m.cursor for m in store.sync(USER, 0, 1000).messages] == list(range(1, expected + 1))
        assert store.deliver(Message(2, 2, 1, b"after"), to=[USER]).cursors == {USER: expected + 1}
        store.check()


def _originals(path: str) -> dict[str, bytes]:
    return {os.path.basename(p): read_bytes(p) for p in segments(path)}


# --- the case: acknowledged, unapplied, and the only segment is damaged ------------------


@pytest.mark.parametrize("damage", ["deleted", "cut to 10 bytes", "zeroed", "emptied", "wal dir deleted"])
def test_damaged_only_segment_with_acknowledged_unapplied_records_is_refused(tmp_path, damage):
    path = str(tmp_path / "s")
    store = syncstore.open(path)
    for seq in range(1, 6):
        assert store.deliver(Message(7, 1, seq, b"m%d" % seq), to=[USER]).cursors == {USER: seq}
    store._abandon()  # as a SIGKILL: acknowledged, perhaps not applied
    (only,) = segments(path)
    originals = _originals(path)
    data = read_bytes(only)
    if damage == "deleted":
        os.unlink(only)
    elif damage == "cut to 10 bytes":
        write_bytes(only, data[:10])
    elif damage == "zeroed":
        write_bytes(only, bytes(len(data)))
    elif damage == "emptied":
        write_bytes(only, b"")
    else:
        shutil.rmtree(os.path.join(path, "wal"))
    before = tree_digest(path)
    with pytest.raises(CorruptionError) as info:
        syncstore.open(path)
    assert "the state needs WAL records from LSN" in str(info.value)
    assert tree_digest(path) == before
    # Nothing was handed out again: with the segment restored, all five are there.
    wal_dir = os.path.join(path, "wal")
    os.makedirs(wal_dir, exist_ok=True)
    write_bytes(only, originals[os.path.basename(only)])
    with syncstore.open(path) as store:
        assert [m.body for m in store.sync(USER).messages] == [b"m%d" % s for s in range(1, 6)]
        assert store.deliver(Message(7, 1, 6, b"m6"), to=[USER]).cursors == {USER: 6}


# --- every way the log can fail to reach applied_lsn + 1 .. its end -------------------------------


@pytest.mark.parametrize("which", ["first", "middle"])
def test_missing_segment_before_the_end(unapplied, which):
    originals = _originals(unapplied)
    paths = segments(unapplied)
    os.unlink(paths[0] if which == "first" else paths[1])
    error = _refused(unapplied, 1)
    assert ("starts at LSN" if which == "first" else "gap") in str(error)
    _reopens_with_everything(unapplied, originals)


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("damage", ["cut to 10 bytes", "zeroed", "emptied", "header only"])
def test_damaged_sealed_segment(unapplied, which, damage):
    originals = _originals(unapplied)
    target = segments(unapplied)[which]
    data = read_bytes(target)
    write_bytes(target, {"cut to 10 bytes": data[:10], "zeroed": bytes(len(data)), "emptied": b"", "header only": data[:24]}[damage])
    _refused(unapplied, 1)
    _reopens_with_everything(unapplied, originals)


@pytest.mark.parametrize("damage", ["cut to 10 bytes", "zeroed", "emptied", "deleted", "frames cut"])
def test_damaged_only_segment_of_an_applied_store(applied, damage):
    """Everything applied, one segment left: it must still exist and reach the applied LSN."""
    originals = _originals(applied)
    (only,) = segments(applied)
    first, last = _lsns(only)
    assert last == RECORDS
    data = read_bytes(only)
    if damage == "deleted":
        os.unlink(only)
    elif damage == "frames cut":
        write_bytes(only, data[:24])  # a clean, empty segment that ends before the applied LSN
    else:
        write_bytes(only, {"cut to 10 bytes": data[:10], "zeroed": bytes(len(data)), "emptied": b""}[damage])
    _refused(applied, RECORDS + 1)
    _reopens_with_everything(applied, originals)


def test_log_starting_after_the_applied_lsn(applied):
    """A valid, empty segment that starts after applied_lsn + 1: records applied_lsn + 1 .. are missing."""
    originals = _originals(applied)
    (only,) = segments(applied)
    os.unlink(only)
    write_bytes(os.path.join(applied, "wal", segment_name(RECORDS + 5)), _codec.encode_segment_header(RECORDS + 5))
    error = _refused(applied, RECORDS + 1)
    assert f"starts at LSN {RECORDS + 5}" in str(error)
    _reopens_with_everything(applied, originals)


def test_log_starting_right_after_the_applied_lsn_is_sound(applied):
    """The positive control: an empty segment at applied_lsn + 1 is what rotation plus retirement leaves."""
    (only,) = segments(applied)
    os.unlink(only)
    write_bytes(os.path.join(applied, "wal", segment_name(RECORDS + 1)), _codec.encode_segment_header(RECORDS + 1))
    with syncstore.open(applied, segment_bytes=SEGMENT) as store:
        assert store.head(USER) == RECORDS
        assert store.deliver(Message(2, 2, 1, b"x"), to=[USER]).cursors == {USER: RECORDS + 1}


@pytest.mark.parametrize("offset", [5, 10, 100])
def test_incomplete_last_segment_that_does_not_follow_its_predecessor(unapplied, offset):
    """A header-less last segment is a crash during rotation only if it starts right after the previous one."""
    originals = _originals(unapplied)
    _first, last = _lsns(segments(unapplied)[-1])
    stray = os.path.join(unapplied, "wal", segment_name(last + offset))
    write_bytes(stray, b"")
    error = _refused(unapplied, 1)
    assert os.path.basename(stray) in str(error) and "does not follow" in str(error)
    _reopens_with_everything(unapplied, originals)


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, b"\x00" * SEGMENT, None], ids=["empty", "short zeros", "preallocated zeros", "partial header"])
def test_incomplete_segment_right_after_the_last_is_a_crash_during_rotation(unapplied, content):
    _first, last = _lsns(segments(unapplied)[-1])
    partial = os.path.join(unapplied, "wal", segment_name(last + 1))
    write_bytes(partial, _codec.encode_segment_header(last + 1)[:11] if content is None else content)
    with syncstore.open(unapplied, segment_bytes=SEGMENT) as store:
        assert store.head(USER) == RECORDS
        assert not os.path.exists(partial) or read_bytes(partial)[:24] == _codec.encode_segment_header(last + 1)
        assert store.deliver(Message(2, 2, 1, b"x"), to=[USER]).cursors == {USER: RECORDS + 1}


def test_zeroed_newest_segment_whose_records_were_applied_is_refused(tmp_path):
    """A zeroed segment right after its predecessor looks like a crash during rotation; if the state
    applied records from it (a crash between an apply and the retirement it allows), the log now
    ends before the applied LSN."""
    directory = str(tmp_path / "w")
    _write_log(directory, _records(RECORDS))
    paths = sorted(os.path.join(directory, n) for n in os.listdir(directory))
    newest = paths[-1]
    first, last = _lsns(newest)
    write_bytes(newest, bytes(len(read_bytes(newest))))
    before = tree_digest(directory)
    with pytest.raises(CorruptionError) as info:
        WriteAheadLog.recover(directory, next_lsn=first + 2, existing=True)  # the state applied `first` and `first + 1`
    assert f"ends at LSN {first - 1}" in str(info.value) and f"from LSN {first + 2} on" in str(info.value)
    assert os.path.basename(newest) in str(info.value)
    assert tree_digest(directory) == before
    # Applied only up to the predecessor, the same file is a crash during rotation.
    WriteAheadLog.open(directory, next_lsn=first, existing=True).close()
    assert not os.path.exists(newest) or _codec.decode_segment_header(read_bytes(newest)) == first


@pytest.mark.parametrize("stray", ["notes.txt", "wal-1.log", "wal-00000000000000000001.log.bak", "WAL-00000000000000000001.LOG", "a-directory"])
def test_stray_entries_in_the_wal_directory_are_refused(unapplied, stray):
    originals = _originals(unapplied)
    target = os.path.join(unapplied, "wal", stray)
    if stray == "a-directory":
        os.mkdir(target)
    else:
        write_bytes(target, b"something")
    error = _refused(unapplied, 1)
    assert stray in str(error) and "unexpected entries" in str(error)
    (os.rmdir if stray == "a-directory" else os.unlink)(target)
    _reopens_with_everything(unapplied, originals)


def test_renamed_segment_is_refused_not_skipped(unapplied):
    """A segment moved aside under another name is part of the log: refuse, do not open without it."""
    paths = segments(unapplied)
    os.rename(paths[1], paths[1] + ".old")
    error = _refused(unapplied, 1)
    assert os.path.basename(paths[1]) + ".old" in str(error)


def test_state_never_initialised_needs_the_log_from_lsn_1(unapplied):
    """Without an initialised state (state/ removed), the whole log is needed: a missing first segment is refused."""
    shutil.rmtree(os.path.join(unapplied, "state"))
    os.unlink(segments(unapplied)[0])
    _refused(unapplied, 1)
    assert not os.path.exists(os.path.join(unapplied, "state"))


def test_state_never_initialised_rebuilds_from_the_whole_log(unapplied):
    shutil.rmtree(os.path.join(unapplied, "state"))
    with syncstore.open(unapplied, segment_bytes=SEGMENT) as store:
        assert store.head(USER) == RECORDS
        store.check()


# --- the same rules directly on the log ---------------------------------------------------------


def test_wal_of_an_initialised_state_must_exist(tmp_path):
    directory = str(tmp_path / "w")
    os.makedirs(directory)
    with pytest.raises(CorruptionError) as info:
        WriteAheadLog.recover(directory, next_lsn=1, existing=True)
    assert "holds no segment" in str(info.value) and "from LSN 1 on" in str(info.value)
    assert os.listdir(directory) == []
    # Without a state that depends on it, an empty directory is a new log.
    wal = WriteAheadLog.open(directory, next_lsn=1)
    wal.close()
    assert os.listdir(directory) == [segment_name(1)]


@pytest.mark.parametrize("existing", [False, True])
def test_lone_incomplete_first_segment(tmp_path, existing):
    """A crash while creating a store's first segment is only possible before its state was initialised."""
    directory = str(tmp_path / "w")
    os.makedirs(directory)
    write_bytes(os.path.join(directory, segment_name(1)), b"\x00" * 10)
    if existing:
        with pytest.raises(CorruptionError) as info:
            WriteAheadLog.recover(directory, next_lsn=1, existing=True)
        assert "only WAL segment" in str(info.value)
        assert read_bytes(os.path.join(directory, segment_name(1))) == b"\x00" * 10
    else:
        WriteAheadLog.open(directory, next_lsn=1).close()
        assert _codec.decode_segment_header(read_bytes(os.path.join(directory, segment_name(1)))) == 1


def test_lone_incomplete_segment_at_another_lsn_than_needed(tmp_path):
    directory = str(tmp_path / "w")
    os.makedirs(directory)
    write_bytes(os.path.join(directory, segment_name(57)), b"")
    with pytest.raises(CorruptionError):
        WriteAheadLog.recover(directory, next_lsn=1)


def test_recover_changes_nothing_until_start(tmp_path):
    """recover() validates only; the torn tail and the incomplete segment are repaired by start()."""
    directory = str(tmp_path / "w")
    _write_log(directory, _records(30))
    paths = sorted(os.path.join(directory, n) for n in os.listdir(directory))
    last = paths[-1]
    first, end = _lsns(last)
    data = read_bytes(last)
    write_bytes(last, data + b"\x01\x02torn")  # a torn tail after the last frame
    partial = os.path.join(directory, segment_name(end + 1))
    write_bytes(partial, b"")
    before = tree_digest(directory)
    wal = WriteAheadLog.recover(directory, next_lsn=1, existing=True)
    assert tree_digest(directory) == before
    assert [f.lsn for f in wal.frames(0)] == list(range(1, 31))
    wal.start()
    assert not os.path.exists(partial)
    assert read_bytes(last)[: len(data)] == data and read_bytes(last)[len(data) :].count(0) == len(read_bytes(last)) - len(data)
    wal.close()
