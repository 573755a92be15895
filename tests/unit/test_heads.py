"""Context heads in the `C` records (issue #15): start-up serves a context from its head, checked
against the entries' store after a crash, taken as it is after a clean stop; never a head that
does not describe the entries."""

from __future__ import annotations

import logging

import msgpack
import pytest

from node import storage as st
from node.ledger import CLEAN_ENTRIES_KEY, CLEAN_KEY, Ledger
from node.marks import Journal, h_record
from node.storage import MemoryKV
from protocol import codec
from tests.unit.test_ledger import FakeClock

pytestmark = pytest.mark.timeout(60)


class CountingKV(MemoryKV):
    """A MemoryKV that counts reads of the entries' key space."""

    def __init__(self) -> None:
        super().__init__()
        self.entry_reads = 0

    def get(self, key: bytes) -> bytes | None:
        if key[:1] == st.ENTRY and key != CLEAN_ENTRIES_KEY:
            self.entry_reads += 1
        return super().get(key)

    def scan(self, start: bytes, stop: bytes, reverse: bool = False):
        if start[:1] == st.ENTRY:
            self.entry_reads += 1
        return super().scan(start, stop, reverse)


def make(kv, tmp_path) -> Ledger:
    return Ledger(kv, node_id="n1", now_ns=FakeClock(), sync_meta=False, journal=Journal(str(tmp_path)))


def fill(led: Ledger, ctx: str, n: int) -> None:
    led.append_batch(codec.AppendBatch(ctx, tuple(("k", b"p%d" % i, {}) for i in range(n))))


def head_of(kv: MemoryKV, name: str) -> list:
    return msgpack.unpackb(kv.get(st.ctx_key(name)))["head"]


def state(led: Ledger) -> dict:
    return {n: (c.size, c.frontier.root(), c.last_lamport) for n in led.names() if (c := led.contexts[n])}


def cleanly_stopped(tmp_path, n: int) -> tuple[MemoryKV, Ledger]:
    """A ledger with context `c` of `n` entries, stopped cleanly (heads current, marks written)."""
    kv = MemoryKV()
    led = make(kv, tmp_path)
    fill(led, "c", n)
    led.flush_sync()
    assert led.mark_clean()
    led.close()
    return kv, led


def test_a_flush_writes_each_written_contexts_head_with_its_batch(tmp_path):
    kv = MemoryKV()
    led = make(kv, tmp_path)
    fill(led, "a", 5)
    fill(led, "b", 3)
    led.flush_sync()
    a = led.contexts["a"]
    size, lamport, nodes, root = head_of(kv, "a")
    assert (size, lamport, root) == (5, a.last_lamport, a.frontier.root())
    assert nodes == b"".join(a.frontier.nodes) and len(nodes) == 32 * (5).bit_length()
    fill(led, "a", 2)
    led.flush_sync()
    assert head_of(kv, "a")[0] == 7 and head_of(kv, "b")[0] == 3


def test_after_a_clean_stop_start_up_reads_no_entries_and_serves_the_same_heads(tmp_path):
    kv = CountingKV()
    led = make(kv, tmp_path)
    for i in range(20):
        fill(led, f"c{i}", i + 1)
    led.flush_sync()
    before = state(led)
    assert led.mark_clean()
    led.close()
    kv.entry_reads = 0
    again = make(kv, tmp_path)
    assert kv.entry_reads == 0
    assert state(again) == before
    assert kv.get(CLEAN_KEY) is None and kv.get(CLEAN_ENTRIES_KEY) is None  # taken back at start
    fill(again, "c3", 1)  # and the context goes on where it was
    assert again.contexts["c3"].size == 5


def test_after_a_crash_the_heads_are_checked_two_reads_each(tmp_path):
    kv = CountingKV()
    led = make(kv, tmp_path)
    for i in range(10):
        fill(led, f"c{i}", 3)
    led.flush_sync()
    before = state(led)
    kv.entry_reads = 0
    again = make(kv, tmp_path)  # no mark_clean: a kill
    assert kv.entry_reads == 2 * 10
    assert state(again) == before


def test_a_head_ahead_of_its_entries_is_not_believed(tmp_path):
    # a crash between the first store's write (head 8) and the entries' (still 5)
    kv = MemoryKV()
    led = make(kv, tmp_path)
    fill(led, "c", 5)
    led.flush_sync()
    root5 = led.contexts["c"].frontier.root()
    marks = (tmp_path / "HIGHWATER").read_bytes()
    fill(led, "c", 3)
    led.flush_sync()
    cid = led.contexts["c"].id
    kv.write((), [st.entry_key(cid, s) for s in (6, 7, 8)])
    (tmp_path / "HIGHWATER").write_bytes(marks)  # its marks come after the entries: not written either
    assert head_of(kv, "c")[0] == 8
    again = make(kv, tmp_path)
    c = again.contexts["c"]
    assert (c.size, c.frontier.root()) == (5, root5)
    fill(again, "c", 1)
    assert again.contexts["c"].size == 6


def test_entries_beyond_a_head_are_found(tmp_path):
    # a head that fell behind its entries (written by a path that keeps no heads, or an older version)
    kv = MemoryKV()
    led = make(kv, tmp_path)
    fill(led, "c", 4)
    led.flush_sync()
    stale = kv.get(st.ctx_key("c"))
    fill(led, "c", 4)
    led.flush_sync()
    want = state(led)
    kv.write([(st.ctx_key("c"), stale)])
    assert state(make(kv, tmp_path)) == want


def test_the_clean_mark_is_ignored_when_the_journal_changed_since(tmp_path, caplog):
    # an older version (which keeps no heads and knows no clean mark) ran on the folder in between
    kv, _ = cleanly_stopped(tmp_path, 4)
    stale = kv.get(st.ctx_key("c"))
    older = make(kv, tmp_path)
    fill(older, "c", 4)
    older.flush_sync()
    want = state(older)
    older.close()
    kv.write([(st.ctx_key("c"), stale), (CLEAN_KEY, Journal(str(tmp_path)).open_token)])
    with open(tmp_path / "HIGHWATER", "ab") as f:
        f.write(h_record(99, 1, b"\0" * 32))  # what the older version's flush added
    caplog.set_level(logging.INFO, logger="node.ledger")
    again = make(kv, tmp_path)
    assert state(again) == want
    assert "high-water journal changed since the clean stop" in caplog.text


def test_a_malformed_head_is_read_from_the_entries(tmp_path, caplog):
    kv = MemoryKV()
    led = make(kv, tmp_path)
    fill(led, "c", 6)
    led.flush_sync()
    want = state(led)
    info = msgpack.unpackb(kv.get(st.ctx_key("c")))
    for bad in ([6, 1, b"short", b"\0" * 32], [-1, 0, b"", b"\0" * 32], [6, 2**64 - 1, b"", b""], [6, 1, b"\0" * 96, None], "nonsense"):
        kv.write([(st.ctx_key("c"), msgpack.packb({**info, "head": bad}))])
        assert state(make(kv, tmp_path)) == want, bad


def test_a_head_whose_nodes_do_not_hash_to_its_root_is_read_from_the_entries(tmp_path, caplog):
    kv = MemoryKV()
    led = make(kv, tmp_path)
    fill(led, "c", 6)
    led.flush_sync()
    want = state(led)
    info = msgpack.unpackb(kv.get(st.ctx_key("c")))
    size, lamport, nodes, root = info["head"]
    kv.write([(st.ctx_key("c"), msgpack.packb({**info, "head": [size, lamport, nodes, b"\x01" * 32]}))])
    with caplog.at_level(logging.WARNING, logger="node.ledger"):
        assert state(make(kv, tmp_path)) == want
    assert "does not hash to its root" in caplog.text


def test_no_clean_mark_while_something_is_not_on_disk(tmp_path):
    kv = MemoryKV()
    led = make(kv, tmp_path)
    fill(led, "c", 2)
    assert not led.mark_clean()  # pending
    assert kv.get(CLEAN_KEY) is None
    led.flush_sync()
    led.write_failed("disk full")
    assert not led.mark_clean()
    assert kv.get(CLEAN_KEY) is None


def test_a_clean_stop_brings_every_head_up_to_date_the_load_path_too(tmp_path):
    kv = MemoryKV()
    led = make(kv, tmp_path)
    fill(led, "c", 3)
    led.flush_sync()
    c = led.contexts["c"]
    c.hinted = -1  # as if a write path had not kept its head
    kv.write([(st.ctx_key("c"), msgpack.packb({"id": c.id, "writer": c.writer, "created_ns": 0}))])
    assert led.mark_clean()
    assert head_of(kv, "c")[0] == 3


def test_after_a_clean_stop_entries_lost_from_the_end_of_their_log_are_still_found(tmp_path, caplog):
    # the entries' LevelDB log cut short after the stop: its last write (the clean mark) goes first
    kv, led = cleanly_stopped(tmp_path, 10)
    cid = led.contexts["c"].id
    kv.write((), [CLEAN_ENTRIES_KEY] + [st.entry_key(cid, s) for s in range(7, 11)])
    caplog.set_level(logging.INFO, logger="node.ledger")
    again = make(kv, tmp_path)
    assert again.contexts["c"].size == 6
    assert cid in again.damaged  # and its high-water mark says what it held
    assert "entries' store lost writes since the clean stop" in caplog.text


def test_with_durable_reads_nothing_is_read_before_it_is_on_disk(tmp_path):
    # sync durability (SPEC 9.2): a read never returns an entry a crash could still take back
    kv = MemoryKV()
    led = Ledger(kv, node_id="n1", now_ns=FakeClock(), sync_meta=False, durable_reads=True)
    fill(led, "c", 3)
    led.flush_sync()
    fill(led, "c", 2)  # in RAM only
    got = led.get(codec.Get("c", after=0, limit=100))
    assert len(got[0]) == 3 and got[1] == 3 and not got[2]
    assert led.get(codec.Get("c", after=3, limit=1))[0] == []  # not even from the hot tail
    h = led.head("c")
    assert h["size"] == 3 and h["root"] == led.root_at(led.contexts["c"], 3)
    assert h["lamport"] == led.lamport_at(led.contexts["c"], 3)
    heads, _ = led.heads_in_buckets(set(range(128)), 128, None, 10)
    assert heads[0][1:3] == [3, h["root"]]
    led.flush_sync()
    assert led.head("c")["size"] == 5 and len(led.get(codec.Get("c", after=0, limit=100))[0]) == 5


def test_after_a_clean_stop_the_clock_goes_on_from_its_last_value_after_a_crash_from_its_reservation(tmp_path):
    kv, led = cleanly_stopped(tmp_path, 3)
    last = led.contexts["c"].last_lamport
    again = make(kv, tmp_path)
    fill(again, "c", 1)
    assert again.contexts["c"].last_lamport == last + 1  # no jump of a reservation block
    again.flush_sync()
    crashed = make(kv, tmp_path)  # no clean stop: the reservation written before that tick holds
    fill(crashed, "c", 1)
    assert crashed.contexts["c"].last_lamport > last + 1 + 1000
