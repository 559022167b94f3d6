"""Byte format of feed events (``Change`` and ``SnapshotChunk``) -- pure, no I/O.

A feed (``Store.feed``) carries one stream of events over any transport (a
socket, NATS, a file); each event is self-delimiting, versioned and
CRC-checked, so a receiver tells a damaged or foreign event from a good one
before applying anything.  All integers unsigned big-endian::

    event
    0       4     magic b"SSEV"
    4       1     format version, 1
    5       1     kind: 1 change, 2 snapshot chunk
    6       2     reserved, 0
    8       4     L: payload length
    12      L     payload (below)
    12+L    4     CRC-32C of bytes 0 .. 12+L-1

    change payload: the WAL frame's record, as in docs/format.md
    0       8     LSN
    8       1     record type (1 DELIVER, 2 EXPIRE)
    9       ...   record body

    snapshot chunk payload
    0       8     snapshot LSN
    8       8     epoch of the source store
    16      8     last_msg_id (meaningful when flags bit 1 is set)
    24      4     index of the chunk in its snapshot (0, 1, ...)
    28      2     replica id of the source store
    30      1     flags: bit 0 final chunk, bit 1 last_msg_id present
    31      1     reserved, 0
    32      ...   one snapshot block (docs/format.md, "Snapshots": prefix, zstd frame of rows)

``decode_event`` checks magic, version, kind, length and CRC, then the
payload (a record body as the WAL's decoder checks it; a block as snapshot
files' decoder does); any failure is a :class:`CorruptionError` with
``key="event"`` and the offset of the failed check.
"""

from __future__ import annotations

import struct

import zstandard

from . import _codec
from . import _snapformat as fmt
from .errors import CorruptionError, InvalidArgument
from .model import Change, Event, SnapshotChunk

__all__ = ["encode_change", "encode_chunk", "decode_event", "EVENT_MAGIC"]

EVENT_MAGIC = b"SSEV"
EVENT_VERSION = 1
KIND_CHANGE, KIND_CHUNK = 1, 2
EVENT_HEAD_FMT = ">4sBBHI"  # magic, version, kind, reserved, payload length
EVENT_HEAD_SIZE = 12
assert struct.calcsize(EVENT_HEAD_FMT) == EVENT_HEAD_SIZE
CHANGE_HEAD_FMT = ">QB"  # LSN, record type
CHANGE_HEAD_SIZE = 9
assert struct.calcsize(CHANGE_HEAD_FMT) == CHANGE_HEAD_SIZE
CHUNK_HEAD_FMT = ">QQQIHBB"  # snapshot LSN, epoch, last_msg_id, index, replica id, flags, reserved
CHUNK_HEAD_SIZE = 32
assert struct.calcsize(CHUNK_HEAD_FMT) == CHUNK_HEAD_SIZE
_FINAL, _HAS_LAST_ID = 1, 2
_CRC_SIZE = 4

_event_head = struct.Struct(EVENT_HEAD_FMT)
_change_head = struct.Struct(CHANGE_HEAD_FMT)
_chunk_head = struct.Struct(CHUNK_HEAD_FMT)
_crc = struct.Struct(">I")
_compressor = zstandard.ZstdCompressor(level=3)


def _frame(kind: int, payload: bytes) -> bytes:
    head = _event_head.pack(EVENT_MAGIC, EVENT_VERSION, kind, 0, len(payload))
    return head + payload + _crc.pack(_codec.crc32c_of(payload, _codec.crc32c_of(head)))


def encode_change(change: Change) -> bytes:
    """The event bytes of a change."""
    rtype, body = _codec.encode_record(change.record())
    return _frame(KIND_CHANGE, _change_head.pack(change.lsn, rtype) + body)


def encode_chunk(chunk: SnapshotChunk) -> bytes:
    """The event bytes of a snapshot chunk (its rows as one compressed snapshot block)."""
    rows = fmt.RowBuffer()
    for op, db, key, value in chunk.rows:
        if op == fmt.PUT:
            rows.put(db, key, value)
        else:
            rows.delete(db, key, value)
    raw, count = rows.take_raw()
    flags = (_FINAL if chunk.final else 0) | (_HAS_LAST_ID if chunk.last_msg_id is not None else 0)
    head = _chunk_head.pack(chunk.snapshot_lsn, chunk.epoch, chunk.last_msg_id or 0, chunk.index, chunk.replica_id, flags, 0)
    return _frame(KIND_CHUNK, head + (fmt.encode_block(raw, count, _compressor) if count else b""))


def _corrupt(message: str, offset: int) -> CorruptionError:
    return CorruptionError(f"feed event: {message}", key="event", offset=offset, hint="the event was damaged in transit or is not a syncstore feed event; nothing was applied")


def decode_event(data: bytes | bytearray | memoryview) -> Event:
    """Decode one event (``syncstore.decode_event``); :class:`CorruptionError` (``key="event"``, offset) on any damage.

    ``data`` must be bytes-like (bytes, bytearray, memoryview), else :class:`InvalidArgument`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"an event is bytes (from event.encode()), got {type(data).__name__}", key="data")
    data = bytes(data)
    if len(data) < EVENT_HEAD_SIZE + _CRC_SIZE:
        raise _corrupt(f"{len(data)} bytes is shorter than any event", min(len(data), EVENT_HEAD_SIZE))
    magic, version, kind, reserved, length = _event_head.unpack_from(data)
    if magic != EVENT_MAGIC:
        raise _corrupt("bad magic", 0)
    if version != EVENT_VERSION:
        raise _corrupt(f"format version {version} is not supported (expected {EVENT_VERSION})", 4)
    if kind not in (KIND_CHANGE, KIND_CHUNK) or reserved:
        raise _corrupt(f"unknown kind {kind} or reserved bits {reserved}", 5)
    if len(data) != EVENT_HEAD_SIZE + length + _CRC_SIZE:
        raise _corrupt(f"length says {length} payload bytes, the event has {len(data) - EVENT_HEAD_SIZE - _CRC_SIZE}", 8)
    end = EVENT_HEAD_SIZE + length
    if _crc.unpack_from(data, end)[0] != _codec.crc32c_of(data[:end]):
        raise _corrupt("CRC-32C mismatch", end)
    payload = data[EVENT_HEAD_SIZE:end]
    try:
        return _decode_change(payload) if kind == KIND_CHANGE else _decode_chunk(payload)
    except CorruptionError as error:  # the payload's own checks: report them as the event's
        raise _corrupt(error.message, EVENT_HEAD_SIZE + (error.offset or 0)) from None


def _decode_change(payload: bytes) -> Change:
    if len(payload) < CHANGE_HEAD_SIZE:
        raise CorruptionError("change payload is shorter than its head", offset=0)
    lsn, rtype = _change_head.unpack_from(payload)
    if lsn == 0:
        raise CorruptionError("change has LSN 0 (LSNs start at 1)", offset=0)
    return Change.of(lsn, _codec.decode_record(rtype, payload[CHANGE_HEAD_SIZE:], lsn, offset=CHANGE_HEAD_SIZE))


def _decode_chunk(payload: bytes) -> SnapshotChunk:
    if len(payload) < CHUNK_HEAD_SIZE:
        raise CorruptionError("snapshot chunk payload is shorter than its head", offset=0)
    lsn, epoch, last_id, index, replica_id, flags, reserved = _chunk_head.unpack_from(payload)
    if flags & ~(_FINAL | _HAS_LAST_ID) or reserved:
        raise CorruptionError(f"snapshot chunk has unknown flags {flags:#x}", offset=30)
    block = payload[CHUNK_HEAD_SIZE:]
    rows: list[tuple[int, int, bytes, bytes]] = []
    if block:
        prefix = block[: fmt.BLOCK_PREFIX_SIZE]
        clen = fmt.decode_block_prefix(prefix, None, CHUNK_HEAD_SIZE)[0]
        if clen == 0 or len(block) != fmt.BLOCK_PREFIX_SIZE + clen:
            raise CorruptionError("snapshot chunk's block length does not match the event", offset=CHUNK_HEAD_SIZE)
        rows = fmt.decode_block(prefix, block[fmt.BLOCK_PREFIX_SIZE :], zstandard.ZstdDecompressor(), None, CHUNK_HEAD_SIZE)
    return SnapshotChunk(lsn, index, bool(flags & _FINAL), epoch, replica_id, last_id if flags & _HAS_LAST_ID else None, tuple(rows))
