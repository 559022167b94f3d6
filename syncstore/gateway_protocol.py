"""The IM gateway's wire protocol (version 1): JSON text frames, pure -- values in, values out, no I/O.

Every frame is one WebSocket *text* frame holding one JSON object with a
``type``.  docs/gateway.md is the reference; the tables below are the
protocol as data (h11's style): each frame type's fields, their kinds and
whether they are required.  A frame that is not valid JSON, not an object,
of an unknown type, missing a required field, carrying an unknown field or
a field of the wrong kind (ids are JSON integers 0..2**64-1; ``true`` is not
an integer) raises :class:`ProtocolError`, and the gateway closes that
connection (only).

Client -> gateway::

    {"type": "auth", "user": U, "token": "v1...."}                  first frame, once
    {"type": "resume", "epoch": E|null, "cursor": C}                  once; pushes start after it
    {"type": "resume", "msg_id": M}                                   (coming from another datacenter)
    {"type": "send", "conv": C, "client_seq": S, "body": "...",
     "body_encoding": "utf-8"|"base64", "to": [U, ...], "priority": P}   body_encoding, to, priority optional

Gateway -> client::

    {"type": "auth", "user": U, "epoch": E, "head": H}                authenticated
    {"type": "ack", "client_seq": S, "msg_id": M, "duplicate": false}  the send is durable
    {"type": "push", "cursor": C, "msg_id": M, "sender": U, "conv": C, "client_seq": S,
     "ts_ms": T, "priority": P, "body": "...", "body_encoding": "utf-8"|"base64"}
    {"type": "reset", "reason": "epoch"|"ahead"|"purged"|"msg_id", "next": N, "epoch": E}
    {"type": "error", "code": "...", "message": "...", "client_seq": S|null}

Bodies are bytes in the store: ``body`` is their UTF-8 text when
``body_encoding`` is ``"utf-8"`` (the default), else base64.

**Tokens** (the default authentication): ``v1.<expires>.<mac>``, where
``expires`` is a Unix time in seconds and ``mac`` the unpadded URL-safe
base64 of HMAC-SHA256(secret, ``b"syncstore-gateway-v1\\0<user>\\0<expires>"``).
:func:`mint_token` makes one (the IM server's login service holds the same
secret); :func:`check_token` compares in constant time
(:func:`hmac.compare_digest`) and refuses expired tokens.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Union

from .errors import InvalidArgument

__all__ = [
    "PROTOCOL_VERSION",
    "ProtocolError",
    "Auth",
    "Resume",
    "Send",
    "Accepted",
    "Ack",
    "Push",
    "Reset",
    "Error",
    "ClientFrame",
    "ServerFrame",
    "decode_client",
    "decode_server",
    "encode",
    "mint_token",
    "check_token",
    "MAX_TOKEN_CHARS",
]

PROTOCOL_VERSION = 1
MAX_U64 = 2**64 - 1
MAX_TOKEN_CHARS = 256
MAX_TEXT_CHARS = 1024  # error messages and reason strings
_TOKEN_CONTEXT = b"syncstore-gateway-v1"


class ProtocolError(InvalidArgument):
    """A frame that breaks the protocol (docs/gateway.md): the gateway answers ``error`` ``"malformed"`` and closes the connection."""


# --- frames ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Auth:
    """Client: who I am.  The first frame of a connection."""

    user: int
    token: str


@dataclass(frozen=True, slots=True)
class Resume:
    """Client: where I am -- ``(epoch, cursor)`` from my last push or reset, or the last ``msg_id`` I hold."""

    epoch: int | None = None
    cursor: int | None = None
    msg_id: int | None = None


@dataclass(frozen=True, slots=True)
class Send:
    """Client: deliver ``body`` in ``conv``; ``(me, client_seq)`` is the idempotency key (retry with the same one)."""

    conv: int
    client_seq: int
    body: bytes
    to: tuple[int, ...] | None = None
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Accepted:
    """Gateway: authenticated as ``user``; the store's ``epoch`` and the user's ``head`` cursor."""

    user: int
    epoch: int
    head: int


@dataclass(frozen=True, slots=True)
class Ack:
    """Gateway: the send with ``client_seq`` is durable as ``msg_id`` (``duplicate``: it was already)."""

    client_seq: int
    msg_id: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Push:
    """Gateway: a message in the user's inbox at ``cursor`` (pushes come in cursor order, each once)."""

    cursor: int
    msg_id: int
    sender: int
    conv: int
    client_seq: int
    ts_ms: int
    priority: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Reset:
    """Gateway: the client's position is not in this store's history; drop what you hold and continue from ``next``."""

    reason: str
    next: int
    epoch: int


@dataclass(frozen=True, slots=True)
class Error:
    """Gateway: something went wrong; ``client_seq`` names the send it concerns, if any."""

    code: str
    message: str
    client_seq: int | None = None


ClientFrame = Union[Auth, Resume, Send]
ServerFrame = Union[Accepted, Ack, Push, Reset, Error]
Frame = Union[ClientFrame, ServerFrame]

# --- field kinds: (check(value) -> the field's value or raise) -------------------------------------


def _u64(value: object) -> int:
    if type(value) is not int or not 0 <= value <= MAX_U64:
        raise ValueError("an integer 0..2**64-1")
    return value


def _u8(value: object) -> int:
    if type(value) is not int or not 0 <= value <= 255:
        raise ValueError("an integer 0..255")
    return value


def _bool(value: object) -> bool:
    if type(value) is not bool:
        raise ValueError("true or false")
    return value


def _text(limit: int) -> Callable[[object], str]:
    def check(value: object) -> str:
        if type(value) is not str or len(value) > limit:
            raise ValueError(f"a string of at most {limit} characters")
        return value

    return check


def _token(value: object) -> str:
    if type(value) is not str or not 0 < len(value) <= MAX_TOKEN_CHARS or not value.isascii():
        raise ValueError(f"an ASCII string of 1..{MAX_TOKEN_CHARS} characters")
    return value


def _recipients(value: object) -> tuple[int, ...]:
    if type(value) is not list or not value:
        raise ValueError("a non-empty list of user ids")
    return tuple(_u64(uid) for uid in value)


def _optional(check: Callable[[object], Any]) -> Callable[[object], Any]:
    return lambda value: None if value is None else check(value)


_REASONS = ("epoch", "ahead", "purged", "msg_id")


def _reason(value: object) -> str:
    if value not in _REASONS:
        raise ValueError(f"one of {', '.join(_REASONS)}")
    return value  # type: ignore[return-value]


#: Per frame type: the class and its fields -> (check, required).  ``body`` is handled with ``body_encoding``.
_Fields = Mapping[str, tuple[Callable[[object], Any], bool]]
_CLIENT: Mapping[str, tuple[type, _Fields]] = {
    "auth": (Auth, {"user": (_u64, True), "token": (_token, True)}),
    "resume": (Resume, {"epoch": (_optional(_u64), False), "cursor": (_u64, False), "msg_id": (_u64, False)}),
    "send": (Send, {"conv": (_u64, True), "client_seq": (_u64, True), "body": (_text(1 << 30), True), "to": (_recipients, False), "priority": (_u8, False)}),
}
_SERVER: Mapping[str, tuple[type, _Fields]] = {
    "auth": (Accepted, {"user": (_u64, True), "epoch": (_u64, True), "head": (_u64, True)}),
    "ack": (Ack, {"client_seq": (_u64, True), "msg_id": (_u64, True), "duplicate": (_bool, True)}),
    "push": (
        Push,
        {name: (_u64, True) for name in ("cursor", "msg_id", "sender", "conv", "client_seq", "ts_ms")} | {"priority": (_u8, True), "body": (_text(1 << 30), True)},
    ),
    "reset": (Reset, {"reason": (_reason, True), "next": (_u64, True), "epoch": (_u64, True)}),
    "error": (Error, {"code": (_text(64), True), "message": (_text(MAX_TEXT_CHARS), True), "client_seq": (_optional(_u64), False)}),
}
_TYPE_OF: dict[type, str] = {cls: name for table in (_CLIENT, _SERVER) for name, (cls, _f) in table.items()}
_BODY_ENCODINGS = ("utf-8", "base64")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _decode(text: object, table: Mapping[str, tuple[type, _Fields]]) -> Any:
    if type(text) is not str:
        raise ProtocolError("frames are WebSocket text frames holding JSON, got a binary frame", key="frame")
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except ValueError as error:
        raise ProtocolError(f"the frame is not JSON: {error}", key="frame") from None
    if type(document) is not dict:
        raise ProtocolError(f"a frame is a JSON object, got {type(document).__name__}", key="frame")
    kind = document.pop("type", None)
    if kind not in table:
        raise ProtocolError(f"unknown frame type {kind!r}: expected one of {', '.join(table)}", key="type")
    cls, spec = table[kind]
    encoding = document.pop("body_encoding", "utf-8") if "body" in spec else None
    unknown = sorted(set(document) - set(spec))
    if unknown:
        raise ProtocolError(f"{kind} frame has unknown field(s) {', '.join(unknown)}", key=unknown[0])
    values: dict[str, Any] = {}
    for name, (check, required) in spec.items():
        if name not in document:
            if required:
                raise ProtocolError(f"{kind} frame lacks its {name!r} field", key=name)
            continue
        try:
            values[name] = check(document[name])
        except ValueError as error:
            raise ProtocolError(f"{kind}.{name} must be {error}, got {document[name]!r:.80}", key=name) from None
    if "body" in values:
        values["body"] = _body_bytes(values["body"], encoding)
    frame = cls(**values)
    if type(frame) is Resume and (frame.msg_id is None) == (frame.cursor is None):
        raise ProtocolError("resume takes either cursor (with epoch) or msg_id", key="cursor")
    if type(frame) is Resume and frame.msg_id is not None and frame.epoch is not None:
        raise ProtocolError("resume by msg_id takes no epoch", key="epoch")
    return frame


def _body_bytes(body: str, encoding: object) -> bytes:
    if encoding == "utf-8":
        return _utf8(body)
    if encoding == "base64":
        try:
            return base64.b64decode(body.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ProtocolError("body is not valid base64", key="body") from None
    raise ProtocolError(f"body_encoding must be one of {', '.join(_BODY_ENCODINGS)}, got {encoding!r:.40}", key="body_encoding")


def _utf8(body: str) -> bytes:
    try:
        return body.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON allows "\\ud800")
        raise ProtocolError("body is not valid Unicode text: send it base64-encoded", key="body") from None


def decode_client(text: object) -> ClientFrame:
    """A client's frame (the gateway's side); raises :class:`ProtocolError`."""
    return _decode(text, _CLIENT)  # type: ignore[no-any-return]


def decode_server(text: object) -> ServerFrame:
    """A gateway's frame (a client's side); raises :class:`ProtocolError`."""
    return _decode(text, _SERVER)  # type: ignore[no-any-return]


def encode(frame: Frame) -> str:
    """Any frame as its JSON text (optional client fields left out when unset)."""
    kind = _TYPE_OF[type(frame)]
    document: dict[str, Any] = {"type": kind}
    for field in fields(frame):  # type: ignore[arg-type]
        value = getattr(frame, field.name)
        if field.name == "body":
            try:
                document["body"], document["body_encoding"] = value.decode("utf-8"), "utf-8"
            except UnicodeDecodeError:
                document["body"], document["body_encoding"] = base64.b64encode(value).decode("ascii"), "base64"
        elif type(frame) is Resume or (type(frame) is Send and field.name in ("to", "priority")):
            if value is not None and not (field.name == "priority" and value == 0):
                document[field.name] = list(value) if field.name == "to" else value
        else:
            document[field.name] = value
    if type(frame) is Resume and frame.cursor is not None:
        document["epoch"] = frame.epoch  # always named with a cursor: null says "no epoch yet"
    return json.dumps(document, separators=(",", ":"))


# --- tokens ---------------------------------------------------------------------------------------


def _mac(secret: bytes, user: int, expires_at: int) -> str:
    digest = hmac.new(secret, b"%s\0%d\0%d" % (_TOKEN_CONTEXT, user, expires_at), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def mint_token(secret: bytes, user: int, expires_at: int) -> str:
    """A token proving ``user`` until ``expires_at`` (Unix seconds) to a gateway holding ``secret``."""
    if type(secret) is not bytes or len(secret) < 16:
        raise InvalidArgument("the secret must be bytes, at least 16 of them (32 random bytes recommended)", key="secret")
    _u64(user), _u64(expires_at)
    return f"v1.{expires_at}.{_mac(secret, user, expires_at)}"


def check_token(secret: bytes, user: int, token: str, now: float) -> bool:
    """Whether ``token`` proves ``user`` at time ``now`` (Unix seconds); constant-time comparison of the MAC."""
    parts = token.split(".") if type(token) is str and len(token) <= MAX_TOKEN_CHARS else []
    if len(parts) != 3 or parts[0] != "v1" or not parts[1].isdigit() or len(parts[1]) > 20 or str(int(parts[1])) != parts[1]:
        return False  # the expiry in canonical digits only: one token per (user, expiry)
    expires_at = int(parts[1])
    if expires_at > MAX_U64 or expires_at < now:
        return False
    return hmac.compare_digest(parts[2].encode("ascii", "replace"), _mac(secret, user, expires_at).encode("ascii"))
