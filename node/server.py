"""The node's I/O: the sockets, the event loop, the flusher thread. Decisions are the core's.

`Server` polls its sockets, turns what arrives into the core's events (node/core.py),
and performs the core's actions: it sends the replies the core queued, hands the
core's write batches to the flusher, and publishes (node/publisher.py). Peer sockets
live in node/peers.py, storage in node/storage.py.

One thread owns every socket and the engine (`Ledger`). A second thread, the
flusher, only writes batches to LevelDB (plyvel releases the GIL while
LevelDB writes and fsyncs) and wakes the loop through an inproc PAIR when a
batch is on disk. At most one batch is in flight; appends that arrive
meanwhile form the next group, so in sync mode many appends share one fsync.

Replies that promise durability the node does not have yet (sync mode) wait in
the core (`Core.for_disk`) until the batch holding their entry is on disk.

A failed write (disk full, EIO, no file descriptors) is never retried on the
same LevelDB handle, which keeps the error. The flusher reports it; the loop
then refuses writes with STORAGE, answers the replies waiting for disk with STORAGE,
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

from node import clients, metrics, reqlog, sockets
from node.access import Access, AccessError, Principal, load_access, may_watch
from node.busypoll import BusyPoll
from node.config import Config
from node.core import FORCE_FLUSH_BYTES, Core, WriteBatch, max_peer_message
from node.ledger import Ledger
from node.mesh import Mesh
from node.peers import Peers
from node.publisher import Publisher
from node.storage import KV, WriteFailed
from node.zap import Zap
from protocol import codec, watch
from protocol.errors import BAD_REQUEST, LedgerError
from protocol.heads import head_bytes
from protocol.keys import Identity, curve_public

log = logging.getLogger(__name__)

MAX_BURST = 2_000  # requests handled before the loop looks at flushes again
BIG_REQUEST = 64 << 10  # a request this large switches the loop to receiving without a copy...
ZERO_COPY_SPAN = 1_000  # ...for this many requests (see recv_request)
OUTBOX = 64  # replies queued before they are handed to ZeroMQ together
OUTBOX_BYTES = 1 << 20  # or this many bytes of pages: 64 get pages of 16 MiB must not pile up here


class Flusher(threading.Thread):
    """Writes handed-off batches; reports each one done through `done` + a wake-up.

    `done` holds (dirty, error): error is None when the batch is on disk, else why
    the write failed. A failed batch is not retried here: the handle that failed
    keeps failing (LevelDB's sticky error), and the loop owns the recovery."""

    def __init__(self, kv: KV, wake: zmq.Socket[Any], sync: bool) -> None:
        super().__init__(name="ledger-flusher", daemon=True)
        self.kv = kv
        self.sync = sync
        self.jobs: queue.SimpleQueue[WriteBatch | None] = queue.SimpleQueue()
        self.done: collections.deque[Any] = collections.deque()
        self._wake = wake
        self.batches = 0  # storage writes done (each one fsync in sync mode)
        self.keys = 0

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                break
            commit, nkeys, dirty = job  # a core.WriteBatch
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
    def __init__(self, config: Config, ledger: Ledger, zctx: zmq.Context[Any] | None = None,
                 identity: Identity | None = None, access: Access | None = None) -> None:
        self.config = config
        self.identity = identity or Identity.generate()
        self.ledger = ledger
        self.zctx = zctx or zmq.Context.instance()
        self.stopping = False
        self.reload_keys = False  # SIGHUP: read the allowlists again (between loop turns)
        # With keys: the ZAP handler is bound first (a CURVE server socket must never accept
        # before it can ask), every socket uses CURVE, and each request carries its sender
        self.access = access
        # the metrics endpoint is bound first: a port it cannot have fails the start before any other
        self.metrics: metrics.Endpoint | None = None
        if config.metrics is not None:
            try:
                self.metrics = metrics.Endpoint(config.metrics[0], config.metrics[1], config.data,
                                                self._wake_metrics, config.ready_lag)
            except OSError as exc:
                raise sockets.BindError(f"--metrics {config.metrics[0]}:{config.metrics[1]} "
                                        f"({exc.strerror or exc})") from None
        self.zap = Zap(self.zctx, access) if access is not None else None
        self.users = access.users if access is not None else {}
        curve = self.identity.curve_keypair() if access is not None else None
        try:
            self.router, self.port = sockets.router(self.zctx, config.host, config.port, config.max_request,
                                                    curve=curve[1] if curve else None)
        except Exception:
            if self.zap is not None:
                self.zap.close()
            if self.metrics is not None:
                self.metrics.httpd.server_close()
            raise
        try:
            self.pub, self.pub_port = sockets.xpub(
                self.zctx, config.host, 0 if config.pub_port is None else config.pub_port, config.watch_queue,
                curve=curve[1] if curve else None,
            )
        except Exception:
            self.router.close(linger=0)
            if self.zap is not None:
                self.zap.close()
            if self.metrics is not None:
                self.metrics.httpd.server_close()
            raise
        self.replies = clients.ReplyBudget(config.max_client_queue)
        self.junk = clients.JunkGate()
        max_clients = config.max_clients
        if max_clients is None:
            max_clients = min(clients.DEFAULT_MAX_CLIENTS, max(clients.MIN_CLIENTS, clients.clients_allowed(
                clients.raise_fd_limit())))
        self.connections = clients.ConnectionLimit(
            {"router": (self.router, self.port), "watch": (self.pub, self.pub_port)}, max_clients)
        self.poller = zmq.Poller()
        self.held_poller = zmq.Poller()  # while storage is behind: requests, finished writes (`_held_turn`)
        self.peers = Peers(self.zctx, self.poller, max_peer_message(config.max_payload), curve)
        self.publisher = Publisher(self.pub, ledger, sync=config.sync, heartbeat_ms=config.watch_heartbeat_ms,
                                   max_topics=config.max_watch_topics,
                                   max_watchers=config.max_watchers_per_context)
        advertise = config.advertise or f"{_fmt_host(config.host)}:{self.port}"
        self.core = Core(config, ledger, self.peers, self.publisher, address=advertise,
                         pub=f"{advertise.rpartition(':')[0]}:{self.pub_port}", io_status=self._io_status,
                         started=time.monotonic(), identity=self.identity, access=access)
        self.peers.core = self.core
        # the core itself, or with a request log on (--slow-ms, debug), the core timed and logged
        debug = reqlog.REQUESTS.isEnabledFor(logging.DEBUG)
        self.request_log = (reqlog.RequestLog(self.core.request, lambda: self.core.outbox, config.slow_ms, debug)
                            if config.slow_ms is not None or debug else None)
        self.request: Callable[..., bool] = self.request_log or self.core.request
        # --metrics: an HTTP thread that asks this loop (node/metrics.py); requests then timed by op
        self.timer: metrics.RequestTimer | None = None
        if self.metrics is not None:
            core = self.core
            self.timer = metrics.RequestTimer(self.request, lambda: core.last_op)
            self.request = self.timer
            self._metrics_rx, self._metrics_tx = sockets.wake_pair(self.zctx, f"metrics-{id(self)}")
        if access is not None:
            self.peers.server_key = self._peer_server_key
            ident = self.identity
            self.publisher.signer = lambda ctx, size, root: ident.sign(head_bytes(ctx.name, size, root, ident.public))
            self.publisher.gate = self._may_watch
        self.publisher.wants_ack = self.core.waits_for_replicas
        self._wake_rx, wake_tx = sockets.wake_pair(self.zctx, f"flush-{id(self)}")
        self.flusher = Flusher(ledger.kv, wake_tx, config.sync)
        self.backpressure_waits = 0
        self.held_turns = 0
        self.busy = BusyPoll(config.busy_poll_us, config.busy_poll_budget)

    @property
    def mesh(self) -> Mesh:
        return self.core.mesh

    # -- addresses ---------------------------------------------------------------

    @property
    def router_address(self) -> str:
        return f"tcp://{_fmt_host(self.config.host)}:{self.port}"

    @property
    def pub_address(self) -> str:
        return f"tcp://{_fmt_host(self.config.host)}:{self.pub_port}"

    def _peer_server_key(self, address: str) -> bytes | None:
        """The Curve25519 key the peer at `address` (its ROUTER or its PUB) must prove: its node
        id's key in the allowlist. None: not a peer whose id is known and bound to a key."""
        mesh = self.core.mesh
        p = mesh.peers.get(address)
        if p is None:
            p = next((q for q in mesh.peers.values() if q.pub == address), None)
        if p is None or p.node_id is None or self.access is None:
            return None
        key = self.access.peers.get(p.node_id)
        return curve_public(key) if key is not None else None

    def _who(self, frame: Any) -> Principal | None:
        """The principal of the connection a received frame came over: the user id the ZAP handler
        gave it (node/zap.py), looked up in the current allowlists (None: a key revoked since)."""
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        return self.users.get(user) if user else None

    def _may_watch(self, frame: Any, topic: bytes) -> bool:
        """Whether the subscriber whose subscription `frame` is may watch `topic` (node/access.py)."""
        who = self._who(frame)
        if topic.startswith(watch.REPL_PREFIX):
            return may_watch(who, None, replication=True)
        return may_watch(who, watch.context_of_topic(topic), replication=False)

    def _reload_keys(self) -> None:
        """SIGHUP: new allowlists for handshakes and requests from now on; on an error the old
        ones stay (logged). A revoked key's open connections get FORBIDDEN from their next request."""
        self.reload_keys = False
        try:
            access = load_access(self.config)
        except AccessError as exc:
            log.error("SIGHUP: keeping the current allowlists: %s", exc)
            return
        self.access = access
        self.users = access.users
        self.core.access = access
        if self.zap is not None:
            self.zap.set_access(access)
        log.info("SIGHUP: allowlists reloaded: %d peer key(s), %d client key(s)", len(access.peers),
                 len(access.clients))

    def _io_status(self, now: float) -> dict[str, Any]:
        """What this layer counts, for the core's `status` reply."""
        fields: dict[str, Any] = {
            "router": self.router_address,
            "pub": self.pub_address,
            "write_batches": self.flusher.batches,
            "written_keys": self.flusher.keys,
            "peer_sub_renewals": self.peers.sub_renewals,
            "backpressure_waits": self.backpressure_waits,
            "held_turns": self.held_turns,
        }
        fields.update(self.replies.status())
        fields.update(self.junk.status())
        fields.update(self.connections.status())
        fields.update(self.busy.status(time.perf_counter()))  # (the loop's spin clock)
        fields.update(self.publisher.status())
        fields["unkeyed_peer_requests"] = self.peers.unkeyed
        if self.zap is not None:
            fields.update(self.zap.status())
        return fields

    # -- the metrics endpoint's questions (node/metrics.py) --------------------------------------

    def _wake_metrics(self) -> None:
        """From the metrics thread (its only user of this socket): a job is waiting."""
        try:
            self._metrics_tx.send(b"", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the pipe is full: the loop is woken anyway, and drains every job at once

    def _serve_metrics(self) -> None:
        """In the loop: answer every job the metrics thread put (fresh copies, nothing live)."""
        rx = self._metrics_rx
        try:
            while True:
                rx.recv(zmq.NOBLOCK)
        except zmq.Again:
            pass
        assert self.metrics is not None
        jobs = self.metrics.jobs
        core = self.core
        while not jobs.empty():
            job = jobs.get_nowait()
            if job.kind == "metrics":
                st = core.status_fields(time.monotonic())
                ops, errs = dict(core.op_counts), dict(core.error_counts)
                timer = self.timer.copy() if self.timer is not None else None
                job.result = lambda proc, st=st, ops=ops, errs=errs, timer=timer: metrics.render(
                    st, ops, errs, timer, proc)
            elif job.kind == "ready":
                st = core.status_fields(time.monotonic())
                job.result = {"storage": st["storage"], "entries": st["entries"], "peers": st["peers"]}
            else:
                job.result = True  # health: the loop turns
            job.done.set()

    # -- the loop ----------------------------------------------------------------

    def stop(self, *_: Any) -> None:
        self.stopping = True

    def run(self, ready: Callable[[], None] | None = None) -> None:
        self.flusher.start()
        poller = self.poller
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        poller.register(self.pub, zmq.POLLIN)
        if self.metrics is not None:
            poller.register(self._metrics_rx, zmq.POLLIN)
            self.metrics.start()
        for mon in self.connections.monitors:
            poller.register(mon, zmq.POLLIN)
        zap = self.zap
        if zap is not None:
            poller.register(zap.sock, zmq.POLLIN)
        for sock in (self.router, self._wake_rx, self.pub, *([self._metrics_rx] if self.metrics is not None else []),
                     *([zap.sock] if zap is not None else []), *self.connections.monitors):
            self.held_poller.register(sock, zmq.POLLIN)
        secure = zap is not None
        core = self.core
        request = self.request
        router = self.router
        publisher = self.publisher
        last_housekeeping = last_heartbeat = time.monotonic()
        heartbeat_check = min(0.1, publisher.heartbeat_s / 4)
        busy = self.busy
        clock = time.perf_counter
        monotonic = time.monotonic
        zero_copy = 0  # requests still to receive without a copy, after a big one
        if ready is not None:
            ready()
        try:
            while not self.stopping:
                while core.held and not core.backlogged():
                    core.release(monotonic(), self.request, OUTBOX_BYTES)  # (pages must not pile up)
                    self._send_replies()
                if core.backlogged():
                    if core.hold_full():
                        self._wait_for_flush()
                    else:
                        self._held_turn()
                    continue
                timeout = core.next_deadline_ms(monotonic())
                events = None
                # No spin while a write is in flight (the flusher thread needs the GIL), and
                # none past the next deadline (a flush, a lazy ack): those run after the poll.
                if timeout and not core.writing and busy.should_spin(clock()):
                    events = self._spin(poller, clock() + timeout / 1000.0)
                    if events is None:
                        timeout = core.next_deadline_ms(monotonic())
                if events is None:
                    events = dict(poller.poll(timeout))
                    if router in events:
                        busy.arrived(clock())
                if router in events:
                    ledger = self.ledger
                    outbox_bytes = 0
                    now = monotonic()
                    for i in range(1, MAX_BURST + 1):
                        try:
                            if secure:
                                frames = recv_request(router)  # (the sender's key is a property of the frame)
                            elif zero_copy:
                                zero_copy -= 1
                                frames = recv_request(router)
                            else:
                                frames = recv_frames(router)
                        except zmq.Again:
                            break
                        if secure:
                            self._secure_request(frames, now)
                        elif len(frames[-1]) >= BIG_REQUEST:
                            zero_copy = ZERO_COPY_SPAN  # (see recv_request)
                            self._big_request(frames, now)
                        elif self.replies.cut and frames[0] in self.replies.cut and self.replies.drop_request(frames[0]):
                            pass  # a client cut off for not reading its replies (node/clients.py)
                        else:
                            request(frames, now)
                        if i == 1:
                            # The first request of a burst is answered at once: a lone
                            # request (a client with one in flight) loses no time, and the
                            # rest of a pipelined burst still goes out in groups. (Asking
                            # the socket whether more is waiting costs more than this.)
                            self._send_replies()
                        elif core.outbox_bytes != outbox_bytes:
                            outbox_bytes = core.outbox_bytes
                            if outbox_bytes >= OUTBOX_BYTES:
                                self._send_replies()  # pages must not pile up
                                outbox_bytes = 0
                        if not i & 63 or ledger.pending_bytes >= FORCE_FLUSH_BYTES:
                            self._send_replies()
                            outbox_bytes = 0
                            now = monotonic()
                            if not i & 255:
                                # fewer, larger messages: each one costs a write per watcher
                                publisher.publish()
                            # A long burst (a pipelined writer never lets the socket
                            # run dry) must not hold writes past their deadline, nor
                            # let a few big batches run past the write buffer.
                            self._collect_done()
                            self._hand_off(now)
                            if core.backlogged():
                                break
                    self._send_replies()
                    publisher.publish()
                    busy.served(clock())
                if self.reload_keys:
                    self._reload_keys()
                if len(events) > 1 or router not in events:
                    self._side_events(events)
                    self.peers.receive(events, core)
                self._collect_done()
                now = monotonic()
                self._hand_off(now)
                self.peers.tidy()
                core.tick(now)
                self._send_replies()
                if now - last_heartbeat >= heartbeat_check:
                    last_heartbeat = now
                    publisher.heartbeat()
                if now - last_housekeeping > 1.0:
                    last_housekeeping = now
                    self.replies.sweep()
                    self.junk.sweep()
                if self.ledger.storage.due(now) and not core.writing:
                    self._recover(now)
        finally:
            self._shutdown()

    def _secure_request(self, frames: list[Any], now: float) -> None:
        """A request on a node with keys: served as its sender's principal (node/access.py), the
        user id the ZAP handler gave its connection (None: a key revoked since, refused)."""
        who = self._who(frames[-1])
        if len(frames[-1]) >= BIG_REQUEST:
            self._big_request(frames, now, who)
        elif not (self.replies.cut and frames[0] in self.replies.cut and self.replies.drop_request(frames[0])):
            self.request(frames, now, who)

    def _big_request(self, frames: list[Any], now: float, who: Principal | None = None) -> None:
        """A request of BIG_REQUEST bytes or more: refused unread while its connection sent
        undecodable ones recently (node/clients.py, JunkGate), else served and judged."""
        ident = frames[0]
        if self.replies.cut and ident in self.replies.cut and self.replies.drop_request(ident):
            return
        if self.junk.until and self.junk.holds(ident) and not self.core.holds_for(ident):
            self.core.outbox.append([*frames[:-1], codec.encode_error(
                None, BAD_REQUEST, f"refused unread: a request of {BIG_REQUEST} bytes or more from this connection "
                f"could not be decoded less than {clients.JUNK_HOLD_S:g} s ago")])
            return
        if self.request(frames, now, who):
            self.junk.junk(ident)

    def _spin(self, poller: zmq.Poller, deadline: float) -> dict[Any, int] | None:
        """Poll without sleeping until an event, the end of the busy-poll window or `deadline`."""
        busy = self.busy
        clock = time.perf_counter
        router = self.router
        events = zmq.EVENTS
        started = now = clock()
        end = min(busy.spin_end(now), deadline)  # (the window's end, or where the budget runs out)
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
        # the window ran out (a miss), or a deadline or the CPU budget came first (no verdict)
        busy.spun(started, now, hit=False if now >= busy.until else None)
        return None

    # -- storage -----------------------------------------------------------------------

    def _held_turn(self) -> None:
        """Storage is behind the writes (`Core.backlogged`): until a write finishes, requests are
        still read; those that read are answered, those that write are held in order (`Core.held`,
        bounded: past it, `_wait_for_flush`). Peers' messages (pushes, pulls) wait in their sockets.
        A LevelDB write stall (a compaction of 2-3 s, 1,000 contexts appended round-robin at 10M
        entries) used to stop every read with the writes."""
        self.held_turns += 1
        core = self.core
        events = dict(self.held_poller.poll(100))
        if self.router in events:
            now = time.monotonic()
            secure = self.zap is not None
            core.behind = True
            try:
                for _ in range(MAX_BURST):
                    try:
                        frames = recv_request(self.router)
                    except zmq.Again:
                        break
                    if secure:
                        self._secure_request(frames, now)
                    elif len(frames[-1]) >= BIG_REQUEST:
                        self._big_request(frames, now)
                    elif not (self.replies.cut and frames[0] in self.replies.cut
                              and self.replies.drop_request(frames[0])):
                        self.request(frames, now)
                    if core.outbox_bytes >= OUTBOX_BYTES:
                        self._send_replies()  # pages must not pile up
                    if core.hold_full():
                        break
            finally:
                core.behind = False
            self._send_replies()
        self._side_events(events)  # (--max-clients holds during a stall too)
        self._collect_done()
        self._hand_off(time.monotonic(), force=True)

    def _side_events(self, events: dict[Any, int]) -> None:
        """The sockets other than requests and peers, on any turn: a finished write's wake-up,
        metrics, watch subscriptions, ZAP, connection monitors (`--max-clients`)."""
        if self._wake_rx in events:
            self._drain_wake()
        if self.metrics is not None and self._metrics_rx in events:
            self._serve_metrics()
        if self.pub in events:
            self.publisher.on_subscriptions()
        if self.zap is not None and self.zap.sock in events:
            self.zap.handle()
        for mon in self.connections.monitors:
            if mon in events:
                self.connections.on_events(mon)

    def _wait_for_flush(self) -> None:
        self.backpressure_waits += 1
        if self._wake_rx.poll(100):
            self._drain_wake()
        self._collect_done()
        self._hand_off(time.monotonic(), force=True)

    def _drain_wake(self) -> None:
        while True:
            try:
                self._wake_rx.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _collect_done(self) -> None:
        """Tell the core about the writes the flusher finished; send what that released."""
        core = self.core
        done = self.flusher.done
        now = time.monotonic()
        while done:
            dirty, error = done.popleft()
            core.written(dirty, error, now)
        if core.settle(now):
            # the replies went out now (sync mode): the clients' next requests come after them
            self.busy.served(time.perf_counter())
        self._send_replies()
        if self.publisher.due:
            self.publisher.publish()

    def _hand_off(self, now: float, force: bool = False) -> None:
        batch = self.core.next_write(now, force)
        if batch is not None:
            self.flusher.jobs.put(batch)

    def _recover(self, now: float) -> None:
        dirty = self.ledger.recover(self.config.sync, now)
        if dirty is not None:
            self.core.recovered(dirty, now)
            self._send_replies()

    def _shutdown(self) -> None:
        log.info("stopping: flushing pending writes")
        # Stop taking requests, finish the write in flight, write the rest synchronously.
        core = self.core
        deadline = time.monotonic() + 30
        while core.writing and time.monotonic() < deadline:
            if self.flusher.done:
                self._collect_done()
            else:
                time.sleep(0.001)
        self.flusher.jobs.put(None)
        self.flusher.join(timeout=30)
        self._collect_done()
        self._final_write()
        if self.ledger.mark_clean():
            log.info("stopped cleanly: the next start reads no entries")
        core.settle(time.monotonic())
        core.refuse_waiting()  # what the last write could not make durable
        core.refuse_held()
        self._send_replies()
        if self.metrics is not None:
            self.metrics.close()
            self._serve_metrics()  # a scrape that came in meanwhile gets its answer, not a hang
            self._metrics_rx.close(linger=0)
            self._metrics_tx.close(linger=0)
        for s in (self.router, self.pub, self._wake_rx):
            s.close(linger=sockets.LINGER_MS)
        self.peers.close()
        self.connections.close()
        if self.zap is not None:
            self.zap.close()

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

    # -- replies -------------------------------------------------------------------

    def _send_replies(self) -> None:
        # Replies go out in groups at the end of a burst (or every OUTBOX
        # requests): ZeroMQ's I/O thread then drains many in one wake-up and one
        # TCP write instead of one each, which is worth ~40% of pipelined
        # throughput. A lone request's burst is itself, so its latency is unchanged.
        core = self.core
        out = core.outbox
        if not out:
            return
        core.outbox = []
        core.outbox_bytes = 0
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
