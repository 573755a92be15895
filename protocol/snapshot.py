"""The portable snapshot format and its incremental verifier.

A snapshot file is a msgpack stream: one header map, then `size` entry maps
in seq order (the same maps as on the wire)::

    {"format": "converge-ledger-snapshot", "version": 1,
     "context": str, "size": uint, "root": bin(32), "signed": map (optional: SPEC 13.6)}
    entry 1, entry 2, ..., entry size

A stream is read without holding it in memory. `SnapshotVerifier` re-hashes
every entry, checks that seqs are dense from 1 and that every entry names the
context, rebuilds the Merkle frontier and finally checks the root: a reader
(client or node) accepts nothing before `finish()` succeeds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Any

import msgpack

from protocol import heads
from protocol.entry import Entry, entry_from_wire
from protocol.errors import IntegrityError, RemoteProtocolError
from protocol.heads import SignedHead
from protocol.merkle import Frontier

FORMAT = "converge-ledger-snapshot"
VERSION = 1


def encode_header(context: str, size: int, root: bytes, signed: SignedHead | None = None) -> bytes:
    """The header; with `signed`, the head its context's writer signed at exactly (size, root)
    (SPEC 10, 13.6), which a node with keys requires before it loads the snapshot."""
    h: dict[str, Any] = {"format": FORMAT, "version": VERSION, "context": context, "size": size, "root": root}
    if signed is not None:
        h["signed"] = signed.to_map()
    out: bytes = msgpack.packb(h, use_bin_type=True)
    return out


def check_header(h: object) -> dict[str, Any]:
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise IntegrityError("not a Converge Ledger snapshot (bad header)")
    if h.get("version") != VERSION:
        raise IntegrityError(f"snapshot version {h.get('version')!r} is not supported (this reads {VERSION})")
    size = h.get("size")
    root = h.get("root")
    ctx = h.get("context")
    if type(size) is not int or size < 0 or not isinstance(root, bytes) or len(root) != 32 or not isinstance(ctx, str):
        raise IntegrityError("snapshot header has a bad size, root or context")
    if "signed" in h:
        try:
            signed = heads.from_map(h["signed"])
        except RemoteProtocolError as exc:
            raise IntegrityError(f"snapshot header has a malformed signed head: {exc.message}") from None
        if (signed.context, signed.size, signed.root) != (ctx, size, root):
            raise IntegrityError("snapshot header's signed head is not of the snapshot's context, size and root")
    return h


class SnapshotVerifier:
    """Feed entries in order; `finish()` checks count and root."""

    def __init__(self, context: str, size: int, root: bytes) -> None:
        self.context = context
        self.size = size
        self.root = root
        self.frontier = Frontier()
        self.max_lamport = 0

    @property
    def count(self) -> int:
        return self.frontier.size

    def add(self, e: Entry) -> None:
        expected = self.frontier.size + 1
        if e.seq != expected:
            raise IntegrityError(f"snapshot entry has seq {e.seq}, expected {expected}")
        if expected > self.size:
            raise IntegrityError(f"snapshot has more entries than its size {self.size}")
        if e.context != self.context:
            raise IntegrityError(f"snapshot entry #{e.seq} belongs to context {e.context!r}, not {self.context!r}")
        e.verify()
        self.frontier.append(e.hash)
        if e.lamport > self.max_lamport:
            self.max_lamport = e.lamport

    def finish(self) -> None:
        if self.frontier.size != self.size:
            raise IntegrityError(
                f"snapshot is truncated: {self.frontier.size} of {self.size} entries"
            )
        if self.frontier.root() != self.root:
            raise IntegrityError("snapshot root does not match its entries")


class _CountingReader:
    """Counts the bytes the unpacker reads: its iteration ends quietly on a cut-off
    object, so a clean end is told from a truncated one by comparing with the end
    of the last whole object."""

    __slots__ = ("f", "count")

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.count += len(b)
        return b


def read_snapshot(f: IO[bytes]) -> tuple[dict[str, Any], Iterator[Entry]]:
    """Header and an iterator over the entries of a snapshot file (unverified)."""
    src = _CountingReader(f)
    unpacker = msgpack.Unpacker(src, raw=False, max_buffer_size=256 * 1024 * 1024)
    try:
        header = check_header(next(unpacker))
    except StopIteration:
        raise IntegrityError("snapshot file is empty" if src.count == 0 else "snapshot header is truncated") from None
    except (ValueError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"snapshot header is not valid msgpack ({exc})") from None

    def entries() -> Iterator[Entry]:
        end = unpacker.tell()
        try:
            for m in unpacker:
                end = unpacker.tell()
                try:
                    yield entry_from_wire(m)
                except RemoteProtocolError as exc:
                    raise IntegrityError(f"snapshot holds a malformed entry: {exc.message}") from None
        except (ValueError, msgpack.UnpackException) as exc:
            raise IntegrityError(f"snapshot is corrupted ({type(exc).__name__})") from None
        if end != src.count:
            raise IntegrityError("snapshot ends inside an entry (truncated or trailing bytes)")

    return header, entries()
