"""Byte format of archive segments (one month's archived messages) -- pure, no I/O.

All integers are unsigned big-endian; CRC-32C as everywhere in syncstore
(``_codec.crc32c_of``).  The same tables, with the reasons, are in
docs/format.md ("Archive segments") and docs/design.md ("Archive segments").

A segment holds, for some users, a prefix of their inboxes: every message
once (its head and body, as state format 3 stores it) and every inbox entry
(user, cursor) that references one.  File layout::

    header | dictionary | data blocks (4 sections, in this order) | index | footer

    header (60 bytes)
    0       8     magic b"SSARCH\\r\\n"
    8       2     format version, 1
    10      2     year (UTC) of the month the segment archives
    12      1     month, 1..12
    13      1     zstd level the blocks were compressed with (informational)
    14      2     reserved, 0
    16      8     first user: the smallest user id with an inbox entry here
    24      8     last user: the largest
    32      8     smallest msg_id
    40      8     largest msg_id
    48      4     D: dictionary length (0: blocks are compressed without one)
    52      4     CRC-32C of the D dictionary bytes (0 when D = 0)
    56      4     CRC-32C of bytes 0..55

    dictionary (D bytes at offset 60): a zstd dictionary (trained on the month's texts)

    data block (C bytes; where and how big is in the index, not in the block):
                  one zstd frame (no checksum, content size or dictionary id in it:
                  the index holds the CRC-32C and both lengths) of U raw bytes

    index (at the footer's index offset): K block entries, then the user filter
    block entry (52 bytes)
    0       1     section: 1 messages, 2 inbox, 3 history, 4 msg_ids
    1       3     reserved, 0
    4       4     N: rows in the block, >= 1
    8       8     offset of the block in the file
    16      4     C: compressed length, 1 .. MAX_COMPRESSED
    20      4     U: raw length, .. MAX_RAW
    24      4     CRC-32C of the C compressed bytes
    28      24    first key of the block: three u64 (below; unused ones 0)
    user filter (B bytes): a Bloom filter of the inbox's user ids (below)

    footer (60 bytes, the last bytes of the file)
    0       8     index offset
    8       4     K: number of blocks
    12      4     B: bytes of the user filter
    16      1     hash functions of the user filter (1..32)
    17      3     reserved, 0
    20      8     messages
    28      8     inbox entries
    36      8     raw bytes: the sum of every block's U
    44      4     CRC-32C of the index (block entries and user filter)
    48      8     magic b"SSARCEND"
    56      4     CRC-32C of bytes 0..55

Sections, their rows, sort orders and block keys.  A block's raw bytes are
its columns one after the other, each column's N values packed big-endian;
in the inbox, history and msg_ids sections each column is **byte-shuffled**
(all first bytes, then all second bytes, ...: zstd then sees the runs that
sorted and small numbers make), in the messages section not (see
``_COLUMNS``); a column marked delta holds each value minus the previous
row's (mod 2^width; the first row's minus 0)::

    1 messages  sorted by (conv, msg_id); row i of the section is message
                ordinal i, what the other sections point to
                columns: conv u64 delta, msg_id u64 delta, sender u64,
                client_seq u64, ts_ms - msg_id's ms (mod 2^64) u64, refs u32
                (inbox entries here that reference it, >= 1), body length
                u32, priority u8; then the bodies, back to back
                key: (conv, msg_id, ordinal of the block's first row)
    2 inbox     sorted by (user, cursor): what sync reads
                columns: user u64, cursor u64 delta, ordinal u32
                key: (user, cursor, 0)
    3 history   the inbox again, sorted by (user, conv, cursor): what
                history(user, conv, before) reads, newest first
                columns: user u64, conv u64 delta, cursor u64 delta, ordinal u32
                key: (user, conv, cursor)
    4 msg_ids   sorted by msg_id: what get(msg_id) reads
                columns: msg_id u64 delta, ordinal u32
                key: (msg_id, 0, 0)

Keys are strictly increasing within a section (across its blocks too).
A message's ms is ``(msg_id >> 22) + 1577836800000`` (``_ids``); storing
ts_ms relative to it makes the column the client's lag, a small number.

User filter: a Bloom filter (Bloom 1970; double hashing, Kirsch and
Mitzenmacher 2006) of every user id of the inbox section: B bytes, bit j of
the filter is bit ``j % 8`` of byte ``j // 8``; a user sets the bits
``(h1 + i * h2) mod 8B`` for i < hashes, where ``h1 = mix(user)``,
``h2 = mix(h1 ^ 0x9E3779B97F4A7C15) | 1`` and ``mix`` is SplitMix64's
finaliser (Steele, Lea, Flood 2014).  10 bits per user and 7 hashes: a
user who has nothing here reads a block anyway in ~0.8 % of segments; a
user who has something is never skipped.

Every byte is under a CRC: the header's covers it, the dictionary's and each
block's are in the header and the index, the index's is in the footer, the
footer's is its own.  A decoder raises :class:`CorruptionError` naming the
file and the offset of the failed check.  Encoding is deterministic: the
same messages, entries and options give the same bytes (zstd's output is
fixed for one zstd version, level and dictionary).
"""

from __future__ import annotations

import bisect
import functools
import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import lt
from typing import NamedTuple

import zstandard
from crc32c import crc32c

from ._codec import crc32c_of
from .errors import CorruptionError, InvalidArgument
from .model import MessageRecord

__all__ = [
    "MESSAGES",
    "INBOX",
    "HISTORY",
    "MSG_IDS",
    "SECTIONS",
    "Options",
    "Entry",
    "Header",
    "Footer",
    "BlockRef",
    "Index",
    "MessageBlock",
    "encode_segment",
    "decode_header",
    "check_dictionary",
    "decode_footer",
    "decode_index",
    "check_block",
    "decompress_block",
    "decode_messages",
    "decode_rows",
    "train_dictionary",
    "filter_may_hold",
    "file_name",
    "parse_file_name",
]

# --- constants --------------------------------------------------------------------------

MAGIC = b"SSARCH\r\n"
FOOTER_MAGIC = b"SSARCEND"
VERSION = 1
MESSAGES, INBOX, HISTORY, MSG_IDS = 1, 2, 3, 4
SECTIONS = {MESSAGES: "messages", INBOX: "inbox", HISTORY: "history", MSG_IDS: "msg_ids"}

HEADER_FMT = ">8sHHBBHQQQQII"  # magic, version, year, month, level, reserved, first/last user, min/max msg_id, D, dict CRC
HEADER_BODY_SIZE = 56
assert struct.calcsize(HEADER_FMT) == HEADER_BODY_SIZE
CRC_FMT = ">I"
CRC_SIZE = 4
assert struct.calcsize(CRC_FMT) == CRC_SIZE
HEADER_SIZE = HEADER_BODY_SIZE + CRC_SIZE
ENTRY_FMT = ">B3xIQIII3Q"  # section, reserved, rows, offset, C, U, CRC, first key
ENTRY_SIZE = 52
assert struct.calcsize(ENTRY_FMT) == ENTRY_SIZE
FOOTER_FMT = ">QIIB3xQQQI8s"  # index offset, blocks, filter bytes, hashes, reserved, messages, entries, raw, index CRC, magic
FOOTER_BODY_SIZE = 56
assert struct.calcsize(FOOTER_FMT) == FOOTER_BODY_SIZE
FOOTER_SIZE = FOOTER_BODY_SIZE + CRC_SIZE

MAX_RAW = 1 << 27  # one block's raw bytes (a block holds whole messages: one 64 MiB body makes a big one)
MAX_COMPRESSED = MAX_RAW + (1 << 20)  # zstd's bound for incompressible data, with room
MAX_DICTIONARY = 1 << 20
MAX_MESSAGES = (1 << 32) - 1  # ordinals are u32
FILTER_BITS_PER_USER = 10
FILTER_HASHES = 7
EPOCH_MS = 1_577_836_800_000  # syncstore._ids: msg_id bits 63..22 count ms since 2020-01-01 UTC
_U64 = (1 << 64) - 1

_header = struct.Struct(HEADER_FMT)
_crc = struct.Struct(CRC_FMT)
_entry = struct.Struct(ENTRY_FMT)
_footer = struct.Struct(FOOTER_FMT)
_new = tuple.__new__

#: (width in bytes, delta-coded, byte-shuffled) of each column, per section; messages add the bodies.
#: The messages section's columns are not shuffled: measured, shuffling them saved ~1 % of its bytes
#: and cost a third of a block's decode time (what a cold read pays); the small rows of the other
#: sections shrink by 30-45 % shuffled, and are decoded in C-level loops either way.
_COLUMNS: dict[int, tuple[tuple[int, bool, bool], ...]] = {
    MESSAGES: ((8, True, False), (8, True, False), (8, False, False), (8, False, False), (8, False, False), (4, False, False), (4, False, False), (1, False, False)),
    INBOX: ((8, False, True), (8, True, True), (4, False, True)),
    HISTORY: ((8, False, True), (8, True, True), (8, True, True), (4, False, True)),
    MSG_IDS: ((8, True, True), (4, False, True)),
}
#: Raw bytes of one row (messages: before its body).
ROW_SIZE = {section: sum(width for width, _, _ in columns) for section, columns in _COLUMNS.items()}
_FORMATS = {1: "B", 4: "I", 8: "Q"}


class Entry(NamedTuple):
    """One inbox entry to archive: ``user``'s entry at ``cursor`` references message ``msg_id``."""

    user: int
    cursor: int
    msg_id: int


@dataclass(frozen=True, slots=True)
class Options:
    """How a segment is compressed (docs/design.md, "Archive segments": chosen by measurement).

    ``block_bytes``: raw bytes after which a block is cut (a block holds whole
    rows, so one large body makes a larger block).  ``level``: zstd level.
    ``dictionary``: a zstd dictionary stored in the segment (``train_dictionary``), or None.
    """

    block_bytes: int = 8 * 1024
    level: int = 9
    dictionary: bytes | None = None

    def __post_init__(self) -> None:
        if not 512 <= self.block_bytes <= MAX_RAW:
            raise InvalidArgument(f"block_bytes must be 512..{MAX_RAW}, got {self.block_bytes}", key="block_bytes")
        if not 1 <= self.level <= 22:
            raise InvalidArgument(f"zstd level must be 1..22, got {self.level}", key="level")
        if self.dictionary is not None and not 8 <= len(self.dictionary) <= MAX_DICTIONARY:
            raise InvalidArgument(f"a dictionary is 8..{MAX_DICTIONARY} bytes, got {len(self.dictionary)}", key="dictionary")


@dataclass(frozen=True, slots=True)
class Header:
    """The decoded header of a segment."""

    year: int
    month: int
    level: int
    first_user: int
    last_user: int
    min_msg_id: int
    max_msg_id: int
    dictionary_size: int
    dictionary_crc: int


@dataclass(frozen=True, slots=True)
class Footer:
    """The decoded footer: where the index is, and the counts everything else must add up to."""

    index_offset: int
    blocks: int
    filter_bytes: int
    filter_hashes: int
    messages: int
    entries: int
    raw_bytes: int
    index_crc: int


class BlockRef(NamedTuple):
    """One block entry of the index: which section, rows, where, lengths, CRC, first key."""

    section: int
    rows: int
    offset: int
    compressed: int
    raw: int
    crc: int
    key: tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Index:
    """A segment's index, decoded: each section's blocks in key order, first keys for bisecting, the user filter."""

    blocks: tuple[BlockRef, ...]  # every block, in file order
    sections: dict[int, tuple[BlockRef, ...]]
    keys: dict[int, list[tuple[int, ...]]]  # per section, each block's first key (as many fields as the key has)
    first_ordinals: list[int]  # per messages block, the ordinal of its first row
    user_filter: bytes
    filter_hashes: int


class MessageBlock:
    """A decoded messages block: its columns, and each row's record built on first use (then kept).

    A cold read needs a few rows of each block it reads: building only those
    records halved its time (docs/benchmarks.md); a warm read finds them built.
    """

    __slots__ = ("_columns", "_ends", "_raw", "_records", "refs")

    def __init__(self, columns: list[tuple[int, ...]], ends: list[int], raw: bytes, refs: tuple[int, ...]) -> None:
        self._columns = columns
        self._ends = ends
        self._raw = raw
        self._records: list[MessageRecord | None] = [None] * len(refs)
        self.refs = refs

    def __len__(self) -> int:
        return len(self.refs)

    def record(self, row: int) -> MessageRecord:
        """The message in row ``row`` of the block."""
        found = self._records[row]
        if found is None:
            convs, ids, senders, seqs, lags, _refs, _lengths, priorities = self._columns
            msg_id = ids[row]
            stamp = (lags[row] + (msg_id >> 22) + EPOCH_MS) & _U64
            found = self._records[row] = _new(MessageRecord, (msg_id, senders[row], convs[row], seqs[row], stamp, priorities[row], self._raw[self._ends[row] : self._ends[row + 1]]))
        return found

    @property
    def records(self) -> tuple[MessageRecord, ...]:
        """Every record of the block, in row order."""
        return tuple(map(self.record, range(len(self.refs))))


# --- columns ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _struct(count: int, width: int) -> struct.Struct:
    # Compiled once per (rows, width): parsing the format per column was a fifth of a cold read.
    return struct.Struct(f">{count}{_FORMATS[width]}")


def _pack(values: Sequence[int], width: int, delta: bool, shuffle: bool) -> bytes:
    """A column: ``values`` (deltas if ``delta``) packed big-endian, then byte-shuffled if ``shuffle``."""
    if delta:
        mask = (1 << (8 * width)) - 1
        values = [(b - a) & mask for a, b in zip([0, *values[:-1]], values)]
    packed = _struct(len(values), width).pack(*values)
    return b"".join([packed[i::width] for i in range(width)]) if shuffle and width > 1 else packed


def _unpack(raw: bytes | memoryview, at: int, count: int, width: int, delta: bool, shuffle: bool) -> tuple[int, ...]:
    """The ``count`` values of the column at ``raw[at:]`` (inverse of :func:`_pack`; C-level loops only)."""
    size = count * width
    if shuffle and width > 1:
        packed = bytearray(size)
        for plane in range(width):
            packed[plane::width] = raw[at + plane * count : at + (plane + 1) * count]
        values = _struct(count, width).unpack(packed)
    else:
        values = _struct(count, width).unpack_from(raw, at)
    if delta:
        return tuple(map(((1 << (8 * width)) - 1).__and__, accumulate(values)))
    return values


def _columns(section: int, raw: bytes | memoryview, count: int) -> tuple[list[tuple[int, ...]], int]:
    """Every column of a block of ``section`` (``count`` rows), and where its columns end."""
    columns, at = [], 0
    for width, delta, shuffle in _COLUMNS[section]:
        columns.append(_unpack(raw, at, count, width, delta, shuffle))
        at += count * width
    return columns, at


def _encode_block(section: int, columns: Sequence[Sequence[int]], bodies: Sequence[bytes] = ()) -> bytes:
    return b"".join([*(_pack(col, *spec) for col, spec in zip(columns, _COLUMNS[section])), *bodies])


# --- the user filter ----------------------------------------------------------------------


def _mix(value: int) -> int:
    """SplitMix64's finaliser: a fixed, well-spread 64-bit hash of a 64-bit integer."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _U64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _U64
    return value ^ (value >> 31)


def _filter_bits(user: int, bits: int, hashes: int) -> Iterator[int]:
    h1 = _mix(user)
    h2 = _mix(h1 ^ 0x9E3779B97F4A7C15) | 1
    return ((h1 + i * h2) % bits for i in range(hashes))


def _build_filter(users: Iterable[int], count: int) -> bytes:
    size = max(8, (count * FILTER_BITS_PER_USER + 7) // 8)
    bits = bytearray(size)
    for user in users:
        for bit in _filter_bits(user, size * 8, FILTER_HASHES):
            bits[bit >> 3] |= 1 << (bit & 7)
    return bytes(bits)


def filter_may_hold(user_filter: bytes, hashes: int, user: int) -> bool:
    """False only if ``user`` has no inbox entry in the segment (a Bloom filter: never a false "no")."""
    return all(user_filter[bit >> 3] >> (bit & 7) & 1 for bit in _filter_bits(user, len(user_filter) * 8, hashes))


# --- encoding ----------------------------------------------------------------------------


def _cut(sizes: Iterable[int], target: int) -> Iterator[tuple[int, int]]:
    """(start, end) row ranges of blocks: a block is cut once its rows reach ``target`` raw bytes."""
    start = size = 0
    index = -1
    for index, row in enumerate(sizes):
        size += row
        if size >= target:
            yield start, index + 1
            start, size = index + 1, 0
    if start <= index:
        yield start, index + 1


def _ms_of(msg_id: int) -> int:
    return (msg_id >> 22) + EPOCH_MS


def encode_segment(year: int, month: int, messages: Iterable[MessageRecord], entries: Iterable[Entry], options: Options = Options()) -> Iterator[bytes]:
    """The bytes of a segment of ``messages`` and the inbox ``entries`` that reference them, in chunks (concatenate them).

    Inputs may come in any order; every message must be referenced by at
    least one entry and every entry must reference a given message
    (:class:`InvalidArgument` otherwise, before anything is yielded: msg_ids
    and (user, cursor) pairs must be unique, there must be at least one
    message, at most 2^32 - 1).  Memory: the inputs, sorted, plus one block.
    The same inputs and options always give the same bytes.
    """
    if not (1 <= month <= 12 and 1970 <= year <= 9999):
        raise InvalidArgument(f"a segment archives one month: year 1970..9999 and month 1..12, got {year}-{month}", key="month")
    msgs, rows = list(messages), [Entry(*entry) for entry in entries]
    _check_inputs(msgs, rows)
    msgs.sort(key=lambda m: (m.conv, m.msg_id))
    rows.sort()
    if not msgs or not rows:
        raise InvalidArgument("a segment holds at least one message and one inbox entry", key="messages")
    if len(msgs) > MAX_MESSAGES:
        raise InvalidArgument(f"a segment holds at most {MAX_MESSAGES} messages, got {len(msgs)}", key="messages")
    ordinal = {m.msg_id: i for i, m in enumerate(msgs)}
    if len(ordinal) != len(msgs):
        raise InvalidArgument("two messages to archive have the same msg_id", key="messages")
    refs = [0] * len(msgs)
    inbox: list[tuple[int, int, int]] = []  # (user, cursor, ordinal)
    previous = None
    for user, cursor, msg_id in rows:
        if (user, cursor) == previous:
            raise InvalidArgument(f"user {user} has two entries at cursor {cursor}", key=(user, cursor))
        previous = (user, cursor)
        number = ordinal.get(msg_id)
        if number is None:
            raise InvalidArgument(f"the entry of user {user} at cursor {cursor} references msg_id {msg_id}, which is not archived with it", key=msg_id)
        refs[number] += 1
        inbox.append((user, cursor, number))
    if 0 in refs:
        raise InvalidArgument(f"msg_id {msgs[refs.index(0)].msg_id} is archived but no inbox entry references it", key=msgs[refs.index(0)].msg_id)
    dictionary = options.dictionary or b""
    compressor = _compressor(options)
    header = _header.pack(
        MAGIC, VERSION, year, month, options.level, 0, rows[0].user, rows[-1].user,
        min(ordinal), max(ordinal), len(dictionary), crc32c_of(dictionary) if dictionary else 0,
    )
    yield header + _crc.pack(crc32c_of(header)) + dictionary
    offset = HEADER_SIZE + len(dictionary)
    refs_out: list[BlockRef] = []
    raw_total = 0

    def block(section: int, raw: bytes, count: int, key: tuple[int, int, int]) -> bytes:
        nonlocal offset, raw_total
        data = compressor.compress(raw)
        refs_out.append(BlockRef(section, count, offset, len(data), len(raw), crc32c_of(data), key))
        offset += len(data)
        raw_total += len(raw)
        return data

    fixed = ROW_SIZE[MESSAGES]
    for start, end in _cut((fixed + len(m.body) for m in msgs), options.block_bytes):
        part = msgs[start:end]
        columns = (
            [m.conv for m in part], [m.msg_id for m in part], [m.sender for m in part], [m.client_seq for m in part],
            [(m.ts_ms - _ms_of(m.msg_id)) & _U64 for m in part], refs[start:end], [len(m.body) for m in part], [m.priority for m in part],
        )
        yield block(MESSAGES, _encode_block(MESSAGES, columns, [m.body for m in part]), end - start, (part[0].conv, part[0].msg_id, start))
    history = sorted((user, msgs[number].conv, cursor, number) for user, cursor, number in inbox)
    by_id = sorted((m.msg_id, number) for number, m in enumerate(msgs))
    for section, table, keys in ((INBOX, inbox, 2), (HISTORY, history, 3), (MSG_IDS, by_id, 1)):
        per_row = ROW_SIZE[section]
        for start, end in _cut(repeat(per_row, len(table)), options.block_bytes):
            rows_part = table[start:end]
            key = (*rows_part[0][:keys], 0, 0)[:3]
            yield block(section, _encode_block(section, list(zip(*rows_part))), end - start, key)  # type: ignore[arg-type]
    index = b"".join(_entry.pack(r.section, r.rows, r.offset, r.compressed, r.raw, r.crc, *r.key) for r in refs_out)
    users = sorted({user for user, _, _ in inbox})
    index += _build_filter(users, len(users))
    footer = _footer.pack(offset, len(refs_out), len(index) - len(refs_out) * ENTRY_SIZE, FILTER_HASHES, len(msgs), len(inbox), raw_total, crc32c_of(index), FOOTER_MAGIC)
    yield index + footer + _crc.pack(crc32c_of(footer))


def _u64(value: object) -> bool:
    return type(value) is int and 0 <= value <= _U64  # type: ignore[operator]


def _check_inputs(msgs: Sequence[MessageRecord], rows: Sequence[Entry]) -> None:
    """:class:`InvalidArgument` unless every field fits its column (nothing is encoded before this passes)."""
    for m in msgs:
        if not (_u64(m.msg_id) and _u64(m.sender) and _u64(m.conv) and _u64(m.client_seq) and _u64(m.ts_ms)):
            raise InvalidArgument(f"message {m.msg_id!r} has a field that is not an unsigned 64-bit integer", key=m.msg_id)
        if type(m.priority) is not int or not 0 <= m.priority <= 255 or not isinstance(m.body, bytes) or len(m.body) > MAX_RAW // 2:
            raise InvalidArgument(f"message {m.msg_id} has priority {m.priority!r} or a body that is not bytes of at most {MAX_RAW // 2}", key=m.msg_id)
    for row in rows:
        if not (_u64(row.user) and _u64(row.cursor)):
            raise InvalidArgument(f"inbox entry {tuple(row)!r}: user and cursor are unsigned 64-bit integers", key=tuple(row))


def _compressor(options: Options) -> zstandard.ZstdCompressor:
    dictionary = zstandard.ZstdCompressionDict(options.dictionary) if options.dictionary else None
    return zstandard.ZstdCompressor(level=options.level, dict_data=dictionary, write_checksum=False, write_content_size=False, write_dict_id=False)


def train_dictionary(samples: Sequence[bytes], size: int = 32 * 1024) -> bytes | None:
    """A zstd dictionary of at most ``size`` bytes trained on ``samples`` (message bodies), or None if they are too few.

    Deterministic (single-threaded fastcover with fixed parameters): the
    same samples in the same order give the same dictionary, so a
    compaction re-run writes the same bytes.
    """
    if len(samples) < 32 or sum(map(len, samples)) < 4 * size:
        return None
    try:
        trained = zstandard.train_dictionary(size, list(samples), k=200, d=8, threads=0, split_point=1.0)
    except zstandard.ZstdError:
        return None  # ZDICT found nothing worth a dictionary in these samples
    return trained.as_bytes()


def decompressor_for(dictionary: bytes | None) -> zstandard.ZstdDecompressor:
    """The decompressor of a segment's blocks."""
    return zstandard.ZstdDecompressor(dict_data=zstandard.ZstdCompressionDict(dictionary) if dictionary else None)


# --- decoding ------------------------------------------------------------------------------


def decode_header(data: bytes, path: str | None = None) -> Header:
    """Decode and check the 60 header bytes; :class:`CorruptionError` at the failed check's offset."""
    if len(data) < HEADER_SIZE:
        raise CorruptionError(f"archive segment is {len(data)} bytes, shorter than its {HEADER_SIZE}-byte header", path=path, offset=len(data))
    magic, version, year, month, level, reserved, first_user, last_user, min_id, max_id, dsize, dcrc = _header.unpack_from(data, 0)
    if magic != MAGIC:
        raise CorruptionError("not a syncstore archive segment (bad magic)", path=path, offset=0)
    if version != VERSION:
        raise CorruptionError(f"archive segment format version {version} is not supported (this syncstore reads {VERSION})", path=path, offset=8, hint="read it with the syncstore version that wrote it")
    (stored,) = _crc.unpack_from(data, HEADER_BODY_SIZE)
    if stored != crc32c_of(data[:HEADER_BODY_SIZE]):
        raise CorruptionError("archive segment header fails its CRC-32C", path=path, offset=HEADER_BODY_SIZE)
    if not 1 <= month <= 12 or reserved or first_user > last_user or min_id > max_id or dsize > MAX_DICTIONARY or (dsize == 0 and dcrc):
        raise CorruptionError("archive segment header holds impossible fields", path=path, offset=10)
    return Header(year, month, level, first_user, last_user, min_id, max_id, dsize, dcrc)


def check_dictionary(dictionary: bytes, header: Header, path: str | None = None) -> bytes | None:
    """The segment's dictionary (the D bytes after the header) after its CRC check, or None if it has none."""
    if len(dictionary) != header.dictionary_size:
        raise CorruptionError(f"archive segment ends inside its {header.dictionary_size}-byte dictionary", path=path, offset=HEADER_SIZE)
    if not dictionary:
        return None
    if crc32c_of(dictionary) != header.dictionary_crc:
        raise CorruptionError("archive segment dictionary fails its CRC-32C", path=path, offset=HEADER_SIZE)
    return dictionary


def decode_footer(data: bytes, size: int, header: Header, path: str | None = None) -> Footer:
    """Decode and check the footer ``data`` (the last FOOTER_SIZE bytes of a ``size``-byte file)."""
    at = size - FOOTER_SIZE
    if len(data) != FOOTER_SIZE or at < HEADER_SIZE + header.dictionary_size:
        raise CorruptionError(f"archive segment is {size} bytes, too short to hold its footer", path=path, offset=max(at, 0))
    index_offset, blocks, filter_bytes, hashes, messages, entries, raw, index_crc, magic = _footer.unpack_from(data, 0)
    if magic != FOOTER_MAGIC:
        raise CorruptionError("archive segment does not end with a footer (bad footer magic)", path=path, offset=at + 48)
    (stored,) = _crc.unpack_from(data, FOOTER_BODY_SIZE)
    if stored != crc32c_of(data[:FOOTER_BODY_SIZE]):
        raise CorruptionError("archive segment footer fails its CRC-32C", path=path, offset=at + FOOTER_BODY_SIZE)
    if index_offset + blocks * ENTRY_SIZE + filter_bytes != at or blocks < 4 or not 1 <= hashes <= 32 or filter_bytes < 8 or not 1 <= messages <= entries:
        raise CorruptionError(f"archive segment footer is impossible (index at {index_offset}, {blocks} blocks, filter {filter_bytes} B)", path=path, offset=at)
    return Footer(index_offset, blocks, filter_bytes, hashes, messages, entries, raw, index_crc)


def decode_index(data: bytes, footer: Footer, header: Header, path: str | None = None) -> Index:
    """Decode and check the index (the bytes from the footer's index offset to the footer).

    Checked: its CRC; every block's section, lengths and position (the blocks
    tile the file from the dictionary to the index, sections in order);
    first keys strictly increasing within each section; each section's rows
    adding up to the footer's counts; the raw total.
    """
    at = footer.index_offset
    if len(data) != footer.blocks * ENTRY_SIZE + footer.filter_bytes:
        raise CorruptionError("archive segment index is cut short", path=path, offset=at)
    if crc32c_of(data) != footer.index_crc:
        raise CorruptionError("archive segment index fails its CRC-32C", path=path, offset=at)
    blocks = [BlockRef(s, n, o, c, u, crc, (k1, k2, k3)) for s, n, o, c, u, crc, k1, k2, k3 in _entry.iter_unpack(data[: footer.blocks * ENTRY_SIZE])]
    sections: dict[int, list[BlockRef]] = {section: [] for section in SECTIONS}
    offset, raw, previous = HEADER_SIZE + header.dictionary_size, 0, MESSAGES
    for number, ref in enumerate(blocks):
        where = at + number * ENTRY_SIZE
        if ref.section not in SECTIONS or ref.section < previous or ref.offset != offset or not 1 <= ref.compressed <= MAX_COMPRESSED or ref.raw > MAX_RAW:
            raise CorruptionError(f"archive segment index entry {number} is impossible (section {ref.section}, offset {ref.offset}, {ref.compressed} B)", path=path, offset=where)
        fixed = ref.rows * ROW_SIZE[ref.section]
        if ref.rows < 1 or (ref.raw != fixed if ref.section != MESSAGES else ref.raw < fixed):
            raise CorruptionError(f"archive segment index entry {number}: {ref.rows} rows cannot fill {ref.raw} raw bytes", path=path, offset=where)
        previous, offset, raw = ref.section, offset + ref.compressed, raw + ref.raw
        sections[ref.section].append(ref)
    if offset != footer.index_offset or raw != footer.raw_bytes:
        raise CorruptionError(f"archive segment blocks end at {offset}, the index starts at {footer.index_offset} (raw {raw} of {footer.raw_bytes})", path=path, offset=at)
    counts = {section: sum(r.rows for r in refs) for section, refs in sections.items()}
    if counts != {MESSAGES: footer.messages, INBOX: footer.entries, HISTORY: footer.entries, MSG_IDS: footer.messages}:
        raise CorruptionError(f"archive segment sections hold {counts} rows, the footer says {footer.messages} messages and {footer.entries} entries", path=path, offset=at)
    widths = {MESSAGES: 2, INBOX: 2, HISTORY: 3, MSG_IDS: 1}
    keys = {section: [ref.key[: widths[section]] for ref in refs] for section, refs in sections.items()}
    for section, section_keys in keys.items():
        if any(a >= b for a, b in zip(section_keys, section_keys[1:])):
            raise CorruptionError(f"archive segment index: the {SECTIONS[section]} blocks' first keys are out of order", path=path, offset=at)
    first_ordinals = [ref.key[2] for ref in sections[MESSAGES]]
    if first_ordinals != [0, *accumulate(ref.rows for ref in sections[MESSAGES][:-1])]:
        raise CorruptionError("archive segment index: the messages blocks' first ordinals do not count their rows", path=path, offset=at)
    return Index(
        tuple(blocks), {s: tuple(r) for s, r in sections.items()}, keys, first_ordinals, bytes(data[footer.blocks * ENTRY_SIZE :]), footer.filter_hashes
    )


def check_block(data: bytes | memoryview, ref: BlockRef, path: str | None = None) -> None:
    """:class:`CorruptionError` unless ``data`` (the C bytes read at the block's offset) has the block's CRC."""
    if len(data) != ref.compressed:
        raise CorruptionError(f"archive segment block is cut short ({len(data)} of {ref.compressed} bytes)", path=path, offset=ref.offset)
    if crc32c(data) != ref.crc:
        raise CorruptionError(f"archive segment {SECTIONS[ref.section]} block fails its CRC-32C", path=path, offset=ref.offset)


def decompress_block(data: bytes, ref: BlockRef, decompressor: zstandard.ZstdDecompressor, path: str | None = None) -> bytes:
    """The raw bytes of a block whose CRC is checked (:func:`check_block`), their length checked."""
    try:
        raw = decompressor.decompress(data, max_output_size=ref.raw)
    except zstandard.ZstdError as error:
        raise CorruptionError(f"archive segment block does not decompress: {error}", path=path, offset=ref.offset) from None
    if len(raw) != ref.raw:
        raise CorruptionError(f"archive segment block decompresses to {len(raw)} bytes, not {ref.raw}", path=path, offset=ref.offset)
    return raw


def _check_order(keys: list[tuple[int, ...]], ref: BlockRef, next_key: tuple[int, ...] | None, messages: int, ordinals: Sequence[int], path: str | None, every_row: bool) -> None:
    """The block's first row is its index key, its last row is below the next block's, its ordinals are in range;
    with ``every_row``, every row is above the one before (a deep verify; reads trust the CRC'd order)."""
    width = len(keys[0])
    if keys[0] != ref.key[:width] or (next_key is not None and keys[-1] >= next_key) or (every_row and not all(map(lt, keys, keys[1:]))):
        raise CorruptionError(f"archive segment {SECTIONS[ref.section]} block's rows are not in key order after its index key", path=path, offset=ref.offset)
    if ordinals and max(ordinals) >= messages:
        raise CorruptionError(f"archive segment {SECTIONS[ref.section]} block references a message beyond the {messages} held", path=path, offset=ref.offset)


def decode_messages(raw: bytes, ref: BlockRef, next_key: tuple[int, ...] | None, path: str | None = None, every_row: bool = False) -> MessageBlock:
    """The messages of a decompressed messages block, its structure checked (lengths adding up, refs >= 1, order: :func:`_check_order`)."""
    columns, at = _columns(MESSAGES, raw, ref.rows)
    convs, ids, _senders, _seqs, _lags, refs, lengths, _priorities = columns
    if at + sum(lengths) != len(raw) or 0 in refs:
        raise CorruptionError("archive segment messages block's lengths do not add up", path=path, offset=ref.offset)
    keys: list[tuple[int, ...]] = list(zip(convs, ids)) if every_row else [(convs[0], ids[0]), (convs[-1], ids[-1])]
    _check_order(keys, ref, next_key, 0, (), path, every_row)
    return MessageBlock(columns, list(accumulate(lengths, initial=at)), raw, refs)


def decode_rows(raw: bytes, ref: BlockRef, next_key: tuple[int, ...] | None, messages: int, path: str | None = None, every_row: bool = False) -> list[tuple[int, ...]]:
    """The columns of a decompressed inbox, history or msg_ids block (one tuple per column), checked as :func:`_check_order` says."""
    columns, _ = _columns(ref.section, raw, ref.rows)
    width = {INBOX: 2, HISTORY: 3, MSG_IDS: 1}[ref.section]
    keys = list(zip(*columns[:width])) if every_row else [tuple(c[0] for c in columns[:width]), tuple(c[-1] for c in columns[:width])]
    _check_order(keys, ref, next_key, messages, columns[-1], path, every_row)
    return columns


def next_key(index: Index, section: int, number: int) -> tuple[int, ...] | None:
    """The first key of the block after block ``number`` of ``section`` (None for the last)."""
    keys = index.keys[section]
    return keys[number + 1] if number + 1 < len(keys) else None


def find_block(index: Index, section: int, key: tuple[int, ...]) -> int:
    """The number of the block of ``section`` that would hold ``key`` (-1: before the first block)."""
    return bisect.bisect_right(index.keys[section], key) - 1


def block_of_ordinal(index: Index, ordinal: int) -> int:
    """The number of the messages block holding message ``ordinal``."""
    return bisect.bisect_right(index.first_ordinals, ordinal) - 1



# --- file names ----------------------------------------------------------------------------

_NAME = re.compile(r"seg-(\d{4})-(\d{2})-(\d{20})\.arc")


def file_name(year: int, month: int, number: int) -> str:
    """The name of a segment file: its month and a number the archiver gives (names sort by month, then number)."""
    if not (1970 <= year <= 9999 and 1 <= month <= 12 and 0 <= number < 10**20):
        raise InvalidArgument(f"no segment name for {year}-{month} number {number}", key="name")
    return f"seg-{year:04d}-{month:02d}-{number:020d}.arc"


def parse_file_name(name: str) -> tuple[int, int, int] | None:
    """(year, month, number) of a segment file name, or None unless ``name`` is exactly one (no ``/``, no ``..``)."""
    found = _NAME.fullmatch(name) if isinstance(name, str) else None
    if found is None or not 1 <= int(found.group(2)) <= 12 or int(found.group(1)) < 1970:
        return None
    return int(found.group(1)), int(found.group(2)), int(found.group(3))
