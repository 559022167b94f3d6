"""The snapshot commands of the ``syncstore`` CLI: ``snapshot`` and ``restore``.

Thin: ``snapshot`` opens a read-only view of the store -- which works while the
IM server that embeds the store has it open for writing -- and calls
``Store.snapshot``; ``restore`` calls ``syncstore.restore``.  Each prints one
line; errors are printed by ``cli.main`` (exit code 1).
"""

from __future__ import annotations

import argparse
from typing import Any

from ._cli_args import int_at_least
from .snapshot import restore
from .store import open as open_store

__all__ = ["register"]

_SNAPSHOT_HELP = """\
Write a snapshot of the store at PATH into the directory DEST.

The first snapshot into DEST is a full base; later ones are deltas holding
only what changed since the previous one (found from the store's WAL), and
DEST's MANIFEST lists the chain.  Works while another process holds the store
open for writing: the snapshot is taken from a read-only view, exactly at the
LSN the writer has applied (at most about a second behind its acknowledged
writes).  --full writes a new base, which replaces DEST's chain.  Prints what
was written.  Restore with `syncstore restore DEST NEWPATH`.

example:
    syncstore snapshot /var/lib/im/store /backup/im-snapshots
    syncstore snapshot /var/lib/im/store /backup/im-snapshots --full
"""


def _cmd_snapshot(args: argparse.Namespace) -> int:
    with open_store(args.path, readonly=True) as store:
        info = store.snapshot(args.dest, full=args.full)
    print(f"{args.path}: {info.kind} snapshot at LSN {info.lsn} in {info.file} ({info.rows:,} rows, {info.bytes:,} bytes)"
          + (f"; {info.reason}" if info.reason else ""))
    return 0


_RESTORE_HELP = """\
Build a new store at PATH from the snapshots in DEST (a base and its deltas).

PATH must not exist or be an empty directory.  Every file of DEST that is
needed is checked (CRCs, checksums, names inside DEST) before anything is
written, and a failure leaves nothing at PATH.  The new store holds exactly
the state at the newest snapshot, or at --lsn N (the LSN of a snapshot in the
chain), and gets a new epoch: clients of the old store resync.  --follower
keeps the source store's epoch instead (a replica that will follow it).

example:
    syncstore restore /backup/im-snapshots /var/lib/im/store-restored
    syncstore restore /backup/im-snapshots /var/lib/im/store-restored --lsn 120000
"""


def _cmd_restore(args: argparse.Namespace) -> int:
    info = restore(args.dest, args.path, lsn=args.lsn, follower=args.follower)
    print(f"{args.path}: restored from {args.dest} at LSN {info.lsn}")
    return 0


def register(commands: Any) -> None:
    """Add the snapshot commands to the ``syncstore`` parser's subcommands."""
    raw = argparse.RawDescriptionHelpFormatter
    snapshot = commands.add_parser("snapshot", help="write a (base or delta) snapshot of a store", description=_SNAPSHOT_HELP, formatter_class=raw)
    snapshot.add_argument("path", metavar="PATH", help="the store directory")
    snapshot.add_argument("dest", metavar="DEST", help="the snapshot directory (created if missing)")
    snapshot.add_argument("--full", action="store_true", help="write a new base, replacing DEST's chain")
    snapshot.set_defaults(run=_cmd_snapshot)
    restore_ = commands.add_parser("restore", help="build a new store from a snapshot directory", description=_RESTORE_HELP, formatter_class=raw)
    restore_.add_argument("dest", metavar="DEST", help="the snapshot directory")
    restore_.add_argument("path", metavar="PATH", help="the new store's directory (missing or empty)")
    restore_.add_argument("--lsn", type=int_at_least(0), metavar="N", help="restore the snapshot at LSN N (default: the newest)")
    restore_.add_argument("--follower", action="store_true", help="keep the source store's epoch and make it a follower")
    restore_.set_defaults(run=_cmd_restore)
