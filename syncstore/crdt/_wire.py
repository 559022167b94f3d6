"""Binary encoding shared by the CRDT types: the frame and its building blocks.

Every encoding is one frame; integers are big-endian, as in ``_codec``::

    offset  size  field
    0       2     magic b"CR"
    2       1     format version, 1
    3       1     type tag: 1 GCounter, 2 PNCounter, 3 LWWRegister,
                  4 MaxRegister, 5 ORSet, 6 CRDTMap
    4       4     body length n (u32)
    8       n     body: the type's layout, written at the top of its module
    8+n     4     CRC-32C of bytes 0 .. 8+n-1 (u32)

Building blocks of the bodies::

    pair      u64 replica (>= 1), u64 count (>= 1): a counter entry, a
              version-vector entry or a dot (16 bytes)
    pairs     u32 k, then k pairs
    value     u8 kind, then  0 int:   i64
                             1 bytes: u32 length, the bytes
                             2 str:   u32 length, its UTF-8 bytes
    crdt      u8 type tag, then that type's body (CRDTMap field values)

A CRC-32C catches every error burst of up to 32 bits, so any single corrupted
byte -- in the body, the header or the CRC itself -- is detected.  Decoding
checks every length and count against the bytes that remain before it reads
on, so a bogus length can neither allocate memory nor loop for long, and it
accepts only canonical bodies (sorted, no zero counts, no trailing bytes), so
``decode(encode(x)) == x`` and nothing else decodes to ``x``.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, TypeVar

from crc32c import crc32c

from ..errors import CorruptionError, InvalidArgument
from ._values import KIND_BYTES, KIND_INT, KIND_STR, Value

if TYPE_CHECKING:
    from ._base import CRDT

MAGIC = b"CR"
VERSION = 1
HEAD_FMT = ">2sBBI"  # magic, version, type tag, body length
HEAD_SIZE = 8
assert struct.calcsize(HEAD_FMT) == HEAD_SIZE
CRC_FMT = ">I"
CRC_SIZE = 4
assert struct.calcsize(CRC_FMT) == CRC_SIZE
U8_FMT = ">B"
U8_SIZE = 1
assert struct.calcsize(U8_FMT) == U8_SIZE
U32_FMT = ">I"
U32_SIZE = 4
assert struct.calcsize(U32_FMT) == U32_SIZE
I64_FMT = ">q"
I64_SIZE = 8
assert struct.calcsize(I64_FMT) == I64_SIZE
PAIR_FMT = ">QQ"  # replica, count (or dot counter)
PAIR_SIZE = 16
assert struct.calcsize(PAIR_FMT) == PAIR_SIZE
STAMP_FMT = ">QIQ"  # physical ms, logical, replica
STAMP_SIZE = 20
assert struct.calcsize(STAMP_FMT) == STAMP_SIZE

#: Nesting limit of CRDTMap fields, so a crafted encoding cannot exhaust the stack.
MAX_DEPTH = 16

_head = struct.Struct(HEAD_FMT)
_crc = struct.Struct(CRC_FMT)
_u8 = struct.Struct(U8_FMT)
_u32 = struct.Struct(U32_FMT)
_i64 = struct.Struct(I64_FMT)
_pair = struct.Struct(PAIR_FMT)
_stamp = struct.Struct(STAMP_FMT)

#: Type tag -> class, filled by :func:`register` as the type modules load.
KINDS: dict[int, type[CRDT]] = {}

C = TypeVar("C", bound="type[CRDT]")


def register(cls: C) -> C:
    """Class decorator: make ``cls`` decodable under its ``TAG``."""
    assert cls.TAG not in KINDS, cls
    KINDS[cls.TAG] = cls
    return cls


class Writer:
    """Appends the building blocks of a body to a bytearray."""

    __slots__ = ("out",)

    def __init__(self) -> None:
        self.out = bytearray()

    def u8(self, n: int) -> None:
        """Append an unsigned byte."""
        self.out += _u8.pack(n)

    def u32(self, n: int) -> None:
        """Append an unsigned 32-bit int."""
        self.out += _u32.pack(n)

    def pair(self, first: int, second: int) -> None:
        """Append a (replica, count) pair or a dot."""
        self.out += _pair.pack(first, second)

    def pairs(self, pairs: tuple[tuple[int, int], ...]) -> None:
        """Append a count, then the pairs."""
        self.u32(len(pairs))
        for first, second in pairs:
            self.pair(first, second)

    def stamp(self, physical: int, logical: int, replica: int) -> None:
        """Append an HLC stamp."""
        self.out += _stamp.pack(physical, logical, replica)

    def value(self, value: Value) -> None:
        """Append a kind byte and a value."""
        if type(value) is int:
            self.out += _u8.pack(KIND_INT) + _i64.pack(value)
            return
        raw = value if type(value) is bytes else value.encode("utf-8")  # type: ignore[union-attr]
        self.out += _u8.pack(KIND_BYTES if type(value) is bytes else KIND_STR) + _u32.pack(len(raw))
        self.out += raw

    def crdt(self, crdt: CRDT, depth: int) -> None:
        """Append a nested value: its type tag, then its body."""
        if depth >= MAX_DEPTH:
            raise InvalidArgument(
                f"CRDTMap nesting deeper than {MAX_DEPTH} levels cannot be encoded",
                hint="flatten the document; the encoding refuses deeper nesting",
            )
        self.u8(crdt.TAG)
        crdt._write_body(self, depth + 1)


class Reader:
    """Reads the building blocks of a body, checking bounds and ranges.

    Every failure is a :class:`CorruptionError` naming the byte offset in the
    encoding where the bad item starts.
    """

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data = data
        self.pos = pos
        self.end = end

    def corrupt(self, message: str, at: int | None = None) -> CorruptionError:
        """The error to raise for a bad item starting at ``at`` (default: here)."""
        return CorruptionError(message, offset=self.pos if at is None else at)

    def _take(self, layout: struct.Struct) -> tuple[int, ...]:
        at = self.pos
        if self.end - at < layout.size:
            raise self.corrupt(f"truncated: {layout.size} bytes needed, {self.end - at} left")
        self.pos = at + layout.size
        return layout.unpack_from(self.data, at)

    def u8(self) -> int:
        """Read an unsigned byte."""
        return self._take(_u8)[0]

    def count(self, item_size: int) -> int:
        """Read a u32 count of items of at least ``item_size`` bytes each."""
        at = self.pos
        (n,) = self._take(_u32)
        if n * item_size > self.end - self.pos:
            raise self.corrupt(f"count {n} does not fit the {self.end - self.pos} bytes left", at)
        return n

    def pair(self) -> tuple[int, int]:
        """Read a pair; both halves must be >= 1 (replica ids and counts are)."""
        at = self.pos
        first, second = self._take(_pair)
        if first == 0 or second == 0:
            raise self.corrupt(f"pair ({first}, {second}) has a zero replica id or count", at)
        return first, second

    def pairs(self, strict_replicas: bool) -> tuple[tuple[int, int], ...]:
        """Read counted pairs in strictly ascending order.

        ``strict_replicas``: one pair per replica (counters, version vectors);
        otherwise the pairs are dots, ordered as (replica, counter).
        """
        out: list[tuple[int, int]] = []
        for _ in range(self.count(PAIR_SIZE)):
            at = self.pos
            pair = self.pair()
            if out and (pair[0] <= out[-1][0] if strict_replicas else pair <= out[-1]):
                raise self.corrupt(f"pair {pair} is out of order or repeated", at)
            out.append(pair)
        return tuple(out)

    def stamp(self) -> tuple[int, int, int]:
        """Read an HLC stamp (physical, logical, replica)."""
        at = self.pos
        physical, logical, replica = self._take(_stamp)
        if replica == 0:
            raise self.corrupt("stamp has replica id 0", at)
        return physical, logical, replica

    def value(self) -> Value:
        """Read a kind byte and a value."""
        at = self.pos
        kind = self.u8()
        if kind == KIND_INT:
            return self._take(_i64)[0]
        if kind not in (KIND_BYTES, KIND_STR):
            raise self.corrupt(f"unknown value kind {kind}", at)
        n = self.count(1)
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        if kind == KIND_BYTES:
            return raw
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.corrupt("str value is not valid UTF-8", at) from None

    def crdt(self, depth: int) -> CRDT:
        """Read a nested value: its type tag, then its body."""
        at = self.pos
        tag = self.u8()
        cls = KINDS.get(tag)
        if cls is None:
            raise self.corrupt(f"unknown CRDT type tag {tag}", at)
        if depth >= MAX_DEPTH:
            raise self.corrupt(f"CRDTMap nesting deeper than {MAX_DEPTH} levels", at)
        return cls._read_body(self, depth + 1)


def _corrupt(message: str, at: int) -> CorruptionError:
    return CorruptionError(message, offset=at)


def encode(crdt: CRDT) -> bytes:
    """The framed, checksummed encoding of ``crdt``."""
    writer = Writer()
    crdt._write_body(writer, 0)
    frame = _head.pack(MAGIC, VERSION, crdt.TAG, len(writer.out)) + writer.out
    return bytes(frame + _crc.pack(crc32c(frame)))


def decode(data: bytes, expect: type[CRDT] | None = None) -> CRDT:
    """Decode the encoding of any CRDT type, told apart by its type tag.

    ``expect`` (a CRDT class) refuses the other types.  Raises
    ``CorruptionError`` for damaged or foreign bytes and ``InvalidArgument``
    if ``data`` is not bytes-like; never anything else.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"data must be bytes, not {type(data).__name__}", key="data")
    data = bytes(data)
    if len(data) < HEAD_SIZE + CRC_SIZE:
        raise _corrupt(f"CRDT encoding too short: {len(data)} bytes", 0)
    magic, version, tag, n = _head.unpack_from(data)
    if magic != MAGIC:
        raise _corrupt(f"bad magic {magic!r}, expected {MAGIC!r}: not a CRDT encoding", 0)
    if version != VERSION:
        raise _corrupt(f"unsupported CRDT format version {version}", 2)
    if HEAD_SIZE + n + CRC_SIZE != len(data):
        raise _corrupt(f"body length {n} does not match the {len(data)} bytes given", 4)
    (stored,) = _crc.unpack_from(data, HEAD_SIZE + n)
    if crc32c(data[: HEAD_SIZE + n]) != stored:
        raise _corrupt("CRC-32C mismatch: the encoding is damaged", HEAD_SIZE + n)
    cls = KINDS.get(tag)
    if cls is None:
        raise _corrupt(f"unknown CRDT type tag {tag}", 3)
    if expect is not None and cls is not expect:
        raise _corrupt(f"encoding holds a {cls.__name__}, not a {expect.__name__}", 3)
    reader = Reader(data, HEAD_SIZE, HEAD_SIZE + n)
    crdt = cls._read_body(reader, 0)
    if reader.pos != reader.end:
        raise reader.corrupt(f"{reader.end - reader.pos} trailing bytes after the {cls.__name__} body")
    return crdt

