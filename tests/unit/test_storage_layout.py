"""Storage format 2: the entries in their own LevelDB (DATA/entries), written after the rest of
each batch; the dedup records that may so outlive their entries; the move from format 1."""

from __future__ import annotations

import os
import shutil

import plyvel
import pytest

from node import storage as st
from node.ledger import DataDirError, Ledger
from node.storage import LevelDBKV, MemoryKV, WriteFailed
from protocol import codec
from protocol.entry import decode_entry
from tests.unit.test_ledger import FakeClock

pytestmark = pytest.mark.timeout(60)


def make(kv, node_id: str = "n1") -> Ledger:
    return Ledger(kv, node_id=node_id, now_ns=FakeClock(), sync_meta=False)


def batch(led: Ledger, payloads: list[bytes], dedup_id: bytes | None = None, ctx: str = "c1"):
    return led.append_batch(codec.AppendBatch(ctx, tuple(("k", p, {}) for p in payloads), dedup_id=dedup_id))


def lose_entries(kv: MemoryKV, ctx_id: int, seqs: range) -> None:
    """What a crash between the two stores' writes leaves: the batch's dedup record (and Merkle
    nodes) in the first store, its entries not in the second."""
    kv.write((), [st.entry_key(ctx_id, s) for s in seqs])


def test_a_dedup_record_whose_entries_were_lost_is_not_a_hit():
    kv = MemoryKV()
    led = make(kv)
    batch(led, [b"first"])
    batch(led, [b"a1", b"a2"], dedup_id=b"retry-me")
    led.flush_sync()
    lose_entries(kv, led.contexts["c1"].id, range(2, 4))
    led = make(kv)
    assert led.contexts["c1"].size == 1
    again = batch(led, [b"a1", b"a2"], dedup_id=b"retry-me")
    assert not again.deduplicated and again.last_seq == 3  # appended, not answered from nothing
    assert batch(led, [b"a1", b"a2"], dedup_id=b"retry-me").deduplicated  # and now remembered


def test_a_dedup_record_whose_seqs_other_entries_took_is_not_a_hit():
    kv = MemoryKV()
    led = make(kv)
    batch(led, [b"first"])
    led.append(codec.Append("c1", "k", b"mine", {}, dedup_id=b"retry-me"))
    led.flush_sync()
    lose_entries(kv, led.contexts["c1"].id, range(2, 3))
    led = make(kv)
    batch(led, [b"someone else's"])  # takes seq 2 again
    again = led.append(codec.Append("c1", "k", b"mine", {}, dedup_id=b"retry-me"))
    assert not again.deduplicated and again.last_seq == 3
    assert decode_entry(again.blobs[0]).payload == b"mine"


def test_a_dedup_record_of_format_1_still_deduplicates():
    kv = MemoryKV()
    led = make(kv)
    batch(led, [b"a", b"b"])
    cid = led.contexts["c1"].id
    kv.write([(st.dedup_key(cid, b"old"), st.dedup_value(1, 2, b""))])  # 12 bytes: no hash
    assert st.parse_dedup_value(kv.get(st.dedup_key(cid, b"old")) or b"") == (1, 2, None)
    res = batch(led, [b"x"], dedup_id=b"old")
    assert res.deduplicated and res.last_seq == 2


# -- LevelDBKV: two stores ---------------------------------------------------------------------


def keys_of(path: str) -> list[bytes]:
    db = plyvel.DB(path)
    try:
        return list(db.iterator(include_value=False))
    finally:
        db.close()


def test_entries_go_to_their_own_store_and_everything_else_stays(tmp_path):
    data = str(tmp_path / "data")
    kv = LevelDBKV(data)
    led = make(kv)
    batch(led, [bytes([i]) * 40 for i in range(20)], dedup_id=b"d")
    led.flush_sync()
    kv.close()
    entries = keys_of(os.path.join(data, st.ENTRIES_DIR))
    first = keys_of(data)
    assert len(entries) == 20 and all(k[:1] == st.ENTRY for k in entries)
    assert st.ENTRY not in {k[:1] for k in first}
    assert {st.META, st.CTX, st.NODE, st.DEDUP} <= {k[:1] for k in first}
    led = make(LevelDBKV(data))
    assert led.contexts["c1"].size == 20 and batch(led, [b"x"], dedup_id=b"d").deduplicated
    led.kv.close()


class FailingBatch:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def put(self, k, v):
        pass

    def delete(self, k):
        pass

    def write(self):
        raise self.exc


class FailingStore:
    """The entries' store, with every write failing (a full disk under DATA/entries)."""

    def __init__(self, db) -> None:
        self.db = db

    def write_batch(self, sync=False):
        return FailingBatch(plyvel.IOError(b"IO error: No space left on device"))

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_a_batch_is_written_to_the_first_store_before_the_entries(tmp_path):
    """The order the dedup check above depends on: a batch whose entries fail to be written
    has its other keys written already, never the other way round."""
    kv = LevelDBKV(str(tmp_path / "data"))
    real = kv._edb
    kv._edb = FailingStore(real)
    node, entry = st.node_key(1, 3, 0), st.entry_key(1, 8)
    with pytest.raises(WriteFailed, match="No space left"):
        kv.write([(entry, b"e"), (node, b"n" * 32)])
    with pytest.raises(WriteFailed, match="No space left"):
        kv.prepare([(st.entry_key(1, 9), b"e"), (st.node_key(1, 3, 1), b"m" * 32)])()
    kv._edb = real
    assert kv.get(node) == b"n" * 32 and kv.get(st.node_key(1, 3, 1)) == b"m" * 32
    assert kv.get(entry) is None and kv.get(st.entry_key(1, 9)) is None
    kv.close()


def write_format_1(data: str, contexts: int = 3, per: int = 50) -> dict[str, tuple[int, bytes]]:
    """A data folder as a version before format 2 left it: one store, entries included. Built
    by this version, then its entries moved back into the first store. Returns the heads."""
    kv = LevelDBKV(data)
    led = make(kv)
    for c in range(contexts):
        batch(led, [f"{c}-{i}".encode() * 8 for i in range(per)], ctx=f"ctx{c}", dedup_id=f"d{c}".encode())
    led.flush_sync()
    heads = {n: (ctx.size, ctx.frontier.root()) for n in led.names() if (ctx := led.contexts[n])}
    kv.close()
    edb = plyvel.DB(os.path.join(data, st.ENTRIES_DIR))
    db = plyvel.DB(data)
    with db.write_batch() as wb:
        for k, v in edb.iterator():
            wb.put(k, v)
        wb.put(st.meta_key("format"), b"1")
    edb.close()
    db.close()
    shutil.rmtree(os.path.join(data, st.ENTRIES_DIR))
    return heads


def test_a_format_1_folder_is_moved_to_format_2_at_start(tmp_path, caplog):
    data = str(tmp_path / "data")
    heads = write_format_1(data)
    caplog.set_level("INFO")
    kv = LevelDBKV(data)
    assert "storage format 1 -> 2: 150 entries moved" in caplog.text
    led = make(kv)
    assert {n: (c.size, c.frontier.root()) for n in led.names() if (c := led.contexts[n])} == heads
    assert [decode_entry(b).payload for b in led.get(codec.Get("ctx1", None, 0, 2))[0]] == [b"1-0" * 8, b"1-1" * 8]
    assert batch(led, [b"again"], ctx="ctx2", dedup_id=b"d2").deduplicated
    kv.close()
    assert st.ENTRY not in {k[:1] for k in keys_of(data)}
    assert plyvel.DB(data).get(st.meta_key("format")) == st.FORMAT_VERSION


def test_a_move_interrupted_after_its_copy_is_finished_at_the_next_start(tmp_path):
    data = str(tmp_path / "data")
    heads = write_format_1(data)
    # the copy done and format 2 recorded, the deletes not: entries in both stores
    edb = plyvel.DB(os.path.join(data, st.ENTRIES_DIR), create_if_missing=True)
    db = plyvel.DB(data)
    for k, v in db.iterator(start=st.ENTRY, stop=st.prefix_end(st.ENTRY)):
        edb.put(k, v)
    db.put(st.meta_key("format"), st.FORMAT_VERSION)
    edb.close()
    db.close()
    kv = LevelDBKV(data)
    led = make(kv)
    assert {n: (c.size, c.frontier.root()) for n in led.names() if (c := led.contexts[n])} == heads
    kv.close()
    assert st.ENTRY not in {k[:1] for k in keys_of(data)}


def test_a_format_2_folder_without_its_entries_store_is_refused_not_served_empty(tmp_path):
    data = str(tmp_path / "data")
    kv = LevelDBKV(data)
    batch(make(kv), [b"x"])
    kv.close()
    shutil.rmtree(os.path.join(data, st.ENTRIES_DIR))
    with pytest.raises(st.EntriesMissing, match="entries of this data folder are kept there"):
        LevelDBKV(data)
    assert not os.path.exists(os.path.join(data, st.ENTRIES_DIR))


def test_a_newer_format_is_refused_without_creating_a_store(tmp_path):
    data = str(tmp_path / "data")
    db = plyvel.DB(data, create_if_missing=True)
    db.put(st.meta_key("format"), b"9")
    db.close()
    kv = LevelDBKV(data)
    with pytest.raises(DataDirError, match="storage format 9, this version reads 3"):
        make(kv)
    kv.close()
    assert not os.path.exists(os.path.join(data, st.ENTRIES_DIR))


# -- reads that do not grow with the size: the upper Merkle nodes stay in RAM -----------------


class CountingKV(MemoryKV):
    def __init__(self) -> None:
        super().__init__()
        self.node_levels: list[int] = []

    def get(self, key: bytes) -> bytes | None:
        if key[:1] == st.NODE:
            self.node_levels.append(key[5])
        return super().get(key)


def test_a_proof_reads_the_upper_merkle_nodes_from_storage_once():
    from node.ledger import CACHED_MIN_LEVEL
    from protocol import merkle

    kv = CountingKV()
    led = make(kv)
    n = (1 << 13) + 5
    for i in range(0, n, 1000):
        batch(led, [i.to_bytes(4, "big") + bytes([j % 256]) for j in range(min(1000, n - i))])
    led.flush_sync()
    root = led.contexts["c1"].frontier.root()
    reads = []
    for seq in (1, 2, 3000, 1):
        kv.node_levels.clear()
        p = led.proof(codec.Proof("c1", seq))
        assert merkle.root_from_inclusion(p["leaf"], seq - 1, n, p["path"]) == root
        reads.append(sorted(lv for lv in kv.node_levels if lv >= CACHED_MIN_LEVEL))
    # (12, 1) is on the right edge (the frontier, always in RAM); (10, 1) and (11, 1) are read once
    assert reads[0] == [10, 11]
    assert reads[1] == reads[3] == []  # ... then from RAM
    assert reads[2] == [10, 11]  # (10, 3) and (11, 0): another part of the tree
