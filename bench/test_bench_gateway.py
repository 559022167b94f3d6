"""The WebSocket gateway end to end on loopback: send -> push latency with 1,000 connected clients, memory per client.

The gateway runs as its own process (``syncstore gateway``, durability
"sync"), the clients in this one (one event loop, ``GatewayClient``).  1,000
clients connect and resume; then 100 of them, concurrently, each send 20
messages one after the other (each awaits its durable ack) to one random
other client.  Latency: from the ``send`` call to the recipient's push
arriving -- the whole path: client -> gateway -> durable group commit -> the
gateway's change-log tail -> push to the recipient.  Memory: the gateway
process's ``RssAnon`` after the clients connected and resumed, minus before,
per client (the store is already open before: its cost is not counted).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("websockets")

from _harness import RESULTS, Row, percentile, sized
from syncstore.gateway_client import GatewayClient
from syncstore.gateway_protocol import mint_token

CLIENTS = 1_000
SENDERS = 100
PER_SENDER = 20
SECRET = b"bench-secret-0123456789abcdefghij"


def _rss_anon_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon")


async def _drive(url: str, pid: int, clients: int, senders: int, per_sender: int) -> dict[str, float]:
    expiry = int(time.time()) + 3600
    sent_at: dict[tuple[int, int], tuple[float, int]] = {}  # (sender, client_seq) -> (send called, recipient)
    latencies: list[float] = []
    done = asyncio.Event()
    expected = senders * per_sender

    def receiver(uid: int):
        def on_push(push) -> None:
            sent = sent_at.get((push.sender, push.client_seq))
            if sent is not None and sent[1] == uid:  # the recipient's push (the sender gets a copy too)
                latencies.append(time.perf_counter() - sent[0])
                if len(latencies) == expected:
                    done.set()

        return on_push

    before = _rss_anon_kb(pid)
    users = list(range(1, clients + 1))
    connected = [GatewayClient(url, uid, mint_token(SECRET, uid, expiry), on_push=receiver(uid)) for uid in users]
    for client in connected:
        await client.connect()
    await asyncio.gather(*(c.send(1, 1, b"hello", [c.user]) for c in connected[:1]))  # the gateway is warm
    after = _rss_anon_kb(pid)
    rng = random.Random(5)
    start = time.perf_counter()

    async def sender(client: GatewayClient) -> None:
        for seq in range(2, 2 + per_sender):
            to = rng.choice(users[: client.user - 1] + users[client.user :])
            sent_at[(client.user, seq)] = (time.perf_counter(), to)
            await client.send(2, seq, b"x" * 200, [to])

    await asyncio.gather(*(sender(c) for c in rng.sample(connected, senders)))
    await done.wait()
    seconds = time.perf_counter() - start
    for client in connected:
        assert client.violations == []
    await asyncio.gather(*(c.close() for c in connected))
    latencies.sort()
    return {
        "p50 ms": percentile(latencies, 0.5) * 1e3,
        "p99 ms": percentile(latencies, 0.99) * 1e3,
        "msg/s": expected / seconds,
        "KB/client": (after - before) / clients,
    }


def test_gateway_latency_and_memory(benchmark, scale, fresh_dir, tmp_path):
    clients = sized(CLIENTS, scale, 20)
    senders = min(clients, sized(SENDERS, scale, 5))
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    results: list[dict[str, float]] = []

    def run() -> None:
        process = subprocess.Popen(
            [sys.executable, "-m", "syncstore.cli", "gateway", "--path", fresh_dir("gw"), "--port", "0", "--secret-file", str(secret)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            line = process.stdout.readline()
            url = line.split("listening on ")[1].split()[0]
            results.append(asyncio.run(_drive(url, process.pid, clients, senders, PER_SENDER)))
        finally:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=120)
        assert process.returncode == 0

    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 3)
    best = sorted(results, key=lambda r: r["p99 ms"])[len(results) // 2]
    RESULTS.record(
        Row(
            "gateway",
            "syncstore",
            best,
            workload=f"{clients:,} connected clients, {senders} senders x {PER_SENDER} messages (200 B, 1 recipient), gateway in its own process; median of {len(results)} runs",
        ),
        benchmark,
    )
