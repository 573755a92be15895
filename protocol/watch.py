"""The watch stream: topics, the messages a node publishes, and a watcher's cursor.

Theory of operation
-------------------
A node publishes on its watch (XPUB) socket two-frame messages: a *topic*
(`topic(context)`: the context name's UTF-8 length as 2 bytes big-endian, then
the name) and a msgpack body. ZeroMQ filters subscriptions by prefix; the
length in front makes a topic an exact match, so a watcher of `c1` never
receives `c10`. Bodies are

- `entries`: consecutive stored entries of one context, ascending seq;
- `head`: the context's size, sent when a watcher subscribes and whenever the
  context has published nothing for one heartbeat interval, so that a watcher
  tells a quiet context from a dead node and notices entries it missed.

PUB/SUB is never complete (a new subscriber misses what was sent before its
subscription arrived; a slow one loses messages past the high-water mark), so
completeness comes from seq numbers: `WatchCursor` is the pure state of one
watcher. It delivers entries exactly once and in seq order, holds back entries
that arrive ahead of a gap, and says when the gap must be refilled over the
request socket (`needs_refill`, then `on_page` with what `get` returned).
It never reads sockets or clocks; `protocol.client.Watch` drives it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from protocol.codec import PROTOCOL_VERSION, SUPPORTED_VERSIONS, array_header
from protocol.entry import MAX_CONTEXT_BYTES, Entry, check_name, entry_from_wire
from protocol.errors import BAD_REQUEST, IntegrityError, RemoteProtocolError

ENTRIES = "entries"
HEAD = "head"
MAX_AHEAD = 10_000  # live entries a cursor holds back while a gap is refilled
RECENT = 256  # delivered entries whose hashes a cursor keeps, to tell a re-published one from another


def topic(context: str) -> bytes:
    """The exact-match topic frame of a context: u16be(len(name)) || name."""
    name = context.encode()
    return len(name).to_bytes(2, "big") + name


# Topics of the replication stream (SPEC 17.3): a node publishes the entries it
# writes itself under REPL_PREFIX || topic(context) as well, and peers subscribe
# to the prefix alone. A watch topic starts with a length of at most 256, so the
# two never match each other.
REPL_PREFIX = b"\xff\xff"


def repl_topic(context: str) -> bytes:
    return REPL_PREFIX + topic(context)


# The topic of a refusal (SPEC 16.5): topic(context) || FF. A node sends the `limited` head of a
# refused subscription there, to that subscriber alone; the subscriber's own filter (its exact
# topic) lets it through because it starts with that topic. UTF-8 never holds an FF byte, so no
# context topic ends with one.
LIMITED_SUFFIX = b"\xff"


def limited_topic(context: str) -> bytes:
    return topic(context) + LIMITED_SUFFIX


def is_limited_topic(t: bytes) -> bool:
    return t.endswith(LIMITED_SUFFIX) and not t.startswith(REPL_PREFIX) and context_of_topic(t[:-1]) is not None


def context_of_message_topic(t: bytes) -> str | None:
    """The context a published message's topic names: a watch, replication or refusal topic."""
    if t.startswith(REPL_PREFIX):
        return context_of_topic(t[2:])
    if t.endswith(LIMITED_SUFFIX):
        return context_of_topic(t[:-1])
    return context_of_topic(t)


def context_of_topic(t: bytes) -> str | None:
    """The context a subscription topic names exactly, or None (a prefix/wildcard)."""
    if len(t) < 3 or int.from_bytes(t[:2], "big") != len(t) - 2:
        return None
    try:
        return t[2:].decode()
    except UnicodeDecodeError:
        return None


# -- bodies (node side: encode; watcher side: decode) ----------------------------

_pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
_ENTRIES_HEAD = b"\x84\xa1v\x01\xa4type\xa7entries\xa7context"


def encode_entries(context_packed: bytes, blobs: Sequence[bytes], ack: bool = False,
                   root: bytes | None = None, sig: bytes | None = None) -> bytes:
    """An `entries` body from already-encoded entry maps (spliced, not re-encoded).

    On the replication stream (SPEC 17.3) also `root`, the writer's root at the last entry's
    seq, `ack`: the writer waits for replicas to acknowledge these entries (17.5), and, from a
    writer with keys, `sig`: its signature of the head (context, last seq, root) (SPEC 13.6)."""
    if not ack and root is None and sig is None:
        head = _ENTRIES_HEAD
    else:
        head = b"".join((
            bytes((0x84 + ack + (root is not None) + (sig is not None),)), b"\xa1v\x01\xa4type\xa7entries",
            b"\xa3ack\xc3" if ack else b"", b"\xa4root\xc4\x20" + root if root is not None else b"",
            b"\xa3sig\xc4\x40" + sig if sig is not None else b"",
            b"\xa7context",
        ))
    return b"".join((head, context_packed, b"\xa7entries", array_header(len(blobs)), *blobs))


def encode_head(context: str, size: int, lamport: int, root: bytes, node_id: str, boot: str,
                heartbeat_ms: int, watchers: int, limited: bool = False) -> bytes:
    m = {
        "v": PROTOCOL_VERSION, "type": HEAD, "context": context, "size": size, "lamport": lamport,
        "root": root, "node_id": node_id, "boot": boot, "heartbeat_ms": heartbeat_ms, "watchers": watchers,
    }
    if limited:
        m["limited"] = True  # the node does not publish on this topic (its watch limit): poll
    out: bytes = _pack(m)
    return out


def peek_entries(frames: Sequence[bytes]) -> tuple[str, int, int] | None:
    """(context, first seq, count) of an `entries` message, from its headers alone.

    Reads the body only up to the first entry's seq (the reference node writes
    `type` before `entries`, and `context` then `seq` first in each entry), so a
    receiver can drop a message that brings nothing new without decoding it.
    None when the message is not such an `entries` message or is laid out
    otherwise: then decode it in full. Never raises.
    """
    if len(frames) != 2:
        return None
    name = context_of_message_topic(frames[0])
    if name is None:
        return None
    u = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(frames[1]) + 1)
    try:
        u.feed(frames[1])
        kind = None
        for _ in range(u.read_map_header()):
            k = u.unpack()
            if k == "type":
                kind = u.unpack()
            elif k == "entries":
                if kind != ENTRIES:
                    return None
                count = u.read_array_header()
                if count == 0:
                    return None
                for _ in range(u.read_map_header()):
                    if u.unpack() == "seq":
                        first = u.unpack()
                        return (name, first, count) if type(first) is int and first >= 1 else None
                    u.skip()
                return None
            else:
                u.skip()
    except Exception:  # any malformation: let the full decoder judge it
        return None
    return None


@dataclass(frozen=True, slots=True)
class EntriesMsg:
    context: str
    entries: tuple[Entry, ...]
    ack: bool = False  # the writer waits for acknowledgements of these (replication stream)
    root: bytes | None = None  # the writer's root at the last entry's seq (replication stream)
    sig: bytes | None = None  # the writer's signature of (context, last seq, root) (SPEC 13.6)


@dataclass(frozen=True, slots=True)
class HeadMsg:
    context: str
    size: int
    lamport: int
    root: bytes
    node_id: str
    boot: str
    heartbeat_ms: int
    watchers: int
    limited: bool = False  # the node refused the subscription (SPEC 16.5): nothing live follows


WatchMsg = EntriesMsg | HeadMsg


def _bad(msg: str) -> RemoteProtocolError:
    return RemoteProtocolError(BAD_REQUEST, msg)


def _uint(m: dict[str, Any], name: str) -> int:
    v = m.get(name)
    if type(v) is not int or not 0 <= v < 1 << 64:
        raise _bad(f"watch message: {name} must be an unsigned 64-bit integer")
    return v


def decode_message(frames: Sequence[bytes]) -> WatchMsg:
    """A published message (topic frame, body frame) -> EntriesMsg or HeadMsg.

    Raises RemoteProtocolError for anything malformed, including a body whose
    context is not the one its topic names. Entry hashes are not verified here.
    """
    if len(frames) != 2:
        raise _bad(f"watch message must have 2 frames, got {len(frames)}")
    t, body = frames
    name = context_of_message_topic(t)
    if name is None:
        raise _bad("watch message topic is not a context topic")
    try:
        m = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types for junk
        raise _bad(f"watch message is not msgpack ({type(exc).__name__})") from None
    if not isinstance(m, dict):
        raise _bad("watch message body must be a map")
    if type(m.get("v")) is not int or m.get("v") not in SUPPORTED_VERSIONS:
        raise _bad(f"watch message has unsupported version {m.get('v')!r}")
    context = check_name("context", m.get("context"), MAX_CONTEXT_BYTES)
    if context != name:
        raise _bad(f"watch message for {context!r} arrived under the topic of {name!r}")
    kind = m.get("type")
    refusal = is_limited_topic(t)
    if refusal and kind != HEAD:
        raise _bad("only a head travels under a refusal topic")
    if kind == ENTRIES:
        raw = m.get("entries")
        if not isinstance(raw, list):
            raise _bad("watch message: entries must be an array")
        entries = tuple([entry_from_wire(e) for e in raw])
        if entries:
            seq = entries[0].seq
            for e in entries:
                if e.seq != seq or e.context != context:
                    if e.context != context:
                        raise _bad(f"watch message for {context!r} holds an entry of {e.context!r}")
                    raise _bad("watch message entries are not consecutive")
                seq += 1
        root = m.get("root")
        if root is not None and (not isinstance(root, bytes) or len(root) != 32):
            raise _bad("watch message: root must be 32 bytes")
        sig = m.get("sig")
        if sig is not None and (not isinstance(sig, bytes) or len(sig) != 64):
            raise _bad("watch message: sig must be 64 bytes")
        return EntriesMsg(context, entries, m.get("ack") is True, root, sig)
    if kind == HEAD:
        root = m.get("root")
        if not isinstance(root, bytes) or len(root) != 32:
            raise _bad("watch message: root must be 32 bytes")
        node_id = m.get("node_id")
        boot = m.get("boot")
        if not isinstance(node_id, str) or not isinstance(boot, str):
            raise _bad("watch message: node_id and boot must be strings")
        return HeadMsg(context, _uint(m, "size"), _uint(m, "lamport"), root, node_id, boot,
                       _uint(m, "heartbeat_ms"), _uint(m, "watchers"), refusal or m.get("limited") is True)
    # Raised like any malformed message; a receiver ignores it (SPEC: MUST ignore unknown types).
    raise _bad(f"unknown watch message type {kind!r}")


# -- the watcher's cursor -----------------------------------------------------------


class WatchCursor:
    """Exactly-once, in-order delivery for one watcher of one context.

    `last` is the highest seq already handed out or skipped by the key filter:
    every entry up to it is done with. `known_size` is the largest size the
    node has shown (by an entry or a head); a refill is due while it is ahead
    of `last`.
    """

    def __init__(self, context: str, after: int, key: str | None = None, max_ahead: int = MAX_AHEAD) -> None:
        self.context = context
        self.key = key
        self.last = after
        self.known_size = after
        self.max_ahead = max_ahead
        self.last_hash: bytes | None = None  # hash of entry #last, when this cursor saw it
        self.checked = 0  # the last position whose entry a refill confirmed is still the one delivered
        self.stream_high = 0  # the highest seq this node (this boot) announced on the watch stream
        # hashes of the entries delivered last, by seq: a live entry under one of those seqs with
        # another hash is another history (a replica that switched to its writer's, SPEC 17.4)
        self.recent: dict[int, bytes] = {}
        self.writer: str | None = None  # every entry of one history names one writer
        self.ahead: dict[int, Entry] = {}
        self.delivered = 0
        self.duplicates = 0
        self.dropped_ahead = 0

    def needs_refill(self) -> bool:
        return self.known_size > self.last

    def _same_history(self, e: Entry) -> None:
        """Raise if `e` cannot belong to the history delivered so far (a fork switched it)."""
        if self.writer is None:
            self.writer = e.writer
        elif e.writer != self.writer:
            raise IntegrityError(
                f"{self.context!r}#{e.seq} was written by {e.writer!r}, the entries delivered before by "
                f"{self.writer!r}: the node now serves another history of this context (a fork)",
                {"context": self.context, "seq": e.seq, "writer": e.writer},
            )
        # (`recent` holds the last entry delivered too: _advance puts every one there)
        known = self.recent.get(e.seq) if e.seq <= self.last else None
        if known is not None and e.hash != known:
            raise IntegrityError(
                f"{self.context!r}#{e.seq} differs from the entry delivered under that seq: "
                "the node now serves another history of this context",
                {"context": self.context, "seq": e.seq},
            )

    def _advance(self, e: Entry, out: list[Entry]) -> None:
        self.last = e.seq
        self.last_hash = e.hash
        recent = self.recent
        recent[e.seq] = e.hash
        if len(recent) > 2 * RECENT:  # keep the last RECENT or so (amortised: one sweep per RECENT)
            for s in [s for s in recent if s <= e.seq - RECENT]:
                del recent[s]
        if self.key is None or e.key == self.key:
            out.append(e)
            self.delivered += 1

    def _drain_ahead(self, out: list[Entry]) -> None:
        ahead = self.ahead
        while ahead:
            nxt = ahead.pop(self.last + 1, None)
            if nxt is None:
                # drop what the refill already covered
                for s in [s for s in ahead if s <= self.last]:
                    del ahead[s]
                    self.duplicates += 1
                return
            self._advance(nxt, out)

    def on_entries(self, entries: Iterable[Entry]) -> list[Entry]:
        """Live entries in; the ones now deliverable, in order, out."""
        out: list[Entry] = []
        for e in entries:
            self._same_history(e)
            if e.seq > self.stream_high:
                self.stream_high = e.seq
            if e.seq > self.known_size:
                self.known_size = e.seq
            if e.seq <= self.last:
                self.duplicates += 1
            elif e.seq == self.last + 1:
                self._advance(e, out)
                if self.ahead:
                    self._drain_ahead(out)
            elif e.seq in self.ahead:
                self.duplicates += 1
            elif len(self.ahead) < self.max_ahead:
                self.ahead[e.seq] = e
            else:
                self.dropped_ahead += 1  # the refill fetches it again
        return out

    def new_stream(self) -> None:
        """The node restarted (a new boot): its stream starts over (see `on_head`)."""
        self.stream_high = 0

    def on_head(self, size: int) -> None:
        """A published head arrived: entries up to `size` exist.

        A head may be older than what this cursor already got over the request
        socket (the two sockets are not ordered against each other), so a size
        below `last` here is not a rollback (`check_size` judges fresh sizes);
        a size below what the same stream announced before is.
        """
        if size < self.stream_high:
            # One node's watch stream is ordered: a head below what the same stream announced
            # before means the node now serves another history of the context (a replica that
            # switched to its writer's after the writer lost a tail, SPEC 17.4).
            raise IntegrityError(
                f"the node announced {self.stream_high} entries of {self.context!r} and now {size}: it "
                "serves another history of this context",
                {"context": self.context, "size": size, "announced": self.stream_high},
            )
        self.stream_high = size
        if size > self.known_size:
            self.known_size = size

    def check_size(self, size: int) -> None:
        """The context's size as the request socket reports it now: never below `last`."""
        if size < self.last:
            raise IntegrityError(
                f"the node now holds {size} entries of {self.context!r} but already delivered entry "
                f"#{self.last}: it lost acknowledged entries (a crash under async durability?) and "
                "its history may have diverged from what this watcher saw",
                {"context": self.context, "size": size, "delivered_seq": self.last},
            )
        if size > self.known_size:
            self.known_size = size

    def refill_after(self) -> int:
        """The `after` argument of the next refill `get`: one entry before the next one needed,
        when the cursor knows the hash of the last one it delivered, so that the page shows
        whether the node still holds that entry (a writer that lost a tail and wrote others
        under its seqs would otherwise be spliced onto what was delivered)."""
        if self.key is None and self.last_hash is not None and self.last > 0 and self.checked != self.last:
            return self.last - 1
        return self.last

    def on_page(self, entries: Sequence[Entry], next_after: int, size: int, more: bool = False) -> list[Entry]:
        """What a refill `get(after=refill_after(), key=key)` returned; deliverable entries out.

        With a key filter the node returns only matching entries and
        `next_after`, the last seq it examined; everything up to it is done.
        A last page (`more` false) brings the cursor up to date with `size`:
        the node reads its size after everything it published before.
        """
        self.check_size(size)
        prev = self.last
        if entries and self.key is None and entries[0].seq == prev and self.last_hash is not None:
            # the overlap asked for by refill_after(): the entry delivered last, unchanged?
            if entries[0].hash != self.last_hash:
                raise IntegrityError(
                    f"{self.context!r}#{prev} differs from the entry delivered under that seq: "
                    "the node now serves another history of this context",
                    {"context": self.context, "seq": prev},
                )
            entries = entries[1:]
            self.checked = prev  # asked once per position: a page of one entry still makes progress
        for e in entries:  # check the whole page before delivering any of it
            self._same_history(e)
            if e.context != self.context or e.seq <= prev:
                raise IntegrityError(
                    f"refill of {self.context!r} after #{self.last} returned {e.context!r}#{e.seq} out of order"
                )
            if self.key is not None and e.key != self.key:
                raise IntegrityError(f"refill with key {self.key!r} returned an entry of key {e.key!r}")
            if self.key is None and e.seq != prev + 1:
                raise IntegrityError(f"refill of {self.context!r} skipped from #{prev} to #{e.seq}")
            prev = e.seq
        if next_after < prev or next_after > size:
            raise IntegrityError(f"refill of {self.context!r}: next_after {next_after} is outside #{prev}..#{size}")
        if self.key is None and next_after != prev:
            raise IntegrityError(f"refill of {self.context!r} claims to have examined up to #{next_after} "
                                 f"but returned entries only up to #{prev}")
        out: list[Entry] = []
        for e in entries:
            self._advance(e, out)
        if next_after > self.last:
            self.last = next_after
            self.last_hash = None  # skipped by the node's key filter, unseen here
        if not more:
            self.known_size = size
            # entries held back from beyond what the node now holds (an older boot's) are void
            for s in [s for s in self.ahead if s > size]:
                del self.ahead[s]
        if self.ahead:
            self._drain_ahead(out)
        return out
