"""tools/replay_phases.py: it replays the whole log and reports every phase (a small run)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import replay_phases  # noqa: E402


def test_a_small_run_reports_every_phase(tmp_path, capsys):
    assert replay_phases.main(["--records", "3000", "--opens", "1", "--segment-bytes", str(1 << 20), "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for phase in ("recovery", "CRC and LSN scan", "replay check", "WAL made durable", "decode", "encode", "LMDB transaction", "open, in all"):
        assert phase in out, out
    assert "3,000 records, 1 opens" in out
    table = {line[:42].strip(): line[42:].split() for line in out.splitlines()[1:-1]}
    wall_in_all = float(table["open, in all"][0])
    assert 0 < float(table["replay"][0]) <= wall_in_all


def test_the_wrappers_are_removed_afterwards(tmp_path):
    from syncstore import _codec, _open, state, wal

    before = (wal.WriteAheadLog.__dict__["recover"], _codec.scan_frames, _open._replay, state._encode_batch, state.State.apply)
    replay_phases.main(["--records", "200", "--opens", "1", "--segment-bytes", str(1 << 20), "--dir", str(tmp_path)])
    assert (wal.WriteAheadLog.__dict__["recover"], _codec.scan_frames, _open._replay, state._encode_batch, state.State.apply) == before
