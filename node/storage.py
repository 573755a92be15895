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
    b"S" + u32 load_no + u64 seq          entries of a load in progress (deleted at start-up)
    b"F" + u32 ctx_id                     msgpack {"name", "writer", "created_ns"}: a history set aside
                                          by a fork (its entries stay under b"E" + ctx_id); the name's
                                          b"C" record then names the history served by default
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

META = b"M"
CTX = b"C"
ENTRY = b"E"
NODE = b"N"
DEDUP = b"D"
STAGE = b"S"
ASIDE = b"F"

FORMAT_VERSION = b"1"

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
    return _u32u64.unpack_from(key, 1)[1]


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


class Corruption(Exception):
    """A read found damaged data in storage (LevelDB's block checksum did not match)."""


class KV(Protocol):
    def get(self, key: bytes) -> bytes | None: ...

    def write(self, puts: Iterable[tuple[bytes, bytes]], deletes: Iterable[bytes] = (), sync: bool = False) -> None: ...

    def prepare(self, puts: Iterable[tuple[bytes, bytes]], sync: bool = False) -> Callable[[], None]:
        """Stage an atomic write now; the returned callable performs it (in any thread)."""
        ...

    def scan(self, start: bytes, stop: bytes, reverse: bool = False) -> Iterator[tuple[bytes, bytes]]: ...

    def close(self) -> None: ...


class MemoryKV:
    """A sorted in-memory KV with the same semantics as LevelDBKV."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._keys: list[bytes] = []

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def write(self, puts: Iterable[tuple[bytes, bytes]], deletes: Iterable[bytes] = (), sync: bool = False) -> None:
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
        lo = bisect.bisect_left(self._keys, start)
        hi = bisect.bisect_left(self._keys, stop)
        keys = self._keys[lo:hi]
        if reverse:
            keys.reverse()
        for k in keys:
            v = self._data.get(k)
            if v is not None:
                yield k, v

    def close(self) -> None:
        pass


class LevelDBKV:
    """LevelDB through plyvel. One process per folder (LevelDB's LOCK file)."""

    def __init__(self, path: str, *, create: bool = True, lru_cache_size: int = 8 << 20,
                 verify_checksums: bool = True, paranoid_checks: bool = False) -> None:
        import plyvel  # imported here so MemoryKV users need no LevelDB

        self._corruption = plyvel.CorruptionError
        # every read checks the CRC of the blocks it reads (a flipped byte on disk is an error)
        self._verify = verify_checksums

        try:
            self._db = plyvel.DB(
                path,
                create_if_missing=create,
                lru_cache_size=lru_cache_size,
                write_buffer_size=32 << 20,
                bloom_filter_bits=10,
                # off (LevelDB's default): with it, one damaged block met by a background
                # compaction stops every later write of the node until it is reopened; the
                # reads' checksums, the snapshot path's leaf hashes, the scrub and --check
                # find such damage instead
                paranoid_checks=paranoid_checks,
            )
        except plyvel.IOError as exc:
            text = str(exc)
            if "lock" in text.lower():
                raise StorageLocked(text) from None
            raise
        self._wo_sync = True

    def get(self, key: bytes) -> bytes | None:
        try:
            return self._db.get(key, verify_checksums=self._verify)  # type: ignore[no-any-return]
        except self._corruption as exc:
            raise Corruption(str(exc)) from None

    def write(self, puts: Iterable[tuple[bytes, bytes]], deletes: Iterable[bytes] = (), sync: bool = False) -> None:
        wb = self._db.write_batch(sync=sync)
        put = wb.put
        for k, v in puts:
            put(k, v)
        for k in deletes:
            wb.delete(k)
        wb.write()

    def prepare(self, puts: Iterable[tuple[bytes, bytes]], sync: bool = False) -> Callable[[], None]:
        # Building the batch needs the GIL (one Python call per key), so the
        # caller's thread does it; the returned write runs in C++ with the GIL
        # released, so a flusher thread really works in parallel.
        wb = self._db.write_batch(sync=sync)
        put = wb.put
        for k, v in puts:
            put(k, v)
        return wb.write  # type: ignore[no-any-return]

    def scan(self, start: bytes, stop: bytes, reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        it = self._db.iterator(start=start, stop=stop, reverse=reverse, verify_checksums=self._verify)
        try:
            yield from it
        except self._corruption as exc:
            raise Corruption(str(exc)) from None
        finally:
            it.close()

    def close(self) -> None:
        self._db.close()
