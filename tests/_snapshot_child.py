"""Child process of tests/test_snapshot_crash.py: deliver, then snapshot and SIGKILL itself at file operation N.

    python tests/_snapshot_child.py STORE DEST KILL_AT FULL FIRST_SEQ COUNT

Opens the store, delivers COUNT messages (durable), then takes ``snapshot(DEST,
full=FULL)`` through a file system seam that counts every file operation the
snapshotting thread makes and, at operation KILL_AT, sends this process
SIGKILL -- a real kill, at a deterministic point.  A ``pwrite`` at the kill
point is torn first: half of its bytes reach the file.  Without a kill
(KILL_AT 0, or beyond the last operation) it prints ``OPS <n>`` and exits 0.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import syncstore  # noqa: E402
from syncstore import Message  # noqa: E402
from syncstore._fileio import FileSystem  # noqa: E402


class KillingFS(FileSystem):
    """Counts the armed thread's file operations; SIGKILLs the process at operation ``kill_at``."""

    def __init__(self, kill_at: int) -> None:
        self.kill_at = kill_at
        self.count = 0
        self.thread: int | None = None

    def _op(self, torn=None) -> None:
        if threading.get_ident() != self.thread:
            return
        self.count += 1
        if self.count == self.kill_at:
            if torn is not None:
                torn()
            os.kill(os.getpid(), signal.SIGKILL)

    def open(self, path, flags, mode=0o644):
        self._op()
        return super().open(path, flags, mode)

    def close(self, fd):
        self._op()
        super().close(fd)

    def write(self, fd, data):
        self._op(lambda: os.write(fd, bytes(data[: len(data) // 2])))
        super().write(fd, data)

    def pwrite(self, fd, data, offset):
        self._op(lambda: os.pwrite(fd, bytes(data[: len(data) // 2]), offset))
        super().pwrite(fd, data, offset)

    def fsync(self, fd):
        self._op()
        super().fsync(fd)

    def fdatasync(self, fd):
        self._op()
        super().fdatasync(fd)

    def rename(self, src, dst):
        self._op()
        super().rename(src, dst)

    def unlink(self, path):
        self._op()
        super().unlink(path)

    def fsync_dir(self, path):
        self._op()
        super().fsync_dir(path)


def main() -> None:
    store_path, dest, kill_at, full, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5]), int(sys.argv[6])
    fs = KillingFS(kill_at)
    with syncstore.open(store_path, fs=fs, clock_ms=lambda: 1_700_000_000_000) as store:
        for seq in range(first, first + count):
            store.deliver(Message(seq % 7, seq % 3, seq, b"crash %d" % seq), to=[seq % 7, (seq * 3 + 1) % 7])
        fs.thread = threading.get_ident()
        store.snapshot(dest, full=full)
        fs.thread = None
    print(f"OPS {fs.count}", flush=True)


if __name__ == "__main__":
    main()
