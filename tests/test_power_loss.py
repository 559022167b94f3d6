"""Simulated power loss: unsynced writes vanish, in whole or in part; nothing durable does.

``PowerLossFS`` applies every operation to the real files but remembers how to
undo each one that is not yet durable: data writes until the file is synced
(or at once, for an O_DSYNC file), file creation, removal and renaming until
the directory is synced.  At the crash point it undoes all or a random subset
of them, and can tear the write in progress into random surviving sectors.

LMDB writes from C, out of the seam's reach.  Its documented failure mode for
the flags we use (MDB_NOMETASYNC) is that a system crash undoes the last
transaction(s); we simulate worse -- rolling ``state/data.mdb`` back to the copy
taken at the last forced sync -- and require WAL replay to restore every
acknowledged write.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from collections.abc import Callable

import pytest

import syncstore
from syncstore import Message, SyncStoreError
from syncstore._fileio import FileSystem
from syncstore.state import State

SECTOR = 512


class PowerCut(OSError):
    """Raised by every operation once the power is off."""


class PowerLossFS(FileSystem):
    """See the module docstring."""

    def __init__(self, rng: random.Random, cut_at_write: int | None = None) -> None:
        self.rng = rng
        self.cut_at_write = cut_at_write  # tear the Nth data write, then power off
        self.writes = 0
        self.off = False
        self.paths: dict[int, tuple[str, bool]] = {}  # fd -> (path, O_DSYNC)
        self.volatile: list[tuple[str, str, Callable[[], None]]] = []  # (kind, path, undo)
        self.syncs_started = 0
        self.syncs_done = 0

    # --- bookkeeping -----------------------------------------------------------------

    def _check_power(self) -> None:
        if self.off:
            raise PowerCut(errno.EIO, "power is off")

    def _remember(self, kind: str, path: str, undo: Callable[[], None]) -> None:
        self.volatile.append((kind, path, undo))

    def _durable(self, kind: str, path: str) -> None:
        self.volatile = [entry for entry in self.volatile if not (entry[0] == kind and entry[1] == path)]

    # --- operations ----------------------------------------------------------------------

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        self._check_power()
        existed = os.path.exists(path)
        fd = super().open(path, flags, mode)
        self.paths[fd] = (path, bool(flags & os.O_DSYNC))
        if not existed:
            self._remember("dir", os.path.dirname(path), lambda: os.path.exists(path) and os.unlink(path))
        return fd

    def close(self, fd: int) -> None:
        self.paths.pop(fd, None)
        super().close(fd)

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        self._check_power()
        path, dsync = self.paths[fd]
        self.writes += 1
        if not dsync:
            self._remember_data(path, offset, len(data))
        if self.writes == self.cut_at_write:
            # The write in progress when the power fails: random sectors of it reach the disk.
            for start in range(0, len(data), SECTOR):
                if self.rng.random() < 0.5:
                    super().pwrite(fd, data[start : start + SECTOR], offset + start)
            self.off = True
            raise PowerCut(errno.EIO, "power failed during write")
        super().pwrite(fd, data, offset)

    def _remember_data(self, path: str, offset: int, length: int) -> None:
        with open(path, "rb") as f:
            f.seek(offset)
            old = f.read(length)
            size = os.fstat(f.fileno()).st_size

        def undo() -> None:
            if os.path.exists(path):
                with open(path, "r+b") as f:
                    f.seek(offset)
                    f.write(old)
                    f.truncate(max(size, 0)) if os.fstat(f.fileno()).st_size > size else None

        self._remember("data", path, undo)

    def allocate(self, fd: int, size: int) -> None:
        self._check_power()
        path, _dsync = self.paths[fd]
        old_size = os.fstat(fd).st_size
        super().allocate(fd, size)
        self._remember("data", path, lambda: os.path.exists(path) and os.truncate(path, min(old_size, os.path.getsize(path))))

    def truncate(self, fd: int, size: int) -> None:
        self._check_power()
        path, _dsync = self.paths[fd]
        self._remember_data(path, size, max(os.fstat(fd).st_size - size, 0))
        super().truncate(fd, size)

    def fdatasync(self, fd: int) -> None:
        self._check_power()
        self.syncs_started += 1
        super().fdatasync(fd)
        self._durable("data", self.paths[fd][0])
        self.syncs_done += 1

    def fsync(self, fd: int) -> None:
        self._check_power()
        super().fsync(fd)
        self._durable("data", self.paths[fd][0])

    def unlink(self, path: str) -> None:
        self._check_power()
        with open(path, "rb") as f:
            content = f.read()
        super().unlink(path)

        def undo() -> None:
            with open(path, "wb") as f:
                f.write(content)

        self._remember("dir", os.path.dirname(path), undo)

    def rename(self, src: str, dst: str) -> None:
        self._check_power()
        super().rename(src, dst)
        self._remember("dir", os.path.dirname(dst), lambda: os.rename(dst, src))

    def fsync_dir(self, path: str) -> None:
        self._check_power()
        super().fsync_dir(path)
        self._durable("dir", path)

    # --- the crash -----------------------------------------------------------------------

    def crash(self, drop_all: bool) -> int:
        """Lose all, or a random subset, of what is not durable; return how many were lost."""
        lost = [entry for entry in self.volatile if drop_all or self.rng.random() < 0.5]
        for _kind, _path, undo in reversed(lost):
            undo()
        self.volatile = []
        return len(lost)


@pytest.fixture
def lmdb_snapshots(monkeypatch):
    """Copy state/data.mdb at every forced LMDB sync; restore the latest copy on demand."""
    copies: dict[str, str] = {}
    real_sync = State.sync

    def sync_and_copy(self: State) -> None:
        real_sync(self)
        target = self.path + ".synced"
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(target)
        self.env.copy(target)
        copies[self.path] = target

    monkeypatch.setattr(State, "sync", sync_and_copy)

    def roll_back(state_path: str) -> None:
        if state_path not in copies:  # the power failed before the first forced sync
            return
        shutil.copyfile(os.path.join(copies[state_path], "data.mdb"), os.path.join(state_path, "data.mdb"))
        os.unlink(os.path.join(state_path, "lock.mdb"))

    return roll_back


def run_until_power_cut(store: syncstore.Store, fs: PowerLossFS, rng: random.Random, acks: list, seq: int) -> None:
    """1:1 and group sends and small bulk loads until the power fails or the budget ends."""
    try:
        for _step in range(rng.randrange(1, 120)):
            seq += 1
            if rng.random() < 0.2:
                batch = [(Message(sender=5, conv=1, client_seq=seq * 100 + i, body=os.urandom(rng.randrange(1, 400))), [1, 2]) for i in range(rng.randrange(1, 30))]
                for (message, _to), delivery in zip(batch, store.deliver_many(batch)):
                    acks.append((message, delivery, fs.syncs_started))
            else:
                message = Message(sender=5, conv=2, client_seq=seq * 100, body=os.urandom(rng.randrange(1, 600)))
                to = [rng.randrange(1, 8) for _ in range(rng.choice((1, 2, 5)))]
                acks.append((message, store.deliver(message, to=to), fs.syncs_started))
    except SyncStoreError:
        assert fs.off  # only the power cut may fail a write here


def verify(path: str, acks: list, fs: PowerLossFS, durability: str) -> int:
    """Every acknowledged message that must have survived is there, exactly as acknowledged."""
    checked = 0
    with syncstore.open(path) as store:
        store.check()
        for message, delivery, syncs_at_ack in acks:
            # In "sync" mode an ack means durable; otherwise a WAL sync must have started after it.
            must_survive = durability == "sync" or fs.syncs_done > syncs_at_ack
            present = [store.sync(uid, cursor - 1, 1).messages[:1] for uid, cursor in delivery.cursors.items()]
            for page in present:
                if page:
                    assert page[0].msg_id == delivery.msg_id and page[0].body == message.body
                else:
                    assert not must_survive, (message, delivery)
            checked += must_survive
    return checked


@pytest.mark.parametrize("durability", ["sync", "interval", "none"])
def test_power_loss_keeps_every_durable_write(tmp_path, durability, lmdb_snapshots):
    rng = random.Random(f"power-{durability}")
    verified = 0
    for run in range(12):
        path = str(tmp_path / f"r{run}")
        acks: list = []
        for epoch in range(2):  # a second power cut on the recovered store
            fs = PowerLossFS(rng, cut_at_write=rng.choice((None, rng.randrange(1, 60))))
            try:
                store = syncstore.open(path, durability=durability, fs=fs, segment_bytes=8192)
            except SyncStoreError:
                assert fs.off  # the power failed inside open (e.g. writing the first segment header)
            else:
                run_until_power_cut(store, fs, rng, acks, seq=epoch * 1_000_000)
                fs.off = True  # whatever the workload reached, the power goes now
                store._abandon()
            fs.crash(drop_all=rng.random() < 0.3)
            lmdb_snapshots(os.path.join(path, "state"))
            verified += verify(path, acks, fs, durability)
            if durability != "sync":  # what was lost is no longer an expectation
                with syncstore.open(path) as store:
                    acks = [a for a in acks if store.head(next(iter(a[1].cursors))) >= a[1].cursors[next(iter(a[1].cursors))]]
    assert verified > 100
