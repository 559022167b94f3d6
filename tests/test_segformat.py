"""Byte format of archive segments (syncstore._segformat): round trips, properties, determinism, bad input (pure)."""

from __future__ import annotations

import struct

import crcmod.predefined
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncstore import CorruptionError, InvalidArgument
from syncstore import _segformat as fmt
from syncstore._segformat import HISTORY, INBOX, MESSAGES, MSG_IDS, Entry, Options
from syncstore.model import MessageRecord

U64 = st.integers(min_value=0, max_value=2**64 - 1)
_crcmod_crc32c = crcmod.predefined.mkPredefinedCrcFun("crc-32c")
TEXT = b"The quick brown fox jumps over the lazy dog while the archive segment is written. "


@st.composite
def archives(draw, max_messages=40):
    """(messages, entries): a few users and conversations, each message delivered to 1..4 of the users."""
    users = draw(st.lists(U64, min_size=1, max_size=6, unique=True))
    convs = draw(st.lists(U64, min_size=1, max_size=4, unique=True))
    ids = draw(st.lists(U64, min_size=1, max_size=max_messages, unique=True))
    heads = {user: draw(st.integers(0, 2**64 - 200)) for user in users}
    messages, entries = [], []
    for msg_id in ids:
        body = draw(st.one_of(st.binary(max_size=60), st.sampled_from([b"", TEXT, TEXT * 3])))
        message = MessageRecord(msg_id, draw(U64), draw(st.sampled_from(convs)), draw(U64), draw(U64), draw(st.integers(0, 255)), body)
        messages.append(message)
        for user in draw(st.lists(st.sampled_from(users), min_size=1, max_size=4, unique=True)):
            heads[user] += draw(st.integers(1, 3))
            entries.append(Entry(user, heads[user], msg_id))
    return messages, entries


def encode(messages, entries, options=Options(block_bytes=512, level=3)) -> bytes:
    return b"".join(fmt.encode_segment(2026, 3, messages, entries, options))


def frame(data: bytes):
    header = fmt.decode_header(data)
    dictionary = fmt.check_dictionary(data[fmt.HEADER_SIZE : fmt.HEADER_SIZE + header.dictionary_size], header)
    footer = fmt.decode_footer(data[-fmt.FOOTER_SIZE :], len(data), header)
    index = fmt.decode_index(data[footer.index_offset : -fmt.FOOTER_SIZE], footer, header)
    return header, dictionary, footer, index


def decode_all(data: bytes):
    """Every section's rows, decoded through the public decoders (what a reader sees)."""
    header, dictionary, footer, index = frame(data)
    decompressor = fmt.decompressor_for(dictionary)
    rows = {section: [] for section in fmt.SECTIONS}
    for section, refs in index.sections.items():
        for number, ref in enumerate(refs):
            fmt.check_block(data[ref.offset : ref.offset + ref.compressed], ref)
            raw = fmt.decompress_block(data[ref.offset : ref.offset + ref.compressed], ref, decompressor)
            following = fmt.next_key(index, section, number)
            if section == MESSAGES:
                block = fmt.decode_messages(raw, ref, following)
                rows[section] += list(zip(block.records, block.refs))
            else:
                rows[section] += list(zip(*fmt.decode_rows(raw, ref, following, footer.messages)))
    return header, footer, index, rows


@settings(max_examples=60, deadline=None)
@given(archives(), st.sampled_from([512, 2048, 1 << 16]), st.sampled_from([1, 3]))
def test_round_trip(archive, block_bytes, level):
    messages, entries = archive
    data = encode(messages, entries, Options(block_bytes=block_bytes, level=level))
    header, footer, index, rows = decode_all(data)
    ordered = sorted(messages, key=lambda m: (m.conv, m.msg_id))
    refs = {m.msg_id: sum(1 for e in entries if e.msg_id == m.msg_id) for m in messages}
    assert rows[MESSAGES] == [(m, refs[m.msg_id]) for m in ordered]
    ordinal = {m.msg_id: i for i, m in enumerate(ordered)}
    assert rows[INBOX] == sorted((e.user, e.cursor, ordinal[e.msg_id]) for e in entries)
    conv = {m.msg_id: m.conv for m in messages}
    assert rows[HISTORY] == sorted((e.user, conv[e.msg_id], e.cursor, ordinal[e.msg_id]) for e in entries)
    assert rows[MSG_IDS] == sorted((m.msg_id, ordinal[m.msg_id]) for m in messages)
    assert (header.year, header.month, header.level) == (2026, 3, level)
    assert (header.first_user, header.last_user) == (min(e.user for e in entries), max(e.user for e in entries))
    assert (header.min_msg_id, header.max_msg_id) == (min(ordinal), max(ordinal))
    assert (footer.messages, footer.entries) == (len(messages), len(entries))


@settings(max_examples=40, deadline=None)
@given(archives())
def test_index_ordered_and_tiling(archive):
    """Properties an identity function would fail: blocks tile the file, keys strictly increase, ordinals count rows."""
    data = encode(*archive)
    header, _dictionary, footer, index = frame(data)
    offset = fmt.HEADER_SIZE + header.dictionary_size
    for ref in index.blocks:
        assert ref.offset == offset
        offset += ref.compressed
    assert offset == footer.index_offset
    assert [ref.section for ref in index.blocks] == sorted(ref.section for ref in index.blocks)
    for keys in index.keys.values():
        assert keys == sorted(set(keys))


@settings(max_examples=40, deadline=None)
@given(archives())
def test_filter_never_says_no_to_a_user_it_holds(archive):
    messages, entries = archive
    _header, _dictionary, _footer, index = frame(encode(messages, entries))
    for entry in entries:
        assert fmt.filter_may_hold(index.user_filter, index.filter_hashes, entry.user)


def test_filter_rejects_most_absent_users():
    messages = [MessageRecord(i, 1, 2, i, 0, 0, b"x") for i in range(1_000)]
    entries = [Entry(user * 7919, 1, user) for user in range(1_000)]
    _header, _dictionary, _footer, index = frame(encode(messages, entries))
    absent = [user * 7919 + 1 for user in range(20_000)]
    false_yes = sum(fmt.filter_may_hold(index.user_filter, index.filter_hashes, user) for user in absent)
    assert false_yes < 0.03 * len(absent)  # ~0.8 % expected at 10 bits and 7 hashes
    assert len(index.user_filter) == 1_000 * fmt.FILTER_BITS_PER_USER // 8


def test_compressible_input_gets_smaller():
    messages = [MessageRecord(1 << 40 | i, 5, 9, i, 1_600_000_000_000 + i, 0, TEXT + str(i).encode()) for i in range(2_000)]
    entries = [Entry(5, i + 1, m.msg_id) for i, m in enumerate(messages)]
    data = encode(messages, entries, Options())
    raw = sum(41 + len(m.body) for m in messages) + 16 * len(entries)
    assert len(data) * 5 < raw


@settings(max_examples=30, deadline=None)
@given(archives())
def test_deterministic(archive):
    """The same messages and entries, in any input order, give the same bytes (compaction re-runs are byte-identical)."""
    messages, entries = archive
    assert encode(messages, entries) == encode(list(reversed(messages)), list(reversed(entries)))


def test_dictionary_round_trip_and_determinism():
    samples = [(TEXT * (1 + i % 3))[i % 50 :] + str(i * 7).encode() for i in range(400)]
    dictionary = fmt.train_dictionary(samples, 4096)
    assert dictionary is not None and dictionary == fmt.train_dictionary(samples, 4096)
    messages = [MessageRecord(i, 1, i % 7, i, 0, 0, samples[i]) for i in range(400)]
    entries = [Entry(3, i + 1, i) for i in range(400)]
    options = Options(block_bytes=1024, level=3, dictionary=dictionary)
    data = encode(messages, entries, options)
    header, _footer, _index, rows = decode_all(data)
    assert header.dictionary_size == len(dictionary)
    assert sorted(m for m, _refs in rows[MESSAGES]) == sorted(messages)
    assert data == encode(messages, entries, options)
    assert fmt.train_dictionary(samples[:10], 4096) is None  # too few samples: no dictionary


def test_crc_is_crc32c():
    data = encode([MessageRecord(1, 2, 3, 4, 5, 6, b"hi")], [Entry(7, 1, 1)])
    assert struct.unpack_from(">I", data, fmt.HEADER_BODY_SIZE)[0] == _crcmod_crc32c(data[: fmt.HEADER_BODY_SIZE])
    footer = data[-fmt.FOOTER_SIZE :]
    assert struct.unpack_from(">I", footer, fmt.FOOTER_BODY_SIZE)[0] == _crcmod_crc32c(footer[: fmt.FOOTER_BODY_SIZE])


def test_layout_constants():
    assert (fmt.HEADER_SIZE, fmt.ENTRY_SIZE, fmt.FOOTER_SIZE) == (60, 52, 60)
    data = encode([MessageRecord(1, 2, 3, 4, 5, 6, b"hi")], [Entry(7, 1, 1)])
    assert data[:8] == b"SSARCH\r\n" and data[-12:-4] == b"SSARCEND"


@pytest.mark.parametrize(
    "messages, entries, what",
    [
        ([], [], "at least one"),
        ([MessageRecord(1, 2, 3, 4, 5, 6, b"")], [], "at least one"),
        ([MessageRecord(1, 2, 3, 4, 5, 6, b"")], [Entry(1, 1, 2)], "not archived"),
        ([MessageRecord(1, 2, 3, 4, 5, 6, b""), MessageRecord(2, 2, 3, 4, 5, 6, b"")], [Entry(1, 1, 1)], "no inbox entry"),
        ([MessageRecord(1, 2, 3, 4, 5, 6, b""), MessageRecord(1, 2, 3, 4, 5, 6, b"")], [Entry(1, 1, 1)], "same msg_id"),
        ([MessageRecord(1, 2, 3, 4, 5, 6, b"")], [Entry(1, 1, 1), Entry(1, 1, 1)], "two entries"),
        ([MessageRecord(1, 2, 3, 4, 5, 256, b"")], [Entry(1, 1, 1)], "priority"),
        ([MessageRecord(1, -2, 3, 4, 5, 6, b"")], [Entry(1, 1, 1)], "64-bit"),
        ([MessageRecord(1, 2, 3, 4, 5, 6, "text")], [Entry(1, 1, 1)], "bytes"),
        ([MessageRecord(1, 2, 3, 4, 5, 6, b"")], [Entry(2**64, 1, 1)], "64-bit"),
        ([MessageRecord(1, 2, 3, 4, 5, 6, b"")], [Entry(None, 1, 1)], "64-bit"),
    ],
)
def test_bad_input_refused_before_any_byte(messages, entries, what):
    chunks = fmt.encode_segment(2026, 3, messages, entries)
    with pytest.raises(InvalidArgument, match=what):
        next(chunks)


@pytest.mark.parametrize("kwargs", [{"block_bytes": 10}, {"level": 0}, {"level": 23}, {"dictionary": b"x"}])
def test_bad_options(kwargs):
    with pytest.raises(InvalidArgument):
        Options(**kwargs)


def test_bad_month():
    with pytest.raises(InvalidArgument, match="month"):
        next(fmt.encode_segment(2026, 13, [MessageRecord(1, 2, 3, 4, 5, 6, b"")], [Entry(1, 1, 1)]))


def test_file_names():
    name = fmt.file_name(2026, 3, 42)
    assert name == "seg-2026-03-00000000000000000042.arc"
    assert fmt.parse_file_name(name) == (2026, 3, 42)
    for bad in ("../seg-2026-03-00000000000000000042.arc", "/etc/passwd", "seg-2026-13-00000000000000000042.arc",
                "seg-2026-03-42.arc", "seg-2026-03-00000000000000000042.arc/..", "", None):
        assert fmt.parse_file_name(bad) is None


def test_every_header_and_footer_byte_is_checked():
    """Pure decoders: each single flipped byte of header, index or footer raises CorruptionError (offsets inside the file)."""
    data = encode([MessageRecord(i, 2, 3, 4, 5, 6, TEXT) for i in range(30)], [Entry(7, i + 1, i) for i in range(30)])
    _header, _dictionary, footer, _index = frame(data)
    regions = list(range(fmt.HEADER_SIZE)) + list(range(footer.index_offset, len(data)))
    for at in regions:
        damaged = bytearray(data)
        damaged[at] ^= 0x40
        with pytest.raises(CorruptionError) as caught:
            frame(bytes(damaged))
        assert 0 <= caught.value.offset <= len(data)
