"""Peak memory while ingesting 2M messages over 1M users (scale 1), measured in a child process.

The child (``_ingest.py``) reports ``ru_maxrss`` -- which includes the pages
of LMDB's memory-mapped file that the process touched (file-backed, shared,
reclaimable by the kernel under pressure) -- and ``RssAnon``, the process's
own heap (Python objects, the overlay, LMDB's dirty-page buffers), at the
end and at its peak.  The 300 MB target is about what the process itself
holds: RssAnon.  See docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from _harness import RESULTS, Row, sized

HERE = os.path.dirname(os.path.abspath(__file__))


def test_ingest_peak_memory(benchmark, scale, fresh_dir):
    messages, users = sized(2_000_000, scale, 20_000), sized(1_000_000, scale, 10_000)
    report: dict = {}

    def run():
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, os.path.join(HERE, "_ingest.py"), "--path", fresh_dir("ingest"), "--messages", str(messages), "--users", str(users)]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
        assert done.returncode == 0, done.stderr
        report.update(json.loads(done.stdout))

    benchmark.pedantic(run, rounds=1)
    mb = 1024 / 1e6
    RESULTS.record(
        Row(
            "memory",
            "syncstore",
            {
                "ru_maxrss MB": report["ru_maxrss_kb"] * mb,
                "RssAnon end MB": report["rss_anon_end_kb"] * mb,
                "peak RssAnon MB": report["peak_rss_anon_kb"] * mb,
                "peak RssFile MB": report["peak_rss_file_kb"] * mb,
                "LMDB file MB": report["state_bytes"] / 1e6,
                "msg/s": messages / report["ingest_seconds"],
            },
            workload=f"{messages:,} messages over {users:,} users, deliver_many x 10,000, durable",
        ),
        benchmark,
    )
