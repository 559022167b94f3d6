"""Benchmark fixtures: the workload scale, fresh directories per round, and the ratio tables.

Run ``./dev bench`` for numbers (``SYNCSTORE_BENCH_SCALE=1``, the default,
is the size in docs/benchmarks.md); CI runs ``--benchmark-disable``, where
each benchmark runs once at a tiny scale as a smoke test.
"""

from __future__ import annotations

import itertools
import os

import pytest
from _harness import RESULTS, render, scale_for


@pytest.fixture
def scale(benchmark) -> float:
    """Workload multiplier (see ``_harness.scale_for``)."""
    return scale_for(benchmark.disabled)


@pytest.fixture
def fresh_dir(tmp_path):
    """A function returning a new, not yet existing directory path under ``tmp_path`` on each call."""
    counter = itertools.count()
    return lambda name="d": os.fspath(tmp_path / f"{name}{next(counter)}")


_LOAD_AT_START = os.getloadavg()[0]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the ratio tables after the pytest-benchmark tables (only when timing ran)."""
    if not RESULTS.rows or config.getoption("benchmark_disable", default=False):
        return
    terminalreporter.write_sep("=", "syncstore vs peers (ratios: syncstore / peer for rates, peer / syncstore for costs)")
    terminalreporter.write(render(RESULTS.rows))
    start, end, cpus = _LOAD_AT_START, os.getloadavg()[0], os.cpu_count() or 1
    terminalreporter.write_line(f"load average at start {start:.2f}, at end {end:.2f}, on {cpus} CPUs")
    if max(start, end) > 0.5 * cpus:
        terminalreporter.write_line("WARNING: other processes competed for the CPU; these numbers are pessimistic", yellow=True)
