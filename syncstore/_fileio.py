"""The I/O seam: every file operation of syncstore's own writers goes through here.

The WAL (and later snapshot and archive writers) never call ``os`` directly for
files they write; they call a :class:`FileSystem`.  Production uses
:data:`OS_FS`; tests substitute a subclass that fails the Nth operation or
simulates power loss by dropping unsynced writes.  No behaviour lives here
beyond looping short writes, so the seam costs nothing in production.
"""

from __future__ import annotations

import errno
import os

__all__ = ["FileSystem", "OS_FS"]


class FileSystem:
    """Thin wrapper over the ``os`` calls the writers need (fd-based)."""

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        """``os.open``."""
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        """``os.close``."""
        os.close(fd)

    def write(self, fd: int, data: bytes) -> None:
        """Write all of ``data`` (looping over short writes)."""
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def pwrite(self, fd: int, data: bytes | bytearray, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (looping over short writes)."""
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written

    def allocate(self, fd: int, size: int) -> None:
        """Reserve disk blocks for the first ``size`` bytes (``posix_fallocate``).

        Best effort: a file system without support just grows the file as
        written.  Preallocating makes later ``fdatasync`` calls cheaper (no
        block allocation to journal) and turns ENOSPC into an early error.
        """
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise

    def fdatasync(self, fd: int) -> None:
        """``os.fdatasync``: make written data durable."""
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        """``os.fsync``: make written data and metadata durable."""
        os.fsync(fd)

    def truncate(self, fd: int, size: int) -> None:
        """``os.ftruncate``."""
        os.ftruncate(fd, size)

    def rename(self, src: str, dst: str) -> None:
        """``os.rename`` (atomic within a directory)."""
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        """``os.unlink``."""
        os.unlink(path)

    def read_file(self, path: str, size: int = -1) -> bytes:
        """The content of a file, or its first ``size`` bytes (recovery and replay read through here)."""
        with open(path, "rb") as f:
            return f.read(size)

    def listdir(self, path: str) -> list[str]:
        """``os.listdir``."""
        return os.listdir(path)

    def fsync_dir(self, path: str) -> None:
        """Make a directory's entries (created, renamed, removed files) durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: The real file system, used unless a test passes another.
OS_FS = FileSystem()
