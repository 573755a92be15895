"""The watch side of a node: the XPUB socket, the watch registry, publishing, heartbeats.

The XPUB socket runs in ZMQ_XPUB_MANUAL mode: every subscribe and unsubscribe
(including the unsubscriptions ZeroMQ generates when a watcher disconnects)
reaches `on_subscriptions`, and ZeroMQ applies none of them itself; the registry
counts subscriptions per topic and applies the ones it accepts to the subscriber
that sent them (libzmq: a SUBSCRIBE set on the XPUB applies to the pipe whose
message was read last). That is what lets it refuse one subscriber of a topic
others are served on. Two bounds, each answered alike (SPEC 16.5): a refused
subscription is counted, never applied, and its subscriber alone is sent one
`head` marked `limited` under the refusal topic (`watch.limited_topic`, which
starts with the subscriber's own topic, so its filter lets it through); its
watcher polls with `get`.

- `max_topics` (--max-watch-topics): distinct context topics tracked; a
  subscription to one more is refused and not tracked.
- `max_watchers` (--max-watchers-per-context): subscriptions held per context
  topic (and prefix subscriptions, node-wide: each may match every context).
  A refused subscription still holds its place until it is unsubscribed (the
  reference client does so at once) or its subscriber leaves: the node cannot
  tell whose unsubscription it reads, only which topic's. (So a client that
  sends unsubscriptions it never subscribed, or other messages upstream, which
  in libzmq 4.3.5 shift which pipe the next SUBSCRIBE applies to, can skew the
  count: such connections stay bounded by --max-clients as a whole.)
  Peers' subscriptions to the replication stream are never refused.

Nothing here costs O(topics) per loop turn: heartbeats walk the topics in the
order they were last sent to (oldest first) and stop at the first one not due,
with a budget per call, and one call reads a bounded number of
(un)subscriptions, each O(1), its greeting or refusal one message to its
subscriber alone. (With 100k topics the old walk over every topic every 0.1 s,
and a head for each once a second, held the loop for ~0.5 s a second.)

Publishing is pull-based: the server marks a context due (`mark`) when it
grows, and `publish()` (end of every burst, and after every flush) sends what
each due context has beyond `ContextState.published_seq` that is already
acknowledged: everything in async mode, only what is on disk in sync mode, so
a watcher never sees an entry a crash could take back. A context nobody
watches costs one pointer move. Each context is published in its own
try/except: a fault there (counted and logged) never reaches another context
or the appends. Sends never block: past the high-water mark ZeroMQ drops
messages for that watcher, who refills by seq.

The same socket carries the replication stream (SPEC 17.3): the entries this
node writes itself are also sent under `watch.REPL_PREFIX` + topic, which is
what peers subscribe to. Replicated entries go to watchers only, so an entry
crosses the mesh once per follower, not once per pair of nodes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import zmq

from node.ledger import ContextState, Ledger
from protocol import watch

log = logging.getLogger(__name__)

MAX_MSG_ENTRIES = 1_000  # entries per published message
MAX_MSG_BYTES = 64 << 10  # ... or bytes: with --watch-queue messages per watcher, this bounds the RAM a stalled watcher pins
MAX_PUBLISH_PER_CALL = 20_000  # entries per context per publish() call; the rest next time
MAX_SUBSCRIPTIONS_PER_CALL = 1_000  # (un)subscriptions read per on_subscriptions() call; the rest wait in the socket
DEFAULT_MAX_TOPICS = 10_000
DEFAULT_MAX_WATCHERS = 1_000


class Publisher:
    def __init__(self, sock: zmq.Socket[Any], ledger: Ledger, *, sync: bool, heartbeat_ms: int,
                 now: Callable[[], float] = time.monotonic,
                 wants_ack: Callable[[ContextState], bool] = lambda ctx: False,
                 max_topics: int = DEFAULT_MAX_TOPICS,
                 max_watchers: int = DEFAULT_MAX_WATCHERS) -> None:
        self.sock = sock
        self.ledger = ledger
        self.sync = sync
        self.heartbeat_ms = heartbeat_ms
        self.heartbeat_s = heartbeat_ms / 1000.0
        self.now = now
        self.wants_ack = wants_ack  # whether appends of a context wait for replicas' acks
        self.boot = os.urandom(8).hex()  # tells watchers that the node restarted
        self.due: dict[ContextState, None] = {}
        self.max_topics = max_topics
        self.counts: dict[bytes, int] = {}  # exact context topic -> watchers; at most max_topics keys
        self.topics_refused = 0  # subscriptions to a new topic past max_topics
        self.max_watchers = max_watchers  # subscriptions held per context topic (and prefix ones, node-wide)
        self.watchers_refused = 0  # subscriptions past max_watchers
        self.other_subs = 0  # prefix / wildcard subscriptions (they may match any context)
        self.peer_subs = 0  # subscriptions to the replication stream (peers; SPEC 17.3)
        # the tracked topics (the keys of `counts`), least recently sent to first, with that time
        self.last_sent: OrderedDict[bytes, float] = OrderedDict()
        # how many heads one heartbeat() may send: twice a fair share of the topics per call
        # (the server calls it every min(0.1 s, heartbeat / 4)), so a crowd of topics that
        # subscribed together spreads out over the interval instead of stalling one loop turn
        calls = max(1.0, self.heartbeat_s / min(0.1, self.heartbeat_s / 4))
        self._head_share = 2.0 / calls
        self.published_entries = 0
        self.published_messages = 0
        self.replication_entries = 0  # entries this node wrote, sent on the replication stream
        self.replication_messages = 0
        self.heartbeats = 0
        self.errors = 0
        self.errors_by_context: dict[str, int] = {}
        self.send_drops = 0  # messages the XPUB refused at once (status.publish_drops)
        # a node with keys signs the head its replication messages end at (SPEC 13.6): (ctx, size, root) -> sig
        self.signer: Callable[[ContextState, int, bytes], bytes] | None = None
        # a node with keys: whether the subscriber whose message (a zmq.Frame) is read may subscribe to the
        # topic (bytes); a subscription it may not hold is counted, never applied (SPEC 13.3)
        self.gate: Callable[[Any, bytes], bool] | None = None
        self.watchers_forbidden = 0

    # -- the registry --------------------------------------------------------------

    def on_subscriptions(self) -> None:
        """Read pending (un)subscriptions, apply the ones accepted, greet or refuse each new one.

        The socket is in ZMQ_XPUB_MANUAL mode: ZeroMQ applies no subscription itself; a
        SUBSCRIBE/UNSUBSCRIBE set on the XPUB applies to the subscriber whose message was read
        last. For the length of this call it is in MANUAL_LAST_VALUE mode as well: the first
        send after such a read goes to that subscriber alone (its greeting, or its refusal), so a
        new watcher costs one message, not one to every watcher of its context."""
        sock = self.sock
        sock.setsockopt(zmq.XPUB_MANUAL_LAST_VALUE, 1)
        try:
            gate = self.gate
            for _ in range(MAX_SUBSCRIPTIONS_PER_CALL):
                try:
                    if gate is None:
                        msg = sock.recv(zmq.NOBLOCK)
                    else:
                        frame = sock.recv(zmq.NOBLOCK, copy=False)  # (its key is a property of the frame)
                        msg = frame.bytes
                except zmq.Again:
                    break
                if msg and msg[0] <= 1:
                    allowed = True if gate is None or msg[0] == 0 else gate(frame, msg[1:])
                    self._on_subscription(msg[0] == 1, msg[1:], allowed)
                # else: not a subscription message (an XSUB may send anything upstream)
        finally:
            # Back to plain manual mode, where every send goes to all its subscribers. (Turning
            # MANUAL_LAST_VALUE off turns manual mode off too; nothing runs between the two
            # calls: libzmq reads its pipes only inside send/recv/poll, not in setsockopt.)
            sock.setsockopt(zmq.XPUB_MANUAL_LAST_VALUE, 0)
            sock.setsockopt(zmq.XPUB_MANUAL, 1)

    def _on_subscription(self, sub: bool, t: bytes, allowed: bool = True) -> None:
        sock = self.sock
        # A subscription its key may not hold (a node with keys) still holds its place in the counts,
        # as refused ones do: the node cannot tell whose unsubscription it reads later.
        if sub and not allowed:
            self.watchers_forbidden += 1
        if t.startswith(watch.REPL_PREFIX):
            # a peer's subscription to the replication stream: never refused for a bound (17.3)
            self.peer_subs = max(0, self.peer_subs + (1 if sub else -1))
            if allowed or not sub:
                sock.setsockopt(zmq.SUBSCRIBE if sub else zmq.UNSUBSCRIBE, t)
            return
        if watch.context_of_topic(t) is None:
            # A prefix subscription may match every context: the node holds at most
            # max_watchers of them, node-wide (each counts as a watcher of every context).
            if not sub:
                self.other_subs = max(0, self.other_subs - 1)
                sock.setsockopt(zmq.UNSUBSCRIBE, t)
            elif self.other_subs >= self.max_watchers:
                self.watchers_refused += 1  # not applied; there is no context to name in a refusal
            else:
                self.other_subs += 1
                if allowed:
                    sock.setsockopt(zmq.SUBSCRIBE, t)
            return
        if not sub:
            n = self.counts.get(t)
            if n is not None:
                if n > 1:
                    self.counts[t] = n - 1
                else:
                    del self.counts[t]
                    self.last_sent.pop(t, None)
            # Whichever it was (accepted, or refused and told so), it now holds neither. Removing
            # a subscription a subscriber does not hold changes nothing.
            sock.setsockopt(zmq.UNSUBSCRIBE, t)
            sock.setsockopt(zmq.UNSUBSCRIBE, t + watch.LIMITED_SUFFIX)
            return
        n = self.counts.get(t, 0)
        if n == 0 and len(self.counts) >= self.max_topics:
            # Past --max-watch-topics: not tracked, so never published or heartbeated on.
            # (Its unsubscription, later, finds nothing to count down.)
            self.topics_refused += 1
            self._refuse(t)
            return
        # Every subscription holds a place, the refused ones too: the node cannot tell whose
        # unsubscription (or disconnect) it reads later, only that one of them left.
        self.counts[t] = n + 1
        if t not in self.last_sent:  # last in the oldest-first order, as its greeting is (or refusal)
            self.last_sent[t] = self.now()
        if n + self.other_subs >= self.max_watchers:
            self.watchers_refused += 1
            self._refuse(t)
            return
        if not allowed:
            self._refuse(t)  # (it polls with `get`, which answers FORBIDDEN)
            return
        sock.setsockopt(zmq.SUBSCRIBE, t)
        # The greeting tells the new watcher its subscription is active (the moment from
        # which live delivery is complete up to HWM drops); it goes to that watcher alone,
        # so it does not put off the topic's heartbeat to the others.
        self._greet(t)

    def _greet(self, t: bytes, limited: bool = False, under: bytes | None = None) -> None:
        """A head to the subscriber just read. Isolated like publishing: a head can need a read
        (its lamport, its root below the context's size) that finds damage on disk."""
        try:
            self._send_head(t, limited=limited, under=under, to_all=False)
        except Exception:
            self.errors += 1
            log.exception("greeting for topic %r failed", t)

    def _refuse(self, t: bytes) -> None:
        """Tell the subscriber just read (alone) that it is refused: a `limited` head under
        its refusal topic, which it alone holds (SPEC 16.5)."""
        lt = t + watch.LIMITED_SUFFIX
        self.sock.setsockopt(zmq.SUBSCRIBE, lt)
        self._greet(t, limited=True, under=lt)

    def watchers(self, context: str) -> int:
        return self.counts.get(watch.topic(context), 0)

    def watched(self, ctx: ContextState) -> bool:
        return self.other_subs > 0 or ctx.topic in self.counts

    # -- publishing ----------------------------------------------------------------

    def mark(self, ctx: ContextState) -> None:
        self.due[ctx] = None

    def publish(self) -> None:
        if not self.due:
            return
        due = self.due
        self.due = {}
        for ctx in due:
            limit = ctx.flushed_seq if self.sync else ctx.size
            if limit <= ctx.published_seq:
                if ctx.size > ctx.published_seq:
                    self.due[ctx] = None  # not on disk yet (sync): next time
                continue
            watched = self.watched(ctx)
            # the entries this node writes go to its peers too; replicated ones only to watchers
            repl = self.peer_subs > 0 and ctx.writer == self.ledger.node_id
            if not watched and not repl:
                ctx.published_seq = limit
                continue
            try:
                self._publish_context(ctx, limit, watched, repl)
            except Exception:
                # Isolate the fault to this context: skip what failed (watchers
                # refill it by seq) and keep serving everything else.
                self.errors += 1
                self.errors_by_context[ctx.name] = self.errors_by_context.get(ctx.name, 0) + 1
                log.exception("publishing entries %d..%d of %r failed; its watchers will refill them",
                              ctx.published_seq + 1, limit, ctx.name)
                ctx.published_seq = limit
            if ctx.size > ctx.published_seq:
                self.due[ctx] = None

    def _publish_context(self, ctx: ContextState, limit: int, watched: bool = True, repl: bool = False) -> None:
        start = ctx.published_seq + 1
        end = min(limit, ctx.published_seq + MAX_PUBLISH_PER_CALL)
        blobs: list[bytes] = []
        nbytes = 0
        entry_blob = self.ledger.entry_blob
        for seq in range(start, end + 1):
            b = entry_blob(ctx, seq)
            blobs.append(b)
            nbytes += len(b)
            if len(blobs) >= MAX_MSG_ENTRIES or nbytes >= MAX_MSG_BYTES:
                self._send_entries(ctx, blobs, seq, watched, repl)
                ctx.published_seq = seq
                blobs, nbytes = [], 0
        if blobs:
            self._send_entries(ctx, blobs, end, watched, repl)
        ctx.published_seq = end

    def encode_entries(self, ctx: ContextState, blobs: list[bytes]) -> bytes:
        return watch.encode_entries(ctx.name_packed, blobs)

    def _send_entries(self, ctx: ContextState, blobs: list[bytes], last: int, watched: bool = True,
                      repl: bool = False) -> None:
        if watched:
            self._send(ctx.topic, self.encode_entries(ctx, blobs))
            self.published_entries += len(blobs)
            self.published_messages += 1
        if repl:
            # with the root at its last entry, so a replica applies the entries only on top of
            # this very history (never on a tail this writer lost in a crash and rewrote)
            root = self.ledger.root_at(ctx, last)
            body = watch.encode_entries(ctx.name_packed, blobs, ack=self.wants_ack(ctx), root=root,
                                        sig=self.signer(ctx, last, root) if self.signer is not None else None)
            try:
                self.sock.send(watch.REPL_PREFIX + ctx.topic, zmq.NOBLOCK | zmq.SNDMORE)
                self.sock.send(body, zmq.NOBLOCK)
            except zmq.Again:
                self.send_drops += 1
            self.replication_entries += len(blobs)
            self.replication_messages += 1

    def _send(self, t: bytes, body: bytes, to_all: bool = True) -> None:
        try:
            self.sock.send(t, zmq.NOBLOCK | zmq.SNDMORE)
            self.sock.send(body, zmq.NOBLOCK)
        except zmq.Again:
            self.send_drops += 1  # XPUB does not block by default; only with XPUB_NODROP
        if to_all and t in self.last_sent:  # a tracked topic: its next heartbeat is due one interval from now
            self.last_sent[t] = self.now()
            self.last_sent.move_to_end(t)

    # -- heartbeats -------------------------------------------------------------------

    def _send_head(self, t: bytes, limited: bool = False, under: bytes | None = None, to_all: bool = True) -> None:
        name = watch.context_of_topic(t)
        if name is None:
            return
        ctx = self.ledger.contexts.get(name)
        if ctx is None:
            size, lamport, root = 0, 0, self.ledger.empty_root
        else:
            # A watcher must never learn of a size whose entries it cannot read yet.
            size = ctx.published_seq if self.watched(ctx) else (ctx.flushed_seq if self.sync else ctx.size)
            # all three of one prefix: in sync mode `size` may stop below the context's size, and
            # the last entry's lamport would then be that of an entry the watcher cannot read yet
            lamport, root = self.ledger.lamport_at(ctx, size), self.ledger.root_at(ctx, size)
        body = watch.encode_head(name, size, lamport, root, self.ledger.node_id, self.boot,
                                 self.heartbeat_ms, self.counts.get(t, 0), limited=limited)
        self._send(t if under is None else under, body, to_all)
        self.heartbeats += 1

    def heartbeat(self) -> None:
        """A head for every watched context that has been quiet for a heartbeat interval.

        Costs O(heads sent), not O(topics): `last_sent` is oldest first, so the walk
        stops at the first topic that is not due; at most a budget per call, the
        rest (still the oldest) next call."""
        last = self.last_sent
        if not last:
            return
        now = self.now()
        hb = self.heartbeat_s
        budget = 64 + math.ceil(len(last) * self._head_share)
        due: list[bytes] = []
        for t, sent in last.items():
            if now - sent < hb or len(due) >= budget:
                break
            due.append(t)
        for t in due:
            try:
                self._send_head(t)
            except Exception:
                self.errors += 1
                if t in last:  # not again at once
                    last[t] = now
                    last.move_to_end(t)
                log.exception("heartbeat for topic %r failed", t)

    def status(self) -> dict[str, Any]:
        top = sorted(self.counts.items(), key=lambda kv: -kv[1])[:100]
        return {
            "watchers": sum(self.counts.values()),
            "watched_contexts": len(self.counts),
            "max_watch_topics": self.max_topics,
            "watch_topics_refused": self.topics_refused,
            "max_watchers_per_context": self.max_watchers,
            "watchers_refused": self.watchers_refused,
            "wildcard_subscriptions": self.other_subs,
            "watchers_by_context": {watch.context_of_topic(t): n for t, n in top},
            "published_entries": self.published_entries,
            "published_messages": self.published_messages,
            "watch_heartbeats": self.heartbeats,
            "replication_subscribers": self.peer_subs,
            "replication_entries": self.replication_entries,
            "replication_messages": self.replication_messages,
            "publish_errors": self.errors,
            "publish_drops": self.send_drops,
            "watchers_forbidden": self.watchers_forbidden,
            "publish_errors_by_context": dict(list(self.errors_by_context.items())[:100]),
            "watch_heartbeat_ms": self.heartbeat_ms,
        }
