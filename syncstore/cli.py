"""The ``syncstore`` command: parse arguments, make one library call, return an exit code.

Each subcommand is a ``_cmd_<name>(args) -> int`` registered in
:func:`build_parser`; new command groups (``archive ...``) add a subparser
there.  Exit codes: 0 success, 1 failure (a :class:`SyncStoreError` or an
``OSError``, printed as one line ``syncstore: error: ...``; or the demo's
verification failed), 2 bad arguments, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from . import __version__, _cli_changelog, _cli_gateway, _cli_snapshot
from ._cli_args import int_at_least as _int_at_least
from ._demo import DemoConfig, Progress, format_report, run_demo

from ._migrate import inspect as inspect_state
from ._migrate import leftovers
from .errors import InvalidArgument, StoreLocked, StoreNotFound, SyncStoreError
from .state import STATE_FORMAT
from .store import open as open_store

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_DEMO_HELP = """\
Simulate an instant-messaging server on an embedded store and verify it.

Thousands of users exchange 1:1 and group messages from several sender
threads with durability="sync"; some sends are retried (and must come back as
duplicates), clients go offline and catch up by cursor in pages of 50, and the
store is closed and reopened half-way.  At the end every client must hold
exactly the messages sent to it, in order, with no gaps and no duplicates.
Then the safety checks: keys reused with other content must be refused, and
clients holding a cursor from the future or from an old epoch must get a reset
page and resync; store.check() must pass.  Prints a report; exits 0 only if
verification passes.

example:
    syncstore demo
    syncstore demo --users 200 --messages 2000 --threads 4 --seed 7
    syncstore demo --path /tmp/demo-store     # keep the store afterwards
"""


class ProgressLine:
    """Draws :class:`Progress` snapshots on ``stream``.

    On a terminal: one line, redrawn in place (``\\r``) at every snapshot.
    Otherwise (a log file, CI): plain lines, at most one a second (and one per
    phase), with no ``\\r`` that a log viewer would show as garbage.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        isatty = getattr(stream, "isatty", None)
        self.terminal = bool(isatty and isatty())
        self.interval = 0.0 if self.terminal else 1.0
        self._width = 0
        self._last = 0.0
        self._phase = ""

    def __call__(self, progress: Progress) -> None:
        """Draw ``progress`` (throttled off a terminal, except on a phase change)."""
        now = time.monotonic()
        if progress.phase == self._phase and now - self._last < self.interval:
            return
        self._phase, self._last = progress.phase, now
        if progress.unit:
            text = f"{progress.phase:<12} {progress.done:>9,}/{progress.total:,} {progress.unit}"
            if progress.rate:
                text += f"  {progress.rate:>8,.0f} {progress.unit}/s"
        else:
            text = f"{progress.phase} ..."
        if not self.terminal:
            self.stream.write(text + "\n")
            self.stream.flush()
            return
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = max(self._width, len(text))

    def close(self) -> None:
        """Erase the line (on a terminal)."""
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def _cmd_demo(args: argparse.Namespace) -> int:
    config = DemoConfig(users=args.users, messages=args.messages, threads=args.threads, seed=args.seed, path=args.path)
    line = None if args.quiet else ProgressLine(sys.stderr)
    try:
        result = run_demo(config, on_progress=line)
    finally:
        if line is not None:
            line.close()
    print(format_report(result))
    return EXIT_OK if result.ok else EXIT_FAILED


_UPGRADE_HELP = """\
Migrate a store written by an earlier syncstore to this version's format.

Opening a store for writing migrates it anyway; this command does only that,
for operators who want to migrate at a time of their choosing, or before
opening the store read-only (read-only views refuse older formats).  The
migration builds the new LMDB state beside the old one and swaps them, so a
crash at any point loses nothing: run the command again (it also finishes a
migration that a crash interrupted).  It needs free space for the new state
(smaller than the old one: bodies are stored once).  Nothing else may have the
store open.  Progress and warnings are logged on stderr.

example:
    syncstore upgrade /var/lib/im/store
"""


def _cmd_upgrade(args: argparse.Namespace) -> int:
    path = args.path
    if not path:
        raise InvalidArgument("the store path is empty", key="path", hint="pass the store's directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InvalidArgument(f"{path} is not a directory: a store is a directory", path=path, key="path", hint="pass the store's directory")
    before, replica_id = inspect_state(path)
    if before is None:
        raise StoreNotFound(f"no store at {path} (no LMDB state to migrate)", path=path, hint="check the path: a store is the directory that holds SYNCSTORE, wal/ and state/")
    interrupted = leftovers(path)
    if before == STATE_FORMAT and not interrupted:
        print(f"{path}: already at state format {STATE_FORMAT}; nothing to do")
        return EXIT_OK
    try:
        with open_store(path, create=False, replica_id=replica_id or 0) as store:  # opening migrates, or finishes a migration
            counts = store.check()
    except StoreLocked as error:
        raise StoreLocked(error.message, path=error.path, holder=error.holder, hint="stop the process that holds the store, then run the command again; nothing was changed") from None
    if before == STATE_FORMAT:
        print(f"{path}: finished a migration to state format {STATE_FORMAT} that was interrupted (removed {', '.join(interrupted)})")
        return EXIT_OK
    print(f"{path}: migrated from state format {before} to format {STATE_FORMAT} "
          f"({counts['messages']:,} messages, {counts['inbox_entries']:,} inbox entries, {counts['users']:,} users)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``syncstore`` command, with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="syncstore",
        description="syncstore: embedded WAL + LMDB storage engine for instant-messaging offline sync.",
        epilog="example:\n    syncstore demo\n\nRun 'syncstore COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"syncstore {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="simulate an IM server on an embedded store and verify every message",
        description=_DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = DemoConfig()
    demo.add_argument("--path", metavar="DIR", help="store directory, new or empty, kept afterwards (default: a temporary one, removed)")
    demo.add_argument("--users", type=_int_at_least(2), default=defaults.users, metavar="N", help="number of users (default %(default)s)")
    demo.add_argument("--messages", type=_int_at_least(1), default=defaults.messages, metavar="N", help="messages to send (default %(default)s)")
    demo.add_argument("--threads", type=_int_at_least(1, 1024), default=defaults.threads, metavar="N", help="sender threads (default %(default)s)")
    demo.add_argument("--seed", type=int, default=defaults.seed, metavar="S", help="random seed; same seed, same workload (default %(default)s)")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress line on stderr")
    demo.set_defaults(run=_cmd_demo)

    upgrade = commands.add_parser(
        "upgrade", help="migrate a store written by an earlier syncstore", description=_UPGRADE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    upgrade.add_argument("path", metavar="PATH", help="the store directory")
    upgrade.set_defaults(run=_cmd_upgrade)
    _cli_changelog.register(commands)
    _cli_snapshot.register(commands)
    _cli_gateway.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``syncstore`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a usage error (already printed)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args)
    except SyncStoreError as error:
        print(f"syncstore: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as error:  # e.g. a --path the user may not create: one line, no traceback
        where = f": {error.filename}" if error.filename else ""
        print(f"syncstore: error: {error.strerror or error}{where}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("syncstore: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
