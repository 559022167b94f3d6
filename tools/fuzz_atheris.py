#!/usr/bin/env python3
"""libFuzzer harness (atheris) over syncstore's decoders and WAL recovery.

    pip install atheris
    python tools/fuzz_atheris.py -runs=100000 [CORPUS_DIR ...] [libFuzzer flags]

The first input byte picks the target (the rest is its input); targets whose
format is CRC-protected also come in a variant that recomputes the CRC first,
so that the fuzzer reaches the checks behind it:

    0  _codec.decode_frame at every offset   -> None or a Frame that re-encodes to its bytes
    1  the same, CRC of the first frame fixed
    2  _codec.decode_deliver                 -> a record that re-encodes to its input, or CorruptionError
    3  _codec.decode_dedup                   -> the same
    4  _codec.decode_segment_header          -> a first LSN, or CorruptionError
    5  syncstore.crdt.decode                 -> a value that re-encodes to its input, or
    6  the same, frame length and CRC fixed     CorruptionError/InvalidArgument
    7  WAL recovery: the input is the only segment of an empty store   -> open raises a
    8  WAL recovery: valid header + the input                             SyncStoreError, or
    9  WAL recovery: valid frames + the input as the tail                 check() passes and
   10  WAL recovery: valid frames with the input spliced in               a write succeeds

Anything else a target raises, or a failed assertion, is a crash that libFuzzer
reports with the input that caused it (replay: ``python tools/fuzz_atheris.py
crash-<sha>``).  Without a corpus directory the harness seeds a temporary one
with valid encodings of every kind.  Unless given, ``-timeout=60`` (a hang is
a finding) and ``-malloc_limit_mb=512`` (so is allocating by a length word)
are added.  Invariants are those of tests/test_fuzz.py, which runs the same
targets under hypothesis in CI.  Scratch files go to ``$TMPDIR/syncstore-atheris-<pid>``
(removed by the next run, since libFuzzer exits without returning).
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    try:
        import syncstore
    except ImportError:  # run from a source checkout without PYTHONPATH
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import syncstore
    from syncstore import (
        CorruptionError,
        InvalidArgument,
        Message,
        SyncStoreError,
        _codec,
        crdt,
    )
    from syncstore._codec import SEGMENT_HEADER_SIZE, Deliver
    from syncstore.crdt import (
        CRDTMap,
        GCounter,
        LWWRegister,
        MaxRegister,
        ORSet,
        PNCounter,
        Stamp,
    )
    from syncstore.wal import segment_name

logging.disable(logging.CRITICAL)  # recovery logs every torn tail it truncates

SEGMENT = 4096
_WORK_PREFIX = "syncstore-atheris-"


def _work_dir() -> str:
    """This process's scratch directory, after removing those of earlier runs that are gone.

    libFuzzer ends the process with exit() once done, so no ``finally`` or atexit
    handler of ours runs: each run's directory is named by its pid and cleaned up
    by a later run.
    """
    base = tempfile.gettempdir()
    for name in os.listdir(base):
        pid = name[len(_WORK_PREFIX) :]
        if name.startswith(_WORK_PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    path = os.path.join(base, f"{_WORK_PREFIX}{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


WORK = _work_dir()
TEMPLATE = os.path.join(WORK, "template")
STORE = os.path.join(WORK, "store")


def _template() -> bytes:
    """An empty store to copy per recovery input; return the valid frames of a small log."""
    syncstore.open(TEMPLATE, segment_bytes=SEGMENT).close()
    for name in os.listdir(os.path.join(TEMPLATE, "wal")):
        os.unlink(os.path.join(TEMPLATE, "wal", name))
    frames = [_codec.encode_segment_header(1)]
    heads: dict[int, int] = {}
    for lsn in range(1, 7):
        to = (1, 1 + lsn % 3)
        pairs = []
        for uid in dict.fromkeys(to):
            heads[uid] = heads.get(uid, 0) + 1
            pairs.append((uid, heads[uid]))
        record = Deliver((lsn + 400_000_000_000) << 22, 9, 1, lsn, 1_700_000_000_000, 0, b"body %d" % lsn, tuple(pairs))
        frames.append(_codec.encode_deliver_frame(lsn, lsn - 1, record))
    return b"".join(frames)


FRAMES = _template()


def _crdt_samples() -> list[bytes]:
    doc = (
        CRDTMap()
        .update(1, "badge", GCounter, lambda c: c.increment(1, 2))
        .update(2, "tags", ORSet, lambda s: s.add(2, "x").add(3, b"y"))
        .update(3, "draft", LWWRegister, lambda r: r.assign("hi", Stamp(9, 0, 3)))
    )
    values = [
        GCounter().increment(1, 3).increment(7, 1),
        PNCounter().increment(5, 2).decrement(6, 9),
        LWWRegister().assign("hello", Stamp(1_700_000_000_000, 3, 9)),
        MaxRegister().assign(-5),
        ORSet().add(1, "a").add(2, 7).remove("a"),
        doc,
    ]
    return [x.encode() for x in values]


def seeds() -> list[bytes]:
    record = Deliver(1 << 40, 2, 3, 4, 5, 6, b"hello", ((1, 1), (2, 7)))
    frame = _codec.encode_deliver_frame(5, 4, record)
    out = [bytes([0]) + frame, bytes([1]) + frame, bytes([2]) + _codec.encode_deliver(record), bytes([3]) + _codec.encode_dedup(9, _codec.dedup_fingerprint(1, b"x"), ((1, 2), (3, 4)))]
    out.append(bytes([4]) + _codec.encode_segment_header(1))
    out += [bytes([k]) + encoded for encoded in _crdt_samples() for k in (5, 6)]
    out += [bytes([7]) + FRAMES, bytes([8]) + FRAMES[SEGMENT_HEADER_SIZE:], bytes([9]) + b"\x00\x00\x01\x00garbage", bytes([10]) + b"\x07" + frame]
    return out


# --- targets ----------------------------------------------------------------------------


def fix_frame_crc(data: bytes) -> bytes:
    if len(data) < 8:
        return data
    (length,) = struct.unpack_from(">I", data)
    payload = data[8 : 8 + length]
    crc = _codec.crc32c_of(payload, _codec.crc32c_of(data[:4]))
    return data[:4] + struct.pack(">I", crc) + data[8:]


def target_frame(data: bytes) -> None:
    for offset in range(min(len(data), 64) + 1):
        frame = _codec.decode_frame(data, offset)
        if frame is not None:
            assert _codec.encode_frame(frame.lsn, frame.rtype, frame.body, frame.synced) == data[offset : frame.end]


def target_deliver(data: bytes) -> None:
    try:
        record = _codec.decode_deliver(data)
    except CorruptionError:
        return
    assert _codec.encode_deliver(record) == data


def target_dedup(data: bytes) -> None:
    try:
        msg_id, fingerprint, pairs = _codec.decode_dedup(data)
    except CorruptionError:
        return
    assert _codec.encode_dedup(msg_id, fingerprint, pairs) == data


def target_header(data: bytes) -> None:
    try:
        first = _codec.decode_segment_header(data)
    except CorruptionError:
        return
    assert struct.unpack_from(">Q", data, 12)[0] == first


def target_crdt(data: bytes, fix: bool) -> None:
    if fix:
        body = data[8:]
        head = b"CR" + struct.pack(">BBI", 1, data[3] if len(data) > 3 else 1, len(body)) + body
        data = head + struct.pack(">I", _codec.crc32c_of(head))
    try:
        value = crdt.decode(data)
    except (CorruptionError, InvalidArgument):
        return
    assert value.encode() == data


def target_recovery(kind: int, data: bytes) -> None:
    if kind == 7:
        content = data
    elif kind == 8:
        content = _codec.encode_segment_header(1) + data
    elif kind == 9:
        content = FRAMES + data
    else:
        cut = SEGMENT_HEADER_SIZE + (data[0] * 7 % (len(FRAMES) - SEGMENT_HEADER_SIZE) if data else 0)
        content = FRAMES[:cut] + data[1:] + FRAMES[cut:]
    shutil.rmtree(STORE, ignore_errors=True)
    shutil.copytree(TEMPLATE, STORE)
    with open(os.path.join(STORE, "wal", segment_name(1)), "wb") as f:
        f.write(content)
    try:
        store = syncstore.open(STORE, segment_bytes=SEGMENT)
    except SyncStoreError:
        return
    try:
        store.check()
        store.deliver(Message(77, 1, 1, b"after recovery"), to=[1, 77])
        store.check()
    finally:
        store.close()


def test_one_input(raw: bytes) -> None:
    if not raw:
        return
    kind, data = raw[0] % 11, raw[1:]
    if kind == 0:
        target_frame(data)
    elif kind == 1:
        target_frame(fix_frame_crc(data))
    elif kind == 2:
        target_deliver(data)
    elif kind == 3:
        target_dedup(data)
    elif kind == 4:
        target_header(data)
    elif kind in (5, 6):
        target_crdt(data, fix=kind == 6)
    else:
        target_recovery(kind, data)


def main() -> None:
    argv = list(sys.argv)
    flags = [a for a in argv[1:] if a.startswith("-")]
    if not any(f.startswith("-timeout=") for f in flags):
        argv.append("-timeout=60")
    if not any(f.startswith("-malloc_limit_mb=") for f in flags):
        argv.append("-malloc_limit_mb=512")
    corpus = [a for a in argv[1:] if not a.startswith("-")]
    if not corpus:
        seed_dir = os.path.join(WORK, "corpus")
        os.makedirs(seed_dir)
        for index, seed in enumerate(seeds()):
            with open(os.path.join(seed_dir, f"seed-{index:03d}"), "wb") as f:
                f.write(seed)
        argv.append(seed_dir)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()  # never returns: libFuzzer exits the process


if __name__ == "__main__":
    main()
