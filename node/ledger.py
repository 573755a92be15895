"""The ledger engine: contexts, appends, reads, proofs, loads; no sockets, no threads.

It owns the in-memory state of every context (size, Merkle frontier, hot tail)
and the write-behind buffer. It never writes entries to disk itself on the
append path: appends go to `pending` (a dict of key -> value, so lookups of
not-yet-flushed nodes and dedup ids stay O(1)); the server hands that buffer
to its flusher thread with `take_pending()` and reports completion with
`mark_flushed()`. Everything below `flushed_seq` of a context is on disk;
only such entries may leave the hot tail.

Errors are raised as `protocol.errors.LedgerError` subclasses, which the
server turns into error replies with their stable code.
"""

from __future__ import annotations

import collections
import gc
import hashlib
import heapq
import logging
import os
import time
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from node import storage as st
from node.contexts import DEFAULT_CAPACITY, ContextTable
from node.marks import Journal
from node.sortednames import SortedNames
from node.storage import KV
from protocol import codec, merkle, watch
from protocol.digest import FINE, NBUCKETS, bucket_of, digest_item, fine_buckets
from protocol.entry import (
    MAX_CONTEXT_BYTES,
    MAX_WRITER_BYTES,
    Entry,
    decode_entry,
    encode_entry_parts,
    leaf_hash_named,
    leaf_names,
    packed_str,
)
from protocol.errors import (
    BadRequest,
    Conflict,
    IntegrityError,
    InternalError,
    NotFound,
    RemoteProtocolError,
    StorageError,
    TooLarge,
    Unavailable,
)
from protocol.heads import SignedHead
from protocol.heads import from_map as heads_from_map
from protocol.lamport import MAX_LAMPORT, ClockExhausted, LamportClock, needs_reservation, next_reservation
from protocol.snapshot import SnapshotVerifier

log = logging.getLogger(__name__)

MAX_REPLY_BYTES = 16 << 20
MAX_SCAN = 100_000  # entries examined by one filtered get before it returns `more`
HOT_ENTRY_OVERHEAD = 320  # bytes of Python objects per hot-tail entry beyond the blob (measured, rounded up)
LOAD_IDLE_S = 120.0
DEFAULT_MAX_LOADS = 4
DEFAULT_MAX_STAGED_BYTES = 256 << 20
LOAD_COMMIT_CHUNK = 10_000
# Merkle nodes below this level are not stored: a level-3 node covers 8 entries,
# so an append writes 1/8 of a node key on average instead of 2, and any lower
# node is rebuilt from at most 8 entry hashes (a constant factor on proofs).
STORED_MIN_LEVEL = 3
# Merkle nodes from this level up are kept in RAM once read (ContextState.upper): every proof
# in a big context needs a few of them, and there are size / 2**10 of them at most (~1.5 MB of
# RAM per 10M entries). With them, a proof at 10M entries reads as many nodes from storage as
# one at 10k (levels 3-9).
CACHED_MIN_LEVEL = 10
SHRINK_LOOKS = 20_000  # contexts a heartbeat's digest looks at to bring the cache down to size (~10 ms)
MAX_MERGED_BUCKETS = 512  # fine buckets merged for a sync_heads; past that, all names are filtered
# Written by a clean stop (`Ledger.mark_clean`) and removed by the next start: while it is there,
# and the high-water journal is still the one it names, every `C` record's head is current and
# start-up takes the heads as they are, reading nothing from the entries' store.
CLEAN_KEY = st.meta_key("clean")
# The same mark, written first, in the entries' store (context id 0 is never used): LevelDB's log
# loses a suffix, so while it is there, nothing written to that store before it was lost.
CLEAN_ENTRIES_KEY = st.entry_key(0, 0)
# Written with CLEAN_KEY: what start-up would otherwise count and compute from every context (their
# number, their entries, the fine digest), so that a start after a clean stop reads no context.
CLEAN_STATE_KEY = st.meta_key("clean_state")
FORMAT_KEY = st.meta_key("format")

_packb = msgpack.Packer(use_bin_type=True).pack
_node_key = st.node_key
_entry_key = st.entry_key
_unpackb = msgpack.unpackb


class DataDirError(Exception):
    """The data folder cannot be used as asked (wrong node id, newer format)."""


class ContextState:
    """What the node keeps in RAM for one context."""

    __slots__ = (
        "name", "name_bytes", "name_packed", "id", "writer", "size", "frontier", "last_lamport", "tail",
        "flushed_seq", "created_ns", "_topic", "published_seq", "leaf_names", "signed", "upper", "hinted",
        "contrib", "signed_hinted",
    )

    def __init__(self, name: str, ctx_id: int, writer: str, created_ns: int) -> None:
        self.name = name
        self.name_bytes = name.encode()
        self.name_packed = packed_str(name)
        self.id = ctx_id
        self.writer = writer
        self.size = 0
        self.frontier = merkle.Frontier()
        self.last_lamport = 0
        # seq -> (key, encoded entry); recent entries, bounded by the node-wide budget
        self.tail: dict[int, tuple[str, bytes]] = {}
        self.flushed_seq = 0
        self.created_ns = created_ns
        self._topic: bytes | None = None
        self.published_seq = 0  # entries up to here were published (or nobody watched them)
        self.leaf_names = leaf_names(self.name_bytes, writer.encode())  # constant part of every leaf hash
        # a replica's latest head signed by the writer (SPEC 13.6; from its pushes, on a node with keys);
        # kept in its `C` record (`Ledger.set_signed`), `signed_hinted` the one the record holds
        self.signed: SignedHead | None = None
        self.signed_hinted: SignedHead | None = None
        # complete Merkle nodes of level >= CACHED_MIN_LEVEL read for proofs, by (level, index).
        # Never stale: the nodes within a context's size do not change while this object serves
        # it (its history only grows; a damaged or forked history gets a new ContextState)
        self.upper: dict[tuple[int, int], bytes] | None = None  # made on first use: most contexts never need it
        # the size its `C` record's head (size, lamport, frontier) was last written at; -1: none written
        self.hinted = -1
        # what it counts for in the digest now (digest_item of its size and root when last taken)
        self.contrib = 0

    @property
    def topic(self) -> bytes:
        """Its exact-match watch topic (made on first use: most contexts are never published)."""
        t = self._topic
        if t is None:
            t = self._topic = watch.topic(self.name)
        return t


@dataclass
class LoadSession:
    context: str
    load_id: str
    load_no: int
    size: int
    root: bytes
    fail_if_exists: bool
    existing_size: int
    verifier: SnapshotVerifier
    prefix_root: bytes | None = None
    last_used: float = field(default_factory=time.monotonic)
    staged_bytes: int = 0  # encoded entries of this load under its b"S" keys
    # the context already holds more than the snapshot, and the snapshot's root is its root at the
    # snapshot's size: the entries are verified, not staged, and the load adds nothing (SPEC 6.9)
    covered: bool = False
    # the writer every entry names (SPEC 6.9: one writer per snapshot); None until the first entry
    writer: str | None = None


class AppendResult(NamedTuple):
    # a NamedTuple, not a frozen dataclass: built once per append on the hot path
    ctx: ContextState
    blobs: list[bytes]
    last_seq: int
    deduplicated: bool


_accel: types.ModuleType | None
try:  # the per-entry work of a pull in C (node/_accel.c), where it was built
    from node import _accel
except ImportError:  # no C compiler where this was installed: the same work in pure Python
    _accel = None
if os.environ.get("LEDGER_PURE_PYTHON"):  # (to compare, or to rule the C code out)
    _accel = None
ACCELERATED = _accel is not None
# SHA-256 in that C code too: OpenSSL's, where this process has libcrypto (node/_accel.c finds it);
# else the C code leaves the hashing to hashlib
HASHING_IN_C = _accel is not None and _accel.set_hashing(True)
_sha256 = hashlib.sha256
if _accel is not None and HASHING_IN_C:
    merkle.Frontier.accel_extend = _accel.frontier_extend
    merkle.Frontier.accel_root = _accel.frontier_root


def _stage_py(pending: dict[bytes, bytes], tail: dict[int, tuple[str, bytes]],
              hot_append: Callable[[tuple[int, int, int]], None], cid: int, first: int, keys: list[str],
              blobs: list[bytes], overhead: int) -> int:
    """Entries of context `cid` from seq `first` on, staged: each blob under its storage key in
    `pending` (the next write), (key, blob) in the context's hot `tail`, its size given to the hot
    tail's accounting; the bytes held. (node/_accel.c's `stage` where built: a catch-up's loop.)"""
    nbytes = 0
    seq = first
    for key, blob in zip(keys, blobs, strict=True):
        pending[_entry_key(cid, seq)] = blob
        tail[seq] = (key, blob)
        n = len(blob) + overhead
        hot_append((cid, seq, n))
        nbytes += n
        seq += 1
    return nbytes


def _stage(pending: dict[bytes, bytes], tail: dict[int, tuple[str, bytes]],
           hot_append: Callable[[tuple[int, int, int]], None], cid: int, first: int, keys: list[str],
           blobs: list[bytes], overhead: int) -> int:
    if _accel is not None:
        out: int | None = _accel.stage(pending, tail, hot_append, cid, first, keys, blobs, overhead)
        if out is not None:
            return out
    return _stage_py(pending, tail, hot_append, cid, first, keys, blobs, overhead)


class WireParts:
    """Replicated entries from seq `first` on, checked, hashed and encoded by `wire_parts`, for
    `Ledger.apply_replicated`: what its Python loop would compute from the same entries."""

    __slots__ = ("context", "writer", "first", "hashes", "keys", "blobs", "max_lamport", "last_lamport")

    def __init__(self, context: str, writer: str, first: int, hashes: list[bytes], keys: list[str],
                 blobs: list[bytes], max_lamport: int, last_lamport: int) -> None:
        self.context = context
        self.writer = writer
        self.first = first
        self.hashes = hashes
        self.keys = keys
        self.blobs = blobs
        self.max_lamport = max_lamport
        self.last_lamport = last_lamport

    def __len__(self) -> int:
        return len(self.hashes)


def _plain_name(name: str) -> bool:
    """A context name the C code takes: ASCII, 1..256 bytes (a name no context can have, or one to
    check as UTF-8, is the Python path's, which words the error)."""
    return 0 < len(name) <= MAX_CONTEXT_BYTES and name.isascii()


def wire_parts(name: str, raw: list[Any], first: int) -> WireParts | None:
    """The entries of a pull reply as msgpack decoded them (`raw`), seqs `first` on, of context
    `name`: checked, hashed and encoded in C when every one is the plain case (ASCII key, no
    metadata, the fields `entry_from_wire`'s fast path takes, consecutive seqs, one writer) and
    its hash holds; else None, and the caller takes the Python path, which words any error. A
    catch-up spends most of its CPU on this per entry (~2.5x less this way; docs/benchmarks.md)."""
    if _accel is None or not raw or not _plain_name(name):
        return None
    m = raw[0]
    w = m.get("writer") if type(m) is dict else None
    if type(w) is not str or not 0 < len(w) <= MAX_WRITER_BYTES or not w.isascii():
        return None
    out = _accel.replica_parts(raw, first, name, w, leaf_names(name.encode(), w.encode()), packed_str(name),
                               packed_str(w))
    if out is None:
        return None
    pre, hashes, keys, blobs, max_lamport, last_lamport = out
    if [_sha256(p).digest() for p in pre] != hashes:
        return None
    return WireParts(name, w, first, hashes, keys, blobs, max_lamport, last_lamport)


def packed_parts(name: str, blobs: list[Any], first: int) -> WireParts | None:
    """`wire_parts` for entries sent packed (SPEC 17.2: each a bin holding the entry's stored
    bytes): checked in C to be exactly the bytes this node would store (the shortest encodings,
    encode_entry_parts' layout, the plain case), their hashes hold; they are then stored as they
    came, neither decoded into maps nor encoded again. Else None: the caller decodes them
    (`codec.unpack_entries`) and takes the other paths."""
    if _accel is None or not blobs or not _plain_name(name):
        return None
    out = _accel.packed_parts(blobs, first, name)
    if out is None:
        return None
    pre, hashes, keys, max_lamport, last_lamport, w = out
    if pre is not None and [_sha256(p).digest() for p in pre] != hashes:  # (None: checked in C)
        return None
    return WireParts(name, w, first, hashes, keys, blobs, max_lamport, last_lamport)


class Ledger:
    def __init__(
        self,
        kv: KV,
        *,
        node_id: str | None = None,
        max_payload: int = 4 << 20,
        hot_bytes: int = 64 << 20,
        now_ns: Callable[[], int] = time.time_ns,
        sync_meta: bool = True,
        durable_reads: bool = False,
        max_loads: int = DEFAULT_MAX_LOADS,
        max_staged_bytes: int = DEFAULT_MAX_STAGED_BYTES,
        journal: Journal | None = None,
        context_cache: int = DEFAULT_CAPACITY,
    ) -> None:
        self.kv = kv
        self.max_loads = max_loads
        self.max_staged_bytes = max_staged_bytes
        self.staged_bytes = 0  # all loads in progress together
        self.loads_refused = 0  # chunks refused by --max-loads / --max-staged-bytes
        # the durable high-water marks (node/marks.py): None for a RAM-only node
        self.journal = journal
        # contexts that came back from disk shorter or different than their mark: id -> (size, root)
        self.damaged: dict[int, tuple[int, bytes]] = {}
        self.integrity_errors = 0  # entries read from disk that did not match their leaf hash
        # contexts with an entry found missing or damaged on disk by a read: id -> first such seq
        self.holes: dict[int, int] = {}
        self._scrub_at: tuple[str, int] = ("", 0)  # the background scrub's place: (context, last seq checked)
        self.scrubbed_entries = 0
        self.scrub_passes = 0
        self.max_payload = max_payload
        self.hot_limit = hot_bytes
        self.now_ns = now_ns
        self._sync_meta = sync_meta
        # `sync` durability: reads see only what is on disk (the acknowledged prefix), like the watch
        # stream (SPEC 9.2): a read must never return an entry a crash could still take back
        self.durable_reads = durable_reads
        # the contexts served: those in use in RAM, the others read from their `C` record on first
        # use (node/contexts.py). Every context outside the cache has a current head on disk.
        self.contexts: ContextTable[ContextState] = ContextTable(
            self._load_named, self._evictable, self._admitted, self._evicted, context_cache)
        # names created whose `C` (and `B`) record may not be on disk yet: listings and bucket
        # scans read the names from storage and merge these in
        self._fresh = SortedNames()
        self._fine: list[int] = [0] * FINE  # the fine digest, kept with the top one (`digest`)
        # contexts served by writer: a peer that writes none of them has none to compare (names_in_buckets)
        self.by_writer: dict[str, int] = {}
        self.pending: dict[bytes, bytes] = {}
        self.inflight: dict[bytes, bytes] = {}
        # bytes of entries waiting for storage (pending) and being written (inflight)
        self.pending_bytes = 0
        self.inflight_bytes = 0
        self._dirty: dict[ContextState, int] = {}
        # (context id, seq, bytes) in append order, for eviction. Plain ints, not
        # the ContextState: tuples of ints are untracked by the cyclic GC, so a
        # full hot tail does not turn every GC pass into a 50 ms pause.
        self._hot: collections.deque[tuple[int, int, int]] = collections.deque()
        self._by_id: dict[int, ContextState] = {}
        self.hot_bytes = 0
        self.entries_total = 0
        self.loads: dict[str, LoadSession] = {}
        self.aside: dict[str, list[ContextState]] = {}  # histories set aside by forks, by name
        self._buckets: list[int] = [0] * NBUCKETS
        self._digest_dirty: set[ContextState] = set()
        self._next_load_no = 1
        self.storage = st.StorageHealth()
        # the dirty map of the batch in `inflight` (kept while a failed write waits for recovery)
        self._inflight_dirty: dict[ContextState, int] = {}
        # contexts whose load commit failed after part of it reached disk: entries past
        # their size are deleted by the next successful write (see write_unwritten)
        self._stale_tails: set[ContextState] = set()
        # Start-up makes a few objects per context and frees none: the cyclic GC would go through
        # all of them again and again for nothing (a third of the start-up time at 200k contexts)
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            self.node_id = self._open(node_id)
        finally:
            if gc_was_on:
                gc.enable()
        self._writer_packed = packed_str(self.node_id)

    # -- start-up ----------------------------------------------------------

    def _open(self, wanted_id: str | None) -> str:
        kv = self.kv
        fmt = kv.get(st.meta_key("format"))
        if fmt is not None and fmt not in st.TWO_STORES:
            raise DataDirError(
                f"data folder has storage format {fmt.decode(errors='replace')}, "
                f"this version reads {st.FORMAT_VERSION.decode()}"
            )
        stored = kv.get(st.meta_key("node_id"))
        puts: list[tuple[bytes, bytes]] = []
        if stored is None:
            node_id = wanted_id or "node-" + os.urandom(4).hex()
            puts.append((st.meta_key("node_id"), node_id.encode()))
            puts.append((st.meta_key("format"), st.FORMAT_VERSION))
        else:
            node_id = stored.decode()
            if wanted_id and wanted_id != node_id:
                raise DataDirError(
                    f"data folder belongs to node {node_id!r}, not {wanted_id!r}; "
                    "use another --data folder or drop --id"
                )
        reserved_raw = kv.get(st.meta_key("lamport"))
        if reserved_raw and not (reserved_raw.isdigit() and len(reserved_raw) <= 20):
            raise DataDirError(f"data folder's Lamport clock record is damaged ({reserved_raw[:32]!r})")
        self._reserved = int(reserved_raw) if reserved_raw else 0
        if self._reserved > MAX_LAMPORT:
            # written by a version without the ceiling: the clock cannot go on from there
            log.error("the Lamport clock on disk (%d) is above the ceiling %d: appends on this node will be "
                      "refused; its reads and replication are unaffected", self._reserved, MAX_LAMPORT)
        self.clock = LamportClock(self._reserved)
        nxt = kv.get(st.meta_key("next_ctx"))
        self._next_ctx = int(nxt) if nxt else 1
        # Loads that were in progress when the node stopped are abandoned. A delete
        # only writes a tombstone, so the staged bytes would stay on disk until
        # LevelDB happened to compact that range (a node restarted after a flood of
        # unfinished loads kept them): compact it now, while nothing else runs.
        stale = list(kv.scan_keys(st.STAGE, st.prefix_end(st.STAGE)))
        if stale:
            log.info("discarding %d staged entries of unfinished loads", len(stale))
            kv.write((), stale, sync=False)
            kv.compact(st.STAGE, st.prefix_end(st.STAGE))
        # After a clean stop every context's head is current (see CLEAN_KEY) and CLEAN_STATE_KEY
        # holds what start-up needs of them all: no context is read until it is used. After any
        # other stop every context is read, its head checked against the entries' store.
        clean = kv.get(CLEAN_KEY)
        j = self.journal
        heads_ok = (clean is not None and j is not None and clean == j.open_token
                    and kv.get(CLEAN_ENTRIES_KEY) == clean)
        # (format 2: written by a version without the name index, which knows no clean_state either)
        state = _clean_state(kv.get(CLEAN_STATE_KEY)) if heads_ok and fmt == st.FORMAT_VERSION else None
        deletes = [CLEAN_KEY, CLEAN_ENTRIES_KEY, CLEAN_STATE_KEY] if clean is not None else []
        if puts or deletes:
            # the mark goes before anything else is written: from here on heads may fall behind
            kv.write(puts, deletes, sync=self._sync_meta)
        if state is not None and j is not None:
            self.contexts.count, self.entries_total, self._fine, self.by_writer = state
            # the heads on disk are what the journal's marks would say: it starts again from them
            j.reset()
            if self.contexts.count:
                log.info("%d contexts after a clean stop: each is read when first used (--context-cache %d)",
                         self.contexts.count, self.contexts.capacity)
        else:
            if j is not None:
                j.load()
            why = ("after a clean stop" if heads_ok else
                   "after a crash or an older version: heads checked" if clean is None or j is None
                   else "the high-water journal changed since the clean stop: heads checked"
                   if clean != j.open_token else "the entries' store lost writes since the clean stop: heads checked")
            self._read_all(node_id, heads_ok, why, need_index=fmt is not None and fmt != st.FORMAT_VERSION)
        buckets = self._buckets
        for f, v in enumerate(self._fine):
            buckets[f % NBUCKETS] ^= v
        for _key, value in kv.scan(st.ASIDE, st.prefix_end(st.ASIDE)):
            info = _unpackb(value)
            ctx = self._load_ctx(info["name"], {**info, "id": st.u32_of(_key)})
            self._by_id[ctx.id] = ctx
            self._next_ctx = max(self._next_ctx, ctx.id + 1)
            self.aside.setdefault(info["name"], []).append(ctx)
        return node_id

    def _read_all(self, node_id: str, heads_ok: bool, why: str, need_index: bool) -> None:
        """Start-up after anything but a clean stop: every context is read (from its head, checked
        unless `heads_ok`, else from its entries), compared with its high-water mark, counted in
        the digest; heads found wrong are written again and the name index made if missing, so
        that from here on any context can leave RAM and come back from its `C` record. With
        `need_index` (a format-2 folder) it also writes every context's `B` key, then format 3: an
        older version then refuses the folder, so no context is ever created without its key."""
        kv = self.kv
        j = self.journal
        marks = j.marks if j is not None else {}
        fine = self._fine
        contexts = self.contexts
        seen: set[int] = set()  # (only for the marks: a mark whose context is gone)
        fixes: list[tuple[bytes, bytes]] = []
        t0 = last_log = time.monotonic()
        read = 0
        for key, value in kv.scan(st.CTX, st.prefix_end(st.CTX)):
            info = _unpackb(value)
            name = key[1:].decode()
            try:
                ctx = self._from_head(name, info, heads_ok)
                if ctx is None:
                    read += 1
                    ctx = self._load_ctx(name, info)
                if "signed" in info:
                    ctx.signed = ctx.signed_hinted = _signed_from_record(ctx, info["signed"])
                if ctx.hinted != ctx.size:  # read from its entries: its head is rewritten
                    fixes.append((key, _ctx_record(ctx, ctx.size, ctx.last_lamport, ctx.frontier)))
                    ctx.hinted = ctx.size
            except (st.Corruption, InternalError) as exc:
                ctx = self._unreadable(name, info, node_id, exc)
            ctx.contrib = item = digest_item(ctx.name_bytes, ctx.size, ctx.frontier.root())
            f = bucket_of(ctx.name_bytes, FINE)
            fine[f] ^= item
            if need_index:
                fixes.append((st.bucket_key(f, ctx.name_bytes), b""))
            if marks:
                seen.add(ctx.id)
            if ctx.id >= self._next_ctx:
                self._next_ctx = ctx.id + 1
            mark = marks.get(ctx.id)
            if mark is not None:
                self._check_mark(ctx, mark, node_id)
            self._count_writer(ctx.writer, 1)
            if ctx.id in self.damaged or ctx.id in self.holes:
                contexts.add(name, ctx)  # kept in RAM until repaired
            else:
                # not kept: its head on disk is right now, it is read again when used. Keeping the
                # last N read would leave them scattered over the memory of all the others, which
                # Python then cannot give back (1M read, 100k kept: 1.1 GB resident, not 0.2)
                contexts.count += 1
            self.entries_total += ctx.size
            if len(fixes) >= 10_000:
                self._kv_write(fixes)
                fixes = []
            if time.monotonic() - last_log >= 5.0:
                last_log = time.monotonic()
                log.info("reading contexts: %d so far (%.0f s)", len(contexts), last_log - t0)
        if need_index:
            fixes.append((FORMAT_KEY, st.FORMAT_VERSION))
            log.warning("storage format 2 -> 3: the name index of %d contexts is built (an older version now "
                        "refuses this folder)", len(contexts))
        if fixes:
            self._kv_write(fixes, sync=self._sync_meta)
        if len(contexts):
            log.info("loaded %d contexts in %.2f s (%s; %d read from their entries; %d kept in RAM)", len(contexts),
                     time.monotonic() - t0, why, read, contexts.in_ram)
        for cid, (size, root) in list(marks.items()):
            if cid in seen or size == 0:
                continue
            name, writer = j.names.get(cid, (None, None)) if j is not None else (None, None)
            if name is None or writer is None or name in contexts:
                log.error("INTEGRITY: context #%d (%s) held %d entries (root %s) and is gone from the data "
                          "folder; it cannot be recreated here", cid, name or "name unknown", size, root.hex())
                continue
            # its b"C" record was lost with LevelDB's log: recreate it empty, under its old id
            info = {"id": cid, "writer": writer, "created_ns": 0}
            ctx = self._load_ctx(name, info)
            if cid >= self._next_ctx:
                self._next_ctx = cid + 1
            self.pending[st.ctx_key(name)] = _packb(info)
            self.pending[st.bucket_key(bucket_of(ctx.name_bytes, FINE), ctx.name_bytes)] = b""
            self.pending[st.meta_key("next_ctx")] = str(self._next_ctx).encode()
            self._check_mark(ctx, (size, root), node_id)
            contexts.add(name, ctx)
            self._count_writer(writer, 1)
            self._fresh.add(name)
            self._digest_dirty.add(ctx)

    def _unreadable(self, name: str, info: dict[str, Any], node_id: str, exc: Exception) -> ContextState:
        """A context whose last entries or Merkle nodes cannot be read at start-up. It is served
        empty and reported damaged, and refilled from peers (the pulled entries are written over
        the damaged ones): a replica from its writer as usual, a context this node writes from
        its replicas, up to its high-water mark, refusing appends until then (`repairing`).
        Without a mark to say how far it went, a context this node writes cannot be refilled
        (its next append could reuse acknowledged seqs): the start fails."""
        if info["writer"] == node_id and (self.journal is None or info["id"] not in self.journal.marks):
            raise DataDirError(
                f"context {name!r}, which this node writes, cannot be read from the data folder ({exc}); "
                "run `ledger-node --check DATA`") from None
        ctx = ContextState(name, info["id"], info["writer"], info.get("created_ns", 0))
        if self.journal is None or ctx.id not in self.journal.marks:
            self.holes[ctx.id] = 1  # else its mark, checked next, says what it held
        log.error("INTEGRITY: context %r cannot be read from storage (%s); serving it empty and refilling "
                  "it from peers", name, exc)
        return ctx

    def _check_mark(self, ctx: ContextState, mark: tuple[int, bytes], node_id: str) -> None:
        """Compare what LevelDB gave back of `ctx` with its durable high-water mark."""
        size, root = mark
        if ctx.size >= size and (size == 0 or self.root_at(ctx, size) == root):
            return
        self.damaged[ctx.id] = (size, root)
        log.error("INTEGRITY: context %r came back from disk %s: it held %d entries (root %s) and now "
                  "holds %d; serving the first %d; the rest is refilled from a peer that holds it%s",
                  ctx.name, "shorter" if ctx.size < size else "different", size, root.hex(), ctx.size,
                  ctx.size, " (appends refused until then; with no such peer, see --accept-damage)"
                  if ctx.writer == node_id else "")

    # -- the context cache -----------------------------------------------------

    def _load_named(self, name: str) -> ContextState | None:
        """A context from its `C` record (buffers, then disk), or None when there is none. Every
        context outside the cache has a current head there (start-up and `_evictable` see to it)."""
        raw = self._lookup(st.ctx_key(name))
        if raw is None:
            return None
        try:
            info = _unpackb(raw)
            if not (type(info) is dict and type(info.get("id")) is int and type(info.get("writer")) is str):
                raise ValueError(f"not a context record: {raw[:64]!r}")
            ctx = self._from_head(name, info, True) or self._load_ctx(name, info)
            if "signed" in info:
                ctx.signed = ctx.signed_hinted = _signed_from_record(ctx, info["signed"])
        except (st.Corruption, InternalError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self.integrity_errors += 1
            log.error("INTEGRITY: context %r cannot be read from storage (%s)", name, exc)
            raise InternalError(f"context {name!r} cannot be read from this node's storage; "
                                "run `ledger-node --check DATA` on a stopped node") from None
        ctx.contrib = digest_item(ctx.name_bytes, ctx.size, ctx.frontier.root())
        return ctx

    def _evictable(self, ctx: ContextState) -> bool:
        """Whether `ctx` may leave RAM: nothing of it only there (entries, head, digest, damage)."""
        size = ctx.size
        if (ctx.tail or ctx.flushed_seq != size or ctx.published_seq != size or ctx in self._dirty
                or ctx in self._inflight_dirty or ctx in self._digest_dirty or ctx in self._stale_tails
                or ctx.id in self.damaged or ctx.id in self.holes or ctx.signed is not ctx.signed_hinted):
            return False
        if ctx.hinted == size:
            return True
        key = st.ctx_key(ctx.name)  # an empty context: its record (with no head) must be on disk
        return size == 0 and key not in self.pending and key not in self.inflight

    def _count_writer(self, writer: str, n: int) -> None:
        left = self.by_writer.get(writer, 0) + n
        if left > 0:
            self.by_writer[writer] = left
        else:
            self.by_writer.pop(writer, None)

    def _admitted(self, ctx: ContextState) -> None:
        self._by_id[ctx.id] = ctx

    def _evicted(self, ctx: ContextState) -> None:
        if self._by_id.get(ctx.id) is ctx:
            del self._by_id[ctx.id]

    def set_signed(self, ctx: ContextState, h: SignedHead) -> None:
        """A replica's head signed by its writer (checked by the caller), kept in RAM and in the
        context's record: written now when the record is otherwise current, else with the batch
        that writes the context (`_add_heads`). Until then the context does not leave RAM."""
        ctx.signed = h
        if ctx.hinted == ctx.size and self.contexts.cached(ctx.name) is ctx:
            self.pending[st.ctx_key(ctx.name)] = _ctx_record(ctx, ctx.size, ctx.last_lamport, ctx.frontier)

    def repairing(self, ctx: ContextState) -> tuple[int, bytes] | None:
        """For a damaged context this node writes: the (size, root) its high-water mark says it
        held. Until it holds that again (pulled back from its replicas), appends to it are
        refused: an append now would reuse a seq that was acknowledged."""
        if ctx.writer != self.node_id:
            return None
        return self.damaged.get(ctx.id)

    def accept_damage(self) -> list[str]:
        """`--accept-damage`: take what the disk holds of each damaged context this node writes
        as its history from now on (its mark is lowered with the next flush) and take appends
        again. The entries lost are gone from this node; replicas that still hold them set them
        aside as a fork once this node appends past them. Returns the names accepted."""
        done = []
        for cid, (size, root) in list(self.damaged.items()):
            ctx = self._by_id.get(cid)
            if ctx is None or ctx.writer != self.node_id:
                continue
            del self.damaged[cid]
            if self.journal is not None:
                self.journal.write(self.journal.mark(cid, ctx.size, ctx.frontier.root()), sync=True)
            done.append(ctx.name)
            log.warning("INTEGRITY: --accept-damage: context %r goes on from the %d entries its disk holds; the "
                        "%d entries after them (root %s at %d) are lost on this node", ctx.name, ctx.size,
                        size - ctx.size, root.hex(), size)
        return done

    def _refuse_while_repairing(self, ctx: ContextState) -> None:
        size, _root = self.damaged[ctx.id]
        raise Unavailable(
            f"context {ctx.name!r} came back from this node's disk with {ctx.size} of its {size} entries; "
            "it is being refilled from its replicas and takes appends again once it holds them all "
            "(`ledger head` shows `damaged`; if no peer holds them, see `--accept-damage`)",
            {"context": ctx.name, "size": ctx.size, "expected_size": size})

    def context_by_id(self, ctx_id: int) -> ContextState | None:
        ctx = self._by_id.get(ctx_id)
        return ctx if ctx is not None and self.contexts.cached(ctx.name) is ctx else None

    def hole_block(self, ctx: ContextState) -> tuple[int, int] | None:
        """The seqs (first, last) to fetch again from a peer for the first damaged entry found in
        `ctx` (`holes`): the block of 2^STORED_MIN_LEVEL entries around it, whose Merkle node (or,
        for the last, incomplete block, the frontier) lets this node check what a peer sends
        without trusting it. None when nothing is known damaged."""
        bad = self.holes.get(ctx.id)
        if bad is None or bad > ctx.size or ctx.id in self.damaged:
            return None  # (a context refilled from its mark is repaired by pulls instead)
        width = 1 << STORED_MIN_LEVEL
        first = (bad - 1) // width * width + 1
        return first, min(first + width - 1, ctx.size)

    def repair_hole(self, name: str, entries: list[Entry]) -> bool:
        """Write `entries` (from a peer) over the damaged block `hole_block` names, if they are
        exactly that block and hash to what this node's own Merkle state says it held; then look
        on for the next damaged entry (a damaged LevelDB block spans several of ours). Returns
        whether they were written."""
        ctx = self.contexts.get(name)
        block = self.hole_block(ctx) if ctx is not None else None
        if ctx is None or block is None:
            return False
        first, last = block
        if [e.seq for e in entries] != list(range(first, last + 1)):
            return False
        for e in entries:
            if e.context != name or e.writer != ctx.writer or leaf_hash_named(
                    ctx.leaf_names, e.seq, e.key.encode(), e.payload, e.metadata, e.lamport, e.ts_ns) != e.hash:
                return False
        part = merkle.Frontier()
        part.extend([e.hash for e in entries], STORED_MIN_LEVEL)
        try:
            if len(entries) == 1 << STORED_MIN_LEVEL:
                ok = part.nodes[STORED_MIN_LEVEL] == self.node_getter(ctx)(STORED_MIN_LEVEL, (first - 1) >> STORED_MIN_LEVEL)
            else:  # the last, incomplete block: the frontier holds its complete nodes
                r = len(entries)
                ok = all(part.nodes[lv] == ctx.frontier.nodes[lv] for lv in range(r.bit_length()) if r >> lv)
        except (st.Corruption, KeyError, IndexError, InternalError):
            return False  # the Merkle node itself is unreadable: nothing to check against
        if not ok:
            return False
        cp, wp = ctx.name_packed, packed_str(ctx.writer)
        for e in entries:
            self.pending[_entry_key(ctx.id, e.seq)] = encode_entry_parts(
                cp, e.seq, e.key, e.payload, e.metadata, e.lamport, e.ts_ns, wp, e.hash)
        del self.holes[ctx.id]
        log.warning("INTEGRITY: entries %r#%d..%d rewritten from a peer's copy (checked against this node's "
                    "Merkle tree)", name, first, last)
        self._find_hole(ctx, last + 1)
        return True

    def _find_hole(self, ctx: ContextState, seq: int, budget: int = 4 << STORED_MIN_LEVEL) -> None:
        """Read up to `budget` entries from `seq` on; the first that fails becomes the next hole."""
        for s in range(seq, min(ctx.size, seq + budget - 1) + 1):
            try:
                self.entry_blob(ctx, s)
            except IntegrityError:
                return

    def damage(self, ctx: ContextState) -> dict[str, Any] | None:
        """What a damaged context is missing: the (size, root) it held before, or None."""
        d = self.damaged.get(ctx.id)
        bad = self.holes.get(ctx.id)
        if d is None and bad is None:
            return None
        out: dict[str, Any] = {"size": ctx.size}
        if d is not None:
            out.update(expected_size=d[0], expected_root=d[1])
        if bad is not None:
            out["bad_seq"] = bad
        return out

    def _from_head(self, name: str, info: dict[str, Any], trusted: bool) -> ContextState | None:
        """A context from the head in its `C` record, or None when there is none (written by an
        older version) or it does not describe the entries' store (a crash between the two
        stores' writes, a write path that does not keep heads): then it is read from the entries."""
        head = info.get("head")
        if not (type(head) is list and len(head) == 4):
            return None
        size, lamport, nodes, root = head
        if not (type(size) is int and 0 <= size < 1 << 63 and type(lamport) is int and 0 <= lamport <= MAX_LAMPORT
                and type(nodes) is bytes and len(nodes) == 32 * size.bit_length()
                and type(root) is bytes and len(root) == 32):
            log.warning("context %r: its head record is malformed; reading it from its entries", name)
            return None
        cid = info["id"]
        if not trusted:
            kv = self.kv
            if (size and kv.get(_entry_key(cid, size)) is None) or kv.get(_entry_key(cid, size + 1)) is not None:
                return None
        ctx = ContextState(name, cid, info["writer"], info.get("created_ns", 0))
        if size:
            ctx.size = size
            ctx.last_lamport = lamport
            self.clock.observe(lamport)
            frontier = merkle.Frontier(size, [nodes[i:i + 32] for i in range(0, len(nodes), 32)],
                                       root if trusted else None)
            if not trusted and frontier.root() != root:
                log.warning("context %r: its head record does not hash to its root; reading it from its entries",
                            name)
                return None
            ctx.frontier = frontier
        ctx.flushed_seq = ctx.published_seq = ctx.hinted = size
        return ctx

    def _load_ctx(self, name: str, info: dict[str, Any]) -> ContextState:
        kv = self.kv
        ctx = ContextState(name, info["id"], info["writer"], info.get("created_ns", 0))
        last = next(kv.scan(st.entry_prefix(ctx.id), st.prefix_end(st.entry_prefix(ctx.id)), reverse=True), None)
        if last is not None:
            ctx.size = st.seq_of_entry_key(last[0])
            e = _unpackb(last[1])
            lamport = e.get("lamport") if isinstance(e, dict) else None
            if type(lamport) is int and 0 <= lamport <= MAX_LAMPORT:
                ctx.last_lamport = lamport
                self.clock.observe(lamport)
            else:
                log.error("the last stored entry of context %r has a bad lamport (%r); not observed", name, lamport)
            ctx.frontier = merkle.Frontier.load(ctx.size, self._kv_node_getter(ctx.id))
        ctx.flushed_seq = ctx.size
        ctx.published_seq = ctx.size
        return ctx

    def _kv_node_getter(self, ctx_id: int) -> merkle.GetNode:
        """Complete Merkle nodes straight from storage (start-up, before any state)."""
        def leaf(index: int) -> bytes:
            blob = self.kv.get(st.entry_key(ctx_id, index + 1))
            if blob is None:
                raise InternalError(f"entry #{index + 1} of context #{ctx_id} is missing from storage")
            return _unpackb(blob)["hash"]  # type: ignore[no-any-return]

        return _getter(leaf, lambda key: self.kv.get(key), ctx_id)

    # -- lookups -------------------------------------------------------------

    def _lookup(self, key: bytes) -> bytes | None:
        v = self.pending.get(key)
        if v is None:
            v = self.inflight.get(key)
            if v is None:
                v = self.kv.get(key)
        return v

    def node_getter(self, ctx: ContextState) -> merkle.GetNode:
        """Complete Merkle nodes of a context: frontier, then write buffer, then storage."""
        frontier = ctx.frontier
        inner = _getter(lambda index: _unpackb(self.entry_blob(ctx, index + 1))["hash"], self._lookup, ctx.id)

        def get(level: int, index: int) -> bytes:
            nodes = frontier.nodes
            if level < len(nodes) and index == (frontier.size >> level) - 1:
                return nodes[level]
            if level >= CACHED_MIN_LEVEL:
                upper = ctx.upper
                if upper is None:
                    upper = ctx.upper = {}
                v = upper.get((level, index))
                if v is None:
                    v = upper[(level, index)] = inner(level, index)
                return v
            return inner(level, index)
        return get

    def context(self, name: str) -> ContextState:
        ctx = self.contexts.get(name)
        if ctx is None:
            raise NotFound(f"context {name!r} does not exist", {"context": name})
        return ctx

    # -- the clock -------------------------------------------------------------

    def _next_lamport(self, after: int | None, count: int = 1) -> int:
        """The last of `count` lamports for an append (after `after`), reserved on disk first;
        the clock itself moves only when the caller commits (`clock.value = ...`), so a
        refused append moves nothing."""
        try:
            v = self.clock.peek(after, count)
        except ClockExhausted:
            raise Unavailable(
                f"this node's Lamport clock is at {self.clock.value} and cannot give {count} more value(s) "
                f"below the ceiling {MAX_LAMPORT}; appends here are refused (reads are served)",
                {"lamport": self.clock.value, "max_lamport": MAX_LAMPORT},
            ) from None
        if needs_reservation(v, self._reserved):
            self._reserve(v)
        return v

    def _reserve(self, v: int) -> None:
        r = next_reservation(v)
        self._kv_write([(st.meta_key("lamport"), str(r).encode())], sync=self._sync_meta)
        self._reserved = r

    def observe(self, lamport: int) -> None:
        """Advance past a clock seen elsewhere, keeping the reservation ahead."""
        self.clock.observe(lamport)
        if needs_reservation(self.clock.value, self._reserved):
            try:
                self._reserve(self.clock.value)
            except StorageError:
                # The clock moves on in RAM; no lamport above the stored reservation is
                # handed out, since the next tick must reserve first (and is refused meanwhile).
                log.debug("lamport reservation deferred: storage has failed")

    # -- storage faults ------------------------------------------------------------

    def refused(self) -> StorageError:
        return StorageError(
            f"storage failed ({self.storage.error}); this node takes no writes until it recovers. "
            "Nothing was written; retry later (with the same dedup_id, retrying is always safe)",
            {"error": self.storage.error},
        )

    def write_failed(self, error: str, now: float | None = None) -> None:
        """A write failed: take no more writes (and write nothing more on this handle) until recovered."""
        now = time.monotonic() if now is None else now
        if self.storage.fail(error, now):
            n = sum(max(0, c.size - c.flushed_seq) for c in self._all_contexts())
            log.error("STORAGE FAILED: %s; refusing writes until the disk recovers; %d entries are held in "
                      "memory until then (served from RAM, written on recovery)", error, n)

    def _kv_write(self, puts: Any, deletes: Any = (), sync: bool = False) -> None:
        """A write on the loop thread: refused at once while storage has failed; a failure marks it failed."""
        if self.storage.error is not None:
            raise self.refused()
        try:
            self.kv.write(puts, deletes, sync=sync)
        except st.WriteFailed as exc:
            self.write_failed(str(exc))
            raise self.refused() from None

    def _creation_mark(self) -> tuple[int, bytes | None]:
        return self._next_ctx, self.pending.get(st.meta_key("next_ctx"))

    def _uncreate(self, name: str, mark: tuple[int, bytes | None]) -> None:
        """Undo `_create` of `name` by the request that failed (nothing else ran in between)."""
        ctx = self.contexts.pop(name, None, gone=False)
        if ctx is None:
            return
        self._count_writer(ctx.writer, -1)
        self._fresh.discard(name)
        self._digest_dirty.discard(ctx)
        self.pending.pop(st.ctx_key(name), None)
        self.pending.pop(st.bucket_key(bucket_of(ctx.name_bytes, FINE), ctx.name_bytes), None)
        self._next_ctx, prev = mark
        if prev is None:
            self.pending.pop(st.meta_key("next_ctx"), None)
        else:
            self.pending[st.meta_key("next_ctx")] = prev

    def _all_contexts(self) -> Iterator[ContextState]:
        yield from self.contexts.loaded()  # a context with anything not on disk is in the cache
        for hs in self.aside.values():
            yield from hs

    def unwritten(self) -> list[tuple[str, int, int]]:
        """(context, first seq, last seq) of entries in RAM that are not on disk yet."""
        return [(c.name, c.flushed_seq + 1, c.size) for c in self._all_contexts() if c.size > c.flushed_seq]

    def write_unwritten(self, sync: bool = True) -> dict[ContextState, int]:
        """Write the batch a failed write kept and everything pending since, in one batch,
        in this thread; raises st.WriteFailed (nothing in RAM changes then)."""
        batch = dict(self.inflight)
        batch.update(self.pending)
        dirty = dict(self._inflight_dirty)
        for ctx, seq in self._dirty.items():
            if seq > dirty.get(ctx, 0):
                dirty[ctx] = seq
        deletes: list[bytes] = []
        for ctx in self._stale_tails:
            p = st.entry_prefix(ctx.id)
            deletes += [k for k, _ in self.kv.scan(st.entry_key(ctx.id, ctx.size + 1), st.prefix_end(p))]
        if not batch and not deletes:
            return {}
        self._add_heads(batch, dirty)
        if deletes:
            # a write of its own, before the batch: within one batch deletes apply after puts
            self.kv.write((), deletes, sync=False)
        self.with_marks(lambda: self.kv.write(batch.items(), sync=sync), dirty, sync)()
        self._stale_tails = set()
        self.pending = {}
        self._dirty = {}
        self.pending_bytes = 0
        self.mark_flushed(dirty)
        return dirty

    def recover(self, sync: bool, now: float | None = None) -> dict[ContextState, int] | None:
        """One recovery attempt after a failed write: if the disk has room, reopen the
        handle (LevelDB replays its log) and write what RAM holds. Returns the contexts
        written (to their seq) once recovered, None while still failed."""
        now = time.monotonic() if now is None else now
        nbytes = sum(len(k) + len(v) for d in (self.inflight, self.pending) for k, v in d.items())
        try:
            self.kv.ensure_room(nbytes)
        except OSError as exc:
            self.storage.retry_later(f"storage not writable yet: {exc.strerror or exc}", now)
            return None
        try:
            self.kv.reopen()
            dirty = self.write_unwritten(sync=sync)
        except (st.WriteFailed, StorageError) as exc:
            self.storage.fail(str(exc), now)
            log.warning("storage recovery failed: %s; next attempt in %.1f s", exc, self.storage.next_attempt - now)
            return None
        self.storage.recovered()
        log.warning("STORAGE RECOVERED after %.1f s: the handle was reopened, what RAM held is on disk; "
                    "taking writes again", now - self.storage.since)
        return dirty

    # -- appends ---------------------------------------------------------------

    def _create(self, name: str, writer: str | None = None) -> ContextState:
        ctx_id = self._next_ctx
        self._next_ctx += 1
        now = self.now_ns()
        writer = writer or self.node_id
        ctx = ContextState(name, ctx_id, writer, now)
        self.pending[st.ctx_key(name)] = _packb({"id": ctx_id, "writer": writer, "created_ns": now})
        self.pending[st.bucket_key(bucket_of(ctx.name_bytes, FINE), ctx.name_bytes)] = b""
        self.pending[st.meta_key("next_ctx")] = str(self._next_ctx).encode()
        self.contexts.add(name, ctx)
        self._count_writer(writer, 1)
        self._fresh.add(name)
        self._digest_dirty.add(ctx)
        return ctx

    def _dedup_hit(self, ctx: ContextState | None, dedup_id: bytes | None) -> AppendResult | None:
        if dedup_id is None or ctx is None:
            return None
        raw = self._lookup(st.dedup_key(ctx.id, dedup_id))
        if raw is None:
            return None
        first, count, first_hash = st.parse_dedup_value(raw)
        if first + count - 1 > ctx.size:
            return None  # its entries were lost with a crash between the two stores' writes
        blobs = [self.entry_blob(ctx, s) for s in range(first, first + count)]
        if first_hash is not None and not _unpackb(blobs[0])["hash"].startswith(first_hash):
            return None  # lost that way, and other entries took their seqs since
        return AppendResult(ctx, blobs, first + count - 1, True)

    def _check_expect(self, ctx: ContextState | None, name: str, expect: int | None) -> None:
        if expect is None:
            return
        actual = ctx.size if ctx is not None else 0
        if actual != expect:
            raise Conflict(
                f"context {name!r} is at seq {actual}, not {expect}",
                {"actual_seq": actual, "expected_seq": expect},
            )

    def _add(self, ctx: ContextState, key: str, payload: bytes, metadata: dict[str, str], lamport: int, ts: int) -> bytes:
        seq = ctx.size + 1
        h = leaf_hash_named(ctx.leaf_names, seq, key.encode(), payload, metadata, lamport, ts)
        blob = encode_entry_parts(ctx.name_packed, seq, key, payload, metadata, lamport, ts, self._writer_packed, h)
        self._store(ctx, seq, key, blob, h, lamport)
        return blob

    def _store(self, ctx: ContextState, seq: int, key: str, blob: bytes, h: bytes, lamport: int) -> None:
        pending = self.pending
        cid = ctx.id
        # Only nodes of level >= STORED_MIN_LEVEL are stored; lower ones are
        # recomputed from the entries' own hashes when a proof needs them.
        for level, index, nh in ctx.frontier.append(h, STORED_MIN_LEVEL):
            pending[_node_key(cid, level, index)] = nh
        pending[_entry_key(cid, seq)] = blob
        ctx.size = seq
        ctx.last_lamport = lamport
        ctx.tail[seq] = (key, blob)
        n = len(blob) + HOT_ENTRY_OVERHEAD
        self._hot.append((ctx.id, seq, n))
        self.hot_bytes += n
        self._dirty[ctx] = seq
        self._digest_dirty.add(ctx)
        self.pending_bytes += n
        self.entries_total += 1

    def append(self, req: codec.Append) -> AppendResult:
        if self.storage.error is not None:
            # refused while storage has failed (the one storage write an append does itself,
            # its lamport reservation, comes before any state changes)
            raise self.refused()
        ctx = self.contexts.get(req.context)
        if self.damaged and ctx is not None and ctx.id in self.damaged and ctx.writer == self.node_id:
            self._refuse_while_repairing(ctx)
        if req.dedup_id is not None:
            hit = self._dedup_hit(ctx, req.dedup_id)
            if hit is not None:
                return hit
        if req.expect_seq is not None:
            self._check_expect(ctx, req.context, req.expect_seq)
        clock = self.clock
        after = req.after_lamport
        if after is None and clock.value < self._reserved:
            lamport = clock.value + 1  # the common case of _next_lamport, inlined (reserved <= MAX_LAMPORT)
        else:
            lamport = self._next_lamport(after)
        # nothing changed before this point: a refused append leaves no trace
        clock.value = lamport
        if ctx is None:
            ctx = self._create(req.context)
        blob = self._add(ctx, req.key, req.payload, req.metadata, lamport, self.now_ns())
        if req.dedup_id is not None:
            self.pending[st.dedup_key(ctx.id, req.dedup_id)] = st.dedup_value(ctx.size, 1, blob[-32:])  # the hash ends the map
        return AppendResult(ctx, [blob], ctx.size, False)

    def append_batch(self, req: codec.AppendBatch) -> AppendResult:
        if self.storage.error is not None:
            raise self.refused()
        total = req.payload_bytes if req.payload_bytes >= 0 else sum(len(it[1]) for it in req.items)
        if total > max(self.max_payload, MAX_REPLY_BYTES // 2):
            raise TooLarge(f"batch payloads add up to {total} bytes; split the batch")
        ctx = self.contexts.get(req.context)
        if self.damaged and ctx is not None and ctx.id in self.damaged and ctx.writer == self.node_id:
            self._refuse_while_repairing(ctx)
        hit = self._dedup_hit(ctx, req.dedup_id)
        if hit is not None:
            return hit
        self._check_expect(ctx, req.context, req.expect_seq)
        items = req.items
        # Lamports first..first+n-1, checked against the ceiling and reserved on disk in one
        # step, before anything changes: a refused batch leaves no entry, context or clock behind.
        last_lamport = self._next_lamport(req.after_lamport, len(items))
        first_lamport = last_lamport - len(items) + 1
        self.clock.value = last_lamport
        if ctx is None:
            ctx = self._create(req.context)
        first = ctx.size + 1
        ts = self.now_ns()
        # Everything was validated before this point, so the batch cannot fail
        # halfway. The loop is _add/_store inlined: it runs once per entry.
        pending = self.pending
        tail = ctx.tail
        hot_append = self._hot.append
        cid = ctx.id
        names = ctx.leaf_names
        hashes = []
        # encode_entry_parts, unrolled: the parts that are the same for the whole batch
        # (or for one key) are joined once, not once per entry
        head = b"\x89\xa7context" + ctx.name_packed + b"\xa3seq"
        rest = b"\xa5ts_ns" + _packb(ts) + b"\xa6writer" + self._writer_packed + b"\xa4hash\xc4\x20"
        keys: dict[str, tuple[bytes, bytes]] = {}
        blobs = []
        nbytes = 0
        seq = first - 1
        lamport = first_lamport - 1
        for key, payload, metadata in items:
            seq += 1
            lamport += 1
            kk = keys.get(key)
            if kk is None:
                kk = keys[key] = (key.encode(), b"\xa3key" + _packb(key) + b"\xa7payload")
            h = leaf_hash_named(names, seq, kk[0], payload, metadata, lamport, ts)
            blob = b"".join((
                head, _packb(seq), kk[1], _packb(payload),
                b"\xa8metadata" + _packb(metadata) + b"\xa7lamport" if metadata else b"\xa8metadata\x80\xa7lamport",
                _packb(lamport), rest, h,
            ))
            hashes.append(h)
            pending[_entry_key(cid, seq)] = blob
            tail[seq] = (key, blob)
            n = len(blob) + HOT_ENTRY_OVERHEAD
            hot_append((cid, seq, n))
            nbytes += n
            blobs.append(blob)
        for level, index, nh in ctx.frontier.extend(hashes, STORED_MIN_LEVEL):
            pending[_node_key(cid, level, index)] = nh
        ctx.size = seq
        ctx.last_lamport = lamport
        self.hot_bytes += nbytes
        self.pending_bytes += nbytes
        self._dirty[ctx] = seq
        self._digest_dirty.add(ctx)
        self.entries_total += len(items)
        if req.dedup_id is not None:
            self.pending[st.dedup_key(ctx.id, req.dedup_id)] = st.dedup_value(first, len(blobs), hashes[0])
        return AppendResult(ctx, blobs, ctx.size, False)

    # -- replicas ------------------------------------------------------------------

    def apply_replicated(self, name: str, entries: list[Entry] | WireParts, root: bytes | None = None,
                         looked_up: tuple[ContextState | None] | None = None) -> ContextState | None:
        """Append entries another node wrote, extending the local replica of `name`.

        They must start right after the replica's last seq, be consecutive, carry
        valid leaf hashes and name the context's writer; anything else raises
        (IntegrityError, Conflict) before anything is stored. With `root` (the
        sender's root at the last entry's seq), the entries must reproduce it too:
        when they do not, the histories differ, nothing is stored and the result
        is None. The clock advances past every lamport received. `looked_up`:
        (`contexts.get(name)`) when the caller has just asked (a pull of a context not here yet:
        one look-up on disk, not two). `entries` may be the `WireParts` of `wire_parts` (checked
        already, from the same replica size).
        """
        if not entries:
            raise BadRequest("no entries to apply")
        if self.storage.error is not None:
            raise self.refused()  # repair pulls them again once storage recovers
        ctx = self.contexts.get(name) if looked_up is None else looked_up[0]
        parts: WireParts | None = None
        ents: list[Entry] = []
        if isinstance(entries, WireParts):
            parts, writer = entries, entries.writer
        else:
            ents, writer = entries, entries[0].writer
        if ctx is not None and ctx.writer != writer:
            raise Conflict(
                f"context {name!r} is written by {ctx.writer!r} here; entries from writer {writer!r} fork it",
                {"context": name, "writer": ctx.writer, "other_writer": writer},
            )
        size = ctx.size if ctx is not None else 0
        last = parts.first + len(parts) - 1 if parts is not None else ents[-1].seq
        repair = None
        if writer == self.node_id:
            # only while refilling a damaged context of ours from a replica, up to its mark
            repair = self.repairing(ctx) if ctx is not None else None
            if repair is None or last > repair[0]:
                raise Conflict(f"entries of {name!r} name this node as writer but it did not write them",
                               {"context": name})
        # One pass checks every entry and builds the new frontier on a copy; the
        # replica changes only once all of it holds (it runs once per replicated entry).
        frontier = ctx.frontier.copy() if ctx is not None else merkle.Frontier()
        if parts is not None:
            if parts.first != size + 1 or parts.context != name:
                raise IntegrityError(f"replicated entries {parts.context!r}#{parts.first}.. do not extend {name!r} "
                                     f"at #{size}")
            hashes, max_lamport, last_lamport = parts.hashes, parts.max_lamport, parts.last_lamport
        else:
            names = leaf_names(name.encode(), writer.encode())
            hashes = []
            seq = size
            max_lamport = 0
            for e in ents:
                seq += 1
                if e.seq != seq or e.context != name or e.writer != writer:
                    raise IntegrityError(f"replicated entry {e.context!r}#{e.seq} does not extend {name!r} at #{size}")
                h = e.hash
                if leaf_hash_named(names, seq, e.key.encode(), e.payload, e.metadata, e.lamport, e.ts_ns) != h:
                    raise IntegrityError(f"entry {name!r}#{seq} does not match its hash")
                hashes.append(h)
                if e.lamport > max_lamport:
                    max_lamport = e.lamport
            last_lamport = ents[-1].lamport
        nodes = frontier.extend(hashes, STORED_MIN_LEVEL)
        if root is not None and frontier.root() != root:
            return None
        if repair is not None and last == repair[0] and frontier.root() != repair[1]:
            return None  # not the history this node's mark says it wrote
        if ctx is None:
            ctx = self._create(name, writer)
        ctx.frontier = frontier
        cid = ctx.id
        pending = self.pending
        for level, index, nh in nodes:
            pending[_node_key(cid, level, index)] = nh
        tail = ctx.tail
        hot_append = self._hot.append
        if parts is not None:
            keys, blobs = parts.keys, parts.blobs
        else:
            # re-encoded rather than kept as received: every node stores the canonical bytes
            cp, wp = ctx.name_packed, packed_str(writer)
            keys = [e.key for e in ents]
            blobs = [encode_entry_parts(cp, e.seq, e.key, e.payload, e.metadata, e.lamport, e.ts_ns, wp, e.hash)
                     for e in ents]
        nbytes = _stage(pending, tail, hot_append, cid, size + 1, keys, blobs, HOT_ENTRY_OVERHEAD)
        seq = size + len(blobs)
        ctx.size = seq
        ctx.last_lamport = last_lamport
        self.hot_bytes += nbytes
        self.pending_bytes += nbytes
        self._dirty[ctx] = seq
        self._digest_dirty.add(ctx)
        self.entries_total += len(entries)
        self.observe(max_lamport)
        return ctx

    def set_aside(self, name: str, writer: str, replace: bool = True) -> ContextState | None:
        """A fork resolved against the local history of `name`: keep that history (its
        entries stay where they are, listed under `aside`) and start an empty replica
        of `writer`'s history under the name, to be filled by pulls (unless `replace` is
        false: the writer holds no such context any more)."""
        old = self.contexts[name]
        self.contexts.pop(name)
        self._count_writer(old.writer, -1)
        self._by_id[old.id] = old  # a history set aside stays in RAM (and by id: its damage, its hot tail)
        self._fresh.discard(name)
        self.pending[st.aside_key(old.id)] = _packb({"name": name, "writer": old.writer, "created_ns": old.created_ns})
        if old.contrib:
            f = bucket_of(old.name_bytes, FINE)
            self._buckets[f % NBUCKETS] ^= old.contrib
            self._fine[f] ^= old.contrib
            old.contrib = 0
        self._digest_dirty.discard(old)
        self.aside.setdefault(name, []).append(old)
        self.entries_total -= old.size
        return self._create(name, writer) if replace else None

    def history(self, name: str, writer: str | None, index: int | None = None) -> ContextState | None:
        """The context served under `name`, or with `writer`, a history of it set aside by a fork:
        the `index`-th of that writer's (from 1), or the latest (a writer may lose tails twice)."""
        if writer is None:
            return self.contexts.get(name)
        mine = [ctx for ctx in self.aside.get(name, ()) if ctx.writer == writer]
        if index is not None:
            return mine[index - 1] if index <= len(mine) else None
        if mine:
            return mine[-1]
        ctx = self.contexts.get(name)
        return ctx if ctx is not None and ctx.writer == writer else None

    def digest(self, nbuckets: int = NBUCKETS) -> list[int]:
        """Per bucket (mmh3 of the name), the XOR of an 8-byte hash of (name, size, root)
        of its contexts. Updated lazily for the contexts that changed since the last call.
        The fine digest (FINE buckets, `fine_digest`) is kept with it; `nbuckets` divides FINE."""
        if FINE % nbuckets:
            raise ValueError(f"a digest of {nbuckets} buckets does not divide the fine one ({FINE})")
        buckets, fine = self._buckets, self._fine
        for ctx in self._digest_dirty:
            new = digest_item(ctx.name_bytes, ctx.size, ctx.frontier.root())
            change = ctx.contrib ^ new
            if change:
                f = bucket_of(ctx.name_bytes, FINE)
                buckets[f % NBUCKETS] ^= change
                fine[f] ^= change
                ctx.contrib = new
        self._digest_dirty = set()
        # called with every heartbeat: contexts that settled since the last one may leave RAM now
        # (a bounded look: a cache full of busy contexts must not stall the loop)
        self.contexts.shrink(SHRINK_LOOKS)
        if nbuckets == NBUCKETS:
            return buckets
        out = [0] * nbuckets
        for f, v in enumerate(fine):
            out[f % nbuckets] ^= v
        return out

    def fine_digest(self, tops: Iterable[int]) -> list[bytes]:
        """For each top bucket (of NBUCKETS), the values of its fine buckets (digest.fine_buckets),
        8 bytes big-endian each: the reply of `sync_digest` (SPEC 17.2)."""
        self.digest(NBUCKETS)
        fine = self._fine
        return [b"".join(fine[f].to_bytes(8, "big") for f in fine_buckets(b)) for b in tops]

    def names(self) -> Iterator[str]:
        """Every context's name, in order, in RAM or not (`contexts` iterates only those in RAM)."""
        return self._names_from(None)

    def _names_from(self, after: str | None, inclusive: bool = False) -> Iterator[str]:
        """Every context's name after `after` (from it, if `inclusive`), in order."""
        return (name for name, _raw in self._records_from(after, inclusive))

    def _records_from(self, after: str | None, inclusive: bool = False) -> Iterator[tuple[str, bytes | None]]:
        """(name, its `C` record) of every context after `after` (from it, if `inclusive`), in
        order, in one scan of the records, with the names not on disk yet merged in (record None:
        look it up)."""
        if after is None:
            start = st.CTX
        else:
            start = st.ctx_key(after) + (b"" if inclusive else b"\x00")
        disk = ((k[1:].decode(), v) for k, v in self.kv.scan(start, st.prefix_end(st.CTX)))
        return self._served(disk, self._fresh.iter_from(after, inclusive) if self._fresh else None)

    def _served(self, disk: Iterator[tuple[str, bytes | None]],
                fresh: Iterator[str] | None) -> Iterator[tuple[str, bytes | None]]:
        """(name, record) in name order from `disk` and the names `fresh` (both in order), once
        each, none removed during this run."""
        merged = disk if fresh is None else heapq.merge(disk, ((n, None) for n in fresh), key=_first)
        gone = self.contexts.gone
        last = None
        for name, raw in merged:
            if name != last and not gone(name):
                yield name, raw
            last = name

    def _names_in(self, wanted: set[int], nbuckets: int, after: str | None) -> Iterator[tuple[str, bytes | None]]:
        """(name, `C` record or None) of the contexts in `wanted` buckets after `after`, in order:
        merged from the fine buckets' name index (b"B" keys) when they are few, else filtered from
        a scan of every record."""
        if FINE % nbuckets == 0 and len(wanted) * (FINE // nbuckets) <= MAX_MERGED_BUCKETS:
            fresh = [n for n in self._fresh.iter_from(after) if bucket_of(n.encode(), nbuckets) in wanted]
            kv = self.kv
            tail = b"" if after is None else after.encode() + b"\x00"
            scans = []
            for b in sorted(wanted):
                for f in range(b, FINE, nbuckets):
                    p = st.bucket_prefix(f)
                    scans.append(k[3:].decode() for k in kv.scan_keys(p + tail, st.prefix_end(p)))
            if not scans:
                return iter(())
            names = scans[0] if len(scans) == 1 else heapq.merge(*scans)
            return self._served(((n, None) for n in names), iter(fresh) if fresh else None)
        return ((n, raw) for n, raw in self._records_from(after) if bucket_of(n.encode(), nbuckets) in wanted)

    def heads_in_buckets(self, wanted: set[int], nbuckets: int, after: str | None, limit: int) -> tuple[list[list[Any]], bool]:
        """[name, size, root, writer, lamport] of the contexts in `wanted` buckets, in name order, paged."""
        out: list[list[Any]] = []
        for name, raw in self._names_in(wanted, nbuckets, after):
            if len(out) == limit:
                return out, True
            brief = self.brief(name, raw)
            if brief is not None:
                out.append([name, *brief])
        return out, False

    def brief(self, name: str, raw: bytes | None = None) -> tuple[int, bytes, str, int] | None:
        """(size, root, writer, lamport) of a context as reads see it, from the cache or else from
        its `C` record's head (`raw`, or looked up), without letting it into the cache (a peer's
        sync_heads goes through many contexts once each)."""
        ctx = self.contexts.cached(name)
        if ctx is None:
            if raw is None:
                raw = self._lookup(st.ctx_key(name))
            if raw is None:
                return None
            try:
                info = _unpackb(raw)
            except ValueError:
                info = None
            head = info.get("head") if type(info) is dict else None
            if (type(head) is list and len(head) == 4 and type(head[0]) is int and type(head[1]) is int
                    and type(head[3]) is bytes and len(head[3]) == 32 and type(info.get("writer")) is str):
                return head[0], head[3], info["writer"], head[1]
            try:
                ctx = self.contexts.peek(name)  # no head (an empty context): read as it would be loaded
            except InternalError:
                return None  # a damaged record (logged): listed nowhere rather than failing the whole page
            if ctx is None:
                return None
        size = self.visible(ctx)
        if size == ctx.size:
            return size, ctx.frontier.root(), ctx.writer, ctx.last_lamport
        # sync durability: peers are shown what reads see, never what a crash may take back
        return size, self.root_at(ctx, size), ctx.writer, self.lamport_at(ctx, size)

    def names_in_buckets(self, wanted: set[int], nbuckets: int, after: str | None, upto: str | None,
                         writer: str) -> list[str]:
        """Names in `wanted` buckets in (after, upto] (no upper end when None) written by `writer`."""
        out: list[str] = []
        if writer not in self.by_writer:
            return out  # (it writes none of ours: no need to go through them)
        for name, raw in self._names_in(wanted, nbuckets, after):
            if upto is not None and name > upto:
                break
            brief = self.brief(name, raw)
            if brief is not None and brief[2] == writer:
                out.append(name)
        return out

    # -- write-behind ----------------------------------------------------------

    empty_root = merkle.EMPTY_ROOT

    def take_pending(self) -> tuple[dict[bytes, bytes], dict[ContextState, int]]:
        """Hand the write buffer to the flusher; it stays readable as `inflight`."""
        batch, dirty = self.pending, self._dirty
        self._add_heads(batch, dirty)
        self.pending = {}
        self._dirty = {}
        self.inflight = batch
        self._inflight_dirty = dirty
        self.inflight_bytes = self.pending_bytes
        self.pending_bytes = 0
        return batch, dirty

    def _add_heads(self, batch: dict[bytes, bytes], dirty: dict[ContextState, int]) -> None:
        """The heads of what a batch writes go with it, in the first store (written before the
        entries' store, so after a crash a head may be ahead of its entries: `_from_head` checks)."""
        cached = self.contexts.cached
        for ctx, seq in dirty.items():
            if seq == ctx.size and cached(ctx.name) is ctx:
                batch[st.ctx_key(ctx.name)] = _ctx_record(ctx, seq, ctx.last_lamport, ctx.frontier)
                ctx.hinted = seq

    def marks_job(self, dirty: dict[ContextState, int]) -> tuple[bytes, bytes | None]:
        """The journal records (and a whole rewrite, when due) for a batch of `dirty` contexts,
        to be written once that batch is in LevelDB. The journal's view moves now: the next
        batch's records follow these ones in the same (flusher) thread."""
        j = self.journal
        if j is None or not dirty:
            return b"", None
        out = []
        damaged = self.damaged
        for ctx, seq in dirty.items():
            cid = ctx.id
            if damaged and cid in damaged and seq < damaged[cid][0]:
                continue  # a repair in progress must not lower the mark it is repairing to
            if cid not in j.names:
                out.append(j.name(cid, ctx.name, ctx.writer))
            out.append(j.mark(cid, seq, ctx.frontier.root() if seq == ctx.size else self.root_at(ctx, seq)))
        return b"".join(out), (j.snapshot() if j.wants_compaction() else None)

    def with_marks(self, commit: Callable[[], None], dirty: dict[ContextState, int], sync: bool) -> Callable[[], None]:
        """`commit` (a prepared LevelDB write), then the high-water marks of what it wrote."""
        j = self.journal
        if j is None:
            return commit
        records, rewrite = self.marks_job(dirty)
        if not records and rewrite is None:
            return commit

        def write() -> None:
            commit()
            j.write(records, sync, rewrite)
        return write

    def mark_clean(self) -> bool:
        """At a clean stop, once everything is written: bring every head up to date and say so
        on disk (CLEAN_KEY), so that the next start reads no entries. False (and nothing
        written) when something is not on disk or storage has failed."""
        j = self.journal
        if j is None or self.storage.error is not None or self.pending or self.inflight or self.unwritten():
            return False
        if self.damaged:
            # their marks say what they held: the next start must read the journal to know it
            log.warning("%d damaged contexts are not repaired yet: the next start checks every context's head",
                        len(self.damaged))
            return False
        stale = [ctx for ctx in self.contexts.loaded() if ctx.hinted != ctx.size or ctx.signed is not ctx.signed_hinted]
        puts = [(st.ctx_key(c.name), _ctx_record(c, c.size, c.last_lamport, c.frontier)) for c in stale]
        token = j.current_token()
        # the clock's reservation comes down to what it handed out: the next start goes on from
        # there (after a crash it goes on from the reservation, up to RESERVE_STEP further)
        puts.append((st.meta_key("lamport"), str(self.clock.value).encode()))
        self.digest()
        puts.append((CLEAN_STATE_KEY, _packb({
            "contexts": self.contexts.count, "entries": self.entries_total, "writers": self.by_writer,
            "fine": b"".join(v.to_bytes(8, "big") for v in self._fine)})))
        puts.append((CLEAN_KEY, token))
        try:
            self.kv.write([(CLEAN_ENTRIES_KEY, token)], sync=True)  # first: see CLEAN_ENTRIES_KEY
            self.kv.write(puts, sync=True)
        except st.WriteFailed as exc:
            log.warning("could not record the clean stop (%s): the next start checks every context's head", exc)
            return False
        for c in stale:
            c.hinted = c.size
        self._reserved = self.clock.value
        return True

    def close(self) -> None:
        """Make the marks durable (clean shutdown), after the last flush."""
        if self.journal is not None:
            self.journal.close()

    def buffered(self) -> tuple[int, int]:
        """(keys, entry bytes) held in RAM waiting for storage."""
        return len(self.pending) + len(self.inflight), self.pending_bytes + self.inflight_bytes

    def mark_flushed(self, dirty: dict[ContextState, int]) -> None:
        damaged = self.damaged
        for ctx, seq in dirty.items():
            if seq > ctx.flushed_seq:
                ctx.flushed_seq = seq
            if damaged and ctx.id in damaged:
                self._check_repaired(ctx)
        self.inflight = {}
        self._inflight_dirty = {}
        self.inflight_bytes = 0
        if self._fresh:
            self._prune_fresh()
        self.evict()

    def _prune_fresh(self) -> None:
        """Forget the new names whose `C` record is on disk now (listings read it there)."""
        pending = self.pending
        left = [n for n in self._fresh.iter_from(None) if st.ctx_key(n) in pending]
        if len(left) != len(self._fresh):
            self._fresh = SortedNames(left)

    def flush_sync(self, sync: bool = True) -> None:
        """Write everything not on disk yet now, in this thread (shutdown, tests), the
        batch of a failed write included; raises st.WriteFailed, changing nothing then."""
        self.write_unwritten(sync=sync)

    def _check_repaired(self, ctx: ContextState) -> None:
        size, root = self.damaged[ctx.id]
        if ctx.flushed_seq < size:
            return
        del self.damaged[ctx.id]
        if self.root_at(ctx, size) == root:
            log.warning("INTEGRITY: context %r is repaired: it holds its %d entries (root %s) again",
                        ctx.name, size, root.hex())
        else:
            log.error("INTEGRITY: context %r was refilled from peers with another history than the %d entries "
                      "(root %s) it held before the damage", ctx.name, size, root.hex())
        if self.journal is not None:
            # its mark was held back during the repair: write it now, with the next batch
            self._dirty.setdefault(ctx, ctx.size)

    def durable(self, ctx: ContextState, seq: int) -> bool:
        return ctx.flushed_seq >= seq

    def evict(self) -> None:
        hot = self._hot
        limit = self.hot_limit
        by_id = self._by_id
        while self.hot_bytes > limit and hot:
            cid, seq, n = hot[0]
            ctx = by_id[cid]
            if seq > ctx.flushed_seq:
                break  # not on disk yet; stays in RAM until flushed
            hot.popleft()
            ctx.tail.pop(seq, None)
            self.hot_bytes -= n

    # -- reads -------------------------------------------------------------------

    def entry_blob(self, ctx: ContextState, seq: int) -> bytes:
        hot = ctx.tail.get(seq)
        if hot is not None:
            return hot[1]
        return self.verified(ctx, seq, self._stored(ctx, seq))

    def _stored(self, ctx: ContextState, seq: int) -> bytes:
        """Entry `seq` of `ctx` as stored (buffers, then disk), by a point look-up; a checksum
        that fails or an entry that is not there is reported (`holes`) and raised."""
        try:
            v = self._lookup(st.entry_key(ctx.id, seq))
        except st.Corruption as exc:
            raise self._corrupt(ctx, seq, exc) from None
        if v is None:
            raise self._missing(ctx, seq)
        return v

    def scrub(self, budget: int) -> int:
        """Check up to `budget` entries on disk against their leaf hashes (and their presence),
        going on from where the last call stopped, context after context in name order; what
        fails is reported as a read would report it (`holes`, log, `head.damaged`). Returns the
        number of entries checked."""
        if not self.contexts.count:
            return 0
        name, after = self._scrub_at
        it = self._names_from(name or None, inclusive=True)
        current = next(it, None)
        if current != name:
            after = 0  # that context is gone: start the next one from its beginning
        done = looked = 0
        while done < budget:
            if current is None:
                self.scrub_passes += 1
                self._scrub_at = ("", 0)
                break
            if looked > budget:  # contexts with nothing (left) to check cost a read each too
                self._scrub_at = (current, after)
                break
            ctx = self.contexts.peek(current)  # read once, not let into the cache
            if ctx is None:
                current = next(it, None)
                after = 0
                looked += 1
                continue
            last = min(ctx.flushed_seq, after + budget - done)
            if after >= last or ctx.id in self.holes:
                current = next(it, None)
                after = 0
                looked += 1
                continue
            seq = after + 1
            try:
                for k, v in self.kv.scan(st.entry_key(ctx.id, seq), st.entry_key(ctx.id, last + 1)):
                    s = st.seq_of_entry_key(k)
                    if s != seq:
                        raise self._missing(ctx, seq)
                    self.verified(ctx, seq, v)
                    seq += 1
                if seq <= last:
                    raise self._missing(ctx, seq)
            except st.Corruption as exc:
                self._corrupt(ctx, seq, exc)
            except IntegrityError:
                pass  # recorded in `holes` and logged
            if ctx.id in self.holes:
                self.contexts.keep(ctx.name, ctx)  # it stays in RAM until repaired
            done += last - after
            after = last
            self._scrub_at = (ctx.name, after)
        self.scrubbed_entries += done
        return done

    def _corrupt(self, ctx: ContextState, seq: int, exc: Exception) -> IntegrityError:
        self.integrity_errors += 1
        if seq < self.holes.get(ctx.id, seq + 1):
            self.holes[ctx.id] = seq
        log.error("INTEGRITY: reading entry %r#%d: storage is damaged (%s); not served", ctx.name, seq, exc)
        return IntegrityError(f"entry {ctx.name!r}#{seq} is damaged in this node's storage (a checksum failed); "
                              "read it from another node", {"context": ctx.name, "seq": seq})

    def _missing(self, ctx: ContextState, seq: int) -> IntegrityError:
        """An entry below the context's size is not in storage (LevelDB dropped a damaged block of
        its log): the context is reported damaged from now on, and the read fails."""
        self.integrity_errors += 1
        if seq < self.holes.get(ctx.id, seq + 1):
            self.holes[ctx.id] = seq
            log.error("INTEGRITY: entry %r#%d (of %d) is missing from storage", ctx.name, seq, ctx.size)
        return IntegrityError(f"entry {ctx.name!r}#{seq} is missing from this node's storage (damaged); "
                              "read it from another node", {"context": ctx.name, "seq": seq})

    def verified(self, ctx: ContextState, seq: int, blob: bytes) -> bytes:
        """`blob`, read from storage as entry `seq` of `ctx`, once it matches its leaf hash: a byte
        flipped on disk must never be served or sent to a peer (an INTEGRITY error instead)."""
        if _accel is not None:
            # the canonical form read (and hashed) in C (node/_accel.c); anything else is decided below
            if HASHING_IN_C:
                if _accel.stored_holds(blob, seq, ctx.leaf_names, ctx.name_packed, packed_str(ctx.writer)):
                    return blob
            else:
                pre = _accel.stored_preimage(blob, seq, ctx.leaf_names, ctx.name_packed, packed_str(ctx.writer))
                if pre is not None and _sha256(pre).digest() == blob[-32:]:
                    return blob
        try:
            e = _unpackb(blob)
            md = e["metadata"]
            # (the names too: the leaf hash covers the context's, not the copies in the entry)
            ok = (e["seq"] == seq and e["context"] == ctx.name and e["writer"] == ctx.writer
                  and e["hash"] == leaf_hash_named(ctx.leaf_names, seq, e["key"].encode(), e["payload"], md,
                                                   e["lamport"], e["ts_ns"]))
        except Exception:  # not even an entry: msgpack, key or type errors
            ok = False
        if not ok:
            self.integrity_errors += 1
            if seq < self.holes.get(ctx.id, seq + 1):
                self.holes[ctx.id] = seq
            log.error("INTEGRITY: entry %r#%d read from storage does not match its hash; not served", ctx.name, seq)
            raise IntegrityError(f"entry {ctx.name!r}#{seq} is damaged in this node's storage (it does not match "
                                 "its hash); read it from another node", {"context": ctx.name, "seq": seq})
        return blob

    def _iter_blobs(self, ctx: ContextState, first: int, last: int,
                    check_hash: bool = False) -> Iterator[tuple[int, str | None, bytes]]:
        """(seq, key or None when unknown, blob) for first..last, RAM before disk. What comes from
        disk passed LevelDB's block checksums; with `check_hash` (what goes to a peer or into a
        snapshot), each entry also matches its leaf hash.

        A range scan that meets a damaged block goes on with point look-ups: a LevelDB iterator
        reads every version of a key, so a block whose entries were rewritten from a peer
        (`repair_hole`) fails a scan until a compaction drops it, while a look-up finds the new
        version first."""
        tail = ctx.tail
        disk: Iterator[tuple[bytes, bytes]] | None = None
        check = self.verified if check_hash else _as_is
        seq = first
        point = False
        while seq <= last:
            hot = tail.get(seq)
            if hot is not None:
                yield seq, hot[0], hot[1]
                seq += 1
                continue
            v: bytes | None = None
            if not point:
                if disk is None:
                    disk = self.kv.scan(st.entry_key(ctx.id, seq), st.entry_key(ctx.id, last + 1))
                try:
                    for k, found in disk:
                        s = st.seq_of_entry_key(k)
                        if s == seq:
                            v = found
                            break
                        if s > seq:
                            raise self._missing(ctx, seq)
                except st.Corruption:
                    point, disk, v = True, None, None
            if v is None:
                v = self._stored(ctx, seq)
            yield seq, None, check(ctx, seq, v)
            seq += 1

    def get(self, req: codec.Get) -> tuple[list[bytes], int, bool, int]:
        """(encoded entries, last seq of the context, more remain, next `after`)."""
        if req.fork is not None:
            ctx = self.history(req.context, req.fork, req.fork_index)
            if ctx is None:
                which = f" (#{req.fork_index})" if req.fork_index else ""
                raise NotFound(f"context {req.context!r} has no history written by {req.fork!r}{which} here",
                               {"context": req.context})
        else:
            ctx = self.contexts.get(req.context)
        size = 0 if ctx is None else ctx.flushed_seq if self.durable_reads else ctx.size
        if ctx is None or req.after >= size:
            return [], size, False, max(req.after, 0) if ctx else req.after
        if req.limit == 1 and req.key is None:
            hot = ctx.tail.get(req.after + 1)
            # the common read of one entry: a recent one from RAM, else one look-up (a bloom
            # filter per table skips those without it), not a range scan, which seeks in every
            # table that overlaps the seq: at 10M entries a random read's p50 went 35 -> 20 us
            blob = hot[1] if hot is not None else self._stored(ctx, req.after + 1)
            return [blob], size, req.after + 1 < size, req.after + 1
        out: list[bytes] = []
        nbytes = 0
        examined = 0
        last_seen = req.after
        want = req.key
        for seq, key, blob in self._iter_blobs(ctx, req.after + 1, size):
            if want is not None:
                if key is None:
                    key = _unpackb(blob)["key"]
                if key != want:
                    last_seen = seq
                    examined += 1
                    if examined >= MAX_SCAN:
                        break
                    continue
            if out and nbytes + len(blob) > MAX_REPLY_BYTES:
                break
            out.append(blob)
            nbytes += len(blob)
            last_seen = seq
            examined += 1
            if len(out) >= req.limit or examined >= MAX_SCAN:
                break
        return out, size, last_seen < size, last_seen

    def visible(self, ctx: ContextState) -> int:
        """The size reads see: under `sync` durability what is on disk, else all of it."""
        return ctx.flushed_seq if self.durable_reads else ctx.size

    def head(self, name: str) -> dict[str, Any]:
        ctx = self.context(name)
        size = self.visible(ctx)
        return {
            "context": name,
            "size": size,
            "root": ctx.frontier.root() if size == ctx.size else self.root_at(ctx, size),
            "lamport": self.lamport_at(ctx, size),
            "writer": ctx.writer,
            **({"damaged": d} if (d := self.damage(ctx)) is not None else {}),
        }

    def lamport_at(self, ctx: ContextState, seq: int) -> int:
        """The lamport of entry `seq` (0 for seq 0): what a head at size `seq` carries, so that
        its size, root and lamport describe one prefix (SPEC 16.3). O(1) at the context's size;
        below it (a sync node's watch head, whose size stops at what is on disk) one read,
        from the hot tail as a rule: entries past the flushed size are never evicted."""
        if seq <= 0:
            return 0
        if seq == ctx.size:
            return ctx.last_lamport
        lamport: int = _unpackb(self.entry_blob(ctx, seq))["lamport"]
        return lamport

    def list_contexts(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """A page of names and sizes in name order, from one scan of the `C` records: a context not
        in RAM is listed from its head, without a look-up of its own."""
        out: list[dict[str, Any]] = []
        cached = self.contexts.cached
        for name, raw in self._records_from(after):
            if len(out) == limit:
                return out, True
            ctx = cached(name)
            size = ctx.size if ctx is not None else _head_size(raw)
            if size is None:
                brief = self.brief(name, raw)  # a record without a head (an empty context), or not on disk yet
                if brief is None:
                    continue
                size = brief[0]
            out.append({"name": name, "size": size})
        return out, False

    def root_at(self, ctx: ContextState, size: int) -> bytes:
        if size == ctx.size:
            return ctx.frontier.root()
        return merkle.root_at(size, self.node_getter(ctx))

    def _size_arg(self, ctx: ContextState, size: int | None) -> int:
        have = self.visible(ctx)
        if size is None:
            return have
        if size > have:
            raise NotFound(f"context {ctx.name!r} has {have} entries, not {size}", {"size": have})
        return size

    def snapshot_page(self, req: codec.Snapshot, max_bytes: int = MAX_REPLY_BYTES,
                      at_least_one: bool = True) -> tuple[dict[str, Any], list[bytes]]:
        """A page of entries and the root at `size`. Entries stop before `max_bytes`; the first
        one goes even past it when `at_least_one` (a page always moves on), else the page may be
        empty (a `snapshots` reply whose budget earlier chunks used up).

        A context out of RAM is read without being let into the cache: a peer catching up pulls
        every context once, which would otherwise push out every context in use (and, at 1M
        contexts, evict one for each served). Damage found on the way keeps it in RAM."""
        ctx = self.contexts.peek(req.context)
        if ctx is None:
            raise NotFound(f"context {req.context!r} does not exist", {"context": req.context})
        size = self._size_arg(ctx, req.size)
        out: list[bytes] = []
        nbytes = 0
        last = min(size, req.after + req.limit)
        last_seen = req.after
        try:
            if req.after < size:
                for seq, _key, blob in self._iter_blobs(ctx, req.after + 1, last, check_hash=True):
                    if nbytes + len(blob) > max_bytes and (out or not at_least_one):
                        break
                    out.append(blob)
                    nbytes += len(blob)
                    last_seen = seq
            root = self.root_at(ctx, size)  # (below the size: leaves read, which may be damaged too)
        except IntegrityError:
            if ctx.id in self.holes:
                self.contexts.keep(ctx.name, ctx)  # it stays in RAM until repaired
            raise
        fields = {
            "context": ctx.name,
            "size": size,
            "root": root,
            "more": last_seen < size,
            "next_after": last_seen,
        }
        return fields, out

    def proof(self, req: codec.Proof) -> dict[str, Any]:
        ctx = self.context(req.context)
        size = self._size_arg(ctx, req.size)
        if req.seq > size:
            raise NotFound(f"seq {req.seq} is beyond size {size} of {ctx.name!r}", {"size": size})
        get = self.node_getter(ctx)
        return {
            "context": ctx.name,
            "seq": req.seq,
            "size": size,
            "leaf": get(0, req.seq - 1),
            "path": merkle.inclusion_path(req.seq - 1, size, get),
            "root": self.root_at(ctx, size),
        }

    def consistency(self, req: codec.Consistency) -> dict[str, Any]:
        ctx = self.context(req.context)
        second = self._size_arg(ctx, req.second)
        if req.first > second:
            raise BadRequest(f"first ({req.first}) must not exceed second ({second})")
        get = self.node_getter(ctx)
        return {
            "context": ctx.name,
            "first": req.first,
            "second": second,
            "first_root": self.root_at(ctx, req.first),
            "second_root": self.root_at(ctx, second),
            "proof": merkle.consistency_proof(req.first, second, get),
        }

    def status(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "lamport": self.clock.value,
            "contexts": len(self.contexts),
            "context_cache": {"loaded": self.contexts.in_ram, "capacity": self.contexts.capacity,
                              "loads": self.contexts.loads, "evictions": self.contexts.evictions},
            "entries": self.entries_total,
            "hot_bytes": self.hot_bytes,
            "hot_limit": self.hot_limit,
            "pending_writes": len(self.pending) + len(self.inflight),
            "loads_in_progress": len(self.loads),
            "loads_staged_bytes": self.staged_bytes,
            "max_loads": self.max_loads,
            "max_staged_bytes": self.max_staged_bytes,
            "loads_refused": self.loads_refused,
            "integrity_errors": self.integrity_errors,
            "scrub": {"entries": self.scrubbed_entries, "passes": self.scrub_passes},
            "damaged": self._damaged_list(),
        }

    def _damaged_list(self, limit: int = 100) -> list[dict[str, Any]]:
        out = []
        for cid in {**self.damaged, **self.holes}:
            ctx = self._by_id.get(cid)
            if ctx is None:  # (every damaged context is kept in RAM; a status must not fail on one that is not)
                log.error("INTERNAL: damaged context #%d is not in RAM", cid)
                continue
            d = self.damage(ctx)
            if d is not None:
                out.append({"context": ctx.name, **d})
                if len(out) >= limit:
                    break
        return out

    # -- load ----------------------------------------------------------------

    def _drop_load(self, s: LoadSession) -> None:
        if self.loads.pop(s.load_id, None) is not None:
            self.staged_bytes -= s.staged_bytes
        p = st.stage_prefix(s.load_no)
        try:
            keys = list(self.kv.scan_keys(p, st.prefix_end(p)))
            if keys:
                self._kv_write((), keys)
                # give the disk space back now, not whenever LevelDB gets to it (in a
                # background thread: compacting blocks for up to about a second)
                self.kv.compact(p, st.prefix_end(p), background=True)
        except StorageError:
            pass  # staged entries are removed at the next start-up

    def _refuse_load(self, s: LoadSession | None, nbytes: int) -> None:
        """Raise if a chunk of `nbytes` (of a new load when `s` is None) is past a bound."""
        if s is None and len(self.loads) >= self.max_loads:
            self.loads_refused += 1
            raise Unavailable(
                f"{len(self.loads)} loads are in progress, the most this node takes (--max-loads); "
                "retry when one has finished, been aborted or expired",
                {"loads": len(self.loads), "limit": self.max_loads},
            )
        own = s.staged_bytes if s is not None else 0
        if own + nbytes > self.max_staged_bytes:
            # this load alone can never fit: retrying does not help
            self.loads_refused += 1
            raise TooLarge(
                f"this load would stage {own + nbytes} bytes, more than the node stages for loads "
                f"(--max-staged-bytes {self.max_staged_bytes}); raise the limit on the node",
                {"limit": self.max_staged_bytes, "staged": own},
            )
        if self.staged_bytes + nbytes > self.max_staged_bytes:
            self.loads_refused += 1
            raise Unavailable(
                f"loads in progress hold {self.staged_bytes} staged bytes; this chunk of {nbytes} "
                f"would pass --max-staged-bytes {self.max_staged_bytes}; retry when a load has finished",
                {"staged": self.staged_bytes, "limit": self.max_staged_bytes},
            )

    def expire_loads(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for s in list(self.loads.values()):
            if now - s.last_used > LOAD_IDLE_S:
                log.warning("abandoning load %r of context %r after %.0f s idle", s.load_id, s.context, now - s.last_used)
                self._drop_load(s)

    def load(self, req: codec.Load, sync: bool, now: float | None = None) -> dict[str, Any] | None:
        """Stage a chunk of a snapshot; on `final`, verify all and commit.

        Returns None for an intermediate chunk, else the committed head.
        Nothing becomes visible unless every hash and the root check out.
        """
        s = self.loads.get(req.load_id)
        if req.abort:
            # the client gave up (its own check failed, or the user stopped it)
            if s is not None:
                self._drop_load(s)
            return {"context": req.context, "aborted": True}
        if self.storage.error is not None:
            raise self.refused()
        existing = self.contexts.get(req.context)
        covered = s.covered if s is not None else (existing is not None and existing.size > req.size)
        staged = [] if covered else [(e.seq, e.encode()) for e in req.entries]
        nbytes = sum(len(b) for _, b in staged)
        if s is None:
            # A load_id not in progress starts a load: its first entry must be seq 1 (SPEC 6.9).
            first = req.entries[0].seq if req.entries else 1
            if first != 1:
                raise BadRequest(f"load {req.load_id!r} is unknown (expired?); start again from seq 1")
            if existing is not None and req.fail_if_exists:
                raise Conflict(f"context {req.context!r} already exists", {"size": existing.size})
            if existing is not None and req.entries and req.entries[0].writer != existing.writer:
                raise Conflict(
                    f"context {req.context!r} is written by {existing.writer!r} here; the snapshot's entries were "
                    f"written by {req.entries[0].writer!r}: another history, nothing was loaded",
                    {"size": existing.size, "writer": existing.writer},
                )
            if existing is not None and covered and self.root_at(existing, req.size) != req.root:
                raise Conflict(
                    f"context {req.context!r} holds a different history than the snapshot at its size "
                    f"{req.size}; nothing was loaded", {"size": existing.size},
                )
            self._refuse_load(None, nbytes)
            s = LoadSession(
                context=req.context, load_id=req.load_id, load_no=self._next_load_no,
                size=req.size, root=req.root, fail_if_exists=req.fail_if_exists,
                existing_size=existing.size if existing else 0,
                verifier=SnapshotVerifier(req.context, req.size, req.root), covered=covered,
            )
            s.prefix_root = merkle.EMPTY_ROOT if s.existing_size == 0 else None
            # registered only once its first chunk is verified and staged: a refused
            # first chunk leaves no session behind
            self._next_load_no += 1
        elif (s.context, s.size, s.root) != (req.context, req.size, req.root):
            raise BadRequest(f"load {req.load_id!r} was started for another context, size or root")
        else:
            self._refuse_load(s, nbytes)
        s.last_used = time.monotonic() if now is None else now
        try:
            for e in req.entries:
                if s.writer is None:
                    s.writer = e.writer
                elif e.writer != s.writer:
                    # one context, one writer, named in every entry (SPEC 17): a snapshot is one history
                    raise IntegrityError(f"entry #{e.seq} of the snapshot names writer {e.writer!r}, the ones "
                                         f"before it {s.writer!r}; a snapshot's entries name one writer")
                s.verifier.add(e)
                if s.verifier.count == s.existing_size:
                    s.prefix_root = s.verifier.frontier.root()
            if staged:
                self._kv_write([(st.stage_key(s.load_no, seq), b) for seq, b in staged])
            if req.load_id not in self.loads:
                self.loads[req.load_id] = s
            s.staged_bytes += nbytes
            self.staged_bytes += nbytes
            if not req.final:
                return None
            s.verifier.finish()
        except IntegrityError:
            self._drop_load(s)
            raise
        except StorageError as exc:
            # the verifier has seen this chunk: the load cannot go on from here
            self._drop_load(s)
            raise _abandoned(exc, req.load_id) from None
        try:
            return self._commit_load(s, sync)
        except StorageError as exc:
            raise _abandoned(exc, req.load_id) from None
        finally:
            self._drop_load(s)

    def load_writer(self, req: codec.Load) -> str | None:
        """The writer a load's entries name, as far as known with this chunk."""
        s = self.loads.get(req.load_id)
        if s is not None and s.writer is not None:
            return s.writer
        return req.entries[0].writer if req.entries else None

    def load_received(self, load_id: str) -> int:
        """The entries a load in progress holds so far (its `received`, SPEC 6.9)."""
        s = self.loads.get(load_id)
        return s.verifier.count if s is not None else 0

    def _commit_load(self, s: LoadSession, sync: bool) -> dict[str, Any]:
        ctx = self.contexts.get(s.context)
        if s.covered:
            # an older snapshot of this very history: loading it again is harmless, adds nothing
            if ctx is None or ctx.size < s.size or self.root_at(ctx, s.size) != s.root:
                raise Conflict(f"context {s.context!r} changed during the load; load again")
            return self.head(s.context)
        if ctx is not None and s.writer is not None and s.writer != ctx.writer:
            raise Conflict(f"context {s.context!r} is written by {ctx.writer!r} here, the snapshot by "
                           f"{s.writer!r}; nothing was loaded", {"size": ctx.size, "writer": ctx.writer})
        if ctx is not None:
            if s.fail_if_exists and s.existing_size == 0:
                raise Conflict(f"context {s.context!r} was created during the load")
            if ctx.size != s.existing_size:
                raise Conflict(f"context {s.context!r} grew during the load; load again")
            if s.prefix_root != ctx.frontier.root():
                raise Conflict(
                    f"context {s.context!r} holds a different history than the snapshot "
                    f"(they differ within the first {ctx.size} entries); nothing was loaded",
                    {"size": ctx.size},
                )
        elif s.size == 0:
            # An empty snapshot creates an empty context.
            mark = self._creation_mark()
            ctx = self._create(s.context)
            try:
                self.flush_created(ctx)
            except StorageError:
                self._uncreate(s.context, mark)
                raise
            return self.head(s.context)
        created = ctx is None
        mark = self._creation_mark()
        if ctx is None:
            # its writer is the one its entries name: this node for its own snapshot, else the node
            # holds a replica of that writer's context (moving a context to another writer is the
            # handoff still to come, SPEC 13.5)
            ctx = self._create(s.context, s.writer)
        start = ctx.size + 1
        # The context record reaches disk with the last chunk, the id counter with the
        # first: entries of a commit cut short by a storage fault then belong to no
        # context and their id is never reused.
        bkey = st.bucket_key(bucket_of(ctx.name_bytes, FINE), ctx.name_bytes)
        moved = {k: v for k in (st.meta_key("next_ctx"), st.ctx_key(ctx.name), bkey)
                 if (v := self.pending.pop(k, None)) is not None}
        # (a name in the bucket index without its `C` record is skipped by whoever reads it)
        puts: list[tuple[bytes, bytes]] = [(k, v) for k, v in moved.items() if k[:1] in (st.META, st.BUCKET)]
        # RAM changes only once every chunk is on disk: a storage fault leaves the context as it was.
        frontier = ctx.frontier.copy()
        size, last_lamport, max_lamport, added, wrote = ctx.size, ctx.last_lamport, 0, 0, False
        p = st.stage_prefix(s.load_no)
        try:
            for _k, blob in self.kv.scan(st.stage_key(s.load_no, start), st.prefix_end(p)):
                e = decode_entry(blob)
                for level, index, nh in frontier.append(e.hash, STORED_MIN_LEVEL):
                    puts.append((st.node_key(ctx.id, level, index), nh))
                puts.append((st.entry_key(ctx.id, e.seq), blob))
                size = e.seq
                last_lamport = e.lamport
                max_lamport = max(max_lamport, e.lamport)
                added += 1
                if len(puts) >= LOAD_COMMIT_CHUNK * 3:
                    self._kv_write(puts)
                    wrote = True
                    puts = []
            puts.append((st.ctx_key(ctx.name), _ctx_record(ctx, size, last_lamport, frontier)))
            self._kv_write(puts, sync=sync)
        except StorageError:
            if created:
                # once a chunk is on disk, so is the id counter: that id stays used
                self._uncreate(s.context, self._creation_mark() if wrote else mark)
            else:
                self.pending.update(moved)
                if wrote:
                    self._stale_tails.add(ctx)
            raise
        ctx.frontier = frontier
        ctx.size = ctx.hinted = size
        ctx.last_lamport = last_lamport
        self.entries_total += added
        ctx.flushed_seq = ctx.size  # written above, in storage: servable and publishable
        if self.journal is not None:
            records, rewrite = self.marks_job({ctx: ctx.size})
            self.journal.write(records, sync, rewrite)
        self._digest_dirty.add(ctx)
        if ctx.size != s.size or ctx.frontier.root() != s.root:
            raise IntegrityError("staged entries changed before commit")  # storage fault
        self.observe(max_lamport)
        return self.head(s.context)

    def flush_created(self, ctx: ContextState) -> None:
        puts = []
        for k in (st.ctx_key(ctx.name), st.meta_key("next_ctx"),
                  st.bucket_key(bucket_of(ctx.name_bytes, FINE), ctx.name_bytes)):
            v = self.pending.pop(k, None)
            if v is not None:
                puts.append((k, v))
        if puts:
            try:
                self._kv_write(puts)
            except StorageError:
                self.pending.update(puts)
                raise


def _ctx_record(ctx: ContextState, size: int, lamport: int, frontier: merkle.Frontier) -> bytes:
    """A context's `C` record with its head: what start-up needs to serve it without reading its
    entries (SPEC Appendix A). `frontier` is the one of `size` entries. A replica's head signed
    by its writer goes with it (`signed`; noted as written, `signed_hinted`): a context read again
    from its record (after leaving RAM, or a restart) must still give it to a peer with keys that
    pulls from this replica."""
    record: dict[str, Any] = {"id": ctx.id, "writer": ctx.writer, "created_ns": ctx.created_ns,
                              "head": [size, lamport, b"".join(frontier.nodes), frontier.root()]}
    if ctx.signed is not None:
        record["signed"] = ctx.signed.to_map()
    ctx.signed_hinted = ctx.signed
    return _packb(record)


def _signed_from_record(ctx: ContextState, raw: Any) -> SignedHead | None:
    """The signed head kept in `ctx`'s record, or None (logged) when it is not one of this history
    up to its size (the record is rewritten without it at the next write; its signature is
    checked by whoever uses it)."""
    name = ctx.name
    try:
        h = heads_from_map(raw)
    except RemoteProtocolError as exc:
        log.warning("context %r: the signed head in its record is malformed (%s); not kept", name, exc.message)
        return None
    if h.context != name or h.size > ctx.size or (h.size == ctx.size and h.root != ctx.frontier.root()):
        log.warning("context %r (%d entries): its record holds a signed head of %r at %d that is not of this "
                    "history; not kept", name, ctx.size, h.context, h.size)
        return None
    return h


def _first(item: tuple[str, Any]) -> str:
    return item[0]


def _head_size(raw: bytes | None) -> int | None:
    """The size in a `C` record's head, or None (no head, or not one)."""
    if raw is None:
        return None
    try:
        head = _unpackb(raw).get("head")
    except Exception:  # noqa: BLE001 - a damaged record: the caller reads the context the long way
        return None
    if type(head) is list and len(head) == 4 and type(head[0]) is int and head[0] >= 0:
        return head[0]
    return None


def _clean_state(raw: bytes | None) -> tuple[int, int, list[int], dict[str, int]] | None:
    """(contexts, entries, fine digest, contexts by writer) of a CLEAN_STATE_KEY record, or None
    if it is missing or not one (then start-up reads every context, as after a crash)."""
    if raw is None:
        return None
    try:
        m = _unpackb(raw)
        n, entries, fine, writers = m["contexts"], m["entries"], m["fine"], m["writers"]
    except Exception:  # noqa: BLE001 - whatever is wrong with it, it is not used
        m = None
    if (m is None or type(n) is not int or type(entries) is not int or not 0 <= n < 1 << 32
            or not 0 <= entries < 1 << 63 or type(fine) is not bytes or len(fine) != 8 * FINE
            or type(writers) is not dict
            or not all(type(w) is str and type(c) is int and c > 0 for w, c in writers.items())
            or sum(writers.values()) != n):
        log.warning("the clean-stop record is damaged: every context's head is checked")
        return None
    return n, entries, [int.from_bytes(fine[i:i + 8], "big") for i in range(0, len(fine), 8)], writers


def _abandoned(exc: StorageError, load_id: str) -> StorageError:
    return StorageError(f"{exc.message} (load {load_id!r} was abandoned: start it again from seq 1)", exc.details)


def _getter(
    leaf: Callable[[int], bytes], lookup: Callable[[bytes], bytes | None], ctx_id: int
) -> merkle.GetNode:
    """A GetNode over storage: leaves from entries, low levels rebuilt, the rest read."""
    def get(level: int, index: int) -> bytes:
        if level == 0:
            return leaf(index)
        if level < STORED_MIN_LEVEL:
            return merkle.inner_hash(get(level - 1, 2 * index), get(level - 1, 2 * index + 1))
        v = lookup(st.node_key(ctx_id, level, index))
        if v is None:
            raise InternalError(f"Merkle node ({level}, {index}) of context #{ctx_id} is missing from storage")
        return v
    return get


def _as_is(ctx: ContextState, seq: int, blob: bytes) -> bytes:
    return blob

