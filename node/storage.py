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

FORMAT_VERSION = b"1"
MAX_OPEN_FILES = 200  # LevelDB's table cache (its default is 1,000); node/clients.py reserves it

log = logging.getLogger(__name__)

_u32 = struct.Struct(">I")
_u32u64 = struct.Struct(">IQ")
_node = struct.Struct(">IBQ")
_dedup_val = struct.Struct(">QI")


def meta_key(name: str) -> bytes:
    return META + name.encode()


def ctx_key(name: str) -> bytes:
    return CTX + name.encode()


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


def dedup_value(first_seq: int, count: int) -> bytes:
    return _dedup_val.pack(first_seq, count)


def parse_dedup_value(v: bytes) -> tuple[int, int]:
    first, count = _dedup_val.unpack(v)
    return first, count


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
    """LevelDB through plyvel. One process per folder (LevelDB's LOCK file)."""

    def __init__(self, path: str, *, create: bool = True, lru_cache_size: int = 8 << 20,
                 max_open_files: int = MAX_OPEN_FILES, verify_checksums: bool = True,
                 paranoid_checks: bool = False) -> None:
        import plyvel  # imported here so MemoryKV users need no LevelDB

        self.path = path
        self._plyvel: Any = plyvel
        self._corruption = plyvel.CorruptionError
        # every read checks the CRC of the blocks it reads (a flipped byte on disk is an error)
        self._verify = verify_checksums
        # max_open_files is bounded, so the descriptors LevelDB may open are reserved out of the
        # process's limit and never taken by clients (node/clients.py). paranoid_checks is off
        # (LevelDB's default): with it, one damaged block met by a background compaction stops
        # every later write of the node until it is reopened; the reads' checksums, the snapshot
        # path's leaf hashes, the scrub and --check find such damage instead
        self._options = {"lru_cache_size": lru_cache_size, "write_buffer_size": 32 << 20, "bloom_filter_bits": 10,
                         "max_open_files": max_open_files, "paranoid_checks": paranoid_checks}
        try:
            self._db: Any = plyvel.DB(path, create_if_missing=create, **self._options)
        except plyvel.IOError as exc:
            text = _text(exc)
            if "lock" in text.lower():
                raise StorageLocked(text) from None
            raise
        self._compactor: threading.Thread | None = None

    def _closed(self) -> StorageError:
        return StorageError("storage is being reopened after a write error; try again shortly")

    def get(self, key: bytes) -> bytes | None:
        db = self._db
        if db is None:
            raise self._closed()
        try:
            return db.get(key, verify_checksums=self._verify)  # type: ignore[no-any-return]
        except self._corruption as exc:
            raise Corruption(str(exc)) from None

    def write(self, puts: Iterable[tuple[bytes, bytes]], deletes: Iterable[bytes] = (), sync: bool = False) -> None:
        if self._db is None:
            raise WriteFailed("the storage handle is closed (a reopen after a write error failed)")
        wb = self._db.write_batch(sync=sync)
        put = wb.put
        for k, v in puts:
            put(k, v)
        for k in deletes:
            wb.delete(k)
        try:
            wb.write()
        except self._plyvel.Error as exc:
            raise WriteFailed(_text(exc)) from None

    def prepare(self, puts: Iterable[tuple[bytes, bytes]], sync: bool = False) -> Callable[[], None]:
        # Building the batch needs the GIL (one Python call per key), so the
        # caller's thread does it; the returned write runs in C++ with the GIL
        # released, so a flusher thread really works in parallel.
        if self._db is None:
            raise WriteFailed("the storage handle is closed (a reopen after a write error failed)")
        wb = self._db.write_batch(sync=sync)
        put = wb.put
        for k, v in puts:
            put(k, v)
        error = self._plyvel.Error

        def commit() -> None:
            try:
                wb.write()
            except error as exc:
                raise WriteFailed(_text(exc)) from None
        return commit

    def scan(self, start: bytes, stop: bytes, reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        if self._db is None:
            raise self._closed()
        it = self._db.iterator(start=start, stop=stop, reverse=reverse, verify_checksums=self._verify)
        try:
            yield from it
        except self._corruption as exc:
            raise Corruption(str(exc)) from None
        finally:
            it.close()

    def scan_keys(self, start: bytes, stop: bytes) -> Iterator[bytes]:
        if self._db is None:
            raise self._closed()
        it = self._db.iterator(start=start, stop=stop, include_value=False)
        try:
            yield from it
        finally:
            it.close()

    def compact(self, start: bytes, stop: bytes, background: bool = False) -> None:
        db = self._db
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
        if self._db is not None:
            self._db.close()
            self._db = None

    def ensure_room(self, nbytes: int) -> None:
        # A reopen replays the log into a new table file before it serves, so it needs
        # about the log's size again, on top of the batch that is then written.
        logs = 0
        for name in os.listdir(self.path):
            if name.endswith(".log"):
                try:
                    logs += os.path.getsize(os.path.join(self.path, name))
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
