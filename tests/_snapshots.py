"""Helpers of the snapshot tests: a full dump of a store's LMDB state, and a restore-and-dump."""

from __future__ import annotations

import os

import syncstore

DATABASES = ("messages", "inbox", "history", "dedup", "dedup_expiry", "meta")


def dump(store: syncstore.Store) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every item of every LMDB database of an open store (duplicates as separate items), meta included."""
    state = store._state
    assert state is not None
    with state.read() as txn:
        return {name: list(txn.cursor(db=getattr(state, name)).iternext()) for name in DATABASES}


def dump_restored(snapshot_dir: str, target: str, lsn: int | None = None) -> dict[str, list[tuple[bytes, bytes]]]:
    """Restore ``snapshot_dir`` (up to ``lsn``) into ``target``, open it, check it and dump it."""
    syncstore.restore(snapshot_dir, target, lsn=lsn)
    with syncstore.open(target) as restored:
        restored.check()
        return dump(restored)


def tree(path: str) -> list[str]:
    """Every entry under ``path`` (relative), sorted: to show that nothing was created."""
    found = []
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            found.append(os.path.relpath(os.path.join(root, name), path))
    return sorted(found)
