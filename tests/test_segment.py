"""Archive segment files (syncstore._segment): write crash-safely, open, read, verify, damage, path safety, modes."""

from __future__ import annotations

import os
import random
import stat
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings

from syncstore import CorruptionError, InvalidArgument, SyncStoreError
from syncstore import _segformat as fmt
from syncstore import _segment as sg
from syncstore._fileio import FileSystem
from syncstore._segformat import HISTORY, Entry, Options
from syncstore._segment import BlockCache, Segment, write_segment
from syncstore.model import MessageRecord, StoredMessage
from test_segformat import TEXT, archives

NAME = fmt.file_name(2026, 3, 1)


def traffic(count=400, users=12, seed=1):
    """A small month: 1:1 and group messages with cursors per user, distinct bodies."""
    rng = random.Random(seed)
    ids = [1000 + 37 * u for u in range(users)]
    convs = [(50 + c, tuple(rng.sample(ids, rng.choice([2, 2, 3, 5])))) for c in range(8)]
    heads = {u: rng.randrange(100) for u in ids}
    messages, entries = [], []
    for n in range(count):
        conv, members = rng.choice(convs)
        msg_id = (n + 1) << 22
        messages.append(MessageRecord(msg_id, rng.choice(members), conv, n, 1_600_000_000_000 + n, n % 3, TEXT[: n % 70] + str(n).encode()))
        for user in sorted(members):
            heads[user] += 1
            entries.append(Entry(user, heads[user], msg_id))
    return messages, entries


def expected_range(messages, entries, user, since, limit):
    by_id = {m.msg_id: m for m in messages}
    return [StoredMessage(e.cursor, *by_id[e.msg_id]) for e in sorted(entries) if e.user == user and e.cursor > since][:limit]


def expected_history(messages, entries, user, conv, before, limit):
    by_id = {m.msg_id: m for m in messages}
    rows = [e for e in sorted(entries, reverse=True) if e.user == user and by_id[e.msg_id].conv == conv and (before is None or e.cursor < before)]
    return [StoredMessage(e.cursor, *by_id[e.msg_id]) for e in rows[:limit]]


def check_reads(segment, messages, entries, rng, rounds=150):
    users = sorted({e.user for e in entries})
    convs = sorted({m.conv for m in messages})
    for _ in range(rounds):
        user = rng.choice(users)
        since = rng.choice([0, rng.randrange(300), max(e.cursor for e in entries if e.user == user) - 1])
        limit = rng.choice([1, 3, 50, 1000])
        assert segment.read_range(user, since, limit) == expected_range(messages, entries, user, since, limit)
        conv, before = rng.choice(convs), rng.choice([None, 0, rng.randrange(300)])
        assert segment.history(user, conv, before, limit) == expected_history(messages, entries, user, conv, before, limit)
    for m in messages:
        assert segment.get(m.msg_id) == m
    assert segment.get(12345) is None and segment.get(2**64 - 1) is None
    assert segment.read_range(max(users) + 1, 0, 10) == [] and segment.read_range(0, 0, 10) == []


@pytest.mark.parametrize("block_bytes", [512, 4096, 1 << 20])
def test_write_open_read(tmp_path, block_bytes):
    messages, entries = traffic()
    dictionary = fmt.train_dictionary([m.body for m in messages] * 2, 2048) if block_bytes == 4096 else None
    info = write_segment(str(tmp_path), NAME, 2026, 3, messages, entries, Options(block_bytes, 3, dictionary))
    assert (info.messages, info.entries, info.bytes) == (len(messages), len(entries), os.path.getsize(info.path))
    assert os.listdir(tmp_path) == [NAME]  # the temporary file is gone
    with Segment.open(str(tmp_path), NAME, BlockCache(1 << 20)) as segment:
        check_reads(segment, messages, entries, random.Random(block_bytes))
        assert segment.verify().blocks == segment.verify(deep=True).blocks == len(segment.index.blocks)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(archives(max_messages=25))
def test_reads_agree_with_a_model(tmp_path, archive):
    messages, entries = archive
    directory = tempfile.mkdtemp(dir=tmp_path)
    write_segment(str(directory), NAME, 2026, 3, messages, entries, Options(512, 1))
    with Segment.open(str(directory), NAME) as segment:
        for user in {e.user for e in entries}:
            for since in {0, *[e.cursor - 1 for e in entries if e.user == user]}:
                assert segment.read_range(user, since, 7) == expected_range(messages, entries, user, since, 7)
            for conv in {m.conv for m in messages}:
                assert segment.history(user, conv, None, 5) == expected_history(messages, entries, user, conv, None, 5)
        assert all(segment.get(m.msg_id) == m for m in messages)
        segment.verify(deep=True)


def test_segment_files_are_private(tmp_path):
    old = os.umask(0)
    try:
        messages, entries = traffic(20)
        private = write_segment(str(tmp_path), NAME, 2026, 3, messages, entries)
        shared = write_segment(str(tmp_path), fmt.file_name(2026, 3, 2), 2026, 3, messages, entries, file_mode=0o640)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(private.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(shared.path).st_mode) == 0o640


def test_byte_identical_rewrite(tmp_path):
    messages, entries = traffic()
    a = write_segment(str(tmp_path), NAME, 2026, 3, messages, entries)
    b = write_segment(str(tmp_path), fmt.file_name(2026, 3, 2), 2026, 3, list(reversed(messages)), list(reversed(entries)))
    with open(a.path, "rb") as fa, open(b.path, "rb") as fb:
        assert fa.read() == fb.read()


def test_refuses_existing_or_wrong_names(tmp_path):
    messages, entries = traffic(10)
    write_segment(str(tmp_path), NAME, 2026, 3, messages, entries)
    with pytest.raises(InvalidArgument, match="never rewritten"):
        write_segment(str(tmp_path), NAME, 2026, 3, messages, entries)
    for name in ("../x.arc", fmt.file_name(2026, 4, 1), "seg.arc"):
        with pytest.raises(InvalidArgument):
            write_segment(str(tmp_path), name, 2026, 3, messages, entries)
    with pytest.raises(InvalidArgument):  # bad input: refused before any file exists
        write_segment(str(tmp_path), fmt.file_name(2026, 3, 3), 2026, 3, messages, [])
    assert os.listdir(tmp_path) == [NAME]


class _FailingFs(FileSystem):
    """Fails the named operation, or flips one byte of what it writes (a write the disk got wrong)."""

    def __init__(self, fail: str) -> None:
        self.fail = fail

    def fsync(self, fd: int) -> None:
        if self.fail == "fsync":
            raise OSError(5, "Input/output error")
        super().fsync(fd)

    def pwrite(self, fd: int, data, offset: int) -> None:
        if self.fail == "flip" and len(data) > 100:
            data = bytearray(data)
            data[len(data) // 2] ^= 1
        super().pwrite(fd, data, offset)

    def rename(self, src: str, dst: str) -> None:
        if self.fail == "rename":
            raise OSError(28, "No space left on device")
        super().rename(src, dst)


@pytest.mark.parametrize("fail, error", [("fsync", SyncStoreError), ("flip", CorruptionError), ("rename", SyncStoreError)])
def test_failed_write_leaves_nothing(tmp_path, fail, error):
    messages, entries = traffic(50)
    with pytest.raises(error):
        write_segment(str(tmp_path), NAME, 2026, 3, messages, entries, fs=_FailingFs(fail))
    assert os.listdir(tmp_path) == []


def test_open_reads_only_header_footer_and_index(tmp_path, monkeypatch):
    messages, entries = traffic()
    dictionary = fmt.train_dictionary([m.body for m in messages] * 2, 2048)
    write_segment(str(tmp_path), NAME, 2026, 3, messages, entries, Options(1024, 3, dictionary))
    reads = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, size, offset: reads.append((offset, size)) or real(fd, size, offset))
    segment = Segment.open(str(tmp_path), NAME)
    blocks = [(ref.offset, ref.offset + ref.compressed) for ref in segment.index.blocks]
    assert len(reads) == 4  # header, dictionary, footer, index
    assert not any(offset < end and start < offset + size for offset, size in reads for start, end in blocks)
    reads.clear()
    first = segment.read_range(entries[0].user, 0, 5)
    needed = len(reads)
    assert 2 <= needed <= 4  # an inbox block and the messages blocks of 5 entries
    reads.clear()
    assert segment.read_range(entries[0].user, 0, 5) == first and reads == []  # warm: from the cache
    assert segment._cache.hits >= 2
    segment.close()


def test_cache_is_bounded_lru():
    cache = BlockCache(100)
    for n in range(10):
        cache.put((1, 1, n), n, 30)
        assert cache.bytes <= 100
    assert cache.get((1, 1, 9)) == 9 and cache.get((1, 1, 0)) is None
    cache.get((1, 1, 7))
    cache.put((1, 1, 10), 10, 30)  # evicts the least recently used: 8, not 7
    assert cache.get((1, 1, 7)) == 7 and cache.get((1, 1, 8)) is None
    cache.put((2, 1, 0), "big", 1000)  # larger than the cache: not kept
    assert cache.get((2, 1, 0)) is None
    cache.drop(1)
    assert len(cache) == 0 and cache.bytes == 0
    with pytest.raises(InvalidArgument):
        BlockCache(-1)


# --- damage --------------------------------------------------------------------------------


def _small_segment(tmp_path):
    messages, entries = traffic(40, users=5)
    dictionary = fmt.train_dictionary([m.body for m in messages] * 8, 1024)
    assert dictionary is not None
    write_segment(str(tmp_path), NAME, 2026, 3, messages, entries, Options(700, 3, dictionary))
    path = os.path.join(str(tmp_path), NAME)
    with open(path, "rb") as f:
        return path, f.read(), messages, entries


def _regions(data: bytes) -> dict[str, range]:
    header = fmt.decode_header(data)
    footer = fmt.decode_footer(data[-fmt.FOOTER_SIZE :], len(data), header)
    start = fmt.HEADER_SIZE + header.dictionary_size
    return {
        "header": range(0, fmt.HEADER_SIZE),
        "dictionary": range(fmt.HEADER_SIZE, start),
        "blocks": range(start, footer.index_offset),
        "index": range(footer.index_offset, len(data) - fmt.FOOTER_SIZE),
        "footer": range(len(data) - fmt.FOOTER_SIZE, len(data)),
    }


def test_every_flipped_byte_is_found_by_verify(tmp_path):
    """Each single flipped byte, in every region: open or verify raises CorruptionError naming the file and an offset."""
    path, data, _messages, _entries = _small_segment(tmp_path)
    regions = _regions(data)
    assert all(len(r) for r in regions.values()) and len(list(regions)) == 5
    for at in range(len(data)):
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(bytes([data[at] ^ 0x10]))
        with pytest.raises(CorruptionError) as caught:
            with Segment.open(str(tmp_path), NAME) as segment:
                segment.verify()
        assert caught.value.path == path and 0 <= caught.value.offset < len(data), at
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(bytes([data[at]]))


def test_damaged_blocks_never_give_wrong_data(tmp_path):
    """A flipped byte in any block: every read either raises CorruptionError (file, offset) or returns exactly the right answer."""
    path, data, messages, entries = _small_segment(tmp_path)
    rng = random.Random(4)
    blocks = _regions(data)["blocks"]
    users = sorted({e.user for e in entries})
    for at in rng.sample(blocks, 60) + [blocks[0], blocks[-1]]:
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(bytes([data[at] ^ 0xFF]))
        with Segment.open(str(tmp_path), NAME, BlockCache(0)) as segment:
            failed = 0
            for user in users:
                try:
                    assert segment.read_range(user, 0, 1000) == expected_range(messages, entries, user, 0, 1000)
                except CorruptionError as error:
                    assert error.path == path and error.offset <= at
                    failed += 1
            for m in messages:
                try:
                    assert segment.get(m.msg_id) == m
                except CorruptionError:
                    failed += 1
                for user in users:  # history reads the history section
                    try:
                        assert segment.history(user, m.conv, None, 1000) == expected_history(messages, entries, user, m.conv, None, 1000)
                    except CorruptionError:
                        failed += 1
            assert failed  # the damaged block is read by some call, and found
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(bytes([data[at]]))


def test_truncated_or_extended_files(tmp_path):
    path, data, _messages, _entries = _small_segment(tmp_path)
    for damaged in (data[:-1], data[: len(data) // 2], data[:10], b"", data + b"\0"):
        with open(path, "wb") as f:
            f.write(damaged)
        with pytest.raises(CorruptionError) as caught:
            Segment.open(str(tmp_path), NAME).verify()
        assert caught.value.path == path


def test_deep_verify_finds_sections_that_disagree(tmp_path, monkeypatch):
    """Blocks with valid CRCs whose sections disagree (a writer's bug): quick verify passes, deep verify does not."""
    real = fmt._encode_block

    def skewed(section, columns, bodies=()):
        if section == HISTORY:
            columns = [*columns[:3], [(o + 1) % 10 for o in columns[3]]]
        return real(section, columns, bodies)

    monkeypatch.setattr(fmt, "_encode_block", skewed)
    messages, entries = traffic(20)
    write_segment(str(tmp_path), NAME, 2026, 3, messages, entries)
    with Segment.open(str(tmp_path), NAME) as segment:
        segment.verify()
        with pytest.raises(CorruptionError, match="history"):
            segment.verify(deep=True)


# --- names are untrusted on read ------------------------------------------------------------------


def test_names_leading_out_are_refused(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    messages, entries = traffic(10)
    outside = write_segment(str(tmp_path), NAME, 2026, 3, messages, entries)
    for name in ("../" + NAME, outside.path, "seg-2026-03-1.arc", "..", ""):
        with pytest.raises(CorruptionError):
            Segment.open(str(archive), name)
    link = fmt.file_name(2026, 3, 7)
    os.symlink(outside.path, archive / link)  # a symlink out of the directory
    with pytest.raises(CorruptionError, match="leads out"):
        Segment.open(str(archive), link)
    os.mkdir(archive / fmt.file_name(2026, 3, 8))
    with pytest.raises(CorruptionError, match="not a regular file"):
        Segment.open(str(archive), fmt.file_name(2026, 3, 8))
    with pytest.raises(CorruptionError, match="missing"):
        Segment.open(str(archive), fmt.file_name(2026, 3, 9))
    inside = write_segment(str(archive), fmt.file_name(2026, 3, 10), 2026, 3, messages, entries)
    os.symlink(inside.name, archive / fmt.file_name(2026, 3, 11))  # a link inside the directory is followed
    with Segment.open(str(archive), fmt.file_name(2026, 3, 11)) as segment:
        assert segment.get(messages[0].msg_id) == messages[0]


def test_closed_segment_refuses_reads(tmp_path):
    messages, entries = traffic(10)
    write_segment(str(tmp_path), NAME, 2026, 3, messages, entries)
    segment = Segment.open(str(tmp_path), NAME)
    segment.close()
    segment.close()
    with pytest.raises(SyncStoreError, match="closed"):
        segment.read_range(entries[0].user, 0, 10)
    with pytest.raises(SyncStoreError, match="closed"):
        segment.verify()


def test_module_names():
    assert sg.TEMP_SUFFIX == ".tmp" and fmt.parse_file_name(f"{sg.TEMP_PREFIX}1-2{sg.TEMP_SUFFIX}") is None
