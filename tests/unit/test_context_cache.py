"""Contexts loaded on first use and kept in a bounded cache (issue #15): a node holds more contexts
than it keeps in RAM, serves each the same whether it is in RAM or not, and starts after a clean
stop without reading any of them."""

from __future__ import annotations

import logging

import msgpack
import pytest

from node import storage as st
from node.contexts import ContextTable
from node.ledger import CLEAN_STATE_KEY, FORMAT_KEY, ContextState, DataDirError, Ledger
from node.marks import Journal
from node.storage import MemoryKV
from protocol import codec
from protocol.digest import FINE, NBUCKETS, bucket_of
from protocol.entry import decode_entry
from protocol.errors import IntegrityError, InternalError, NotFound
from protocol.heads import SignedHead
from tests.unit.test_ledger import FakeClock

pytestmark = pytest.mark.timeout(60)


class CountingKV(MemoryKV):
    """A MemoryKV that counts look-ups of `C` records, and range scans of any keys."""

    def __init__(self) -> None:
        super().__init__()
        self.ctx_reads = 0
        self.scans = 0

    def get(self, key: bytes) -> bytes | None:
        if key[:1] == st.CTX:
            self.ctx_reads += 1
        return super().get(key)

    def scan(self, start: bytes, stop: bytes, reverse: bool = False):
        self.scans += 1
        if start[:1] == st.CTX:
            self.ctx_reads += 1
        return super().scan(start, stop, reverse)


def make(kv: MemoryKV, tmp_path, cache: int = 4) -> Ledger:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Ledger(kv, node_id="n1", now_ns=FakeClock(), sync_meta=False, journal=Journal(str(tmp_path), lazy=True),
                  context_cache=cache)


def fill(led: Ledger, ctx: str, n: int) -> None:
    led.append_batch(codec.AppendBatch(ctx, tuple(("k", b"p%d" % i, {}) for i in range(n))))


def settle(led: Ledger) -> None:
    """What the node's loop does between requests: flush, publish, a heartbeat's digest."""
    led.flush_sync()
    for ctx in led.contexts.loaded():
        ctx.published_seq = ctx.size
    led.hot_limit = 0
    led.evict()
    led.digest()


def served(led: Ledger) -> dict[str, tuple[int, bytes, int, str]]:
    names = [d["name"] for d in led.list_contexts(None, 1 << 30)[0]]
    return {n: (h["size"], h["root"], h["lamport"], h["writer"]) for n in names if (h := led.head(n))}


def test_the_table_keeps_at_most_its_capacity_of_idle_contexts_least_recently_used_out_first():
    store = {f"c{i}": f"state{i}" for i in range(10)}
    busy: set[str] = set()
    out: list[str] = []
    t = ContextTable(store.get, lambda s: s not in busy, lambda s: None, out.append, capacity=3)
    for i in range(3):
        t.add(f"new{i}", f"fresh{i}")
    assert len(t) == 3 and t.in_ram == 3
    busy.add("fresh0")
    assert t.get("c1") == "state1"  # room made: fresh0 is busy (goes to the back), fresh1 goes
    assert out == ["fresh1"] and t.in_ram == 3 and len(t) == 3  # c1 was already counted (on disk)
    assert t.get("new0") == "fresh0"
    assert t.get("nosuch") is None and "nosuch" not in t
    assert t.peek("c5") == "state5" and t.cached("c5") is None  # peek does not let it in
    busy.update(f"state{i}" for i in range(10))
    busy.update(("fresh2",))
    for i in range(5, 9):
        t.get(f"c{i}")  # everything busy: the table grows rather than drop a busy context
    assert t.in_ram > 3
    busy.clear()
    assert t.shrink() > 0 and t.in_ram == 3


def test_the_context_just_asked_for_is_never_the_one_evicted():
    t = ContextTable(lambda n: "s-" + n, lambda s: True, lambda s: None, lambda s: None, capacity=1)
    for name in ("a", "b", "c"):
        assert t.get(name) == "s-" + name and t.cached(name) == "s-" + name


def test_a_name_removed_is_not_loaded_back_from_its_record_until_created_again():
    t = ContextTable(lambda n: "on-disk", lambda s: True, lambda s: None, lambda s: None, capacity=2)
    t.count = 1
    assert t.pop("a") == "on-disk" and len(t) == 0
    assert t.get("a") is None and t.peek("a") is None and t.gone("a")
    t.add("a", "new")
    assert t.get("a") == "new" and not t.gone("a") and len(t) == 1


def test_a_name_found_nowhere_is_looked_up_once_until_created_and_the_memory_of_it_is_bounded(monkeypatch):
    import node.contexts as contexts_mod

    looked: list[str] = []

    def load(n: str) -> str | None:
        looked.append(n)
        return None

    t = ContextTable(load, lambda s: True, lambda s: None, lambda s: None, capacity=2)
    assert t.get("a") is None and t.peek("a") is None and t.get("a") is None and "a" not in t
    assert looked == ["a"]  # (a catch-up asks twice before it creates: once on disk)
    assert t.peek("b") is None and t.get("b") is None and looked == ["a", "b"]
    t.add("a", "new")
    assert t.get("a") == "new" and t.peek("a") == "new"
    t.pop("a", gone=False)  # (a creation undone: it never reached the disk)
    assert t.get("a") is None and looked == ["a", "b", "a"]
    monkeypatch.setattr(contexts_mod, "MAX_ABSENT", 3)
    for n in ("c", "d", "e"):
        t.get(n)
    assert len(t._absent) <= 3
    del looked[:]
    t.get("a")
    t.get("b")
    assert looked  # forgotten once past the bound: looked up again


def test_a_ledger_creates_a_context_it_looked_up_and_did_not_find(tmp_path):
    kv = CountingKV()
    led = make(kv, tmp_path)
    reads = kv.ctx_reads
    assert led.contexts.get("new") is None and led.contexts.get("new") is None and led.contexts.peek("new") is None
    assert kv.ctx_reads == reads + 1
    fill(led, "new", 3)  # (created now: no longer absent)
    assert led.contexts.get("new").size == 3 and led.head("new")["size"] == 3
    settle(led)
    led2 = make(kv, tmp_path / "2")
    assert led2.contexts.get("new") is not None  # (another table: read from disk)


def test_a_cache_of_no_context_is_refused():
    with pytest.raises(ValueError):
        ContextTable(lambda n: None, lambda s: True, lambda s: None, lambda s: None, capacity=0)


def test_contexts_out_of_ram_are_served_as_if_they_were_in_it(tmp_path):
    small, big = make(MemoryKV(), tmp_path / "s", cache=3), make(MemoryKV(), tmp_path / "b", cache=1000)
    for led in (small, big):
        for i in range(20):
            fill(led, f"ctx{i:02d}", i % 7 + 1)
        settle(led)
    assert small.contexts.in_ram <= 3 and small.contexts.evictions >= 17
    assert len(small.contexts) == len(big.contexts) == 20
    assert served(small) == served(big)
    assert small.digest() == big.digest() and small.fine_digest(range(NBUCKETS)) == big.fine_digest(range(NBUCKETS))
    # reads, proofs, appends after the last entry of a context that left RAM
    g = small.get(codec.Get("ctx05"))
    assert [decode_entry(b).seq for b in g[0]] == list(range(1, 7))
    assert small.proof(codec.Proof("ctx05", 3, 6)) == big.proof(codec.Proof("ctx05", 3, 6))
    for led in (small, big):
        fill(led, "ctx05", 2)
        settle(led)
    assert small.head("ctx05") == big.head("ctx05") and small.head("ctx05")["size"] == 8
    # the heads a peer asks for, by bucket, with the names not on disk yet merged in
    fill(small, "zz-new", 1)
    fill(big, "zz-new", 1)
    wanted = {bucket_of(b"zz-new", NBUCKETS), bucket_of(b"ctx05", NBUCKETS)}
    assert small.heads_in_buckets(wanted, NBUCKETS, None, 100) == big.heads_in_buckets(wanted, NBUCKETS, None, 100)
    every = set(range(NBUCKETS))  # too many buckets to merge: one scan of every record, filtered
    assert small.heads_in_buckets(every, NBUCKETS, "ctx03", 100) == big.heads_in_buckets(every, NBUCKETS, "ctx03", 100)
    assert len(small.heads_in_buckets(every, NBUCKETS, None, 100)[0]) == 21
    odd = {bucket_of(b"ctx09", 100)}  # a bucket count that does not divide the fine one
    assert small.heads_in_buckets(odd, 100, None, 100) == big.heads_in_buckets(odd, 100, None, 100) != ([], False)
    fine = {bucket_of(b"ctx07", FINE)}
    assert small.heads_in_buckets(fine, FINE, None, 100) == big.heads_in_buckets(fine, FINE, None, 100)
    assert [n for n in small.names_in_buckets(wanted, NBUCKETS, None, None, "n1")] == \
        big.names_in_buckets(wanted, NBUCKETS, None, None, "n1")
    assert small.list_contexts("ctx18", 5) == big.list_contexts("ctx18", 5)
    assert small.list_contexts("ctx18", 5)[0][-1]["name"] == "zz-new"


def test_a_context_in_flight_stays_in_ram(tmp_path):
    led = make(MemoryKV(), tmp_path, cache=2)
    for i in range(6):
        fill(led, f"c{i}", 3)
    led.digest()
    # nothing is on disk yet: every context is still in RAM, whatever the capacity
    assert led.contexts.in_ram == 6 and led.contexts.evictions == 0
    settle(led)
    assert led.contexts.in_ram == 2


def test_after_a_clean_stop_start_up_reads_no_context(tmp_path):
    kv = CountingKV()
    led = make(kv, tmp_path)
    for i in range(30):
        fill(led, f"c{i:02d}", i + 1)
    settle(led)
    want, digest, entries = served(led), led.digest(), led.entries_total
    assert led.mark_clean()
    led.close()
    kv.ctx_reads = 0
    again = make(kv, tmp_path)
    assert kv.ctx_reads == 0 and again.contexts.in_ram == 0
    assert len(again.contexts) == 30 and again.entries_total == entries and again.digest() == digest
    assert kv.get(CLEAN_STATE_KEY) is None  # taken back at start, with the clean mark
    assert (tmp_path / "HIGHWATER").stat().st_size == 0  # the journal starts again from the heads
    assert served(again) == want
    fill(again, "c07", 1)
    assert again.head("c07")["size"] == 9


def test_after_a_clean_start_the_journal_still_catches_a_lost_tail(tmp_path):
    kv = MemoryKV()
    led = make(kv, tmp_path)
    fill(led, "c", 5)
    settle(led)
    assert led.mark_clean()
    led.close()
    again = make(kv, tmp_path)
    fill(again, "c", 3)
    settle(again)
    root8 = again.head("c")["root"]
    cid = again.contexts["c"].id
    # a crash that took the entries' log tail (and a stale head with it)
    kv.write((), [st.entry_key(cid, s) for s in (7, 8)])
    third = make(kv, tmp_path)
    assert third.contexts["c"].size == 6 and third.damaged[cid] == (8, root8)


def test_a_damaged_clean_state_record_means_every_context_is_read(tmp_path, caplog):
    kv = MemoryKV()
    led = make(kv, tmp_path)
    for i in range(5):
        fill(led, f"c{i}", 2)
    settle(led)
    want, digest = served(led), led.digest()
    assert led.mark_clean()
    led.close()
    kv.write([(CLEAN_STATE_KEY, msgpack.packb({"contexts": 5, "entries": 10, "fine": b"short"}))])
    caplog.set_level(logging.INFO, logger="node.ledger")
    again = make(kv, tmp_path)
    assert "clean-stop record is damaged" in caplog.text and "loaded 5 contexts" in caplog.text
    assert served(again) == want and again.digest() == digest and len(again.contexts) == 5


def test_a_format_2_folder_gets_the_name_index_at_start_and_becomes_format_3(tmp_path, caplog):
    kv = MemoryKV()
    led = make(kv, tmp_path, cache=100)
    for i in range(8):
        fill(led, f"c{i}", 1)
    settle(led)
    want = led.heads_in_buckets(set(range(NBUCKETS)), NBUCKETS, None, 100)
    assert led.mark_clean()
    led.close()
    # as the version before the index left it (it knew the clean mark, not the clean state)
    kv.write([(FORMAT_KEY, b"2")], [k for k, _ in kv.scan(st.BUCKET, st.prefix_end(st.BUCKET))] + [CLEAN_STATE_KEY])
    caplog.set_level(logging.INFO, logger="node.ledger")
    again = make(kv, tmp_path)
    assert "storage format 2 -> 3" in caplog.text
    assert again.heads_in_buckets({bucket_of(b"c3", NBUCKETS)}, NBUCKETS, None, 100)[0] == [
        h for h in want[0] if h[0] == "c3"]
    assert kv.get(FORMAT_KEY) == st.FORMAT_VERSION == b"3"
    assert len(list(kv.scan(st.BUCKET, st.prefix_end(st.BUCKET)))) == 8


def test_a_folder_of_a_newer_format_is_refused(tmp_path):
    kv = MemoryKV()
    kv.write([(FORMAT_KEY, b"4")])
    with pytest.raises(DataDirError, match="storage format 4, this version reads 3"):
        make(kv, tmp_path)


def test_a_clean_stop_with_damage_unrepaired_is_not_recorded(tmp_path, caplog):
    led = make(MemoryKV(), tmp_path)
    fill(led, "c", 2)
    settle(led)
    led.damaged[led.contexts["c"].id] = (5, b"\0" * 32)
    assert not led.mark_clean()
    assert "not repaired yet" in caplog.text


def three_with_one_in_ram(tmp_path) -> tuple[MemoryKV, Ledger]:
    """Contexts a, b, c of 4 entries each, settled with a cache of one: a and b out of RAM."""
    kv = MemoryKV()
    led = make(kv, tmp_path, cache=1)
    for name in ("a", "b", "c"):
        fill(led, name, 4)
    settle(led)
    return kv, led


def test_damage_the_scrub_finds_in_a_context_out_of_ram_keeps_it_in_ram(tmp_path):
    kv, led = three_with_one_in_ram(tmp_path)
    cid = led.contexts.peek("a").id
    assert led.contexts.cached("a") is None
    kv.write([(st.entry_key(cid, 2), b"garbage")])
    led.scrub(100)
    assert led.holes == {cid: 2} and led.contexts.cached("a") is not None
    settle(led)
    assert led.contexts.cached("a") is not None  # not evicted while damaged
    assert led.status()["damaged"][0]["context"] == "a"


def test_a_context_set_aside_is_not_served_again_from_its_old_record(tmp_path):
    led = make(MemoryKV(), tmp_path, cache=1)
    fill(led, "f", 3)
    fill(led, "g", 1)
    settle(led)
    led.set_aside("f", "other", replace=False)
    settle(led)
    assert led.contexts.get("f") is None and "f" not in [d["name"] for d in led.list_contexts(None, 10)[0]]
    assert len(led.contexts) == 1
    assert led.history("f", "n1").size == 3  # still readable as a fork


def test_status_reports_the_cache(tmp_path):
    led = make(MemoryKV(), tmp_path, cache=2)
    for i in range(4):
        fill(led, f"c{i}", 1)
    settle(led)
    led.head("c0")
    c = led.status()["context_cache"]
    assert c["capacity"] == 2 and c["loaded"] == 2 and c["evictions"] >= 2 and c["loads"] >= 1


def test_contexts_by_writer_are_counted_kept_across_a_clean_stop_and_spare_a_scan(tmp_path):
    kv = MemoryKV()
    led = make(kv, tmp_path, cache=2)
    for i in range(5):
        fill(led, f"mine{i}", 1)
    (tmp_path / "src").mkdir()
    src = Ledger(MemoryKV(), node_id="n2", now_ns=FakeClock(), sync_meta=False,
                 journal=Journal(str(tmp_path / "src")))
    fill(src, "theirs", 2)
    led.apply_replicated("theirs", [decode_entry(src.entry_blob(src.contexts["theirs"], s)) for s in (1, 2)])
    settle(led)
    assert led.by_writer == {"n1": 5, "n2": 1}
    every = set(range(NBUCKETS))
    assert led.names_in_buckets(every, NBUCKETS, None, None, "nobody") == []
    assert led.names_in_buckets(every, NBUCKETS, None, None, "n2") == ["theirs"]
    assert len(led.names_in_buckets(every, NBUCKETS, None, None, "n1")) == 5
    assert led.mark_clean()
    led.close()
    again = make(kv, tmp_path)
    assert again.by_writer == led.by_writer
    fill(again, "mine9", 1)
    assert again.by_writer == {"n1": 6, "n2": 1} and len(again.contexts) == 7
    again.set_aside("theirs", "n3")  # a fork: the name's history is now n3's
    assert again.by_writer == {"n1": 6, "n3": 1}


@pytest.mark.parametrize("writers", [{"n1": "x"}, {"n1": 4}, ["n1"], {7: 5}])
def test_a_clean_state_with_a_bad_writer_count_means_every_context_is_read(tmp_path, caplog, writers):
    kv = MemoryKV()
    led = make(kv, tmp_path)
    for i in range(5):
        fill(led, f"c{i}", 1)
    settle(led)
    assert led.mark_clean()
    led.close()
    state = msgpack.unpackb(kv.get(CLEAN_STATE_KEY))
    kv.write([(CLEAN_STATE_KEY, msgpack.packb({**state, "writers": writers}))])
    caplog.set_level(logging.INFO, logger="node.ledger")
    again = make(kv, tmp_path)
    assert "clean-stop record is damaged" in caplog.text
    assert again.by_writer == {"n1": 5} and len(again.contexts) == 5


def test_a_scrub_slice_looks_at_a_bounded_number_of_contexts_and_goes_on_from_there(tmp_path):
    led = make(MemoryKV(), tmp_path, cache=2)
    for i in range(30):  # contexts with one entry each: a slice of 5 entries meets 5 contexts
        fill(led, f"c{i:02d}", 1)
    settle(led)
    assert led.scrub(5) == 5 and led._scrub_at[0] == "c04"
    for _ in range(6):
        led.scrub(5)
    assert led.scrubbed_entries == 30 and led.scrub_passes == 1
    # contexts with nothing to check cost a look each: a slice stops after `budget` of them
    for i in range(40):
        led._create(f"e{i:02d}")  # (empty contexts, as an empty snapshot's load makes them)
    settle(led)
    led._scrub_at = ("e00", 0)
    assert led.scrub(5) == 0 and led._scrub_at[0] == "e06"


@pytest.mark.parametrize("record", [b"\xc1garbage", msgpack.packb({"id": "x", "writer": 5}), msgpack.packb([1, 2])])
def test_a_damaged_record_of_a_context_out_of_ram_fails_that_context_alone(tmp_path, caplog, record):
    kv = MemoryKV()
    led = make(kv, tmp_path, cache=1)
    for name in ("a", "b"):
        fill(led, name, 2)
    settle(led)
    assert led.contexts.cached("a") is None
    kv.write([(st.ctx_key("a"), record)])
    with pytest.raises(InternalError, match="context 'a' cannot be read from this node's storage"):
        led.head("a")
    assert led.integrity_errors == 1 and "INTEGRITY" in caplog.text
    assert led.head("b")["size"] == 2  # the others are served as before
    # listings, a peer's heads by bucket: the damaged one is left out, the page is served
    assert [d["name"] for d in led.list_contexts(None, 10)[0]] == ["b"]
    assert [h[0] for h in led.heads_in_buckets(set(range(NBUCKETS)), NBUCKETS, None, 10)[0]] == ["b"]
    fill(led, "b", 1)
    assert led.head("b")["size"] == 3


def test_a_peer_pulling_a_context_out_of_ram_does_not_let_it_in_but_damage_found_keeps_it(tmp_path):
    kv, led = three_with_one_in_ram(tmp_path)
    assert led.contexts.cached("a") is None
    loads = led.contexts.loads
    fields, blobs = led.snapshot_page(codec.Snapshot("a", 4, 0, 10))
    assert [decode_entry(b).seq for b in blobs] == [1, 2, 3, 4] and fields["root"] == led.brief("a")[1]
    assert led.contexts.cached("a") is None and led.contexts.loads == loads  # served from its record
    with pytest.raises(NotFound):
        led.snapshot_page(codec.Snapshot("nope", None, 0, 10))
    cid = led.contexts.peek("b").id
    kv.write([(st.entry_key(cid, 3), b"garbage")])
    with pytest.raises(IntegrityError):
        led.snapshot_page(codec.Snapshot("b", 4, 0, 10))
    assert led.holes == {cid: 3} and led.contexts.cached("b") is not None  # in RAM until repaired
    assert led.status()["damaged"][0]["context"] == "b"


def test_a_read_of_one_entry_on_disk_is_one_look_up_not_a_range_scan(tmp_path):
    kv = CountingKV()
    led = make(kv, tmp_path)
    fill(led, "a", 5)
    settle(led)
    assert not led.contexts["a"].tail  # every entry is on disk only
    kv.scans = 0
    blobs, size, more, nxt = led.get(codec.Get("a", after=2, limit=1))
    assert [decode_entry(b).seq for b in blobs] == [3] and (size, more, nxt) == (5, True, 3)
    assert kv.scans == 0
    kv.write([], [st.entry_key(led.contexts["a"].id, 4)])
    with pytest.raises(IntegrityError):  # a hole is still reported as one
        led.get(codec.Get("a", after=3, limit=1))


def _replica(led: Ledger, tmp_path, name: str, n: int) -> tuple[ContextState, bytes]:
    """`name` written by n2 (n entries), applied on `led` as a replica; (its context, root)."""
    (tmp_path / "src").mkdir(exist_ok=True)
    src = Ledger(MemoryKV(), node_id="n2", now_ns=FakeClock(), sync_meta=False,
                 journal=Journal(str(tmp_path / "src")))
    fill(src, name, n)
    root = src.contexts[name].frontier.root()
    ctx = led.apply_replicated(name, [decode_entry(src.entry_blob(src.contexts[name], s)) for s in range(1, n + 1)],
                               root)
    assert ctx is not None
    return ctx, root


def test_a_replicas_signed_head_survives_leaving_ram_and_a_clean_restart(tmp_path):
    kv = MemoryKV()
    led = make(kv, tmp_path / "n1", cache=1)
    ctx, root = _replica(led, tmp_path, "r", 2)
    h = SignedHead("r", 2, root, b"k" * 32, 0, b"s" * 64)
    led.set_signed(ctx, h)  # as a pull or a push with it does (written with the entries' batch)
    settle(led)
    fill(led, "x", 1)
    settle(led)  # r leaves the cache of one
    assert led.contexts.cached("r") is None
    assert led.contexts.get("r").signed == h
    # one arriving when the record is otherwise current is written at once (and kept RAM until then)
    h2 = h._replace(sig=b"t" * 64)
    led.set_signed(led.contexts["r"], h2)
    fill(led, "y", 1)
    settle(led)
    assert led.contexts.cached("r") is None and led.contexts.get("r").signed == h2
    assert led.mark_clean()
    led.close()
    again = make(kv, tmp_path / "n1", cache=1)
    assert again.contexts.get("r").signed == h2


def test_a_signed_head_not_yet_written_keeps_its_context_in_ram(tmp_path):
    kv = MemoryKV()
    led = make(kv, tmp_path / "n1", cache=1)
    ctx, root = _replica(led, tmp_path, "r", 2)
    settle(led)
    assert led.contexts.cached("r") is ctx
    ctx.signed = SignedHead("r", 2, root, b"k" * 32, 0, b"s" * 64)  # (set without set_signed)
    fill(led, "x", 1)
    settle(led)
    assert led.contexts.cached("r") is ctx  # not evicted: its record does not hold it


@pytest.mark.parametrize("bad", [{"context": "r"}, "junk", {"context": "other", "size": 2, "root": b"r" * 32,
                                                          "key": b"k" * 32, "epoch": 0, "sig": b"s" * 64}])
def test_a_bad_signed_head_in_a_record_is_dropped_and_logged_and_the_context_served(tmp_path, caplog, bad):
    kv = MemoryKV()
    led = make(kv, tmp_path / "n1", cache=1)
    _replica(led, tmp_path, "r", 2)
    settle(led)
    fill(led, "x", 1)
    settle(led)
    key = st.ctx_key("r")
    record = msgpack.unpackb(kv.get(key))
    kv.write([(key, msgpack.packb({**record, "signed": bad}))])
    with caplog.at_level(logging.WARNING):
        ctx = led.contexts.get("r")
    assert ctx is not None and ctx.size == 2 and ctx.signed is None
    assert "signed head" in caplog.text


def test_damage_found_while_rooting_a_page_below_the_size_keeps_the_context_and_status_answers(tmp_path):
    # a page that ends below the size is rooted from leaves outside it (the last partial block)
    kv = MemoryKV()
    led = make(kv, tmp_path, cache=1)
    for name in ("a", "b", "c"):
        fill(led, name, 12)
    settle(led)
    assert led.contexts.cached("b") is None
    cid = led.contexts.peek("b").id
    kv.write([(st.entry_key(cid, 9), b"garbage")])
    with pytest.raises(IntegrityError):
        led.snapshot_page(codec.Snapshot("b", 10, 9, 1))  # entry 10 alone; its root needs 9
    assert led.holes == {cid: 9} and led.contexts.cached("b") is not None
    assert [d["context"] for d in led.status()["damaged"]] == ["b"]


def test_a_signed_head_in_a_record_beyond_its_history_is_dropped(tmp_path, caplog):
    kv = MemoryKV()
    led = make(kv, tmp_path / "n1", cache=1)
    _, root = _replica(led, tmp_path, "r", 2)
    settle(led)
    fill(led, "x", 1)
    settle(led)
    key = st.ctx_key("r")
    record = msgpack.unpackb(kv.get(key))
    for size, head_root in ((3, root), (2, b"o" * 32)):  # longer than the replica; same size, other root
        signed = {"context": "r", "size": size, "root": head_root, "key": b"k" * 32, "epoch": 0, "sig": b"s" * 64}
        kv.write([(key, msgpack.packb({**record, "signed": signed}))])
        with caplog.at_level(logging.WARNING):
            ctx = led.contexts.get("r")
        assert ctx.size == 2 and ctx.signed is None and "not of this history" in caplog.text
        caplog.clear()
        fill(led, "x", 1)
        settle(led)  # r leaves RAM again
        assert led.contexts.cached("r") is None


def test_a_signed_head_survives_a_start_after_a_crash_that_rewrites_its_record(tmp_path):
    kv = MemoryKV()
    led = make(kv, tmp_path / "n1", cache=1)
    ctx, root = _replica(led, tmp_path, "r", 2)
    h = SignedHead("r", 2, root, b"k" * 32, 0, b"s" * 64)
    led.set_signed(ctx, h)
    settle(led)
    key = st.ctx_key("r")
    record = msgpack.unpackb(kv.get(key))
    kv.write([(key, msgpack.packb({**record, "head": [2, 0, b"bad", root]}))])  # read from its entries
    again = make(kv, tmp_path / "n1", cache=1)  # no clean stop: every context is read once
    assert msgpack.unpackb(kv.get(key))["head"][2] != b"bad"  # the record was rewritten...
    assert again.contexts.get("r").signed == h  # ...with the signed head
