"""Byte formats of snapshot files, their manifest and the store's snapshot record -- pure, no I/O.

All integers are unsigned big-endian; CRC-32C as everywhere in syncstore
(``_codec.crc32c_of``).  The same tables, with the reasons, are in
docs/format.md ("Snapshots").

Snapshot file ``base-<LSN:020d>.snap`` or ``delta-<previous LSN:020d>-<LSN:020d>.snap``:
a header, blocks of rows, a trailer::

    header (44 bytes)
    0       8     magic b"SSSNAP\\r\\n"
    8       2     format version, 1
    10      1     kind: 1 base (the whole state), 2 delta (items changed since the previous snapshot)
    11      1     flags: bit 0 set when the state holds a last_msg_id (the trailer's); others 0
    12      2     replica id of the source store
    14      2     reserved, 0
    16      8     LSN: the snapshot is the state with every WAL record up to this LSN applied
    24      8     previous LSN: the LSN of the snapshot this delta applies on (< LSN); 0 for a base
    32      8     epoch of the source store
    40      4     CRC-32C of bytes 0..39

    block (16 + C bytes; any number of them)
    0       4     C: compressed length, 1 .. MAX_COMPRESSED
    4       4     U: raw length, 1 .. MAX_RAW
    8       4     N: rows in the block, >= 1
    12      4     CRC-32C of bytes 0..11 followed by the C compressed bytes
    16      C     one zstd frame holding the U raw bytes: N rows, back to back

    row (8 + K + V bytes, inside a block's raw bytes)
    0       1     op: 1 put, 2 delete
    1       1     database: 1 messages, 2 inbox, 3 history, 4 dedup, 5 dedup_expiry
    2       2     K: key length, 1 .. 511 (LMDB's key limit)
    4       4     V: value length
    8       K     key
    8+K     V     put in messages/dedup/dedup_expiry: the value; delete there: nothing (V = 0);
                  inbox/history (DUPSORT): the duplicate put or deleted, 1 .. 511 bytes

    trailer (56 bytes; its first word is where a block's C would be, and 0)
    0       4     0: end of the blocks
    4       4     number of blocks
    8       8     rows (puts + deletes)
    16      8     puts
    24      8     deletes
    32      8     raw bytes: the sum of the blocks' U
    40      8     last_msg_id of the state at the LSN (the id generator's floor after a
                  restore); 0 when header flag bit 0 is clear (no message was ever applied)
    48      4     CRC-32C of the blocks: bytes 44 up to the trailer (the manifest repeats it)
    52      4     CRC-32C of bytes 0..51 of the trailer

Rows apply in file order: a later row of the same item (database, key and,
in a DUPSORT database, duplicate) replaces an earlier one.  A base is a scan
of the state followed by re-reads of the items that changed while it was
scanned (docs/design.md, "Snapshots"); a delta holds one row per item
touched by a WAL record since the previous snapshot (plus re-reads of the
items touched while it was written).

Envelope of the manifest ``MANIFEST`` and of the store's record ``SNAPSHOTS``
(a JSON document behind a magic and a CRC)::

    0       8     magic: b"SSMANI\\r\\n" (manifest) or b"SSSREC\\r\\n" (record)
    8       2     format version, 1
    10      2     reserved, 0
    12      4     L: length of the JSON text
    16      L     JSON, UTF-8 (keys sorted, no spaces)
    16+L    4     CRC-32C of bytes 0..16+L-1

Every decoder here raises :class:`CorruptionError` naming the file and the
byte offset of the check that failed, so any damaged byte is reported where it
is found: the header's CRC covers it, each block's CRC its length words and
its compressed bytes, the trailer's CRC the trailer, and the trailer holds
the CRC of all the blocks in order (so a block lost, repeated or moved is
found too); the manifest repeats each file's size, counts and blocks' CRC, so
a valid file that is not the one it names is refused as well.  (The header,
which holds the LSN, is written last, when the LSN is known: that is why the
blocks' CRC does not cover it -- its own CRC does.)
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import zstandard

from ._codec import crc32c_of
from .errors import CorruptionError

__all__ = [
    "BASE",
    "DELTA",
    "DB_IDS",
    "DB_NAMES",
    "DUP_DBS",
    "PUT",
    "DELETE",
    "Header",
    "Trailer",
    "ChainEntry",
    "Manifest",
    "RowBuffer",
    "encode_header",
    "decode_header",
    "encode_block",
    "decode_block_prefix",
    "decode_block",
    "encode_trailer",
    "decode_trailer",
    "encode_manifest",
    "decode_manifest",
    "Recorded",
    "encode_record_file",
    "decode_record_file",
    "file_name",
    "parse_file_name",
]

# --- constants --------------------------------------------------------------------------

SNAP_MAGIC = b"SSSNAP\r\n"
MANIFEST_MAGIC = b"SSMANI\r\n"
RECORD_MAGIC = b"SSSREC\r\n"
VERSION = 1
BASE, DELTA = 1, 2
KIND_NAMES = {BASE: "base", DELTA: "delta"}
KIND_IDS = {name: kind for kind, name in KIND_NAMES.items()}
PUT, DELETE = 1, 2
FLAG_LAST_MSG_ID = 1  # header flag bit 0

#: Database ids in rows, and the LMDB databases they name (state.py's key layout).
DB_NAMES = {1: "messages", 2: "inbox", 3: "history", 4: "dedup", 5: "dedup_expiry"}
DB_IDS = {name: db for db, name in DB_NAMES.items()}
DUP_DBS = frozenset({"inbox", "history"})  # DUPSORT: an item is one (key, duplicate)
_DUP_IDS = frozenset(DB_IDS[name] for name in DUP_DBS)
MAX_KEY = 511  # LMDB's default maximum key (and DUPSORT duplicate) size

HEADER_FMT = ">8sHBBHHQQQ"  # magic, version, kind, flags, replica id, reserved, LSN, previous LSN, epoch
HEADER_BODY_SIZE = 40
assert struct.calcsize(HEADER_FMT) == HEADER_BODY_SIZE
CRC_FMT = ">I"
CRC_SIZE = 4
assert struct.calcsize(CRC_FMT) == CRC_SIZE
HEADER_SIZE = HEADER_BODY_SIZE + CRC_SIZE

BLOCK_PREFIX_FMT = ">IIII"  # compressed length, raw length, rows, CRC
BLOCK_PREFIX_SIZE = 16
assert struct.calcsize(BLOCK_PREFIX_FMT) == BLOCK_PREFIX_SIZE
_BLOCK_CRC_OFFSET = 12
#: A block holds whole rows; one message body may be 64 MiB, so a block may exceed the target.
MAX_RAW = 1 << 27
MAX_COMPRESSED = MAX_RAW + (1 << 20)  # zstd's worst case for incompressible data, with room

ROW_HEAD_FMT = ">BBHI"  # op, database, key length, value length
ROW_HEAD_SIZE = 8
assert struct.calcsize(ROW_HEAD_FMT) == ROW_HEAD_SIZE

TRAILER_FMT = ">IIQQQQQII"  # 0, blocks, rows, puts, deletes, raw bytes, last_msg_id, CRC of the body, CRC of the trailer
TRAILER_SIZE = 56
assert struct.calcsize(TRAILER_FMT) == TRAILER_SIZE
_TRAILER_CRC_OFFSET = 52

ENVELOPE_FMT = ">8sHHI"  # magic, version, reserved, JSON length
ENVELOPE_SIZE = 16
assert struct.calcsize(ENVELOPE_FMT) == ENVELOPE_SIZE
MAX_ENVELOPE_JSON = 1 << 26  # 64 MiB: a manifest of ~100,000 deltas

_header = struct.Struct(HEADER_FMT)
_crc = struct.Struct(CRC_FMT)
_block_prefix = struct.Struct(BLOCK_PREFIX_FMT)
_row_head = struct.Struct(ROW_HEAD_FMT)
_trailer = struct.Struct(TRAILER_FMT)
_envelope = struct.Struct(ENVELOPE_FMT)

_BASE_NAME = re.compile(r"base-(\d{20})\.snap")
_DELTA_NAME = re.compile(r"delta-(\d{20})-(\d{20})\.snap")

Row = tuple[int, int, bytes, bytes]  # (op, database id, key, value or duplicate)
_first, _second = itemgetter(0), itemgetter(1)


# --- header and trailer ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    """The decoded header of a snapshot file."""

    kind: int  # BASE or DELTA
    replica_id: int
    lsn: int
    prev_lsn: int
    epoch: int
    has_last_msg_id: bool = False  # flag bit 0: the trailer's last_msg_id is the state's (else it had none)


def encode_header(header: Header) -> bytes:
    """The 44 header bytes of a snapshot file."""
    flags = FLAG_LAST_MSG_ID if header.has_last_msg_id else 0
    body = _header.pack(SNAP_MAGIC, VERSION, header.kind, flags, header.replica_id, 0, header.lsn, header.prev_lsn, header.epoch)
    return body + _crc.pack(crc32c_of(body))


def decode_header(data: bytes, path: str | None = None) -> Header:
    """Decode and check a header (magic, version, CRC, fields); :class:`CorruptionError` at the failed check's offset."""
    if len(data) < HEADER_SIZE:
        raise CorruptionError(f"snapshot file is {len(data)} bytes, shorter than its {HEADER_SIZE}-byte header", path=path, offset=len(data))
    magic, version, kind, flags, replica_id, reserved, lsn, prev_lsn, epoch = _header.unpack_from(data, 0)
    if magic != SNAP_MAGIC:
        raise CorruptionError("not a syncstore snapshot file (bad magic)", path=path, offset=0)
    if version != VERSION:
        raise CorruptionError(
            f"snapshot format version {version} is not supported (this syncstore reads version {VERSION})",
            path=path,
            offset=8,
            hint="restore it with the syncstore version that wrote it",
        )
    (stored,) = _crc.unpack_from(data, HEADER_BODY_SIZE)
    if stored != crc32c_of(data[:HEADER_BODY_SIZE]):
        raise CorruptionError("snapshot file header fails its CRC-32C", path=path, offset=HEADER_BODY_SIZE)
    if kind not in KIND_NAMES:
        raise CorruptionError(f"snapshot file kind {kind} is neither base (1) nor delta (2)", path=path, offset=10)
    if flags & ~FLAG_LAST_MSG_ID:
        raise CorruptionError(f"snapshot file header has unknown flags {flags:#x}", path=path, offset=11)
    if reserved:
        raise CorruptionError("snapshot file header has non-zero reserved bytes", path=path, offset=14)
    if (kind == BASE and prev_lsn != 0) or (kind == DELTA and prev_lsn >= lsn):  # a delta may follow a base at LSN 0
        raise CorruptionError(f"snapshot {KIND_NAMES[kind]} at LSN {lsn} names previous LSN {prev_lsn}", path=path, offset=24)
    return Header(kind, replica_id, lsn, prev_lsn, epoch, bool(flags & FLAG_LAST_MSG_ID))


@dataclass(frozen=True, slots=True)
class Trailer:
    """The decoded trailer of a snapshot file: counts, the state's last_msg_id, the CRC of the body."""

    blocks: int
    rows: int
    puts: int
    deletes: int
    raw_bytes: int
    last_msg_id: int
    body_crc: int  # CRC-32C of the blocks (bytes HEADER_SIZE .. the trailer)


def encode_trailer(trailer: Trailer) -> bytes:
    """The 56 trailer bytes."""
    fields = (0, trailer.blocks, trailer.rows, trailer.puts, trailer.deletes, trailer.raw_bytes, trailer.last_msg_id, trailer.body_crc)
    body = _trailer.pack(*fields, 0)[:_TRAILER_CRC_OFFSET]
    return body + _crc.pack(crc32c_of(body))


def decode_trailer(data: bytes, path: str | None = None, offset: int = 0) -> Trailer:
    """Decode and check the trailer ``data`` found at ``offset`` of its file."""
    if len(data) != TRAILER_SIZE:
        raise CorruptionError(f"snapshot trailer is {len(data)} bytes, not {TRAILER_SIZE}", path=path, offset=offset)
    zero, blocks, rows, puts, deletes, raw_bytes, last_msg_id, body_crc, stored = _trailer.unpack(data)
    if zero != 0:
        raise CorruptionError("snapshot trailer does not start with a zero word", path=path, offset=offset)
    if stored != crc32c_of(data[:_TRAILER_CRC_OFFSET]):
        raise CorruptionError("snapshot trailer fails its CRC-32C", path=path, offset=offset + _TRAILER_CRC_OFFSET)
    if rows != puts + deletes:
        raise CorruptionError(f"snapshot trailer counts {rows} rows, not puts {puts} + deletes {deletes}", path=path, offset=offset + 8)
    return Trailer(blocks, rows, puts, deletes, raw_bytes, last_msg_id, body_crc)


# --- rows and blocks ---------------------------------------------------------------------


class RowBuffer:
    """Rows encoded as they come, cut into compressed blocks by the caller (``take_block``).

    Pure: bytes in memory only.  ``size`` is the raw bytes buffered, so the
    caller cuts a block once it passes its target.
    """

    __slots__ = ("_parts", "size", "count", "puts", "deletes")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0
        self.count = 0
        self.puts = 0  # in the whole file so far, across taken blocks
        self.deletes = 0

    def put(self, db: int, key: bytes, value: bytes) -> None:
        """A put row: ``value`` is the value, or the duplicate in a DUPSORT database."""
        self._parts += (_row_head.pack(PUT, db, len(key), len(value)), key, value)
        self.size += ROW_HEAD_SIZE + len(key) + len(value)
        self.count += 1
        self.puts += 1

    def put_all(self, db: int, items: list[tuple[bytes, bytes]]) -> None:
        """A put row for each ``(key, value)`` of ``items`` (a scanned chunk), encoded in one pass."""
        if not items:
            return
        klens, vlens = set(map(len, map(_first, items))), set(map(len, map(_second, items)))  # C loops
        if len(klens) == 1 and len(vlens) == 1:  # fixed-size rows: one head serves them all
            head = _row_head.pack(PUT, db, klens.pop(), vlens.pop())
            raw = head + head.join([k + v for k, v in items])
        else:
            pack = _row_head.pack
            raw = b"".join([part for k, v in items for part in (pack(PUT, db, len(k), len(v)), k, v)])
        self._parts.append(raw)
        self.size += len(raw)
        self.count += len(items)
        self.puts += len(items)

    def delete(self, db: int, key: bytes, dup: bytes = b"") -> None:
        """A delete row: of ``key`` (plain databases) or of one duplicate ``dup`` of ``key``."""
        self._parts += (_row_head.pack(DELETE, db, len(key), len(dup)), key, dup)
        self.size += ROW_HEAD_SIZE + len(key) + len(dup)
        self.count += 1
        self.deletes += 1

    def take_raw(self) -> tuple[bytes, int]:
        """The buffered rows' raw bytes and count, emptying the buffer."""
        raw, count = b"".join(self._parts), self.count
        self._parts, self.size, self.count = [], 0, 0
        return raw, count


def encode_block(raw: bytes, rows: int, compressor: zstandard.ZstdCompressor) -> bytes:
    """One block: prefix (lengths, row count, CRC) and the zstd frame of ``raw`` (``rows`` rows)."""
    if not raw or not rows or len(raw) > MAX_RAW:
        raise ValueError(f"a block holds 1..{MAX_RAW} raw bytes and at least one row, got {len(raw)} bytes, {rows} rows")
    compressed = compressor.compress(raw)
    lengths = _block_prefix.pack(len(compressed), len(raw), rows, 0)[:_BLOCK_CRC_OFFSET]
    return lengths + _crc.pack(crc32c_of(compressed, crc32c_of(lengths))) + compressed


def decode_block_prefix(data: bytes, path: str | None = None, offset: int = 0) -> tuple[int, int, int, int]:
    """(compressed length, raw length, rows, CRC) of the block prefix ``data`` at ``offset``; C = 0 is the trailer.

    Lengths are checked before the caller reads or allocates anything for them.
    """
    if len(data) < BLOCK_PREFIX_SIZE:
        raise CorruptionError("snapshot file ends inside a block header (no trailer)", path=path, offset=offset)
    clen, ulen, rows, crc = _block_prefix.unpack_from(data, 0)
    if clen == 0:
        return 0, ulen, rows, crc
    if clen > MAX_COMPRESSED or not 1 <= ulen <= MAX_RAW or rows == 0 or rows * ROW_HEAD_SIZE > ulen:
        raise CorruptionError(f"snapshot block header is impossible (compressed {clen}, raw {ulen}, rows {rows})", path=path, offset=offset)
    return clen, ulen, rows, crc


def decode_block(
    prefix: bytes, compressed: bytes, decompressor: zstandard.ZstdDecompressor, path: str | None = None, offset: int = 0
) -> list[Row]:
    """The rows of the block at ``offset`` (its 16-byte ``prefix`` and compressed bytes), every field checked."""
    clen, ulen, count, stored = decode_block_prefix(prefix, path, offset)
    if clen == 0 or len(compressed) != clen:
        raise CorruptionError(f"snapshot block is cut short ({len(compressed)} of {clen} bytes)", path=path, offset=offset)
    if stored != crc32c_of(compressed, crc32c_of(prefix[:_BLOCK_CRC_OFFSET])):
        raise CorruptionError("snapshot block fails its CRC-32C", path=path, offset=offset)
    try:
        raw = decompressor.decompress(compressed, max_output_size=ulen)
    except zstandard.ZstdError as error:
        raise CorruptionError(f"snapshot block does not decompress: {error}", path=path, offset=offset) from None
    if len(raw) != ulen:
        raise CorruptionError(f"snapshot block decompresses to {len(raw)} bytes, not {ulen}", path=path, offset=offset)
    return decode_rows(raw, count, path, offset)


def decode_rows(raw: bytes, count: int, path: str | None = None, offset: int = 0) -> list[Row]:
    """``count`` rows filling ``raw`` exactly (``offset``: the block's, for errors).

    Consecutive rows with the same 8-byte head (fixed-size items of one
    database: inbox and history duplicates, expiry keys) are a *run*: its
    head is checked once and its rows sliced out in one pass.
    """
    rows: list[Row] = []
    pos, end = 0, len(raw)
    while len(rows) < count:
        if pos + ROW_HEAD_SIZE > end:
            raise CorruptionError(f"snapshot block holds fewer than its {count} rows", path=path, offset=offset)
        head = raw[pos : pos + ROW_HEAD_SIZE]
        op, db, klen, vlen = _row_head.unpack(head)
        _check_row(op, db, klen, vlen, len(rows), path, offset)
        size = ROW_HEAD_SIZE + klen + vlen
        stop, left = pos + size, count - len(rows) - 1
        if stop > end:
            raise CorruptionError(f"snapshot row {len(rows)} of the block runs past its end", path=path, offset=offset)
        while left and stop + size <= end and raw[stop : stop + ROW_HEAD_SIZE] == head:  # the run goes on
            stop += size
            left -= 1
        key_at, value_at = ROW_HEAD_SIZE, ROW_HEAD_SIZE + klen
        rows += [(op, db, raw[p + key_at : p + value_at], raw[p + value_at : p + size]) for p in range(pos, stop, size)]
        pos = stop
    if pos != end:
        raise CorruptionError(f"snapshot block has {end - pos} bytes after its {count} rows", path=path, offset=offset)
    return rows


def _check_row(op: int, db: int, klen: int, vlen: int, index: int, path: str | None, offset: int) -> None:
    """CorruptionError unless a row head is one a writer makes."""
    if (op != PUT and op != DELETE) or db not in DB_NAMES or not 1 <= klen <= MAX_KEY:
        raise CorruptionError(f"snapshot row {index} of the block is malformed (op {op}, database {db}, key {klen} B)", path=path, offset=offset)
    if db in _DUP_IDS:
        if not 1 <= vlen <= MAX_KEY:
            raise CorruptionError(f"snapshot row {index} of the block has a {vlen}-byte duplicate", path=path, offset=offset)
    elif op == DELETE and vlen:
        raise CorruptionError(f"snapshot row {index} of the block deletes with a value", path=path, offset=offset)


# --- file names -------------------------------------------------------------------------


def file_name(kind: int, lsn: int, prev_lsn: int) -> str:
    """The name of a snapshot file (names sort by LSN within a kind)."""
    return f"base-{lsn:020d}.snap" if kind == BASE else f"delta-{prev_lsn:020d}-{lsn:020d}.snap"


def parse_file_name(name: str) -> tuple[int, int, int] | None:
    """(kind, LSN, previous LSN) of a snapshot file name, or None if ``name`` is not exactly one."""
    base = _BASE_NAME.fullmatch(name)
    if base:
        return BASE, int(base.group(1)), 0
    delta = _DELTA_NAME.fullmatch(name)
    if delta:
        return DELTA, int(delta.group(2)), int(delta.group(1))
    return None


# --- the envelope, the manifest and the record -----------------------------------------------


def _encode_envelope(magic: bytes, document: dict[str, Any]) -> bytes:
    text = json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")
    body = _envelope.pack(magic, VERSION, 0, len(text)) + text
    return body + _crc.pack(crc32c_of(body))


def _decode_envelope(magic: bytes, what: str, data: bytes, path: str | None) -> Any:
    if len(data) < ENVELOPE_SIZE + CRC_SIZE:
        raise CorruptionError(f"{what} is {len(data)} bytes, too short to be one", path=path, offset=len(data))
    found, version, reserved, length = _envelope.unpack_from(data, 0)
    if found != magic:
        raise CorruptionError(f"not a syncstore {what} (bad magic)", path=path, offset=0)
    if version != VERSION:
        raise CorruptionError(f"{what} format version {version} is not supported (this syncstore reads {VERSION})", path=path, offset=8)
    if reserved:
        raise CorruptionError(f"{what} has non-zero reserved bytes", path=path, offset=10)
    if length > MAX_ENVELOPE_JSON or ENVELOPE_SIZE + length + CRC_SIZE != len(data):
        raise CorruptionError(f"{what} says {length} bytes of JSON, the file holds {len(data) - ENVELOPE_SIZE - CRC_SIZE}", path=path, offset=12)
    (stored,) = _crc.unpack_from(data, ENVELOPE_SIZE + length)
    if stored != crc32c_of(data[: ENVELOPE_SIZE + length]):
        raise CorruptionError(f"{what} fails its CRC-32C", path=path, offset=ENVELOPE_SIZE + length)
    try:
        return json.loads(data[ENVELOPE_SIZE : ENVELOPE_SIZE + length].decode("utf-8"))
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError: behind a valid CRC, so written that way
        raise CorruptionError(f"{what} is not valid UTF-8 JSON: {error}", path=path, offset=ENVELOPE_SIZE) from None


@dataclass(frozen=True, slots=True)
class ChainEntry:
    """One snapshot file of a chain, as the manifest lists it."""

    name: str
    kind: int  # BASE or DELTA
    lsn: int
    prev_lsn: int
    size: int  # bytes of the file
    crc: int  # CRC-32C of its blocks (the trailer's body_crc)
    rows: int
    puts: int
    deletes: int
    last_msg_id: int | None  # None: the state had applied no message (msg_id 0 exists)


@dataclass(frozen=True, slots=True)
class Manifest:
    """A snapshot directory's chain: a base, then deltas each applying on the one before; and its source."""

    replica_id: int
    epoch: int
    chain: tuple[ChainEntry, ...]


_U64_MAX = (1 << 64) - 1
_ENTRY_FIELDS = ("name", "kind", "lsn", "prev_lsn", "size", "crc32c", "rows", "puts", "deletes", "last_msg_id")


def encode_manifest(manifest: Manifest) -> bytes:
    """The manifest file's bytes (the JSON layout is in docs/format.md)."""
    chain = [
        {
            "name": e.name,
            "kind": KIND_NAMES[e.kind],
            "lsn": e.lsn,
            "prev_lsn": e.prev_lsn,
            "size": e.size,
            "crc32c": e.crc,
            "rows": e.rows,
            "puts": e.puts,
            "deletes": e.deletes,
            "last_msg_id": e.last_msg_id,
        }
        for e in manifest.chain
    ]
    return _encode_envelope(MANIFEST_MAGIC, {"source": {"replica_id": manifest.replica_id, "epoch": manifest.epoch}, "chain": chain})


def _u64_field(document: dict[str, Any], field: str, what: str, path: str | None) -> int:
    value = document.get(field)
    if type(value) is not int or not 0 <= value <= _U64_MAX:
        raise CorruptionError(f"{what}: field {field!r} is {value!r}, not an unsigned 64-bit integer", path=path, offset=ENVELOPE_SIZE)
    return value


def decode_manifest(data: bytes, path: str | None = None) -> Manifest:
    """Decode a manifest and check its chain: names, kinds, LSNs linking base to newest delta.

    Names are checked to be exactly the names snapshot files get (so a
    manifest cannot name ``../x`` or ``/etc/passwd``); whether each file is
    really inside the directory is the reader's check (symlinks).
    """
    document = _decode_envelope(MANIFEST_MAGIC, "snapshot manifest", data, path)
    at = ENVELOPE_SIZE  # JSON errors are reported at the start of the JSON: the CRC says the bytes are as written
    if type(document) is not dict or type(document.get("source")) is not dict or type(document.get("chain")) is not list:
        raise CorruptionError("snapshot manifest lacks its source or chain", path=path, offset=at)
    source = document["source"]
    replica_id = _u64_field(source, "replica_id", "snapshot manifest source", path)
    epoch = _u64_field(source, "epoch", "snapshot manifest source", path)
    entries: list[ChainEntry] = []
    for index, item in enumerate(document["chain"]):
        what = f"snapshot manifest entry {index}"
        if type(item) is not dict or set(item) != set(_ENTRY_FIELDS):
            raise CorruptionError(f"{what} must have exactly the fields {', '.join(_ENTRY_FIELDS)}", path=path, offset=at)
        name, kind_name = item["name"], item["kind"]
        if type(name) is not str or type(kind_name) is not str or kind_name not in KIND_IDS:
            raise CorruptionError(f"{what}: name {name!r} / kind {kind_name!r} are not a file name and base/delta", path=path, offset=at)
        numbers = {field: _u64_field(item, field, what, path) for field in _ENTRY_FIELDS[2:-1]}
        last_msg_id = None if item["last_msg_id"] is None else _u64_field(item, "last_msg_id", what, path)
        entry = ChainEntry(name, KIND_IDS[kind_name], numbers["lsn"], numbers["prev_lsn"], numbers["size"], numbers["crc32c"],
                           numbers["rows"], numbers["puts"], numbers["deletes"], last_msg_id)
        if parse_file_name(name) != (entry.kind, entry.lsn, entry.prev_lsn):
            raise CorruptionError(
                f"{what} names the file {name!r}, which is not the name of a {kind_name} at LSN {entry.lsn}",
                path=path,
                offset=at,
                hint="a manifest may only name snapshot files inside its own directory; nothing was written",
            )
        if entry.rows != entry.puts + entry.deletes or entry.crc > 0xFFFFFFFF:
            raise CorruptionError(f"{what} has inconsistent counts or checksum", path=path, offset=at)
        if index == 0 and entry.kind != BASE:
            raise CorruptionError("snapshot manifest's chain does not start with a base", path=path, offset=at)
        if index > 0 and (entry.kind != DELTA or entry.prev_lsn != entries[-1].lsn):
            raise CorruptionError(f"{what} does not apply on the entry before it (LSN {entries[-1].lsn})", path=path, offset=at)
        entries.append(entry)
    if not entries:
        raise CorruptionError("snapshot manifest's chain is empty", path=path, offset=at)
    return Manifest(replica_id, epoch, tuple(entries))


@dataclass(frozen=True, slots=True)
class Recorded:
    """A store's note about one snapshot directory: its newest LSN there, and where the next record is in the WAL."""

    lsn: int
    wal: tuple[int, int] | None = None  # (segment first LSN, byte offset) of WAL record lsn + 1: a hint, checked when used


def encode_record_file(epoch: int, snapshots: dict[str, Recorded]) -> bytes:
    """The store's ``SNAPSHOTS`` record: its epoch and, per snapshot directory, what :class:`Recorded` holds."""
    listed = []
    for directory, recorded in sorted(snapshots.items()):
        item: dict[str, Any] = {"dir": directory, "lsn": recorded.lsn}
        if recorded.wal is not None:
            item["wal"] = list(recorded.wal)
        listed.append(item)
    return _encode_envelope(RECORD_MAGIC, {"epoch": epoch, "snapshots": listed})


def decode_record_file(data: bytes, path: str | None = None) -> tuple[int, dict[str, Recorded]]:
    """(epoch, {directory: Recorded}) of a ``SNAPSHOTS`` record."""
    document = _decode_envelope(RECORD_MAGIC, "snapshot record", data, path)
    if type(document) is not dict or type(document.get("snapshots")) is not list:
        raise CorruptionError("snapshot record lacks its list", path=path, offset=ENVELOPE_SIZE)
    epoch = _u64_field(document, "epoch", "snapshot record", path)
    snapshots: dict[str, Recorded] = {}
    for item in document["snapshots"]:
        if type(item) is not dict or type(item.get("dir")) is not str:
            raise CorruptionError("snapshot record entry lacks its directory", path=path, offset=ENVELOPE_SIZE)
        wal = item.get("wal")
        if wal is not None and (type(wal) is not list or len(wal) != 2 or not all(type(n) is int and 0 <= n <= _U64_MAX for n in wal)):
            raise CorruptionError("snapshot record entry has a malformed WAL position", path=path, offset=ENVELOPE_SIZE)
        snapshots[item["dir"]] = Recorded(_u64_field(item, "lsn", "snapshot record entry", path), None if wal is None else (wal[0], wal[1]))
    return epoch, snapshots
