"""Helpers for tests of opening: a digest of a whole directory tree, and damaging a store."""

from __future__ import annotations

import hashlib
import os
import stat

from syncstore import _codec
from syncstore._codec import Deliver
from syncstore._ids import MessageIds
from syncstore.wal import WriteAheadLog


def tree_digest(root: str) -> dict[str, tuple[str, int, str]]:
    """Every entry under ``root`` (itself included): relative name -> (kind, mode, sha256 of the bytes).

    Names, kinds, permission bits and contents -- not times -- so that "a
    refused open changed nothing" can be asserted as equality.
    """
    digest: dict[str, tuple[str, int, str]] = {}

    def add(path: str) -> None:
        info = os.lstat(path)
        name = os.path.relpath(path, root)
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISDIR(info.st_mode):
            digest[name] = ("dir", mode, "")
            for entry in sorted(os.listdir(path)):
                add(os.path.join(path, entry))
        elif stat.S_ISREG(info.st_mode):
            with open(path, "rb") as f:
                digest[name] = ("file", mode, hashlib.sha256(f.read()).hexdigest())
        else:
            digest[name] = ("other", mode, os.readlink(path) if stat.S_ISLNK(info.st_mode) else "")

    add(root)
    return digest


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def segments(store: str) -> list[str]:
    """Paths of the store's WAL segments, oldest first."""
    wal = os.path.join(store, "wal")
    return [os.path.join(wal, n) for n in sorted(os.listdir(wal)) if n.startswith("wal-")]


def deliver_records(count: int, user: int, first_seq: int = 1, first_cursor: int = 1) -> list[Deliver]:
    """``count`` DELIVER records to ``user`` with dense cursors from ``first_cursor`` (300-byte bodies)."""
    ids = MessageIds(0, lambda: 1_700_000_000_000)
    return [
        Deliver(ids.next(), 1, 1, first_seq + i, 1_700_000_000_000, 0, bytes(((first_seq + i) * 7 + k) % 251 + 1 for k in range(300)), ((user, first_cursor + i),))
        for i in range(count)
    ]


def write_log(wal_dir: str, records: list[Deliver], first_lsn: int = 1, segment_bytes: int = 4096) -> None:
    """Write ``records`` as the log from ``first_lsn`` on, through the real WriteAheadLog (one sync per frame)."""
    os.makedirs(wal_dir, exist_ok=True)
    wal = WriteAheadLog.open(wal_dir, next_lsn=first_lsn, segment_bytes=segment_bytes)
    for lsn, record in enumerate(records, first_lsn):
        wal.append(_codec.encode_deliver_frame(lsn, lsn - 1, record), lsn, lsn)
        wal.sync()
    wal.close()


def frame_lsns(path: str) -> tuple[int, int, int]:
    """(first LSN, last LSN, end offset of the last valid frame) of a segment file."""
    data = read_bytes(path)
    first = _codec.decode_segment_header(data)
    offset, last = _codec.SEGMENT_HEADER_SIZE, first - 1
    while (frame := _codec.decode_frame(data, offset)) is not None:
        offset, last = frame.end, frame.lsn
    return first, last, offset
