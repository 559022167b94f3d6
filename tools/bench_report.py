"""Turn pytest-benchmark JSON into the syncstore-vs-peers ratio tables.

    ./dev bench --benchmark-json=bench.json
    python tools/bench_report.py bench.json              # plain text, as printed after ./dev bench
    python tools/bench_report.py bench.json --markdown   # the tables of docs/benchmarks.md
    python tools/bench_report.py run1.json run2.json     # rows of later files replace earlier ones

Each benchmark stores its numbers in ``extra_info["syncstore_row"]``; the
rendering (ratios, targets met or missed) is ``bench/_harness.render``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

from _harness import Row, render  # noqa: E402


def register_sections() -> None:
    """Import every benchmark module: some register their table section (``SECTIONS``) at import."""
    for name in sorted(os.listdir(BENCH)):
        if name.startswith("test_bench_") and name.endswith(".py"):
            importlib.import_module(name[:-3])


def load_rows(path: str) -> tuple[list[Row], dict]:
    """The recorded rows and the machine info of a ``--benchmark-json`` file."""
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        rows += [Row(**row) for row in info.get("syncstore_rows", [info["syncstore_row"]] if "syncstore_row" in info else [])]
    return rows, data.get("machine_info", {})


def main(argv: list[str] | None = None) -> int:
    """Print the tables; exit 1 if the file holds no syncstore rows."""
    parser = argparse.ArgumentParser(description="Render syncstore benchmark ratio tables from pytest-benchmark JSON.")
    parser.add_argument("json_files", nargs="+", metavar="JSON", help="output of --benchmark-json; a later file's rows replace earlier ones")
    parser.add_argument("--markdown", action="store_true", help="Markdown tables (for docs/benchmarks.md)")
    args = parser.parse_args(argv)
    register_sections()
    merged: dict[tuple[str, str], Row] = {}
    machine: dict = {}
    for path in args.json_files:
        rows, machine = load_rows(path)
        merged.update({(row.section, row.system): row for row in rows})
    rows = list(merged.values())
    if not rows:
        print(f"{', '.join(args.json_files)}: no syncstore benchmark rows (run with --benchmark-disable?)", file=sys.stderr)
        return 1
    if machine:
        cpu = machine.get("cpu", {})
        line = f"{cpu.get('brand_raw', machine.get('processor', '?'))}, {cpu.get('count', '?')} CPUs, Python {machine.get('python_version', '?')}"
        print(f"Machine: {line}\n" if args.markdown else f"machine: {line}\n")
    print(render(rows, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
