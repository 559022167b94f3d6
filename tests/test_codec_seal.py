"""Frames sealed at write time: ``encode_deliver_unsealed`` + ``seal_frames`` (the flusher's path)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncstore import _codec
from syncstore._codec import Deliver

U64 = st.integers(0, 2**64 - 1)
RECORDS = st.builds(
    Deliver,
    U64,
    U64,
    U64,
    U64,
    U64,
    st.integers(0, 255),
    st.binary(max_size=300),
    st.lists(st.tuples(U64, U64), max_size=5).map(tuple),
)


@given(st.lists(st.tuples(U64, RECORDS), min_size=1, max_size=8), U64)
def test_sealed_frames_decode_with_the_synced_lsn_stamped_at_sealing(frames, synced):
    data = bytearray().join(_codec.encode_deliver_unsealed(lsn, record) for lsn, record in frames)
    _codec.seal_frames(data, synced)
    offset = 0
    for lsn, record in frames:
        frame = _codec.decode_frame(data, offset)
        assert frame is not None and (frame.lsn, frame.rtype, frame.synced) == (lsn, _codec.RECORD_DELIVER, synced)
        assert _codec.decode_deliver(frame.body) == record
        offset = frame.end
    assert offset == len(data)
    # the one-call form writes the same bytes
    assert bytes(data).endswith(_codec.encode_deliver_frame(lsn, synced, record))


@given(U64, RECORDS)
def test_an_unsealed_frame_is_never_a_valid_frame(lsn, record):
    """Not sealing (an identity 'seal') leaves a frame that fails its CRC: it can never be replayed."""
    unsealed = _codec.encode_deliver_unsealed(lsn, record)
    assert _codec.decode_frame(unsealed, 0) is None
    sealed = bytearray(unsealed)
    _codec.seal_frames(sealed, 0)
    assert _codec.decode_frame(sealed, 0) is not None


def test_sealing_refuses_bytes_that_are_not_whole_frames():
    record = Deliver(1, 2, 3, 4, 5, 6, b"body", ((7, 1),))
    data = bytearray(_codec.encode_deliver_unsealed(9, record))
    with pytest.raises(ValueError):
        _codec.seal_frames(data + b"\x00\x00\x00", 0)
