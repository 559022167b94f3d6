"""The change-log commands of the ``syncstore`` CLI: ``changes`` and ``consumers``.

Thin: each opens a read-only view of the store -- which works while the IM
server that embeds the store has it open for writing -- makes one library
call and prints.  A read-only view sees what the writer has applied to LMDB
(at most about a second behind the writer's own readers).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ._cli_args import int_at_least, seconds
from .store import open as open_store

__all__ = ["register"]

_CHANGES_HELP = """\
Print the store's change log, one JSON object per line, in LSN order.

Every write is one change: "deliver" (the message and each recipient's
cursor; the body as UTF-8 text, or base64 when body_encoding says so) and
"expire" (idempotency keys that left the dedup window).  --since N prints the
changes after LSN N; --follow keeps printing new ones as they are applied,
until interrupted (or --timeout seconds).  Works while another process has
the store open.  A position the log no longer holds is an error naming the
newest snapshot that bridges the gap.

example:
    syncstore changes /var/lib/im/store --since 0 --limit 10
    syncstore changes /var/lib/im/store --since 120000 --follow | jq .msg_id
"""

_CONSUMERS_HELP = """\
List the store's named change-log consumers: acknowledged position, lag
(changes not acknowledged), WAL bytes each one keeps from deletion, and
whether (and why) it was dropped for falling too far behind.

example:
    syncstore consumers /var/lib/im/store
    syncstore consumers /var/lib/im/store --json
"""


def _cmd_changes(args: argparse.Namespace) -> int:
    if args.timeout is not None and not args.follow:
        print("syncstore changes: error: --timeout is how long --follow waits: pass --follow too", file=sys.stderr)
        return 2
    with open_store(args.path, readonly=True) as store:
        try:
            for change in store.changes(since=args.since, limit=args.limit, follow=args.follow, timeout=args.timeout):
                sys.stdout.write(json.dumps(change.to_json(), separators=(",", ":")) + "\n")
                if args.follow:
                    sys.stdout.flush()
        except BrokenPipeError:  # `| head`: the reader is gone, which is fine
            sys.stderr.close()
    return 0


def _cmd_consumers(args: argparse.Namespace) -> int:
    with open_store(args.path, readonly=True) as store:
        rows: list[dict[str, Any]] = [
            {"name": c.name, "position": c.position, "lag": c.lag, "pinned_bytes": c.pinned_bytes, "dropped": c.dropped} for c in store.consumers()
        ]
        lsn = store.lsn
    if args.json:
        print(json.dumps({"lsn": lsn, "consumers": rows}, indent=1))
        return 0
    if not rows:
        print(f"{args.path}: no consumers (change log at LSN {lsn:,})")
        return 0
    width = max(8, *(len(r["name"]) for r in rows))
    print(f"{'NAME':<{width}}  {'POSITION':>12}  {'LAG':>10}  {'PINNED':>12}  STATUS")
    for r in rows:
        status = "ok" if r["dropped"] is None else f"dropped: {r['dropped']}"
        print(f"{r['name']:<{width}}  {r['position']:>12,}  {r['lag']:>10,}  {r['pinned_bytes']:>12,}  {status}")
    return 0


def register(commands: Any) -> None:
    """Add the change-log commands to the ``syncstore`` parser's subcommands."""
    raw = argparse.RawDescriptionHelpFormatter
    changes = commands.add_parser("changes", help="print the change log as JSON lines (optionally following it)", description=_CHANGES_HELP, formatter_class=raw)
    changes.add_argument("path", metavar="PATH", help="the store directory")
    changes.add_argument("--since", type=int_at_least(0), default=0, metavar="N", help="print the changes after LSN N (default 0: all retained)")
    changes.add_argument("--limit", type=int_at_least(1), default=None, metavar="N", help="print at most N changes")
    changes.add_argument("--follow", action="store_true", help="keep printing new changes as they are applied")
    changes.add_argument("--timeout", type=seconds, default=None, metavar="S", help="with --follow: stop after S seconds in all")
    changes.set_defaults(run=_cmd_changes)
    consumers = commands.add_parser("consumers", help="list the named change-log consumers, their lag and pinned log", description=_CONSUMERS_HELP, formatter_class=raw)
    consumers.add_argument("path", metavar="PATH", help="the store directory")
    consumers.add_argument("--json", action="store_true", help="print JSON instead of a table")
    consumers.set_defaults(run=_cmd_consumers)
