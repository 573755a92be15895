"""A client pointed at a node's watch (PUB) port, or at another kind of ZeroMQ socket, says so at
once (ZeroMQ's socket monitor sees the handshake fail on the socket types; a SUB then checks that
a PUB is there), instead of waiting for its timeout and asking whether a node runs there."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
import zmq

from node.identity import KEY_FILE, write_key_file
from protocol.aioclient import AsyncClient
from protocol.client import Client
from protocol.errors import Timeout, Unreachable
from protocol.keys import Identity
from tools import cli

pytestmark = pytest.mark.timeout(60)
QUICK_S = 1.5  # well under the 5 s timeout the clients are given here


def _below(address: str) -> str:
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    return f"{host}:{int(port) - 1}"


def test_the_client_says_it_is_a_watch_port_at_once(node, zctx):
    t0 = time.monotonic()
    with Client(node.pub, timeout=5.0, zctx=zctx) as c, pytest.raises(Unreachable) as info:
        c.status()
    assert time.monotonic() - t0 < QUICK_S
    msg = str(info.value)
    assert f"{node.pub} is a node's watch (PUB) port, not its request port" in msg
    assert f"try {_below(node.pub)}" in msg
    assert info.value.details["reason"] == "watch_port"
    assert info.value.details["request_port_guess"] == _below(node.pub)


def test_the_async_client_says_it_too_and_at_once_for_later_requests(node):
    async def main() -> tuple[float, Unreachable, float]:
        t0 = time.monotonic()
        async with AsyncClient(node.pub, timeout=5.0) as c:
            with pytest.raises(Unreachable) as info:
                await c.status()
            first = time.monotonic() - t0
            t1 = time.monotonic()
            with pytest.raises(Unreachable, match="watch \\(PUB\\) port"):
                await c.head("x")
            return first, info.value, time.monotonic() - t1

    first, err, second = asyncio.run(main())
    assert first < QUICK_S and second < QUICK_S and "is a node's watch (PUB) port" in str(err)
    assert err.details["reason"] == "watch_port"


def test_with_the_request_port_listed_after_it_the_client_moves_on_even_for_an_append(node, zctx):
    # an append without a dedup_id is never retried where it may have landed; at a watch port it
    # reached no node, so the next address gets it
    with Client([node.pub, node.address], timeout=5.0, zctx=zctx) as c:
        e = c.append("c1", b"x")
        assert e.seq == 1 and c.address == node.address


def test_the_cli_reports_it_quickly_with_exit_1_and_as_json(node, capsys):
    t0 = time.monotonic()
    rc = cli.main(["--node", node.pub.removeprefix("tcp://"), "status"])
    err = capsys.readouterr().err
    assert rc == 1 and time.monotonic() - t0 < QUICK_S
    assert "is a node's watch (PUB) port" in err and "is ledger-node running there?" not in err
    rc = cli.main(["--node", node.pub.removeprefix("tcp://"), "--json", "head", "c1"])
    cap = capsys.readouterr()
    assert rc == 1 and cap.out == ""
    e = json.loads(cap.err)["error"]
    assert e["code"] == "UNAVAILABLE" and e["reason"] == "watch_port" and e["request_port_guess"] == _below(node.pub)


def test_another_kind_of_zeromq_socket_is_named_as_such(zctx):
    push = zctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    try:
        t0 = time.monotonic()
        with Client(f"127.0.0.1:{port}", timeout=5.0, zctx=zctx) as c, pytest.raises(Unreachable) as info:
            c.ping()
        assert time.monotonic() - t0 < QUICK_S
        assert "is a ZeroMQ socket of another kind, not a node's request port" in str(info.value)
        assert info.value.details["reason"] == "other_port"
    finally:
        push.close(0)


def test_a_node_with_keys_a_client_with_keys_at_its_watch_port(node_factory, tmp_path, zctx):
    # with CURVE the PUB drops the connection before the client learns its type: the client sees
    # handshakes failing with no detail, and the probe (a SUB with the same keys) tells
    server, client_key = Identity.generate(), Identity.generate()
    os.makedirs(tmp_path / "n1")
    write_key_file(str(tmp_path / "n1" / KEY_FILE), server)
    (tmp_path / "clients.txt").write_text(f"{client_key.public_hex} admin\n")
    n = node_factory("--client-keys", str(tmp_path / "clients.txt"))
    t0 = time.monotonic()
    with Client(n.pub, timeout=5.0, zctx=zctx, key=client_key, server_key=server.public_hex) as c:
        with pytest.raises(Unreachable, match="is a node's watch \\(PUB\\) port"):
            c.status()
    assert time.monotonic() - t0 < QUICK_S
    with Client(n.address, timeout=5.0, zctx=zctx, key=client_key, server_key=server.public_hex) as c:
        assert c.status()["security"] == "curve"  # the request port, the same keys: fine
    # a client without keys learns nothing from either port (no handshake succeeds): no claim
    # about ports, the usual timeout
    with Client(n.pub, timeout=1.0, retries=0, zctx=zctx) as c, pytest.raises(Timeout) as info:
        c.status()
    assert "watch" not in str(info.value)



def test_a_request_after_the_handshake_was_refused_times_out_and_never_hangs(node_factory, tmp_path, zctx):
    # ZeroMQ does not reconnect after a handshake refused on keys (or socket types): the DEALER is
    # left with no connection, where a blocking send waited forever and a non-blocking one said
    # "more than 100,000 requests queued"
    server = Identity.generate()
    os.makedirs(tmp_path / "n1")
    write_key_file(str(tmp_path / "n1" / KEY_FILE), server)
    (tmp_path / "clients.txt").write_text("")
    n = node_factory("--client-keys", str(tmp_path / "clients.txt"))
    with Client(n.address, timeout=1.0, retries=0, zctx=zctx) as c:
        time.sleep(0.5)  # the handshake is refused (a keyless client) before the first request
        t0 = time.monotonic()
        with pytest.raises(Timeout, match="no answer from"):
            c.status()
        assert time.monotonic() - t0 < 2.0

    async def main() -> None:
        async with AsyncClient(n.address, timeout=1.0, retries=0) as c:
            await asyncio.sleep(0.5)
            with pytest.raises(Timeout, match="no answer from"):
                await c.status()

    asyncio.run(main())
