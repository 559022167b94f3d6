"""Run a snippet as another user (tests run as root; permissions only bite an unprivileged user).

The child starts as root -- the interpreter may live under /root, which
``nobody`` cannot read -- imports everything it needs, then drops to the given
uid/gid and runs the snippet.  It reports with ``emit(**fields)`` (JSON lines);
an exception is reported as ``{"error": class name, "message": ..., "path": ...}``.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

import syncstore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(syncstore.__file__)))
TIMEOUT = 120  # a guard against a hung child, not a timing assertion

_TEMPLATE = """
import json, os, sys, traceback
import syncstore, syncstore.cli, syncstore._demo, syncstore._layout
from syncstore import Message
try:  # py-lmdb 3 imports this at the first environment it opens: now, while the venv is readable
    import lmdb._envid
except ImportError:
    pass

def emit(**fields):
    print(json.dumps(fields), flush=True)

os.setgroups([])
os.setgid({gid})
os.setuid({uid})
try:
{body}
except Exception as error:
    emit(error=type(error).__name__, message=str(error), path=getattr(error, "path", None))
"""


def nobody() -> pwd.struct_passwd:
    """The unprivileged user to test with; skips the test when that is impossible."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run a child as another user")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user on this system")


def script(uid: int, gid: int, body: str) -> list[str]:
    code = _TEMPLATE.format(uid=uid, gid=gid, body=textwrap.indent(textwrap.dedent(body), "    "))
    return [sys.executable, "-c", code]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": REPO + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}


def run_as(uid: int, gid: int, body: str, *args: str) -> list[dict]:
    """Run ``body`` as uid/gid with ``sys.argv[1:] == args``; return the JSON lines it emitted."""
    done = subprocess.run([*script(uid, gid, body), *args], capture_output=True, text=True, timeout=TIMEOUT, env=env())
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def start_as(uid: int, gid: int, body: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*script(uid, gid, body), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
    )


def read_event(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        proc.wait(TIMEOUT)
        pytest.fail(f"child exited ({proc.returncode}) without reporting: {proc.stderr.read()}")
    return json.loads(line)


@pytest.fixture
def shared_tmp():
    """A directory every user may traverse (pytest's tmp_path is under a 0700 directory)."""
    path = tempfile.mkdtemp(prefix="syncstore-perm-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def chown_tree(path: str, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid)
