"""The node's sans-I/O core: requests, peer messages, finished writes and ticks in; replies and writes out.

`Core` is everything a node decides, with none of what it touches: it imports
no socket or clock, and the server (node/server.py), the seeded mesh simulation
(tests/unit/test_mesh_sim.py) and the unit tests all drive this same object.

Theory of operation
-------------------
Events are method calls, and the time comes in with each of them (`now`, the
caller's monotonic clock):

=====================================  =====================================================
event                                  what the core does
=====================================  =====================================================
`request(frames, now)`                 parse, dispatch to a handler, queue the reply
`peer_reply(address, frame, now)`      a reply to a request this node sent a peer (mesh)
`push(frames, now)`                    a message of a peer's replication stream (mesh)
`next_write(now, force)`               returns the `WriteBatch` due (group commit), if any
`written(dirty, error, now)`           a batch is on disk (error None) or failed
`recovered(dirty, now)`                storage came back and wrote what RAM held
`tick(now)`                            liveness, heartbeats, acks, deadlines, scrub, loads
=====================================  =====================================================

Actions: replies to send now are appended to `outbox` (each one the frames of
one ROUTER message), which the server drains; a batch to write is the
`WriteBatch` that `next_write` returns, answered later by `written`; requests
to peers and subscriptions go through the mesh's `Transport` port (node/peers.py
in the server, the fake network in the simulation), which says at once whether
a message could be queued; the watch feed (node/publisher.py) is told which
contexts grew (`mark`) and publishes when the server says so.

Every request handler gets its request (`Request`: who to answer, the request
id, the time) and the parsed request as arguments, and returns one of three
typed answers: `Reply` (send now), `WhenDurable` (send once the entry is on
disk, sync durability) or `WhenReplicated` (send once N other nodes hold the
entry, or answer UNAVAILABLE at its deadline). The last two wait in
`for_disk` and `for_replicas`: two of the three kinds of waiting a node does
(the third, pushes that arrived past a gap while it is pulled, is the mesh's
`early`).

What it does not own: the engine's reads go through `Ledger` to its `KV`
(node/storage.py: LevelDB in the server, `MemoryKV` in the simulation), a
synchronous call, because a read from LevelDB's cache costs less than a loop
turn would; the group-commit writes of appends leave as `WriteBatch` actions
and run on the flusher thread. A few rare writes (a context's creation, a
Lamport reservation, a bulk load's commit, a repaired block) are written
through the `KV` at once, as the engine documents.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from node import __version__
from node.access import Access, Principal
from node.config import Config
from node.ledger import ACCELERATED, HASHING_IN_C, MAX_REPLY_BYTES, ContextState, Ledger
from node.mesh import ACK_LAZY_S, Mesh, Transport
from node.publisher import MAX_MSG_BYTES
from protocol import codec
from protocol.codec import RequestId
from protocol.errors import (
    BAD_REQUEST,
    INTERNAL,
    STORAGE,
    UNAVAILABLE,
    Forbidden,
    IntegrityError,
    LedgerError,
    NotWriter,
    RemoteProtocolError,
    Unavailable,
)
from protocol.heads import sign_head
from protocol.keys import Identity

log = logging.getLogger(__name__)

PEER_OPS = frozenset(("heartbeat", "sync_heads", "sync_digest", "snapshots", "ack"))  # requests only nodes send
ASYNC_FORCE_FLUSH = 20_000  # pending keys that trigger a write before the deadline
FORCE_FLUSH_BYTES = 2 << 20  # pending entry bytes that do the same
# Back-pressure: past either bound the server stops reading requests until the
# flusher catches up, so a writer faster than the disk cannot fill the RAM.
MAX_BUFFERED_KEYS = 200_000
# Meanwhile requests are still read: those that read are answered, those that write are held
# (in order, with whatever their connection sends after them) up to these bounds; past them no
# request is read. A LevelDB write stall (a compaction of seconds) then stops the writes only.
WRITE_OPS = frozenset(("append", "append_batch", "load"))
MAX_HELD = 10_000
HELD = "held"  # `last_op` of a request just held
PAGE_BYTES = 4096  # replies this large count toward `outbox_bytes` (pages of entries; sockets.TRACK_MIN)
SCRUB_EVERY_S = 0.025
SCRUB_SLICE = 50  # entries per slice: at most 2,000 entries a second, ~0.2 ms of the loop per slice
SCRUB_PASS_PAUSE_S = 60.0  # after a whole pass: a small store is not re-read 40 times a second
HOUSEKEEPING_S = 1.0


def max_peer_message(max_payload: int) -> int:
    """Largest message this node takes from a peer socket (MAXMSGSIZE; a larger one drops the
    connection before it is buffered). The largest legitimate ones: a pull reply (`snapshot`
    page) holds at most MAX_REPLY_BYTES of entries, or one entry when that entry alone is
    larger; a pushed entries message is cut after MAX_MSG_BYTES, so it holds less than that
    plus one entry. An entry is its payload (<= max_payload) plus at most ~300 KiB of key,
    metadata and fixed fields; 1 MiB more covers that and the message envelope."""
    return max(MAX_REPLY_BYTES, max_payload + MAX_MSG_BYTES) + (1 << 20)


class Request(NamedTuple):
    """What a handler knows of the request it answers, besides the request itself."""

    to: list[bytes]  # the frames its reply goes back under: the client's identity (and envelope)
    id: RequestId
    now: float
    who: Principal | None = None  # the authenticated sender, on a node with keys (node/access.py)


class Reply(NamedTuple):
    """Send `body` now."""

    body: bytes


class WhenDurable(NamedTuple):
    """Send `body` once `ctx` is on disk up to `seq` (sync durability), or STORAGE if storage fails."""

    ctx: ContextState
    seq: int
    body: bytes


class WhenReplicated(NamedTuple):
    """Send the reply (`fields` + `raw`, with `replicated`) once `replicas` other nodes hold
    `ctx` up to `seq` (and, in sync mode, it is on disk here); UNAVAILABLE at `deadline`."""

    ctx: ContextState
    seq: int
    replicas: int
    fields: dict[str, Any]
    raw: dict[str, Any]


Answer = Reply | WhenDurable | WhenReplicated


class Waiting(NamedTuple):
    """A reply waiting for disk (`for_disk`) or for replicas (`for_replicas`)."""

    to: list[bytes]
    id: RequestId
    answer: WhenDurable | WhenReplicated
    deadline: float  # replicas only


class WriteBatch(NamedTuple):
    """A group commit to run off the loop (the flusher): `commit()`, then `Core.written`."""

    commit: Callable[[], None]
    keys: int
    dirty: dict[ContextState, int]


class WatchFeed(Protocol):
    """What the core asks of the watch side (node/publisher.py)."""

    boot: str  # this run's boot id (watchers and peers tell restarts by it)

    def mark(self, ctx: ContextState) -> None:
        """`ctx` grew: publish its new entries."""
        ...

    def watchers(self, context: str) -> int: ...


def no_status(now: float) -> dict[str, Any]:
    return {}


class Core:
    """One node's decisions (see the module docstring). `transport` is the mesh's port to its
    peers; `watch` the publisher (`mark`, `watchers`, `boot`); `io_status(now)` adds what the
    I/O layer counts (sockets, flusher, clients) to `status`."""

    def __init__(self, config: Config, ledger: Ledger, transport: Transport, watch: WatchFeed, *,
                 address: str, pub: str, io_status: Callable[[float], dict[str, Any]] = no_status,
                 started: float = 0.0, identity: Identity | None = None, access: Access | None = None) -> None:
        self.config = config
        self.ledger = ledger
        self.watch = watch
        self.io_status = io_status
        self.started = started
        self.identity = identity  # this node's key (node/identity.py): it signs the heads of what it writes
        self.public_key = identity.public_hex if identity is not None else ""
        self.access = access  # the allowlists, on a node with keys: every request is checked against them
        self.refused_requests = 0  # requests refused FORBIDDEN (status.forbidden_requests)
        self.sync = config.sync
        self.mesh = Mesh(
            ledger, transport, address=address, pub=pub, seeds=list(config.peers),
            heartbeat_s=config.heartbeat_ms / 1000.0, suspect_after=config.suspect_after,
            dead_after=config.dead_after, boot=watch.boot, cluster=config.cluster, on_applied=watch.mark,
            ack_durable=config.sync, max_peers=config.max_peers, seed_ids=dict(config.seed_ids),
            known_id=None if access is None else (lambda node_id: node_id in self.access.peers),  # type: ignore[union-attr]
            writer_key=None if access is None else self._writer_key,
        )
        self.mesh.on_ack = self.check_replicated
        self.mesh.awaited = lambda: {w.answer.ctx.name for w in self.for_replicas}
        self.outbox: list[list[bytes]] = []  # replies to send now (the server drains it)
        self.outbox_bytes = 0  # bytes of the pages (replies >= PAGE_BYTES) in it
        # requests held while storage is behind (`backlogged`): (frames, principal), in arrival order
        self.held: collections.deque[tuple[list[Any], Principal | None]] = collections.deque()
        self.held_bytes = 0
        self._held_from: dict[Any, int] = {}  # a connection's routing id -> its requests held
        self.held_total = 0  # requests held since start (`status`)
        # set by the server while it reads requests with storage behind (`backlogged`): requests
        # that write are held then (checked once a turn, not at every append: as today's bound)
        self.behind = False
        self.for_disk: list[Waiting] = []
        self.for_replicas: list[Waiting] = []
        self.writing = False  # a WriteBatch is out (at most one at a time)
        self.pending_since: float | None = None
        self.flush_delay = config.flush_ms / 2000.0
        self.replica_timeout_s = config.replica_timeout_ms / 1000.0
        self._last_scrub = self._last_housekeeping = -1e18
        self.handlers: dict[str, Callable[[Request, Any], Answer]] = {
            "append": self.append,
            "append_batch": self.append_batch,
            "get": self.get,
            "head": self.head,
            "contexts": self.contexts,
            "status": self.status,
            "ping": self.ping,
            "snapshot": self.snapshot,
            "load": self.load,
            "proof": self.proof,
            "consistency": self.consistency,
            "heartbeat": self.heartbeat,
            "sync_heads": self.sync_heads,
            "sync_digest": self.sync_digest,
            "snapshots": self.snapshots,
            "ack": self.ack,
        }
        # requests by op (every op from the start, so a metric exists before its first request),
        # and refusals by (op, error code); `invalid`: no known op could be read
        self.op_counts: dict[str, int] = dict.fromkeys(self.handlers, 0)
        self.error_counts: dict[tuple[str, str], int] = {}
        self.last_op = ""  # of the request handled last (node/metrics.py times requests by op)

    def _writer_key(self, node_id: str) -> bytes | None:
        """The key a writer signs with: its allowlisted one, or this node's own for what it writes."""
        key = self.access.peers.get(node_id) if self.access is not None else None
        if key is None and node_id == self.ledger.node_id and self.identity is not None:
            key = self.identity.public
        return key

    def waits_for_replicas(self, ctx: ContextState) -> bool:
        """Whether an append of `ctx` waits for replicas' acks (its pushes then ask for them at once)."""
        return any(w.answer.ctx is ctx for w in self.for_replicas)

    # -- events: requests --------------------------------------------------------------

    def request(self, frames: list[Any], now: float, who: Principal | None = None) -> bool:
        """A request from a client or peer: its ROUTER frames (identity, optional empty
        delimiter, body). The reply, if one goes now, is appended to `outbox`. Returns True
        when the body was not msgpack at all (the server's junk gate counts that)."""
        try:
            return self._request(frames, now, who)
        except Exception:  # never let one request take the node down
            log.exception("unexpected failure while answering a request; dropped it")
            return False

    # -- requests held while storage is behind ----------------------------------------------

    def _hold(self, frames: list[Any], who: Principal | None) -> None:
        self.last_op = HELD  # (the request timer counts it when it is served, not now)
        self.held.append((frames, who))
        self.held_bytes += len(frames[-1])
        self.held_total += 1
        sender = frames[0]
        self._held_from[sender] = self._held_from.get(sender, 0) + 1

    def hold_full(self) -> bool:
        """No more requests are to be read until a write finishes (the held ones fill the bounds)."""
        return len(self.held) >= MAX_HELD or self.held_bytes >= self.config.write_buffer

    def release(self, now: float, serve: Callable[[list[Any], float, Principal | None], bool] | None = None,
                max_outbox: int | None = None) -> int:
        """Serve the held requests, in order, for as long as storage keeps up, through `serve` (the
        server's request wrapper: timed and logged as any request); how many. Stops once the
        outbox holds `max_outbox` bytes of pages (the server sends them, then calls again). Not
        while `behind`: the server releases them between the turns it reads requests in."""
        n = 0
        held = self.held
        serve = serve or self._request
        while held and not self.behind and not self.backlogged():
            frames, who = held.popleft()
            self.held_bytes -= len(frames[-1])
            sender = frames[0]
            left = self._held_from[sender] - 1
            if left:
                self._held_from[sender] = left
            else:
                del self._held_from[sender]
            try:
                serve(frames, now, who)
            except Exception:  # never let one request take the node down
                log.exception("unexpected failure while answering a request; dropped it")
            n += 1
            if max_outbox is not None and self.outbox_bytes >= max_outbox:
                break  # (after one at least: every call moves on)
        return n

    def refuse_held(self) -> None:
        """The node stops: each held request is answered UNAVAILABLE (it was not served: send it again)."""
        while self.held:
            frames, _who = self.held.popleft()
            try:
                rid = codec.peek_id(codec.unpack_request(frames[-1]))
            except RemoteProtocolError:
                rid = None
            self.outbox.append([*frames[:-1], codec.encode_error(
                rid, UNAVAILABLE, "the node is stopping; this request was held while storage caught up and was not "
                "served: send it again (to this node once it is back, or to another)")])
        self.held_bytes = 0
        self._held_from = {}

    def holds_for(self, sender: Any) -> bool:
        """Whether a request from `sender` now waits behind its held ones (answered in order)."""
        return self.behind and sender in self._held_from

    def _request(self, frames: list[Any], now: float, who: Principal | None) -> bool:
        if len(frames) < 2:
            return False  # nothing after the identity: nobody to answer
        if self.behind and frames[0] in self._held_from:
            # behind its connection's held requests, even one that is not valid: answered in order
            self._hold(frames, who)
            return False
        to = frames[:-1]
        if len(to) > 2 or (len(to) == 2 and to[1] != b""):
            self.outbox.append([frames[0], codec.encode_error(
                None, BAD_REQUEST,
                "a request is one frame (optionally after one empty delimiter frame); "
                f"got {len(frames) - 1} frames")])
            return False
        rid: RequestId = None
        m = None
        try:
            m = codec.unpack_request(frames[-1])
            env = codec.parse_request(m, self.ledger.max_payload)
            rid = env.id
            if self.behind and env.op in WRITE_OPS:
                self._hold(frames, who)  # (parsed again when it is served: only while storage is behind)
                return False
            self.last_op = op = env.op
            self.op_counts[op] += 1
            if self.access is not None:
                self._authorize(who, env)
            out = self.handlers[op](Request(to, rid, now, who), env.request)
        except RemoteProtocolError as exc:
            if rid is None:
                rid = codec.peek_id(m)
            out = Reply(codec.encode_error(rid, exc.code, exc.message, exc.details))
            named = m.get("op") if isinstance(m, dict) else None
            known = isinstance(named, str) and named in self.handlers  # (any hashable check of junk is a crash)
            self._count_error(named if known else "invalid", exc.code)
            if known and named in PEER_OPS:
                sender = m.get("address")
                self.mesh.refuse(sender if isinstance(sender, str) else "a peer", f"a {named} ({exc.message})")
        except LedgerError as exc:
            out = Reply(codec.encode_error(rid, exc.code, exc.message, exc.details))
            self._count_error(self.last_op, exc.code)
        except Exception as exc:  # a bug: report it, keep serving
            log.exception("internal error while serving a request")
            out = Reply(codec.encode_error(rid, INTERNAL, f"internal error: {type(exc).__name__}: {exc}"))
            self._count_error(self.last_op, INTERNAL)
        if type(out) is Reply:
            body = out.body
            if len(body) >= PAGE_BYTES:
                self.outbox_bytes += len(body)
            self.outbox.append([*to, body])
        elif type(out) is WhenDurable:
            if self.ledger.durable(out.ctx, out.seq):
                self.outbox.append([*to, out.body])
            else:
                self.for_disk.append(Waiting(to, rid, out, 0.0))
        else:
            assert type(out) is WhenReplicated
            self.for_replicas.append(Waiting(to, rid, out, now + self.replica_timeout_s))
            if "deduplicated" in out.fields and self.mesh.replicated(out.ctx, out.seq) < out.replicas:
                # a retry, maybe after its context left RAM and its acks with it: ask again
                self.mesh.ask_acks(out.ctx.name, now + self.replica_timeout_s)
            self.check_replicated(now)
        return m is None

    def _authorize(self, who: Principal | None, env: codec.Envelope) -> None:
        """Forbidden unless the sender's key may run this request; a peer speaks only for its own id."""
        try:
            self.access.check(who, env.op, getattr(env.request, "context", None))  # type: ignore[union-attr]
            node_id = getattr(env.request, "node_id", None)
            if who is not None and who.role == "peer" and node_id is not None and node_id != who.name:
                raise Forbidden(f"a {env.op} naming node {node_id!r} over the connection of node {who.name!r}",
                                {"node_id": node_id})
        except Forbidden:
            self.refused_requests += 1
            raise

    # -- request handlers: (request, parsed request) -> answer -----------------------------

    def _needs_durable(self, ctx: ContextState, seq: int, body: bytes) -> Answer:
        if self.sync and not self.ledger.durable(ctx, seq):
            return WhenDurable(ctx, seq, body)
        return Reply(body)

    def _check_writer(self, name: str) -> None:
        ctx = self.ledger.contexts.get(name)
        if ctx is not None and ctx.writer != self.ledger.node_id:
            self._not_writer(ctx)

    def _not_writer(self, ctx: ContextState) -> None:
        """NOT_WRITER (or UNAVAILABLE) for a context this node replicates; with keys, the reply
        carries the writer's public key, so that the client can authenticate the writer too."""
        try:
            self.mesh.check_writer(ctx)
        except NotWriter as exc:
            key = self.access.peers.get(ctx.writer) if self.access is not None else None
            if key is not None:
                exc.details["key"] = key.hex()
            raise

    def _check_replicas(self, n: int | None) -> None:
        if n:
            live = self.mesh.live_peers()
            if n > live:
                raise Unavailable(
                    f"replicas={n} asked, but this node knows only {live} other node(s) alive; nothing was appended",
                    {"required": n, "alive": live},
                )

    def append(self, rq: Request, req: codec.Append) -> Answer:
        ctx = self.ledger.contexts.get(req.context)
        if ctx is not None and ctx.writer != self.ledger.node_id:
            self._not_writer(ctx)
        if req.replicas:
            self._check_replicas(req.replicas)
        res = self.ledger.append(req)
        self.watch.mark(res.ctx)
        fields = {"deduplicated": True} if res.deduplicated else {}
        if req.replicas:
            return WhenReplicated(res.ctx, res.last_seq, req.replicas, fields, {"entry": res.blobs[0]})
        body = (codec.encode_reply(rq.id, fields, {"entry": res.blobs[0]}) if fields
                else codec.encode_entry_reply(rq.id, res.blobs[0]))
        return self._needs_durable(res.ctx, res.last_seq, body)

    def append_batch(self, rq: Request, req: codec.AppendBatch) -> Answer:
        self._check_writer(req.context)
        self._check_replicas(req.replicas)
        res = self.ledger.append_batch(req)
        self.watch.mark(res.ctx)
        fields: dict[str, Any] = {"first_seq": res.last_seq - len(res.blobs) + 1, "last_seq": res.last_seq}
        if res.deduplicated:
            fields["deduplicated"] = True
        if req.replicas:
            return WhenReplicated(res.ctx, res.last_seq, req.replicas, fields, {"entries": res.blobs})
        return self._needs_durable(res.ctx, res.last_seq, codec.encode_reply(rq.id, fields, {"entries": res.blobs}))

    def get(self, rq: Request, req: codec.Get) -> Answer:
        blobs, last_seq, more, next_after = self.ledger.get(req)
        return Reply(codec.encode_get_reply(rq.id, last_seq, more, next_after, blobs))

    def head(self, rq: Request, req: codec.Head) -> Answer:
        fields = self.ledger.head(req.context)
        fields["watchers"] = self.watch.watchers(req.context)
        fork = self.mesh.forks.get(req.context)
        if fork is not None:
            fields["fork"] = vars(fork)
        equivocation = self.mesh.equivocations.get(req.context)
        if equivocation is not None:
            fields["equivocation"] = equivocation
        ctx = self.ledger.contexts.get(req.context)
        if ctx is not None:
            if ctx.writer == self.ledger.node_id and self.identity is not None:
                # this node's own context: its head, signed now (SPEC 13.6)
                fields["signed"] = sign_head(self.identity, ctx.name, fields["size"], fields["root"]).to_map()
            elif ctx.signed is not None:
                fields["signed"] = ctx.signed.to_map()  # the latest head its writer signed that reached us
        return Reply(codec.encode_reply(rq.id, fields))

    def heartbeat(self, rq: Request, req: codec.Heartbeat) -> Answer:
        return Reply(codec.encode_reply(rq.id, self.mesh.rpc_heartbeat(req, rq.now, rq.to[0] if rq.to else None)))

    def ack(self, rq: Request, req: codec.Ack) -> Answer:
        return Reply(codec.encode_reply(rq.id, self.mesh.rpc_ack(req, rq.now)))

    def sync_heads(self, rq: Request, req: codec.SyncHeads) -> Answer:
        return Reply(codec.encode_reply(rq.id, self.mesh.rpc_sync_heads(req)))

    def sync_digest(self, rq: Request, req: codec.SyncDigest) -> Answer:
        return Reply(codec.encode_reply(rq.id, {"digests": self.ledger.fine_digest(req.buckets)}))

    def contexts(self, rq: Request, req: codec.Contexts) -> Answer:
        items, more = self.ledger.list_contexts(req.after, req.limit)
        fields: dict[str, Any] = {"contexts": items, "more": more}
        if items:
            fields["next_after"] = items[-1]["name"]
        return Reply(codec.encode_reply(rq.id, fields))

    def _count_error(self, op: str, code: str) -> None:
        key = (op, code)
        self.error_counts[key] = self.error_counts.get(key, 0) + 1

    def status(self, rq: Request, req: codec.Status) -> Answer:
        return Reply(codec.encode_reply(rq.id, self.status_fields(rq.now)))

    def status_fields(self, now: float) -> dict[str, Any]:
        """What `status` answers (also what the metrics endpoint exports, node/metrics.py)."""
        cfg = self.config
        fields = self.ledger.status()
        fields.update({
            "version": __version__,
            "protocol": codec.PROTOCOL_VERSION,
            "accelerated": ACCELERATED,  # node/_accel.c built and used for pulled entries
            "accelerated_sha256": HASHING_IN_C,  # and SHA-256 done in it (OpenSSL's libcrypto found)
            "uptime_s": round(now - self.started, 3),
            "durability": cfg.durability,
            "flush_ms": cfg.flush_ms,
            "max_payload": cfg.max_payload,
            "max_request": cfg.max_request,
            "max_peer_message": max_peer_message(cfg.max_payload),
            "data": cfg.data,
            "config_file": cfg.config_file,
            "config": cfg.report(),  # every setting's effective value, from node/options.py's rows
            "storage": self.ledger.storage.status(now),
            "public_key": self.public_key,
            # loopback: serves only on loopback; insecure: beyond it, without authentication (SPEC 18)
            "security": "curve" if self.access is not None else "insecure" if cfg.insecure else "loopback",
            "forbidden_requests": self.refused_requests,
            # requests held while storage is behind: writes and what their connections sent after them
            "held_requests": len(self.held),
            "held_requests_total": self.held_total,
        })
        fields.update(self.io_status(now))
        fields.update(self.mesh.status(now))
        fields["advertise"] = self.mesh.address
        fields["cluster"] = self.mesh.cluster
        return fields

    def ping(self, rq: Request, req: codec.Ping) -> Answer:
        return Reply(codec.encode_reply(rq.id, {"node_id": self.ledger.node_id}))

    def snapshot(self, rq: Request, req: codec.Snapshot) -> Answer:
        fields, blobs = self.ledger.snapshot_page(req)
        self.mesh.pulled_by(rq.to[0] if rq.to else None)
        self._sign_page(req.context, fields)
        return Reply(codec.encode_reply(rq.id, fields, {"entries": codec.packed_array(blobs) if req.packed else blobs}))

    def snapshots(self, rq: Request, req: codec.Snapshots) -> Answer:
        """Chunks of several contexts in one reply (SPEC 17.2): together at most a reply's
        bytes; the chunks past that are left out (asked again). A context this node cannot
        serve is an error item, not a failed reply."""
        self.mesh.pulled_by(rq.to[0] if rq.to else None)
        chunks = []
        used = 0
        for c in req.chunks:
            if used >= MAX_REPLY_BYTES:
                break
            try:
                fields, blobs = self.ledger.snapshot_page(c, MAX_REPLY_BYTES - used, at_least_one=used == 0)
            except LedgerError as exc:
                chunks.append(codec.encode_map({"context": c.context,
                                                "error": {"code": exc.code, "message": exc.message}}))
                continue
            if not blobs:
                break  # the reply is full: this chunk and the rest are asked again
            if req.signed:
                self._sign_page(c.context, fields)
            used += sum(len(b) for b in blobs)
            chunks.append(codec.encode_map(fields, {"entries": codec.packed_array(blobs) if req.packed else blobs}))
        return Reply(codec.encode_reply(rq.id, {}, {"chunks": chunks}))

    def _sign_page(self, name: str, fields: dict[str, Any]) -> None:
        """A snapshot page's signed head (SPEC 17.2, 13.6): the writer's, at the page's size."""
        size, root = fields["size"], fields["root"]
        ctx = self.ledger.contexts.peek(name)  # (a page served does not let its context into the cache)
        if ctx is None:
            return
        signed = self._signed_at(ctx, size, root)
        if signed is not None:
            fields["signed"] = signed  # a replica pulling it keeps it for its own head
            return
        if ctx.signed is not None and ctx.signed.size > size:
            # the latest head its writer signed, beyond this page, and the proof that the page's
            # root is a prefix of it: what a node with keys needs before it applies a pull (17.2)
            fields["signed"] = ctx.signed.to_map()
            fields["signed_proof"] = self.ledger.consistency(codec.Consistency(ctx.name, size, ctx.signed.size))["proof"]

    def _signed_at(self, ctx: ContextState, size: int, root: bytes) -> dict[str, Any] | None:
        """A head of `ctx` at exactly (size, root) signed by its writer, when this node has one:
        signed now if it is the writer, else the one it keeps if that is the one."""
        if ctx.writer == self.ledger.node_id and self.identity is not None:
            return sign_head(self.identity, ctx.name, size, root).to_map()
        if ctx.signed is not None and ctx.signed.size == size and ctx.signed.root == root:
            return ctx.signed.to_map()
        return None

    def load(self, rq: Request, req: codec.Load) -> Answer:
        # No NOT_WRITER here: a load brings the history of the writer its entries name, and extends
        # a context of this node only when that context has the same writer (the ledger checks).
        if not req.abort and self.access is not None and req.final:
            self._check_load_signed(req)
        head = self.ledger.load(req, sync=self.sync, now=rq.now)
        if head is not None and head.get("aborted"):
            return Reply(codec.encode_reply(rq.id, {"done": True, "aborted": True}))
        if head is None:
            return Reply(codec.encode_reply(rq.id, {"done": False, "received": self.ledger.load_received(req.load_id)}))
        ctx = self.ledger.contexts.get(req.context)
        if ctx is not None:
            self.watch.mark(ctx)
            if (req.signed is not None and ctx.writer != self.ledger.node_id
                    and (ctx.size, ctx.frontier.root()) == (req.signed.size, req.signed.root)):
                self.ledger.set_signed(ctx, req.signed)  # a replica's head signed by its writer (6.4), checked above
        head["done"] = True
        return Reply(codec.encode_reply(rq.id, head))

    def _check_load_signed(self, req: codec.Load) -> None:
        """With keys, a snapshot is loaded only under a head signed by a writer this node trusts
        (a key of its peer allowlist), at exactly the snapshot's context, size and root (SPEC 6.9)."""
        h = req.signed
        if h is None:
            raise Forbidden(f"a load of {req.context!r} on a node with keys needs the snapshot's head signed by its "
                            "writer (`signed`; `ledger snapshot` writes it when the writer, or a replica holding "
                            "its signature for that size, serves the snapshot)", {"context": req.context})
        trusted = self.access.peers.values() if self.access is not None else ()
        writer = self.ledger.load_writer(req)
        bound = self.access.peers.get(writer) if self.access is not None and writer is not None else None
        if writer == self.ledger.node_id and self.identity is not None:
            bound = self.identity.public
        if h.key not in trusted and not (self.identity is not None and h.key == self.identity.public):
            raise Forbidden(f"the snapshot of {req.context!r} is signed by {h.key.hex()}, a key this node does not "
                            "trust (not in --peer-keys)", {"context": req.context})
        if bound is not None and h.key != bound:
            raise Forbidden(f"the snapshot of {req.context!r} is signed by {h.key.hex()}, not by the key of its "
                            f"writer {writer!r}", {"context": req.context})
        if (h.context, h.size, h.root) != (req.context, req.size, req.root) or not h.verify():
            raise IntegrityError(f"the signed head of the snapshot of {req.context!r} does not verify, or is not of "
                                 "its size and root", {"context": req.context})

    def proof(self, rq: Request, req: codec.Proof) -> Answer:
        return Reply(codec.encode_reply(rq.id, self.ledger.proof(req)))

    def consistency(self, rq: Request, req: codec.Consistency) -> Answer:
        return Reply(codec.encode_reply(rq.id, self.ledger.consistency(req)))

    # -- events: peers -------------------------------------------------------------------

    def peer_reply(self, address: str, frame: bytes, now: float) -> None:
        """A reply from the peer at `address` to a request this node sent it."""
        try:
            reply = codec.decode_reply(frame)
        except RemoteProtocolError:
            return
        try:
            self.mesh.on_reply(address, reply, now, len(frame))
        except Exception as exc:
            self.mesh.peer_error(address, "handling its reply failed", exc)

    def push(self, frames: list[bytes], now: float) -> None:
        """A message of a peer's replication stream (SPEC 17.3)."""
        self.mesh.now = now
        try:
            self.mesh.on_push(frames)
        except Exception as exc:
            self.mesh.peer_error("(push stream)", "applying a pushed message failed; repair will fetch it", exc)

    # -- events: storage -------------------------------------------------------------------

    def backlogged(self) -> bool:
        """More is buffered for storage than the bounds allow: read no requests until a write finishes."""
        if self.ledger.storage.error is not None:
            return False  # no write is coming, and writes are refused meanwhile: serve the reads
        keys, nbytes = self.ledger.buffered()
        return keys >= MAX_BUFFERED_KEYS or nbytes >= self.config.write_buffer

    def next_write(self, now: float, force: bool = False) -> WriteBatch | None:
        """The group commit to hand to the flusher now, if one is due: sync mode writes at
        once (appends that arrive meanwhile form the next group), async mode after
        `flush_ms / 2` or sooner when the buffer grows. One at a time."""
        ledger = self.ledger
        if ledger.storage.error is not None:
            return None  # the kept batch and the rest are written by the recovery
        if self.writing or not ledger.pending:
            if not ledger.pending:
                self.pending_since = None
            return None
        if self.pending_since is None:
            self.pending_since = now
        due = (
            force
            or self.sync
            or len(ledger.pending) >= ASYNC_FORCE_FLUSH
            or ledger.pending_bytes >= FORCE_FLUSH_BYTES
            or now - self.pending_since >= self.flush_delay
        )
        if not due:
            return None
        batch, dirty = ledger.take_pending()
        commit = ledger.with_marks(ledger.kv.prepare(batch.items(), sync=self.sync), dirty, self.sync)
        self.pending_since = None
        self.writing = True
        return WriteBatch(commit, len(batch), dirty)

    def written(self, dirty: dict[ContextState, int], error: str | None, now: float) -> None:
        """The batch handed out by `next_write` is on disk (`error` None), or its write failed."""
        self.writing = False
        if error is not None:
            self.ledger.write_failed(error, now)
            self.refuse_waiting()
            return
        self.ledger.mark_flushed(dirty)
        self.mesh.on_flushed(dirty)

    def settle(self, now: float) -> bool:
        """After writes finished: release the replies now durable (or refuse them, storage having
        failed). True when some went out (the server then counts its burst as served)."""
        before = len(self.outbox)
        if self.for_disk and not self.writing:
            self._release_durable()
        if self.ledger.storage.error is not None and not self.writing and (self.for_disk or self.for_replicas):
            # a write on the loop thread failed (a lamport reservation, a load): what the
            # waiting replies wait for is not written before the recovery
            self.refuse_waiting()
        return len(self.outbox) > before

    def recovered(self, dirty: dict[ContextState, int], now: float) -> None:
        """Storage recovered and wrote what RAM held (`Ledger.recover`)."""
        self.mesh.on_flushed(dirty)
        for ctx in dirty:
            self.watch.mark(ctx)
        self._release_durable()
        self.check_replicated(now)

    def _release_durable(self) -> None:
        keep = []
        durable = self.ledger.durable
        for w in self.for_disk:
            a = w.answer
            if durable(a.ctx, a.seq):
                assert isinstance(a, WhenDurable)
                self.outbox.append([*w.to, a.body])
            else:
                keep.append(w)
        self.for_disk = keep

    def _storage_reply(self, rid: RequestId, ctx: ContextState, seq: int) -> bytes:
        return codec.encode_error(
            rid, STORAGE,
            f"{ctx.name!r}#{seq} was appended in memory but storage failed before it reached disk "
            f"({self.ledger.storage.error}); not acknowledged. It is written if the disk recovers: "
            "retry later with the same dedup_id (without one a retry may append it twice)",
            {"context": ctx.name, "seq": seq, "error": self.ledger.storage.error},
        )

    def refuse_waiting(self) -> None:
        """Storage failed: every reply waiting for durability it cannot get now gets STORAGE."""
        self._release_durable()
        for w in self.for_disk:
            self.outbox.append([*w.to, self._storage_reply(w.id, w.answer.ctx, w.answer.seq)])
        self.for_disk = []
        keep = []
        for w in self.for_replicas:
            if self.ledger.durable(w.answer.ctx, w.answer.seq):
                keep.append(w)
            else:
                self.outbox.append([*w.to, self._storage_reply(w.id, w.answer.ctx, w.answer.seq)])
        self.for_replicas = keep

    def check_replicated(self, now: float) -> None:
        """Answer the appends whose entries are now held by enough other nodes (or timed out)."""
        if not self.for_replicas:
            return
        keep = []
        for w in self.for_replicas:
            a = w.answer
            assert isinstance(a, WhenReplicated)
            count = self.mesh.replicated(a.ctx, a.seq)
            if count >= a.replicas and (not self.sync or self.ledger.durable(a.ctx, a.seq)):
                self.outbox.append([*w.to, codec.encode_reply(w.id, {**a.fields, "replicated": count}, a.raw)])
            elif now > w.deadline:
                self.outbox.append([*w.to, codec.encode_error(
                    w.id, UNAVAILABLE,
                    f"{a.ctx.name!r}#{a.seq} was appended, but {count} other node(s) held it within "
                    f"{self.config.replica_timeout_ms} ms, not the {a.replicas} required (the entry stays)",
                    {"context": a.ctx.name, "seq": a.seq, "replicated": count, "required": a.replicas},
                )])
            else:
                keep.append(w)
        self.for_replicas = keep
        want = self.mesh.want_acks
        if want:  # asked again for a retry (`Mesh.ask_acks`): no longer once nothing of it waits
            waiting = {w.answer.ctx.name for w in keep}
            for name in [n for n in want if n not in waiting]:
                del want[name]

    # -- events: time ----------------------------------------------------------------------

    def next_deadline_ms(self, now: float) -> int:
        """How long the server may sleep: in time for due acks and writes, and at most 100 ms
        (to notice a stop signal)."""
        limit = int(ACK_LAZY_S * 1000) + 1 if self.mesh.ack_due else 100
        if self.pending_since is not None and not self.writing:
            left = self.pending_since + self.flush_delay - now
            # due now: no sleep (int() rounds -0.5 ms up to 0, and + 1 made it a 1 ms poll)
            return 0 if left <= 0 else min(limit, int(left * 1000) + 1)
        return limit

    def tick(self, now: float) -> None:
        """Every loop turn: the mesh's liveness, heartbeats and acks; replicas' deadlines; a slice
        of the background scrub; expired bulk loads."""
        mesh = self.mesh
        try:
            mesh.tick(now)  # (each peer's part is isolated inside; this is the last guard)
            mesh.flush_acks(now)
        except Exception as exc:
            mesh.peer_error("(several)", "the mesh tick failed", exc)
        if self.for_replicas:
            self.check_replicated(now)
        if now - self._last_scrub >= SCRUB_EVERY_S:
            # entries on disk checked against their leaf hashes in the background, a
            # slice at a time (a fraction of a millisecond), so damage nobody reads is found
            self._last_scrub = now
            passes = self.ledger.scrub_passes
            self.ledger.scrub(SCRUB_SLICE)
            if self.ledger.scrub_passes != passes:
                self._last_scrub = now + SCRUB_PASS_PAUSE_S  # every entry checked: the next pass later
        if now - self._last_housekeeping > HOUSEKEEPING_S:
            self._last_housekeeping = now
            self.ledger.expire_loads(now)
