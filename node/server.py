"""The node's event loop: the ROUTER socket, request dispatch, group commit.

One thread owns every socket and the engine (`Ledger`). A second thread, the
flusher, only writes batches to LevelDB (plyvel releases the GIL while
LevelDB writes and fsyncs) and wakes the loop through an inproc PAIR when a
batch is on disk. At most one batch is in flight; appends that arrive
meanwhile form the next group, so in sync mode many appends share one fsync.

Replies that promise durability the node does not have yet (sync mode) are
held until the batch holding their entry is on disk.

A failed write (disk full, EIO, no file descriptors) is never retried on the
same LevelDB handle, which keeps the error. The flusher reports it; the loop
then refuses writes with STORAGE, answers the replies it held with STORAGE,
keeps serving reads (the unwritten batch stays readable in RAM), and every
so often (backoff) checks for room, reopens the handle and writes what RAM
holds. The loop thread does the reopen itself, between requests, so no read
(they run on the loop thread too) ever meets a half-open handle.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from node import __version__, clients, sockets
from node.busypoll import BusyPoll
from node.config import Config
from node.ledger import MAX_REPLY_BYTES, ContextState, Ledger
from node.mesh import ACK_LAZY_S, Mesh
from node.publisher import MAX_MSG_BYTES, Publisher
from node.storage import KV, WriteFailed
from protocol import codec
from protocol.codec import RequestId
from protocol.errors import (
    BAD_REQUEST,
    INTERNAL,
    STORAGE,
    UNAVAILABLE,
    LedgerError,
    RemoteProtocolError,
    Unavailable,
)

log = logging.getLogger(__name__)

MAX_BURST = 2_000  # requests handled before the loop looks at flushes again
BIG_REQUEST = 64 << 10  # a request this large switches the loop to receiving without a copy...
ZERO_COPY_SPAN = 1_000  # ...for this many requests (see recv_request)
OUTBOX = 64  # replies queued before they are handed to ZeroMQ together
OUTBOX_BYTES = 1 << 20  # or this many bytes of them: 64 get pages of 16 MiB must not pile up here
ASYNC_FORCE_FLUSH = 20_000  # pending keys that trigger a flush before the deadline
FORCE_FLUSH_BYTES = 2 << 20  # pending entry bytes that do the same
# Back-pressure: past either bound the node stops reading requests until the
# flusher catches up, so a writer faster than the disk cannot fill the RAM.
MAX_BUFFERED_KEYS = 200_000
PEER_OPS = frozenset(("heartbeat", "sync_heads", "ack"))  # requests only nodes send
PUSH_SLICE_S = 0.02  # longest the loop spends applying pushes (or peer replies) before it serves requests again


def max_peer_message(max_payload: int) -> int:
    """Largest message this node takes from a peer socket (MAXMSGSIZE; a larger one drops the
    connection before it is buffered). The largest legitimate ones: a pull reply (`snapshot`
    page) holds at most MAX_REPLY_BYTES of entries, or one entry when that entry alone is
    larger; a pushed entries message is cut after MAX_MSG_BYTES, so it holds less than that
    plus one entry. An entry is its payload (<= max_payload) plus at most ~300 KiB of key,
    metadata and fixed fields; 1 MiB more covers that and the message envelope."""
    return max(MAX_REPLY_BYTES, max_payload + MAX_MSG_BYTES) + (1 << 20)

SCRUB_EVERY_S = 0.025
SCRUB_SLICE = 50  # entries per slice: at most 2,000 entries a second, ~0.2 ms of the loop per slice

class Flusher(threading.Thread):
    """Writes handed-off batches; reports each one done through `done` + a wake-up.

    `done` holds (dirty, error): error is None when the batch is on disk, else why
    the write failed. A failed batch is not retried here: the handle that failed
    keeps failing (LevelDB's sticky error), and the loop owns the recovery."""

    def __init__(self, kv: KV, wake: zmq.Socket[Any], sync: bool) -> None:
        super().__init__(name="ledger-flusher", daemon=True)
        self.kv = kv
        self.sync = sync
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.done: collections.deque[Any] = collections.deque()
        self._wake = wake
        self.batches = 0  # storage writes done (each one fsync in sync mode)
        self.keys = 0

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                break
            commit, nkeys, dirty = job
            error: str | None = None
            try:
                commit()
                self.batches += 1
                self.keys += nkeys
            except WriteFailed as exc:
                error = str(exc)
            except Exception as exc:  # not a storage error we know: still never retried blindly
                log.exception("writing %d keys to storage failed", nkeys)
                error = f"{type(exc).__name__}: {exc}"
            self.done.append((dirty, error))
            try:
                self._wake.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the loop polls `done` on a timer too
        self._wake.close(linger=0)


class Server:
    def __init__(self, config: Config, ledger: Ledger, zctx: zmq.Context[Any] | None = None) -> None:
        self.config = config
        self.ledger = ledger
        self.zctx = zctx or zmq.Context.instance()
        self.started = time.monotonic()
        self.stopping = False
        self.router, self.port = sockets.router(self.zctx, config.host, config.port, config.max_request)
        try:
            self.pub, self.pub_port = sockets.xpub(
                self.zctx, config.host, 0 if config.pub_port is None else config.pub_port, config.watch_queue
            )
        except Exception:
            self.router.close(linger=0)
            raise
        self.replies = clients.ReplyBudget(config.max_client_queue)
        self.junk = clients.JunkGate()
        max_clients = config.max_clients
        if max_clients is None:
            max_clients = min(clients.DEFAULT_MAX_CLIENTS, max(clients.MIN_CLIENTS, clients.clients_allowed(
                clients.raise_fd_limit())))
        self.connections = clients.ConnectionLimit(
            {"router": (self.router, self.port), "watch": (self.pub, self.pub_port)}, max_clients)
        self.publisher = Publisher(self.pub, ledger, sync=config.sync, heartbeat_ms=config.watch_heartbeat_ms,
                                   wants_ack=lambda ctx: any(h[0] is ctx for h in self.repl_held),
                                   max_topics=config.max_watch_topics,
                                   max_watchers=config.max_watchers_per_context)
        self.poller = zmq.Poller()
        self.peer_socks: dict[str, zmq.Socket[Any]] = {}
        self.peer_addr: dict[zmq.Socket[Any], str] = {}
        self._peer_rid = 1
        self._peer_turn = 0
        self.peer_max_msg = max_peer_message(config.max_payload)
        self.peer_sub = sockets.peer_sub(self.zctx, self.peer_max_msg)
        self._sub_addresses: set[str] = set()  # the peers' PUB addresses it is connected to
        self._sub_stale = False  # a peer's PUB was dropped: make the socket anew (unsubscribe)
        self.sub_renewals = 0
        self._forgotten: list[zmq.Socket[Any]] = []  # sockets of forgotten peers, closed between loop turns
        advertise = config.advertise or f"{_fmt_host(config.host)}:{self.port}"
        self.mesh = Mesh(
            ledger, self, address=advertise, pub=f"{advertise.rpartition(':')[0]}:{self.pub_port}",
            seeds=list(config.peers), heartbeat_s=config.heartbeat_ms / 1000.0,
            suspect_after=config.suspect_after, dead_after=config.dead_after, boot=self.publisher.boot,
            cluster=config.cluster, on_applied=self.publisher.mark, ack_durable=config.sync,
            max_peers=config.max_peers,
        )
        self.mesh.on_ack = self._check_replicated
        # appends waiting for replicas=N: (ctx, seq, n, reply frames head, reply fields, raw, deadline)
        self.repl_held: list[tuple[ContextState, int, int, list[bytes], RequestId, dict[str, Any],
                                   dict[str, Any], float]] = []
        self._ident: list[bytes] = []
        self._wake_rx, wake_tx = sockets.wake_pair(self.zctx, f"flush-{id(self)}")
        self.flusher = Flusher(ledger.kv, wake_tx, config.sync)
        self.flushing = False
        self.pending_since: float | None = None
        self.flush_delay = config.flush_ms / 2000.0
        # sync-mode replies waiting for their entry to be on disk: (ctx, seq, reply frames, request id)
        self.held: list[tuple[ContextState, int, list[bytes], RequestId]] = []
        self.handlers: dict[str, Callable[[Any], bytes | tuple[ContextState, int, bytes] | None]] = {
            "append": self.rpc_append,
            "append_batch": self.rpc_append_batch,
            "get": self.rpc_get,
            "head": self.rpc_head,
            "contexts": self.rpc_contexts,
            "status": self.rpc_status,
            "ping": self.rpc_ping,
            "snapshot": self.rpc_snapshot,
            "load": self.rpc_load,
            "proof": self.rpc_proof,
            "consistency": self.rpc_consistency,
            "heartbeat": self.rpc_heartbeat,
            "sync_heads": self.rpc_sync_heads,
            "ack": self.rpc_ack,
        }
        self._outbox: list[list[bytes]] = []
        self._outbox_bytes = 0
        self.backpressure_waits = 0
        self._rid: RequestId = None
        self.busy = BusyPoll(config.busy_poll_us)

    # -- addresses ---------------------------------------------------------------

    @property
    def router_address(self) -> str:
        return f"tcp://{_fmt_host(self.config.host)}:{self.port}"

    @property
    def pub_address(self) -> str:
        return f"tcp://{_fmt_host(self.config.host)}:{self.pub_port}"

    # -- the loop ----------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        self.stopping = True

    def run(self, ready: Callable[[], None] | None = None) -> None:
        self.flusher.start()
        poller = self.poller
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        poller.register(self.pub, zmq.POLLIN)
        poller.register(self.peer_sub, zmq.POLLIN)
        for mon in self.connections.monitors:
            poller.register(mon, zmq.POLLIN)
        mesh = self.mesh
        router = self.router
        handle = self.handle
        publisher = self.publisher
        last_housekeeping = last_heartbeat = last_scrub = time.monotonic()
        heartbeat_check = min(0.1, publisher.heartbeat_s / 4)
        busy = self.busy
        clock = time.perf_counter
        zero_copy = 0  # requests still to receive without a copy, after a big one
        if ready is not None:
            ready()
        try:
            while not self.stopping:
                if self._backlogged():
                    self._wait_for_flush()
                    continue
                timeout = self._poll_timeout()
                events = None
                # No spin while a write is in flight (the flusher thread needs the GIL), and
                # none past the next deadline (a flush, a lazy ack): those run after the poll.
                if timeout and not self.flushing and busy.should_spin(clock()):
                    events = self._spin(poller, clock() + timeout / 1000.0)
                    if events is None:
                        timeout = self._poll_timeout()
                if events is None:
                    events = dict(poller.poll(timeout))
                    if router in events:
                        busy.arrived(clock())
                if router in events:
                    ledger = self.ledger
                    for i in range(1, MAX_BURST + 1):
                        try:
                            if zero_copy:
                                zero_copy -= 1
                                frames = recv_request(router)
                            else:
                                frames = recv_frames(router)
                        except zmq.Again:
                            break
                        if len(frames[-1]) >= BIG_REQUEST:
                            zero_copy = ZERO_COPY_SPAN  # (see recv_request)
                        handle(frames)
                        if i == 1 and self._outbox:
                            # The first request of a burst is answered at once: a lone
                            # request (a client with one in flight) loses no time, and the
                            # rest of a pipelined burst still goes out in groups. (Asking
                            # the socket whether more is waiting costs more than this.)
                            self._flush_outbox()
                        if not i & 63 or ledger.pending_bytes >= FORCE_FLUSH_BYTES:
                            self._flush_outbox()
                            if not i & 255:
                                # fewer, larger messages: each one costs a write per watcher
                                publisher.publish()
                            # A long burst (a pipelined writer never lets the socket
                            # run dry) must not hold writes past their deadline, nor
                            # let a few big batches run past the write buffer.
                            self._collect_done()
                            self._maybe_handoff()
                            if self._backlogged():
                                break
                    self._flush_outbox()
                    publisher.publish()
                    busy.served(clock())
                if self._wake_rx in events:
                    self._drain_wake()
                if self.pub in events:
                    publisher.on_subscriptions()
                if len(events) > 1 or router not in events:
                    for mon in self.connections.monitors:
                        if mon in events:
                            self.connections.on_events(mon)
                    self._peer_events(events)
                self._collect_done()
                self._maybe_handoff()
                if self._sub_stale:
                    self._renew_sub()
                now = time.monotonic()
                try:
                    mesh.tick(now)  # (each peer's part is isolated inside; this is the last guard)
                    mesh.flush_acks(now)
                except Exception as exc:
                    mesh.peer_error("(several)", "the mesh tick failed", exc)
                if self._forgotten:
                    self._close_forgotten()
                if self.repl_held:
                    self._check_replicated()
                if now - last_heartbeat >= heartbeat_check:
                    last_heartbeat = now
                    publisher.heartbeat()
                if now - last_scrub >= SCRUB_EVERY_S:
                    # entries on disk checked against their leaf hashes in the background, a
                    # slice at a time (a fraction of a millisecond), so damage nobody reads is found
                    last_scrub = now
                    self.ledger.scrub(SCRUB_SLICE)
                if now - last_housekeeping > 1.0:
                    last_housekeeping = now
                    self.ledger.expire_loads()
                    self.replies.sweep()
                    self.junk.sweep()
                if self.ledger.storage.due(now) and not self.flushing:
                    self._recover(now)
        finally:
            self._shutdown()

    def _spin(self, poller: zmq.Poller, deadline: float) -> dict[Any, int] | None:
        """Poll without sleeping until an event, the end of the busy-poll window or `deadline`."""
        busy = self.busy
        clock = time.perf_counter
        router = self.router
        events = zmq.EVENTS
        end = min(busy.until, deadline)
        started = now = clock()
        turn = 0
        while now < end:
            # the request socket is asked alone (2 us); every socket every 8th turn (6 us)
            turn += 1
            if router.getsockopt(events) & zmq.POLLIN or not turn & 7:  # type: ignore[arg-type, operator]
                got = poller.poll(0)
                if got:
                    found = dict(got)
                    # only a request is a hit; another event (a finished write, a peer)
                    # ends this spin without a verdict, and the window stays open
                    busy.spun(started, clock(), hit=True if router in found else None)
                    return found
            os.sched_yield()  # a thread waiting for this core (the client's, say) runs first
            now = clock()
        # the window ran out (a miss), or a deadline came first (no verdict)
        busy.spun(started, now, hit=False if now >= busy.until else None)
        return None

    # -- peers (the mesh's transport) ---------------------------------------------------

    def request(self, address: str, op: str, fields: dict[str, Any]) -> int | None:
        s = self.peer_socks.get(address)
        if s is None:
            try:
                s = sockets.peer_dealer(self.zctx, address, self.peer_max_msg)
            except zmq.ZMQError as exc:
                # EMFILE (ZeroMQ's MAX_SOCKETS or the fd limit), EINVAL (an endpoint ZeroMQ
                # refuses): nothing is sent to this peer now; the mesh retries on its next beat
                self.mesh.peer_error(address, f"no socket for {op}", exc, expected=True)
                return None
            self.peer_socks[address] = s
            self.peer_addr[s] = address
            self.poller.register(s, zmq.POLLIN)
        rid = self._peer_rid
        self._peer_rid += 1
        frame = codec.encode_request(op, rid, fields)
        if op == "heartbeat":
            self.mesh.stats.heartbeat_bytes = len(frame)
        try:
            s.send(frame, zmq.NOBLOCK)
        except zmq.ZMQError:
            return None  # not connected, or its queue is full: dropped, never queued
        return rid

    def subscribe(self, pub_address: str) -> None:
        self._sub_addresses.add(pub_address)
        try:
            self.peer_sub.connect(f"tcp://{pub_address}")
        except zmq.ZMQError as exc:
            self.mesh.peer_error(pub_address, "subscribing to its PUB failed", exc, expected=True)

    def forget(self, address: str) -> None:
        s = self.peer_socks.pop(address, None)
        if s is not None:
            # closed after this loop turn: _peer_events may be reading it right now
            del self.peer_addr[s]
            self._forgotten.append(s)

    def _close_forgotten(self) -> None:
        for s in self._forgotten:
            self.poller.unregister(s)
            s.close(linger=0)
        self._forgotten = []

    def unsubscribe(self, pub_address: str) -> None:
        # Not zmq_disconnect: libzmq (4.3.5) may process the end of that pipe between two
        # frames of a message it is handing out, and aborts ("Assertion failed: !_more
        # (src/fq.cpp:80)", seen in a chaos run when a peer restarted). The SUB socket is
        # made anew instead, at the start of the next loop turn; pushes in flight from the
        # other peers are lost with it, and their gaps are pulled (17.3).
        if pub_address in self._sub_addresses:
            self._sub_addresses.discard(pub_address)
            self._sub_stale = True

    def _renew_sub(self) -> None:
        self._sub_stale = False
        old = self.peer_sub
        self.poller.unregister(old)
        old.close(linger=0)
        self.peer_sub = sockets.peer_sub(self.zctx, self.peer_max_msg)
        self.poller.register(self.peer_sub, zmq.POLLIN)
        self.sub_renewals += 1
        for a in sorted(self._sub_addresses):
            try:
                self.peer_sub.connect(f"tcp://{a}")
            except zmq.ZMQError as exc:
                self.mesh.peer_error(a, "subscribing to its PUB failed", exc, expected=True)

    def _peer_events(self, events: dict[Any, int]) -> None:
        now = time.monotonic()
        if self.peer_sub in events:
            sub = self.peer_sub
            # Bounded in time: a flood of pushes (a peer's bulk load) must not keep the
            # loop from answering requests and heartbeats; the rest waits in the socket.
            deadline = now + PUSH_SLICE_S
            for _ in range(1000):
                if time.monotonic() > deadline:
                    break
                try:
                    frames = sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    self.mesh.on_push(frames)
                except Exception as exc:
                    self.mesh.peer_error("(push stream)", "applying a pushed message failed; repair will fetch it", exc)
        # Replies too (a pull chunk takes ~10 ms to apply, and with chunks asked for ahead
        # the next one is already waiting): requests get served between them. The peer read
        # first changes every turn, so a peer streaming chunks does not starve the others.
        deadline = time.monotonic() + PUSH_SLICE_S
        socks = list(self.peer_addr.items())
        if socks:
            self._peer_turn = (self._peer_turn + 1) % len(socks)
            socks = socks[self._peer_turn:] + socks[:self._peer_turn]
        for s, address in socks:
            if s not in events or s.closed:
                continue
            for _ in range(100):
                if time.monotonic() > deadline:
                    break
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    reply = codec.decode_reply(frames[-1])
                except RemoteProtocolError:
                    continue
                try:
                    self.mesh.on_reply(address, reply, now, len(frames[-1]))
                except Exception as exc:
                    self.mesh.peer_error(address, "handling its reply failed", exc)
                if self.peer_socks.get(address) is not s:
                    break  # forgotten while handling it (closed after this turn)

    def _hold_for_replicas(self, ctx: ContextState, seq: int, n: int, fields: dict[str, Any],
                           raw: dict[str, Any]) -> None:
        deadline = time.monotonic() + self.config.replica_timeout_ms / 1000.0
        self.repl_held.append((ctx, seq, n, self._ident, self._rid, fields, raw, deadline))
        self._check_replicated()

    def _check_replicated(self) -> None:
        """Answer the appends whose entries are now held by enough other nodes (or timed out)."""
        if not self.repl_held:
            return
        now = time.monotonic()
        keep = []
        for item in self.repl_held:
            ctx, seq, n, head, rid, fields, raw, deadline = item
            count = self.mesh.replicated(ctx, seq)
            if count >= n and (not self.config.sync or self.ledger.durable(ctx, seq)):
                self._send([*head, codec.encode_reply(rid, {**fields, "replicated": count}, raw)])
            elif now > deadline:
                self._send([*head, codec.encode_error(
                    rid, UNAVAILABLE,
                    f"{ctx.name!r}#{seq} was appended, but {count} other node(s) held it within "
                    f"{self.config.replica_timeout_ms} ms, not the {n} required (the entry stays)",
                    {"context": ctx.name, "seq": seq, "replicated": count, "required": n},
                )])
            else:
                keep.append(item)
        self.repl_held = keep
        self._flush_outbox()

    def _backlogged(self) -> bool:
        if self.ledger.storage.error is not None:
            return False  # no flush is coming, and writes are refused meanwhile: serve the reads
        keys, nbytes = self.ledger.buffered()
        return keys >= MAX_BUFFERED_KEYS or nbytes >= self.config.write_buffer

    def _wait_for_flush(self) -> None:
        self.backpressure_waits += 1
        if self._wake_rx.poll(100):
            self._drain_wake()
        self._collect_done()
        self._maybe_handoff(force=True)

    def _poll_timeout(self) -> int:
        # wake often enough to notice a stop signal, and in time for due acks and flushes
        limit = int(ACK_LAZY_S * 1000) + 1 if self.mesh.ack_due else 100
        if self.pending_since is not None and not self.flushing:
            left = self.pending_since + self.flush_delay - time.monotonic()
            # due now: no sleep (int() rounds -0.5 ms up to 0, and + 1 made it a 1 ms poll)
            return 0 if left <= 0 else min(limit, int(left * 1000) + 1)
        return limit

    def _drain_wake(self) -> None:
        while True:
            try:
                self._wake_rx.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _collect_done(self) -> None:
        done = self.flusher.done
        while done:
            dirty, error = done.popleft()
            self.flushing = False
            if error is not None:
                self.ledger.write_failed(error)
                self._refuse_held()
                continue
            self.ledger.mark_flushed(dirty)
            self.mesh.on_flushed(dirty)
        if self.held and not self.flushing:
            self._release_held()
        if self.ledger.storage.error is not None and not self.flushing and (self.held or self.repl_held):
            # a write on the loop thread failed (a lamport reservation, a load): what the
            # held replies wait for is not written before the recovery
            self._refuse_held()
        if self.publisher.due:
            self.publisher.publish()

    def _storage_reply(self, rid: RequestId, ctx: ContextState, seq: int) -> bytes:
        return codec.encode_error(
            rid, STORAGE,
            f"{ctx.name!r}#{seq} was appended in memory but storage failed before it reached disk "
            f"({self.ledger.storage.error}); not acknowledged. It is written if the disk recovers: "
            "retry later with the same dedup_id (without one a retry may append it twice)",
            {"context": ctx.name, "seq": seq, "error": self.ledger.storage.error},
        )

    def _refuse_held(self) -> None:
        """Storage failed: every reply held for durability it cannot get now gets STORAGE."""
        for ctx, seq, frames, rid in self.held:
            if self.ledger.durable(ctx, seq):
                self._send(frames)
            else:
                self._send([*frames[:-1], self._storage_reply(rid, ctx, seq)])
        self.held = []
        repl = []
        for item in self.repl_held:
            ctx, seq, _n, head, rid, _fields, _raw, _deadline = item
            if self.ledger.durable(ctx, seq):
                repl.append(item)
            else:
                self._send([*head, self._storage_reply(rid, ctx, seq)])
        self.repl_held = repl
        self._flush_outbox()

    def _recover(self, now: float) -> None:
        dirty = self.ledger.recover(self.config.sync, now)
        if dirty is not None:
            self.mesh.on_flushed(dirty)
            for ctx in dirty:
                self.publisher.mark(ctx)
            self._release_held()
            self._check_replicated()

    def _release_held(self) -> None:
        keep = []
        for ctx, seq, frames, rid in self.held:
            if self.ledger.durable(ctx, seq):
                self._send(frames)
            else:
                keep.append((ctx, seq, frames, rid))
        if len(keep) < len(self.held):
            # the replies went out now (sync mode): the clients' next requests come after them
            self.busy.served(time.perf_counter())
        self.held = keep
        self._flush_outbox()

    def _maybe_handoff(self, force: bool = False) -> None:
        ledger = self.ledger
        if ledger.storage.error is not None:
            return  # the kept batch and the rest are written by the recovery
        if self.flushing or not ledger.pending:
            if not ledger.pending:
                self.pending_since = None
            return
        if self.pending_since is None:
            self.pending_since = time.monotonic()
        due = (
            force
            or self.config.sync
            or len(ledger.pending) >= ASYNC_FORCE_FLUSH
            or ledger.pending_bytes >= FORCE_FLUSH_BYTES
            or time.monotonic() - self.pending_since >= self.flush_delay
        )
        if not due:
            return
        batch, dirty = ledger.take_pending()
        commit = ledger.with_marks(ledger.kv.prepare(batch.items(), sync=self.config.sync), dirty, self.config.sync)
        self.pending_since = None
        self.flushing = True
        self.flusher.jobs.put((commit, len(batch), dirty))

    def _shutdown(self) -> None:
        log.info("stopping: flushing pending writes")
        # Stop taking requests, finish the write in flight, write the rest synchronously.
        deadline = time.monotonic() + 30
        while self.flushing and time.monotonic() < deadline:
            if self.flusher.done:
                self._collect_done()
            else:
                time.sleep(0.001)
        self.flusher.jobs.put(None)
        self.flusher.join(timeout=30)
        self._collect_done()
        self._final_write()
        self._release_held()
        if self.held:
            self._refuse_held()
        for s in (self.router, self.pub, self._wake_rx):
            s.close(linger=sockets.LINGER_MS)
        for s in [self.peer_sub, *self.peer_socks.values(), *self._forgotten]:
            s.close(linger=0)
        self.connections.close()

    def _final_write(self) -> None:
        """Write what RAM holds before the process exits; with storage failed, try once more."""
        ledger = self.ledger
        lost = ledger.unwritten()
        if not lost and not ledger.pending:
            return
        try:
            if ledger.storage.error is not None:
                log.warning("storage failed (%s): trying once more to write %d entries held in RAM before exiting",
                            ledger.storage.error, sum(b - a + 1 for _n, a, b in lost))
                ledger.kv.reopen()
            ledger.flush_sync(sync=True)
            if ledger.storage.error is not None:
                log.warning("the last write succeeded: nothing was lost")
        except (WriteFailed, LedgerError) as exc:
            total = sum(b - a + 1 for _n, a, b in lost)
            # in sync mode an entry not on disk was never acknowledged (its reply was STORAGE)
            what = "UNACKNOWLEDGED (sync mode) ENTRIES" if self.config.sync else "ACKNOWLEDGED ENTRIES"
            log.error(
                "LOST %d %s: they could not be written before exit (%s): %s", total, what, exc,
                "; ".join(f"{name!r}#{a}..{b}" for name, a, b in lost[:50]) + (" ..." if len(lost) > 50 else ""),
            )

    # -- requests ------------------------------------------------------------------

    def _send(self, frames: list[bytes]) -> None:
        # Replies go out in groups at the end of a burst (or every OUTBOX
        # replies): ZeroMQ's I/O thread then drains many in one wake-up and one
        # TCP write instead of one each, which is worth ~40% of pipelined
        # throughput. A lone request's burst is itself, so its latency is unchanged.
        # (Bytes are counted only by the handlers that can answer with a page of entries,
        # `_page`: a test per reply here cost ~3% of a pipelined append.)
        out = self._outbox
        out.append(frames)
        if len(out) >= OUTBOX:
            self._flush_outbox()

    def _flush_outbox(self) -> None:
        out = self._outbox
        if not out:
            return
        self._outbox = []
        self._outbox_bytes = 0
        send = self.router.send
        more = zmq.NOBLOCK | zmq.SNDMORE
        replies = self.replies
        track_min = sockets.TRACK_MIN
        drop, plain, track = clients.DROP, clients.SEND, clients.TRACK
        cut = replies.cut
        for frames in out:
            body = frames[-1]
            big = len(body) >= track_min
            if not big and not cut:
                # the common reply: small, nobody cut off, no budget to ask
                try:
                    for f in frames[:-1]:
                        send(f, more)
                    send(body, zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.EAGAIN:
                        replies.refused(frames[0])
                    log.debug("reply dropped: %s", exc)
                continue
            # a counted reply, or any reply while some client is cut off, asks the budget
            how = replies.admit(frames[0], len(body)) if big or replies.cut else plain
            if how == drop:
                continue
            try:
                # frame by frame: cheaper than send_multipart's generic path
                for f in frames[:-1]:
                    send(f, more)
                if how == track:
                    replies.sent(frames[0], len(body), send(body, zmq.NOBLOCK, copy=False, track=True))
                else:
                    send(body, zmq.NOBLOCK)
                    if big:
                        replies.sent(frames[0], len(body), None)
            except zmq.ZMQError as exc:
                # EHOSTUNREACH: the client is gone; EAGAIN: its reply queue is full, it
                # does not read, and is cut off. Its request was served; the client
                # retries (safely, with dedup_id).
                if exc.errno == zmq.EAGAIN:
                    replies.refused(frames[0])
                log.debug("reply dropped: %s", exc)

    def handle(self, frames: list[bytes]) -> None:
        try:
            self._handle(frames)
        except Exception:  # never let one request take the node down
            log.exception("unexpected failure while answering a request; dropped it")

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return  # nothing after the identity: nobody to answer
        ident = frames[0]
        if self.replies.cut and ident in self.replies.cut and self.replies.drop_request(ident):
            return  # a client cut off for not reading its replies (node/clients.py)
        envelope = frames[1:-1]
        self._ident = [ident, *envelope]
        if envelope and (len(envelope) > 1 or envelope[0] != b""):
            self._send([ident, codec.encode_error(
                None, BAD_REQUEST,
                "a request is one frame (optionally after one empty delimiter frame); "
                f"got {len(frames) - 1} frames")])
            return
        rid: RequestId = None
        m = None
        body = frames[-1]
        big = len(body) >= BIG_REQUEST
        if big and self.junk.until and self.junk.holds(ident):
            self._send([ident, *envelope, codec.encode_error(
                None, BAD_REQUEST, f"refused unread: a request of {BIG_REQUEST} bytes or more from this connection "
                f"could not be decoded less than {clients.JUNK_HOLD_S:g} s ago")])
            return
        try:
            m = codec.unpack_request(body)
            env = codec.parse_request(m, self.ledger.max_payload)
            self._rid = rid = env.id
            out = self.handlers[env.op](env.request)
        except RemoteProtocolError as exc:
            if m is None and big:
                self.junk.junk(ident)  # (see clients.JunkGate)
            if rid is None:
                rid = codec.peek_id(m)
            out = codec.encode_error(rid, exc.code, exc.message, exc.details)
            if isinstance(m, dict):
                op = m.get("op")
                if isinstance(op, str) and op in PEER_OPS:  # (any hashable check of junk is a crash)
                    sender = m.get("address")
                    self.mesh.refuse(sender if isinstance(sender, str) else "a peer", f"a {op} ({exc.message})")
        except LedgerError as exc:
            out = codec.encode_error(rid, exc.code, exc.message, exc.details)
        except Exception as exc:  # a bug: report it, keep serving
            log.exception("internal error while serving a request")
            out = codec.encode_error(rid, INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        if out is None:
            return
        if isinstance(out, tuple):
            ctx, seq, body = out
            reply = [ident, *envelope, body]
            if self.ledger.durable(ctx, seq):
                self._send(reply)
            else:
                self.held.append((ctx, seq, reply, rid))
            return
        self._send([ident, *envelope, out])

    def _needs_durable(self, ctx: ContextState, seq: int, body: bytes) -> bytes | tuple[ContextState, int, bytes]:
        if self.config.sync and not self.ledger.durable(ctx, seq):
            return (ctx, seq, body)
        return body

    def _check_writer(self, name: str) -> None:
        ctx = self.ledger.contexts.get(name)
        if ctx is not None and ctx.writer != self.ledger.node_id:
            self.mesh.check_writer(ctx)

    def _check_replicas(self, n: int | None) -> None:
        if n:
            live = self.mesh.live_peers()
            if n > live:
                raise Unavailable(
                    f"replicas={n} asked, but this node knows only {live} other node(s) alive; nothing was appended",
                    {"required": n, "alive": live},
                )

    def rpc_append(self, req: codec.Append) -> bytes | tuple[ContextState, int, bytes] | None:
        ctx = self.ledger.contexts.get(req.context)
        if ctx is not None and ctx.writer != self.ledger.node_id:
            self.mesh.check_writer(ctx)
        if req.replicas:
            self._check_replicas(req.replicas)
        res = self.ledger.append(req)
        self.publisher.due[res.ctx] = None
        fields = {"deduplicated": True} if res.deduplicated else {}
        if req.replicas:
            self._hold_for_replicas(res.ctx, res.last_seq, req.replicas, fields, {"entry": res.blobs[0]})
            return None
        body = (codec.encode_reply(self._rid, fields, {"entry": res.blobs[0]}) if fields
                else codec.encode_entry_reply(self._rid, res.blobs[0]))
        return self._needs_durable(res.ctx, res.last_seq, body)

    def rpc_append_batch(self, req: codec.AppendBatch) -> bytes | tuple[ContextState, int, bytes] | None:
        self._check_writer(req.context)
        self._check_replicas(req.replicas)
        res = self.ledger.append_batch(req)
        self.publisher.due[res.ctx] = None
        fields: dict[str, Any] = {"first_seq": res.last_seq - len(res.blobs) + 1, "last_seq": res.last_seq}
        if res.deduplicated:
            fields["deduplicated"] = True
        if req.replicas:
            self._hold_for_replicas(res.ctx, res.last_seq, req.replicas, fields, {"entries": res.blobs})
            return None
        return self._needs_durable(res.ctx, res.last_seq, codec.encode_reply(self._rid, fields, {"entries": res.blobs}))

    def _page(self, body: bytes) -> bytes:
        """A reply that may be a large page: 64 of 16 MiB must not pile up in the outbox, so
        what is queued goes out first once it holds OUTBOX_BYTES."""
        n = len(body)
        if n >= sockets.TRACK_MIN:
            if self._outbox_bytes + n >= OUTBOX_BYTES:
                self._flush_outbox()
            self._outbox_bytes += n
        return body

    def rpc_get(self, req: codec.Get) -> bytes:
        blobs, last_seq, more, next_after = self.ledger.get(req)
        return self._page(codec.encode_get_reply(self._rid, last_seq, more, next_after, blobs))

    def rpc_head(self, req: codec.Head) -> bytes:
        fields = self.ledger.head(req.context)
        fields["watchers"] = self.publisher.watchers(req.context)
        fork = self.mesh.forks.get(req.context)
        if fork is not None:
            fields["fork"] = vars(fork)
        return codec.encode_reply(self._rid, fields)

    def rpc_heartbeat(self, req: codec.Heartbeat) -> bytes:
        return codec.encode_reply(self._rid, self.mesh.rpc_heartbeat(req, time.monotonic()))

    def rpc_ack(self, req: codec.Ack) -> bytes:
        return codec.encode_reply(self._rid, self.mesh.rpc_ack(req, time.monotonic()))

    def rpc_sync_heads(self, req: codec.SyncHeads) -> bytes:
        return codec.encode_reply(self._rid, self.mesh.rpc_sync_heads(req))

    def rpc_contexts(self, req: codec.Contexts) -> bytes:
        items, more = self.ledger.list_contexts(req.after, req.limit)
        fields: dict[str, Any] = {"contexts": items, "more": more}
        if items:
            fields["next_after"] = items[-1]["name"]
        return codec.encode_reply(self._rid, fields)

    def rpc_status(self, req: codec.Status) -> bytes:
        fields = self.ledger.status()
        fields.update({
            "version": __version__,
            "protocol": codec.PROTOCOL_VERSION,
            "router": self.router_address,
            "pub": self.pub_address,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "durability": self.config.durability,
            "write_batches": self.flusher.batches,
            "peer_sub_renewals": self.sub_renewals,
            "backpressure_waits": self.backpressure_waits,
            "written_keys": self.flusher.keys,
            "flush_ms": self.config.flush_ms,
            "max_payload": self.config.max_payload,
            "max_request": self.config.max_request,
            "max_peer_message": self.peer_max_msg,
            "data": self.config.data,
            "storage": self.ledger.storage.status(time.monotonic()),
        })
        fields.update(self.replies.status())
        fields.update(self.junk.status())
        fields.update(self.connections.status())
        fields.update(self.busy.status())
        fields.update(self.publisher.status())
        fields.update(self.mesh.status(time.monotonic()))
        fields["advertise"] = self.mesh.address
        fields["cluster"] = self.mesh.cluster
        return codec.encode_reply(self._rid, fields)

    def rpc_ping(self, req: codec.Ping) -> bytes:
        return codec.encode_reply(self._rid, {"node_id": self.ledger.node_id})

    def rpc_snapshot(self, req: codec.Snapshot) -> bytes:
        fields, blobs = self.ledger.snapshot_page(req)
        return self._page(codec.encode_reply(self._rid, fields, {"entries": blobs}))

    def rpc_load(self, req: codec.Load) -> bytes:
        if not req.abort:
            self._check_writer(req.context)
        head = self.ledger.load(req, sync=self.config.sync)
        if head is not None and head.get("aborted"):
            return codec.encode_reply(self._rid, {"done": True, "aborted": True})
        if head is None:
            return codec.encode_reply(self._rid, {"done": False, "received": len(req.entries)})
        ctx = self.ledger.contexts.get(req.context)
        if ctx is not None:
            self.publisher.mark(ctx)
        head["done"] = True
        return codec.encode_reply(self._rid, head)

    def rpc_proof(self, req: codec.Proof) -> bytes:
        return codec.encode_reply(self._rid, self.ledger.proof(req))

    def rpc_consistency(self, req: codec.Consistency) -> bytes:
        return codec.encode_reply(self._rid, self.ledger.consistency(req))


_NOBLOCK, _RCVMORE = int(zmq.NOBLOCK), int(zmq.RCVMORE)  # plain ints: pyzmq's enums cost ~0.1 us a use


def recv_frames(sock: zmq.Socket[Any]) -> list[bytes]:
    """`sock.recv_multipart(zmq.NOBLOCK)` without pyzmq's enum conversion of RCVMORE on every
    frame: 1.55 against 1.85 us per two-frame request here (~1.5% of a pipelined append)."""
    recv = sock.recv
    frames: list[bytes] = [recv(_NOBLOCK)]
    more = sock.getsockopt
    while more(_RCVMORE):
        frames.append(recv(_NOBLOCK))
    return frames


def recv_request(router: zmq.Socket[Any]) -> list[Any]:
    """One request's frames from the ROUTER without copying the request (zmq.Again when none is waiting).

    The identity and any envelope frames come as bytes; the request itself as the zmq.Frame
    ZeroMQ received: msgpack decodes from its buffer, and junk is refused at its first byte
    (codec.unpack_request). Copied, a 16 MiB junk frame cost the node ~6 ms (this copy and
    msgpack's), and a client sending such frames without waiting for answers queued them faster
    than the node dismissed them (docs/benchmarks.md, "Floods"). But a Frame costs ~0.5 us more
    than a copy of a small request, so the loop receives this way only for ZERO_COPY_SPAN
    requests after one of BIG_REQUEST bytes or more: small requests alone never pay for it."""
    recv = router.recv
    frames: list[Any] = [recv(_NOBLOCK)]
    more = router.getsockopt
    while more(_RCVMORE):
        frames.append(recv(_NOBLOCK, False))
    for i in range(1, len(frames) - 1):
        frames[i] = frames[i].bytes
    return frames


def _fmt_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
