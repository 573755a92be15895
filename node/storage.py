"""Storage: an ordered key-value interface, its two implementations, and the key layout.

`KV` is all the node needs from a disk: point reads, atomic batched writes
(optionally fsynced) and ordered range scans. `LevelDBKV` is the real one
(plyvel); `MemoryKV` serves unit tests and `--data :memory:`.

Key layout (every multi-byte number big-endian, so LevelDB's byte order is
numeric order):

    b"M" + name                           node meta: node_id, lamport (reserved), format, next_ctx
    b"C" + context (UTF-8)                msgpack {"id": u32, "writer": str, "created_ns": int}
    b"E" + u32 ctx_id + u64 seq           the entry, as its wire msgpack map
    b"N" + u32 ctx_id + u8 level + u64 i  32-byte hash of complete Merkle node (level, i), level >= 3
                                          (leaves are the entries' own `hash` fields; levels 1-2
                                          are rebuilt from at most 8 leaves when a proof needs them)
    b"D" + u32 ctx_id + dedup_id          u64 first seq + u32 count of the append it names
    b"S" + u32 load_no + u64 seq          entries of a load in progress (deleted, and the range
                                          compacted, when the load ends and at start-up)
    b"F" + u32 ctx_id                     msgpack {"name", "writer", "created_ns"}: a history set aside
                                          by a fork (its entries stay under b"E" + ctx_id); the name's
                                          b"C" record then names the history served by default

Two LevelDB stores (format 2; `LevelDBKV` routes each key by its first byte). The entries
(b"E") live alone in DATA/entries; everything else stays in DATA itself. Why: appends write
entry keys in increasing order, so each memtable LevelDB flushes covers a key range no older
table touches and moves down the levels without being rewritten (a "trivial move"). One key
from another range in the same memtable (a Merkle node, a dedup record, the Lamport
reservation) makes that flush's range cover every older entry table, and then each compaction
rewrites them: measured with the node's write pattern for one context (docs/benchmarks.md
"Storage layout"), 3M appends in one store took write stalls of 3.6 and 7.5 s and wrote 3.45
bytes per byte stored; with the entries alone, none over 0.1 s up to 10M entries and 2.0 bytes
per byte (the log, then the table). A batch is written to DATA first, then to DATA/entries:
a crash between the two leaves Merkle nodes and dedup records ahead of their entries, which
the node tolerates (nodes are written again when their entries are; a dedup record names the
first entry's hash and is ignored when that entry is not the one stored). A format-1 folder
(one store) is moved over at the first start of this version (`migrate`).
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from protocol.errors import StorageError

META = b"M"
CTX = b"C"
ENTRY = b"E"
NODE = b"N"
DEDUP = b"D"
STAGE = b"S"
ASIDE = b"F"
# b"B" + u16 fine digest bucket + name: every context's name by the bucket of the fine digest it
# counts in (protocol.digest.FINE), so that the heads of a few buckets are found by a short scan
BUCKET = b"B"

FORMAT_VERSION = b"3"  # 3: 2 plus the b"B" name index (built by the ledger's first start on a format-2 folder)
TWO_STORES = (b"2", b"3")  # the formats with the entries in a store of their own
ENTRIES_DIR = "entries"  # the entries' own LevelDB, inside the data folder
# LevelDB's table caches, both stores (its default is 1,000 each); node/clients.py reserves it. A
# read that finds its table closed opens it first (its index and bloom filter: ~0.5-1 ms): with
# 200 (160 for the entries), a single 10M-entry context (141 entry tables, 67 others) had random
# reads' p99 at 773 us in-process; with 400 (300), 218 us
MAX_OPEN_FILES = 400
ENTRY_OPEN_FILES = 300  # of MAX_OPEN_FILES, for the entries' store (most of the tables)
MIGRATE_BATCH_BYTES = 32 << 20

log = logging.getLogger(__name__)

_u32 = struct.Struct(">I")
_u32u64 = struct.Struct(">IQ")
_node = struct.Struct(">IBQ")
_dedup_val = struct.Struct(">QI")
DEDUP_HASH_BYTES = 8  # of the first entry's leaf hash, after first seq and count


def meta_key(name: str) -> bytes:
    return META + name.encode()


def ctx_key(name: str) -> bytes:
    return CTX + name.encode()


def bucket_key(fine: int, name: bytes) -> bytes:
    return BUCKET + fine.to_bytes(2, "big") + name


def bucket_prefix(fine: int) -> bytes:
    return BUCKET + fine.to_bytes(2, "big")


def entry_key(ctx_id: int, seq: int) -> bytes:
    return ENTRY + _u32u64.pack(ctx_id, seq)


def entry_prefix(ctx_id: int) -> bytes:
    return ENTRY + _u32.pack(ctx_id)


def u32_of(key: bytes) -> int:
    """The u32 after a one-byte prefix (a ctx id in b"F" keys)."""
    return int(_u32.unpack_from(key, 1)[0])


def seq_of_entry_key(key: bytes) -> int:
    seq: int = _u32u64.unpack_from(key, 1)[1]
    return seq


def node_key(ctx_id: int, level: int, index: int) -> bytes:
    return NODE + _node.pack(ctx_id, level, index)


def dedup_key(ctx_id: int, dedup_id: bytes) -> bytes:
    return DEDUP + _u32.pack(ctx_id) + dedup_id


def dedup_value(first_seq: int, count: int, first_hash: bytes) -> bytes:
    return _dedup_val.pack(first_seq, count) + first_hash[:DEDUP_HASH_BYTES]


def parse_dedup_value(v: bytes) -> tuple[int, int, bytes | None]:
    """(first seq, count, start of the first entry's hash; None in a record of format 1)."""
    first, count = _dedup_val.unpack_from(v)
    return first, count, v[_dedup_val.size:] or None


def aside_key(ctx_id: int) -> bytes:
    return ASIDE + _u32.pack(ctx_id)


def stage_key(load_no: int, seq: int) -> bytes:
    return STAGE + _u32u64.pack(load_no, seq)


def stage_prefix(load_no: int) -> bytes:
    return STAGE + _u32.pack(load_no)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with `prefix`."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b"\xff" * 64
    p[-1] += 1
    return bytes(p)


class StorageLocked(Exception):
    """Another process holds the data folder."""


class EntriesMissing(Exception):
    """A format-2 data folder without its entries' store (DATA/entries)."""


class WriteFailed(Exception):
    """A storage write failed (disk full, EIO, out of file descriptors).

    LevelDB keeps such an error sticky: every later write on the same handle
    fails too, and what the failed write left in its log is undefined until the
    handle is reopened (the reopen replays the log up to the damage). So the
    caller must stop writing on this handle; `reopen()` gives a fresh one.
    """


class Corruption(Exception):
    """A read found damaged data in storage (LevelDB's block checksum did not match)."""


class KV(Protocol):
    def get(self, key: bytes) -> bytes | None: ...

    def write(self, puts: Iterable[tuple[bytes, bytes]], deletes: Iterable[bytes] = (), sync: bool = False) -> None: ...

    def prepare(self, puts: Iterable[tuple[bytes, bytes]], sync: bool = False) -> Callable[[], None]:
        """Stage an atomic write now; the returned callable performs it (in any thread)."""
        ...

    def scan(self, start: bytes, stop: bytes, reverse: bool = False) -> Iterator[tuple[bytes, bytes]]: ...

    def scan_keys(self, start: bytes, stop: bytes) -> Iterator[bytes]: ...

    def compact(self, start: bytes, stop: bytes, background: bool = False) -> None:
        """Give back the disk space of deleted keys in [start, stop). A delete only writes a
        tombstone: the old values stay in the files until a compaction reaches them."""
        ...

    def close(self) -> None: ...

    def ensure_room(self, nbytes: int) -> None:
        """Raise OSError unless `nbytes` more (plus what a reopen needs) fit on the disk."""
        ...

    def reopen(self) -> None:
        """Close the handle and open it again (after a failed write); raises WriteFailed."""
        ...


class MemoryKV:
    """A sorted in-memory KV with the same semantics as LevelDBKV."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._keys: list[bytes] = []
        # the flusher thread writes while the loop scans (`--data :memory:`): a write between a
        # scan's two bisects returned keys of another range (found by the fuzz suite)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:  # copy.deepcopy (a crash, in the simulation)
        with self._lock:
            return {"_data": dict(self._data), "_keys": list(self._keys)}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def write(self, puts: Iterable[tuple[bytes, bytes]], deletes: Iterable[bytes] = (), sync: bool = False) -> None:
        with self._lock:
            for k, v in puts:
                if k not in self._data:
                    bisect.insort(self._keys, k)
                self._data[k] = v
            for k in deletes:
                if self._data.pop(k, None) is not None:
                    i = bisect.bisect_left(self._keys, k)
                    del self._keys[i]

    def prepare(self, puts: Iterable[tuple[bytes, bytes]], sync: bool = False) -> Callable[[], None]:
        items = list(puts)
        return lambda: self.write(items, sync=sync)

    def scan(self, start: bytes, stop: bytes, reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        with self._lock:
            lo = bisect.bisect_left(self._keys, start)
            hi = bisect.bisect_left(self._keys, stop)
            keys = self._keys[lo:hi]
        if reverse:
            keys.reverse()
        for k in keys:
            v = self._data.get(k)
            if v is not None:
                yield k, v

    def scan_keys(self, start: bytes, stop: bytes) -> Iterator[bytes]:
        for k, _v in self.scan(start, stop):
            yield k

    def compact(self, start: bytes, stop: bytes, background: bool = False) -> None:
        pass  # deletes free their memory at once

    def close(self) -> None:
        pass

    def ensure_room(self, nbytes: int) -> None:
        pass

    def reopen(self) -> None:
        pass


def _text(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else exc
    return arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)


class LevelDBKV:
    """LevelDB through plyvel: two stores in one data folder (the entries in DATA/entries,
    the rest in DATA; see the module's docstring), one process per folder (LevelDB's LOCK
    files). Every scan and compaction stays within one key prefix, so within one store."""

    def __init__(self, path: str, *, create: bool = True, lru_cache_size: int = 8 << 20,
                 max_open_files: int = MAX_OPEN_FILES, verify_checksums: bool = True,
                 paranoid_checks: bool = False) -> None:
        import plyvel  # imported here so MemoryKV users need no LevelDB

        self.path = path
        self.entries_path = os.path.join(path, ENTRIES_DIR)
        self._plyvel: Any = plyvel
        self._corruption = plyvel.CorruptionError
        # every read checks the CRC of the blocks it reads (a flipped byte on disk is an error)
        self._verify = verify_checksums
        # max_open_files is bounded, so the descriptors LevelDB may open are reserved out of the
        # process's limit and never taken by clients (node/clients.py). paranoid_checks is off
        # (LevelDB's default): with it, one damaged block met by a background compaction stops
        # every later write of the node until it is reopened; the reads' checksums, the snapshot
        # path's leaf hashes, the scrub and --check find such damage instead
        entry_files = max_open_files * ENTRY_OPEN_FILES // MAX_OPEN_FILES
        self._options = {"lru_cache_size": lru_cache_size, "write_buffer_size": 16 << 20, "bloom_filter_bits": 10,
                         "max_open_files": max_open_files - entry_files, "paranoid_checks": paranoid_checks}
        # the entries are read by seq ranges and by one seq: a bloom filter saves a table read
        # only for a seq that does not exist; memtables of 32 MB make the tables that move down
        self._entry_options = {**self._options, "write_buffer_size": 32 << 20, "max_open_files": entry_files}
        self._db: Any = self._open(path, create, self._options)
        self._edb: Any = None
        self._compactor: threading.Thread | None = None
        try:
            fmt = self._db.get(meta_key("format"))
            if fmt in TWO_STORES and not os.path.isdir(self.entries_path):
                raise EntriesMissing(
                    f"{self.entries_path} is missing: the entries of this data folder are kept there (storage "
                    "format 2); put it back (a backup), or move the folder away and let this node refill from "
                    "its peers")
            if fmt is None or fmt in TWO_STORES or fmt == b"1":
                # a new folder, this format, or format 1 (to be migrated): anything else is left
                # for the ledger to refuse by its format record, without creating a store. A
                # format-2 folder whose entries' store is gone is refused, not served empty
                self._edb = self._open(self.entries_path, (create and fmt is None) or fmt == b"1",
                                       self._entry_options)
            if fmt == b"1":
                self.migrate()
            elif fmt in TWO_STORES:
                self._drop_stray_entries()
        except BaseException:
            self.close()
            raise

    def _open(self, path: str, create: bool, options: dict[str, Any]) -> Any:
        plyvel = self._plyvel
        try:
            return plyvel.DB(path, create_if_missing=create, **options)
        except plyvel.IOError as exc:
            text = _text(exc)
            if "lock" in text.lower():
                raise StorageLocked(text) from None
            raise

    def migrate(self) -> None:
        """Format 1 -> 2: copy the entries into their own store, record format 2, then delete
        them from the first store. Each step is safe to interrupt: an interrupted copy is done
        again (format is still 1), interrupted deletes are finished at the next start."""
        db, edb = self._db, self._edb
        t0 = last = time.monotonic()
        copied = nbytes = 0
        log.warning("data folder %r has storage format 1: moving its entries to %s/ (once; progress follows)",
                    self.path, ENTRIES_DIR)
        wb = edb.write_batch()
        pending = 0
        for k, v in db.iterator(start=ENTRY, stop=prefix_end(ENTRY), verify_checksums=self._verify):
            wb.put(k, v)
            pending += len(k) + len(v)
            copied += 1
            if pending >= MIGRATE_BATCH_BYTES:
                wb.write()
                wb = edb.write_batch()
                nbytes += pending
                pending = 0
                if time.monotonic() - last >= 5:
                    last = time.monotonic()
                    log.warning("storage format 1 -> 2: %d entries (%d MB) moved so far", copied, nbytes >> 20)
        wb.write()
        edb.write_batch(sync=True).write()  # an empty synced batch: what was copied is on disk
        db.put(meta_key("format"), b"2", sync=True)  # (the ledger's start then makes it 3)
        self._drop_stray_entries()
        log.warning("storage format 1 -> 2: %d entries moved in %.1f s", copied, time.monotonic() - t0)

    def _drop_stray_entries(self) -> None:
        """Entries left in the first store by a migration that stopped after its copy."""
        db = self._db
        if next(db.iterator(start=ENTRY, stop=prefix_end(ENTRY), include_value=False), None) is None:
            return
        wb = db.write_batch()
        n = 0
        for k in db.iterator(start=ENTRY, stop=prefix_end(ENTRY), include_value=False):
            wb.delete(k)
            n += 1
            if n % 100_000 == 0:
                wb.write()
                wb = db.write_batch()
        wb.write()
        db.compact_range(start=ENTRY, stop=prefix_end(ENTRY))
        log.info("removed %d entries of format 1 from the first store (they are in %s/)", n, ENTRIES_DIR)

    def _closed(self) -> StorageError:
        return StorageError("storage is being reopened after a write error; try again shortly")

    def _store(self, key: bytes) -> Any:
        return self._edb if key[:1] == ENTRY else self._db

    def get(self, key: bytes) -> bytes | None:
        db = self._store(key)
        if db is None:
            raise self._closed()
        try:
            return db.get(key, verify_checksums=self._verify)  # type: ignore[no-any-return]
        except self._corruption as exc:
            raise Corruption(str(exc)) from None

    def _batches(self, puts: Iterable[tuple[bytes, bytes]], deletes: Iterable[bytes], sync: bool) -> list[Any]:
        """The write batches of the first store and of the entries' store, in the order they
        must be written (see the module's docstring); a store with nothing to write is left out."""
        if self._db is None or self._edb is None:
            raise WriteFailed("the storage handle is closed (a reopen after a write error failed)")
        mb = self._db.write_batch(sync=sync)
        eb = self._edb.write_batch(sync=sync)
        mput, eput = mb.put, eb.put
        m = e = 0
        for k, v in puts:
            if k[:1] == ENTRY:
                eput(k, v)
                e += 1
            else:
                mput(k, v)
                m += 1
        for k in deletes:
            if k[:1] == ENTRY:
                eb.delete(k)
                e += 1
            else:
                mb.delete(k)
                m += 1
        return [b for b, n in ((mb, m), (eb, e)) if n]

    def write(self, puts: Iterable[tuple[bytes, bytes]], deletes: Iterable[bytes] = (), sync: bool = False) -> None:
        batches = self._batches(puts, deletes, sync)
        try:
            for wb in batches:
                wb.write()
        except self._plyvel.Error as exc:
            raise WriteFailed(_text(exc)) from None

    def prepare(self, puts: Iterable[tuple[bytes, bytes]], sync: bool = False) -> Callable[[], None]:
        # Building the batches needs the GIL (one Python call per key), so the
        # caller's thread does it; the returned write runs in C++ with the GIL
        # released, so a flusher thread really works in parallel.
        batches = self._batches(puts, (), sync)
        error = self._plyvel.Error

        def commit() -> None:
            try:
                for wb in batches:
                    wb.write()
            except error as exc:
                raise WriteFailed(_text(exc)) from None
        return commit

    def scan(self, start: bytes, stop: bytes, reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        db = self._store(start)
        if db is None:
            raise self._closed()
        it = db.iterator(start=start, stop=stop, reverse=reverse, verify_checksums=self._verify)
        try:
            yield from it
        except self._corruption as exc:
            raise Corruption(str(exc)) from None
        finally:
            it.close()

    def scan_keys(self, start: bytes, stop: bytes) -> Iterator[bytes]:
        db = self._store(start)
        if db is None:
            raise self._closed()
        it = db.iterator(start=start, stop=stop, include_value=False)
        try:
            yield from it
        finally:
            it.close()

    def compact(self, start: bytes, stop: bytes, background: bool = False) -> None:
        db = self._store(start)
        if db is None:
            return  # being reopened: a later compaction gives the space back
        if not background:
            db.compact_range(start=start, stop=stop)
            return
        # plyvel releases the GIL while LevelDB compacts, so a thread keeps the
        # event loop serving; one at a time, and close() (a reopen too) waits for it.
        if self._compactor is not None and self._compactor.is_alive():
            return

        def run() -> None:
            t0 = time.monotonic()
            try:
                db.compact_range(start=start, stop=stop)
            except Exception:
                log.exception("compacting %r..%r failed (the space is given back by a later compaction)",
                              start, stop)
            else:
                log.debug("compacted %r..%r in %.2f s", start, stop, time.monotonic() - t0)

        self._compactor = threading.Thread(target=run, name="compact", daemon=True)
        self._compactor.start()

    def close(self) -> None:
        if self._compactor is not None:
            self._compactor.join()
        for name in ("_edb", "_db"):
            db = getattr(self, name)
            if db is not None:
                db.close()
                setattr(self, name, None)

    def ensure_room(self, nbytes: int) -> None:
        # A reopen replays the log into a new table file before it serves, so it needs
        # about the log's size again, on top of the batch that is then written.
        logs = 0
        for folder in (self.path, self.entries_path):
            for name in os.listdir(folder):
                if name.endswith(".log"):
                    try:
                        logs += os.path.getsize(os.path.join(folder, name))
                    except OSError:
                        pass
        probe = os.path.join(self.path, "space-probe.tmp")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes + logs + (1 << 20))
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)

    def reopen(self) -> None:
        self.close()
        try:
            self._db = self._plyvel.DB(self.path, create_if_missing=False, **self._options)
            self._edb = self._plyvel.DB(self.entries_path, create_if_missing=False, **self._entry_options)
        except self._plyvel.Error as exc:
            raise WriteFailed(f"reopening storage failed: {_text(exc)}") from None


class StorageHealth:
    """Whether the node may write (and so acknowledge writes) now; counts faults and recoveries.

    `ok` -> (a write fails) -> `failed` -> (a recovery attempt, due after a backoff that
    doubles from RETRY_FIRST_S up to RETRY_MAX_S, reopens the handle and writes the kept
    batch) -> `ok`. Time is passed in. While failed, the node refuses writes with STORAGE
    and touches the broken handle no more.
    """

    RETRY_FIRST_S = 0.2
    RETRY_MAX_S = 5.0

    def __init__(self) -> None:
        self.error: str | None = None
        self.since = 0.0
        self.write_errors = 0
        self.recoveries = 0
        self.next_attempt = 0.0
        self.last_attempt = ""  # why the last recovery attempt did not write
        self._backoff = self.RETRY_FIRST_S

    @property
    def failed(self) -> bool:
        return self.error is not None

    def fail(self, error: str, now: float) -> bool:
        """Record a failed write; True when this starts a failure (it was ok)."""
        self.write_errors += 1
        first = self.error is None
        if first:
            self.since = now
            self._backoff = self.RETRY_FIRST_S
        self.error = error
        self.next_attempt = now + self._backoff
        self._backoff = min(self._backoff * 2, self.RETRY_MAX_S)
        return first

    def retry_later(self, reason: str, now: float) -> None:
        """A recovery attempt found the disk still unusable (no write was tried)."""
        self.last_attempt = reason
        self.next_attempt = now + self._backoff
        self._backoff = min(self._backoff * 2, self.RETRY_MAX_S)

    def due(self, now: float) -> bool:
        return self.error is not None and now >= self.next_attempt

    def recovered(self) -> None:
        self.error = None
        self.last_attempt = ""
        self.recoveries += 1
        self._backoff = self.RETRY_FIRST_S

    def status(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "state": "failed" if self.error is not None else "ok",
            "write_errors": self.write_errors,
            "recoveries": self.recoveries,
        }
        if self.error is not None:
            out["error"] = self.error
            out["since_s"] = round(now - self.since, 3)
            out["next_attempt_s"] = round(max(0.0, self.next_attempt - now), 3)
            if self.last_attempt:
                out["last_attempt"] = self.last_attempt
        return out
