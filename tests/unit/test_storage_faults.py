"""Storage write faults in the engine (node.ledger.Ledger) and the health state machine.

`FaultyKV` is a MemoryKV whose writes fail like LevelDB's after a full disk or EIO:
the error is sticky (every later write fails too) until the handle is reopened, and a
reopen needs room on the disk.
"""

from __future__ import annotations

import errno
import io

import pytest

from node import ledger as ledger_mod
from node import storage as st
from node.ledger import Ledger
from node.storage import MemoryKV, StorageHealth, WriteFailed
from protocol import codec
from protocol.entry import decode_entry
from protocol.errors import StorageError
from protocol.snapshot import read_snapshot
from tests.unit.test_ledger import FakeClock, app, load_bytes, snapshot_bytes

pytestmark = pytest.mark.timeout(60)

ENOSPC = "IO error: /data/000007.log: No space left on device"


class FaultyKV(MemoryKV):
    def __init__(self) -> None:
        super().__init__()
        self.broken = False  # sticky, as LevelDB's background error: cleared only by reopen()
        self.room = True
        self.probe_ok = True  # False: the room probe fails even when a reopen would work
        self.fail_after: int | None = None  # writes that still succeed before the disk breaks
        self.attempts = 0
        self.reopens = 0

    def write(self, puts, deletes=(), sync: bool = False) -> None:  # type: ignore[no-untyped-def]
        self.attempts += 1
        if self.fail_after is not None:
            if self.fail_after == 0:
                self.broken = True
                self.fail_after = None
            else:
                self.fail_after -= 1
        if self.broken:
            raise WriteFailed(ENOSPC)
        super().write(puts, deletes, sync)

    def prepare(self, puts, sync: bool = False):  # type: ignore[no-untyped-def]
        items = list(puts)
        return lambda: self.write(items, sync=sync)

    def ensure_room(self, nbytes: int) -> None:
        if not (self.room and self.probe_ok):
            raise OSError(errno.ENOSPC, "No space left on device")

    def reopen(self) -> None:
        self.reopens += 1
        if not self.room:
            raise WriteFailed("reopening storage failed: No space left on device")
        self.broken = False


def make(kv: MemoryKV, node_id: str = "n1") -> Ledger:
    return Ledger(kv, node_id=node_id, now_ns=FakeClock(), sync_meta=False)


def on_disk(kv: MemoryKV, name: str) -> int:
    """Entries of `name` a node restarted on `kv` would serve."""
    again = make(kv)
    return again.contexts[name].size if name in again.contexts else 0


def fail_flush(led: Ledger) -> None:
    """What the server does: hand the buffer off, the write fails, the loop is told."""
    batch, _dirty = led.take_pending()
    with pytest.raises(WriteFailed) as exc:
        led.kv.prepare(batch.items(), sync=True)()
    led.write_failed(str(exc.value), now=100.0)


def test_writes_are_refused_while_failed_and_change_nothing():
    kv = FaultyKV()
    led = make(kv)
    for i in range(3):
        app(led, payload=b"%d" % i)
    led.flush_sync()
    kv.broken = True
    app(led, payload=b"acknowledged in RAM")
    fail_flush(led)
    assert led.storage.failed and led.storage.write_errors == 1
    before = (dict(led.contexts), led.contexts["c1"].size, led.clock.value, dict(led.pending), kv.attempts)
    with pytest.raises(StorageError, match="storage failed"):
        app(led)
    with pytest.raises(StorageError):
        app(led, "brand-new")
    with pytest.raises(StorageError):
        led.append_batch(codec.AppendBatch("c1", (("", b"a", {}), ("", b"b", {}))))
    src = make(MemoryKV(), node_id="w")
    app(src, "rep")
    with pytest.raises(StorageError):
        led.apply_replicated("rep", [decode_entry(src.entry_blob(src.contexts["rep"], 1))])
    after = (dict(led.contexts), led.contexts["c1"].size, led.clock.value, dict(led.pending), kv.attempts)
    assert after == before  # nothing changed, and the broken handle was not written again
    # reads are served, the unwritten entry from RAM
    blobs, size, _more, _next = led.get(codec.Get("c1", after=0, limit=10))
    assert size == 4 and decode_entry(blobs[-1]).payload == b"acknowledged in RAM"


def test_a_failed_lamport_reservation_leaves_no_context_behind():
    kv = FaultyKV()
    led = make(kv)  # a fresh clock: the first tick must reserve on disk
    kv.broken = True
    with pytest.raises(StorageError):
        app(led, "new")
    assert "new" not in led.contexts and led.list_contexts(None, 10) == ([], False)
    assert st.ctx_key("new") not in led.pending and st.meta_key("next_ctx") not in led.pending
    assert led.storage.failed
    attempts = kv.attempts
    with pytest.raises(StorageError):
        app(led, "new")
    assert kv.attempts == attempts  # refused without touching the broken handle
    kv.broken = False
    assert led.recover(sync=True, now=1e9) is not None
    e = app(led, "new")
    assert e.seq == 1 and led.contexts["new"].id == 1  # the id of the refused attempt is not skipped


def test_the_kept_batch_is_written_on_recovery_and_nothing_is_lost():
    kv = FaultyKV()
    led = make(kv)
    acked = [app(led, payload=b"%d" % i) for i in range(5)]
    led.flush_sync()
    kv.broken = True
    acked += [app(led, payload=b"async %d" % i) for i in range(5)]  # acknowledged in RAM (async)
    fail_flush(led)
    kv.room = False
    assert not led.storage.due(100.1)  # backoff
    assert led.storage.due(100.2)
    assert led.recover(sync=True, now=100.2) is None  # still no room: the handle is not even reopened
    assert kv.reopens == 0 and led.storage.failed
    assert "No space left" in led.storage.status(100.3)["last_attempt"]
    assert led.storage.next_attempt == pytest.approx(100.6)  # the backoff doubled
    assert on_disk(kv, "c1") == 5
    kv.room = True
    dirty = led.recover(sync=True, now=101.0)
    assert dirty is not None and dirty[led.contexts["c1"]] == 10
    assert kv.reopens == 1 and not led.storage.failed
    s = led.storage.status(101.0)
    assert s == {"state": "ok", "write_errors": 1, "recoveries": 1}
    assert on_disk(kv, "c1") == 10
    again = make(kv)
    blobs, _size, _more, _n = again.get(codec.Get("c1", after=0, limit=100))
    assert [decode_entry(b) for b in blobs] == acked
    assert app(led).seq == 11  # writes taken again


def test_a_recovery_whose_write_fails_again_stays_failed():
    kv = FaultyKV()
    led = make(kv)
    app(led)
    kv.broken = True
    fail_flush(led)
    kv.fail_after = 0  # the reopen works, the write after it does not (EIO, say)
    assert led.recover(sync=True, now=200.0) is None
    assert led.storage.failed and led.storage.write_errors == 2 and led.storage.recoveries == 0
    kv.broken = False
    assert led.recover(sync=True, now=300.0) is not None
    assert on_disk(kv, "c1") == 1


def test_flush_sync_writes_the_batch_a_failed_write_kept():
    # shutdown: the failed batch sits in `inflight`, not in `pending`; it must be written too
    kv = FaultyKV()
    led = make(kv)
    acked = [app(led, payload=b"%d" % i) for i in range(1001)]
    kv.broken = True
    fail_flush(led)
    kv.broken = False  # as the server's final attempt does after reopening
    led.flush_sync()
    assert on_disk(kv, "c1") == 1001
    assert led.unwritten() == []
    assert make(kv).contexts["c1"].frontier.root() == led.contexts["c1"].frontier.root()
    assert decode_entry(make(kv).entry_blob(make(kv).contexts["c1"], 1001)) == acked[-1]


def test_unwritten_names_what_would_be_lost():
    kv = FaultyKV()
    led = make(kv)
    app(led, "a")
    led.flush_sync()
    app(led, "a")
    app(led, "a")
    app(led, "b")
    assert sorted(led.unwritten()) == [("a", 2, 3), ("b", 1, 1)]


def test_observe_defers_the_reservation_while_failed():
    kv = FaultyKV()
    led = make(kv)
    app(led)
    kv.broken = True
    fail_flush(led)
    reserved = led._reserved
    led.observe(10**9)  # a heartbeat: must not raise into the mesh
    assert led.clock.value >= 10**9 and led._reserved == reserved
    with pytest.raises(StorageError):
        app(led)
    kv.broken = False
    led.recover(sync=True, now=1e9)
    e = app(led)
    assert e.lamport > 10**9
    assert make(kv).clock.value >= e.lamport  # reserved on disk before it was handed out


def test_a_load_whose_commit_fails_changes_nothing(monkeypatch):
    monkeypatch.setattr(ledger_mod, "LOAD_COMMIT_CHUNK", 2)  # commit in chunks of ~6 keys
    src = make(MemoryKV(), node_id="w")
    for i in range(20):
        app(src, "ctx", payload=b"%d" % i)
    blob = snapshot_bytes(src, "ctx")
    kv = FaultyKV()
    dst = make(kv, node_id="n2")
    kv.fail_after = 3 + 1  # three staged chunks, one commit chunk, then the disk is full
    with pytest.raises(StorageError, match="start it again"):
        load_bytes(dst, "ctx", blob)
    assert "ctx" not in dst.contexts and not dst.loads
    assert dst.storage.failed
    kv.broken = False
    assert dst.recover(sync=True, now=1e9) is not None
    assert "ctx" not in make(kv, node_id="n2").contexts  # the chunk written is nobody's
    e = app(dst, "other")
    assert e.seq == 1
    dst.flush_sync()
    again = make(kv, node_id="n2")
    assert again.contexts["other"].size == 1 and again.contexts["other"].id != 1  # the orphans' id is not reused


def test_a_load_extending_a_context_that_fails_midway_leaves_it_as_it_was(monkeypatch):
    monkeypatch.setattr(ledger_mod, "LOAD_COMMIT_CHUNK", 2)
    src = make(MemoryKV(), node_id="w")
    for i in range(20):
        app(src, "ctx", payload=b"%d" % i)
    blob = snapshot_bytes(src, "ctx")
    header, entries = read_snapshot(io.BytesIO(blob))
    es = list(entries)
    kv = FaultyKV()
    dst = make(kv, node_id="n2")
    dst.load(codec.Load("ctx", "L0", 3, src.root_at(src.contexts["ctx"], 3), tuple(es[:3]), True, False), sync=False)
    root3 = dst.head("ctx")["root"]
    kv.fail_after = 3 + 1
    with pytest.raises(StorageError):
        load_bytes(dst, "ctx", blob)
    assert dst.contexts["ctx"].size == 3 and dst.head("ctx")["root"] == root3
    kv.broken = False
    assert dst.recover(sync=True, now=1e9) is not None
    # the chunk that reached disk before the fault is removed by the recovery's write
    assert make(kv, node_id="n2").contexts["ctx"].size == 3
    assert header["size"] == 20


def test_health_backoff_and_status():
    h = StorageHealth()
    assert h.status(0.0) == {"state": "ok", "write_errors": 0, "recoveries": 0}
    assert h.fail("disk full", 10.0) is True
    assert h.fail("disk full", 10.1) is False  # the same failure
    s = h.status(11.0)
    assert s["state"] == "failed" and s["error"] == "disk full" and s["since_s"] == 1.0 and s["write_errors"] == 2
    waits = []
    t = 20.0
    for _ in range(8):
        h.retry_later("no room", t)
        waits.append(round(h.next_attempt - t, 3))
    assert waits == [0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0, 5.0]
    h.recovered()
    assert not h.failed and h.status(30.0)["recoveries"] == 1
    h.fail("EIO", 40.0)
    assert h.next_attempt == pytest.approx(40.2)  # a new failure starts the backoff again


def test_storage_is_a_stable_code_in_the_spec_and_the_client():
    from pathlib import Path

    from protocol import errors

    assert errors.STORAGE == "STORAGE" and errors.STORAGE in errors.ALL_CODES
    e = errors.error_for("STORAGE", "disk full", {"error": "ENOSPC"})
    assert isinstance(e, StorageError) and e.code == "STORAGE" and e.details == {"error": "ENOSPC"}
    spec = (Path(__file__).parents[2] / "protocol" / "SPEC.md").read_text()
    table = spec.split("## 11. Error codes", 1)[1].split("\n## ", 1)[0]
    for code in errors.ALL_CODES:
        assert f"| `{code}` |" in table, code


def test_a_start_on_a_disk_that_cannot_be_written_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    from node import main as node_main

    def broken_kv(path: str) -> FaultyKV:
        kv = FaultyKV()
        kv.broken = True  # opens (LevelDB's open needs no room when there is no log to replay) but cannot write
        return kv

    monkeypatch.setattr(node_main, "LevelDBKV", broken_kv)
    rc = node_main.main(["--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("ledger-node: error: cannot write to data folder") and "No space left" in err
    assert "Traceback" not in err
