"""The durable high-water marks: what each context held on disk, kept outside LevelDB.

A mark stored inside LevelDB would vanish with the entries when LevelDB's own
`.log` is cut short, so it could detect nothing. The marks live in a file of
their own in the data folder, `HIGHWATER`, an append-only journal of records
written after the batch they describe is in LevelDB:

    b"H" + u32 ctx_id + u64 size + 32-byte root + u32 crc32     (49 bytes)
    b"N" + u32 ctx_id + u16 len + name + u16 len + writer + u32 crc32

An `H` record says "context #ctx_id held (size, root) on disk"; the last one of
an id wins. An `N` record names an id once (so a context whose `C` record was
lost with the `.log` can still be reported and recreated). A record whose crc
does not match (a write torn by a kill) ends the replay: what follows it is
ignored. Each flush appends records only for the contexts it touched, so the
cost grows with the work, not with the number of contexts held; when the file
grows past twice what one record per context needs, the flusher rewrites it
(temporary file, fsync, rename).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterable

log = logging.getLogger(__name__)

FILE = "HIGHWATER"
_H = struct.Struct(">cIQ32s")
_crc = struct.Struct(">I")
_nhead = struct.Struct(">cIH")
_u16 = struct.Struct(">H")
H_SIZE = _H.size + _crc.size
MIN_COMPACT_BYTES = 1 << 20
TOKEN_TAIL = 4096  # bytes at the end of the journal that its token checksums
SYNC_EVERY_S = 0.1


def h_record(ctx_id: int, size: int, root: bytes) -> bytes:
    body = _H.pack(b"H", ctx_id, size, root)
    return body + _crc.pack(zlib.crc32(body))


def token(size: int, tail: bytes) -> bytes:
    """What a clean stop records of the journal (its length and a checksum of its end), so
    that the next start can tell whether anything (an older version, say) wrote it since."""
    return b"%d:%08x" % (size, zlib.crc32(tail))


def n_record(ctx_id: int, name: str, writer: str) -> bytes:
    n, w = name.encode(), writer.encode()
    body = _nhead.pack(b"N", ctx_id, len(n)) + n + _u16.pack(len(w)) + w
    return body + _crc.pack(zlib.crc32(body))


def parse(data: bytes) -> tuple[dict[int, tuple[int, bytes]], dict[int, tuple[str, str]], int]:
    """(marks by id, (name, writer) by id, bytes of valid records) of a journal's bytes."""
    marks: dict[int, tuple[int, bytes]] = {}
    names: dict[int, tuple[str, str]] = {}
    i, n = 0, len(data)
    while i < n:
        kind = data[i:i + 1]
        if kind == b"H":
            if i + H_SIZE > n:
                break
            body = data[i:i + _H.size]
            if zlib.crc32(body) != _crc.unpack_from(data, i + _H.size)[0]:
                break
            _k, cid, size, root = _H.unpack(body)
            marks[cid] = (size, root)
            i += H_SIZE
        elif kind == b"N":
            if i + _nhead.size > n:
                break
            _k, cid, ln = _nhead.unpack_from(data, i)
            j = i + _nhead.size + ln
            if j + 2 > n:
                break
            lw = _u16.unpack_from(data, j)[0]
            end = j + 2 + lw
            if end + 4 > n or zlib.crc32(data[i:end]) != _crc.unpack_from(data, end)[0]:
                break
            try:
                names[cid] = (data[i + _nhead.size:j].decode(), data[j + 2:end].decode())
            except UnicodeDecodeError:
                break
            i = end + 4
        else:
            break
    return marks, names, i


class Journal:
    """The `HIGHWATER` file of a data folder. Appends and rewrites happen in one thread at a time
    (the flusher's, or the main thread's once the flusher has stopped)."""

    def __init__(self, folder: str, lazy: bool = False) -> None:
        """Open the journal of `folder`. With `lazy`, only its length and the checksum of its end
        are read (`open_token`): the caller then either replays it (`load`) or, after a clean stop
        whose heads it takes as they are, starts it again from nothing (`reset`)."""
        self.path = os.path.join(folder, FILE)
        self.marks: dict[int, tuple[int, bytes]] = {}
        self.names: dict[int, tuple[str, str]] = {}
        self.torn = 0
        self.need = 0
        self._synced = 0.0
        self._lock = threading.Lock()
        self.loaded = False
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - TOKEN_TAIL))
                tail = f.read()
        except FileNotFoundError:
            size, tail = 0, b""
        # what a clean stop recorded is the token of the whole file: a torn record at its end
        # (a kill) makes it another file, replayed then
        self.open_token = token(size, tail)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.bytes = size
        if not lazy:
            self.load()

    def load(self) -> None:
        """Replay the whole journal into `marks` and `names` (once)."""
        if self.loaded:
            return
        self.loaded = True
        with open(self.path, "rb") as f:
            data = f.read()
        self.marks, self.names, good = parse(data)
        # bytes of one record per id: what a rewrite would hold (kept up to date, never summed again)
        self.need = len(self.marks) * H_SIZE + sum(len(n_record(c, n, w)) for c, (n, w) in self.names.items())
        self.torn = len(data) - good
        self.open_token = token(good, data[max(0, good - TOKEN_TAIL):good])
        if self.torn:
            # a record torn by a kill: cut it off so later records are not hidden behind it
            log.warning("%s: ignoring %d bytes of a torn record at its end", self.path, self.torn)
            os.ftruncate(self._fd, good)
        self.bytes = good

    def reset(self) -> None:
        """Start the journal again, empty, without reading it: after a clean stop every context's
        `C` record holds its head and LevelDB has them on disk (the stop's last write was synced),
        so no mark is needed for what is there; from now on the journal records what changes."""
        self.loaded = True
        self.marks, self.names, self.need, self.torn = {}, {}, 0, 0
        self.write(b"", sync=True, rewrite=b"")

    def name(self, ctx_id: int, name: str, writer: str) -> bytes:
        """The `N` record of an id not named yet (and count it), else b""."""
        if ctx_id in self.names:
            return b""
        self.names[ctx_id] = (name, writer)
        rec = n_record(ctx_id, name, writer)
        self.need += len(rec)
        return rec

    def mark(self, ctx_id: int, size: int, root: bytes) -> bytes:
        if ctx_id not in self.marks:
            self.need += H_SIZE
        self.marks[ctx_id] = (size, root)
        return h_record(ctx_id, size, root)

    def wants_compaction(self) -> bool:
        return self.bytes > max(MIN_COMPACT_BYTES, 2 * self.need)

    def snapshot(self) -> bytes:
        """Every live mark and name as one journal's bytes (for a rewrite)."""
        out = [n_record(cid, n, w) for cid, (n, w) in self.names.items()]
        out.extend(h_record(cid, size, root) for cid, (size, root) in self.marks.items())
        return b"".join(out)

    def write(self, records: bytes, sync: bool, rewrite: bytes | None = None) -> None:
        """Append `records` (fsynced when `sync`), or with `rewrite`, replace the file by it."""
        with self._lock:
            self._write(records, sync, rewrite)

    def _write(self, records: bytes, sync: bool, rewrite: bytes | None) -> None:
        if rewrite is not None:
            tmp = self.path + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, rewrite)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            os.replace(tmp, self.path)
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND, 0o644)
            self.bytes = len(rewrite)
            dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            return
        if records:
            _write_all(self._fd, records)
            self.bytes += len(records)
        if sync:
            # at most one fsync of the marks per SYNC_EVERY_S: in sync mode LevelDB's own fsync
            # already made the entries durable; a mark that lags after a power cut only misses
            # damage younger than that, and a second fsync per batch halved one-at-a-time sync
            # appends (measured)
            now = time.monotonic()
            if now - self._synced >= SYNC_EVERY_S:
                os.fdatasync(self._fd)
                self._synced = now

    def current_token(self) -> bytes:
        """`token` of the journal as it is now (after the last write of a clean stop)."""
        with self._lock:
            start = max(0, self.bytes - TOKEN_TAIL)
            with open(self.path, "rb") as f:
                f.seek(start)
                tail = f.read(self.bytes - start)
        return token(self.bytes, tail)

    def close(self) -> None:
        with self._lock:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def records_for(items: Iterable[tuple[int, int, bytes]]) -> bytes:
    return b"".join(h_record(cid, size, root) for cid, size, root in items)
