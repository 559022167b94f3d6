"""The WebSocket gateway end to end on 127.0.0.1: real websockets clients through sends, retries of one
client_seq, abrupt disconnects, a slow reader evicted, reconnects; tokens, malformed frames, resets,
membership.

No sleeps and no timing assertions: tests wait on the gateway's ``observe`` events, the clients'
disconnect events and their push counts.  Each test has one overall guard (``GUARD_S``) so that a bug
fails it instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import socket
import time
from dataclasses import dataclass, field

import pytest

pytest.importorskip("websockets")

import syncstore
import syncstore.aio
from syncstore import Message
from syncstore.gateway import CLOSE_EVICTED, CLOSE_MALFORMED, CLOSE_REFUSED, Gateway, HmacTokens, MembershipTable, serve
from syncstore.gateway_client import GatewayClient, GatewayError
from syncstore.gateway_protocol import Auth, Send, encode, mint_token

SECRET = b"gateway-test-secret-0123456789ab"
GUARD_S = 120  # a hang guard, never a timing assertion
SLOW = 1_000  # the slow reader's user id


def token(user: int, secret: bytes = SECRET, ttl: int = 3600) -> str:
    return mint_token(secret, user, int(time.time()) + ttl)


@dataclass
class Env:
    store: syncstore.aio.AsyncStore
    gateway: Gateway
    url: str
    events: dict = field(default_factory=lambda: collections.defaultdict(asyncio.Event))

    def client(self, user: int, **kw) -> GatewayClient:
        return GatewayClient(self.url, user, token(user), **kw)


@contextlib.asynccontextmanager
async def running(tmp_path, **options):
    events: dict = collections.defaultdict(asyncio.Event)
    async with await syncstore.aio.open(str(tmp_path / "store")) as store:
        gateway, port = await serve(store, authenticate=HmacTokens(SECRET), observe=lambda event, user: events[(event, user)].set(), **options)
        try:
            yield Env(store, gateway, f"ws://127.0.0.1:{port}", events)
        finally:
            await gateway.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, GUARD_S))


def slow_socket(port: int) -> socket.socket:
    """A connected TCP socket with a tiny receive buffer: a reader on a slow link fills it at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


def check_inbox(client: GatewayClient, expected: dict[int, tuple[int, int]]) -> None:
    """Every message addressed to the client exactly once, in cursor order, nothing else."""
    assert client.violations == []
    assert [m.cursor for m in client.messages] == list(range(1, len(client.messages) + 1))
    ids = [m.msg_id for m in client.messages]
    assert len(ids) == len(set(ids)) == len(expected)
    assert set(ids) == set(expected)
    for m in client.messages:
        assert (m.sender, m.client_seq) == expected[m.msg_id]


def test_fifty_clients_get_every_message_exactly_once_in_cursor_order(tmp_path):
    users = list(range(1, 61))

    async def main():
        async with running(tmp_path, max_queue=64) as env:
            port = int(env.url.rsplit(":", 1)[1])
            clients = {u: env.client(u) for u in users}
            expected: dict[int, dict[int, tuple[int, int]]] = {u: {} for u in [*users, SLOW]}
            slow = env.client(SLOW)
            await slow.connect(sock=slow_socket(port), max_queue=1)
            slow.pause()
            await asyncio.gather(*(client.connect() for client in clients.values()))

            def addressed(sender: int, seq: int, to: list[int], msg_id: int) -> None:
                for user in {sender, *to}:
                    assert expected[user].setdefault(msg_id, (sender, seq)) == (sender, seq)

            async def client_run(user: int) -> None:
                client, rng = clients[user], random.Random(user)
                for seq in range(1, 9):
                    to = rng.sample([u for u in users if u != user], rng.randint(1, 3))
                    body = f"{user}:{seq}".encode()
                    roll = rng.random()
                    if roll < 0.15:  # the frame goes out, the connection drops before the ack
                        await client.ensure_connected()
                        await client.send_raw(encode(Send(5, seq, body, tuple(to))))
                        client.abort()
                        await client.disconnected.wait()
                    ack = await client.send_reliably(5, seq, body, to)
                    if roll > 0.85:  # a retry of the same client_seq: the first delivery, once
                        again = await client.send_reliably(5, seq, body, to)
                        assert again.duplicate and again.msg_id == ack.msg_id
                    addressed(user, seq, to, ack.msg_id)
                    if rng.random() < 0.1:  # a phone losing its network; it comes back later
                        client.abort()
                        await client.disconnected.wait()

            await asyncio.gather(*(client_run(u) for u in users))

            # The slow reader: big messages until the gateway evicts it (its queue filled up).
            feeder, big = clients[1], b"x" * 60_000
            for n in range(1, 3001):
                if env.events[("evicted", SLOW)].is_set():
                    break
                ack = await feeder.send_reliably(9, 10_000 + n, big, [SLOW])
                addressed(1, 10_000 + n, [SLOW], ack.msg_id)
            else:
                pytest.fail("the slow reader was never evicted")
            assert env.gateway.evictions >= 1
            slow.unpause()  # it reads what reached it, then the close
            await slow.disconnected.wait()
            assert slow.close_code == CLOSE_EVICTED
            assert len(slow.messages) < len(expected[SLOW])  # it had fallen behind ...

            everyone = {**clients, SLOW: slow}
            await asyncio.gather(*(client.holding(len(expected[user])) for user, client in everyone.items()))  # ... and resumes
            for user, client in everyone.items():
                check_inbox(client, expected[user])
                assert client.resets == []
                stored = (await env.store.sync(user, limit=10_000)).messages
                assert [m.msg_id for m in stored] == [m.msg_id for m in client.messages]
            await asyncio.gather(*(client.close() for client in everyone.values()))

    run(main())


def test_bad_tokens_are_refused(tmp_path):
    async def main():
        async with running(tmp_path) as env:
            attempts = [
                (7, token(8)),  # another user's token
                (7, token(7, secret=b"another-secret-0123456789abcdef!")),
                (7, token(7, ttl=-10)),  # expired
                (7, "v1.99999999999.AAAA"),
                (7, "anything"),
            ]
            for user, bad in attempts:
                client = GatewayClient(env.url, user, bad)
                with pytest.raises(GatewayError) as refused:
                    await client.connect()
                assert refused.value.code == "auth_failed"
            assert env.events[("refused", 7)].is_set()
            good = env.client(7)
            accepted = await good.connect()
            assert accepted.user == 7 and accepted.epoch == env.store.epoch
            await good.close()
        with pytest.raises(syncstore.InvalidArgument):
            HmacTokens(b"short")

    run(main())


MALFORMED = [
    "{not json",
    "[1, 2]",
    '{"type": "shout"}',
    '{"type": "send", "conv": 1, "client_seq": 1}',  # no body
    '{"type": "send", "conv": true, "client_seq": 1, "body": "x"}',  # a bool is not an id
    '{"type": "send", "conv": 1, "client_seq": -1, "body": "x"}',
    '{"type": "send", "conv": 1, "client_seq": 1, "body": "x", "bcc": [2]}',  # unknown field
    '{"type": "send", "conv": 1, "client_seq": 1, "body": "!!", "body_encoding": "base64"}',
    '{"type": "resume"}',
    b"\x00binary frame",
]


def test_a_malformed_frame_closes_that_connection_only(tmp_path):
    async def main():
        async with running(tmp_path) as env:
            bystander = env.client(1)
            await bystander.connect()
            for index, frame in enumerate(MALFORMED):
                culprit = env.client(100 + index)
                await culprit.connect()
                await culprit._ws.send(frame)
                await culprit.disconnected.wait()
                assert culprit.close_code == CLOSE_MALFORMED, frame
                assert [e.code for e in culprit.errors] == ["malformed"]
                # the bystander's connection is untouched: it still sends and receives
                ack = await bystander.send(3, index + 1, b"still here", [2])
                assert not ack.duplicate
            await bystander.holding(len(MALFORMED))
            check_inbox(bystander, {m.msg_id: (1, m.client_seq) for m in bystander.messages})
            # protocol steps out of order close with 1008
            twice = env.client(2)
            await twice.connect()
            await twice._ws.send(encode(Auth(2, token(2))))
            await twice.disconnected.wait()
            assert twice.close_code == CLOSE_REFUSED
            await bystander.close()

    run(main())


def test_store_errors_answer_the_send_and_keep_the_connection(tmp_path):
    async def main():
        async with running(tmp_path, max_recipients=3) as env:
            client = env.client(1)
            await client.connect()
            await client.send(1, 1, b"first", [2])
            with pytest.raises(GatewayError) as conflict:
                await client.send(1, 1, b"other content, same client_seq", [2])
            assert conflict.value.code == "conflict"
            with pytest.raises(GatewayError) as too_many:
                await client.send(1, 2, b"x", [2, 3, 4, 5])
            assert too_many.value.code == "invalid"
            with pytest.raises(GatewayError) as no_to:
                await client.send(1, 3, b"x")
            assert no_to.value.code == "invalid"
            assert not (await client.send(1, 4, b"fine", [2])).duplicate  # still connected
            await client.close()

    run(main())


def test_resets_reach_the_client_and_it_resyncs(tmp_path):
    async def main():
        async with running(tmp_path) as env:
            for seq in range(1, 6):
                await env.store.deliver(Message(9, 1, seq, b"m%d" % seq), [4])
            old_epoch = env.store.epoch ^ 1
            client = env.client(4)
            client.epoch, client.cursor = old_epoch, 3  # a cursor from another history
            await client.connect()
            await client.holding(5)
            assert [(r.reason, r.next, r.epoch) for r in client.resets] == [("epoch", 0, env.store.epoch)]
            assert [m.cursor for m in client.messages] == [1, 2, 3, 4, 5]
            await client.close()

            ahead = env.client(4)
            ahead.epoch, ahead.cursor = env.store.epoch, 50  # from the future: the store was rewound
            await ahead.connect()
            await ahead.holding(5)
            assert [r.reason for r in ahead.resets] == ["ahead"]
            check_inbox(ahead, {m.msg_id: (9, m.client_seq) for m in client.messages})
            await ahead.close()

            # Coming from another datacenter: resume by the last msg_id held.
            third = env.client(4)
            third.epoch, third.cursor = None, 0
            await third.connect(resume=False)
            await third.resume(msg_id=client.messages[2].msg_id)
            third.cursor = 3  # what the client holds up to that msg_id
            await third.holding(2)
            assert [m.cursor for m in third.messages] == [4, 5] and third.resets == []
            await third.close()
            unknown = env.client(4)
            await unknown.connect(resume=False)
            await unknown.resume(msg_id=12345)
            await unknown.holding(5)
            assert [r.reason for r in unknown.resets] == ["msg_id"]
            await unknown.close()

    run(main())


def test_membership_resolver(tmp_path):
    async def main():
        async with running(tmp_path, resolve=MembershipTable({77: [1, 2, 3]})) as env:
            alice, bob = env.client(1), env.client(2)
            await alice.connect()
            await bob.connect()
            ack = await alice.send(77, 1, b"to the group")  # no 'to': the members
            await bob.holding(1)
            assert bob.messages[0].msg_id == ack.msg_id
            assert await env.store.head(3) == 1
            for conv, to in ((77, [9]), (78, None)):  # a non-member recipient; an unknown conversation
                with pytest.raises(GatewayError) as refused:
                    await alice.send(conv, 2, b"x", to)
                assert refused.value.code == "not_member"
            outsider = env.client(9)
            await outsider.connect()
            with pytest.raises(GatewayError):
                await outsider.send(77, 1, b"let me in")
            for client in (alice, bob, outsider):
                await client.close()

    run(main())


class _RacingGateway(Gateway):
    """Delivers a message right after a connection's first catch-up read, and waits until the tail has offered it."""

    raced = False

    async def _catch_up(self, connection):
        await super()._catch_up(connection)
        if self.raced:
            return
        self.raced = True
        offered = asyncio.Event()
        plain = self._offer

        def offer(message, cursors):
            plain(message, cursors)
            offered.set()

        self._offer = offer
        await self.store.deliver(Message(9, 1, 99, b"raced"), [connection.user])
        await offered.wait()
        self._offer = plain


def test_a_message_landing_during_catch_up_is_pushed(tmp_path):
    """The connection joins the tail's audience before its first sync read: a message the tail offers
    between that read and the end of the catch-up reaches it (and would be lost the other way round)."""

    async def main():
        async with await syncstore.aio.open(str(tmp_path / "store")) as store:
            await store.deliver(Message(9, 1, 1, b"before"), [4])
            gateway = _RacingGateway(store, authenticate=HmacTokens(SECRET))
            port = await gateway.start()
            try:
                client = GatewayClient(f"ws://127.0.0.1:{port}", 4, token(4))
                await client.connect()
                await client.holding(2)
                assert [m.body for m in client.messages] == [b"before", b"raced"] and gateway.raced
                await client.close()
            finally:
                await gateway.close()

    run(main())
