"""The `ledger` CLI against real nodes: `tools.cli.main` in-process, and the installed script."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

from protocol import codec, merkle
from protocol.client import Client
from protocol.errors import IntegrityError
from protocol.entry import Entry, leaf_hash
from protocol.merkle import Frontier
from tools import cli

pytestmark = pytest.mark.timeout(60)


def hostport(node) -> str:
    """The node's address in the documented HOST:PORT form."""
    return node.address.removeprefix("tcp://")


def run(capsys, node_or_addr, *args: str, as_json: bool = True) -> tuple[int, str, str]:
    addr = node_or_addr if isinstance(node_or_addr, str) else hostport(node_or_addr)
    argv = ["--node", addr, *(["--json"] if as_json else []), *args]
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def objs(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def one(out: str) -> dict:
    lines = out.splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


def set_stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- append ----------------------------------------------------------------------


def test_append_from_argument(capsys, node):
    rc, out, err = run(capsys, node, "append", "c1", "hello", "--key", "facts")
    assert rc == 0, err
    e = one(out)
    assert (e["context"], e["seq"], e["key"], e["payload"], e["writer"]) == ("c1", 1, "facts", "hello", node.node_id)
    assert set(e) == {"context", "seq", "key", "payload", "metadata", "lamport", "ts_ns", "writer", "hash"}
    assert len(bytes.fromhex(e["hash"])) == 32 and e["lamport"] >= 1 and e["ts_ns"] > 0


def test_append_from_file_is_raw_bytes(capsys, node, tmp_path):
    f = tmp_path / "p.bin"
    f.write_bytes(b"line one\nline two\n")
    rc, out, err = run(capsys, node, "append", "c1", "--file", str(f))
    assert rc == 0, err
    assert one(out)["payload"] == "line one\nline two\n"


def test_append_from_stdin_reads_all_of_it(capsys, node, monkeypatch):
    set_stdin(monkeypatch, b"from stdin\nsecond line")
    rc, out, err = run(capsys, node, "append", "c1")
    assert rc == 0, err
    assert one(out)["payload"] == "from stdin\nsecond line"


def test_append_lines_pipelined_one_json_line_each(capsys, node, monkeypatch, client):
    n = 2500  # more than the client's window of 1,000 in flight
    set_stdin(monkeypatch, b"".join(f"line {i}\n".encode() for i in range(n)))
    rc, out, err = run(capsys, node, "append", "logs", "--lines", "--key", "traces", "--meta", "run=7")
    assert rc == 0, err
    got = objs(out)
    assert [e["seq"] for e in got] == list(range(1, n + 1))
    assert [e["payload"] for e in got] == [f"line {i}" for i in range(n)]  # newline stripped
    assert all(e["key"] == "traces" and e["metadata"] == {"run": "7"} for e in got)
    assert client.head("logs").size == n


def test_append_lines_human_output_and_crlf(capsys, node, monkeypatch):
    set_stdin(monkeypatch, b"a\r\nb\n\nc")
    rc, out, err = run(capsys, node, "append", "c1", "--lines", as_json=False)
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("c1#1 lamport=") and lines[0].endswith("  a")
    assert lines[3].startswith("c1#4 ") and lines[3].endswith("  c")


def test_append_lines_with_dedup_id_can_be_rerun(capsys, node, monkeypatch, client):
    data = b"".join(f"row {i}\n".encode() for i in range(1500))
    set_stdin(monkeypatch, data)
    rc, first, err = run(capsys, node, "append", "c1", "--lines", "--dedup-id", "import-42")
    assert rc == 0, err
    set_stdin(monkeypatch, data)
    rc, again, err = run(capsys, node, "append", "c1", "--lines", "--dedup-id", "import-42")
    assert rc == 0, err
    assert objs(again) == objs(first)  # the same entries, not 1,500 more
    assert client.head("c1").size == 1500


def test_append_payload_over_the_node_limit_is_refused_quickly(capsys, node, tmp_path, client):
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (17 << 20))  # above the node's request limit too, which ZeroMQ drops unanswered
    t0 = time.monotonic()
    rc, out, err = run(capsys, node, "--timeout", "3", "append", "c1", "--file", str(big))
    assert rc == 1 and out == ""
    assert "TOO_LARGE" in err and time.monotonic() - t0 < 3
    assert client.contexts() == []


def test_append_meta_repeated(capsys, node):
    rc, out, err = run(
        capsys, node, "append", "c1", "x", "--meta", "agent=a1", "--meta", "expr=a=b", "--meta", "empty="
    )
    assert rc == 0, err
    assert one(out)["metadata"] == {"agent": "a1", "expr": "a=b", "empty": ""}


def test_append_human_format(capsys, node):
    rc, out, err = run(capsys, node, "append", "c1", "hello", "--key", "facts", "--meta", "agent=a1", as_json=False)
    assert rc == 0, err
    assert out == f"c1#1 [facts] lamport=1 writer={node.node_id} {{agent=a1}}  hello\n"


def test_human_format_escapes_multiline_payloads(capsys, node):
    assert run(capsys, node, "append", "c1", "two\nlines")[0] == 0
    rc, out, _ = run(capsys, node, "get", "c1", as_json=False)
    assert out.endswith('  "two\\nlines"\n') and out.count("\n") == 1


@pytest.mark.parametrize("bad", ["novalue", "=v"])
def test_append_invalid_meta_is_a_usage_error(capsys, node, client, bad):
    rc, out, err = run(capsys, node, "append", "c1", "x", "--meta", bad)
    assert rc == 2
    assert "--meta" in err and "KEY=VALUE" in err and out == ""
    assert client.contexts() == []


def test_append_dedup_id_twice_is_one_entry(capsys, node, client):
    rc1, out1, _ = run(capsys, node, "append", "c1", "once", "--dedup-id", "job-17")
    rc2, out2, _ = run(capsys, node, "append", "c1", "once", "--dedup-id", "job-17")
    assert rc1 == rc2 == 0
    assert one(out1) == one(out2)
    assert one(out1)["seq"] == 1
    assert client.head("c1").size == 1


def test_append_without_dedup_id_appends_each_time(capsys, node, client):
    for _ in range(2):
        assert run(capsys, node, "append", "c1", "same")[0] == 0
    assert client.head("c1").size == 2


def test_append_expect_seq(capsys, node):
    assert run(capsys, node, "append", "c1", "first")[0] == 0
    rc, out, err = run(capsys, node, "append", "c1", "second", "--expect-seq", "1")
    assert rc == 0, err
    assert one(out)["seq"] == 2
    rc, out, err = run(capsys, node, "append", "c1", "stale", "--expect-seq", "1")
    assert rc == 1 and out == ""
    e = json.loads(err)["error"]  # --json: the error is a JSON object too
    assert e["code"] == "CONFLICT" and (e["actual_seq"], e["expected_seq"]) == (2, 1)


def test_append_after_lamport(capsys, node):
    rc, out, err = run(capsys, node, "append", "c1", "later", "--after-lamport", "1000")
    assert rc == 0, err
    assert one(out)["lamport"] > 1000


def test_append_missing_file_is_a_usage_error(capsys, node, tmp_path):
    rc, out, err = run(capsys, node, "append", "c1", "--file", str(tmp_path / "nope.bin"))
    assert rc == 2 and out == ""
    assert "nope.bin" in err


def test_append_conflicting_sources_are_usage_errors(capsys, node, tmp_path):
    assert run(capsys, node, "append", "c1", "x", "--file", str(tmp_path / "f"))[0] == 2
    assert run(capsys, node, "append", "c1", "x", "--lines")[0] == 2
    assert run(capsys, node, "append", "c1", "--lines", "--expect-seq", "0")[0] == 2


def test_binary_payload_prints_as_base64(capsys, node, monkeypatch):
    raw = b"\xff\x00\xfe binary"
    set_stdin(monkeypatch, raw)
    rc, out, err = run(capsys, node, "append", "c1")
    assert rc == 0, err
    e = one(out)
    assert "payload" not in e
    assert base64.b64decode(e["payload_b64"]) == raw
    rc, out, _ = run(capsys, node, "get", "c1")
    assert base64.b64decode(one(out)["payload_b64"]) == raw


# -- get ---------------------------------------------------------------------------


def test_get_key_after_limit(capsys, node, client):
    client.append_batch("c1", [("facts" if i % 2 else "traces", f"p{i}", None) for i in range(1, 21)])
    rc, out, _ = run(capsys, node, "get", "c1")
    assert rc == 0 and [e["seq"] for e in objs(out)] == list(range(1, 21))
    rc, out, _ = run(capsys, node, "get", "c1", "--key", "facts")
    assert [e["seq"] for e in objs(out)] == list(range(1, 21, 2))
    rc, out, _ = run(capsys, node, "get", "c1", "--after", "15")
    assert [e["seq"] for e in objs(out)] == [16, 17, 18, 19, 20]
    rc, out, _ = run(capsys, node, "get", "c1", "--limit", "3")
    assert [e["seq"] for e in objs(out)] == [1, 2, 3]
    rc, out, _ = run(capsys, node, "get", "c1", "--key", "traces", "--after", "10", "--limit", "2")
    assert [e["seq"] for e in objs(out)] == [12, 14]
    assert all(e["key"] == "traces" for e in objs(out))


def test_get_of_unknown_context_is_not_found_exit_1_like_head(capsys, node, client):
    rc, out, err = run(capsys, node, "get", "nope")
    assert (rc, out) == (1, "") and json.loads(err)["error"]["code"] == "NOT_FOUND"  # --json
    rc, out, err = run(capsys, node, "get", "nope", as_json=False)
    assert (rc, out) == (1, "") and "NOT_FOUND: context 'nope' does not exist" in err
    assert run(capsys, node, "head", "nope", as_json=False)[0] == 1  # the same code for the same fact
    client.append("real", "x")
    rc, out, err = run(capsys, node, "get", "real", "--after", "1", as_json=False)
    assert (rc, out, err) == (0, "", "")  # an existing context with nothing after 1: no note


def test_get_pages_past_ten_thousand(capsys, node, client):
    n = codec.MAX_GET_LIMIT + 2345
    for start in range(0, n, 5000):
        client.append_batch("big", [f"e{i}" for i in range(start, min(start + 5000, n))])
    rc, out, err = run(capsys, node, "get", "big")
    assert rc == 0, err
    got = objs(out)
    assert [e["seq"] for e in got] == list(range(1, n + 1))
    assert got[-1]["payload"] == f"e{n - 1}"
    rc, out, _ = run(capsys, node, "get", "big", "--limit", str(codec.MAX_GET_LIMIT + 5), "--after", "7")
    assert [e["seq"] for e in objs(out)] == list(range(8, 8 + codec.MAX_GET_LIMIT + 5))


# -- head, contexts, status ----------------------------------------------------------


def test_head_contexts_status_json(capsys, node, client):
    client.append("alpha", b"1")
    last = client.append("beta", b"2")
    client.append("beta", b"3")
    rc, out, _ = run(capsys, node, "head", "beta")
    h = one(out)
    assert rc == 0 and set(h) == {"context", "size", "root", "lamport", "writer", "watchers", "signed"}
    assert (h["context"], h["size"], h["writer"]) == ("beta", 2, node.node_id)
    # the writer's signature of this head (SPEC 13.6), by the key status shows
    assert h["signed"]["size"] == 2 and h["signed"]["root"] == h["root"]
    assert h["signed"]["key"] == client.status()["public_key"]
    assert h["root"] == client.head("beta").root.hex() and h["lamport"] > last.lamport

    rc, out, _ = run(capsys, node, "contexts")
    assert rc == 0 and objs(out) == [{"name": "alpha", "size": 1}, {"name": "beta", "size": 2}]

    rc, out, _ = run(capsys, node, "status")
    s = one(out)
    assert rc == 0
    assert s["node_id"] == node.node_id and s["contexts"] == 2 and s["entries"] == 3
    assert {"version", "protocol", "router", "lamport", "durability", "uptime_s"} <= set(s)


def test_head_human_and_not_found(capsys, node, client):
    client.append("c1", b"x")
    rc, out, _ = run(capsys, node, "head", "c1", as_json=False)
    assert rc == 0
    assert out.splitlines()[:2] == ["context: c1", "size: 1"]
    rc, out, err = run(capsys, node, "head", "nope", as_json=False)
    assert rc == 1 and out == ""
    assert err == "ledger: error: NOT_FOUND: context 'nope' does not exist\n"


def test_global_options_also_after_the_command(capsys, node, client):
    client.append("c1", b"x")
    rc = cli.main(["head", "c1", "--node", hostport(node), "--json", "--timeout", "3"])
    assert rc == 0 and one(capsys.readouterr().out)["size"] == 1


def test_node_from_environment(capsys, node, client, monkeypatch):
    client.append("c1", b"x")
    monkeypatch.setenv("LEDGER_NODE", hostport(node))
    assert cli.main(["--json", "head", "c1"]) == 0
    assert one(capsys.readouterr().out)["size"] == 1


# -- snapshot and load ---------------------------------------------------------------


def make_context(client, name: str, n: int) -> None:
    client.append_batch(name, [("facts", f"PAYLOAD-MARK-{i:04d}", {"i": str(i)}) for i in range(n)])


def test_snapshot_load_round_trip(capsys, node, node_factory, client, tmp_path):
    make_context(client, "c1", 50)
    snap = tmp_path / "out" / "c1.snap"
    snap.parent.mkdir()
    rc, out, err = run(capsys, node, "snapshot", "c1", "-o", str(snap))
    assert rc == 0, err
    summary = one(out)
    root = client.head("c1").root.hex()
    assert (summary["context"], summary["size"], summary["root"]) == ("c1", 50, root)
    assert os.listdir(snap.parent) == ["c1.snap"]  # no temp file left behind

    fresh = node_factory(name="n2")
    rc, out, err = run(capsys, fresh, "load", "c1", str(snap))
    assert rc == 0, err
    loaded = one(out)
    assert (loaded["size"], loaded["root"]) == (50, root)
    rc, out, _ = run(capsys, fresh, "head", "c1")
    assert one(out)["root"] == root
    rc, out, _ = run(capsys, fresh, "get", "c1")
    assert [e["payload"] for e in objs(out)] == [f"PAYLOAD-MARK-{i:04d}" for i in range(50)]


def test_snapshot_failure_leaves_no_file(capsys, node, tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()

    def cut_short(self, context, out, size=None, on_progress=None):  # part of the file written, then the node fails
        out.write(b"\x85partial")
        raise IntegrityError("the node changed its root for a fixed size during the snapshot")

    monkeypatch.setattr(Client, "snapshot", cut_short)
    rc, out, err = run(capsys, node, "snapshot", "c1", "-o", str(folder / "s.snap"))
    assert rc == 1 and "INTEGRITY" in err
    assert list(folder.iterdir()) == []


def test_snapshot_into_missing_folder_is_a_usage_error(capsys, node, client, tmp_path):
    client.append("c1", b"x")
    rc, _, err = run(capsys, node, "snapshot", "c1", "-o", str(tmp_path / "no" / "s.snap"))
    assert rc == 2 and "does not exist" in err


def test_load_of_tampered_snapshot_is_refused_and_writes_nothing(capsys, node, node_factory, client, tmp_path):
    make_context(client, "c1", 20)
    snap = tmp_path / "c1.snap"
    assert run(capsys, node, "snapshot", "c1", "-o", str(snap))[0] == 0
    data = bytearray(snap.read_bytes())
    at = data.index(b"PAYLOAD-MARK-0013")
    data[at + len("PAYLOAD-MARK-")] ^= 0x01  # '0' -> '1': still valid msgpack, wrong hash
    snap.write_bytes(bytes(data))

    fresh = node_factory(name="n2")
    rc, out, err = run(capsys, fresh, "load", "c1", str(snap))
    assert rc == 1 and out == ""
    assert "INTEGRITY" in err
    rc, _, err = run(capsys, fresh, "head", "c1")
    assert rc == 1 and "NOT_FOUND" in err
    assert run(capsys, fresh, "contexts")[1] == ""


def test_load_fail_if_exists(capsys, node, client, tmp_path):
    make_context(client, "c1", 5)
    snap = tmp_path / "c1.snap"
    assert run(capsys, node, "snapshot", "c1", "-o", str(snap))[0] == 0
    rc, out, err = run(capsys, node, "load", "c1", str(snap), "--fail-if-exists")
    assert rc == 1 and "CONFLICT" in err
    # Without the flag, loading the identical history is accepted and changes nothing.
    rc, out, err = run(capsys, node, "load", "c1", str(snap))
    assert rc == 0, err
    assert one(out)["size"] == 5


def test_load_bad_local_input(capsys, node, client, tmp_path):
    rc, _, err = run(capsys, node, "load", "c1", str(tmp_path / "missing.snap"))
    assert rc == 2 and "missing.snap" in err
    junk = tmp_path / "junk.snap"
    junk.write_bytes(b"not a snapshot at all")
    rc, _, err = run(capsys, node, "load", "c1", str(junk))
    assert rc == 2 and "snapshot" in err
    make_context(client, "c1", 3)
    snap = tmp_path / "c1.snap"
    assert run(capsys, node, "snapshot", "c1", "-o", str(snap))[0] == 0
    rc, _, err = run(capsys, node, "load", "other", str(snap))
    assert rc == 2 and "'c1'" in err
    assert [c["name"] for c in client.contexts()] == ["c1"]


# -- proof and verify ----------------------------------------------------------------


def test_proof_verified(capsys, node, client):
    make_context(client, "c1", 13)
    rc, out, err = run(capsys, node, "proof", "c1", "7")
    assert rc == 0, err
    p = one(out)
    assert p["verified"] is True
    assert (p["context"], p["seq"], p["size"]) == ("c1", 7, 13)
    assert p["root"] == client.head("c1").root.hex()
    assert p["leaf"] == client.get("c1", after=6, limit=1).entries[0].hash.hex()
    assert len(p["path"]) == 4 and all(len(bytes.fromhex(x)) == 32 for x in p["path"])

    rc, out, _ = run(capsys, node, "proof", "c1", "7", as_json=False)
    assert rc == 0 and out.splitlines()[-1] == "verified" and "path:" in out


def test_proof_errors(capsys, node, client):
    client.append("c1", b"x")
    assert run(capsys, node, "proof", "c1", "2")[0] == 1
    assert run(capsys, node, "proof", "c1", "0")[0] == 2
    assert run(capsys, node, "proof", "nope", "1")[0] == 1


def test_verify_ok(capsys, node, client):
    make_context(client, "c1", 100)
    rc, out, err = run(capsys, node, "verify", "c1")
    assert rc == 0, err
    v = one(out)
    assert v == {"context": "c1", "size": 100, "root": client.head("c1").root.hex(), "verified": True}


def test_verify_missing_context(capsys, node):
    rc, out, err = run(capsys, node, "verify", "nope")
    assert rc == 1 and out == ""
    assert "NOT_FOUND" in err


# -- a node that lies ------------------------------------------------------------------


def _entry(context: str, seq: int, payload: bytes) -> Entry:
    h = leaf_hash(context, seq, "", payload, {}, seq, 1, "fake")
    return Entry(context, seq, "", payload, {}, seq, 1, "fake", h)


@pytest.fixture
def lying_node(zctx) -> Iterator[tuple[str, dict]]:
    """A ROUTER that answers like a node from a table of op -> reply fields."""
    replies: dict = {"ping": ({"node_id": "fake"}, None)}
    sock = zctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not sock.poll(50):
                continue
            ident, frame = sock.recv_multipart()
            req = msgpack.unpackb(frame, raw=False)
            fields, raw = replies[req["op"]]
            sock.send_multipart([ident, codec.encode_reply(req["id"], fields, raw)])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"127.0.0.1:{port}", replies
    stop.set()
    t.join(5)
    sock.close(linger=0)


def tampered_snapshot_reply() -> tuple[dict, dict]:
    """A snapshot page of three entries whose second payload no longer matches its hash."""
    good = [_entry("c1", i, f"p{i}".encode()) for i in (1, 2, 3)]
    f = Frontier()
    for e in good:
        f.append(e.hash)
    bad = good[1].to_wire() | {"payload": b"changed"}
    blobs = [good[0].encode(), msgpack.packb(bad, use_bin_type=True), good[2].encode()]
    return ({"context": "c1", "size": 3, "root": f.root(), "more": False, "next_after": 3}, {"entries": blobs})


def test_verify_reports_a_tampered_entry(capsys, lying_node):
    addr, replies = lying_node
    replies["snapshot"] = tampered_snapshot_reply()
    rc, out, err = run(capsys, addr, "verify", "c1")
    assert rc == 1 and out == ""
    e = json.loads(err)["error"]
    assert e["code"] == "INTEGRITY" and "#2" in e["message"]


def test_snapshot_that_fails_verification_midway_leaves_no_file(capsys, lying_node, tmp_path):
    addr, replies = lying_node
    replies["snapshot"] = tampered_snapshot_reply()
    target = tmp_path / "s.snap"
    target.write_bytes(b"an older snapshot")  # must survive a failed run untouched
    rc, out, err = run(capsys, addr, "snapshot", "c1", "-o", str(target))
    assert rc == 1 and "INTEGRITY" in err
    assert os.listdir(tmp_path) == ["s.snap"] and target.read_bytes() == b"an older snapshot"


def test_proof_reports_an_entry_that_is_not_the_proven_leaf(capsys, lying_node):
    addr, replies = lying_node
    proven, served = _entry("c1", 1, b"proven"), _entry("c1", 1, b"served")
    replies["proof"] = (
        {"context": "c1", "seq": 1, "size": 1, "leaf": proven.hash, "path": [], "root": merkle.bind_root(1, proven.hash)},
        None,
    )
    replies["get"] = ({"last_seq": 1, "more": False, "next_after": 1}, {"entries": [served.encode()]})
    rc, out, err = run(capsys, addr, "proof", "c1", "1")
    assert rc == 1 and out == ""
    assert "INTEGRITY" in err and "proven leaf" in err


# -- unreachable nodes and the installed script --------------------------------------


def test_nothing_listening_fails_at_once_not_at_the_timeout(capsys):
    t0 = time.monotonic()
    rc, out, err = run(capsys, f"127.0.0.1:{free_port()}", "--timeout", "5", "head", "c1")
    elapsed = time.monotonic() - t0
    assert rc == 1 and out == ""
    assert "UNAVAILABLE" in err and "nothing listening" in err and "connection refused" in err
    assert "allowlisted" not in err  # (the hint about keys is for a node that does not answer)
    assert elapsed < 2


def test_bad_node_address_is_a_usage_error(capsys):
    rc, _, err = run(capsys, "no-port-here", "head", "c1")
    assert rc == 2 and "HOST:PORT" in err


def test_usage_errors_return_2(capsys):
    assert cli.main([]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["--timeout", "-1", "status"]) == 2
    assert cli.main(["get", "c1", "--limit", "many"]) == 2
    assert cli.main(["--help"]) == 0
    capsys.readouterr()


def ledger_script() -> str:
    exe = Path(sys.executable).parent / "ledger"
    return str(exe) if exe.exists() else "ledger"


def test_installed_console_script(node, tmp_path):
    env = dict(os.environ, LEDGER_NODE=hostport(node))
    p = subprocess.run(
        [ledger_script(), "--json", "append", "c1", "--key", "facts", "--lines"],
        input=b"one\ntwo\nthree\n",
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert p.returncode == 0, p.stderr
    assert [json.loads(x)["seq"] for x in p.stdout.splitlines()] == [1, 2, 3]
    p = subprocess.run([ledger_script(), "get", "c1"], capture_output=True, env=env, timeout=30, text=True)
    assert p.returncode == 0, p.stderr
    assert [line.rsplit("  ", 1)[1] for line in p.stdout.splitlines()] == ["one", "two", "three"]
    p = subprocess.run([ledger_script(), "head", "nope"], capture_output=True, env=env, timeout=30, text=True)
    assert p.returncode == 1
    assert p.stderr == "ledger: error: NOT_FOUND: context 'nope' does not exist\n"


def test_installed_console_script_unreachable_node():
    t0 = time.monotonic()
    p = subprocess.run(
        [ledger_script(), "--node", f"127.0.0.1:{free_port()}", "--timeout", "1", "status"],
        capture_output=True,
        timeout=30,
        text=True,
    )
    elapsed = time.monotonic() - t0
    assert p.returncode == 1 and "UNAVAILABLE" in p.stderr and "Traceback" not in p.stderr
    assert elapsed < 5


def test_installed_console_script_ctrl_c_exits_130():
    # stdin that never ends: the CLI blocks reading the payload until interrupted
    r, w = os.pipe()
    try:
        p = subprocess.Popen(
            [ledger_script(), "--node", f"127.0.0.1:{free_port()}", "append", "c1"],
            stdin=r,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2.0)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=10)
    finally:
        os.close(r)
        os.close(w)
    assert p.returncode == 130
    assert "Traceback" not in err and "interrupted" in err


def test_append_takes_its_payload_after_options_too(node, capsys):
    rc, out, _ = run(capsys, node, "--json", "append", "order", "--key", "facts", "--meta", "a=b", "hello")
    assert rc == 0 and one(out)["payload"] == "hello" and one(out)["key"] == "facts"
    rc, _, err = run(capsys, node, "append", "order", "one", "two")
    assert rc == 2 and "unrecognized arguments: two" in err


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ledger ") and "protocol v1" in out


def test_with_json_errors_are_json_too(capsys, node):
    rc, out, err = run(capsys, node, "head", "nosuch")
    assert rc == 1 and out == ""
    e = json.loads(err)["error"]
    assert e["code"] == "NOT_FOUND" and "nosuch" in e["message"]
    rc, out, err = run(capsys, "127.0.0.1:9", "--timeout", "0.3", "head", "x")  # nobody there
    assert rc == 1 and json.loads(err)["error"]["code"] == "UNAVAILABLE"
    rc, out, err = run(capsys, node, "head", "nosuch", as_json=False)  # people get the one-liner
    assert rc == 1 and err.startswith("ledger: error: NOT_FOUND: ")
