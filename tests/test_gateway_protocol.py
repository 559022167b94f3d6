"""gateway_protocol: the frame codec (round trips, and rejection of every malformed field) and the HMAC tokens."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncstore.gateway_protocol import (
    Accepted,
    Ack,
    Auth,
    Error,
    ProtocolError,
    Push,
    Reset,
    Resume,
    Send,
    check_token,
    decode_client,
    decode_server,
    encode,
    mint_token,
)

u64 = st.integers(0, 2**64 - 1)
u8 = st.integers(0, 255)
bodies = st.binary(max_size=64) | st.text(max_size=32).map(lambda t: t.encode("utf-8"))

client_frames = st.one_of(
    st.builds(Auth, u64, st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=80)),
    st.builds(Resume, st.none() | u64, u64, st.none()),
    st.builds(Resume, st.none(), st.none(), u64),
    st.builds(Send, u64, u64, bodies, st.none() | st.lists(u64, min_size=1, max_size=5).map(tuple), u8),
)
server_frames = st.one_of(
    st.builds(Accepted, u64, u64, u64),
    st.builds(Ack, u64, u64, st.booleans()),
    st.builds(Push, u64, u64, u64, u64, u64, u64, u8, bodies),
    st.builds(Reset, st.sampled_from(["epoch", "ahead", "purged", "msg_id"]), u64, u64),
    st.builds(Error, st.text(max_size=20), st.text(max_size=100), st.none() | u64),
)


@given(client_frames)
def test_client_frames_round_trip(frame):
    text = encode(frame)
    assert json.loads(text)["type"] in ("auth", "resume", "send")
    assert decode_client(text) == frame


@given(server_frames)
def test_server_frames_round_trip(frame):
    assert decode_server(encode(frame)) == frame


#: Values of the wrong kind for an id field: an identity "decoder" would accept them all.
NOT_IDS = [-1, 2**64, 1.0, True, "1", None, [1], {"a": 1}]


@settings(max_examples=60)
@given(client_frames, st.data())
def test_every_field_of_the_wrong_kind_is_refused(frame, data):
    document = json.loads(encode(frame))
    ids = [name for name, value in document.items() if type(value) is int and name not in ("priority",)]
    if not ids:
        return
    name = data.draw(st.sampled_from(ids))
    bad = data.draw(st.sampled_from(NOT_IDS if not (document["type"] == "resume" and name == "epoch") else [v for v in NOT_IDS if v is not None]))
    document[name] = bad
    with pytest.raises(ProtocolError) as refused:
        decode_client(json.dumps(document))
    assert refused.value.key == name


@pytest.mark.parametrize(
    "text",
    [
        "",
        "null",
        "[]",
        '"auth"',
        '{"user": 1, "token": "t"}',
        '{"type": "auth", "user": 1}',
        '{"type": "auth", "user": 1, "token": ""}',
        '{"type": "auth", "user": 1, "token": "t", "admin": true}',
        '{"type": "auth", "user": NaN, "token": "t"}',
        '{"type": "push", "cursor": 1}',  # a server frame from a client
        '{"type": "resume", "epoch": 1}',
        '{"type": "resume", "cursor": 1, "msg_id": 2}',
        '{"type": "resume", "epoch": 1, "msg_id": 2}',
        '{"type": "send", "conv": 1, "client_seq": 1, "body": "x", "to": []}',
        '{"type": "send", "conv": 1, "client_seq": 1, "body": "x", "to": [1, -2]}',
        '{"type": "send", "conv": 1, "client_seq": 1, "body": "x", "priority": 256}',
        '{"type": "send", "conv": 1, "client_seq": 1, "body": "x", "body_encoding": "latin-1"}',
        '{"type": "send", "conv": 1, "client_seq": 1, "body": "\\ud800"}',
        '{"type": "send", "conv": 1, "client_seq": 1, "body": 5}',
    ],
)
def test_malformed_client_frames(text):
    with pytest.raises(ProtocolError):
        decode_client(text)


def test_binary_frames_are_refused():
    with pytest.raises(ProtocolError, match="binary"):
        decode_client(b'{"type": "auth", "user": 1, "token": "t"}')


def test_bodies_travel_as_text_or_base64():
    assert json.loads(encode(Send(1, 1, "héllo".encode())))["body"] == "héllo"
    binary = json.loads(encode(Push(1, 2, 3, 4, 5, 6, 0, b"\xff\x00")))
    assert (binary["body"], binary["body_encoding"]) == ("/wA=", "base64")


SECRET = b"0123456789abcdef0123456789abcdef"


@given(u64, u64, st.integers(0, 2**40))
def test_tokens_prove_their_user_only_until_they_expire(user, other, expires):
    token = mint_token(SECRET, user, expires)
    assert check_token(SECRET, user, token, now=expires)
    assert not check_token(SECRET, user, token, now=expires + 1)
    assert check_token(SECRET, other, token, now=0) == (other == user)
    assert not check_token(SECRET[::-1], user, token, now=0)


@given(u64, st.integers(0, 2**40), st.data())
def test_any_changed_character_breaks_a_token(user, expires, data):
    token = mint_token(SECRET, user, expires)
    index = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.sampled_from("0123456789abcdefXYZ._-"))
    tampered = token[:index] + replacement + token[index + 1 :]
    if tampered != token:
        assert not check_token(SECRET, user, tampered, now=0)


def test_token_checks_refuse_garbage_and_short_secrets():
    for garbage in ("", "v1", "v1..", "v2.1.abc", "v1.01." + mint_token(SECRET, 1, 1).split(".")[2], "v1.x.abc", "v1.1.abc.def", "v1.1." + "A" * 300, "v1.1.ü"):
        assert not check_token(SECRET, 1, garbage, now=0)
    with pytest.raises(ValueError):
        mint_token(b"short", 1, 1)
