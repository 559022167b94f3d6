"""A minimal reference client of the IM gateway (docs/gateway.md): the demo, the tests and the benchmarks use it.

It keeps what a real client keeps -- ``(epoch, cursor)`` of the last push it
processed -- resumes from it on every (re)connect, applies ``reset`` frames
(drops what it holds, continues from ``next``) and checks the gateway's
promise on every push: cursors arrive in order, each exactly once (any other
push is recorded in :attr:`GatewayClient.violations`).  Sends wait for their
``ack``; a connection lost before the ack fails the send with
:class:`GatewayError`, and the caller retries with the same ``client_seq``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from . import gateway_protocol as protocol
from .errors import SyncStoreError
from .gateway_protocol import Accepted, Ack, Auth, Error, Push, Reset, Resume, Send

__all__ = ["GatewayClient", "GatewayError"]


class GatewayError(SyncStoreError):
    """The gateway answered a frame with ``error`` (``code`` says which), refused the connection, or the connection dropped."""

    def __init__(self, message: str, *, code: str, **context: Any) -> None:
        super().__init__(message, **context)
        self.code = code


class GatewayClient:
    """One user's client: ``await client.connect()``, ``await client.send(...)``; pushes land in :attr:`messages`."""

    def __init__(self, url: str, user: int, token: str, *, on_push: Callable[[Push], None] | None = None) -> None:
        self.url = url
        self.user = user
        self.token = token
        self.on_push = on_push
        self.epoch: int | None = None  # the epoch the cursor belongs to (None until the first push or auth)
        self.cursor = 0  # the last push processed
        self.messages: list[Push] = []  # every push processed since the last reset, in cursor order
        self.resets: list[Reset] = []
        self.violations: list[str] = []  # pushes out of order or repeated: the gateway broke its promise
        self.errors: list[Error] = []  # error frames not about a send (the reason for a close)
        self.close_code: int | None = None  # of the last connection, once it ended
        self.disconnected = asyncio.Event()
        self._ws: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._acks: dict[int, asyncio.Future[Ack]] = {}
        self._target: tuple[int, asyncio.Event] | None = None  # holding(): the count awaited
        self._reading = asyncio.Event()  # cleared by pause(): frames then wait in the socket (a slow reader)
        self._reading.set()

    async def connect(self, *, resume: bool = True, **options: Any) -> Accepted:
        """Open a connection, authenticate, and (``resume``) resume from the client's position.  ``options`` go to websockets' ``connect``."""
        from websockets.asyncio.client import connect  # noqa: PLC0415 - an optional dependency

        ws = await connect(self.url, compression=None, open_timeout=None, **options)
        await ws.send(protocol.encode(Auth(self.user, self.token)))
        frame = protocol.decode_server(await ws.recv())
        if type(frame) is not Accepted:
            code = frame.code if type(frame) is Error else "protocol"
            await ws.close()
            raise GatewayError(f"the gateway refused user {self.user}: {frame}", code=code)
        if self.epoch is None and self.cursor == 0:
            self.epoch = frame.epoch
        self._ws = ws
        self.close_code = None
        self.disconnected = asyncio.Event()
        if resume:
            await self.resume()
        self._reader = asyncio.ensure_future(self._read(ws))
        return frame

    async def resume(self, msg_id: int | None = None) -> None:
        """Send ``resume`` from ``(epoch, cursor)``, or from a ``msg_id`` (coming from another datacenter)."""
        frame = Resume(msg_id=msg_id) if msg_id is not None else Resume(self.epoch, self.cursor)
        await self._ws.send(protocol.encode(frame))

    async def send(self, conv: int, client_seq: int, body: bytes, to: list[int] | None = None) -> Ack:
        """Send a message and wait for its ``ack``; raises :class:`GatewayError` on an ``error`` answer or a lost connection."""
        future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._acks[client_seq] = future
        try:
            await self._ws.send(protocol.encode(Send(conv, client_seq, body, None if to is None else tuple(to))))
        except Exception as error:
            self._acks.pop(client_seq, None)
            raise GatewayError(f"the connection is gone: {error!r}", code="disconnected") from error
        return await future

    async def ensure_connected(self, **options: Any) -> None:
        """Connect (and resume from the client's position) unless the current connection is up."""
        if self._ws is None or self.disconnected.is_set():
            await self.connect(**options)

    async def send_reliably(self, conv: int, client_seq: int, body: bytes, to: list[int] | None = None) -> Ack:
        """:meth:`send` until acknowledged, reconnecting whenever the connection drops -- always with the same ``client_seq``.

        What a client does with an unacknowledged send: the idempotency key
        makes the retry safe (a delivery that did land comes back ``duplicate``).
        """
        while True:
            await self.ensure_connected()
            try:
                return await self.send(conv, client_seq, body, to)
            except GatewayError as error:
                if error.code != "disconnected":
                    raise

    async def holding(self, count: int) -> None:
        """Wait until the client holds ``count`` messages, reconnecting (and resuming) whenever its connection ends."""
        while len(self.messages) < count:
            await self.ensure_connected()
            reached = asyncio.Event()
            self._target = (count, reached)
            if len(self.messages) >= count:
                break
            waits = [asyncio.ensure_future(reached.wait()), asyncio.ensure_future(self.disconnected.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waits:
                    task.cancel()
        self._target = None

    async def send_raw(self, text: str) -> None:
        """Send any text frame (tests of malformed frames)."""
        await self._ws.send(text)

    async def close(self) -> None:
        """Close the connection cleanly and wait until it has ended."""
        if self._ws is not None:
            await self._ws.close()
        await self.disconnected.wait()

    def pause(self) -> None:
        """Stop reading frames (they pile up in the socket, as with a client on a slow link) until :meth:`unpause`."""
        self._reading.clear()

    def unpause(self) -> None:
        self._reading.set()

    def abort(self) -> None:
        """Drop the connection abruptly (no close handshake), as a phone losing its network does."""
        self._ws.transport.abort()

    async def _read(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed  # noqa: PLC0415

        try:
            while True:
                await self._reading.wait()
                self._take(protocol.decode_server(await ws.recv()))
        except ConnectionClosed:
            pass
        finally:
            self.close_code = ws.close_code
            for future in self._acks.values():
                if not future.done():
                    future.set_exception(GatewayError("the connection dropped before the ack", code="disconnected"))
            self._acks.clear()
            self.disconnected.set()

    def _take(self, frame: Any) -> None:
        if type(frame) is Push:
            if frame.cursor != self.cursor + 1:
                self.violations.append(f"user {self.user}: push of cursor {frame.cursor} after {self.cursor}")
                return
            self.cursor = frame.cursor
            self.messages.append(frame)
            if self.on_push is not None:
                self.on_push(frame)
            if self._target is not None and len(self.messages) >= self._target[0]:
                self._target[1].set()
        elif type(frame) is Ack:
            future = self._acks.pop(frame.client_seq, None)
            if future is not None and not future.done():
                future.set_result(frame)
        elif type(frame) is Reset:
            self.resets.append(frame)
            self.messages.clear()
            self.cursor, self.epoch = frame.next, frame.epoch
        elif type(frame) is Error:
            future = self._acks.pop(frame.client_seq, None) if frame.client_seq is not None else None
            error = GatewayError(f"the gateway answered {frame.code}: {frame.message}", code=frame.code)
            if future is not None and not future.done():
                future.set_exception(error)
            else:
                self.errors.append(frame)
