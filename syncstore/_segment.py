"""Archive segment files: writing one crash-safely, opening one, reading from it, verifying it.

The byte format is :mod:`syncstore._segformat`'s; this module does the I/O:

* :func:`write_segment` writes under a temporary name in the archive
  directory (``seg-<pid>-<n>.tmp``, created with the store's file mode),
  ``fsync``s it, **reads it back and verifies every CRC and count** (and
  that it holds what was given), then renames it to its final name and
  ``fsync``s the directory.  A crash leaves either no segment or a whole,
  durable, verified one (plus, at worst, a temporary file that the archive's
  open removes).  The read-back reads the page cache, not the platter:
  what it proves is that the bytes written are the bytes encoded.
* :class:`Segment` opens a segment reading only its header (and dictionary),
  footer and index -- never a data block -- and reads the blocks a call
  needs, each checked against its CRC when it is read from the file, through
  a :class:`BlockCache` of decoded blocks (bounded, LRU, shared by all the
  segments of a store).
* Names are untrusted on read (a manifest, a directory listing): a name must
  be exactly a segment file name (``seg-YYYY-MM-<20 digits>.arc``: no ``/``,
  no ``..``, nothing absolute) and resolve, symlinks followed, to a regular
  file directly inside the archive directory.

Every failure is a :class:`~syncstore.errors.SyncStoreError`: damage is a
:class:`CorruptionError` naming the file and the offset of the failed check.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import repeat

from . import _segformat as fmt
from ._fileio import OS_FS, FileSystem
from ._layout import DEFAULT_FILE_MODE, create_file, permission_denied
from ._segformat import HISTORY, INBOX, MESSAGES, MSG_IDS, BlockRef, Entry, MessageBlock, Options
from .errors import CorruptionError, InvalidArgument, StoreFull, SyncStoreError
from .model import MessageRecord, StoredMessage

__all__ = ["BlockCache", "Segment", "SegmentInfo", "VerifyReport", "write_segment", "segment_path", "TEMP_PREFIX", "TEMP_SUFFIX"]

log = logging.getLogger("syncstore.archive")

TEMP_PREFIX = "seg-"
TEMP_SUFFIX = ".tmp"
#: Decoded blocks kept per store by default: 64 MiB (estimated Python object sizes, not raw bytes).
DEFAULT_CACHE_BYTES = 64 << 20
_temp_numbers = itertools.count()
_tokens = itertools.count(1)
_new = tuple.__new__


# --- the block cache ---------------------------------------------------------------------


class BlockCache:
    """Decoded blocks, least recently used first out, within ``max_bytes`` (estimated); thread-safe.

    One per store, shared by its segments: keys are ``(segment token,
    section, block number)``, so a segment's blocks never answer for
    another's.  A block larger than the whole cache is returned but not kept.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if type(max_bytes) is not int or max_bytes < 0:
            raise InvalidArgument(f"the block cache size is a number of bytes >= 0, got {max_bytes!r}", key="max_bytes")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple[int, int, int], tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int, int]) -> object | None:
        """The cached value of ``key`` (now the most recently used), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: tuple[int, int, int], value: object, size: int) -> None:
        """Keep ``value`` (about ``size`` bytes), evicting the least recently used beyond ``max_bytes``."""
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _key, (_value, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped

    def drop(self, token: int) -> None:
        """Forget every block of the segment with ``token`` (it was closed)."""
        with self._lock:
            for key in [k for k in self._items if k[0] == token]:
                self.bytes -= self._items.pop(key)[1]

    def clear(self) -> None:
        """Forget every block (a cold cache)."""
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


def _decoded_size(ref: BlockRef) -> int:
    """Estimated bytes of a decoded block's Python objects (tuples, ints, bodies)."""
    if ref.section == MESSAGES:
        return ref.raw + 260 * ref.rows  # a record tuple, its ints and its body object
    return 48 * len(fmt._COLUMNS[ref.section]) * ref.rows


# --- names and paths ------------------------------------------------------------------------


def segment_path(directory: str, name: str) -> str:
    """The path of segment ``name`` in ``directory``, checked: a segment file name resolving to a regular file inside it.

    Raises :class:`CorruptionError` for a name that is not a segment file
    name or that leads out of the directory (``../x``, ``/etc/passwd``, a
    symlink out), or for a missing or non-regular file: the archive's
    manifest names it, so it is missing evidence, never "empty".
    """
    if fmt.parse_file_name(name) is None:
        raise CorruptionError(
            f"{name!r} is not an archive segment name (seg-YYYY-MM-<20 digits>.arc)",
            path=directory,
            key=name,
            hint="an archive may only name its own segment files; nothing was read",
        )
    path = os.path.join(directory, name)
    real = os.path.realpath(path)
    if os.path.dirname(real) != os.path.realpath(directory):
        raise CorruptionError(f"the archive segment {name} leads out of the archive directory (to {real})", path=path, hint="remove the link; nothing was read")
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise CorruptionError(f"the archive segment {name} is missing", path=path, hint="restore it from a backup or a snapshot; its messages cannot be read") from None
    if not stat.S_ISREG(info.st_mode):
        raise CorruptionError(f"the archive segment {name} is not a regular file", path=path)
    return real


def _io_error(error: OSError, what: str, path: str) -> SyncStoreError:
    where = error.filename if isinstance(error.filename, str) else path
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"{what} failed: no space left ({error.strerror})", path=where, hint="free disk space and try again; nothing was archived")
    if isinstance(error, PermissionError):
        return permission_denied(error, "read and write access")
    return SyncStoreError(f"{what} failed: {error.strerror or error}", path=where, hint="check the disk and try again")


# --- reading ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :meth:`Segment.verify` checked: bytes, blocks, rows, and how long it took."""

    path: str
    bytes: int
    blocks: int
    messages: int
    entries: int
    deep: bool
    seconds: float

    @property
    def mb_per_s(self) -> float:
        """Segment bytes verified per second, in MB (10^6 bytes)."""
        return self.bytes / self.seconds / 1e6 if self.seconds else float("inf")


class Segment:
    """One open segment file: ``read_range`` (sync), ``get`` (msg_id), ``history`` (user, conv), ``verify``.

    Open with :meth:`open`; close with :meth:`close` (or ``with``).  Safe to
    use from several threads at once (positional reads, a thread-safe cache,
    one decompression at a time per segment).
    """

    def __init__(self, path: str, fd: int, header: fmt.Header, dictionary: bytes | None, footer: fmt.Footer, index: fmt.Index, cache: BlockCache) -> None:
        self.path = path
        self.name = os.path.basename(path)
        self.header = header
        self.footer = footer
        self.index = index
        self.size = footer.index_offset + footer.blocks * fmt.ENTRY_SIZE + footer.filter_bytes + fmt.FOOTER_SIZE
        self._fd = fd
        self._dictionary = dictionary
        self._decompressor = fmt.decompressor_for(dictionary)
        self._zstd_lock = threading.Lock()  # a zstd decompressor is not safe for concurrent use
        self._cache = cache
        self._token = next(_tokens)
        self._inbox = index.sections[INBOX]

    @classmethod
    def open(cls, directory: str, name: str, cache: BlockCache | None = None) -> Segment:
        """Open segment ``name`` of archive ``directory`` (name checked by :func:`segment_path`): header, footer, index only."""
        path = segment_path(directory, name)
        return cls._open_path(path, cache if cache is not None else BlockCache())

    @classmethod
    def _open_path(cls, path: str, cache: BlockCache) -> Segment:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as error:
            raise _io_error(error, "opening an archive segment", path) from None
        try:
            header, dictionary, footer, index = _read_frame(fd, path)
            return cls(path, fd, header, dictionary, footer, index, cache)
        except BaseException as error:
            os.close(fd)
            if isinstance(error, OSError):
                raise _io_error(error, "reading an archive segment", path) from None
            raise

    def close(self) -> None:
        """Close the file and drop its cached blocks (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
            self._cache.drop(self._token)

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- blocks ---

    def _read(self, ref: BlockRef) -> bytes:
        if self._fd < 0:
            raise SyncStoreError("the archive segment is closed", path=self.path, hint="open it again")
        try:
            data = os.pread(self._fd, ref.compressed, ref.offset)
        except OSError as error:
            raise _io_error(error, "reading an archive segment", self.path) from None
        fmt.check_block(data, ref, self.path)
        return data

    def _decompress(self, ref: BlockRef, data: bytes) -> bytes:
        with self._zstd_lock:
            return fmt.decompress_block(data, ref, self._decompressor, self.path)

    def _block(self, section: int, number: int) -> object:
        """The decoded block ``number`` of ``section``: from the cache, or read, CRC-checked, decompressed, decoded and cached."""
        key = (self._token, section, number)
        found = self._cache.get(key)
        if found is not None:
            return found
        ref = self.index.sections[section][number]
        raw = self._decompress(ref, self._read(ref))
        following = fmt.next_key(self.index, section, number)
        if section == MESSAGES:
            decoded: object = fmt.decode_messages(raw, ref, following, self.path)
        else:
            decoded = fmt.decode_rows(raw, ref, following, self.footer.messages, self.path)
        self._cache.put(key, decoded, _decoded_size(ref))
        return decoded

    def _rows(self, section: int, number: int) -> list[tuple[int, ...]]:
        """The columns of block ``number`` of a row section (inbox, history, msg_ids)."""
        return self._block(section, number)  # type: ignore[return-value]

    def _records(self, ordinals: Iterable[int]) -> list[MessageRecord]:
        """The messages at ``ordinals`` (consecutive ordinals share their block's lookup)."""
        firsts = self.index.first_ordinals
        out: list[MessageRecord] = []
        block: MessageBlock | None = None
        start = end = 0
        for ordinal in ordinals:
            if not start <= ordinal < end:
                number = bisect.bisect_right(firsts, ordinal) - 1
                block = self._block(MESSAGES, number)  # type: ignore[assignment]
                start = firsts[number]
                end = start + len(block)  # type: ignore[arg-type]
            out.append(block.record(ordinal - start))  # type: ignore[union-attr]
        return out

    def may_hold(self, user: int) -> bool:
        """False if the segment certainly holds no inbox entry of ``user`` (key range, then the Bloom filter)."""
        header = self.header
        return header.first_user <= user <= header.last_user and fmt.filter_may_hold(self.index.user_filter, self.index.filter_hashes, user)

    # --- reads ---

    def read_range(self, user: int, since: int, limit: int) -> list[StoredMessage]:
        """``user``'s messages here with cursor > ``since``, ascending, at most ``limit`` -- what ``sync`` reads.

        Reads only the inbox blocks holding those entries and the messages
        blocks holding their messages.  Fewer than ``limit`` means the
        segment holds no more of them.
        """
        if limit <= 0 or not self.may_hold(user):
            return []
        number = max(0, fmt.find_block(self.index, INBOX, (user, since + 1)))
        cursors: list[int] = []
        ordinals: list[int] = []
        while number < len(self._inbox) and len(cursors) < limit:
            if self._inbox[number].key[0] > user:
                break
            users, block_cursors, block_ordinals = self._rows(INBOX, number)
            low = bisect.bisect_left(users, user)
            high = bisect.bisect_right(users, user, low)
            at = bisect.bisect_right(block_cursors, since, low, high)
            stop = min(high, at + limit - len(cursors))
            cursors += block_cursors[at:stop]
            ordinals += block_ordinals[at:stop]
            if high < len(users):
                break  # the user's run ends in this block
            number += 1
        return list(map(_new, repeat(StoredMessage), map(_prepend, cursors, self._records(ordinals))))

    def get(self, msg_id: int) -> MessageRecord | None:
        """The message ``msg_id`` if this segment holds it, else None (one msg_ids block and one messages block)."""
        if not self.header.min_msg_id <= msg_id <= self.header.max_msg_id:
            return None
        number = fmt.find_block(self.index, MSG_IDS, (msg_id,))
        if number < 0:
            return None
        ids, ordinals = self._rows(MSG_IDS, number)
        at = bisect.bisect_left(ids, msg_id)
        if at == len(ids) or ids[at] != msg_id:
            return None
        return self._records((ordinals[at],))[0]

    def history(self, user: int, conv: int, before: int | None, limit: int) -> list[StoredMessage]:
        """``user``'s messages of ``conv`` here with cursor < ``before`` (None: all), newest first, at most ``limit``."""
        if limit <= 0 or not self.may_hold(user):
            return []
        bound = (1 << 64) if before is None else before
        number = fmt.find_block(self.index, HISTORY, (user, conv, bound - 1)) if bound > 0 else -1
        cursors: list[int] = []
        ordinals: list[int] = []
        while number >= 0 and len(cursors) < limit:
            users, convs, block_cursors, block_ordinals = self._rows(HISTORY, number)
            low = bisect.bisect_left(users, user)
            high = bisect.bisect_right(users, user, low)
            low = bisect.bisect_left(convs, conv, low, high)
            high = bisect.bisect_right(convs, conv, low, high)
            stop = bisect.bisect_left(block_cursors, bound, low, high)
            start = max(low, stop - (limit - len(cursors)))
            cursors += block_cursors[start:stop][::-1]
            ordinals += block_ordinals[start:stop][::-1]
            if low > 0:
                break  # the (user, conv) run starts in this block
            number -= 1
        return list(map(_new, repeat(StoredMessage), map(_prepend, cursors, self._records(ordinals))))

    # --- verification ---

    def verify(self, deep: bool = False) -> VerifyReport:
        """Check the whole file as it is on disk now; :class:`CorruptionError` (file, offset) at the first damage.

        Quick (``deep=False``): header, dictionary, footer and index decoded
        again from the file, and the CRC-32C of every block -- every byte of
        the file is under one of these CRCs.  ``deep=True`` also decompresses
        and decodes every block (row counts, key order within and across
        blocks, ordinals in range) and checks that the sections agree:
        history holds exactly the inbox's entries, msg_ids exactly the
        messages, each message's refs count the entries that reference it,
        the header's user and msg_id ranges are the rows'.  Memory: one block
        at a time (the agreement is checked through sums of hashes).
        """
        started = time.perf_counter()
        if self._fd < 0:
            raise SyncStoreError("the archive segment is closed", path=self.path, hint="open it again")
        try:
            header, _dictionary, footer, index = _read_frame(self._fd, self.path)
            size = self.size
            if (header, footer) != (self.header, self.footer) or index.blocks != self.index.blocks:
                raise CorruptionError("archive segment changed on disk since it was opened", path=self.path, offset=0, hint="segments are immutable: find what rewrote it")
            sums = _DeepSums() if deep else None
            for batch in _batches(index.blocks):  # one read per ~4 MiB of blocks: a read per 8 KiB block halved the speed
                start = batch[0].offset
                data = os.pread(self._fd, batch[-1].offset + batch[-1].compressed - start, start)
                with memoryview(data) as view:
                    for ref in batch:
                        block = view[ref.offset - start : ref.offset - start + ref.compressed]
                        fmt.check_block(block, ref, self.path)
                        if sums is not None:
                            sums.add(self, ref, self._decompress(ref, bytes(block)))
        except OSError as error:
            raise _io_error(error, "verifying an archive segment", self.path) from None
        if sums is not None:
            sums.check(self)
        return VerifyReport(self.path, size, footer.blocks, footer.messages, footer.entries, deep, time.perf_counter() - started)


def _batches(blocks: tuple[BlockRef, ...], size: int = 4 << 20) -> list[list[BlockRef]]:
    """The blocks (in file order) in runs of about ``size`` bytes, each run read at once."""
    batches: list[list[BlockRef]] = [[]]
    total = 0
    for ref in blocks:
        if total >= size:
            batches.append([])
            total = 0
        batches[-1].append(ref)
        total += ref.compressed
    return batches


def _prepend(cursor: int, record: MessageRecord) -> tuple[object, ...]:
    return (cursor, *record)


def _read_frame(fd: int, path: str) -> tuple[fmt.Header, bytes | None, fmt.Footer, fmt.Index]:
    """Header, dictionary, footer and index of the segment open at ``fd``, each checked -- never a data block."""
    size = os.fstat(fd).st_size
    header = fmt.decode_header(os.pread(fd, fmt.HEADER_SIZE, 0), path)
    dictionary = fmt.check_dictionary(os.pread(fd, header.dictionary_size, fmt.HEADER_SIZE), header, path) if header.dictionary_size else None
    footer = fmt.decode_footer(os.pread(fd, fmt.FOOTER_SIZE, max(0, size - fmt.FOOTER_SIZE)), size, header, path)
    index = fmt.decode_index(os.pread(fd, size - fmt.FOOTER_SIZE - footer.index_offset, footer.index_offset), footer, header, path)
    return header, dictionary, footer, index


class _DeepSums:
    """What a deep verify accumulates block by block: each section's rows as sums of hashes, and extremes."""

    def __init__(self) -> None:
        self.numbers = {section: 0 for section in fmt.SECTIONS}
        self.inbox = self.history = 0  # sum of hash((user, cursor, ordinal))
        self.refs = self.referenced = 0  # sum of refs x hash(ordinal) / of hash(ordinal) per inbox entry
        self.convs = self.history_convs = 0  # sum of refs x hash((conv, ordinal)) / per history entry
        self.ids = self.id_rows = 0  # sum of hash((msg_id, ordinal)) over messages / over msg_ids
        self.ref_total = 0
        self.users: list[int] = []
        self.msg_ids: list[int] = []

    def add(self, segment: Segment, ref: BlockRef, raw: bytes) -> None:
        number = self.numbers[ref.section]
        self.numbers[ref.section] += 1
        following = fmt.next_key(segment.index, ref.section, number)
        if ref.section == MESSAGES:
            block = fmt.decode_messages(raw, ref, following, segment.path, every_row=True)
            first = ref.key[2]
            numbers = range(first, first + ref.rows)
            ids = [record.msg_id for record in block.records]
            self.ref_total += sum(block.refs)
            self.refs += sum(r * hash((o, 0)) for r, o in zip(block.refs, numbers))
            self.convs += sum(r * hash((rec.conv, o)) for r, rec, o in zip(block.refs, block.records, numbers))
            self.ids += sum(map(hash, zip(ids, numbers)))
            self.msg_ids += (min(ids), max(ids))
            return
        columns = fmt.decode_rows(raw, ref, following, segment.footer.messages, segment.path, every_row=True)
        if ref.section == INBOX:
            users, cursors, ordinals = columns
            self.inbox += sum(map(hash, zip(users, cursors, ordinals)))
            self.referenced += sum(map(hash, zip(ordinals, repeat(0))))
            self.users += (users[0], users[-1])
        elif ref.section == HISTORY:
            users, convs, cursors, ordinals = columns
            self.history += sum(map(hash, zip(users, cursors, ordinals)))
            self.history_convs += sum(map(hash, zip(convs, ordinals)))
        else:
            self.id_rows += sum(map(hash, zip(*columns)))

    def check(self, segment: Segment) -> None:
        header, footer = segment.header, segment.footer
        at = footer.index_offset
        problems = []
        if self.ref_total != footer.entries or self.refs != self.referenced:
            problems.append("the messages' reference counts do not count the inbox entries")
        if self.inbox != self.history:
            problems.append("the history section does not hold exactly the inbox's entries")
        if self.history_convs != self.convs:
            problems.append("the history section files entries under conversations their messages are not in")
        if self.ids != self.id_rows:
            problems.append("the msg_ids section does not index exactly the messages")
        if (min(self.users), max(self.users)) != (header.first_user, header.last_user) or (min(self.msg_ids), max(self.msg_ids)) != (header.min_msg_id, header.max_msg_id):
            problems.append("the header's user or msg_id range is not the rows'")
        if problems:
            raise CorruptionError(f"archive segment sections disagree: {'; '.join(problems)}", path=segment.path, offset=at)


# --- writing ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """A segment written: its name and path, size, counts, month and ranges (what a manifest records)."""

    name: str
    path: str
    bytes: int
    messages: int
    entries: int
    year: int
    month: int
    first_user: int
    last_user: int
    min_msg_id: int
    max_msg_id: int
    index_crc: int  # the footer's CRC of the index (which holds every block's CRC)


def write_segment(
    directory: str,
    name: str,
    year: int,
    month: int,
    messages: Iterable[MessageRecord],
    entries: Iterable[Entry],
    options: Options = Options(),
    *,
    file_mode: int = DEFAULT_FILE_MODE,
    fs: FileSystem = OS_FS,
) -> SegmentInfo:
    """Write a segment of ``messages`` and ``entries`` as ``directory/name``, crash-safely (module docstring); its info.

    Inputs as :func:`syncstore._segformat.encode_segment` takes them
    (:class:`InvalidArgument` before any file is created if they are not
    valid; also for a name that is not a segment file name of ``year-month``,
    or one that exists: segments are immutable).  The file is verified
    (every CRC, every count, and counts against the inputs) before it gets
    its name; on any failure the temporary file is removed and nothing is named.
    """
    parsed = fmt.parse_file_name(name)
    if parsed is None or parsed[:2] != (year, month):
        raise InvalidArgument(f"{name!r} is not a segment file name of {year:04d}-{month:02d} (seg-YYYY-MM-<20 digits>.arc)", key="name")
    final = os.path.join(directory, name)
    if os.path.lexists(final):
        raise InvalidArgument(f"the archive segment {name} exists already: segments are never rewritten", path=final, key="name")
    messages, entries = list(messages), list(entries)
    chunks = fmt.encode_segment(year, month, messages, entries, options)
    first = next(chunks)  # validates the inputs before any file exists
    temp = os.path.join(directory, f"{TEMP_PREFIX}{os.getpid()}-{next(_temp_numbers)}{TEMP_SUFFIX}")
    try:
        fd = create_file(fs, temp, os.O_WRONLY | os.O_EXCL, file_mode)
        try:
            offset = 0
            for chunk in itertools.chain((first,), chunks):
                fs.pwrite(fd, chunk, offset)
                offset += len(chunk)
            fs.fsync(fd)
        finally:
            fs.close(fd)
        with Segment._open_path(temp, BlockCache(0)) as written:  # our own file, just written: no name check
            written.verify()
            if (written.footer.messages, written.footer.entries) != (len(messages), len(entries)):
                raise CorruptionError(
                    f"the segment written holds {written.footer.messages} messages and {written.footer.entries} entries, not the "
                    f"{len(messages)} and {len(entries)} given",
                    path=temp,
                    offset=written.footer.index_offset,
                )
            info = _info(name, final, written)
        fs.rename(temp, final)
        fs.fsync_dir(directory)
    except BaseException as error:
        try:
            fs.unlink(temp)
        except OSError:
            pass
        if isinstance(error, OSError):
            raise _io_error(error, "writing an archive segment", temp) from None
        raise
    return info


def _info(name: str, final: str, segment: Segment) -> SegmentInfo:
    h, f = segment.header, segment.footer
    return SegmentInfo(name, final, segment.size, f.messages, f.entries, h.year, h.month, h.first_user, h.last_user, h.min_msg_id, h.max_msg_id, f.index_crc)
