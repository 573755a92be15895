"""The engine (node.ledger.Ledger) on the in-memory KV: deterministic, no sockets."""

from __future__ import annotations

import io
import random

import msgpack
import pytest

from node import storage as st
from node.ledger import DataDirError, Ledger
from node.storage import MemoryKV
from protocol import codec, merkle
from protocol.entry import Entry, decode_entry
from protocol.errors import Conflict, IntegrityError, NotFound, RemoteProtocolError, TooLarge, Unavailable
from protocol.lamport import MAX_AFTER_LAMPORT, MAX_LAMPORT, RESERVE_STEP
from protocol.snapshot import encode_header, read_snapshot

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_700_000_000_000_000_000

    def __call__(self) -> int:
        self.t += 1000
        return self.t


def make(kv: MemoryKV | None = None, **kw) -> Ledger:
    return Ledger(kv if kv is not None else MemoryKV(), node_id=kw.pop("node_id", "n1"), now_ns=FakeClock(),
                  sync_meta=False, **kw)


def app(led: Ledger, ctx: str = "c1", payload: bytes = b"x", **kw) -> Entry:
    req = codec.Append(context=ctx, key=kw.pop("key", ""), payload=payload, metadata=kw.pop("metadata", {}), **kw)
    return decode_entry(led.append(req).blobs[0])


def test_seq_dense_lamport_increasing_and_hash_valid():
    led = make()
    es = [app(led, payload=bytes([i])) for i in range(10)]
    assert [e.seq for e in es] == list(range(1, 11))
    assert all(b.lamport > a.lamport for a, b in zip(es, es[1:], strict=False))
    for e in es:
        e.verify()
        assert e.writer == "n1" and e.context == "c1"


def test_after_lamport_makes_entry_causally_later():
    led = make()
    e = app(led, after_lamport=10_000)
    assert e.lamport > 10_000
    # and the clock stays past it for other contexts too
    assert app(led, "other").lamport > e.lamport


def test_dedup_returns_original_and_appends_nothing():
    led = make()
    first = app(led, payload=b"a", dedup_id=b"id-1")
    app(led, payload=b"b")
    again = led.append(codec.Append("c1", "", b"DIFFERENT", {}, dedup_id=b"id-1"))
    assert again.deduplicated
    assert decode_entry(again.blobs[0]) == first
    assert led.contexts["c1"].size == 2


def test_dedup_survives_restart_after_flush():
    kv = MemoryKV()
    led = make(kv)
    first = app(led, dedup_id=b"retry-me")
    led.flush_sync()
    led2 = make(kv)
    res = led2.append(codec.Append("c1", "", b"x", {}, dedup_id=b"retry-me"))
    assert res.deduplicated and decode_entry(res.blobs[0]) == first
    assert led2.contexts["c1"].size == 1


def test_dedup_remembers_at_least_ten_thousand_ids():
    led = make()
    for i in range(10_050):
        led.append(codec.Append("c1", "", b"p", {}, dedup_id=f"d{i}".encode()))
        if i % 2000 == 0:
            led.flush_sync()
    res = led.append(codec.Append("c1", "", b"p", {}, dedup_id=b"d0"))
    assert res.deduplicated and res.last_seq == 1


def test_expect_seq_conflict_reports_actual():
    led = make()
    app(led)
    with pytest.raises(Conflict) as ei:
        app(led, expect_seq=0)
    assert ei.value.details["actual_seq"] == 1
    assert app(led, expect_seq=1).seq == 2
    # a missing context is at seq 0
    assert app(led, "fresh", expect_seq=0).seq == 1


def test_a_batch_whose_payloads_add_up_past_the_reply_limit_is_refused_whole():
    led = make()
    mib = b"x" * (1 << 20)
    # built by hand (the total is not known) and as the decoder builds it (the total given)
    big = codec.AppendBatch("c1", tuple(codec.BatchItem("k", mib, {}) for _ in range(9)))
    frame = msgpack.packb({"v": 1, "id": 1, "op": "append_batch", "context": "c1",
                           "entries": [{"key": "k", "payload": mib}] * 9})
    decoded = codec.decode_request(frame, 4 << 20).request
    assert decoded.payload_bytes == 9 << 20 and decoded == big
    for req in (big, decoded):
        with pytest.raises(TooLarge, match="split the batch"):
            led.append_batch(req)
    assert "c1" not in led.contexts
    assert led.append_batch(codec.AppendBatch("c1", big.items[:7])).last_seq == 7


def test_batch_is_one_unit_and_invalid_batch_appends_nothing():
    led = make()
    res = led.append_batch(codec.AppendBatch("c1", tuple(codec.BatchItem("k", bytes([i]), {}) for i in range(5))))
    assert [decode_entry(b).seq for b in res.blobs] == [1, 2, 3, 4, 5]
    frame = msgpack.packb({"v": 1, "id": 1, "op": "append_batch", "context": "c1",
                           "entries": [{"payload": b"ok"}, {"payload": 5}]})
    with pytest.raises(RemoteProtocolError) as ei:
        codec.decode_request(frame, 1024)
    assert "entries[1]" in ei.value.message
    assert led.contexts["c1"].size == 5


def test_restart_restores_state_without_rehashing(monkeypatch):
    kv = MemoryKV()
    led = make(kv)
    for c in ("a", "b"):
        for i in range(1000):
            app(led, c, payload=str(i).encode())
    roots = {c: led.head(c)["root"] for c in ("a", "b")}
    clock = led.clock.value
    led.flush_sync()

    calls = {"inner": 0, "leaf": 0}
    real_inner = merkle.inner_hash

    def counting_inner(a: bytes, b: bytes) -> bytes:
        calls["inner"] += 1
        return real_inner(a, b)

    monkeypatch.setattr(merkle, "inner_hash", counting_inner)
    import node.ledger as ledger_mod

    monkeypatch.setattr(ledger_mod, "leaf_hash_named", lambda *a, **k: calls.__setitem__("leaf", calls["leaf"] + 1))
    led2 = make(kv)
    assert {c: led2.head(c)["root"] for c in ("a", "b")} == roots
    assert calls["leaf"] == 0
    assert calls["inner"] <= 2 * 2 * 11  # O(log n) per context, for the two roots
    assert led2.clock.value >= clock
    assert led2.contexts["a"].size == 1000


def test_clock_never_decreases_when_unflushed_writes_are_lost():
    kv = MemoryKV()
    led = make(kv)
    handed_out = [app(led).lamport for _ in range(50)]
    # no flush: a kill -9 in async mode loses the pending entries, not the clock
    led2 = make(kv)
    assert app(led2).lamport > max(handed_out)


def test_reservation_written_once_per_step():
    kv = MemoryKV()
    led = make(kv)
    writes = []
    real = kv.write

    def spy(puts, deletes=(), sync=False):
        puts = list(puts)
        writes.extend(k for k, _ in puts)
        return real(puts, deletes, sync)

    kv.write = spy  # type: ignore[method-assign]
    for _ in range(1000):
        app(led)
    assert writes.count(st.meta_key("lamport")) == 1
    assert int(kv.get(st.meta_key("lamport"))) >= 1000
    app(led, after_lamport=5 * RESERVE_STEP)
    assert int(kv.get(st.meta_key("lamport"))) > 5 * RESERVE_STEP


def test_hot_tail_is_bounded_and_cold_reads_come_from_storage():
    led = make(hot_bytes=20_000)
    payloads = [bytes([i % 256]) * 300 for i in range(500)]
    for p in payloads:
        app(led, payload=p)
        if led.contexts["c1"].size % 50 == 0:
            led.flush_sync()
    led.flush_sync()
    assert led.hot_bytes <= 20_000
    assert len(led.contexts["c1"].tail) < 500
    blobs, last, more, nxt = led.get(codec.Get("c1", after=0, limit=10_000))
    assert [decode_entry(b).payload for b in blobs] == payloads
    assert last == 500 and not more and nxt == 500


def test_unflushed_entries_are_never_evicted():
    led = make(hot_bytes=1)
    for _ in range(100):
        app(led, payload=b"y" * 100)
    assert len(led.contexts["c1"].tail) == 100  # nothing on disk yet, so nothing may leave RAM
    led.flush_sync()
    assert led.contexts["c1"].tail == {}
    assert led.hot_bytes == 0
    assert len(led.get(codec.Get("c1", limit=1000))[0]) == 100


def test_get_key_filter_after_limit_and_paging():
    led = make()
    for i in range(30):
        app(led, key="facts" if i % 3 == 0 else "traces", payload=str(i).encode())
    blobs, last, more, nxt = led.get(codec.Get("c1", key="facts", after=0, limit=4))
    es = [decode_entry(b) for b in blobs]
    assert [e.seq for e in es] == [1, 4, 7, 10] and all(e.key == "facts" for e in es)
    assert more and nxt == 10 and last == 30
    blobs, _, more, nxt = led.get(codec.Get("c1", key="facts", after=nxt, limit=100))
    assert [decode_entry(b).seq for b in blobs] == [13, 16, 19, 22, 25, 28]
    assert not more and nxt == 30
    assert led.get(codec.Get("missing")) == ([], 0, False, 0)


def test_head_and_proofs_verify():
    led = make()
    for i in range(37):
        app(led, payload=str(i).encode())
    h = led.head("c1")
    assert h["size"] == 37 and h["writer"] == "n1"
    for seq in (1, 2, 17, 37):
        p = led.proof(codec.Proof("c1", seq))
        merkle.verify_inclusion(p["leaf"], seq - 1, 37, p["path"], h["root"])
    for first in (0, 1, 5, 16, 36, 37):
        c = led.consistency(codec.Consistency("c1", first))
        merkle.verify_consistency(first, 37, c["first_root"], c["second_root"], c["proof"])
    with pytest.raises(NotFound):
        led.proof(codec.Proof("c1", 38))
    with pytest.raises(NotFound):
        led.head("nope")


# -- snapshot and load -------------------------------------------------------------


def snapshot_bytes(led: Ledger, ctx: str) -> bytes:
    fields, blobs = led.snapshot_page(codec.Snapshot(ctx, limit=10_000))
    assert not fields["more"]
    return encode_header(ctx, fields["size"], fields["root"]) + b"".join(blobs)


def load_bytes(led: Ledger, ctx: str, blob: bytes, *, fail_if_exists: bool = False, chunk: int = 7) -> dict | None:
    header, entries = read_snapshot(io.BytesIO(blob))
    es = list(entries)
    out = None
    for i in range(0, max(len(es), 1), chunk):
        part = es[i:i + chunk]
        final = i + chunk >= len(es)
        out = led.load(codec.Load(ctx, "L1", header["size"], header["root"], tuple(part), final, fail_if_exists),
                       sync=False)
    return out


def keys_of(kv: MemoryKV) -> list[bytes]:
    return [k for k, _ in kv.scan(b"", b"\xff" * 8)]


def test_snapshot_load_roundtrip_into_fresh_node():
    src = make()
    for i in range(40):
        app(src, "ctx", payload=str(i).encode(), metadata={"i": str(i)})
    blob = snapshot_bytes(src, "ctx")
    dst = make(node_id="n2")
    head = load_bytes(dst, "ctx", blob)
    assert head is not None and head["root"] == src.head("ctx")["root"] and head["size"] == 40
    assert dst.clock.value >= src.clock.value  # the clock advanced past every loaded entry
    assert not any(k.startswith(st.STAGE) for k in keys_of(dst.kv))  # staging cleaned up
    dst.flush_sync()
    again = make(dst.kv, node_id="n2")
    assert again.head("ctx")["root"] == head["root"]


@pytest.mark.parametrize("damage", ["payload", "truncate", "root"])
def test_corrupted_load_writes_nothing(damage):
    src = make()
    for i in range(20):
        app(src, "ctx", payload=f"entry-{i}".encode())
    blob = snapshot_bytes(src, "ctx")
    if damage == "payload":
        blob = blob.replace(b"entry-13", b"entry-99")
    elif damage == "truncate":
        header, entries = read_snapshot(io.BytesIO(blob))
        es = list(entries)[:-1]
        blob = encode_header("ctx", header["size"], header["root"]) + b"".join(e.encode() for e in es)
    else:
        blob = blob.replace(src.head("ctx")["root"], b"\x00" * 32)
    dst = make(node_id="n2")
    before = keys_of(dst.kv)
    with pytest.raises(IntegrityError):
        load_bytes(dst, "ctx", blob)
    assert "ctx" not in dst.contexts
    dst.flush_sync()
    assert keys_of(dst.kv) == before


def test_load_fail_if_exists_and_fork_refused_and_prefix_extended():
    src = make()
    for i in range(10):
        app(src, "ctx", payload=str(i).encode())
    blob = snapshot_bytes(src, "ctx")
    # prefix: a node holding the first 4 entries (same history) is extended
    dst = make(node_id="n2")
    load_bytes(dst, "ctx", snapshot_bytes_prefix(src, "ctx", 4))
    assert dst.contexts["ctx"].size == 4
    head = load_bytes(dst, "ctx", blob)
    assert head is not None and head["size"] == 10 and head["root"] == src.head("ctx")["root"]
    with pytest.raises(Conflict):
        load_bytes(dst, "ctx", blob, fail_if_exists=True)
    # fork: a different history of the same name is refused and left alone
    other = make(node_id="n3")
    app(other, "ctx", payload=b"different")
    with pytest.raises(Conflict):
        load_bytes(other, "ctx", blob)
    assert other.contexts["ctx"].size == 1


def snapshot_bytes_prefix(led: Ledger, ctx: str, size: int) -> bytes:
    fields, blobs = led.snapshot_page(codec.Snapshot(ctx, size=size, limit=10_000))
    return encode_header(ctx, size, fields["root"]) + b"".join(blobs)


def test_aborted_load_drops_its_staged_entries():
    src = make()
    for i in range(10):
        app(src, "ctx", payload=str(i).encode())
    header, entries = read_snapshot(io.BytesIO(snapshot_bytes(src, "ctx")))
    es = list(entries)
    dst = make(node_id="n2")
    assert dst.load(codec.Load("ctx", "L9", 10, header["root"], tuple(es[:5])), sync=False) is None
    assert any(k.startswith(st.STAGE) for k in keys_of(dst.kv))
    assert dst.status()["loads_in_progress"] == 1
    dst.load(codec.Load("ctx", "L9", 10, header["root"], (), abort=True), sync=False)
    assert not any(k.startswith(st.STAGE) for k in keys_of(dst.kv))
    assert dst.status()["loads_in_progress"] == 0 and "ctx" not in dst.contexts


# -- bounds on loads (--max-loads, --max-staged-bytes) ------------------------------------------


def snapshot_entries(n: int, ctx: str = "ctx", size: int = 100, incompressible: bool = False
                     ) -> tuple[dict, list[Entry]]:
    src = make()
    rnd = random.Random(n)
    for i in range(n):
        app(src, ctx, payload=rnd.randbytes(size) if incompressible else bytes([i % 256]) * size)
    header, entries = read_snapshot(io.BytesIO(snapshot_bytes(src, ctx)))
    return header, list(entries)


def staged_keys(led: Ledger) -> list[bytes]:
    return [k for k in keys_of(led.kv) if k.startswith(st.STAGE)]


def test_a_load_past_max_loads_is_refused_and_changes_nothing():
    header, es = snapshot_entries(4)
    dst = make(node_id="n2", max_loads=2)
    for i in range(2):
        assert dst.load(codec.Load(f"c{i}", f"L{i}", 4, header["root"], ()), sync=False) is None
    before = keys_of(dst.kv)
    with pytest.raises(Unavailable) as exc:
        dst.load(codec.Load("ctx", "L2", 4, header["root"], tuple(es[:2])), sync=False)
    assert exc.value.details == {"loads": 2, "limit": 2}
    assert "L2" not in dst.loads and keys_of(dst.kv) == before
    st_ = dst.status()
    assert st_["loads_in_progress"] == 2 and st_["loads_refused"] == 1 and st_["loads_staged_bytes"] == 0
    # once one is aborted, the refused load goes through from the start
    dst.load(codec.Load("c0", "L0", 4, header["root"], (), abort=True), sync=False)
    assert dst.load(codec.Load("ctx", "L2", 4, header["root"], tuple(es), True), sync=False)["size"] == 4


def test_staged_bytes_are_capped_across_loads_and_freed_by_commit_abort_and_expiry():
    header, es = snapshot_entries(10, size=1000)
    one = len(es[0].encode())
    dst = make(node_id="n2", max_staged_bytes=6 * one)
    assert dst.load(codec.Load("ctx", "A", 10, header["root"], tuple(es[:4])), sync=False) is None
    assert dst.status()["loads_staged_bytes"] == 4 * one
    # a second load may stage what is left, and not one entry more
    with pytest.raises(Unavailable) as exc:
        dst.load(codec.Load("ctx", "B", 10, header["root"], tuple(es[:3])), sync=False)
    assert exc.value.details == {"staged": 4 * one, "limit": 6 * one}
    assert "B" not in dst.loads and dst.status()["loads_staged_bytes"] == 4 * one
    assert dst.load(codec.Load("ctx", "B", 10, header["root"], tuple(es[:2])), sync=False) is None
    assert dst.status()["loads_staged_bytes"] == 6 * one
    # a load that could never fit, however long it waited, is TOO_LARGE (and its chunk is not staged)
    with pytest.raises(TooLarge) as big:
        dst.load(codec.Load("ctx", "A", 10, header["root"], tuple(es[4:7])), sync=False)
    assert big.value.details == {"limit": 6 * one, "staged": 4 * one}
    assert len(staged_keys(dst)) == 6 and dst.loads["A"].verifier.count == 4
    # abort frees B's bytes; expiry frees A's
    dst.load(codec.Load("ctx", "B", 10, header["root"], (), abort=True), sync=False)
    assert dst.status()["loads_staged_bytes"] == 4 * one
    dst.expire_loads(now=dst.loads["A"].last_used + 10_000)
    assert dst.status()["loads_staged_bytes"] == 0 and dst.loads == {} and staged_keys(dst) == []
    assert dst.status()["loads_refused"] == 2


def test_a_chunk_with_a_bad_hash_leaves_nothing_staged():
    header, es = snapshot_entries(6)
    dst = make(node_id="n2")
    assert dst.load(codec.Load("ctx", "A", 6, header["root"], tuple(es[:3])), sync=False) is None
    bad = Entry(**{**{f: getattr(es[4], f) for f in es[4].__dataclass_fields__}, "payload": b"forged"})
    with pytest.raises(IntegrityError):
        dst.load(codec.Load("ctx", "A", 6, header["root"], (es[3], bad, es[5])), sync=False)
    assert staged_keys(dst) == [] and dst.loads == {} and dst.status()["loads_staged_bytes"] == 0
    # the same on a first chunk: no session, nothing staged
    with pytest.raises(IntegrityError):
        dst.load(codec.Load("ctx", "B", 6, header["root"], (es[0], bad)), sync=False)
    assert staged_keys(dst) == [] and dst.loads == {}


def test_start_up_removes_the_staged_entries_of_abandoned_loads(tmp_path):
    # random payloads: a LevelDB built with snappy would shrink repeated bytes to almost nothing
    header, es = snapshot_entries(50, size=64 << 10, incompressible=True)
    kv = st.LevelDBKV(str(tmp_path / "db"))
    led = make(kv, node_id="n2")
    # abandoned loads written straight to storage (as a crashed node leaves them): 80 MB, more
    # than LevelDB's memtable, so they sit in table files and a delete alone frees nothing
    for round_ in range(24):
        kv.write([(st.stage_key(round_ + 1, e.seq), e.encode()) for e in es])
    assert led.load(codec.Load("ctx", "A", 50, header["root"], tuple(es[:10])), sync=False) is None
    kv.close()

    def disk() -> int:
        return sum(f.stat().st_size for f in (tmp_path / "db").iterdir())

    full = disk()
    assert full > 40 << 20
    kv = st.LevelDBKV(str(tmp_path / "db"))
    led = make(kv, node_id="n2")
    assert led.loads == {} and led.status()["loads_staged_bytes"] == 0
    assert list(kv.scan_keys(st.STAGE, st.prefix_end(st.STAGE))) == []
    kv.close()
    # the deletes were compacted away: the space is given back, not just tombstoned
    assert disk() < 1 << 20, (full, disk())


# -- replicas: apply_replicated ------------------------------------------------------------------


def writer_with(n: int, ctx: str = "c1", **kw) -> tuple[Ledger, list[Entry], list[bytes]]:
    w = make(node_id="w1")
    blobs = [w.append(codec.Append(context=ctx, key="k", payload=bytes([i]) * 10, metadata=kw.get("metadata", {}))
                      ).blobs[0] for i in range(n)]
    return w, [decode_entry(b) for b in blobs], blobs


@pytest.mark.parametrize("metadata", [{}, {"trace": "t-1", "é": "ü"}])
def test_a_replica_stores_the_writers_bytes_and_reaches_its_root(metadata):
    w, es, blobs = writer_with(7, metadata=metadata)
    r = make(node_id="r1")
    ctx = r.apply_replicated("c1", es[:3])
    ctx = r.apply_replicated("c1", es[3:], w.head("c1")["root"])
    assert ctx is not None and ctx.writer == "w1" and ctx.size == 7
    assert r.head("c1")["root"] == w.head("c1")["root"]
    assert r.get(codec.Get("c1"))[0] == blobs  # byte-identical
    assert r.clock.value >= es[-1].lamport  # the clock moved past what it received
    assert st.entry_key(ctx.id, 7) in r.pending


def test_entries_that_miss_the_senders_root_store_nothing():
    w, es, _ = writer_with(6)
    r = make(node_id="r1")
    r.apply_replicated("c1", es[:2])
    before = dict(r.pending), r.contexts["c1"].frontier.root()
    other, _, _ = writer_with(6, "x")  # any other root
    assert r.apply_replicated("c1", es[2:], other.head("x")["root"]) is None
    ctx = r.contexts["c1"]
    assert ctx.size == 2 and (dict(r.pending), ctx.frontier.root()) == before and 3 not in ctx.tail
    # a chunk for a context it does not hold yet creates nothing either
    r2 = make(node_id="r2")
    assert r2.apply_replicated("c1", es, other.head("x")["root"]) is None
    assert "c1" not in r2.contexts and not r2.pending


@pytest.mark.parametrize("case", ["tampered", "gap", "other-context", "mixed-writers"])
def test_unsound_replicated_entries_raise_before_anything_is_stored(case):
    from dataclasses import replace

    w, es, _ = writer_with(5)
    r = make(node_id="r1")
    r.apply_replicated("c1", es[:1])
    batch = es[1:]
    if case == "tampered":
        batch = [batch[0], replace(batch[1], payload=b"forged"), *batch[2:]]
    elif case == "gap":
        batch = [batch[0], *batch[2:]]
    elif case == "other-context":
        batch = [batch[0], replace(batch[1], context="c2"), *batch[2:]]
    else:
        batch = [batch[0], replace(batch[1], writer="w2"), *batch[2:]]
    pending = dict(r.pending)
    with pytest.raises(IntegrityError):
        r.apply_replicated("c1", batch)
    assert r.contexts["c1"].size == 1 and r.pending == pending


def test_replicated_entries_never_extend_a_context_of_another_writer_or_our_own():
    _, es, _ = writer_with(2)
    own = make(node_id="w1")
    with pytest.raises(Conflict):
        own.apply_replicated("c1", es)  # entries naming this node as their writer
    r = make(node_id="r1")
    app(r, "c1")  # r writes c1 itself
    with pytest.raises(Conflict):
        r.apply_replicated("c1", es)


def test_batched_entries_are_encoded_exactly_as_single_ones():
    # append_batch builds blobs from parts joined once per batch or per key: they must be the
    # canonical encoding (Entry.encode) with valid leaf hashes, for every key and metadata shape
    led = make()
    items = (codec.BatchItem("k", b"p" * 300, {}), codec.BatchItem("ü", b"", {"z": "1", "a": "é"}),
             codec.BatchItem("", b"x", {}), codec.BatchItem("k", b"q", {"m": ""}))
    res = led.append_batch(codec.AppendBatch("batch", items * 3))
    assert len(res.blobs) == 12
    for seq, blob in enumerate(res.blobs, 1):
        e = decode_entry(blob)
        e.verify()
        assert e.seq == seq and e.encode() == blob
    # and the same content appended one by one hashes alike (only seq/lamport/ts differ)
    single = decode_entry(led.append(codec.Append("batch", "ü", b"", {"z": "1", "a": "é"})).blobs[0])
    single.verify()


def test_a_single_recent_entry_read_matches_the_general_path():
    # get with limit=1 and no key answers from the hot tail directly: same answer as a scan
    led = make()
    blobs = [led.append(codec.Append("c1", "k", bytes([i]), {})).blobs[0] for i in range(5)]
    for after in range(0, 6):
        one = led.get(codec.Get("c1", after=after, limit=1))
        two = led.get(codec.Get("c1", after=after, limit=2))
        want = blobs[after:after + 1]
        assert one == (want, 5, after + 1 < 5, min(after + 1, 5) if after < 5 else after)
        assert two[0][:1] == one[0]
    led.contexts["c1"].tail.clear()  # not in RAM any more: the scan answers
    led.flush_sync()
    assert led.get(codec.Get("c1", after=2, limit=1)) == ([blobs[2]], 5, True, 3)


# -- the Lamport ceiling and atomic refusals (issue #12) --------------------------------------


def state(led: Ledger) -> tuple:
    return (led.clock.value, dict(led.pending), {n: (c.size, c.frontier.root()) for n in led.names() if (c := led.contexts[n])},
            led.entries_total, led.hot_bytes)


def test_a_refused_append_or_batch_changes_nothing_when_the_clock_cannot_go_on():
    led = make()
    app(led, "c1")
    # only a clock record on disk written without the ceiling gets a clock here (the codec refuses
    # such tokens, and observe() stops at MAX_AFTER_LAMPORT)
    led.clock.value = MAX_LAMPORT - 2
    before = state(led)
    batch = codec.AppendBatch(context="new", items=tuple(codec.BatchItem("", b"p", {}) for _ in range(3)))
    with pytest.raises(Unavailable, match="Lamport clock"):
        led.append_batch(batch)
    assert state(led) == before and "new" not in led.contexts
    two = codec.AppendBatch(context="c1", items=(codec.BatchItem("", b"a", {}), codec.BatchItem("", b"b", {})))
    assert decode_entry(led.append_batch(two).blobs[-1]).lamport == MAX_LAMPORT
    before = state(led)
    with pytest.raises(Unavailable):
        app(led, "other")
    assert state(led) == before and "other" not in led.contexts


def test_a_causal_token_at_its_bound_leaves_the_clock_room_for_ever():
    led = make()
    e = app(led, after_lamport=MAX_AFTER_LAMPORT)
    assert e.lamport == MAX_AFTER_LAMPORT + 1
    items = tuple(codec.BatchItem("", b"p", {}) for _ in range(1000))
    res = led.append_batch(codec.AppendBatch(context="c1", items=items, after_lamport=MAX_AFTER_LAMPORT))
    assert decode_entry(res.blobs[-1]).lamport == MAX_AFTER_LAMPORT + 1001
    # a value received from a peer at the ceiling moves the clock no further than the bound
    led.observe(MAX_LAMPORT)
    assert app(led).lamport == MAX_AFTER_LAMPORT + 1002
    # and the reservation on disk stays a number a restart can read and go on from
    led.flush_sync()
    again = make(led.kv)
    assert app(again).lamport > MAX_AFTER_LAMPORT + 1002


def test_a_damaged_clock_record_is_a_one_line_data_folder_error():
    kv = MemoryKV()
    make(kv)
    kv.write([(st.meta_key("lamport"), b"12x")])
    with pytest.raises(DataDirError, match="Lamport clock record is damaged"):
        make(kv)
