"""WAL recovery: the cases a mutation run of ``wal.py``'s recovery showed untested.

Each test here fails on some small change to today's recovery code (see
``tools/mutate.py`` and docs/reliability.md, "Mutation testing"):

* logs that start at large LSNs, so the vouching-frame search's LSN-prefix logic
  (prefix length, byte positions, the shift, the carry into the next prefix) is
  exercised; a zeroed durable frame must be refused at every first LSN;
* the work of a torn-tail recovery: bytes searched, not only frames decoded, and
  the cheap header checks that keep body bytes from costing a CRC each;
* stray files in the WAL directory;
* recovery's own changes (truncation, removal of a half-created segment,
  preallocation) are durable when ``open`` returns: a power cut right after it
  loses nothing it did;
* the offsets and paths in its errors, I/O errors during recovery, file
  descriptors, the default sync flags, and what it logs.

Everything goes through ``WriteAheadLog``'s public API and the ``_codec``
encoders.  Recovery *policy* for missing or incomplete segments (issue 7,
section 3) is deliberately not pinned here.
"""

from __future__ import annotations

import errno
import logging
import os

import pytest

from syncstore import CorruptionError, DurabilityError, StoreFull, _codec
from syncstore._codec import FRAME_LEAD_SIZE, FRAME_PREFIX_SIZE, SEGMENT_HEADER_SIZE, encode_frame, encode_segment_header
from syncstore._fileio import FileSystem
from syncstore.wal import WriteAheadLog, segment_name

SMALL = 4096  # the smallest segment size the store accepts
LOGGER = "syncstore.wal"

#: First LSNs of the test logs: small; the carry from one 5-byte LSN prefix to the next
#: (prefix = LSN >> 24) between the damaged frame and the one vouching for it, into
#: byte 4 and byte 3 of the LSN; a prefix that fills several bytes; the top bit; LSNs
#: near the top of the range (see the xfail tests below for the very top).
FIRST_LSNS = [1, 2**24 - 2, 2**32 - 2, 2**32, 2**40 + 3, 2**63, 2**64 - 2**24 - 3]


# --- helpers ----------------------------------------------------------------------------


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def body_for(lsn: int, size: int = 40) -> bytes:
    """Non-zero bytes specific to ``lsn``, so no body looks like preallocated space."""
    return bytes((lsn * 7 + i) % 251 + 1 for i in range(size))


def write_log(directory, first: int, groups: list[list[bytes]], segment_bytes: int = SMALL) -> list[tuple[int, bytes]]:
    """Append ``groups`` of frames starting at LSN ``first``; each frame records as synced
    the LSN before its group, as the store's group commit does.  Returns (lsn, body)s."""
    os.makedirs(directory, exist_ok=True)
    wal = WriteAheadLog.open(str(directory), next_lsn=first, segment_bytes=segment_bytes)
    lsn, records = first, []
    for bodies in groups:
        frames = b"".join(encode_frame(lsn + i, 1, body, lsn - 1) for i, body in enumerate(bodies))
        wal.append(frames, lsn + len(bodies) - 1, lsn)
        records += [(lsn + i, body) for i, body in enumerate(bodies)]
        lsn += len(bodies)
    wal.sync()
    wal.close()
    return records


def spans(data: bytes, start: int = SEGMENT_HEADER_SIZE) -> list[tuple[int, int]]:
    out, offset = [], start
    while (frame := _codec.decode_frame(data, offset)) is not None:
        out.append((frame.offset, frame.end))
        offset = frame.end
    return out


def only_segment(directory) -> str:
    (name,) = [n for n in os.listdir(directory) if n.startswith("wal-")]
    return os.path.join(str(directory), name)


def recovered(directory, next_lsn: int, **kwargs) -> tuple[list[tuple[int, bytes]], int]:
    wal = WriteAheadLog.open(str(directory), next_lsn=next_lsn, segment_bytes=kwargs.pop("segment_bytes", SMALL), **kwargs)
    try:
        return [(f.lsn, f.body) for f in wal.frames(0)], wal.end_lsn
    finally:
        wal.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- large first LSNs: the vouching-frame search ----------------------------------------------


def three_frame_log(directory, first: int) -> tuple[str, bytes, list[tuple[int, int]], list[tuple[int, bytes]]]:
    """Frames first, first+1 (one group, synced up to first-1) and first+2 (a later group
    with an empty body, synced up to first+1): the last frame alone proves the first two
    durable, and it ends exactly where the written data ends."""
    records = write_log(directory, first, [[body_for(first), body_for(first + 1)], [b""]])
    path = only_segment(directory)
    assert os.path.basename(path) == segment_name(first)
    data = read_bytes(path)
    frame_spans = spans(data)
    assert len(frame_spans) == 3
    return path, data, frame_spans, records


@pytest.mark.parametrize("first", FIRST_LSNS, ids=hex)
def test_log_at_a_large_first_lsn_recovers_and_continues(tmp_path, first):
    directory = tmp_path / "w"
    _path, _data, _spans, records = three_frame_log(directory, first)
    assert recovered(directory, first) == (records, first + 2)
    assert recovered(directory, first + 3) == (records, first + 2)  # the state applied everything
    wal = WriteAheadLog.open(str(directory), next_lsn=first, segment_bytes=SMALL)
    wal.append(encode_frame(first + 3, 1, b"more", first + 2), first + 3, first + 3)
    wal.close()
    assert recovered(directory, first) == (records + [(first + 3, b"more")], first + 3)


@pytest.mark.parametrize("first", FIRST_LSNS, ids=hex)
@pytest.mark.parametrize("which", [0, 1], ids=["first-frame", "second-frame"])
def test_zeroed_durable_frame_is_refused_at_any_first_lsn(tmp_path, first, which):
    """Frame ``first + which`` zeroed in place; frame first+2 records it as durable (for the
    second frame its synced LSN is exactly the damaged frame's).  Recovery must find that
    frame -- by the LSN prefix, which at 2**24 - 2, 2**32 - 1 and the top of the range
    differs between the damaged frame and the vouching one -- and refuse to open."""
    directory = tmp_path / "w"
    path, data, frame_spans, _records = three_frame_log(directory, first)
    start, end = frame_spans[which]
    damaged = data[:start] + bytes(end - start) + data[end:]
    write_bytes(path, damaged)
    with pytest.raises(CorruptionError) as info:
        WriteAheadLog.open(str(directory), next_lsn=first, segment_bytes=SMALL)
    error = info.value
    assert error.path == path and error.offset == start
    assert f"bad WAL frame {first + which}, which the valid frame at offset {frame_spans[2][0]} records as durable" in str(error)
    assert read_bytes(path) == damaged, "a refused open must not modify the log"


@pytest.mark.parametrize("exhaustive", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["sampled", "every-byte"])
@pytest.mark.parametrize("first", FIRST_LSNS, ids=hex)
def test_any_damaged_byte_of_a_durable_frame_is_refused_at_any_first_lsn(tmp_path, first, exhaustive):
    directory = tmp_path / "w"
    path, data, frame_spans, _records = three_frame_log(directory, first)
    for which in (0, 1):
        start, end = frame_spans[which]
        for position in range(start, end, 1 if exhaustive else 7):
            for xor in (0x01, 0x80, 0xFF) if exhaustive else (0x10,):
                damaged = bytearray(data)
                damaged[position] ^= xor
                write_bytes(path, bytes(damaged))
                with pytest.raises(CorruptionError) as info:
                    WriteAheadLog.open(str(directory), next_lsn=first, segment_bytes=SMALL)
                assert (info.value.path, info.value.offset) == (path, start), (which, position, xor)


@pytest.mark.parametrize("first", FIRST_LSNS, ids=hex)
def test_zeroed_last_frame_that_nothing_vouches_for_is_a_torn_tail(tmp_path, first, caplog):
    directory = tmp_path / "w"
    path, data, frame_spans, records = three_frame_log(directory, first)
    # The last group's frame torn in the middle: dropped, the two before it stay.
    start, end = frame_spans[2]
    write_bytes(path, data[: start + (end - start) // 2])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert recovered(directory, first) == (records[:2], first + 1)
    assert f"truncating torn WAL tail of {path} at offset {start} ({(end - start) // 2} bytes dropped)" in caplog.text
    assert read_bytes(path)[:start] == data[:start]
    assert os.path.getsize(path) == SMALL  # preallocated again for appending


def test_bad_frame_at_the_very_top_of_the_lsn_range_is_handled(tmp_path):
    first = 2**64 - 2**24 + 5
    directory = tmp_path / "w"
    path, data, frame_spans, _records = three_frame_log(directory, first)
    start, end = frame_spans[0]
    write_bytes(path, data[:start] + bytes(end - start) + data[end:])
    with pytest.raises(CorruptionError):
        WriteAheadLog.open(str(directory), next_lsn=first, segment_bytes=SMALL)


def test_vouching_frame_that_ends_in_zero_bytes_is_found(tmp_path):
    first = 2**32 - 1  # the vouching frame's synced LSN, first + 1 = 2**32, ends in four zero bytes
    directory = tmp_path / "w"
    path, data, frame_spans, _records = three_frame_log(directory, first)
    assert data[frame_spans[2][1] - 4 : frame_spans[2][1]] == bytes(4)
    start, end = frame_spans[0]
    write_bytes(path, data[:start] + bytes(end - start) + data[end:])
    with pytest.raises(CorruptionError):
        WriteAheadLog.open(str(directory), next_lsn=first, segment_bytes=SMALL)


def test_vouching_frame_found_when_prefix_matches_overlap(tmp_path):
    """Small LSNs have the all-zero prefix; when the byte before a frame's LSN (its CRC's
    last byte) is also zero, matches of the prefix overlap, and the search must still try
    the one at the frame's LSN field."""
    first = 1
    for i in range(50_000):  # a body that gives the vouching frame a CRC ending in 0x00
        body = b"v%d" % i
        crc = encode_frame(first + 2, 1, body, first + 1)[4:8]
        if crc[3] == 0 and crc[2] != 0:  # exactly one zero byte before the LSN's zeros
            break
    else:
        raise AssertionError("no body found")
    directory = tmp_path / "w"
    write_log(directory, first, [[body_for(1), body_for(2)], [body]])
    path = only_segment(directory)
    data = read_bytes(path)
    frame_spans = spans(data)
    assert data[frame_spans[2][0] + 6] != 0 and data[frame_spans[2][0] + 7] == 0
    start, end = frame_spans[0]
    write_bytes(path, data[:start] + bytes(end - start) + data[end:])
    with pytest.raises(CorruptionError) as info:
        WriteAheadLog.open(str(directory), next_lsn=first, segment_bytes=SMALL)
    assert info.value.offset == start and f"valid frame at offset {frame_spans[2][0]}" in str(info.value)


# --- the work a torn-tail recovery does -------------------------------------------------


class CountingBytes(bytes):
    """Segment content that counts the searches recovery makes in it."""

    limit = 10_000
    finds = 0

    def find(self, *args):  # type: ignore[override]
        CountingBytes.finds += 1
        if CountingBytes.finds > CountingBytes.limit:
            raise AssertionError(f"recovery searched the segment more than {CountingBytes.limit} times")
        return super().find(*args)


class CountingFS(FileSystem):
    def read_file(self, path: str, size: int = -1) -> bytes:
        return CountingBytes(super().read_file(path, size))


def test_torn_tail_recovery_does_not_search_the_preallocated_zeros(tmp_path):
    """A partial last frame followed by 4 MiB of preallocated zeros (small LSNs, whose
    prefix is all zero bytes): the vouching search must stop at the written data.  Counted
    in searches, which a byte-by-byte walk over the zeros multiplies by a million; not in
    frame decodes, which such a walk does not make."""
    directory = tmp_path / "w"
    segment_bytes = 4 << 20
    records = write_log(directory, 1, [[body_for(n)] for n in range(1, 7)], segment_bytes=segment_bytes)
    path = only_segment(directory)
    data = read_bytes(path)
    assert len(data) == segment_bytes
    start, end = spans(data)[-1]
    write_bytes(path, data[: start + (end - start) // 2] + bytes(len(data) - start - (end - start) // 2))
    CountingBytes.finds = 0
    assert recovered(directory, 1, fs=CountingFS(), segment_bytes=segment_bytes) == (records[:5], 5)
    assert CountingBytes.finds <= 100, CountingBytes.finds


def test_body_bytes_that_look_like_a_far_lsn_cost_no_crc(tmp_path, monkeypatch):
    """The bad last frame's body is full of fake frame leads whose LSN is just beyond any
    frame that could fit after it: rejected by the cheap header checks, never CRC-decoded."""
    first = 1000
    directory = tmp_path / "w"
    write_log(directory, first, [[body_for(first)], [b"placeholder"]])
    path = only_segment(directory)
    data = read_bytes(path)
    (_, good_end), (bad_start, _bad_end) = spans(data)
    bad_lsn = first + 1
    # Each fake is 41 bytes: filler, an 8-byte LSN, a type byte, a synced LSN that reaches
    # the bad frame, filler.  Their LSNs start just past the bound the remaining bytes
    # allow (a frame takes at least 25 bytes, so no real one can be that far).
    fake_count = 40
    end = bad_start + FRAME_PREFIX_SIZE + FRAME_LEAD_SIZE + 41 * fake_count
    highest = bad_lsn + (end - bad_start) // (FRAME_PREFIX_SIZE + FRAME_LEAD_SIZE) + 1
    fakes = b"".join(
        b"\x11" * 8 + (highest + 1 + k).to_bytes(8, "big") + b"\x01" + bad_lsn.to_bytes(8, "big") + b"\x22" * 16
        for k in range(fake_count)
    )
    frame = bytearray(encode_frame(bad_lsn, 1, fakes, first))
    frame[-1] ^= 0xFF  # a CRC failure: the last frame is bad, and nothing after it vouches
    write_bytes(path, data[:good_end] + bytes(frame) + bytes(SMALL - good_end - len(frame)))
    fake_offsets = {bad_start + FRAME_PREFIX_SIZE + FRAME_LEAD_SIZE + 41 * k for k in range(fake_count)}
    decoded: list[int] = []
    real_decode = _codec.decode_frame

    def recording_decode(buffer, offset, check_crc=True):
        decoded.append(offset)
        return real_decode(buffer, offset, check_crc)

    monkeypatch.setattr(_codec, "decode_frame", recording_decode)
    frames, end_lsn = recovered(directory, first)
    monkeypatch.setattr(_codec, "decode_frame", real_decode)
    assert end_lsn == first and frames == [(first, body_for(first))]
    assert not fake_offsets & set(decoded), sorted(fake_offsets & set(decoded))[:5]


# --- stray files ----------------------------------------------------------------------------


def test_stray_files_in_the_wal_directory_are_refused_and_left_alone(tmp_path):
    """Any entry of the WAL directory that is not a segment may be a misnamed part of the log (a
    renamed or copied segment): recovery refuses it -- naming it -- rather than guess, and changes
    nothing.  (lost+found, of a volume mounted there, is the one exception.)"""
    directory = tmp_path / "w"
    records = write_log(directory, 1, [[body_for(n, 300)] for n in range(1, 40)])
    segments = sorted(n for n in os.listdir(directory))
    assert len(segments) >= 3
    strays = {
        "README": b"operator notes",
        segments[0] + ".tmp": read_bytes(directory / segments[0]),  # a copy someone made
        "wal-notes.txt": b"zz",
        "wal-.bak": b"",
        "x.log": b"",
        "old-" + segments[-1]: bytes(30),
    }
    for name, content in strays.items():
        write_bytes(directory / name, content)
        before = {n: read_bytes(directory / n) for n in os.listdir(directory)}
        with pytest.raises(CorruptionError) as refused:
            recovered(directory, 1)
        assert name in str(refused.value)
        assert {n: read_bytes(directory / n) for n in os.listdir(directory)} == before
        os.unlink(directory / name)
    assert recovered(directory, 1) == (records, 39)


# --- recovery's own changes are durable when open returns ---------------------------------


class CutFS(FileSystem):
    """Records every operation and remembers how to undo each change not yet durable,
    as a power cut would: data and size until the file is fsynced (fdatasync or fsync on
    any descriptor of it), creations and removals until the directory is fsynced."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self.paths: dict[int, tuple[str, int]] = {}
        self.volatile: list[tuple[str, str, object]] = []

    def _content_undo(self, path: str) -> None:
        before = read_bytes(path)
        self.volatile.append(("data", path, lambda: write_bytes(path, before)))

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        existed = os.path.exists(path)
        fd = super().open(path, flags, mode)
        self.paths[fd] = (path, flags)
        self.calls.append(("open", path, flags))
        if not existed:
            self.volatile.append(("dir", os.path.dirname(path), lambda: os.path.exists(path) and os.unlink(path)))
        return fd

    def close(self, fd: int) -> None:
        self.calls.append(("close", self.paths.pop(fd)[0], 0))
        super().close(fd)

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        path, flags = self.paths[fd]
        self.calls.append(("pwrite", path, offset))
        if not flags & os.O_DSYNC:
            self._content_undo(path)
        super().pwrite(fd, data, offset)

    def allocate(self, fd: int, size: int) -> None:
        path = self.paths[fd][0]
        self.calls.append(("allocate", path, size))
        self._content_undo(path)
        super().allocate(fd, size)

    def truncate(self, fd: int, size: int) -> None:
        path = self.paths[fd][0]
        self.calls.append(("truncate", path, size))
        self._content_undo(path)
        super().truncate(fd, size)

    def _synced(self, fd: int, what: str) -> None:
        path = self.paths[fd][0]
        self.calls.append((what, path, 0))
        self.volatile = [v for v in self.volatile if not (v[0] == "data" and v[1] == path)]

    def fdatasync(self, fd: int) -> None:
        super().fdatasync(fd)
        self._synced(fd, "fdatasync")

    def fsync(self, fd: int) -> None:
        super().fsync(fd)
        self._synced(fd, "fsync")

    def unlink(self, path: str) -> None:
        content = read_bytes(path)
        self.calls.append(("unlink", path, 0))
        super().unlink(path)
        self.volatile.append(("dir", os.path.dirname(path), lambda: write_bytes(path, content)))

    def fsync_dir(self, path: str) -> None:
        super().fsync_dir(path)
        self.calls.append(("fsync_dir", path, 0))
        self.volatile = [v for v in self.volatile if not (v[0] == "dir" and v[1] == path)]

    def cut(self) -> list[tuple[str, str]]:
        """The power fails: undo what is not durable; return what was lost."""
        lost = [(kind, path) for kind, path, _undo in self.volatile]
        for _kind, _path, undo in reversed(self.volatile):
            undo()  # type: ignore[operator]
        self.volatile = []
        return lost

    def changes(self) -> list[tuple[str, str, int]]:
        return [c for c in self.calls if c[0] in ("pwrite", "truncate", "unlink")]


def snapshot(directory) -> dict[str, bytes]:
    return {name: read_bytes(os.path.join(str(directory), name)) for name in sorted(os.listdir(directory))}


def _scenario(directory, scenario: str) -> tuple[int, list[tuple[int, bytes]]]:
    """Set up ``directory`` for ``scenario``; return (next_lsn, the records to recover)."""
    if scenario == "fresh":
        os.makedirs(directory)
        return 7, []
    records = write_log(directory, 1, [[body_for(n, 300)] for n in range(1, 12)])
    last = sorted(os.listdir(directory))[-1]
    path = os.path.join(str(directory), last)
    if scenario == "torn tail":
        data = read_bytes(path)
        start, end = spans(data)[-1]
        write_bytes(path, data[: start + (end - start) // 2])  # a crash mid-append, not preallocated
        return 1, [r for r in records if r[0] != records[-1][0]]
    if scenario == "half-created next segment":
        write_bytes(os.path.join(str(directory), segment_name(len(records) + 1)), encode_segment_header(len(records) + 1)[:10])
    return 1, records


@pytest.mark.parametrize("scenario", ["fresh", "clean", "torn tail", "half-created next segment"])
def test_what_recovery_changed_survives_a_power_cut_right_after_open(tmp_path, scenario):
    directory = tmp_path / "w"
    next_lsn, records = _scenario(directory, scenario)
    fs = CutFS()
    wal = WriteAheadLog.open(str(directory), next_lsn=next_lsn, fs=fs, segment_bytes=SMALL)
    wal.close()
    after_open = snapshot(directory)
    lost = fs.cut()
    assert lost == [], f"not durable when open returned: {lost}"
    assert snapshot(directory) == after_open
    assert all(len(content) == SMALL for content in after_open.values()), "every segment preallocated"
    assert recovered(directory, next_lsn)[0] == records


def test_recovery_of_a_clean_log_changes_nothing(tmp_path, caplog):
    directory = tmp_path / "w"
    records = write_log(directory, 1, [[body_for(n, 300)] for n in range(1, 12)])
    before = snapshot(directory)
    fs = CutFS()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        wal = WriteAheadLog.open(str(directory), next_lsn=1, fs=fs, segment_bytes=SMALL)
        assert [(f.lsn, f.body) for f in wal.frames(0)] == records
        wal.close()
    assert fs.changes() == [], fs.changes()
    assert snapshot(directory) == before
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_removing_a_half_created_segment_is_logged_and_durable(tmp_path, caplog):
    directory = tmp_path / "w"
    next_lsn, records = _scenario(directory, "half-created next segment")
    partial = os.path.join(str(directory), segment_name(len(records) + 1))
    fs = CutFS()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        wal = WriteAheadLog.open(str(directory), next_lsn=next_lsn, fs=fs, segment_bytes=SMALL)
        wal.close()
    assert f"removing incomplete WAL segment {partial} (10 bytes)" in caplog.text
    assert ("unlink", partial, 0) in fs.calls
    assert fs.calls.index(("fsync_dir", str(directory), 0)) > fs.calls.index(("unlink", partial, 0))
    assert not os.path.exists(partial)


@pytest.mark.parametrize("sync_writes", [False, True])
def test_the_segment_is_reopened_for_appending_with_the_requested_sync_flag(tmp_path, sync_writes):
    directory = tmp_path / "w"
    write_log(directory, 1, [[b"a"]])
    fs = CutFS()
    kwargs = {"sync_writes": True} if sync_writes else {}  # the default must be False
    wal = WriteAheadLog.open(str(directory), next_lsn=1, fs=fs, segment_bytes=SMALL, **kwargs)
    wal.close()
    (flags,) = [f for op, _path, f in fs.calls if op == "open"]
    assert flags & os.O_RDWR
    assert bool(flags & os.O_DSYNC) == sync_writes


# --- errors: what they name, and I/O failures -------------------------------------------


def _three_segments(directory) -> tuple[list[str], list[tuple[int, bytes]]]:
    records = write_log(directory, 1, [[body_for(n, 300)] for n in range(1, 30)])
    paths = [os.path.join(str(directory), n) for n in sorted(os.listdir(directory))]
    assert len(paths) >= 3
    return paths, records


def test_segment_name_disagreeing_with_its_header_is_reported_at_the_header_lsn(tmp_path):
    directory = tmp_path / "w"
    paths, _records = _three_segments(directory)
    first = _codec.decode_segment_header(read_bytes(paths[1]))
    renamed = os.path.join(str(directory), segment_name(first + 1))
    os.rename(paths[1], renamed)
    with pytest.raises(CorruptionError) as info:
        WriteAheadLog.open(str(directory), next_lsn=1, segment_bytes=SMALL)
    assert (info.value.path, info.value.offset) == (renamed, 12)
    assert f"header says first LSN {first}" in str(info.value)


def test_gap_between_segments_is_reported_at_the_later_segments_header_lsn(tmp_path):
    directory = tmp_path / "w"
    paths, _records = _three_segments(directory)
    end_of_first = _codec.decode_segment_header(read_bytes(paths[1])) - 1
    os.unlink(paths[1])
    with pytest.raises(CorruptionError) as info:
        WriteAheadLog.open(str(directory), next_lsn=1, segment_bytes=SMALL)
    assert (info.value.path, info.value.offset) == (paths[2], 12)
    assert f"expected a segment starting at LSN {end_of_first + 1}" in str(info.value)


def test_log_starting_after_the_needed_lsn_is_refused_naming_its_first_segment(tmp_path):
    directory = tmp_path / "w"
    paths, _records = _three_segments(directory)
    os.unlink(paths[0])  # retired too early: LSNs 1.. are gone, later segments remain
    before = snapshot(directory)
    with pytest.raises(CorruptionError) as info:
        WriteAheadLog.open(str(directory), next_lsn=1, segment_bytes=SMALL)
    assert info.value.path in (paths[1], str(directory))
    assert info.value.offset in (0, None)
    assert snapshot(directory) == before


def test_log_of_one_header_only_segment_after_the_needed_lsn_is_refused(tmp_path):
    """The state needs LSN 3; the only segment starts at 5 and holds no frame (nothing was
    preallocated): LSNs 3 and 4 are missing, whatever the segment's size."""
    directory = tmp_path / "w"
    os.makedirs(directory)
    path = os.path.join(str(directory), segment_name(5))
    write_bytes(path, encode_segment_header(5))
    with pytest.raises(CorruptionError):
        WriteAheadLog.open(str(directory), next_lsn=3, segment_bytes=SMALL)
    assert read_bytes(path) == encode_segment_header(5)
    assert recovered(directory, 5) == ([], 4)  # the state that needs LSN 5 opens it


@pytest.mark.parametrize("missing", [1, 2, 5])
def test_log_ending_before_the_applied_lsn_is_refused(tmp_path, missing):
    directory = tmp_path / "w"
    paths, records = _three_segments(directory)
    end = records[-1][0]
    before = snapshot(directory)
    with pytest.raises(CorruptionError) as info:
        WriteAheadLog.open(str(directory), next_lsn=end + 1 + missing, segment_bytes=SMALL)
    assert info.value.path in (paths[-1], str(directory))
    assert snapshot(directory) == before
    assert recovered(directory, end + 1)[1] == end  # applied exactly the whole log: fine


class FailingFS(FileSystem):
    """Fails every call of one operation with an OSError."""

    def __init__(self, operation: str, code: int) -> None:
        self.operation, self.code = operation, code

    def _maybe_fail(self, operation: str) -> None:
        if operation == self.operation:
            raise OSError(self.code, os.strerror(self.code))

    def read_file(self, path: str, size: int = -1) -> bytes:
        self._maybe_fail("read_file")
        return super().read_file(path, size)

    def allocate(self, fd: int, size: int) -> None:
        self._maybe_fail("allocate")
        super().allocate(fd, size)

    def fsync(self, fd: int) -> None:
        self._maybe_fail("fsync")
        super().fsync(fd)


@pytest.mark.parametrize(
    ("operation", "code", "expected"),
    [("read_file", errno.EIO, DurabilityError), ("allocate", errno.ENOSPC, StoreFull), ("fsync", errno.EIO, DurabilityError)],
)
@pytest.mark.parametrize("scenario", ["clean", "torn tail"])
def test_io_error_during_recovery_is_a_durability_error_and_leaks_nothing(tmp_path, operation, code, expected, scenario):
    directory = tmp_path / "w"
    _scenario(directory, scenario)
    fds = open_fds()
    with pytest.raises(expected) as info:
        WriteAheadLog.open(str(directory), next_lsn=1, fs=FailingFS(operation, code), segment_bytes=SMALL)
    assert type(info.value) is expected
    assert info.value.path == str(directory)
    assert "WAL recovery failed" in str(info.value)
    assert open_fds() == fds, "recovery leaked a file descriptor"


def test_torn_tail_recovery_leaks_no_file_descriptor(tmp_path):
    directory = tmp_path / "w"
    _scenario(directory, "torn tail")
    fds = open_fds()
    wal = WriteAheadLog.open(str(directory), next_lsn=1, segment_bytes=SMALL)
    assert open_fds() == fds + 1  # the segment it appends to, nothing else
    wal.close()
    assert open_fds() == fds
