"""The ``syncstore gateway`` and ``syncstore gateway-token`` commands: run the WebSocket IM gateway, mint a token."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time

from ._cli_args import int_at_least
from .errors import InvalidArgument
from .store import DURABILITY_MODES

__all__ = ["register"]

SECRET_ENV = "SYNCSTORE_GATEWAY_SECRET"

_GATEWAY_HELP = """\
Run the WebSocket IM gateway on a store (docs/gateway.md has the protocol).

Clients authenticate with a token minted from the shared secret (see
'syncstore gateway-token'), send messages with their own client_seq, receive
pushes as messages land, and resume from (epoch, cursor) after a disconnect.
The secret is the content of --secret-file (surrounding whitespace removed),
else of the environment variable SYNCSTORE_GATEWAY_SECRET; without one the
gateway does not start (it never accepts a bare user id).  Each send names
its recipients ('to'), unless --members gives a membership table.  Runs until
SIGINT or SIGTERM; prints one line 'listening on ws://HOST:PORT' first.
Needs the websockets package: pip install 'syncstore[gateway]'.

example:
    head -c 32 /dev/urandom | base64 > gateway.secret
    syncstore gateway --path /var/lib/im/store --port 8765 --secret-file gateway.secret
    syncstore gateway --path /tmp/s --port 0 --members members.json   # {"42": [1, 2, 3]}
"""

_TOKEN_HELP = """\
Print a token proving --user to a gateway holding the same secret, valid for
--ttl seconds (the IM server's login service does the same with
syncstore.gateway_protocol.mint_token).

example:
    syncstore gateway-token --secret-file gateway.secret --user 42 --ttl 86400
"""


def _secret(path: str | None) -> bytes:
    if path is not None:
        with open(path, "rb") as f:
            secret = f.read().strip()
    else:
        secret = os.environ.get(SECRET_ENV, "").strip().encode()
    if len(secret) < 16:
        raise InvalidArgument(
            "the gateway needs a shared secret of at least 16 bytes (tokens are HMACs of it)" + ("" if path or os.environ.get(SECRET_ENV) else ": none was given"),
            key="secret-file",
            hint=f"create one: head -c 32 /dev/urandom | base64 > gateway.secret; pass --secret-file gateway.secret (or set {SECRET_ENV})",
        )
    return secret


def _members(path: str | None) -> dict[int, list[int]] | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            table = json.load(f)
        return {int(conv): [int(uid) for uid in members] for conv, members in table.items()}
    except (ValueError, TypeError, AttributeError) as error:
        raise InvalidArgument(f"--members {path}: expected a JSON object {{conv: [user, ...]}}: {error}", key="members") from None


async def _serve(args: argparse.Namespace, secret: bytes, members: dict[int, list[int]] | None) -> None:
    from . import aio  # noqa: PLC0415 - asyncio and the gateway only for this command
    from .gateway import HmacTokens, MembershipTable, serve  # noqa: PLC0415

    async with await aio.open(args.path, durability=args.durability) as store:
        gateway, port = await serve(
            store,
            args.host,
            args.port,
            authenticate=HmacTokens(secret),
            resolve=None if members is None else MembershipTable(members),
            max_queue=args.max_queue,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        print(f"syncstore gateway: listening on ws://{args.host}:{port} (store {args.path})", flush=True)
        try:
            await stop.wait()
        finally:
            await gateway.close()
    print("syncstore gateway: stopped", flush=True)


def _cmd_gateway(args: argparse.Namespace) -> int:
    secret, members = _secret(args.secret_file), _members(args.members)
    asyncio.run(_serve(args, secret, members))
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    from .gateway_protocol import mint_token  # noqa: PLC0415

    print(mint_token(_secret(args.secret_file), args.user, int(time.time()) + args.ttl))
    return 0


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``gateway`` and ``gateway-token`` commands."""
    gateway = commands.add_parser(
        "gateway", help="run the WebSocket IM gateway on a store", description=_GATEWAY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    gateway.add_argument("--path", required=True, metavar="DIR", help="the store directory (created if missing or empty)")
    gateway.add_argument("--port", required=True, type=int_at_least(0, 65535), metavar="N", help="TCP port (0: any free one, printed)")
    gateway.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    gateway.add_argument("--secret-file", metavar="F", help=f"file holding the shared token secret (default: ${SECRET_ENV})")
    gateway.add_argument("--members", metavar="FILE", help="JSON {conv: [user, ...]}: sends without 'to' go to the conversation's members")
    gateway.add_argument("--max-queue", type=int_at_least(1), default=1024, metavar="N", help="pushes queued per connection before a slow one is dropped (default %(default)s)")
    gateway.add_argument("--durability", choices=DURABILITY_MODES, default="sync", help="the store's durability (default %(default)s)")
    gateway.set_defaults(run=_cmd_gateway)
    token = commands.add_parser(
        "gateway-token", help="print a gateway token for a user", description=_TOKEN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    token.add_argument("--secret-file", metavar="F", help=f"file holding the shared secret (default: ${SECRET_ENV})")
    token.add_argument("--user", required=True, type=int_at_least(0, 2**64 - 1), metavar="U", help="the user id")
    token.add_argument("--ttl", type=int_at_least(1), default=86_400, metavar="S", help="seconds the token is valid (default %(default)s)")
    token.set_defaults(run=_cmd_token)
