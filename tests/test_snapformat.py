"""Byte formats of snapshot files and manifests (syncstore._snapformat): round trips, layout, damage (pure)."""

from __future__ import annotations

import json
import struct

import crcmod.predefined
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from syncstore import CorruptionError
from syncstore import _snapformat as fmt
from syncstore._snapformat import BASE, DELTA, DELETE, PUT, ChainEntry, Header, Manifest, Trailer

U64 = st.integers(min_value=0, max_value=2**64 - 1)
U32 = st.integers(min_value=0, max_value=2**32 - 1)
_crcmod_crc32c = crcmod.predefined.mkPredefinedCrcFun("crc-32c")
COMPRESSOR = zstandard.ZstdCompressor(level=3)
DECOMPRESSOR = zstandard.ZstdDecompressor()


@st.composite
def headers(draw):
    kind = draw(st.sampled_from([BASE, DELTA]))
    lsn = draw(st.integers(min_value=1, max_value=2**64 - 1))
    prev = 0 if kind == BASE else draw(st.integers(min_value=1, max_value=lsn - 1)) if lsn > 1 else None
    if prev is None:
        kind, prev = BASE, 0
    return Header(kind, draw(st.integers(0, 1023)), lsn, prev, draw(U64), draw(st.booleans()))


KEYS = st.binary(min_size=1, max_size=40)


@st.composite
def rows(draw):
    db = draw(st.sampled_from(sorted(fmt.DB_NAMES)))
    op = draw(st.sampled_from([PUT, DELETE]))
    key = draw(KEYS)
    if fmt.DB_NAMES[db] in fmt.DUP_DBS:
        value = draw(st.binary(min_size=1, max_size=24))
    else:
        value = b"" if op == DELETE else draw(st.binary(max_size=300))
    return op, db, key, value


def _buffer(row_list):
    buffer = fmt.RowBuffer()
    for op, db, key, value in row_list:
        if op == PUT:
            buffer.put(db, key, value)
        else:
            buffer.delete(db, key, value)
    return buffer


# --- header and trailer -----------------------------------------------------------------


@given(headers())
def test_header_round_trip_and_layout(header):
    data = fmt.encode_header(header)
    assert fmt.decode_header(data) == header
    # the layout of docs/format.md, byte by byte (an identity "encoder" fails this)
    assert len(data) == fmt.HEADER_SIZE == 44 and data[:8] == b"SSSNAP\r\n"
    flags = 1 if header.has_last_msg_id else 0
    assert struct.unpack_from(">HBBHHQQQ", data, 8) == (1, header.kind, flags, header.replica_id, 0, header.lsn, header.prev_lsn, header.epoch)
    assert struct.unpack_from(">I", data, 40)[0] == _crcmod_crc32c(data[:40])


@given(headers(), st.data())
def test_any_damaged_header_byte_is_reported_with_an_offset(header, data):
    encoded = bytearray(fmt.encode_header(header))
    at = data.draw(st.integers(0, len(encoded) - 1))
    encoded[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CorruptionError) as caught:
        fmt.decode_header(bytes(encoded), "f.snap")
    assert caught.value.path == "f.snap" and caught.value.offset is not None and 0 <= caught.value.offset <= 40


def test_header_kind_and_previous_lsn_must_agree():
    body = struct.pack(fmt.HEADER_FMT, fmt.SNAP_MAGIC, 1, BASE, 0, 0, 0, 10, 5, 1)  # a base with a previous LSN
    with pytest.raises(CorruptionError) as caught:
        fmt.decode_header(body + struct.pack(">I", _crcmod_crc32c(body)))
    assert caught.value.offset == 24


@given(U32, U64, U64, U64, U64, U32)
def test_trailer_round_trip_and_layout(blocks, puts, deletes, raw, last_msg_id, body_crc):
    if puts + deletes >= 2**64:
        puts = deletes = 1
    trailer = Trailer(blocks, puts + deletes, puts, deletes, raw, last_msg_id, body_crc)
    data = fmt.encode_trailer(trailer)
    assert fmt.decode_trailer(data) == trailer
    assert len(data) == 56 and data[:4] == b"\0\0\0\0"
    assert struct.unpack(">IIQQQQQII", data)[1:8] == (blocks, puts + deletes, puts, deletes, raw, last_msg_id, body_crc)
    assert struct.unpack_from(">I", data, 52)[0] == _crcmod_crc32c(data[:52])
    for at in range(len(data)):
        damaged = bytearray(data)
        damaged[at] ^= 0x41
        with pytest.raises(CorruptionError) as caught:
            fmt.decode_trailer(bytes(damaged), "f", 1000)
        assert caught.value.offset is not None and caught.value.offset >= 1000


# --- rows and blocks ----------------------------------------------------------------------


@given(st.lists(rows(), min_size=1, max_size=40))
def test_block_round_trip_keeps_rows_in_order(row_list):
    buffer = _buffer(row_list)
    assert buffer.count == len(row_list) and buffer.puts + buffer.deletes == len(row_list)
    raw, count = buffer.take_raw()
    assert buffer.count == 0 and buffer.size == 0
    assert len(raw) == sum(8 + len(k) + len(v) for _op, _db, k, v in row_list)
    block = fmt.encode_block(raw, count, COMPRESSOR)
    decoded = fmt.decode_block(block[:16], block[16:], DECOMPRESSOR)
    assert decoded == row_list
    clen, ulen, n, crc = struct.unpack_from(">IIII", block)
    assert (clen, ulen, n) == (len(block) - 16, len(raw), len(row_list))
    assert crc == _crcmod_crc32c(block[:12] + block[16:])
    assert zstandard.ZstdDecompressor().decompress(block[16:]) == raw  # a real zstd frame


def test_a_repetitive_block_is_compressed():
    buffer = fmt.RowBuffer()
    for n in range(2000):
        buffer.put(2, n.to_bytes(8, "big"), (n % 7).to_bytes(16, "big"))
    raw, count = buffer.take_raw()
    block = fmt.encode_block(raw, count, COMPRESSOR)
    assert len(block) < len(raw) / 3


@given(st.lists(rows(), min_size=1, max_size=10), st.data())
def test_any_damaged_block_byte_is_reported_at_the_block(row_list, data):
    raw, count = _buffer(row_list).take_raw()
    block = bytearray(fmt.encode_block(raw, count, COMPRESSOR))
    at = data.draw(st.integers(0, len(block) - 1))
    block[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CorruptionError) as caught:
        fmt.decode_block(bytes(block[:16]), bytes(block[16:]), DECOMPRESSOR, "f.snap", 4096)
    assert caught.value.path == "f.snap" and caught.value.offset == 4096


@pytest.mark.parametrize(
    "row, why",
    [
        ((3, 1, b"k", b"v"), "op"),
        ((PUT, 9, b"k", b"v"), "database"),
        ((PUT, 1, b"", b"v"), "empty key"),
        ((PUT, 2, b"k", b""), "empty duplicate"),
        ((DELETE, 1, b"k", b"v"), "a plain delete with a value"),
        ((PUT, 1, b"k" * 512, b"v"), "key over 511 bytes"),
    ],
)
def test_malformed_rows_behind_a_valid_crc_are_refused(row, why):
    op, db, key, value = row
    raw = struct.pack(">BBHI", op, db, len(key), len(value)) + key + value
    block = fmt.encode_block(raw, 1, COMPRESSOR)
    with pytest.raises(CorruptionError, match="row"):
        fmt.decode_block(block[:16], block[16:], DECOMPRESSOR)


def test_row_counts_must_fill_the_block_exactly():
    raw = _buffer([(PUT, 1, b"k", b"v"), (PUT, 1, b"l", b"w")]).take_raw()[0]
    for count in (1, 3):
        block = fmt.encode_block(raw, count, COMPRESSOR)
        with pytest.raises(CorruptionError):
            fmt.decode_block(block[:16], block[16:], DECOMPRESSOR)


def test_impossible_block_lengths_are_refused_before_reading():
    for prefix in (struct.pack(">IIII", 10, 0, 1, 0), struct.pack(">IIII", 10, 8, 2, 0), struct.pack(">IIII", 2**32 - 1, 8, 1, 0), b"\0" * 7):
        with pytest.raises(CorruptionError):
            fmt.decode_block_prefix(prefix)
    assert fmt.decode_block_prefix(struct.pack(">IIII", 0, 5, 6, 7))[0] == 0  # the trailer's zero word


# --- names ------------------------------------------------------------------------------------


@given(U64, U64)
def test_file_names_round_trip_and_sort_by_lsn(lsn, prev):
    assert fmt.parse_file_name(fmt.file_name(BASE, lsn, 0)) == (BASE, lsn, 0)
    assert fmt.parse_file_name(fmt.file_name(DELTA, lsn, prev)) == (DELTA, lsn, prev)
    assert (fmt.file_name(BASE, lsn, 0) < fmt.file_name(BASE, lsn + 1, 0)) or lsn + 1 >= 10**20


@pytest.mark.parametrize("name", ["../base-00000000000000000001.snap", "/etc/passwd", "base-1.snap", "base-00000000000000000001.snap/x", "x/base-00000000000000000001.snap", "MANIFEST", ""])
def test_only_plain_snapshot_names_parse(name):
    assert fmt.parse_file_name(name) is None


# --- the manifest and the record --------------------------------------------------------------


@st.composite
def manifests(draw):
    lsns = sorted(set(draw(st.lists(st.integers(1, 2**63), min_size=1, max_size=6))))
    chain = []
    for index, lsn in enumerate(lsns):
        kind = BASE if index == 0 else DELTA
        prev = 0 if index == 0 else lsns[index - 1]
        puts, deletes = draw(st.integers(0, 2**40)), draw(st.integers(0, 2**40))
        last = draw(st.one_of(st.none(), U64))  # None: no message applied (msg_id 0 is a real id)
        chain.append(ChainEntry(fmt.file_name(kind, lsn, prev), kind, lsn, prev, draw(U64), draw(U32), puts + deletes, puts, deletes, last))
    return Manifest(draw(st.integers(0, 1023)), draw(U64), tuple(chain))


@given(manifests())
def test_manifest_round_trip_and_layout(manifest):
    data = fmt.encode_manifest(manifest)
    assert fmt.decode_manifest(data) == manifest
    magic, version, reserved, length = struct.unpack_from(">8sHHI", data)
    assert (magic, version, reserved, length) == (b"SSMANI\r\n", 1, 0, len(data) - 20)
    document = json.loads(data[16:-4])
    assert [entry["name"] for entry in document["chain"]] == [e.name for e in manifest.chain]
    assert document["source"] == {"replica_id": manifest.replica_id, "epoch": manifest.epoch}
    assert struct.unpack_from(">I", data, len(data) - 4)[0] == _crcmod_crc32c(data[:-4])


@given(manifests(), st.data())
def test_any_damaged_manifest_byte_is_reported_with_an_offset(manifest, data):
    encoded = bytearray(fmt.encode_manifest(manifest))
    at = data.draw(st.integers(0, len(encoded) - 1))
    encoded[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CorruptionError) as caught:
        fmt.decode_manifest(bytes(encoded), "MANIFEST")
    assert caught.value.path == "MANIFEST" and caught.value.offset is not None


def _manifest_with(chain_items, source=None):
    document = {"source": source or {"replica_id": 0, "epoch": 5}, "chain": chain_items}
    return fmt._encode_envelope(fmt.MANIFEST_MAGIC, document)


def _item(name, kind="base", lsn=10, prev=0):
    return {"name": name, "kind": kind, "lsn": lsn, "prev_lsn": prev, "size": 100, "crc32c": 1, "rows": 0, "puts": 0, "deletes": 0, "last_msg_id": 0}


@pytest.mark.parametrize(
    "chain",
    [
        [_item("../base-00000000000000000010.snap")],
        [_item("/etc/passwd")],
        [_item("base-00000000000000000011.snap")],  # the name says another LSN
        [_item("delta-00000000000000000001-00000000000000000010.snap", "delta", 10, 1)],  # no base first
        [_item("base-00000000000000000010.snap"), _item("delta-00000000000000000009-00000000000000000012.snap", "delta", 12, 9)],  # does not link
        [_item("base-00000000000000000010.snap"), _item("base-00000000000000000012.snap", "base", 12, 0)],  # two bases
        [],
        [{**_item("base-00000000000000000010.snap"), "lsn": -1}],
        [{**_item("base-00000000000000000010.snap"), "extra": 1}],
        [{**_item("base-00000000000000000010.snap"), "rows": 5}],
    ],
)
def test_manifest_chains_that_cannot_be_are_refused(chain):
    with pytest.raises(CorruptionError):
        fmt.decode_manifest(_manifest_with(chain), "MANIFEST")


RECORDED = st.builds(fmt.Recorded, U64, st.one_of(st.none(), st.tuples(U64, U64)))


@given(U64, st.dictionaries(st.text(min_size=1, max_size=30), RECORDED, max_size=8))
def test_record_file_round_trip(epoch, snapshots):
    data = fmt.encode_record_file(epoch, snapshots)
    assert fmt.decode_record_file(data) == (epoch, snapshots)
    assert data[:8] == b"SSSREC\r\n"
    listed = json.loads(data[16:-4])["snapshots"]
    assert [(item["dir"], item["lsn"], item.get("wal")) for item in listed] == [
        (d, r.lsn, None if r.wal is None else list(r.wal)) for d, r in sorted(snapshots.items())
    ]
    with pytest.raises(CorruptionError):
        fmt.decode_manifest(data)  # a record is not a manifest: the magics differ


def test_a_delta_may_follow_a_base_at_lsn_zero():
    header = Header(DELTA, 0, 1, 0, 9)  # an empty store's base is at LSN 0
    assert fmt.decode_header(fmt.encode_header(header)) == header
    assert fmt.parse_file_name(fmt.file_name(DELTA, 1, 0)) == (DELTA, 1, 0)


def test_unknown_header_flags_are_refused():
    body = struct.pack(fmt.HEADER_FMT, fmt.SNAP_MAGIC, 1, BASE, 2, 0, 0, 10, 0, 1)
    with pytest.raises(CorruptionError) as caught:
        fmt.decode_header(body + struct.pack(">I", _crcmod_crc32c(body)))
    assert caught.value.offset == 11
