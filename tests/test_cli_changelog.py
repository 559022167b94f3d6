"""`syncstore changes` and `syncstore consumers`, run as a user would, against a store another process holds open."""

from __future__ import annotations

import json
import subprocess
import sys

import syncstore
from syncstore import Message


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "syncstore.cli", *args], capture_output=True, text=True, timeout=120)


def test_changes_and_consumers_read_a_store_another_process_holds_open(store_path):
    with syncstore.open(store_path) as store:  # this process is the writer; the CLI is another process
        for seq in range(5):
            store.deliver(Message(sender=1, conv=2, client_seq=seq, body=b"hi" if seq else b"\xff"), to=[1, 2])
        store.consumer("search-indexer", start=2)
        store._writer.apply_pending()  # a read-only view sees what is applied
        out = run("changes", store_path, "--since", "1")
        assert out.returncode == 0, out.stderr
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        assert [line["lsn"] for line in lines] == [2, 3, 4, 5]
        assert lines[0]["kind"] == "deliver" and lines[0]["cursors"] == {"1": 2, "2": 2} and lines[0]["body"] == "hi"
        first = json.loads(run("changes", store_path, "--limit", "1").stdout)
        assert first["body_encoding"] == "base64" and first["body"] == "/w=="
        follow = run("changes", store_path, "--since", "4", "--follow", "--timeout", "0.1")
        assert follow.returncode == 0 and [json.loads(x)["lsn"] for x in follow.stdout.splitlines()] == [5]
        listed = json.loads(run("consumers", store_path, "--json").stdout)
        assert listed == {"lsn": 5, "consumers": [{"name": "search-indexer", "position": 2, "lag": 3, "pinned_bytes": 0, "dropped": None}]}
        table = run("consumers", store_path).stdout
        assert "search-indexer" in table and "ok" in table


def test_bad_input_is_one_clear_line_and_exit_code(store_path):
    with syncstore.open(store_path) as store:
        store.deliver(Message(sender=1, conv=2, client_seq=1, body=b"x"), to=[1])
    beyond = run("changes", store_path, "--since", "7")
    assert beyond.returncode == 1 and "beyond the end of the change log" in beyond.stderr and "Traceback" not in beyond.stderr
    assert run("changes", store_path, "--limit", "0").returncode == 2
    assert run("changes", store_path, "--since", "-1").returncode == 2
    assert run("changes", store_path, "--timeout", "1").returncode == 2  # --timeout is for --follow
    missing = run("changes", store_path + "-nope")
    assert missing.returncode == 1 and "no store" in missing.stderr
