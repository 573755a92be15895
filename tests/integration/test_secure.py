"""Nodes with keys (issue #14): CURVE on every socket, allowlists with roles, node ids bound to keys.

Each attack of the issue's "Why" that this slice closes is tried here as the stranger would.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from node.identity import KEY_FILE, write_key_file
from protocol.client import Client
from protocol.errors import Forbidden, NotFound, Timeout
from protocol.keys import Identity

pytestmark = pytest.mark.timeout(90)


def wait_for(cond, timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def size(c: Client, context: str) -> int:
    try:
        return c.head(context).size
    except NotFound:
        return 0


def verified(c: Client, context: str, writer: Identity) -> int | None:
    from protocol.errors import IntegrityError

    try:
        return c.head(context, writer_key=writer.public_hex).verified
    except (NotFound, IntegrityError):
        return None


def node_key(tmp_path: Path, name: str) -> Identity:
    ident = Identity.generate()
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    write_key_file(str(tmp_path / name / KEY_FILE), ident)
    return ident


class Keys:
    """A node's key, its allowlist files and some client keys, in tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.writer, self.reader, self.admin, self.stranger = (Identity.generate() for _ in range(4))
        self.clients = tmp_path / "clients.txt"
        self.clients.write_text(f"# test clients\n{self.writer.public_hex} write\n"
                                f"{self.reader.public_hex} read notes,pub.\n{self.admin.public_hex} admin\n")

    def client(self, node, key: Identity, server: Identity, **kw) -> Client:
        return Client(node.address, key=key, server_key=server.public_hex, timeout=kw.pop("timeout", 3.0), **kw)


@pytest.fixture
def keyed(node_factory, tmp_path, zctx):
    keys = Keys(tmp_path)
    server = node_key(tmp_path, "n1")
    n = node_factory("--client-keys", str(keys.clients))
    return n, keys, server


def test_roles_and_context_prefixes_are_enforced_per_request(keyed, zctx):
    n, keys, server = keyed
    with keys.client(n, keys.writer, server, zctx=zctx) as w, keys.client(n, keys.reader, server, zctx=zctx) as r:
        assert w.append("notes", "one").seq == 1
        assert [e.payload for e in r.get("notes").entries] == [b"one"]
        with pytest.raises(Forbidden, match="append is not allowed for the read role"):
            r.append("notes", "not mine to write")
        with pytest.raises(Forbidden, match="'secrets' is not allowed for this key"):
            r.get("secrets")
        with pytest.raises(NotFound):
            r.head("pub.feed")  # allowed (the prefix pub. covers it), and simply not there
        with pytest.raises(Forbidden, match="load is not allowed for the write role"):
            w.call("load", context="x", load_id="l", size=0, root=b"\0" * 32, entries=[], final=True)
        st = w.status()
        assert st["security"] == "curve" and st["forbidden_requests"] == 3 and st["client_keys"] == 3
        assert w.head("notes").size == 1  # the node and the data are unharmed


def test_a_stranger_key_and_a_plain_client_are_refused_at_the_handshake_and_counted(keyed, zctx):
    n, keys, server = keyed
    with keys.client(n, keys.stranger, server, zctx=zctx, timeout=0.5, retries=0) as s:
        with pytest.raises(Timeout):
            s.ping()
    with Client(n.address, zctx=zctx, timeout=0.5, retries=0) as plain:
        with pytest.raises(Timeout):
            plain.ping()
    with keys.client(n, keys.admin, Identity.generate(), zctx=zctx, timeout=0.5, retries=0) as wrong_server:
        with pytest.raises(Timeout):  # the node cannot prove a key it does not hold: no impostor node either
            wrong_server.ping()
    with keys.client(n, keys.admin, server, zctx=zctx) as a:
        st = a.status()
        assert st["handshakes_refused"] >= 1 and st["handshakes_accepted"] >= 1
        # every failed handshake is counted, the plain client's and the wrong server key's too
        wait_for(lambda: a.status()["handshakes_failed"] >= 3, what="the failed handshakes")
    assert "in no allowlist of this node" in n.output()


def test_a_client_key_cannot_speak_for_a_node(keyed, zctx):
    n, keys, server = keyed
    with keys.client(n, keys.admin, server, zctx=zctx) as a:
        a.append("notes", "x")
        # the forged ack from a made-up node id, and a fake node's heartbeat
        with pytest.raises(Forbidden, match="ack is not allowed for the admin role"):
            a.call("ack", node_id="ghost", acks=[["notes", 1]])
        with pytest.raises(Forbidden, match="heartbeat is not allowed"):
            a.call("heartbeat", node_id="0", address="127.0.0.1:9", pub="127.0.0.1:10", boot="b", lamport=1,
                   entries=0, cluster="ledger")
        assert a.status()["peers"] == []


def test_watch_needs_a_key_too(keyed, zctx):
    n, keys, server = keyed
    with keys.client(n, keys.writer, server, zctx=zctx) as w, keys.client(n, keys.reader, server, zctx=zctx) as r:
        w.append("notes", "before")
        got = r.watch("notes", after=0)
        it = iter(got)
        assert next(it).payload == b"before"
        w.append("notes", "live")
        assert next(it).payload == b"live"
        got.close()


def test_sighup_revokes_and_adds_keys_without_a_restart(keyed, zctx):
    n, keys, server = keyed
    newcomer = Identity.generate()
    with keys.client(n, keys.writer, server, zctx=zctx) as w:
        assert w.append("notes", "a").seq == 1
        keys.clients.write_text(f"{keys.admin.public_hex} admin\n{newcomer.public_hex} write\n")
        os.kill(n.proc.pid, signal.SIGHUP)
        wait_for(lambda: "allowlists reloaded" in n.output(), what="the reload")
        with pytest.raises(Forbidden, match="not .or no longer. allowed"):
            w.append("notes", "b")  # its open connection: refused from its next request
    with keys.client(n, newcomer, server, zctx=zctx) as c:
        assert c.append("notes", "c").seq == 2
    keys.clients.write_text("not a key file\n")
    os.kill(n.proc.pid, signal.SIGHUP)
    wait_for(lambda: "keeping the current allowlists" in n.output(), what="the refused reload")
    with keys.client(n, newcomer, server, zctx=zctx) as c:
        assert c.head("notes").size == 2  # a broken file changed nothing


def peer_pair(node_factory, tmp_path):
    keys = Keys(tmp_path)
    k1, k2 = node_key(tmp_path, "n1"), node_key(tmp_path, "n2")
    peers = tmp_path / "peers.txt"
    peers.write_text(f"n1 {k1.public_hex}\nn2 {k2.public_hex}\n")
    common = ["--peer-keys", str(peers), "--client-keys", str(keys.clients), "--heartbeat-ms", "100"]
    n1 = node_factory("--id", "n1", *common, name="n1")
    n2 = node_factory("--id", "n2", *common, "--peers", f"n1@{n1.address.removeprefix('tcp://')}", name="n2")
    return keys, (n1, k1), (n2, k2)


def test_a_mesh_with_keys_replicates_redirects_with_the_writers_key_and_counts_acks(node_factory, tmp_path, zctx):
    keys, (n1, k1), (n2, k2) = peer_pair(node_factory, tmp_path)
    with keys.client(n1, keys.writer, k1, zctx=zctx) as c1, keys.client(n2, keys.writer, k2, zctx=zctx) as c2:
        wait_for(lambda: [p["state"] for p in c1.status()["peers"]] == ["alive"], what="n1 to see n2")
        for i in range(5):
            c1.append("notes", f"e{i}")
        wait_for(lambda: size(c2, "notes") == 5, what="the replica")
        e = c2.append("notes", "via n2")  # NOT_WRITER, followed to n1 with n1's key from the reply
        assert (e.seq, e.writer) == (6, "n1")
        c1.append("notes", "held twice", replicas=1)
        assert c1.last_replicated == 1


def test_a_peer_cannot_speak_for_another_node_id(node_factory, tmp_path, zctx):
    keys, (n1, k1), (n2, k2) = peer_pair(node_factory, tmp_path)
    # n2's own key, used by a program that claims to be someone else: the issue's impostor of n1
    with Client(n1.address, key=k2, server_key=k1.public_hex, zctx=zctx, timeout=3) as fake:
        with pytest.raises(Forbidden, match="naming node 'n1' over the connection of node 'n2'"):
            fake.call("heartbeat", node_id="n1", address="127.0.0.1:9", pub="127.0.0.1:10", boot="b",
                      lamport=1, entries=0, cluster="ledger")
        with pytest.raises(Forbidden, match="naming node 'ghost'"):
            fake.call("ack", node_id="ghost", acks=[["notes", 1]])
        with pytest.raises(Forbidden, match="append is not allowed for the peer role"):
            fake.append("notes", "a peer is not a client")


@pytest.mark.parametrize("args, says", [
    (["--peer-keys", "{peers}", "--peers", "127.0.0.1:7400"], "each entry names its node, NODE_ID@HOST:PORT"),
    (["--peer-keys", "{peers}", "--peers", "n9@127.0.0.1:7400"], "node n9 is not in --peer-keys"),
    (["--peer-keys", "{bad}"], "line 1: expected 'NODE_ID PUBLIC_KEY'"),
    (["--client-keys", "{missing}"], "cannot read"),
    (["--client-keys", "{peers}", "--insecure"], "exclude each other"),
])
def test_key_configuration_errors_are_one_line(tmp_path, args, says):
    import subprocess
    import sys

    peers = tmp_path / "peers.txt"
    peers.write_text(f"n1 {Identity.generate().public_hex}\n")
    bad = tmp_path / "bad.txt"
    bad.write_text("n1\n")
    argv = [a.format(peers=peers, bad=bad, missing=tmp_path / "nope.txt") for a in args]
    r = subprocess.run([sys.executable, "-m", "node.main", "--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0",
                        *argv], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_keys_let_a_node_serve_beyond_loopback_without_insecure(node_factory, tmp_path, zctx):
    keys = Keys(tmp_path)
    server = node_key(tmp_path, "n1")
    n = node_factory("--listen", "0.0.0.0:0", "--advertise", "127.0.0.1:7", "--client-keys", str(keys.clients))
    port = n.address.rpartition(":")[2]
    with Client(f"127.0.0.1:{port}", key=keys.admin, server_key=server.public_hex, zctx=zctx, timeout=3) as c:
        assert c.status()["security"] == "curve"


def test_the_cli_speaks_to_a_node_with_keys(keyed, tmp_path, capsys):
    import json

    from tools import cli

    n, keys, server = keyed
    key_file = tmp_path / "writer.key"
    write_key_file(str(key_file), keys.writer)
    addr = n.address.removeprefix("tcp://")
    base = ["--node", addr, "--json", "--key-file", str(key_file), "--server-key", server.public_hex]
    assert cli.main([*base, "append", "notes", "from the cli"]) == 0
    assert json.loads(capsys.readouterr().out)["seq"] == 1
    assert cli.main([*base, "get", "notes"]) == 0
    assert json.loads(capsys.readouterr().out)["payload"] == "from the cli"
    assert cli.main(["--node", addr, "--key-file", str(key_file), "get", "notes"]) == 2
    assert "--key-file and --server-key go together" in capsys.readouterr().err
    assert cli.main(["--node", addr, "--timeout", "0.5", "get", "notes"]) == 1  # no key: no answer, a clear error
    assert "only clients with an allowlisted key (--key-file" in capsys.readouterr().err
    stranger = tmp_path / "stranger.key"
    write_key_file(str(stranger), keys.stranger)
    assert cli.main(["--node", addr, "--timeout", "0.5", "--key-file", str(stranger), "--server-key",
                     server.public_hex, "get", "notes"]) == 1
    assert "is it in the node's client allowlist" in capsys.readouterr().err


# -- signed heads (SPEC 13.6) ------------------------------------------------------------------


def test_a_writer_signs_its_heads_and_a_reader_pinning_its_key_checks_them(node_factory, zctx, capsys):
    import dataclasses
    import json

    from protocol.errors import IntegrityError
    from tools import cli

    n = node_factory()  # no keys needed for this: every node has its identity
    with Client(n.address, zctx=zctx) as c:
        writer = c.status()["public_key"]
        for i in range(5):
            c.append("notes", f"e{i}")
        h = c.head("notes", writer_key=writer)
        assert h.signed is not None and h.signed.size == 5 and h.signed.root == h.root and h.verified == 5
        with pytest.raises(IntegrityError, match="not signed by the writer key"):
            c.head("notes", writer_key=Identity.generate().public_hex)
        assert c.verify_context("notes", writer_key=writer)["signed_size"] == 5
    addr = n.address.removeprefix("tcp://")
    assert cli.main(["--node", addr, "--json", "head", "notes", "--writer-key", writer]) == 0
    assert json.loads(capsys.readouterr().out)["verified_size"] == 5
    assert cli.main(["--node", addr, "head", "notes", "--writer-key", Identity.generate().public_hex]) == 1
    assert "INTEGRITY" in capsys.readouterr().err
    assert cli.main(["--node", addr, "verify", "notes", "--writer-key", writer]) == 0
    assert "signed by its writer up to #5" in capsys.readouterr().out
    assert cli.main(["--node", addr, "verify", "notes", "--writer-key", "nothex"]) == 2
    capsys.readouterr()
    # get and proof, end to end against the writer's key: an inclusion proof per entry, under the signed root
    assert cli.main(["--node", addr, "--json", "get", "notes", "--writer-key", writer]) == 0
    assert [json.loads(x)["payload"] for x in capsys.readouterr().out.splitlines()] == [f"e{i}" for i in range(5)]
    assert cli.main(["--node", addr, "get", "notes", "--writer-key", Identity.generate().public_hex]) == 1
    assert cli.main(["--node", addr, "--json", "proof", "notes", "3", "--writer-key", writer]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["size"] == 5
    assert cli.main(["--node", addr, "proof", "notes", "3", "--writer-key", Identity.generate().public_hex]) == 1
    assert cli.main(["--node", addr, "get", "notes", "--fork", "x", "--pin"]) == 2
    capsys.readouterr()
    assert cli.main(["--node", addr, "--json", "watch", "notes", "--after", "0", "--count", "2",
                     "--writer-key", writer]) == 0
    assert [json.loads(x)["seq"] for x in capsys.readouterr().out.splitlines()] == [1, 2]
    with Client(n.address, zctx=zctx) as c:
        # watch too: every entry proven under the writer's signed head before it is handed out
        with c.watch("notes", after=3, writer_key=writer) as w:
            it = iter(w)
            assert [next(it).payload for _ in range(2)] == [b"e3", b"e4"]
            c.append("notes", "e5")
            assert next(it).payload == b"e5" and w.state.checked == 6
        with c.watch("notes", after=0, writer_key=Identity.generate().public_hex) as w, \
                pytest.raises(IntegrityError, match="not signed by the writer key"):
            next(iter(w))
        entries = c.get("notes").entries[:5]
        assert c.check_entries("notes", entries, writer) == 6
        forged = entries[:2] + [dataclasses.replace(entries[2], hash=entries[3].hash)]
        with pytest.raises(IntegrityError, match="#3 is not the entry its writer signed"):
            c.check_entries("notes", forged, writer)


def test_with_keys_a_replica_serves_the_head_its_writer_signed_so_a_reader_of_the_replica_checks_it(
        node_factory, tmp_path, zctx):
    keys, (n1, k1), (n2, k2) = peer_pair(node_factory, tmp_path)
    with keys.client(n1, keys.writer, k1, zctx=zctx) as c1, keys.client(n2, keys.writer, k2, zctx=zctx) as c2:
        wait_for(lambda: [p["state"] for p in c1.status()["peers"]] == ["alive"], what="n1 to see n2")
        for i in range(20):
            c1.append("notes", f"e{i}")
        wait_for(lambda: size(c2, "notes") == 20, what="the replica")
        # asked of the replica, signed by the writer: each pushed message carries the writer's signature,
        # and so does each pull reply from the writer (the first entries may come either way)
        wait_for(lambda: verified(c2, "notes", k1) == 20, what="the signed head")
        h = c2.head("notes", writer_key=k1.public_hex)
        assert h.signed is not None and h.signed.key == k1.public and h.signed.root == h.root
        assert c2.verify_context("notes", writer_key=k1.public_hex)["signed_size"] == 20
        # and by pushes alone, once n2 is subscribed to n1's replication stream
        wait_for(lambda: c1.status()["replication_subscribers"] >= 1, what="n2's subscription")
        before = c2.status()["replication"]["pushed_entries"]
        for i in range(10):
            c1.append("notes", f"f{i}")
        wait_for(lambda: verified(c2, "notes", k1) == 30, what="the signed head after pushes")
        st = c2.status()["replication"]
        assert st["unsigned_pushes"] == 0 and st["pushed_entries"] > before


@pytest.mark.parametrize("cache", [[], ["--context-cache", "1", "--hot-bytes", "1"]], ids=["in-ram", "cache-of-one"])
def test_with_keys_a_new_node_catches_up_from_a_replica_while_the_writer_is_down(node_factory, tmp_path, zctx,
                                                                                 cache):
    # with a cache of one context on the replica, the others are read back from their records:
    # their writer's signed heads must come back with them (they are kept in the records)
    keys = Keys(tmp_path)
    ks = {n: node_key(tmp_path, n) for n in ("n1", "n2", "n3")}
    peers = tmp_path / "peers.txt"
    peers.write_text("".join(f"{n} {k.public_hex}\n" for n, k in ks.items()))
    common = ["--peer-keys", str(peers), "--client-keys", str(keys.clients), "--heartbeat-ms", "100"]
    names = ("notes", "plans", "facts")
    n1 = node_factory("--id", "n1", *common, name="n1")
    n2 = node_factory("--id", "n2", *common, *cache, "--peers", f"n1@{n1.address.removeprefix('tcp://')}", name="n2")
    with keys.client(n1, keys.writer, ks["n1"], zctx=zctx) as c1, keys.client(n2, keys.writer, ks["n2"], zctx=zctx) as c2:
        for i in range(25):
            for name in names:
                c1.append(name, f"e{i}")
        for name in names:
            wait_for(lambda name=name: verified(c2, name, ks["n1"]) == 25, what=f"n2's signed copy of {name}")
        if cache:
            wait_for(lambda: c2.status()["context_cache"]["evictions"] > 0, what="n2 evicting contexts")
    n1.kill()  # the writer is gone: n3 can only get the entries from n2, under n1's signature
    n3 = node_factory("--id", "n3", *common, "--peers", f"n2@{n2.address.removeprefix('tcp://')}", name="n3")
    with keys.client(n3, keys.writer, ks["n3"], zctx=zctx) as c3:
        for name in names:
            wait_for(lambda name=name: verified(c3, name, ks["n1"]) == 25, what=f"n3's copy of {name}, checked against n1's key")
            assert c3.verify_context(name, writer_key=ks["n1"].public_hex)["signed_size"] == 25
        assert c3.status()["replication"]["unsigned_pulls"] == 0


def test_watching_follows_the_keys_prefixes_and_only_peers_get_the_replication_stream(keyed, zctx):
    import zmq

    from protocol import watch
    from protocol.keys import curve_public

    n, keys, server = keyed
    with keys.client(n, keys.writer, server, zctx=zctx) as w, keys.client(n, keys.reader, server, zctx=zctx) as r:
        w.append("secrets", "not for the reader")
        with pytest.raises(Forbidden):
            for _ in r.watch("secrets", after=0):  # refused at the node (`limited`), then its poll: FORBIDDEN
                break
        # a client key asking for the replication stream (every context this node writes) gets nothing
        sub = zctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        pub, sec = keys.admin.curve_keypair()
        sub.setsockopt(zmq.CURVE_PUBLICKEY, pub)
        sub.setsockopt(zmq.CURVE_SECRETKEY, sec)
        sub.setsockopt(zmq.CURVE_SERVERKEY, curve_public(server.public))
        sub.connect(r.pub_address())
        sub.setsockopt(zmq.SUBSCRIBE, watch.REPL_PREFIX)
        try:
            wait_for(lambda: w.status()["watchers_forbidden"] >= 2, what="the refused subscription")
            for i in range(5):
                w.append("secrets", f"s{i}")
            assert not sub.poll(500)
        finally:
            sub.close(linger=0)


def test_the_cli_pins_a_writers_key_on_first_use_and_holds_it_to_that_key(node_factory, zctx, tmp_path, capsys,
                                                                          monkeypatch):
    import json

    from tools import cli

    known = tmp_path / "known_writers"
    monkeypatch.setenv("LEDGER_KNOWN_WRITERS", str(known))
    n = node_factory()
    with Client(n.address, zctx=zctx) as c:
        c.append("notes", "one")
        key = c.status()["public_key"]
    addr = n.address.removeprefix("tcp://")
    assert cli.main(["--node", addr, "--json", "head", "notes", "--pin"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["verified_size"] == 1 and "pinned writer" in out.err
    assert known.read_text() == f"{n.node_id} {key}\n"
    assert cli.main(["--node", addr, "verify", "notes", "--pin"]) == 0  # the pinned key, silently
    out = capsys.readouterr()
    assert "signed by its writer up to #1" in out.out and "pinned" not in out.err
    known.write_text(f"{n.node_id} {Identity.generate().public_hex}\n")  # as if the writer's key had changed
    assert cli.main(["--node", addr, "head", "notes", "--pin"]) == 1
    assert "INTEGRITY" in capsys.readouterr().err
    known.write_text("garbage\n")
    assert cli.main(["--node", addr, "head", "notes", "--pin"]) == 2
    assert "known writers file" in capsys.readouterr().err


def test_with_keys_a_snapshot_loads_only_under_a_head_signed_by_a_trusted_writer(node_factory, tmp_path, zctx):
    import io

    import msgpack

    from protocol.errors import IntegrityError
    from protocol.heads import SignedHead, sign_head
    from protocol.snapshot import encode_header, read_snapshot

    keys = Keys(tmp_path)
    k1, k3 = node_key(tmp_path, "n1"), node_key(tmp_path, "n3")
    peers = tmp_path / "peers.txt"
    peers.write_text(f"n1 {k1.public_hex}\nn3 {k3.public_hex}\n")
    common = ["--peer-keys", str(peers), "--client-keys", str(keys.clients)]
    n1 = node_factory("--id", "n1", *common, name="n1")
    n3 = node_factory("--id", "n3", *common, name="n3")  # trusts n1's key, not connected to it
    with keys.client(n1, keys.admin, k1, zctx=zctx) as c1:
        for i in range(10):
            c1.append("notes", f"e{i}")
        buf = io.BytesIO()
        c1.snapshot("notes", buf)
    header, entries = read_snapshot(io.BytesIO(buf.getvalue()))
    assert header["signed"]["size"] == 10 and header["signed"]["key"] == k1.public  # n1 signed it
    body = b"".join(msgpack.packb(e.to_wire(), use_bin_type=True) for e in entries)

    def file_with(signed: SignedHead | None) -> io.BytesIO:
        return io.BytesIO(encode_header("notes", 10, header["root"], signed) + body)

    good = SignedHead(**header["signed"])
    with keys.client(n3, keys.admin, k3, zctx=zctx) as c3:
        with pytest.raises(Forbidden, match="needs the snapshot's head signed"):
            c3.load("notes", file_with(None))
        with pytest.raises(Forbidden, match="a key this node does not trust"):
            c3.load("notes", file_with(sign_head(Identity.generate(), "notes", 10, header["root"])))
        with pytest.raises(IntegrityError, match="does not verify"):
            c3.load("notes", file_with(good._replace(sig=bytes(64))))
        with pytest.raises(Forbidden, match="not by the key of its writer 'n1'"):  # trusted, but not n1's (#18)
            c3.load("notes", file_with(sign_head(k3, "notes", 10, header["root"])))
        assert "notes" not in [x["name"] for x in c3.contexts()]  # nothing was loaded by the refusals
        h = c3.load("notes", file_with(good))
        assert h.size == 10 and h.root == header["root"]
        # n3 holds n1's context as a replica, with the head n1 signed (SPEC 6.9, 6.4)
        assert h.writer == "n1" and c3.head("notes", writer_key=k1.public).signed == good


def test_with_keys_a_writer_that_lost_its_tail_leaves_both_signed_histories_on_its_replica(
        node_factory, tmp_path, zctx):
    keys = Keys(tmp_path)
    k1, k2 = node_key(tmp_path, "n1"), node_key(tmp_path, "n2")
    peers = tmp_path / "peers.txt"
    peers.write_text(f"n1 {k1.public_hex}\nn2 {k2.public_hex}\n")
    common = ["--peer-keys", str(peers), "--client-keys", str(keys.clients), "--heartbeat-ms", "100"]
    # n1 writes in async mode and flushes rarely: a kill -9 loses what it acknowledged since
    n1 = node_factory("--id", "n1", *common, "--flush-ms", "60000", name="n1").pin_ports()
    n2 = node_factory("--id", "n2", *common, "--peers", f"n1@{n1.address.removeprefix('tcp://')}", name="n2")
    with keys.client(n2, keys.writer, k2, zctx=zctx) as c2:
        with keys.client(n1, keys.writer, k1, zctx=zctx) as c1:
            wait_for(lambda: c1.status()["replication_subscribers"] >= 1, what="n2's subscription")
            for i in range(20):
                c1.append("notes", f"old{i}")
        wait_for(lambda: verified(c2, "notes", k1) == 20, what="n2's signed copy")
        n1.kill()
        n1.start()
        with keys.client(n1, keys.writer, k1, zctx=zctx) as c1:
            before = c1.head("notes").size if "notes" in [x["name"] for x in c1.contexts()] else 0
            for i in range(3):
                c1.append("notes", f"new{i}")
        assert before < 20  # the unflushed tail is gone from n1
        wait_for(lambda: c2.status()["equivocations"], timeout=20, what="the equivocation record")
        (rec,) = c2.status()["equivocations"]
        assert rec["context"] == "notes" and rec["writer"] == "n1" and rec["heads"][0]["size"] == 20
        assert rec["heads"][0]["key"] == rec["heads"][1]["key"] == k1.public
        from protocol import merkle

        old, new = rec["heads"]
        assert rec["root_at"] == new["size"] and rec["root"] != new["root"]  # two histories at one size...
        merkle.verify_consistency(new["size"], old["size"], rec["root"], old["root"], rec["proof"])  # ...proven
        assert "EQUIVOCATION" in n2.output() and c2.call("head", context="notes")["equivocation"]["writer"] == "n1"
        wait_for(lambda: size(c2, "notes") == before + 3, what="n2 to follow n1's new history (17.4)")


def test_a_node_whose_key_is_not_the_one_its_peer_list_binds_it_to_refuses_to_start(tmp_path):
    import subprocess
    import sys

    peers = tmp_path / "peers.txt"
    peers.write_text(f"n1 {Identity.generate().public_hex}\n")
    node_key(tmp_path, "n1")
    r = subprocess.run([sys.executable, "-m", "node.main", "--id", "n1", "--data", str(tmp_path / "n1"), "--listen",
                        "127.0.0.1:0", "--peer-keys", str(peers)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "binds this node's id 'n1'" in r.stderr and "its peers would refuse it" in r.stderr


def test_pin_mismatch_says_the_writer_key_changed_and_where_it_is_pinned(node_factory, zctx, tmp_path, capsys,
                                                                        monkeypatch):
    from tools import cli

    known = tmp_path / "known_writers"
    monkeypatch.setenv("LEDGER_KNOWN_WRITERS", str(known))
    n = node_factory()
    with Client(n.address, zctx=zctx) as c:
        c.append("notes", "one")
    addr = n.address.removeprefix("tcp://")
    known.write_text(f"{n.node_id} {Identity.generate().public_hex}\n")
    assert cli.main(["--node", addr, "head", "notes", "--pin"]) == 1
    err = capsys.readouterr().err
    assert f"the key of writer '{n.node_id}' changed" in err and str(known) in err
    assert cli.main(["--node", addr, "head", "notes", "--pin", "--writer-key", "ab" * 32]) == 2
    assert "exclude each other" in capsys.readouterr().err
