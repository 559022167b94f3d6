"""tools/layout_study.py: every candidate layout stores and returns the same messages, and the results are sane.

The study runs in-process at a tiny size; through its ``inspect`` hook the
very stores it measured answer sync, history and get queries, which must equal
both the ``copy`` layout's answers and a model built from the workload itself.
No timing is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import sys
from collections import defaultdict

import pytest

_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "layout_study.py")
_spec = importlib.util.spec_from_file_location("layout_study_tool", _TOOL)
study = importlib.util.module_from_spec(_spec)
sys.modules["layout_study_tool"] = study  # dataclasses look their module up there
_spec.loader.exec_module(study)

LAYOUTS = ("dedup-only", "copy", "ref-dupfixed", "ref-dupfixed-16", "ref-plain", "hybrid-2", "hybrid-5")
READERS = LAYOUTS[1:]  # the layouts with an inbox
REFS = LAYOUTS[2:]  # ... and a messages db and a history index
FANOUTS = (1, 2, 5, 30)


def tiny_config(tmp_path) -> "study.Config":
    """Small enough for seconds; batches of 40 messages so appends cross transactions."""
    return study.Config(
        fanouts=FANOUTS,
        layouts=LAYOUTS,
        entries=1_200,
        population=60,
        batch=40,
        sync_calls=20,
        history_calls=20,
        rounds=1,
        directory=str(tmp_path),
    )


def model(wl: "study.Workload") -> tuple[dict[int, list[tuple]], dict[int, tuple]]:
    """Per user, its rows in cursor order; per msg_id, its row with cursor 0 -- from the workload alone."""
    inbox: dict[int, list[tuple]] = defaultdict(list)
    by_id = {}
    for m in wl.messages:
        by_id[m.msg_id] = (0, m.msg_id, m.sender, m.conv, m.client_seq, m.ts_ms, m.priority, m.body)
        for user, cursor in m.pairs:
            inbox[user].append((cursor, m.msg_id, m.sender, m.conv, m.client_seq, m.ts_ms, m.priority, m.body))
    for user, rows in inbox.items():
        assert [r[0] for r in rows] == list(range(1, len(rows) + 1)), "the workload's cursors must be dense"
    return inbox, by_id


def sync_cases(wl: "study.Workload") -> list[tuple[int, int, int]]:
    """(user, since, limit): starts, middles, the head, past the head, a user with nothing, several limits."""
    rng = random.Random(1)
    users = sorted(wl.heads)
    cases = [(max(users) + 1, 0, 10)]
    for user in rng.sample(users, min(12, len(users))):
        head = wl.heads[user]
        for since in {0, head // 2, max(0, head - 1), head, head + 3}:
            for limit in (1, 7, 100):
                cases.append((user, since, limit))
    return cases


def history_cases(wl: "study.Workload") -> list[tuple[int, int, int, int]]:
    """(user, conv, before, limit) around the ends and the middle of some users' conversations."""
    rng = random.Random(2)
    keys = sorted(wl.conv_cursors)
    cases = [(max(wl.heads) + 1, 1, 5, 10)]
    for user, conv in rng.sample(keys, min(12, len(keys))):
        cursors = wl.conv_cursors[(user, conv)]
        for before in {1, cursors[0], cursors[0] + 1, cursors[len(cursors) // 2], cursors[-1], cursors[-1] + 1, wl.heads[user] + 50}:
            for limit in (1, 3, 50):
                cases.append((user, conv, before, limit))
    cases.append((keys[0][0], 999_999_999, 10, 10))  # a conversation the user is not in
    return cases


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    """Run the study once; collect every layout's answers from the stores it measured."""
    tmp_path = tmp_path_factory.mktemp("study")
    cfg = tiny_config(tmp_path)
    answers: dict[tuple[str, str], dict[str, list]] = {}
    workloads: dict[str, "study.Workload"] = {}

    def inspect(layout, wl) -> None:
        workloads[wl.name] = wl
        got: dict[str, list] = {"sync": [], "raw": [], "history": [], "get": []}
        if not layout.has_sync:
            answers[(wl.name, layout.name)] = got
            return
        with layout.env.begin() as txn:
            for user, since, limit in sync_cases(wl):
                got["sync"].append(layout.sync_decoded(txn, user, since, limit))
                head, raw = layout.sync_raw(txn, user, since, limit)
                got["raw"].append((head, raw))
            if layout.has_history:
                got["history"] = [layout.history(txn, *case) for case in history_cases(wl)]
            if layout.name != "copy":
                ids = [m.msg_id for m in wl.messages[:: max(1, len(wl.messages) // 25)]] + [wl.messages[-1].msg_id + 1]
                got["get"] = [(msg_id, layout.get(txn, msg_id)) for msg_id in ids]
        answers[(wl.name, layout.name)] = got

    workload_counts, results = study.run(cfg, inspect=inspect)
    return cfg, workload_counts, results, answers, workloads


def test_every_layout_pair_is_measured(outcome):
    cfg, workload_counts, results, answers, workloads = outcome
    assert [(r.fanout, r.layout) for r in results] == [(f, name) for f in FANOUTS for name in LAYOUTS]
    assert set(answers) == {(w, name) for w in workloads for name in LAYOUTS}
    assert [w["fanout"] for w in workload_counts] == list(FANOUTS)


def test_sync_pages_equal_the_copy_layout_and_the_model(outcome):
    _, _, _, answers, workloads = outcome
    for wname, wl in workloads.items():
        inbox, _ = model(wl)
        expected = []
        for user, since, limit in sync_cases(wl):
            rows = inbox.get(user, [])
            expected.append((len(rows), rows[since : since + limit]))
        assert any(rows for _, rows in expected), "the cases must return messages"
        assert answers[(wname, "copy")]["sync"] == expected, wname
        for name in READERS:
            assert answers[(wname, name)]["sync"] == answers[(wname, "copy")]["sync"], (wname, name)


def test_raw_sync_reads_the_same_entries_and_bodies(outcome):
    _, _, _, answers, workloads = outcome
    for wname, wl in workloads.items():
        for name in READERS:
            for (head, raw), (dhead, rows) in zip(answers[(wname, name)]["raw"], answers[(wname, name)]["sync"]):
                assert head == dhead
                if name == "copy":
                    bodies = [value[study.COPY_VALUE.size :] for value in raw]
                else:
                    entries, found = raw
                    assert len(entries) == len(rows)
                    bodies = [v[study.MESSAGE_HEAD.size :] for _, v in found]
                    if name.startswith("hybrid"):  # inline bodies are in the entries
                        inline = [e[study.INLINE_HEAD.size :] for e in entries if len(e) != study.REF_ENTRY.size]
                        assert len(inline) + len(found) == len(rows)
                        bodies = sorted(bodies + inline)
                        rows = sorted(rows, key=lambda r: r[7])
                assert bodies == [r[7] for r in rows], (wname, name)


def test_history_is_newest_first_below_before_and_equal_across_layouts(outcome):
    _, _, _, answers, workloads = outcome
    for wname, wl in workloads.items():
        inbox, _ = model(wl)
        expected = []
        for user, conv, before, limit in history_cases(wl):
            rows = [r for r in inbox.get(user, []) if r[3] == conv and r[0] < before]
            expected.append(rows[::-1][:limit])
        assert any(expected)
        for name in LAYOUTS:
            if name in REFS:
                assert answers[(wname, name)]["history"] == expected, (wname, name)
            else:
                assert answers[(wname, name)]["history"] == []  # no history index


def test_get_returns_the_message_or_none(outcome):
    _, _, _, answers, workloads = outcome
    for wname, wl in workloads.items():
        _, by_id = model(wl)
        for name in REFS:
            got = answers[(wname, name)]["get"]
            assert got[-1][1] is None
            assert [row for _, row in got[:-1]] == [by_id[msg_id] for msg_id, _ in got[:-1]], (wname, name)


def test_results_are_sane(outcome):
    _, workload_counts, results, _, _ = outcome
    for w in workload_counts:
        assert w["entries"] == w["messages"] * w["fanout"] <= 1_200
    by = {(r.fanout, r.layout): r for r in results}
    for r in results:
        assert r.wchar >= r.size / 2, r  # what is stored was written
        assert r.db_bytes["total"] == r.size and r.db_bytes["other"] >= 0
        assert r.db_bytes["dedup entries"] == r.db_bytes["dedup_expiry entries"] == r.messages
        assert r.apply_msg_s > 0 and math.isfinite(r.apply_msg_s)
        if r.layout == "dedup-only":  # the shared part: smaller than any layout, no reads
            assert r.sync_calls_s is r.sync_decoded_calls_s is r.history_calls_s is None
            assert all(r.size < by[(r.fanout, name)].size for name in READERS)
            continue
        assert r.size >= r.body_bytes + 16 * r.entries, r  # every body and at least a key per entry
        assert r.wchar >= r.body_bytes, r
        assert r.db_bytes["inbox entries"] == r.entries
        if r.layout in REFS:
            assert r.db_bytes["messages entries"] == r.messages
            assert r.db_bytes["history entries"] == r.entries
        for rate in (r.sync_calls_s, r.sync_decoded_calls_s):
            assert rate > 0 and math.isfinite(rate)
        assert (r.history_calls_s is None) == (r.layout == "copy")
    for name in ("ref-dupfixed", "ref-plain"):  # a body once instead of 30 times
        assert by[(30, name)].size < by[(30, "copy")].size / 4
    assert by[(2, "hybrid-2")].db_bytes["messages"] < by[(2, "ref-plain")].db_bytes["messages"]  # locators, not bodies
    assert by[(30, "hybrid-5")].size == by[(30, "ref-plain")].size  # above the threshold it is ref-plain


def test_tables_have_a_row_per_result(outcome):
    _, workload_counts, results, _, _ = outcome
    assert len(study.markdown_table(results).splitlines()) == 2 + len(results)
    assert len(study.db_table(results).splitlines()) == 2 + len(results)
    assert len(study.workload_table(workload_counts).splitlines()) == 2 + len(workload_counts)


def test_a_skipped_append_is_an_error_not_silence(tmp_path):
    """py-lmdb's putmulti skips an item that fails the append check; the study must notice."""
    wl = study.make_workload(2, 40, 10, seed=3)
    env = study.open_env(str(tmp_path))
    try:
        layout = study.make_layout("ref-dupfixed", env)
        layout.apply(wl.messages[10:])
        with pytest.raises(RuntimeError, match="putmulti wrote"):
            layout.apply(wl.messages[:10])  # older cursors: APPENDDUP refuses them
    finally:
        env.close()


def test_main_writes_json_and_markdown(tmp_path, capsys):
    path = tmp_path / "study.json"
    assert study.main(["--scale", "0.004", "--fanouts", "2,10", "--rounds", "1", "--dir", str(tmp_path), "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| fan-out 2 (1:1) | ref-dupfixed |" in out and "| fan-out 10 | hybrid-2 |" in out
    data = json.loads(path.read_text())
    assert len(data["results"]) == 2 * 5
    assert {r["layout"] for r in data["results"]} == {"dedup-only", "copy", "ref-dupfixed", "ref-plain", "hybrid-2"}
    assert all(r["size_per_entry"] > 0 for r in data["results"])
    assert os.listdir(tmp_path) == ["study.json"]  # the stores are removed
