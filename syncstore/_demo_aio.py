"""The demo's asyncio phase: an IM server's event loop on ``syncstore.aio``, then a few WebSocket gateway clients.

In a store of its own (so the main demo's counts stay as they are):

1. *Coroutines deliver.*  One coroutine per user sends its messages one
   after the other (``await store.deliver``, durable), to one other user and
   itself; some sends are retried at once with the same key and must come
   back ``duplicate`` with the first msg_id.  Meanwhile an ``async for ...
   changes(follow=True)`` tail receives every delivery once, in LSN order.
2. *Clients catch up* with ``await store.sync`` pages: every inbox holds
   exactly the messages addressed to it, cursors dense from 1.
3. *The gateway* (when the ``websockets`` package is installed): a gateway on
   127.0.0.1 over the same store, a few real WebSocket clients sending to
   each other, one dropping its connection abruptly half-way and resuming
   from its cursor; each must end with every message addressed to it exactly
   once, in cursor order.

Pure orchestration over the public API; failures go through ``fail``.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import aio
from .errors import SyncStoreError
from .model import Message, StoredMessage

__all__ = ["AioResult", "run_aio_phase"]

Fail = Callable[[str], None]
PER_USER = 10
GATEWAY_CLIENTS = 8
GATEWAY_SENDS = 5
_SECRET = b"demo-gateway-secret-0123456789ab"


@dataclass(frozen=True)
class AioResult:
    """What the asyncio phase did (each verified, or a failure was reported)."""

    coroutines: int
    messages: int
    duplicates: int
    rate: float  # durable deliveries per second from the coroutines
    tail_changes: int
    inboxes: int  # inboxes verified through await store.sync
    gateway_clients: int  # 0: websockets is not installed
    gateway_messages: int
    reconnects: int


def run_aio_phase(users: int, seed: int, fail: Fail) -> AioResult:
    """Run the phase in a temporary store; ``users`` coroutines (>= 2)."""
    directory = tempfile.mkdtemp(prefix="syncstore-demo-aio-")
    try:
        return asyncio.run(_phase(f"{directory}/store", users, random.Random(seed), fail))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _phase(path: str, users: int, rng: random.Random, fail: Fail) -> AioResult:
    addressed: dict[int, dict[int, tuple[int, int]]] = {uid: {} for uid in range(1, users + 1)}  # user -> msg_id -> key
    plans = {uid: [(rng.choice([u for u in range(1, users + 1) if u != uid]), rng.random() < 0.1) for _ in range(PER_USER)] for uid in range(1, users + 1)}
    total = users * PER_USER
    async with await aio.open(path) as store:
        tail = asyncio.ensure_future(_tail(store, total))
        duplicates = 0

        async def user(uid: int) -> None:
            nonlocal duplicates
            for seq, (to, retry) in enumerate(plans[uid], 1):
                message = Message(uid, min(uid, to) * 100_000 + max(uid, to), seq, b"%d says hi #%d" % (uid, seq))
                first = await store.deliver(message, [uid, to])
                if retry:
                    again = await store.deliver(message, [to, uid])
                    duplicates += again.duplicate and again.msg_id == first.msg_id
                    if not again.duplicate or again.msg_id != first.msg_id:
                        fail(f"asyncio: the retry of ({uid}, {seq}) was not the first delivery's duplicate")
                for recipient in (uid, to):
                    addressed[recipient][first.msg_id] = (uid, seq)

        began = time.perf_counter()
        await asyncio.gather(*(user(uid) for uid in range(1, users + 1)))
        rate = total / (time.perf_counter() - began)
        received = await tail
        if received != list(range(1, total + 1)):
            fail(f"asyncio: the follow tail got LSNs {received[:3]}... ({len(received)}), expected 1..{total} once each")
        inboxes = 0
        for uid, expected in addressed.items():
            inboxes += await _verify_inbox(store, uid, expected, fail)
        retries = sum(retry for plan in plans.values() for _to, retry in plan)
        if duplicates != retries:
            fail(f"asyncio: {duplicates} duplicates for {retries} retries")
        gateway = await _gateway(store, rng, fail)
    return AioResult(users, total, duplicates, rate, len(received), inboxes, *gateway)


async def _tail(store: aio.AsyncStore, count: int) -> list[int]:
    return [change.lsn async for change in store.changes(since=0, follow=True, limit=count)]


async def _verify_inbox(store: aio.AsyncStore, uid: int, expected: dict[int, tuple[int, int]], fail: Fail) -> int:
    got: list[StoredMessage] = []
    since = 0
    while True:
        page = await store.sync(uid, since=since, limit=50)
        got.extend(page.messages)
        since = page.next
        if not page.has_more:
            break
    if [m.cursor for m in got] != list(range(1, len(got) + 1)) or sorted(m.msg_id for m in got) != sorted(expected):
        fail(f"asyncio: user {uid} holds {len(got)} messages, not exactly the {len(expected)} addressed to it in cursor order")
        return 0
    return 1


async def _gateway(store: aio.AsyncStore, rng: random.Random, fail: Fail) -> tuple[int, int, int]:
    """Step 3: (clients, messages sent, reconnects); zeros without websockets."""
    try:
        from .gateway import HmacTokens, serve  # noqa: PLC0415 - optional
        from .gateway_client import GatewayClient  # noqa: PLC0415
        from .gateway_protocol import mint_token  # noqa: PLC0415

        import websockets  # noqa: F401, PLC0415
    except ImportError:
        return 0, 0, 0
    base = 1_000_000  # user ids of their own: the inboxes of step 1 stay as verified
    gateway, port = await serve(store, authenticate=HmacTokens(_SECRET))
    try:
        expiry = int(time.time()) + 600
        clients = [GatewayClient(f"ws://127.0.0.1:{port}", base + n, mint_token(_SECRET, base + n, expiry)) for n in range(GATEWAY_CLIENTS)]
        await asyncio.gather(*(client.connect() for client in clients))
        addressed: dict[int, set[int]] = {client.user: set() for client in clients}
        dropper = rng.choice(clients)

        async def chat(client: GatewayClient) -> None:
            for seq in range(1, GATEWAY_SENDS + 1):
                to = rng.choice([c.user for c in clients if c is not client])
                ack = await client.send_reliably(1, seq, b"over the gateway", [to])
                addressed[client.user].add(ack.msg_id)
                addressed[to].add(ack.msg_id)
                if client is dropper and seq == GATEWAY_SENDS // 2:
                    client.abort()  # a phone losing its network: it comes back and resumes
                    await client.disconnected.wait()

        await asyncio.gather(*(chat(client) for client in clients))
        await asyncio.gather(*(client.holding(len(addressed[client.user])) for client in clients))
        for client in clients:
            ids = [m.msg_id for m in client.messages]
            if client.violations or [m.cursor for m in client.messages] != list(range(1, len(ids) + 1)) or sorted(ids) != sorted(addressed[client.user]):
                fail(f"gateway: client {client.user} does not hold exactly its {len(addressed[client.user])} messages once, in cursor order")
        await asyncio.gather(*(client.close() for client in clients))
    except SyncStoreError as error:
        fail(f"gateway: {error}")
    finally:
        await gateway.close()
    return GATEWAY_CLIENTS, GATEWAY_CLIENTS * GATEWAY_SENDS, 1
