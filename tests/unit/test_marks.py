"""The durable high-water marks (node/marks.py) and what the ledger does with them at start-up."""

from __future__ import annotations

import dataclasses
import os

import msgpack
import pytest

from node import marks
from node import storage as st
from node.marks import Journal
from node.storage import MemoryKV
from protocol import codec
from protocol.entry import decode_entry
from protocol.errors import Conflict, IntegrityError, Unavailable
from tests.unit.test_ledger import app, make

pytestmark = pytest.mark.timeout(60)


def test_journal_replays_the_last_mark_per_context_and_cuts_a_torn_record(tmp_path):
    j = Journal(str(tmp_path))
    j.write(marks.n_record(1, "c1", "w") + marks.h_record(1, 5, b"a" * 32) + marks.h_record(2, 3, b"b" * 32), False)
    j.write(marks.h_record(1, 7, b"c" * 32), True)
    j.close()
    with open(tmp_path / marks.FILE, "ab") as f:
        f.write(marks.h_record(1, 9, b"d" * 32)[:20])  # killed in the middle of a write
    j = Journal(str(tmp_path))
    assert j.marks == {1: (7, b"c" * 32), 2: (3, b"b" * 32)}
    assert j.names == {1: ("c1", "w")} and j.torn == 20
    j.write(marks.h_record(2, 4, b"e" * 32), False)  # appended after the cut, not hidden behind it
    j.close()
    assert Journal(str(tmp_path)).marks[2] == (4, b"e" * 32)


def test_a_flipped_byte_ends_the_replay_there(tmp_path):
    data = bytearray(marks.h_record(1, 5, b"a" * 32) + marks.h_record(1, 6, b"b" * 32))
    data[marks.H_SIZE + 10] ^= 1
    got, _names, good = marks.parse(bytes(data))
    assert got == {1: (5, b"a" * 32)} and good == marks.H_SIZE


def test_journal_is_rewritten_when_it_outgrows_its_marks(tmp_path, monkeypatch):
    monkeypatch.setattr(marks, "MIN_COMPACT_BYTES", 0)
    led = make(journal=Journal(str(tmp_path)))
    for i in range(50):
        app(led, "c1", b"x%d" % i)
        led.flush_sync()
    # one context: the file holds about one mark, not fifty
    assert os.path.getsize(tmp_path / marks.FILE) < 4 * marks.H_SIZE + 64
    head = led.head("c1")
    led.close()
    assert Journal(str(tmp_path)).marks[led.contexts["c1"].id] == (50, head["root"])


def _replica(tmp_path, kv: MemoryKV | None = None):
    return make(kv, node_id="r", journal=Journal(str(tmp_path)))


def test_a_replica_that_came_back_shorter_is_reported_and_repaired_by_pulls(tmp_path):
    w = make(node_id="w")
    es = [app(w, "c1", b"e%d" % i) for i in range(20)]
    kv = MemoryKV()
    r = _replica(tmp_path, kv)
    r.apply_replicated("c1", es)
    r.flush_sync()
    r.close()
    # keep entries 1..10 and their Merkle state as a shorter log would (a fresh node holding 10)
    r10 = make(node_id="r")
    r10.apply_replicated("c1", es[:10])
    r10.flush_sync()
    kv2 = MemoryKV()
    kv2.write(list(r10.kv.scan(b"", b"\xff" * 8)))
    r = _replica(tmp_path, kv2)
    cid = r.contexts["c1"].id
    assert r.contexts["c1"].size == 10
    assert r.head("c1")["damaged"] == {"expected_size": 20, "expected_root": w.head("c1")["root"], "size": 10}
    assert [d["context"] for d in r.status()["damaged"]] == ["c1"]
    # half a repair, then a restart: the mark it is repaired to is not lowered
    r.apply_replicated("c1", es[10:15])
    r.flush_sync()
    r.close()
    r = _replica(tmp_path, kv2)
    assert r.head("c1")["damaged"]["expected_size"] == 20
    r.apply_replicated("c1", es[15:], w.head("c1")["root"])
    r.flush_sync()
    assert "damaged" not in r.head("c1") and r.status()["damaged"] == []
    r.close()
    r = _replica(tmp_path, kv2)
    assert "damaged" not in r.head("c1") and r.contexts["c1"].id == cid


def _damaged_writer(tmp_path, keep: int = 10, total: int = 20):
    """A writer whose disk came back holding `keep` of the `total` entries its mark recorded
    (as after a cut LevelDB log), and those entries as its replicas hold them."""
    w = _writer(tmp_path)
    es = [app(w, "c1", b"e%d" % i) for i in range(keep)]
    w.flush_sync()
    kept = list(w.kv.scan(b"", b"\xff" * 8))
    es += [app(w, "c1", b"e%d" % i) for i in range(keep, total)]
    w.flush_sync()
    root = w.head("c1")["root"]
    w.close()
    kv = MemoryKV()
    kv.write(kept)
    return _writer(tmp_path, kv), es, root


def _writer(tmp_path, kv: MemoryKV | None = None):
    return make(kv, node_id="w", journal=Journal(str(tmp_path)))


def test_a_writer_that_came_back_shorter_refuses_appends_until_its_replicas_refill_it(tmp_path):
    w, es, root = _damaged_writer(tmp_path)
    ctx = w.contexts["c1"]
    assert w.head("c1")["damaged"] == {"expected_size": 20, "expected_root": root, "size": 10}
    assert w.repairing(ctx) == (20, root)
    # an append now would reuse seq 11, which was acknowledged: refused, nothing changes
    for req in (codec.Append(context="c1", key="", payload=b"new", metadata={}),
                codec.AppendBatch(context="c1", items=(("", b"n", {}),))):
        with pytest.raises(Unavailable) as exc:
            (w.append if isinstance(req, codec.Append) else w.append_batch)(req)
        assert exc.value.details == {"context": "c1", "size": 10, "expected_size": 20}
        assert "refilled from its replicas" in str(exc.value)
    assert ctx.size == 10
    app(w, "other", b"o")  # other contexts take appends as usual
    # entries of its own past the mark are not taken from a peer (they would be someone else's)
    with pytest.raises(Conflict):
        w.apply_replicated("c1", es[10:] + [_fake_next(es[-1])])
    # its own entries back from a replica, up to the mark: taken, checked against the mark's root
    assert w.apply_replicated("c1", es[10:15]) is not None
    assert w.apply_replicated("c1", es[15:], root) is not None
    w.flush_sync()
    assert "damaged" not in w.head("c1") and w.repairing(ctx) is None
    assert decode_entry(w.append(codec.Append(context="c1", key="", payload=b"new", metadata={})).blobs[0]).seq == 21
    # repaired: a peer's entries naming this writer are refused again
    with pytest.raises(Conflict):
        w.apply_replicated("c1", [_fake_next(es[-1])])


def _fake_next(e):
    """An entry that claims to follow `e` in its context, by its writer."""
    f = dataclasses.replace(e, seq=e.seq + 1, payload=b"forged", lamport=e.lamport + 1)
    return dataclasses.replace(f, hash=f.computed_hash())


def test_a_repair_that_does_not_reach_the_marks_root_is_not_applied(tmp_path):
    w, es, root = _damaged_writer(tmp_path)
    other = make(node_id="w")  # another history under the same writer id: what a broken peer could hold
    lies = [app(other, "c1", b"x%d" % i) for i in range(20)]
    assert w.apply_replicated("c1", es[10:15]) is not None  # (a prefix cannot be checked yet)
    assert w.apply_replicated("c1", es[15:19] + lies[19:]) is None
    assert w.contexts["c1"].size == 15 and w.repairing(w.contexts["c1"]) == (20, root)


def test_accept_damage_takes_what_the_disk_holds_and_lowers_the_mark(tmp_path):
    w, es, root = _damaged_writer(tmp_path)
    replica_kv = MemoryKV()
    r = make(replica_kv, node_id="r", journal=None)
    r.apply_replicated("c1", es)  # a replica's damage is never "accepted": it refills from the writer
    assert w.accept_damage() == ["c1"]
    assert "damaged" not in w.head("c1") and w.status()["damaged"] == []
    assert decode_entry(w.append(codec.Append(context="c1", key="", payload=b"new", metadata={})).blobs[0]).seq == 11
    w.flush_sync()
    w.close()
    w = _writer(tmp_path, w.kv)  # the lowered mark is durable: no damage reported at the next start
    assert "damaged" not in w.head("c1") and w.contexts["c1"].size == 11
    assert w.accept_damage() == []


def test_a_context_whose_record_was_lost_is_recreated_empty_and_reported(tmp_path):
    w = make(node_id="w")
    es = [app(w, "c1", b"e%d" % i) for i in range(5)]
    r = _replica(tmp_path)
    r.apply_replicated("c1", es)
    r.flush_sync()
    r.close()
    r = _replica(tmp_path, MemoryKV())  # the whole log gone
    assert r.contexts["c1"].writer == "w" and r.contexts["c1"].size == 0
    assert r.head("c1")["damaged"]["expected_size"] == 5
    r.apply_replicated("c1", es)
    r.flush_sync()
    assert "damaged" not in r.head("c1")


def test_an_entry_that_does_not_match_its_hash_is_not_sent_in_a_snapshot(tmp_path):
    led = make(hot_bytes=0)
    for i in range(10):
        app(led, "c1", b"e%d" % i)
    led.flush_sync()
    led.evict()
    key = st.entry_key(led.contexts["c1"].id, 4)
    m = msgpack.unpackb(led.kv.get(key))
    m["payload"] = b"E3"  # rotted on disk
    led.kv.write([(key, msgpack.packb(m, use_bin_type=True))])
    with pytest.raises(IntegrityError):
        led.snapshot_page(codec.Snapshot(context="c1", after=0, limit=100, size=None))
    page = led.snapshot_page(codec.Snapshot(context="c1", after=4, limit=100, size=None))[1]
    assert [decode_entry(b).seq for b in page] == list(range(5, 11))
    assert led.head("c1")["damaged"]["bad_seq"] == 4 and led.integrity_errors == 1


def _rot(led, name: str, seq: int) -> None:
    key = st.entry_key(led.contexts[name].id, seq)
    m = msgpack.unpackb(led.kv.get(key))
    m["payload"] = b"rotted"
    led.kv.write([(key, msgpack.packb(m, use_bin_type=True))])


@pytest.mark.parametrize("size", [40, 37])  # the last block complete, or not
def test_a_damaged_block_is_rewritten_from_a_peers_copy_checked_against_the_merkle_tree(size):
    w = make(node_id="w")
    es = [app(w, "c1", b"e%d" % i) for i in range(size)]
    r = make(node_id="r", hot_bytes=0)
    r.apply_replicated("c1", es)
    r.flush_sync()
    r.evict()
    ctx = r.contexts["c1"]
    _rot(r, "c1", 12)
    _rot(r, "c1", 27)
    last_block = (33, size)
    _rot(r, "c1", size)
    assert r.hole_block(ctx) is None  # nothing found yet
    with pytest.raises(IntegrityError):
        r.entry_blob(ctx, 12)
    assert r.hole_block(ctx) == (9, 16)
    # a copy that is not this node's history, or not exactly the block, is not written
    other = make(node_id="w")
    lies = [app(other, "c1", b"x%d" % i) for i in range(size)]
    assert not r.repair_hole("c1", lies[8:16])
    assert not r.repair_hole("c1", es[8:15]) and not r.repair_hole("c1", es[7:16])
    assert r.hole_block(ctx) == (9, 16)
    # the right one: written, and the next damaged entry is found at once
    assert r.repair_hole("c1", es[8:16])
    assert decode_entry(r.entry_blob(ctx, 12)).payload == b"e11"
    assert r.hole_block(ctx) == (25, 32)
    assert r.repair_hole("c1", es[24:32])
    assert r.hole_block(ctx) == last_block
    assert not r.repair_hole("c1", es[32:size - 1] + lies[size - 1:])
    assert r.repair_hole("c1", es[32:size])
    assert r.hole_block(ctx) is None and "damaged" not in r.head("c1")
    r.flush_sync()
    r.evict()
    assert [decode_entry(b).payload for b in r.snapshot_page(
        codec.Snapshot(context="c1", after=0, limit=100, size=None))[1]] == [b"e%d" % i for i in range(size)]


def test_the_background_scrub_finds_damage_nobody_reads_in_bounded_slices():
    led = make(hot_bytes=0)
    for i in range(30):
        app(led, "a", b"a%d" % i)
        app(led, "b", b"b%d" % i)
    led.flush_sync()
    key = st.entry_key(led.contexts["b"].id, 17)
    m = msgpack.unpackb(led.kv.get(key))
    m["payload"] = b"rotted"
    led.kv.write([(key, msgpack.packb(m, use_bin_type=True))])
    led.kv.write((), [st.entry_key(led.contexts["a"].id, 25)])  # and one entry lost
    checked = []
    for _ in range(10):
        checked.append(led.scrub(7))
    assert max(checked) <= 7
    assert led.head("a")["damaged"]["bad_seq"] == 25
    assert led.head("b")["damaged"]["bad_seq"] == 17
    assert led.scrub_passes >= 1 and led.status()["scrub"]["passes"] >= 1
    clean = make(hot_bytes=0)
    for i in range(30):
        app(clean, "a", b"a%d" % i)
    clean.flush_sync()
    while clean.scrub_passes < 2:
        clean.scrub(50)
    assert clean.status()["damaged"] == [] and clean.scrubbed_entries == 60
