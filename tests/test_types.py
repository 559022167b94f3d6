"""The package type-checks: ``mypy syncstore`` finds no error (the package ships ``py.typed``)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mypy_finds_no_error():
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "syncstore", "--ignore-missing-imports", "--cache-dir", os.path.join(ROOT, ".venv", "mypy_cache")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
