"""The ``syncstore`` command: the demo end to end, exit codes, help and argument errors."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

import syncstore
from syncstore import _demo, _demo_stream
from syncstore.cli import ProgressLine, main

SMALL = ["demo", "--users", "200", "--messages", "2000"]


def test_demo_small_run_verifies_and_reports(tmp_path, capsys):
    path = tmp_path / "store"
    assert main([*SMALL, "--path", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "verification   OK" in out
    assert "200 users, 2,000 messages, 8 sender threads" in out
    assert "delivered      2,000 messages" in out
    for words in ("duplicates suppressed", "msg/s durable", "p50", "p99", "pages of <= 50", "reopen (recovery)", "store.check()", "a live tail got", "a follower applied 2,000", "restored into a new store: 201 heads equal"):
        assert words in out
    assert "deliver 1/2" in err  # the progress line
    assert (path / "wal").is_dir() and (path / "state").is_dir()  # a given path is kept
    with syncstore.open(path) as store:
        assert store.check()["dedup_entries"] == 2000 + _demo_stream.SNAPSHOT_WRITES  # the audit inbox's snapshot-phase writes


def test_demo_result_numbers_add_up(tmp_path):
    config = _demo.DemoConfig(users=150, messages=1500, threads=4, seed=3, path=str(tmp_path / "s"))
    result = _demo.run_demo(config)
    assert result.ok, result.failures
    assert result.messages == result.one_to_one + result.group == 1500
    assert result.group > 0 and 3 <= result.max_fanout <= 50
    assert result.retries > 0 and result.duplicates == result.retries
    assert result.catchup_messages == result.inbox_entries == result.check["inbox_entries"] - _demo_stream.SNAPSHOT_WRITES
    assert result.clients_verified == 150
    stream = result.stream  # the change log: every delivery reaches the tail, the consumer and the follower
    assert stream.tail_changes == sum(len(queue[1]) for queue in _demo._make_plan(config).queues)
    assert stream.consumer_changes == stream.follower_changes == 1500 and stream.follower_users == 150
    assert stream.online_clients == 5 and stream.restored_users == 151  # every user and the audit inbox
    again = _demo.run_demo(_demo.DemoConfig(users=150, messages=1500, threads=4, seed=3))
    assert (again.inbox_entries, again.one_to_one, again.retries) == (result.inbox_entries, result.one_to_one, result.retries)


def test_demo_removes_its_temporary_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main([*SMALL[:2], "100", "--messages", "300", "--quiet"]) == 0
    assert os.listdir(tmp_path) == []


def test_verification_failure_exits_1(tmp_path, capsys, monkeypatch):
    real_sync = syncstore.Store.sync

    def lossy_sync(self, user, since=0, limit=100, epoch=None):  # loses user 7's second message
        page = real_sync(self, user, since, limit, epoch)
        if user == 7:
            return dataclasses.replace(page, messages=tuple(m for m in page.messages if m.cursor != 2))
        return page

    monkeypatch.setattr(syncstore.Store, "sync", lossy_sync)
    assert main([*SMALL, "--path", str(tmp_path / "s"), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "verification   FAILED" in out and "user 7" in out


def test_non_empty_path_is_an_error(tmp_path, capsys):
    (tmp_path / "something").write_text("x")
    assert main([*SMALL, "--path", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("syncstore: error:") and "not an empty directory" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--users", "1"], "argument --users: must be >= 2, got 1"),
        (["demo", "--messages", "lots"], "argument --messages: expected an integer, got 'lots'"),
        (["demo", "--threads", "0"], "argument --threads: must be 1..1024, got 0"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_no_command_prints_usage(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_help_lists_demo_with_examples(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "example" in out
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--path", "--users", "--messages", "--threads", "--seed", "syncstore demo --users 200"):
        assert option in out


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_redraws_one_line():
    stream = _Terminal()  # issue 7: the line is redrawn with \r only on a terminal
    line = ProgressLine(stream)
    line(_demo.Progress("deliver 1/2", 10, 100, "msgs", 1234.0))
    line(_demo.Progress("restart", 0, 1, "", 0.0))
    line.close()
    text = stream.getvalue()
    assert "\n" not in text and text.count("\r") == 4
    assert "deliver 1/2" in text and "10/100 msgs" in text and "1,234 msgs/s" in text


def test_module_entry_point_runs(tmp_path):
    """What the console script does: ``syncstore.cli:main`` as a process."""
    script = shutil.which("syncstore", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "syncstore.cli"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(syncstore.__file__)), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([*command, "demo", "--users", "50", "--messages", "200", "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "verification   OK" in done.stdout
