"""``syncstore gateway`` and ``syncstore gateway-token``: a real gateway process, a client through it, a clean stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("websockets")

from syncstore.cli import main
from syncstore.gateway_client import GatewayClient, GatewayError
from syncstore.gateway_protocol import check_token

SECRET = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0IQ=="


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "gateway.secret"
    path.write_text(SECRET + "\n")
    return str(path)


def test_gateway_token_mints_a_checkable_token(secret_file, capsys):
    assert main(["gateway-token", "--secret-file", secret_file, "--user", "42", "--ttl", "60"]) == 0
    token = capsys.readouterr().out.strip()
    assert check_token(SECRET.encode(), 42, token, now=time.time())
    assert not check_token(SECRET.encode(), 43, token, now=time.time())


def test_no_secret_no_gateway(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SYNCSTORE_GATEWAY_SECRET", raising=False)
    assert main(["gateway", "--path", str(tmp_path / "s"), "--port", "0"]) == 1
    assert "shared secret" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s")  # refused before opening anything
    short = tmp_path / "short"
    short.write_text("tiny")
    assert main(["gateway-token", "--secret-file", str(short), "--user", "1"]) == 1


def test_gateway_process_serves_clients_and_stops_on_sigterm(tmp_path, secret_file, capsys):
    store = str(tmp_path / "store")
    process = subprocess.Popen(
        [sys.executable, "-m", "syncstore.cli", "gateway", "--path", store, "--port", "0", "--secret-file", secret_file],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()  # the process says where it listens before serving
        assert "listening on ws://127.0.0.1:" in line, (line, process.stderr.read() if process.poll() is not None else "")
        url = line.split("listening on ")[1].split()[0]
        assert main(["gateway-token", "--secret-file", secret_file, "--user", "7"]) == 0
        token = capsys.readouterr().out.strip()

        async def talk():
            alice = GatewayClient(url, 7, token)
            await alice.connect()
            ack = await alice.send(1, 1, "hello".encode(), [8])
            arrived = asyncio.Event()
            alice.on_push = lambda _push: arrived.set()
            if not alice.messages:
                await arrived.wait()
            assert [m.msg_id for m in alice.messages] == [ack.msg_id]
            await alice.close()
            with pytest.raises(GatewayError):
                await GatewayClient(url, 8, token).connect()  # alice's token does not open bob's inbox

        asyncio.run(asyncio.wait_for(talk(), 60))
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert "stopped" in out
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
