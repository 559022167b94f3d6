"""Issue 7, section 11: every CLI error is one line ``syncstore: error: ...`` with exit code 1,
and the progress line uses ``\\r`` only on a terminal."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from syncstore import _demo
from syncstore.cli import ProgressLine, main

from _users import env, nobody, run_as, shared_tmp  # noqa: F401 - shared_tmp is a fixture


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "syncstore.cli", *args], capture_output=True, text=True, timeout=120, env=env())


def assert_one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("syncstore: error: ") and "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_empty_path(tmp_path):
    done = cli("demo", "--path", "", "--users", "10", "--messages", "10", "-q")
    assert_one_line_error(done, "empty")


def test_path_under_a_file(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    done = cli("demo", "--path", str(tmp_path / "file" / "store"), "--users", "10", "--messages", "10", "-q")
    assert_one_line_error(done, str(tmp_path / "file"))


def test_path_that_is_not_empty(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    done = cli("demo", "--path", str(tmp_path), "--users", "10", "--messages", "10", "-q")
    assert_one_line_error(done, str(tmp_path))
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_path_the_user_may_not_write(shared_tmp):
    user = nobody()
    target = os.path.join(shared_tmp, "root-only", "store")
    os.makedirs(os.path.dirname(target), mode=0o755)
    results = run_as(
        user.pw_uid,
        user.pw_gid,
        """
        import contextlib, io
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = syncstore.cli.main(["demo", "--path", sys.argv[1], "--users", "10", "--messages", "10", "-q"])
        emit(code=code, stderr=err.getvalue())
        """,
        target,
    )
    (result,) = results
    assert result["code"] == 1
    lines = result["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("syncstore: error: ") and "Traceback" not in result["stderr"]
    assert "permission denied" in lines[0].lower()


def test_main_returns_1_and_prints_one_line_in_process(tmp_path, capsys):
    assert main(["demo", "--path", "", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("syncstore: error: ")


def test_progress_off_a_terminal_has_no_carriage_returns():
    stream = io.StringIO()  # a log file or a pipe: not a terminal
    line = ProgressLine(stream)
    line(_demo.Progress("deliver 1/2", 10, 100, "msgs", 1234.0))
    line(_demo.Progress("restart", 0, 1, "", 0.0))
    line(_demo.Progress("catch-up", 5, 10, "users", 0.0))
    line.close()
    text = stream.getvalue()
    assert "\r" not in text
    assert text.splitlines() == ["deliver 1/2         10/100 msgs     1,234 msgs/s", "restart ...", "catch-up             5/10 users"]


def test_progress_on_a_terminal_redraws_in_place():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    line = ProgressLine(stream)
    line(_demo.Progress("deliver 1/2", 10, 100, "msgs", 1234.0))
    line.close()
    assert "\n" not in stream.getvalue() and stream.getvalue().count("\r") == 3
