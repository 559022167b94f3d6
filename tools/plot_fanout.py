"""Plot the group fan-out benchmark: bytes per message and messages/s against fan-out.

    ./dev bench -k fanout --benchmark-json=fanout.json       # bench/test_bench_fanout.py
    pip install -e '.[plot]'                                 # matplotlib, once
    python tools/plot_fanout.py fanout.json -o fanout.png    # or .svg
    python tools/plot_fanout.py before.json after.json --label "format 2" --label "format 3" -o fanout.svg

Reads pytest-benchmark JSON (``--benchmark-json``); each fan-out benchmark
carries its row in ``extra_info["syncstore_row"]`` (section ``fanout``, see
bench/_harness.py).  Each file is one series (labelled with ``--label``, in
order, or the file's name).  Left panel: store growth per message on disk
(``B/msg``; and LMDB's used pages, dotted, if they differ) with the target
``body + 64 B x fan-out`` and one body for reference.  Right panel: messages/s
and recipient entries/s.  Both axes are logarithmic.

Exit status: 0 written; 1 no fan-out rows in a file (or unreadable JSON, or an
image that cannot be written);
2 matplotlib is missing (install the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

SECTION = "fanout"
PER_RECIPIENT_GOAL = 64  # bytes per recipient per message beyond the body (issue #8)
INSTALL_HINT = "pip install -e '.[plot]'"


class PlotError(Exception):
    """A problem with the input or output, reported as one line and exit status 1."""


class MissingMatplotlib(Exception):
    """matplotlib cannot be imported: exit status 2, naming the extra to install."""


@dataclass(frozen=True)
class Point:
    """One fan-out row."""

    fanout: int
    bytes_per_msg: float
    lmdb_bytes_per_msg: float | None
    msg_per_s: float
    entries_per_s: float
    body: float | None


def _fanout_of(row: dict) -> int:
    metrics = row.get("metrics", {})
    if "fan-out" in metrics:
        return int(metrics["fan-out"])
    tail = str(row.get("system", "")).rsplit(" ", 1)[-1]  # "syncstore fan-out 1000"
    if tail.isdigit():
        return int(tail)
    raise PlotError(f"fan-out row {row.get('system')!r} names no fan-out (no 'fan-out' metric)")


def load_points(path: str) -> list[Point]:
    """The fan-out rows of one ``--benchmark-json`` file, by fan-out; PlotError if there are none."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as error:
        raise PlotError(f"{path}: cannot read pytest-benchmark JSON: {error}") from error
    benchmarks = data.get("benchmarks", []) if isinstance(data, dict) else []
    rows = [b.get("extra_info", {}).get("syncstore_row") for b in benchmarks]
    rows = [r for r in rows if isinstance(r, dict) and r.get("section") == SECTION]
    if not rows:
        raise PlotError(
            f"{path}: no fanout rows (section {SECTION!r} in extra_info['syncstore_row']): "
            "run bench/test_bench_fanout.py with timing on, e.g. ./dev bench -k fanout --benchmark-json=FILE "
            "(--benchmark-disable records no rows in the JSON)"
        )
    points: dict[int, Point] = {}
    for row in rows:
        m = row.get("metrics", {})
        missing = [k for k in ("B/msg", "msg/s") if k not in m]
        if missing:
            raise PlotError(f"{path}: fan-out row {row.get('system')!r} lacks {', '.join(missing)}")
        fanout = _fanout_of(row)
        msg_per_s = float(m["msg/s"])
        points[fanout] = Point(
            fanout=fanout,
            bytes_per_msg=float(m["B/msg"]),
            lmdb_bytes_per_msg=float(m["LMDB B/msg"]) if "LMDB B/msg" in m else None,
            msg_per_s=msg_per_s,
            entries_per_s=float(m.get("entries/s", msg_per_s * fanout)),
            body=float(m["body B"]) if "body B" in m else None,
        )
    return [points[f] for f in sorted(points)]


def plot(series: list[tuple[str, list[Point]]], output: str) -> None:
    """Draw both panels for every series and save to ``output`` (format from its suffix)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise MissingMatplotlib(f"matplotlib is needed to plot ({error}); install it with: {INSTALL_HINT}") from error

    fig, (sizes, speed) = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fanouts = sorted({p.fanout for _, points in series for p in points})
    bodies = {p.body for _, points in series for p in points if p.body}
    for i, (label, points) in enumerate(series):
        color = colors[i % len(colors)]
        x = [p.fanout for p in points]
        sizes.plot(x, [p.bytes_per_msg for p in points], "o-", color=color, label=f"{label}: on disk")
        lmdb = [p.lmdb_bytes_per_msg for p in points]
        if all(v is not None for v in lmdb) and any(abs(v - p.bytes_per_msg) > 0.01 * p.bytes_per_msg for v, p in zip(lmdb, points)):
            sizes.plot(x, lmdb, "s:", color=color, label=f"{label}: LMDB used pages")
        speed.plot(x, [p.msg_per_s for p in points], "o-", color=color, label=f"{label}: messages/s")
        speed.plot(x, [p.entries_per_s for p in points], "^--", color=color, label=f"{label}: recipient entries/s")
    if len(bodies) == 1:
        body = bodies.pop()
        low, high = fanouts[0], fanouts[-1]
        xs = [low * (high / low) ** (i / 100) for i in range(101)]  # smooth on the log axis
        sizes.plot(xs, [body + PER_RECIPIENT_GOAL * f for f in xs], "k--", linewidth=1, label=f"target: body + {PER_RECIPIENT_GOAL} B x fan-out")
        sizes.axhline(body, color="grey", linewidth=0.8, linestyle=":", label=f"one body ({body:,.0f} B)")
    sizes.set(xscale="log", yscale="log", xlabel="fan-out (recipients per message)", ylabel="store growth per message (bytes)", title="bytes per message")
    speed.set(xscale="log", yscale="log", xlabel="fan-out (recipients per message)", ylabel="per second", title="throughput (deliver, durable, to close)")
    for axes in (sizes, speed):
        axes.set_xticks(fanouts, [f"{f:,}" for f in fanouts])
        axes.grid(True, which="both", linewidth=0.3)
        axes.legend(fontsize=7)
    try:
        fig.savefig(output)
    except (OSError, ValueError) as error:  # ValueError: a suffix matplotlib has no writer for
        raise PlotError(f"cannot write {output}: {error}") from error
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the rows, write the image."""
    parser = argparse.ArgumentParser(description="Plot bytes per message and messages/s against fan-out from pytest-benchmark JSON.")
    parser.add_argument("json_files", nargs="+", metavar="JSON", help="output of --benchmark-json holding the fanout rows; one series each")
    parser.add_argument("-o", "--output", default="fanout.png", help="image to write; the format follows the suffix (.png, .svg, .pdf); default fanout.png")
    parser.add_argument("--label", action="append", default=[], help="series label, once per JSON file in order (default: the file name)")
    args = parser.parse_args(argv)
    if len(args.label) > len(args.json_files):
        parser.error(f"{len(args.label)} --label for {len(args.json_files)} JSON files")
    labels = args.label + [os.path.splitext(os.path.basename(p))[0] for p in args.json_files[len(args.label) :]]
    try:
        series = [(label, load_points(path)) for label, path in zip(labels, args.json_files)]
    except PlotError as error:
        print(f"plot_fanout: {error}", file=sys.stderr)
        return 1
    try:
        plot(series, args.output)
    except MissingMatplotlib as error:
        print(f"plot_fanout: {error}", file=sys.stderr)
        return 2
    except PlotError as error:
        print(f"plot_fanout: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
