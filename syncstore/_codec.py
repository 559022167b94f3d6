"""Byte formats of the write-ahead log and of LMDB values -- pure, no I/O.

All integers are big-endian (so that encoded keys sort numerically).  The
same layout is described, with rationale, in ``docs/format.md``.

WAL segment file ``wal-<first LSN, 20 digits>.log``::

    offset  size  field
    0       8     magic  b"SSWAL\\x00\\r\\n"  (the CR/LF catch text-mode copies)
    8       2     format version (1)
    10      2     reserved, 0
    12      8     LSN of the first frame in this segment
    20      4     CRC-32C of bytes 0..20
    24      ...   frames, back to back

Frame (one WAL record)::

    0       4     L = length of the payload (bytes 8 .. 8+L), 17 <= L <= MAX_PAYLOAD
    4       4     CRC-32C over bytes 0..4 (the length) followed by the payload
    8       8     LSN (log sequence number; dense: each frame is previous + 1)
    16      1     record type
    17      8     synced LSN: every frame up to this LSN was durable when this
                  frame was written (tells a torn unsynced tail from corruption)
    25      L-17  record body

A zero length word marks unused (zero-filled) space: the end of the log.

Record type 1, DELIVER (one message delivered to R recipients)::

    0       41    message head (below)
    41      4     B = body length
    45      4     R = number of recipients
    49      B     body
    49+B    16*R  R pairs of (user id u64, cursor u64): the cursor assigned to
                  each recipient, so that replay never recomputes anything

Message head (of the DELIVER record; the LMDB message value repeats its fields after msg_id)::

    0       8     msg_id
    8       8     sender
    16      8     conv (conversation id)
    24      8     client_seq
    32      8     ts_ms (message timestamp, ms since the Unix epoch)
    40      1     priority (0..255)

Record type 2, EXPIRE (dedup entries leaving the dedup window)::

    0       4     N = number of expired idempotency keys (>= 1)
    4       24*N  N triples (first-delivery ms u64, sender u64, client_seq u64):
                  the ``dedup_expiry`` keys removed; each key's dedup entry is
                  removed with it unless the key was delivered again since
                  (its entry's msg_id then has another ms)

Expiry is a record so that every change to the LMDB state is in the log: a
follower or a snapshot delta replays it instead of guessing from its own clock.

LMDB state format 3 (one body per message; key layout in ``state.py``).
Message value, ``messages`` db, key msg_id u64 (stored once, however many recipients)::

    0       4     refs: how many inbox entries reference the message
    4       8     sender
    12      8     conv
    20      8     client_seq
    28      8     ts_ms
    36      1     priority
    37      ...   body

Inbox entry, a fixed-size duplicate of key ``user`` in the DUPSORT|DUPFIXED
``inbox`` db (duplicates sort by cursor, so one user's inbox is in cursor order)::

    0       8     cursor
    8       8     msg_id (the message it references)

Nothing else: conv, priority and the rest are the message's, read from it
(16 bytes per recipient is most of what a group message costs; see
docs/design.md, "Storage layout").

History entry, a fixed-size duplicate of key ``user | conv`` in the
DUPSORT|DUPFIXED ``history`` db: the cursor u64 of an inbox entry of that conv.

LMDB dedup value (first delivery of an idempotency key)::

    0       8     msg_id
    8       16    fingerprint: BLAKE2b-128 of conv u64 | body (dedup_fingerprint)
    24      4     R
    28      16*R  (user id, cursor) pairs, as in DELIVER

A retry of the key must match the first delivery: same fingerprint, same set
of user ids (the pairs).  Earlier state formats (1: a copy of the message per
inbox entry and no fingerprint; 2: a copy per inbox entry) are read only by
the migration in ``_migrate.py``, which has their byte formats.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from typing import NamedTuple

from crc32c import crc32c

from .errors import CorruptionError

# --- WAL segment header -------------------------------------------------------

SEGMENT_MAGIC = b"SSWAL\x00\r\n"
SEGMENT_VERSION = 1
SEGMENT_HEADER_FMT = ">8sHHQ"  # magic, version, reserved, first LSN (CRC follows)
SEGMENT_HEADER_BODY_SIZE = 20
assert struct.calcsize(SEGMENT_HEADER_FMT) == SEGMENT_HEADER_BODY_SIZE
CRC_FMT = ">I"
CRC_SIZE = 4
assert struct.calcsize(CRC_FMT) == CRC_SIZE
SEGMENT_HEADER_SIZE = SEGMENT_HEADER_BODY_SIZE + CRC_SIZE

# --- frames -------------------------------------------------------------------

FRAME_PREFIX_FMT = ">II"  # payload length, CRC-32C
FRAME_PREFIX_SIZE = 8
assert struct.calcsize(FRAME_PREFIX_FMT) == FRAME_PREFIX_SIZE
FRAME_LEAD_FMT = ">QBQ"  # LSN, record type, synced LSN: the start of every payload
FRAME_LEAD_SIZE = 17
assert struct.calcsize(FRAME_LEAD_FMT) == FRAME_LEAD_SIZE
_SYNCED_OFFSET = 9  # of the synced LSN within the payload (after LSN and record type)
FRAME_HEAD_FMT = ">IIQBQ"  # prefix and lead read at once: length, CRC, LSN, record type, synced LSN
FRAME_HEAD_SIZE = FRAME_PREFIX_SIZE + FRAME_LEAD_SIZE  # also the smallest frame there is
assert struct.calcsize(FRAME_HEAD_FMT) == FRAME_HEAD_SIZE
#: A frame longer than this is garbage, not a record (bodies are capped far below).
MAX_PAYLOAD = 1 << 30

RECORD_DELIVER = 1
RECORD_EXPIRE = 2
RECORD_TYPES = frozenset({RECORD_DELIVER, RECORD_EXPIRE})
#: The ``Change.kind`` of each record type (the stream's names; docs/format.md).
RECORD_KINDS = {RECORD_DELIVER: "deliver", RECORD_EXPIRE: "expire"}

# --- messages -----------------------------------------------------------------

MESSAGE_HEAD_FMT = ">QQQQQB"  # msg_id, sender, conv, client_seq, ts_ms, priority
MESSAGE_HEAD_SIZE = 41
assert struct.calcsize(MESSAGE_HEAD_FMT) == MESSAGE_HEAD_SIZE
DELIVER_COUNTS_FMT = ">II"  # body length, recipient count
DELIVER_COUNTS_SIZE = 8
assert struct.calcsize(DELIVER_COUNTS_FMT) == DELIVER_COUNTS_SIZE
PAIR_SIZE = 16  # (user id u64, cursor u64)
STORED_HEAD_FMT = ">IQQQQB"  # refs, sender, conv, client_seq, ts_ms, priority: a message value before its body
STORED_HEAD_SIZE = 37
assert struct.calcsize(STORED_HEAD_FMT) == STORED_HEAD_SIZE
INBOX_ENTRY_FMT = ">QQ"  # cursor, msg_id
INBOX_ENTRY_SIZE = 16
assert struct.calcsize(INBOX_ENTRY_FMT) == INBOX_ENTRY_SIZE
#: Bytes of the dedup fingerprint.  A false match is a retry with other content
#: accepted as a duplicate: the message is silently not delivered.  By accident
#: that is 2**-64 already at 8 bytes, but a client can search out a colliding
#: pair of bodies for an 8-byte digest in ~2**32 hashes (minutes); at 16 bytes
#: (~2**64 hashes) no one can, so a match means "same content" without caveats.
#: The cost is 8 more bytes per dedup entry than 8 would take.
FINGERPRINT_SIZE = 16
_FINGERPRINT_PERSON = b"syncstore-dedup"  # BLAKE2 personalisation: hashes of nothing else can match
DEDUP_HEAD_FMT = ">Q16sI"  # msg_id, fingerprint, recipient count
DEDUP_HEAD_SIZE = 28
assert struct.calcsize(DEDUP_HEAD_FMT) == DEDUP_HEAD_SIZE

_segment_header = struct.Struct(SEGMENT_HEADER_FMT)
_crc = struct.Struct(CRC_FMT)
_frame_prefix = struct.Struct(FRAME_PREFIX_FMT)
_frame_lead = struct.Struct(FRAME_LEAD_FMT)
_frame_head = struct.Struct(FRAME_HEAD_FMT)
_message_head = struct.Struct(MESSAGE_HEAD_FMT)
_deliver_counts = struct.Struct(DELIVER_COUNTS_FMT)
_dedup_head = struct.Struct(DEDUP_HEAD_FMT)
EXPIRED_KEY_FMT = ">QQQ"  # first-delivery ms, sender, client_seq: a dedup_expiry key
EXPIRED_KEY_SIZE = 24
assert struct.calcsize(EXPIRED_KEY_FMT) == EXPIRED_KEY_SIZE
_count = struct.Struct(">I")
_stored_head = struct.Struct(STORED_HEAD_FMT)
_refs = struct.Struct(">I")  # the first field of a message value
_inbox_entry = struct.Struct(INBOX_ENTRY_FMT)
_u64 = struct.Struct(">Q")
_pair = struct.Struct(">QQ")
#: LMDB keys of two or three u64s: ``history`` (user | conv) and ``dedup`` (sender | client_seq)
#: keys, and ``dedup_expiry`` keys (first-delivery ms | sender | client_seq); state.py's layout.
PAIR_KEY = _pair
EXPIRY_KEY = struct.Struct(">QQQ")
_two_pairs = struct.Struct(">QQQQ")
_DELIVER_FIXED_SIZE = MESSAGE_HEAD_SIZE + DELIVER_COUNTS_SIZE
_deliver_fixed = struct.Struct(MESSAGE_HEAD_FMT + DELIVER_COUNTS_FMT[1:])  # head and counts: one read
assert _deliver_fixed.size == _DELIVER_FIXED_SIZE
_new_tuple = tuple.__new__
#: ``unpack_frame_head(data, offset)`` -> (length, CRC, LSN, record type, synced LSN) of the frame at ``offset``.
unpack_frame_head = _frame_head.unpack_from

Pairs = tuple[tuple[int, int], ...]


class Deliver(NamedTuple):
    """A decoded DELIVER record: one message and the cursor of each recipient."""

    msg_id: int
    sender: int
    conv: int
    client_seq: int
    ts_ms: int
    priority: int
    body: bytes
    pairs: Pairs  # ((user id, cursor), ...)


ExpiredKey = tuple[int, int, int]  # (first-delivery ms, sender, client_seq)


class Expire(NamedTuple):
    """A decoded EXPIRE record: the idempotency keys whose dedup window ended."""

    keys: tuple[ExpiredKey, ...]


#: Every decoded record kind.
Record = Deliver | Expire


class DedupEntry(NamedTuple):
    """A decoded dedup value: the first delivery of an idempotency key."""

    msg_id: int
    fingerprint: bytes  # dedup_fingerprint(conv, body) of that delivery
    pairs: Pairs  # ((user id, cursor), ...) it was delivered to


class Frame(NamedTuple):
    """A decoded frame: where it starts and ends in its file, LSN, type, body, synced LSN."""

    offset: int
    end: int
    lsn: int
    rtype: int
    body: bytes
    synced: int = 0


# --- helpers ------------------------------------------------------------------


def crc32c_of(data: bytes, value: int = 0) -> int:
    """CRC-32C (Castagnoli) of ``data``, continuing from ``value``."""
    return crc32c(data, value)


def pack_u64(value: int) -> bytes:
    """Encode an unsigned 64-bit integer, big-endian."""
    return _u64.pack(value)


def unpack_u64(data: bytes | memoryview) -> int:
    """Decode an unsigned 64-bit big-endian integer."""
    return _u64.unpack(data)[0]


@functools.lru_cache(maxsize=256)
def _pairs_struct(count: int) -> struct.Struct:
    # Compiled once per recipient count: building the format per call was a
    # visible share of deliver()'s CPU.
    return struct.Struct(f">{2 * count}Q")


def pack_pairs(pairs: Pairs) -> bytes:
    """(user id, cursor) pairs as in DELIVER and dedup values: 16 bytes each."""
    if len(pairs) == 1:
        return _pair.pack(*pairs[0])
    return _pairs_struct(len(pairs)).pack(*[n for pair in pairs for n in pair])


def unpack_pairs(data: bytes | memoryview, offset: int, count: int) -> Pairs:
    """``count`` (user id, cursor) pairs packed at ``offset``, as :func:`pack_pairs` writes them."""
    flat = _pairs_struct(count).unpack_from(data, offset)
    return tuple(zip(flat[0::2], flat[1::2]))


# --- segment header -----------------------------------------------------------


def encode_segment_header(first_lsn: int) -> bytes:
    """The 24-byte header that starts a WAL segment whose first frame is ``first_lsn``."""
    head = _segment_header.pack(SEGMENT_MAGIC, SEGMENT_VERSION, 0, first_lsn)
    return head + _crc.pack(crc32c(head))


def decode_segment_header(data: bytes, path: str | None = None) -> int:
    """Validate a segment header and return its first LSN.

    Raises :class:`CorruptionError` (naming ``path`` and offset 0) on a short,
    damaged or foreign header.
    """
    if len(data) < SEGMENT_HEADER_SIZE:
        raise CorruptionError("WAL segment header is truncated", path=path, offset=0)
    magic, version, _reserved, first_lsn = _segment_header.unpack_from(data, 0)
    (stored,) = _crc.unpack_from(data, SEGMENT_HEADER_BODY_SIZE)
    if magic != SEGMENT_MAGIC:
        raise CorruptionError("not a syncstore WAL segment (bad magic)", path=path, offset=0)
    if stored != crc32c(data[:SEGMENT_HEADER_BODY_SIZE]):
        raise CorruptionError("WAL segment header fails its CRC", path=path, offset=0)
    if version != SEGMENT_VERSION:
        raise CorruptionError(
            f"WAL segment format version {version} is not supported (expected {SEGMENT_VERSION})",
            path=path,
            offset=8,
            hint="open it with the syncstore version that wrote it",
        )
    return first_lsn


# --- frames -------------------------------------------------------------------


def encode_frame(lsn: int, rtype: int, body: bytes, synced: int = 0) -> bytes:
    """One CRC-framed WAL record; ``synced`` is the LSN up to which the log was durable."""
    payload = _frame_lead.pack(lsn, rtype, synced) + body
    length = _crc.pack(len(payload))
    return length + _crc.pack(crc32c(payload, crc32c(length))) + payload


def decode_frame(data: bytes | memoryview, offset: int, check_crc: bool = True) -> Frame | None:
    """Decode the frame starting at ``offset``, or return None if it is not a valid frame.

    "Not valid" covers a short read, a zero length (preallocated space), an
    impossible length and a CRC mismatch; deciding whether that is a torn tail
    or corruption is the caller's job, because it depends on what follows.
    ``check_crc=False`` skips the CRC, for a second pass over frames that
    recovery has just verified (replay on open).
    """
    if len(data) - offset < FRAME_PREFIX_SIZE:
        return None
    length, stored = _frame_prefix.unpack_from(data, offset)
    start = offset + FRAME_PREFIX_SIZE
    end = start + length
    if length < FRAME_LEAD_SIZE or length > MAX_PAYLOAD or end > len(data):
        return None
    if check_crc and crc32c(data[start:end], crc32c(data[offset : offset + 4])) != stored:
        return None
    lsn, rtype, synced = _frame_lead.unpack_from(data, start)
    return Frame(offset, end, lsn, rtype, bytes(data[start + FRAME_LEAD_SIZE : end]), synced)


def scan_frames(data: bytes, offset: int, first_lsn: int) -> tuple[list[int], int, bool]:
    """Verify the frames lying back to back in ``data`` from ``offset``: CRCs, and LSNs dense from ``first_lsn``.

    Returns ``(starts, end, wrong_lsn)``: the offsets of the valid frames, in
    order; the offset where they stop (``len(data)`` or the first byte that
    does not start a valid frame with the next LSN -- preallocated zeros, a
    torn tail or damage; the caller tells them apart); and whether the frame
    there has a valid CRC but not the expected LSN.  The same checks as
    :func:`decode_frame` at every offset, without building a frame: this is
    recovery's pass over the whole log.
    """
    size = len(data)
    starts: list[int] = []
    add = starts.append
    unpack = _frame_head.unpack_from
    seeds: dict[int, int] = {}  # CRC-32C of each length word seen: frames of one size share it
    expected = first_lsn
    view = memoryview(data)
    try:
        while offset + FRAME_HEAD_SIZE <= size:
            length, stored, lsn, _rtype, _synced = unpack(data, offset)
            end = offset + FRAME_PREFIX_SIZE + length
            if length < FRAME_LEAD_SIZE or length > MAX_PAYLOAD or end > size:
                break
            seed = seeds.get(length)
            if seed is None:
                seed = seeds[length] = crc32c(view[offset : offset + 4])
            if crc32c(view[offset + FRAME_PREFIX_SIZE : end], seed) != stored:
                break
            if lsn != expected:
                return starts, offset, True
            add(offset)
            offset = end
            expected += 1
    finally:
        view.release()
    return starts, offset, False


_ZEROS = bytes(1 << 16)


def zeros_from(data: bytes, offset: int) -> bool:
    """Whether every byte of ``data`` from ``offset`` on is zero (compared in blocks: no copy, no count)."""
    zeros, size, block = memoryview(_ZEROS), len(data), len(_ZEROS)
    while offset < size:
        step = min(block, size - offset)
        if not data.startswith(zeros[:step], offset):
            return False
        offset += step
    return True


# --- records ------------------------------------------------------------------


def encode_deliver(record: Deliver) -> bytes:
    """Body of a DELIVER record."""
    return b"".join(
        (
            _message_head.pack(
                record.msg_id, record.sender, record.conv, record.client_seq, record.ts_ms, record.priority
            ),
            _deliver_counts.pack(len(record.body), len(record.pairs)),
            record.body,
            pack_pairs(record.pairs),
        )
    )


def encode_deliver_unsealed(lsn: int, record: Deliver) -> bytes:
    """A DELIVER frame for ``lsn`` whose synced LSN and CRC are still zero (the write hot path).

    The group-commit flusher fills both in with :func:`seal_frames` when it
    writes the frame: only then is it known up to which LSN the log is
    durable, and that evidence must be what the frame records (a frame stamped
    when it was sequenced could under-report it, and recovery would then take
    damage in an acknowledged frame for a torn tail).  An unsealed frame fails
    its CRC, so it can never be mistaken for a written one.
    """
    payload = b"".join(
        (
            _frame_lead.pack(lsn, RECORD_DELIVER, 0),
            _message_head.pack(
                record.msg_id, record.sender, record.conv, record.client_seq, record.ts_ms, record.priority
            ),
            _deliver_counts.pack(len(record.body), len(record.pairs)),
            record.body,
            pack_pairs(record.pairs),
        )
    )
    return _frame_prefix.pack(len(payload), 0) + payload


def seal_frames(frames: bytearray, synced: int) -> None:
    """Stamp ``synced`` into every frame of ``frames`` (back to back) and compute their CRCs, in place."""
    offset, end = 0, len(frames)
    view = memoryview(frames)
    try:
        while offset + FRAME_PREFIX_SIZE + FRAME_LEAD_SIZE <= end:
            (length,) = _crc.unpack_from(frames, offset)
            start = offset + FRAME_PREFIX_SIZE
            if start + length > end:
                break
            _u64.pack_into(frames, start + _SYNCED_OFFSET, synced)
            _crc.pack_into(frames, offset + 4, crc32c(view[start : start + length], crc32c(view[offset : offset + 4])))
            offset = start + length
    finally:
        view.release()
    if offset != end:
        raise ValueError(f"frames end at {offset}, not at {end}: not a sequence of whole frames")


def encode_deliver_frame(lsn: int, synced: int, record: Deliver) -> bytes:
    """``encode_frame(lsn, RECORD_DELIVER, encode_deliver(record), synced)``: a complete, sealed frame."""
    frame = bytearray(encode_deliver_unsealed(lsn, record))
    seal_frames(frame, synced)
    return bytes(frame)


def decode_deliver(body: bytes, path: str | None = None, offset: int | None = None) -> Deliver:
    """Decode a DELIVER record body; :class:`CorruptionError` if its lengths disagree."""
    return decode_deliver_at(body, 0, len(body), path, offset)


def decode_deliver_at(data: bytes, start: int, end: int, path: str | None = None, offset: int | None = None) -> Deliver:
    """:func:`decode_deliver` of the body ``data[start:end]``, read in place (replay decodes a segment's frames so).

    ``path`` and ``offset`` (of the frame) go into the :class:`CorruptionError`
    raised when the record's lengths disagree.
    """
    if end - start < _DELIVER_FIXED_SIZE:
        raise CorruptionError("DELIVER record is shorter than its fixed part", path=path, offset=offset)
    msg_id, sender, conv, client_seq, ts_ms, priority, blen, count = _deliver_fixed.unpack_from(data, start)
    body_start = start + _DELIVER_FIXED_SIZE
    pairs_start = body_start + blen
    if end != pairs_start + PAIR_SIZE * count:
        raise CorruptionError("DELIVER record lengths do not add up", path=path, offset=offset)
    if count == 2:  # 1:1 messages, the common case: without the slicing and zipping
        user_a, cursor_a, user_b, cursor_b = _two_pairs.unpack_from(data, pairs_start)
        pairs: Pairs = ((user_a, cursor_a), (user_b, cursor_b))
    else:
        flat = iter(_pairs_struct(count).unpack_from(data, pairs_start))
        pairs = tuple(zip(flat, flat))
    # tuple.__new__ directly: a NamedTuple's own __new__ is a Python function, a visible cost per record.
    return _new_tuple(Deliver, (msg_id, sender, conv, client_seq, ts_ms, priority, bytes(data[body_start:pairs_start]), pairs))


def decode_frames(data: bytes, offset: int, end: int, lsn: int, limit: int, path: str | None = None) -> tuple[list[Record], int]:
    """Decode up to ``limit`` records of the frames lying back to back in ``data[offset:end]``, the first with LSN ``lsn``.

    Returns the records and the offset after the last one decoded.  For
    frames whose CRCs recovery has verified (replay): CRCs are not checked
    again, but each frame's LSN and bounds are, and each record's lengths;
    a :class:`CorruptionError` names ``path`` and the frame's offset.  DELIVER
    records, nearly all of them, are decoded here in place (as
    :func:`decode_deliver_at` does); any other type by :func:`decode_record`.
    """
    records: list[Record] = []
    add = records.append
    unpack_head, unpack_fixed, unpack_two = _frame_head.unpack_from, _deliver_fixed.unpack_from, _two_pairs.unpack_from
    while offset < end and len(records) < limit:
        if offset + FRAME_HEAD_SIZE > end:
            raise CorruptionError(f"WAL frame {lsn} unreadable", path=path, offset=offset)
        length, _crc, frame_lsn, rtype, _synced = unpack_head(data, offset)
        start, frame_end = offset + FRAME_HEAD_SIZE, offset + FRAME_PREFIX_SIZE + length
        if frame_lsn != lsn or frame_end > end or length < FRAME_LEAD_SIZE:
            raise CorruptionError(f"WAL frame {lsn} unreadable", path=path, offset=offset)
        if rtype != RECORD_DELIVER:
            add(decode_record(rtype, bytes(data[start:frame_end]), lsn, path, offset))
        elif frame_end - start < _DELIVER_FIXED_SIZE:
            raise CorruptionError("DELIVER record is shorter than its fixed part", path=path, offset=offset)
        else:
            msg_id, sender, conv, client_seq, ts_ms, priority, blen, count = unpack_fixed(data, start)
            body_start = start + _DELIVER_FIXED_SIZE
            pairs_start = body_start + blen
            if frame_end != pairs_start + PAIR_SIZE * count:
                raise CorruptionError("DELIVER record lengths do not add up", path=path, offset=offset)
            if count == 2:  # 1:1 messages, the common case: without the slicing and zipping
                user_a, cursor_a, user_b, cursor_b = unpack_two(data, pairs_start)
                pairs: Pairs = ((user_a, cursor_a), (user_b, cursor_b))
            else:
                flat = iter(_pairs_struct(count).unpack_from(data, pairs_start))
                pairs = tuple(zip(flat, flat))
            add(_new_tuple(Deliver, (msg_id, sender, conv, client_seq, ts_ms, priority, bytes(data[body_start:pairs_start]), pairs)))
        offset = frame_end
        lsn += 1
    return records, offset


def deliver_pairs(body: bytes, path: str | None = None, offset: int | None = None) -> Pairs:
    """The (user id, cursor) pairs of a DELIVER record body, its lengths checked as :func:`decode_deliver` does."""
    flat = iter(deliver_pairs_at(body, 0, len(body), path, offset))
    return tuple(zip(flat, flat))


def deliver_pairs_at(data: bytes, start: int, end: int, path: str | None = None, offset: int | None = None) -> tuple[int, ...]:
    """The pairs of the DELIVER body ``data[start:end]``, flat (user id, cursor, user id, cursor, ...), lengths checked.

    Replay checks every record's cursors before applying anything; this
    reads only what that needs, in place (no message, no copy of the body).
    """
    if end - start < _DELIVER_FIXED_SIZE:
        raise CorruptionError("DELIVER record is shorter than its fixed part", path=path, offset=offset)
    blen, count = _deliver_counts.unpack_from(data, start + MESSAGE_HEAD_SIZE)
    pairs_start = start + _DELIVER_FIXED_SIZE + blen
    if end != pairs_start + PAIR_SIZE * count:
        raise CorruptionError("DELIVER record lengths do not add up", path=path, offset=offset)
    return _pairs_struct(count).unpack_from(data, pairs_start)


def encode_expire(record: Expire) -> bytes:
    """Body of an EXPIRE record."""
    flat = [n for key in record.keys for n in key]
    return _count.pack(len(record.keys)) + struct.pack(f">{len(flat)}Q", *flat)


def decode_expire(body: bytes, path: str | None = None, offset: int | None = None) -> Expire:
    """Decode an EXPIRE record body; :class:`CorruptionError` if its length disagrees or it names no key."""
    if len(body) < _count.size:
        raise CorruptionError("EXPIRE record is shorter than its count", path=path, offset=offset)
    (count,) = _count.unpack_from(body, 0)
    if count == 0 or len(body) != _count.size + EXPIRED_KEY_SIZE * count:
        raise CorruptionError("EXPIRE record lengths do not add up", path=path, offset=offset)
    flat = struct.unpack_from(f">{3 * count}Q", body, _count.size)
    return Expire(tuple(zip(flat[0::3], flat[1::3], flat[2::3])))


def encode_unsealed(lsn: int, rtype: int, body: bytes) -> bytes:
    """A frame of any record type whose synced LSN and CRC are still zero (see :func:`encode_deliver_unsealed`)."""
    payload = _frame_lead.pack(lsn, rtype, 0) + body
    return _frame_prefix.pack(len(payload), 0) + payload


def encode_record(record: Record) -> tuple[int, bytes]:
    """(record type, body) of a decoded record of any kind."""
    if type(record) is Deliver:
        return RECORD_DELIVER, encode_deliver(record)
    return RECORD_EXPIRE, encode_expire(record)  # type: ignore[arg-type]


def decode_record(rtype: int, body: bytes, lsn: int = 0, path: str | None = None, offset: int | None = None) -> Record:
    """Decode a record body of type ``rtype``; :class:`CorruptionError` for an unknown type or bad lengths."""
    if rtype == RECORD_DELIVER:
        return decode_deliver(body, path, offset)
    if rtype == RECORD_EXPIRE:
        return decode_expire(body, path, offset)
    raise CorruptionError(
        f"unknown WAL record type {rtype} (LSN {lsn})", path=path, offset=offset, hint="open it with the syncstore version that wrote it"
    )


def encode_message_value(record: Deliver) -> bytes:
    """``messages`` value of ``record``: refs (its recipient count), head fields, body."""
    return (
        _stored_head.pack(len(record.pairs), record.sender, record.conv, record.client_seq, record.ts_ms, record.priority)
        + record.body
    )


#: ``pack_stored_head(refs, sender, conv, client_seq, ts_ms, priority)``: a message value's head (the body follows).
pack_stored_head = _stored_head.pack
#: ``pack_dedup_head(msg_id, fingerprint, count)``: a dedup value's head (``pack_pairs(pairs)`` follows).
pack_dedup_head = _dedup_head.pack
#: Decode the fixed head of a message value: ``unpack_stored_head(value)`` ->
#: (refs, sender, conv, client_seq, ts_ms, priority); the body is
#: ``value[STORED_HEAD_SIZE:]``.  Exposed bare because reads call it per message.
unpack_stored_head = _stored_head.unpack_from
#: ``pack_inbox_entry(cursor, msg_id)``: a 16-byte inbox entry.
pack_inbox_entry = _inbox_entry.pack
#: ``unpack_inbox_entry(entry)`` -> (cursor, msg_id).
unpack_inbox_entry = _inbox_entry.unpack_from


def set_refs(value: bytes, refs: int) -> bytes:
    """A message value with its reference count replaced (when inbox entries are added or removed)."""
    return _refs.pack(refs) + value[_refs.size :]


def dedup_fingerprint(conv: int, body: bytes) -> bytes:
    """The content of a delivery that a retry of its idempotency key must repeat, besides the recipients.

    conv is fixed-width, so ``conv | body`` is unambiguous.  ``ts_ms`` and
    ``priority`` are left out on purpose: a retry may carry a new timestamp.
    """
    return fingerprint_of(_u64.pack(conv), body)


def fingerprint_of(conv_key: bytes, body: bytes) -> bytes:
    """:func:`dedup_fingerprint` with conv already packed (u64, big-endian): the apply loop has it."""
    digest = new_fingerprint()
    digest.update(conv_key)
    digest.update(body)
    return digest.digest()


#: ``new_fingerprint()``: a fresh hasher of :func:`dedup_fingerprint`; update it with conv
#: (u64, big-endian), then the body.  A copy of a prepared one: setting up BLAKE2b's
#: parameters (keyword arguments) per message cost more than hashing a short body.
new_fingerprint = hashlib.blake2b(digest_size=FINGERPRINT_SIZE, person=_FINGERPRINT_PERSON).copy


def encode_dedup(msg_id: int, fingerprint: bytes, pairs: Pairs) -> bytes:
    """LMDB dedup value: the first delivery's msg_id, content fingerprint and cursors."""
    # A guard against a caller's slip, not user input: "16s" would silently pad or cut.
    if len(fingerprint) != FINGERPRINT_SIZE:
        raise ValueError(f"a dedup fingerprint is {FINGERPRINT_SIZE} bytes, got {len(fingerprint)}")
    return _dedup_head.pack(msg_id, fingerprint, len(pairs)) + pack_pairs(pairs)


def decode_dedup(value: bytes | memoryview) -> DedupEntry:
    """Inverse of :func:`encode_dedup`; :class:`CorruptionError` on bad lengths."""
    if len(value) < DEDUP_HEAD_SIZE:
        raise CorruptionError("dedup entry is truncated")
    msg_id, fingerprint, count = _dedup_head.unpack_from(value, 0)
    if len(value) != DEDUP_HEAD_SIZE + PAIR_SIZE * count:
        raise CorruptionError("dedup entry lengths do not add up")
    return DedupEntry(msg_id, fingerprint, unpack_pairs(value, DEDUP_HEAD_SIZE, count))
