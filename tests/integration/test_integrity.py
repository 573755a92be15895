"""Integrity at rest: a data folder damaged while the node was stopped (a truncated LevelDB
`.log`, a byte flipped in an `.ldb` table) is reported, never served silently, and repaired
from a peer where one holds the missing tail (ARCHITECTURE invariant 11)."""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import subprocess
import sys

import plyvel
import pytest

from node import storage as st
from protocol.client import Client
from protocol.errors import IntegrityError, Unavailable
from tests.integration.test_cli import run as cli_run
from tests.integration.test_identity import run_node
from tests.integration.test_mesh import converged, mesh, status, wait_for

pytestmark = pytest.mark.timeout(120)


def _fill(n, zctx, name: str, count: int, payload=lambda i: f"p{i}".encode()) -> None:
    with Client(n.address, zctx=zctx) as c:
        for _ in c.append_many(name, (payload(i) for i in range(count)), window=200):
            pass


def _seeded_payloads(n: int) -> tuple[random.Random, list[bytes]]:
    """A seeded generator (SEED=... replays a run; the seed is printed) and `n` random 64-byte
    payloads from it: incompressible, so each is found as is in a LevelDB table."""
    rng = random.Random()
    seed = int(os.environ.get("SEED", rng.randrange(1 << 30)))
    print("seed", seed)
    rng.seed(seed)
    return rng, [rng.randbytes(64) for _ in range(n)]


def _stop_and_cut_log(n) -> None:
    """A clean stop, then the entries' LevelDB .log cut to nine tenths (what a lost tail of writes
    looks like; DATA/entries is the store of the entries, storage format 2)."""
    assert n.stop() == 0
    log = _only(str(n.data / "entries" / "*.log"))
    os.truncate(log, os.path.getsize(log) * 9 // 10)


def _forget_clean_stop(data) -> None:
    db = plyvel.DB(str(data))
    db.delete(st.meta_key("clean"), sync=True)
    db.close()


def _only(pattern: str) -> str:
    files = sorted(glob.glob(pattern), key=os.path.getsize)
    assert files, f"no file matches {pattern}"
    return files[-1]


def test_truncated_log_is_reported_not_served_silently(node_factory, zctx):
    n = node_factory()
    _fill(n, zctx, "other", 10)  # first: in the part of the .log that survives
    _fill(n, zctx, "c", 2000)
    with Client(n.address, zctx=zctx) as c:
        before = c.head("c")
    _stop_and_cut_log(n)
    n.start()
    with Client(n.address, zctx=zctx) as c:
        h = c.head("c")
        assert h.size < 2000
        assert h.damaged == {"expected_size": 2000, "expected_root": before.root, "size": h.size}
        st = c.status()
        assert [d["context"] for d in st["damaged"]] == ["c"]
        assert c.get("c", after=h.size - 1).entries[0].seq == h.size  # the rest is served
        assert c.head("other").damaged is None and len(c.get("other").entries) == 10
    assert "INTEGRITY" in n.output() and "came back from disk shorter" in n.output()


def _replicated_then_cut(node_factory, zctx, name: str, victim: int):
    """Two nodes, 2,000 entries of `name` written at the first and replicated to the second, then
    node `victim` (0 or 1) stopped, its LevelDB log cut and started again. Returns (n1, n2, the
    head before)."""
    nodes = mesh(node_factory, 2)
    n1, n2 = nodes
    nodes[victim].pin_ports()
    _fill(n1, zctx, name, 2000)
    wait_for(lambda: converged(nodes, zctx, [name], {name: 2000}), what="replication")
    wait_for(lambda: status(nodes[victim], zctx)["pending_writes"] == 0, what="the victim to be on disk")
    with Client(n1.address, zctx=zctx) as c:
        want = c.head(name)
    _stop_and_cut_log(nodes[victim])
    nodes[victim].start()
    assert "came back from disk shorter" in nodes[victim].output()
    return n1, n2, want


def test_truncated_log_at_a_replica_is_repaired_from_its_peer(node_factory, zctx):
    n1, n2, want = _replicated_then_cut(node_factory, zctx, "rep", victim=1)
    wait_for(lambda: converged([n1, n2], zctx, ["rep"], {"rep": 2000}), what="repair from the peer")
    with Client(n2.address, zctx=zctx) as c:
        # the damage is cleared once the refilled entries are on disk, a flush after they arrive
        wait_for(lambda: c.head("rep").damaged is None, what="the refilled entries to be on disk")
        h = c.head("rep")
        assert (h.size, h.root, h.damaged) == (2000, want.root, None)
        assert c.status()["damaged"] == []
    wait_for(lambda: "is repaired" in n2.output(), what="the repair to be logged")


def test_truncated_log_at_a_writer_is_refilled_from_its_replica_before_it_appends_again(node_factory, zctx):
    """The writer's disk lost entries its replicas hold: it takes them back from a replica (no seq
    acknowledged before is reused), the replica keeps its copy (no fork), and appends go on."""
    n1, n2, want = _replicated_then_cut(node_factory, zctx, "w", victim=0)
    wait_for(lambda: converged([n1, n2], zctx, ["w"], {"w": 2000}), what="the writer's repair from its replica")
    with Client(n1.address, zctx=zctx) as c:
        # the damage is cleared once the refilled entries are on disk, a flush after they arrive
        wait_for(lambda: c.head("w").damaged is None, what="the refilled entries to be on disk")
        h = c.head("w")
        assert (h.size, h.root, h.damaged) == (2000, want.root, None)
        e = c.append("w", b"after the repair")
        assert e.seq == 2001
    wait_for(lambda: converged([n1, n2], zctx, ["w"], {"w": 2001}), what="the new entry to replicate")
    for n in (n1, n2):
        assert status(n, zctx)["forks"] == [], n.name
    assert "FORK" not in n2.output()
    wait_for(lambda: "is repaired" in n1.output(), what="the repair to be logged")


def test_a_writer_with_no_replica_refuses_appends_until_accept_damage(node_factory, zctx, capsys):
    n = node_factory()
    _fill(n, zctx, "w", 2000)
    _stop_and_cut_log(n)
    n.start()
    with Client(n.address, zctx=zctx, retries=0) as c:
        size = c.head("w").size
        assert size < 2000
        with pytest.raises(Unavailable) as exc:
            c.append("w", b"would reuse an acknowledged seq")
        assert exc.value.details == {"context": "w", "size": size, "expected_size": 2000}
        assert c.head("w").size == size
        c.append("elsewhere", b"other contexts are fine")
    # the CLI says so too: `head` shows it, `verify` of what is served passes but exits 1
    rc, out, _ = cli_run(capsys, n, "head", "w")
    assert rc == 0 and json.loads(out)["damaged"]["expected_size"] == 2000
    rc, out, err = cli_run(capsys, n, "verify", "w")
    assert rc == 1 and json.loads(out)["size"] == size and "reported damaged" in err
    assert n.stop() == 0
    n.args += ["--accept-damage"]
    n.start()
    assert "--accept-damage" in n.output() and "'w'" in n.output()
    with Client(n.address, zctx=zctx) as c:
        assert c.append("w", b"goes on").seq == size + 1
        assert c.head("w").damaged is None


def test_flipped_byte_in_a_table_is_never_served(node_factory, zctx):
    rng, payloads = _seeded_payloads(200)  # incompressible: found as is in the table
    n = node_factory("--log-level", os.environ.get("LOGLEVEL", "info"))
    _fill(n, zctx, "bad", 200, payload=lambda i: payloads[i])
    _fill(n, zctx, "good", 50)
    assert n.stop() == 0
    db = plyvel.DB(str(n.data / "entries"))  # move everything from the .log into .ldb tables
    db.compact_range()
    db.close()
    # in the middle: the blocks start-up reads (the context records, which share a block with the
    # first entries; a context's last entries) stay sound; damage there is the one-line error of
    # test_a_folder_damaged_beyond_reading_gives_one_line_not_a_traceback
    # (the first found as is: LevelDB's block compression may, rarely, split one payload)
    tables = {t: bytearray(open(t, "rb").read()) for t in glob.glob(str(n.data / "entries" / "*.ldb"))}
    hit = None
    for victim in rng.sample(range(60, 130), 70):
        for table, data in tables.items():
            at = data.find(payloads[victim])
            if at >= 0:
                data[at + 10] ^= 0x01
                open(table, "wb").write(data)
                hit = table
                break
        if hit:
            break
    assert hit, "no payload found in any table"
    n.start()
    with Client(n.address, zctx=zctx) as c:
        with pytest.raises(IntegrityError):
            c.get("bad", after=victim, limit=1)
        with pytest.raises(IntegrityError):
            c.get("bad")  # a range that covers it
        # each entry is served as written or refused: those sharing the damaged block with it
        # (LevelDB's checksum covers a block of a few KiB) are refused too, the rest are served
        refused = []
        for seq in range(1, 201):
            try:
                (e,) = c.get("bad", after=seq - 1, limit=1).entries
                assert e.payload == payloads[seq - 1]
            except IntegrityError:
                refused.append(seq)
        assert victim + 1 in refused and len(refused) < 40, refused
        assert len(c.get("good").entries) == 50
        assert c.head("bad").damaged["bad_seq"] == min(refused)
        with pytest.raises(IntegrityError):  # nor does it go out in a snapshot (what peers pull)
            c.call("snapshot", context="bad")
        assert c.status()["integrity_errors"] >= 2
    assert "INTEGRITY" in n.output()


def _flip_in_tables(n, payloads: list[bytes], candidates) -> int:
    """Compact a stopped node's folder into tables and flip a byte of the first candidate entry's
    payload found as is; returns that entry's index."""
    db = plyvel.DB(str(n.data / "entries"))
    db.compact_range()
    db.close()
    tables = {t: bytearray(open(t, "rb").read()) for t in glob.glob(str(n.data / "entries" / "*.ldb"))}
    for victim in candidates:
        for table, data in tables.items():
            at = data.find(payloads[victim])
            if at >= 0:
                data[at + 10] ^= 0x01
                open(table, "wb").write(data)
                return victim
    raise AssertionError("no payload found in any table")


@pytest.mark.parametrize("damaged", ["replica", "writer"])
def test_a_flipped_byte_is_rewritten_from_a_peers_copy(node_factory, zctx, damaged):
    """Damage in the middle of a context (found by a read or the scrub) is fetched again from a
    peer and checked against this node's Merkle tree before it is written."""
    rng, payloads = _seeded_payloads(300)
    n1, n2 = mesh(node_factory, 2)
    _fill(n1, zctx, "c", 300, payload=lambda i: payloads[i])
    _fill(n1, zctx, "zz-other", 50)
    wait_for(lambda: converged([n1, n2], zctx, ["c"], {"c": 300}), what="replication")
    wait_for(lambda: status(n2, zctx)["pending_writes"] == 0 and status(n1, zctx)["pending_writes"] == 0,
             what="both on disk")
    victim_node = n2 if damaged == "replica" else n1
    victim_node.pin_ports()
    assert victim_node.stop() == 0
    victim = _flip_in_tables(victim_node, payloads, rng.sample(range(80, 220), 140))
    victim_node.start()
    with Client(victim_node.address, zctx=zctx) as c:
        try:
            c.get("c", after=victim, limit=1)  # finds it (or the scrub did already)
        except IntegrityError:
            pass

        def whole() -> bool:
            try:
                return [e.payload for e in c.iter_entries("c")] == payloads
            except IntegrityError:
                return False
        try:
            wait_for(whole, what="the damaged entries to be rewritten from the peer")
        except AssertionError:
            print(victim_node.output())
            raise
        assert c.head("c").damaged is None
        assert c.status()["replication"]["rewritten_entries"] >= 1
    assert "rewritten from a peer's copy" in victim_node.output()


@pytest.mark.parametrize("damage", ["flip_log", "truncate_ldb"])
def test_a_folder_damaged_beyond_reading_gives_one_line_not_a_traceback(node_factory, zctx, damage):
    n = node_factory()
    _fill(n, zctx, "c", 3000, payload=lambda i: os.urandom(100))
    assert n.stop() == 0
    if damage == "flip_log":
        log = _only(str(n.data / "entries" / "*.log"))
        with open(log, "r+b") as f:
            f.seek(os.path.getsize(log) // 3)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0xFF]))
    else:
        db = plyvel.DB(str(n.data / "entries"))
        db.compact_range()
        db.close()
        table = _only(str(n.data / "entries" / "*.ldb"))
        os.truncate(table, os.path.getsize(table) // 2)
    try:
        n.start(timeout=10)
    except RuntimeError:
        print("refused to start")  # the message is checked below
    else:
        print("started")
        with Client(n.address, zctx=zctx) as c:  # it started: what LevelDB dropped must not pass silently
            with pytest.raises(IntegrityError):
                for _ in c.iter_entries("c"):
                    pass
            assert c.head("c").damaged["bad_seq"] >= 1
            assert [d["context"] for d in c.status()["damaged"]] == ["c"]
        n.stop()
        return
    out = n.output()
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("ledger-node: error:")]
    assert len(errors) == 1 and "damaged" in errors[0], out
    print(errors[0])


def _check(data) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.main", "--check", str(data)], capture_output=True,
                          text=True, timeout=60)


def test_check_reads_a_stopped_folder_whole_and_names_the_damage(node_factory, zctx):
    clean = node_factory(name="clean")
    _fill(clean, zctx, "c", 300)
    assert clean.stop() == 0
    r = _check(clean.data)
    assert r.returncode == 0 and "ok (1 histories, 300 entries" in r.stdout, r.stdout + r.stderr
    n = node_factory()
    _fill(n, zctx, "first", 10)
    _fill(n, zctx, "c", 2000)
    _stop_and_cut_log(n)
    r = _check(n.data)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "DAMAGED 'c': holds" in r.stdout and "of the 2000 it held" in r.stdout and "'first'" not in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    r = _check(n.data / "nothing-here")
    assert r.returncode == 2 and r.stdout.startswith("ledger-node: error:")
    # anywhere but first, --check is refused: argparse would have started a serving node on it
    r = subprocess.run([sys.executable, "-m", "node.main", "--data", str(n.data), "--check", str(n.data)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--check must come first" in r.stderr and "ready" not in r.stdout
    n.start()  # a running node's folder: told to stop it, not LevelDB's lock message
    r = _check(n.data)
    assert r.returncode == 2 and "in use by a running ledger-node" in r.stdout and "LOCK" not in r.stdout, r.stdout


def test_a_replica_context_start_up_cannot_read_is_served_empty_and_refilled(node_factory, zctx):
    """Damage in a block start-up reads (a context's last entries) costs that context, not the node."""
    rng, payloads = _seeded_payloads(200)
    n1, n2 = mesh(node_factory, 2)
    n2.pin_ports()
    _fill(n1, zctx, "rep", 200, payload=lambda i: payloads[i])
    # enough entries after rep's (ids in creation order) that the node's meta records, which sort
    # after every entry, are not in the damaged block
    _fill(n1, zctx, "zz-other", 200, payload=lambda i: os.urandom(64))
    wait_for(lambda: converged([n1, n2], zctx, ["rep", "zz-other"], {"rep": 200, "zz-other": 200}),
             what="replication")
    wait_for(lambda: status(n2, zctx)["pending_writes"] == 0, what="the replica to be on disk")
    with Client(n1.address, zctx=zctx) as c:
        want = c.head("rep")
    assert n2.stop() == 0
    db = plyvel.DB(str(n2.data / "entries"))
    db.compact_range()
    db.close()
    # After a clean stop start-up reads no entry (the scrub or a read finds such damage later):
    # take the clean-stop mark away, as a crash would have left none, so that it checks heads
    _forget_clean_stop(n2.data)
    hit = False
    # the last entry: start-up reads its block. Looked for by its middle 32 bytes: block
    # compression may, rarely, cut a payload's first or last bytes into a back-reference
    needle = payloads[199][16:48]
    for table in glob.glob(str(n2.data / "entries" / "*.ldb")):
        data = bytearray(open(table, "rb").read())
        at = data.find(needle)
        if at >= 0:
            data[at + 5] ^= 0x40
            open(table, "wb").write(data)
            hit = True
    if not hit:  # say where it is instead, for the next one who meets this
        where = {os.path.basename(f): (os.path.getsize(f), open(f, "rb").read().find(needle))
                 for f in glob.glob(str(n2.data / "*"))
                 if os.path.isfile(f)}
        raise AssertionError(f"the last entry's payload is in no table: {where}")
    n2.args += ["--log-level", os.environ.get("LOGLEVEL", "info")]
    n2.start()
    assert "cannot be read from storage" in n2.output()
    wait_for(lambda: converged([n1, n2], zctx, ["rep", "zz-other"], {"rep": 200, "zz-other": 200}),
             what="repair from the peer")
    with Client(n2.address, zctx=zctx) as c:
        wait_for(lambda: c.head("rep").damaged is None, what="the refilled entries to be on disk")
        h = c.head("rep")
        assert (h.size, h.root, h.damaged) == (200, want.root, None)
        assert [e.payload for e in c.get("rep", after=190).entries] == payloads[190:]


def test_a_folder_without_its_entries_store_is_refused_in_one_line(node_factory, zctx):
    """Storage format 2 keeps the entries in DATA/entries: a folder that lost it is refused, by
    the node and by --check, never started empty (which would hand out its seqs again)."""
    n = node_factory()
    _fill(n, zctx, "c", 20)
    assert n.stop() == 0
    shutil.rmtree(n.data / "entries")
    r = run_node("--data", str(n.data), "--listen", "127.0.0.1:0")
    assert r.returncode == 2 and "entries is missing" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _check(n.data)
    assert r.returncode == 2 and "entries is missing" in r.stdout + r.stderr
    assert not (n.data / "entries").exists()
