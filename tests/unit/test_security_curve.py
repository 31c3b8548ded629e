"""CURVE keys, the ZAP allow-list on real 127.0.0.1 sockets, the plaintext warning and `meshsl keys`."""
from __future__ import annotations

import asyncio
import logging
import stat
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from typer.testing import CliRunner

from meshsl.cli.keys import app
from meshsl.errors import AuthError, ConfigError
from meshsl.security.curve import (
    HandshakeMonitor,
    configure_client,
    configure_server,
    is_loopback,
    start_authenticator,
    warn_if_plaintext_exposed,
)
from meshsl.security.keys import KeyRing, generate_keys, load_key_pair, load_public_key

DEADLINE_S = 3.0
REFUSAL_WAIT_S = 0.5


# ---------------------------------------------------------------- key files


def test_generate_keys_writes_private_secret_and_round_trips(tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "keys", ["server", "client_a"])
    assert set(keys) == {"server", "client_a"}
    for node, public in keys.items():
        assert (tmp_path / "keys" / f"{node}.key").is_file()
        secret_file = tmp_path / "keys" / f"{node}.key_secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        assert load_public_key(tmp_path / "keys", node) == public.encode()
        pub, sec = load_key_pair(tmp_path / "keys", node)
        assert pub == public.encode() and len(sec) == 40
        # The public file must not carry the secret.
        assert "secret-key" not in (tmp_path / "keys" / f"{node}.key").read_text()


def test_generate_keys_refuses_overwrite_unless_asked(tmp_path: Path) -> None:
    first = generate_keys(tmp_path, ["a", "b"])
    with pytest.raises(ConfigError, match=r"a\.key"):
        generate_keys(tmp_path, ["a"])
    assert load_public_key(tmp_path, "a") == first["a"].encode()
    second = generate_keys(tmp_path, ["a"], overwrite=True)
    assert second["a"] != first["a"]
    assert load_public_key(tmp_path, "a") == second["a"].encode()


def test_generate_keys_rejects_path_like_node_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        generate_keys(tmp_path, ["../evil"])


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(AuthError, match=r"ghost\.key"):
        load_public_key(tmp_path, "ghost")
    (tmp_path / "bad.key_secret").write_text("curve\n    public-key = \"short\"\n")
    with pytest.raises(AuthError, match=r"bad\.key_secret"):
        load_key_pair(tmp_path, "bad")


def test_keyring_maps_keys_to_nodes(tmp_path: Path) -> None:
    keys = generate_keys(tmp_path, ["server", "client_a", "client_b"])
    ring = KeyRing.from_directory(tmp_path, "server", ["server", "client_a", "client_b"])
    assert set(ring.peers) == {"client_a", "client_b"}
    assert ring.node_for_key(keys["client_a"]) == "client_a"
    assert ring.node_for_key(keys["server"].encode()) == "server"
    assert ring.node_for_key(b"x" * 40) is None
    assert "secret_key" not in repr(ring)

    inline = KeyRing.from_public_keys("server", keys, tmp_path / "server.key_secret")
    assert inline.peers == ring.peers
    wrong = dict(keys, server=keys["client_a"])
    with pytest.raises(AuthError):
        KeyRing.from_public_keys("server", wrong, tmp_path / "server.key_secret")


# ---------------------------------------------------------------- live CURVE handshake


@pytest.fixture
def ctx():
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def rings(tmp_path: Path) -> dict[str, KeyRing]:
    generate_keys(tmp_path, ["server", "client_a", "stranger"])
    allowed = ["server", "client_a"]  # "stranger" has valid keys but is not in the topology
    return {
        "server": KeyRing.from_directory(tmp_path, "server", allowed),
        "client_a": KeyRing.from_directory(tmp_path, "client_a", allowed),
        # The stranger knows the server's public key, just isn't on its allow-list.
        "stranger": KeyRing.from_directory(tmp_path, "stranger", ["server", "stranger"]),
    }


async def _recv_within(sock: zmq.asyncio.Socket, timeout_s: float) -> list[zmq.Frame] | None:
    if await sock.poll(timeout=int(timeout_s * 1000), flags=zmq.POLLIN):
        return await sock.recv_multipart(copy=False)
    return None


async def _wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


@pytest.fixture
async def server(ctx, rings):
    refused: list[str] = []
    auth = await start_authenticator(ctx, rings["server"], on_refused=refused.append)
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    configure_server(router, rings["server"])
    port = router.bind_to_random_port("tcp://127.0.0.1")
    monitor = HandshakeMonitor(router)
    sockets: list[zmq.asyncio.Socket] = []

    def dealer(name: str) -> zmq.asyncio.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.routing_id = name.encode()
        sockets.append(sock)
        return sock

    yield {
        "router": router,
        "endpoint": f"tcp://127.0.0.1:{port}",
        "auth": auth,
        "refused": refused,
        "monitor": monitor,
        "dealer": dealer,
    }
    await monitor.stop()
    for sock in sockets:
        sock.close(linger=0)
    router.close(linger=0)
    auth.stop()


async def test_allowed_peer_is_received_with_its_node_name(server, rings) -> None:
    client = server["dealer"]("client_a")
    configure_client(client, rings["client_a"], "server")
    client.connect(server["endpoint"])
    await client.send_multipart([b"header", b"tensor"])

    frames = await _recv_within(server["router"], DEADLINE_S)
    assert frames is not None, "allowed peer was not received"
    assert [f.bytes for f in frames] == [b"client_a", b"header", b"tensor"]
    # The authenticated identity, independent of the routing id the peer chose.
    assert frames[1].get("User-Id") == "client_a"
    assert server["refused"] == []


async def test_spoofed_routing_id_still_carries_true_user_id(server, rings) -> None:
    # client_a claims to be "server" in its routing id; User-Id tells the truth.
    client = server["dealer"]("server")
    configure_client(client, rings["client_a"], "server")
    client.connect(server["endpoint"])
    await client.send_multipart([b"header"])
    frames = await _recv_within(server["router"], DEADLINE_S)
    assert frames is not None
    assert frames[0].bytes == b"server"
    assert frames[1].get("User-Id") == "client_a"


async def test_unknown_key_is_refused_and_counted(server, rings) -> None:
    client = server["dealer"]("stranger")
    configure_client(client, rings["stranger"], "server")
    client.connect(server["endpoint"])
    # A DEALER queues until the handshake completes, so a refused send never arrives.
    await client.send_multipart([b"header"])

    assert await _wait_until(lambda: server["refused"], DEADLINE_S), "refusal callback did not fire"
    assert server["refused"][0] == "unknown_key"
    assert server["auth"].refusals["unknown_key"] >= 1
    assert await _wait_until(lambda: server["monitor"].failures["auth"] >= 1, DEADLINE_S)
    assert await _recv_within(server["router"], REFUSAL_WAIT_S) is None


async def test_plaintext_client_is_refused(server) -> None:
    client = server["dealer"]("plain")
    client.connect(server["endpoint"])
    await client.send_multipart([b"header"])

    assert await _wait_until(lambda: server["monitor"].failures["protocol"] >= 1, DEADLINE_S), "no failure seen"
    assert await _recv_within(server["router"], REFUSAL_WAIT_S) is None
    # libzmq rejects a NULL client before ZAP, so only the monitor sees it.
    assert server["refused"] == []


# ---------------------------------------------------------------- plaintext exposure warning


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.3.2.1:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("ipc:///tmp/meshsl.sock", True),
        ("inproc://x", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://10.0.0.5:5555", False),
        ("tcp://node1.example:5555", False),
        ("ws://127.0.0.1:5555", False),
    ],
)
def test_is_loopback(endpoint: str, local: bool) -> None:
    assert is_loopback(endpoint) is local


def test_plaintext_warning_only_for_exposed_endpoints(caplog) -> None:
    logger = logging.getLogger("meshsl.test.security")
    with caplog.at_level(logging.WARNING, logger="meshsl.test.security"):
        assert warn_if_plaintext_exposed("tcp://127.0.0.1:5555", curve_enabled=False, logger=logger) is False
        assert not caplog.records
        assert warn_if_plaintext_exposed("tcp://0.0.0.0:5555", curve_enabled=True, logger=logger) is False
        assert not caplog.records
        assert warn_if_plaintext_exposed("tcp://0.0.0.0:5555", curve_enabled=False, logger=logger) is True
    assert len(caplog.records) == 1
    assert caplog.records[0].levelno == logging.WARNING
    assert "tcp://0.0.0.0:5555" in caplog.text and "WITHOUT CURVE" in caplog.text


# ---------------------------------------------------------------- CLI


def test_cli_generate_from_nodes(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["generate", str(tmp_path / "k"), "--nodes", "a,b"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k" / "a.key_secret").is_file() and (tmp_path / "k" / "b.key").is_file()
    assert load_public_key(tmp_path / "k", "a").decode() in result.stdout
    assert "keys_dir" in result.stdout

    again = runner.invoke(app, ["generate", str(tmp_path / "k"), "--nodes", "a,b"])
    assert again.exit_code == 2
    assert again.stderr.startswith("error: ") and "already exists" in again.stderr
    assert "Traceback" not in again.output

    forced = runner.invoke(app, ["generate", str(tmp_path / "k"), "--nodes", "a,b", "--force"])
    assert forced.exit_code == 0, forced.output


def test_cli_generate_from_topology(tmp_path: Path) -> None:
    topo = tmp_path / "topo.yaml"
    topo.write_text("nodes:\n  - name: server\n  - name: client_a\n")
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "k"), "--topology", str(topo)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "k").iterdir()} == {
        "server.key", "server.key_secret", "client_a.key", "client_a.key_secret",
    }


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    neither = runner.invoke(app, ["generate", str(tmp_path)])
    assert neither.exit_code == 2 and neither.stderr.startswith("error: ")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [\n")
    broken = runner.invoke(app, ["generate", str(tmp_path / "k"), "--topology", str(bad)])
    assert broken.exit_code == 2 and broken.stderr.startswith("error: ")
    assert "Traceback" not in broken.output


def test_cli_prints_keys_verbatim_even_with_markup_characters(tmp_path: Path, monkeypatch) -> None:
    import meshsl.cli.keys as cli_keys

    odd_key = "[bold]" + "x" * 34
    monkeypatch.setattr(cli_keys, "generate_keys", lambda directory, nodes, overwrite: {"a": odd_key})
    result = CliRunner().invoke(app, ["generate", str(tmp_path), "--nodes", "a"])
    assert result.exit_code == 0, result.output
    assert odd_key in result.stdout
