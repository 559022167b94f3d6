"""A WebSocket IM gateway on an :class:`~syncstore.aio.AsyncStore`: ``syncstore gateway --path DIR --port N``.

Clients authenticate, send messages with their own ``client_seq`` (the
idempotency key: a retry after a lost ack is answered ``duplicate``), receive
pushes the moment messages land, and after any disconnect ``resume`` from the
``(epoch, cursor)`` of the last push they processed -- getting exactly what
they missed, from the durable store.  The protocol (:mod:`syncstore.gateway_protocol`)
is in docs/gateway.md.  Needs the ``websockets`` package (extra ``gateway``).

How it works:

* **One tail for every connection.** A single ``changes(follow=True)`` task
  reads each durable delivery once and offers it, as a ``push`` frame, to
  the connections of its recipients that have resumed.  No per-connection
  polling, no per-connection store read while a client keeps up.
* **Per connection**, a *pump* task sends pushes in cursor order: first it
  catches up with ``sync`` pages from the client's cursor (a reset page
  becomes a ``reset`` frame), then it takes live pushes from its queue,
  skipping cursors it already sent and going back to ``sync`` whenever it
  sees a gap.  The connection joins the tail's audience *before* its first
  ``sync``, so every message is either in that read or offered afterwards:
  none is missed, none sent twice.
* **Bounded send queue.** The tail never waits for a client: a connection
  whose queue holds ``max_queue`` pushes (it does not read fast enough) is
  closed with code 4008; it reconnects and resumes by cursor, at the cost of
  a ``sync`` read -- the store is the buffer, not the gateway's memory.
* **Pluggable checks.** ``authenticate(user, token)`` (default
  :class:`HmacTokens`: a shared-secret HMAC, never "any id is accepted") and
  ``resolve(conv, sender)`` for conversation membership (None: each ``send``
  names its recipients; :class:`MembershipTable` is the example resolver).
  Either may be a coroutine function.
* A malformed frame closes that connection only (code 1007); a refused
  token 1008.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any

from . import gateway_protocol as protocol
from .aio import AsyncStore
from .errors import IdempotencyConflict, InvalidArgument, SnapshotRequired, StoreClosed, SyncStoreError
from .gateway_protocol import Accepted, Ack, Auth, Error, ProtocolError, Push, Reset, Resume, Send
from .model import Message, MessageRecord, StoredMessage

__all__ = ["Gateway", "HmacTokens", "MembershipTable", "serve", "CLOSE_EVICTED", "CLOSE_MALFORMED", "CLOSE_REFUSED"]

log = logging.getLogger("syncstore.gateway")

CLOSE_MALFORMED = 1007  # a frame broke the protocol
CLOSE_REFUSED = 1008  # authentication failed, or a protocol step out of order
CLOSE_UNAVAILABLE = 1011  # the store stopped accepting writes
CLOSE_EVICTED = 4008  # the send queue filled up: reconnect and resume from your cursor
_RESUME_BY_MSG_ID_SCAN = 10_000  # messages of the conversation looked through to find a msg_id's cursor

Authenticate = Callable[[int, str], "bool | Awaitable[bool]"]
Resolve = Callable[[int, int], "Collection[int] | None | Awaitable[Collection[int] | None]"]


try:
    from websockets.exceptions import ConnectionClosed
except ImportError:  # the gateway refuses to start without websockets (_websockets); nothing raises this then

    class ConnectionClosed(Exception):  # type: ignore[no-redef]
        """Stands in for websockets' exception when the package is missing."""


def _websockets() -> Any:
    try:
        from websockets.asyncio import server  # noqa: PLC0415 - an optional dependency
    except ImportError:
        raise SyncStoreError(
            "the gateway needs the websockets package", hint="install it: pip install 'syncstore[gateway]'"
        ) from None
    return server


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class HmacTokens:
    """The default token check: HMAC-SHA256 over (user, expiry) with a shared ``secret`` (see :func:`gateway_protocol.mint_token`)."""

    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        protocol.mint_token(secret, 0, 0)  # validates the secret (bytes, >= 16 of them)
        self._secret = secret
        self._clock = clock

    def __call__(self, user: int, token: str) -> bool:
        return protocol.check_token(self._secret, user, token, self._clock())


class MembershipTable:
    """An example membership resolver: a fixed table conv -> members (a real one asks the IM server's group service).

    ``resolve(conv, sender)`` returns the members, or None for a conversation it does not know.
    """

    def __init__(self, table: Mapping[int, Iterable[int]]) -> None:
        self._table = {conv: frozenset(members) for conv, members in table.items()}

    def __call__(self, conv: int, sender: int) -> Collection[int] | None:
        return self._table.get(conv)


def _push(cursor: int, m: MessageRecord | StoredMessage) -> str:
    return protocol.encode(Push(cursor, m.msg_id, m.sender, m.conv, m.client_seq, m.ts_ms, m.priority, m.body))


class _Connection:
    """One authenticated client connection: its position and its bounded queue of live pushes."""

    __slots__ = ("ws", "user", "epoch", "cursor", "queue", "wake", "resumed", "stale", "pump")

    def __init__(self, ws: Any, user: int) -> None:
        self.ws = ws
        self.user = user
        self.epoch: int | None = None
        self.cursor = 0  # the last cursor pushed (or the client's, from its resume)
        self.queue: collections.deque[tuple[int, str]] = collections.deque()
        self.wake = asyncio.Event()
        self.resumed = False
        self.stale = False  # the tail skipped changes: catch up with sync
        self.pump: asyncio.Task[None] | None = None


class Gateway:
    """The gateway on an open :class:`AsyncStore`; :meth:`start` it, :meth:`close` it.  See the module docstring.

    ``max_queue``: live pushes held per connection before it is evicted;
    ``page_size``: messages per ``sync`` page while catching up;
    ``auth_timeout``: seconds a new connection has to send ``auth``;
    ``max_recipients``: per ``send``; ``observe(event, user)``: called on
    ``"connected"``, ``"resumed"``, ``"evicted"``, ``"closed"``, ``"refused"``
    and ``"malformed"`` (metrics, tests).
    """

    def __init__(
        self,
        store: AsyncStore,
        *,
        authenticate: Authenticate,
        resolve: Resolve | None = None,
        max_queue: int = 1024,
        page_size: int = 200,
        auth_timeout: float = 10.0,
        max_recipients: int = 1_000,
        max_frame_bytes: int = 2 << 20,
        observe: Callable[[str, int | None], None] | None = None,
    ) -> None:
        if not callable(authenticate):
            raise InvalidArgument("authenticate must be a callable (user, token) -> bool, e.g. HmacTokens(secret)", key="authenticate")
        for name, value, low in (("max_queue", max_queue, 1), ("page_size", page_size, 1), ("max_recipients", max_recipients, 1), ("max_frame_bytes", max_frame_bytes, 1024)):
            if type(value) is not int or value < low:
                raise InvalidArgument(f"{name} must be an int >= {low}, got {value!r}", key=name)
        self.store = store
        self._authenticate = authenticate
        self._resolve = resolve
        self.max_queue = max_queue
        self.page_size = min(page_size, 10_000)
        self.auth_timeout = auth_timeout
        self.max_recipients = max_recipients
        self.max_frame_bytes = max_frame_bytes
        self._observe = observe or (lambda event, user: None)
        self._connections: dict[int, set[_Connection]] = {}
        self._server: Any = None
        self._tail: asyncio.Task[None] | None = None
        self.evictions = 0

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0: any free port); return the port."""
        server = _websockets()
        self._tail = asyncio.ensure_future(self._follow(self.store.lsn))
        self._server = await server.serve(
            self._handle, host, port, max_size=self.max_frame_bytes, close_timeout=2, compression=None, logger=log
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening, close every connection (code 1001), stop the tail.  The store stays open."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._tail is not None:
            self._tail.cancel()
            await asyncio.gather(self._tail, return_exceptions=True)

    @property
    def connections(self) -> int:
        return sum(map(len, self._connections.values()))

    # --- the tail: one reader of the log for every connection ------------------------------------

    async def _follow(self, since: int) -> None:
        while True:
            try:
                async for change in self.store.changes(since, follow=True):
                    since = change.lsn
                    if change.kind == "deliver":
                        self._offer(change.data.message, change.data.cursors)  # type: ignore[union-attr]
                return  # the store closed
            except SnapshotRequired:  # retention overtook the tail (it fell far behind): skip ahead
                since = self.store.lsn
                for connections in self._connections.values():
                    for connection in connections:
                        connection.stale = True  # it catches up with sync
                        connection.wake.set()

    def _offer(self, message: MessageRecord, cursors: Mapping[int, int]) -> None:
        for uid, cursor in cursors.items():
            connections = self._connections.get(uid)
            if not connections:
                continue
            text = None
            for connection in tuple(connections):
                if not connection.resumed or cursor <= connection.cursor:
                    continue
                if len(connection.queue) >= self.max_queue:
                    self._evict(connection)
                    continue
                if text is None:
                    text = _push(cursor, message)
                connection.queue.append((cursor, text))
                connection.wake.set()

    def _evict(self, connection: _Connection) -> None:
        """Too slow to keep up: drop it (its pushes wait in the store; it resumes by cursor)."""
        self._forget(connection)
        self.evictions += 1
        self._observe("evicted", connection.user)
        if connection.pump is not None:
            connection.pump.cancel()
        asyncio.ensure_future(connection.ws.close(CLOSE_EVICTED, "send queue full: reconnect and resume from your cursor"))

    def _forget(self, connection: _Connection) -> None:
        connections = self._connections.get(connection.user)
        if connections is not None:
            connections.discard(connection)
            if not connections:
                del self._connections[connection.user]

    # --- a connection -----------------------------------------------------------------------

    async def _handle(self, ws: Any) -> None:
        connection = None
        try:
            user = await self._accept(ws)
            if user is None:
                return
            connection = _Connection(ws, user)
            self._connections.setdefault(user, set()).add(connection)
            self._observe("connected", user)
            async for text in ws:
                frame = protocol.decode_client(text)
                if type(frame) is Send:
                    await self._send(connection, frame)
                elif type(frame) is Resume and not connection.resumed:
                    await self._resume(connection, frame)
                else:
                    await self._refuse(ws, "protocol", f"{protocol.encode(frame)[:40]}...: auth and resume come once, auth first", CLOSE_REFUSED, user)
                    return
        except ProtocolError as error:
            self._observe("malformed", connection.user if connection else None)
            await self._refuse(ws, "malformed", error.message, CLOSE_MALFORMED, connection.user if connection else None)
        except StoreClosed:
            await ws.close(1001, "the store closed")
        except SyncStoreError as error:  # the store failed (a full disk, a failed fsync): tell, then go
            log.warning("gateway: closing a connection of user %s: %s", connection.user if connection else None, error)
            await self._refuse(ws, "unavailable", str(error), CLOSE_UNAVAILABLE, connection.user if connection else None)
        except ConnectionClosed:  # a dropped connection (or one the gateway closed)
            pass
        finally:
            if connection is not None:
                self._forget(connection)
                if connection.pump is not None:
                    connection.pump.cancel()
                    await asyncio.gather(connection.pump, return_exceptions=True)
                self._observe("closed", connection.user)

    async def _refuse(self, ws: Any, code: str, message: str, close_code: int, user: int | None) -> None:
        try:
            await ws.send(protocol.encode(Error(code, message[: protocol.MAX_TEXT_CHARS])))
            await ws.close(close_code, code)
        except ConnectionClosed:  # already gone
            pass

    async def _accept(self, ws: Any) -> int | None:
        """Read and check ``auth``; answer it; the user, or None (refused and closed)."""
        try:
            text = await asyncio.wait_for(ws.recv(), self.auth_timeout)
        except asyncio.TimeoutError:
            await self._refuse(ws, "auth_timeout", f"send auth within {self.auth_timeout:g} s of connecting", CLOSE_REFUSED, None)
            return None
        frame = protocol.decode_client(text)
        if type(frame) is not Auth:
            await self._refuse(ws, "not_authenticated", "the first frame must be auth", CLOSE_REFUSED, None)
            return None
        if not await _maybe_await(self._authenticate(frame.user, frame.token)):
            self._observe("refused", frame.user)
            await self._refuse(ws, "auth_failed", "the token does not prove this user (or has expired)", CLOSE_REFUSED, frame.user)
            return None
        await ws.send(protocol.encode(Accepted(frame.user, self.store.epoch, await self.store.head(frame.user))))
        return frame.user

    async def _send(self, connection: _Connection, frame: Send) -> None:
        recipients = await self._recipients(connection, frame)
        if recipients is None:
            return
        try:
            delivery = await self.store.deliver(Message(connection.user, frame.conv, frame.client_seq, frame.body, priority=frame.priority), recipients)
        except IdempotencyConflict as error:
            await connection.ws.send(protocol.encode(Error("conflict", error.message, frame.client_seq)))
        except InvalidArgument as error:
            await connection.ws.send(protocol.encode(Error("invalid", error.message, frame.client_seq)))
        else:
            await connection.ws.send(protocol.encode(Ack(frame.client_seq, delivery.msg_id, delivery.duplicate)))

    async def _recipients(self, connection: _Connection, frame: Send) -> list[int] | None:
        """Who gets the message: ``to`` or the conversation's members, plus the sender (its other devices); None if refused."""
        to = frame.to
        if self._resolve is not None:
            members = await _maybe_await(self._resolve(frame.conv, connection.user))
            if members is None or connection.user not in members or (to is not None and not set(to) <= set(members)):
                await connection.ws.send(protocol.encode(Error("not_member", f"user {connection.user} may not send these recipients messages in conv {frame.conv}", frame.client_seq)))
                return None
            to = tuple(members) if to is None else to
        elif to is None:
            await connection.ws.send(protocol.encode(Error("invalid", "send needs 'to': this gateway has no membership resolver", frame.client_seq)))
            return None
        recipients = list(dict.fromkeys((connection.user, *to)))
        if len(recipients) > self.max_recipients:
            await connection.ws.send(protocol.encode(Error("invalid", f"at most {self.max_recipients} recipients per send", frame.client_seq)))
            return None
        return recipients

    async def _resume(self, connection: _Connection, frame: Resume) -> None:
        """Position the connection, join the tail's audience, start its pump (catch-up first)."""
        if frame.msg_id is not None:
            cursor = await self._cursor_of(connection.user, frame.msg_id)
            if cursor is None:  # not (yet) in this store: resync from the start
                await connection.ws.send(protocol.encode(Reset("msg_id", 0, self.store.epoch)))
                cursor = 0
            connection.cursor, connection.epoch = cursor, self.store.epoch
        else:
            connection.cursor, connection.epoch = frame.cursor or 0, frame.epoch
        connection.resumed = True  # from now on the tail offers its deliveries: before the first sync read
        connection.pump = asyncio.ensure_future(self._pump(connection))
        self._observe("resumed", connection.user)

    async def _cursor_of(self, user: int, msg_id: int) -> int | None:
        """The cursor of ``msg_id`` in ``user``'s inbox (None if it is not there): through its conversation's history, newest first."""
        record = await self.store.get(msg_id)
        if record is None:
            return None
        before, seen = None, 0
        while seen < _RESUME_BY_MSG_ID_SCAN:
            page = await self.store.history(user, record.conv, before=before, limit=500)
            for message in page.messages:
                if message.msg_id == msg_id:
                    return message.cursor
            seen += len(page.messages)
            if not page.has_more:
                return None
            before = page.before
        return None

    async def _pump(self, connection: _Connection) -> None:
        """Send pushes in cursor order, each once: catch up with sync, then live pushes; back to sync on any gap."""
        ws, queue = connection.ws, connection.queue
        try:
            await self._catch_up(connection)
            while True:
                if connection.stale:
                    connection.stale = False
                    await self._catch_up(connection)
                    continue
                if not queue:
                    connection.wake.clear()
                    await connection.wake.wait()
                    continue
                cursor, text = queue.popleft()
                if cursor <= connection.cursor:
                    continue  # sent by a catch-up already
                if cursor != connection.cursor + 1:
                    await self._catch_up(connection)  # a gap: fetch it from the store
                    continue
                await ws.send(text)
                connection.cursor = cursor
        except (ConnectionClosed, StoreClosed):  # the connection went away, or the store closed: the handler cleans up
            pass
        except SyncStoreError as error:
            log.warning("gateway: pushes to user %d stopped: %s", connection.user, error)
            await self._refuse(ws, "unavailable", str(error), CLOSE_UNAVAILABLE, connection.user)

    async def _catch_up(self, connection: _Connection) -> None:
        ws = connection.ws
        while True:
            page = await self.store.sync(connection.user, since=connection.cursor, limit=self.page_size, epoch=connection.epoch)
            connection.epoch = page.epoch
            if page.reset:
                await ws.send(protocol.encode(Reset(page.reset_reason or "ahead", page.next, page.epoch)))
                connection.cursor = page.next
                continue
            for message in page.messages:
                await ws.send(_push(message.cursor, message))
                connection.cursor = message.cursor
            if not page.has_more:
                return


async def serve(store: AsyncStore, host: str = "127.0.0.1", port: int = 0, **options: Any) -> tuple[Gateway, int]:
    """Start a :class:`Gateway` on ``store`` (``options``: its keyword arguments); return it and the port it listens on."""
    gateway = Gateway(store, **options)
    return gateway, await gateway.start(host, port)
