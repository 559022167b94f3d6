"""A snapshot directory on disk: its manifest, writing one snapshot file, reading and checking one.

The byte formats are :mod:`syncstore._snapformat`'s; this module does the
I/O, with the rules that keep a directory usable whatever happens:

* a snapshot file is written under a temporary name (``snapshot-<pid>-<n>.tmp``),
  ``fsync``ed, renamed to its final name and the directory ``fsync``ed --
  only then may a manifest name it;
* the manifest is replaced atomically (``MANIFEST.tmp``, ``fsync``, rename,
  ``fsync`` of the directory), last;
* a directory is untrusted input when read: the manifest may only name plain
  snapshot file names (its decoder checks), and each named file must resolve
  (symlinks followed) to a regular file inside the directory itself.

Every write goes through the ``fs`` seam (:class:`~syncstore._fileio.FileSystem`),
so tests can count the operations and kill the process at any one of them.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard

from . import _snapformat as fmt
from ._codec import crc32c_of
from ._fileio import OS_FS, FileSystem
from ._layout import create_file, permission_denied
from ._snapformat import ChainEntry, Header, Manifest, Row, Trailer
from .errors import CorruptionError, StoreFull, SyncStoreError

__all__ = ["MANIFEST", "SnapshotInfo", "io_error", "read_manifest", "write_manifest", "entry_path", "SnapWriter", "read_blocks", "is_ours", "TEMP_SUFFIX"]

log = logging.getLogger("syncstore.snapshot")

MANIFEST = "MANIFEST"
MANIFEST_TEMP = "MANIFEST.tmp"
TEMP_PREFIX = "snapshot-"
TEMP_SUFFIX = ".tmp"
#: Raw bytes of rows per block (before zstd); a block holds whole rows, so a large body makes a larger one.
BLOCK_RAW = 1 << 20
#: zstd level: 3 (zstd's default) compresses the state ~3x at ~200 MB/s per core (docs/benchmarks.md).
ZSTD_LEVEL = 3
_temp_numbers = itertools.count()


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One snapshot: what :func:`syncstore.Store.snapshot` wrote, or an entry of :func:`syncstore.snapshot_chain`.

    ``kind`` is ``"base"`` (the whole state) or ``"delta"`` (the items changed
    since the snapshot at ``prev_lsn``; 0 for a base).  ``lsn``: the state
    holds every WAL record up to it.  ``file`` is the file's path, ``rows``
    its rows (puts and deletes), ``bytes`` its size.  ``reason`` says why a
    snapshot is what it is when that is not the obvious: why a base was
    written where a delta could have been, or that nothing was written
    because the store had not changed since the newest snapshot.
    """

    lsn: int
    kind: str
    file: str
    rows: int
    bytes: int
    prev_lsn: int
    reason: str = ""

    @classmethod
    def of(cls, directory: str, entry: ChainEntry, reason: str = "") -> SnapshotInfo:
        """The info of manifest ``entry`` in ``directory``."""
        return cls(entry.lsn, fmt.KIND_NAMES[entry.kind], os.path.join(directory, entry.name), entry.rows, entry.size, entry.prev_lsn, reason)


def is_ours(name: str) -> bool:
    """True for the names the snapshot writer creates (snapshot files, its temp files, the manifest's temp)."""
    return fmt.parse_file_name(name) is not None or name == MANIFEST_TEMP or (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX))


def io_error(error: OSError, what: str, path: str, hint: str) -> SyncStoreError:
    """The SyncStoreError of a failed file operation while writing or restoring snapshots.

    No space is :class:`StoreFull`, no access :class:`PermissionDenied`,
    anything else a plain :class:`SyncStoreError`; ``hint`` says what is
    left behind (the store itself is never affected).
    """
    where = error.filename if isinstance(error.filename, str) else path
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"{what} failed: no space left ({error.strerror})", path=where, hint=f"free disk space and try again; {hint}")
    if isinstance(error, PermissionError):
        return permission_denied(error, "read and write access")
    return SyncStoreError(f"{what} failed: {error.strerror or error}", path=where, hint=f"check the disk and try again; {hint}")


# --- the manifest -------------------------------------------------------------------------------


def _inside(directory: str, name: str, what: str) -> str:
    """The path of ``name`` in ``directory``, after checking that it resolves to a regular file inside it."""
    path = os.path.join(directory, name)
    real = os.path.realpath(path)
    if os.path.dirname(real) != os.path.realpath(directory):
        raise CorruptionError(
            f"the {what} {name} leads out of the snapshot directory (to {real})",
            path=path,
            hint="a snapshot directory may only hold its own files; nothing was written",
        )
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise CorruptionError(f"the {what} {name} is missing from the snapshot directory", path=path, hint="restore it from where the snapshots were copied from; nothing was written") from None
    if not stat.S_ISREG(info.st_mode):
        raise CorruptionError(f"the {what} {name} is not a regular file", path=path, hint="nothing was written")
    return path


def read_manifest(directory: str) -> Manifest | None:
    """The manifest of snapshot directory ``directory``, or None if it has none; :class:`CorruptionError` if damaged."""
    if not os.path.lexists(os.path.join(directory, MANIFEST)):
        return None
    path = _inside(directory, MANIFEST, "manifest")
    with open(path, "rb") as f:
        data = f.read(fmt.MAX_ENVELOPE_JSON + fmt.ENVELOPE_SIZE + fmt.CRC_SIZE + 1)
    return fmt.decode_manifest(data, path)


def entry_path(directory: str, entry: ChainEntry) -> str:
    """The path of a manifest entry's file, checked to be a regular file inside ``directory``."""
    return _inside(directory, entry.name, "snapshot file")


def write_manifest(fs: FileSystem, directory: str, manifest: Manifest, file_mode: int) -> None:
    """Replace the manifest atomically: temp file, fsync, rename over, fsync the directory."""
    temp, final = os.path.join(directory, MANIFEST_TEMP), os.path.join(directory, MANIFEST)
    fd = create_file(fs, temp, os.O_WRONLY | os.O_TRUNC, file_mode)
    try:
        fs.pwrite(fd, fmt.encode_manifest(manifest), 0)
        fs.fsync(fd)
    finally:
        fs.close(fd)
    fs.rename(temp, final)
    fs.fsync_dir(directory)


# --- writing one snapshot file ----------------------------------------------------------------


class SnapWriter:
    """Writes one snapshot file: rows go to :attr:`rows`, :meth:`flush` writes full blocks, :meth:`finish` names it.

    The file is written under a temporary name; the header (which holds the
    LSN, known only at the end) is written last, at offset 0, with the
    trailer.  :meth:`abort` removes the temporary file.
    """

    def __init__(self, fs: FileSystem, directory: str, file_mode: int) -> None:
        self._fs = fs
        self.directory = directory
        self.rows = fmt.RowBuffer()
        self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self.temp = os.path.join(directory, f"{TEMP_PREFIX}{os.getpid()}-{next(_temp_numbers)}{TEMP_SUFFIX}")
        self._fd = create_file(fs, self.temp, os.O_WRONLY | os.O_TRUNC, file_mode)
        self._offset = fmt.HEADER_SIZE
        self._body_crc = 0
        self._blocks = 0
        self._raw = 0

    def flush(self, final: bool = False) -> None:
        """Write the buffered rows as a block once they reach the block size (``final``: whatever is buffered)."""
        if self.rows.count and (final or self.rows.size >= BLOCK_RAW):
            raw, count = self.rows.take_raw()
            block = fmt.encode_block(raw, count, self._compressor)
            self._fs.pwrite(self._fd, block, self._offset)
            self._offset += len(block)
            self._body_crc = crc32c_of(block, self._body_crc)
            self._blocks += 1
            self._raw += len(raw)

    def finish(self, header: Header, last_msg_id: int | None) -> ChainEntry:
        """Write the trailer and the header, fsync, rename to the final name, fsync the directory.

        ``last_msg_id`` is the state's (None if it has none: header flag bit 0 clear).
        """
        self.flush(final=True)
        rows = self.rows
        header = dataclasses.replace(header, has_last_msg_id=last_msg_id is not None)
        trailer = Trailer(self._blocks, rows.puts + rows.deletes, rows.puts, rows.deletes, self._raw, last_msg_id or 0, self._body_crc)
        self._fs.pwrite(self._fd, fmt.encode_trailer(trailer), self._offset)
        self._fs.pwrite(self._fd, fmt.encode_header(header), 0)
        self._fs.fsync(self._fd)
        fd, self._fd = self._fd, -1
        self._fs.close(fd)
        name = fmt.file_name(header.kind, header.lsn, header.prev_lsn)
        self._fs.rename(self.temp, os.path.join(self.directory, name))
        self._fs.fsync_dir(self.directory)
        size = self._offset + fmt.TRAILER_SIZE
        return ChainEntry(name, header.kind, header.lsn, header.prev_lsn, size, self._body_crc, trailer.rows, trailer.puts, trailer.deletes, last_msg_id)

    def abort(self) -> None:
        """Close and remove the temporary file (best effort: the next snapshot removes a leftover)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                self._fs.close(fd)
            except OSError:
                pass
        try:
            self._fs.unlink(self.temp)
        except OSError:
            log.warning("could not remove the temporary snapshot file %s", self.temp, exc_info=True)


# --- reading and checking one snapshot file -----------------------------------------------------


def read_blocks(path: str, entry: ChainEntry, manifest: Manifest) -> Iterator[list[Row]]:
    """The rows of the snapshot file at ``path``, one list per block, every byte checked on the way.

    Checked against the file itself (header, every block's and the
    trailer's CRC-32C, counts, nothing after the trailer) and against the
    manifest that names it (size, checksum, kind, LSNs, source store).  The
    last check runs after the last block: consume the whole iterator before
    trusting any of it.
    """
    decompressor = zstandard.ZstdDecompressor()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != entry.size:
            raise CorruptionError(f"snapshot file is {size} bytes, the manifest says {entry.size}", path=path, offset=min(size, entry.size))
        header = fmt.decode_header(f.read(fmt.HEADER_SIZE), path)
        expected = (entry.kind, manifest.replica_id, entry.lsn, entry.prev_lsn, manifest.epoch)
        if (header.kind, header.replica_id, header.lsn, header.prev_lsn, header.epoch) != expected:
            raise CorruptionError(
                f"snapshot file header (kind {header.kind}, replica {header.replica_id}, LSN {header.lsn}, previous {header.prev_lsn}, "
                f"epoch {header.epoch}) is not what the manifest says ({expected})",
                path=path,
                offset=10,
            )
        offset, body_crc, blocks, rows, raw = fmt.HEADER_SIZE, 0, 0, 0, 0
        while True:
            prefix = f.read(fmt.BLOCK_PREFIX_SIZE)
            clen, ulen, count, _crc = fmt.decode_block_prefix(prefix, path, offset)
            if clen == 0:
                break
            if offset + fmt.BLOCK_PREFIX_SIZE + clen + fmt.TRAILER_SIZE > size:
                raise CorruptionError(f"snapshot block of {clen} bytes runs past the end of the file", path=path, offset=offset)
            compressed = f.read(clen)
            block = fmt.decode_block(prefix, compressed, decompressor, path, offset)
            body_crc = crc32c_of(compressed, crc32c_of(prefix, body_crc))
            blocks, rows, raw = blocks + 1, rows + count, raw + ulen
            offset += fmt.BLOCK_PREFIX_SIZE + clen
            yield block
        trailer = fmt.decode_trailer(prefix + f.read(fmt.TRAILER_SIZE - fmt.BLOCK_PREFIX_SIZE), path, offset)
        if offset + fmt.TRAILER_SIZE != size:
            raise CorruptionError(f"snapshot file has {size - offset - fmt.TRAILER_SIZE} bytes after its trailer", path=path, offset=offset + fmt.TRAILER_SIZE)
        if (trailer.blocks, trailer.rows, trailer.raw_bytes, trailer.body_crc) != (blocks, rows, raw, body_crc):
            raise CorruptionError(
                f"snapshot trailer (blocks {trailer.blocks}, rows {trailer.rows}, raw {trailer.raw_bytes}, CRC {trailer.body_crc:#010x}) does not "
                f"match the blocks read (blocks {blocks}, rows {rows}, raw {raw}, CRC {body_crc:#010x})",
                path=path,
                offset=offset,
            )
        in_file = trailer.last_msg_id if header.has_last_msg_id else None
        if (trailer.rows, trailer.puts, trailer.deletes, trailer.body_crc, in_file) != (entry.rows, entry.puts, entry.deletes, entry.crc, entry.last_msg_id):
            raise CorruptionError("snapshot file's counts or checksum differ from what the manifest says", path=path, offset=offset, hint="the file is not the one the manifest was written for; nothing was written")
