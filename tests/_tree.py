"""Helpers for tests of opening: a digest of a whole directory tree, and damaging a store."""

from __future__ import annotations

import hashlib
import os
import stat


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
