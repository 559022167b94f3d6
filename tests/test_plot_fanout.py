"""tools/plot_fanout.py: an image from synthetic fan-out rows; clear failures without rows or without matplotlib."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "plot_fanout.py")
_spec = importlib.util.spec_from_file_location("plot_fanout_tool", _TOOL)
plot_fanout = importlib.util.module_from_spec(_spec)
sys.modules["plot_fanout_tool"] = plot_fanout  # dataclasses look their module up there
_spec.loader.exec_module(plot_fanout)


def fanout_row(fanout: int, bytes_per_msg: float, msg_per_s: float) -> dict:
    """One benchmark entry as pytest-benchmark writes it, with the row in extra_info (bench/_harness.py)."""
    metrics = {
        "fan-out": fanout,
        "messages": 50,
        "body B": 1024,
        "B/msg": bytes_per_msg,
        "LMDB B/msg": bytes_per_msg * 0.9,
        "B/rcpt": (bytes_per_msg - 1024) / fanout,
        "msg/s": msg_per_s,
        "entries/s": msg_per_s * fanout,
    }
    row = {"section": "fanout", "system": f"syncstore fan-out {fanout}", "metrics": metrics, "workload": "synthetic"}
    return {"name": f"test_group_fanout[{fanout}]", "stats": {"min": 0.1}, "extra_info": {"syncstore_row": row}}


def write_json(path, benchmarks: list[dict]) -> str:
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": benchmarks}))
    return os.fspath(path)


@pytest.fixture
def fanout_json(tmp_path) -> str:
    rows = [fanout_row(f, 1024 + 60.0 * f, 3000.0 / (1 + f / 100)) for f in (10, 100, 1000, 10000)]
    other = {"name": "test_deliver", "extra_info": {"syncstore_row": {"section": "deliver", "system": "syncstore", "metrics": {"msg/s": 1.0}}}}
    return write_json(tmp_path / "fanout.json", [*rows, other, {"name": "no_row", "extra_info": {}}])


def test_rows_are_read_sorted_by_fanout(fanout_json):
    points = plot_fanout.load_points(fanout_json)
    assert [p.fanout for p in points] == [10, 100, 1000, 10000]
    assert points[2].bytes_per_msg == 1024 + 60_000 and points[2].body == 1024


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_writes_a_non_empty_image(fanout_json, tmp_path, suffix, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / f"fanout.{suffix}"
    assert plot_fanout.main([fanout_json, fanout_json, "--label", "before", "-o", os.fspath(out)]) == 0
    data = out.read_bytes()
    assert len(data) > 1000
    assert data.startswith(b"\x89PNG") if suffix == "png" else b"<svg" in data[:2000]
    assert f"wrote {out}" in capsys.readouterr().out


def test_json_without_fanout_rows_fails_clearly(tmp_path, capsys):
    other = {"name": "test_deliver", "extra_info": {"syncstore_row": {"section": "deliver", "system": "syncstore", "metrics": {"msg/s": 1.0}}}}
    path = write_json(tmp_path / "deliver.json", [other])
    out = tmp_path / "never.png"
    assert plot_fanout.main([path, "-o", os.fspath(out)]) == 1
    err = capsys.readouterr().err
    assert "deliver.json: no fanout rows" in err and "test_bench_fanout.py" in err
    assert not out.exists()


def test_unreadable_json_fails_clearly(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    assert plot_fanout.main([os.fspath(path)]) == 1
    assert "broken.json: cannot read pytest-benchmark JSON" in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra(fanout_json, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "fanout.png"
    assert plot_fanout.main([fanout_json, "-o", os.fspath(out)]) == 2
    err = capsys.readouterr().err
    assert "matplotlib is needed" in err and "pip install -e '.[plot]'" in err
    assert not out.exists()
