"""Membership and replication between nodes: gossip heartbeats, liveness, push, anti-entropy.

No sockets here: the server gives a `Transport` (requests to a peer's ROUTER,
subscriptions to its PUB) and the time; replies and pushed messages come back
through `on_reply` and `on_push`. That keeps the logic steppable by hand.

Theory of operation
-------------------
- Every `heartbeat_s` each known peer gets a `heartbeat` request: our id,
  advertised addresses, Lamport clock, the peers we know (membership spreads by
  gossip) and a digest of our contexts: per mmh3 bucket, the XOR of a hash of
  (name, size, root) of its contexts. An in-sync heartbeat costs O(buckets).
- Any message from a peer (request or reply) is liveness. A peer silent for
  `suspect_after` heartbeats is suspect, for `dead_after` dead; it is alive
  again as soon as it speaks. Dead peers get a heartbeat only every few
  intervals, and the transport drops (never queues) what a peer cannot take.
- Push: we subscribe to the replication stream (prefix `watch.REPL_PREFIX`) of
  every peer's watch socket and apply entries that extend our replica (seq ==
  size + 1); a message past that is kept as *early* while the gap is pulled
  (the word "held" is the server's: replies waiting for disk or replicas); anything
  else is left to repair.
- Repair: when a peer's digest differs from ours in some buckets, we ask it for
  the heads of those buckets (`sync_heads`), and for every context where it is
  ahead we pull exactly the missing tail in chunks (`snapshot` at the chunk's
  end size, which carries the root there) and keep a chunk only if our log plus
  the chunk gives that root. A context whose histories differ at a common size
  is a fork: recorded, surfaced, never "fixed" by dropping anything.
- Hostile or broken peer input (SPEC 17.6): every address is parsed before a
  socket is made for it (the codec does it for heartbeats; replies here), the
  peer table holds at most `max_peers` (more are refused, counted); a gossiped
  peer that never answers is forgotten again, and a forgotten peer frees its
  slot, its socket and its acks. An error while ticking one peer or handling
  one peer's message is logged with the peer and counted (`peer_errors`), and
  never leaves the loop. Acks count only from known members.
"""

from __future__ import annotations

import collections
import enum
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, Protocol

from node import ledger as _ledger
from node.ledger import ContextState, Ledger, WireParts, packed_parts, wire_parts
from protocol import codec, digest, heads, merkle, watch
from protocol.address import parse_address
from protocol.digest import NBUCKETS
from protocol.entry import Entry, entry_from_wire
from protocol.errors import BAD_REQUEST, NOT_FOUND, Conflict, LedgerError, NotWriter, RemoteProtocolError, Unavailable
from protocol.heads import SignedHead
from protocol.lamport import MAX_LAMPORT

log = logging.getLogger(__name__)

PULL_CHUNK = 2_000  # entries per verified pull chunk: applying one holds the loop ~10 ms
PULL_WINDOW = 2  # pull chunks' worth of entries in flight to one peer (PULL_WINDOW * PULL_CHUNK)
MAX_PULL_REQUESTS = 32  # pull requests in flight to one peer (many small contexts at once)
# chunks of at most SMALL_PULL entries go together, up to codec.MAX_PULL_CHUNKS contexts and
# GROUP_ENTRIES entries per `snapshots` request: 100,000 contexts of 10 entries were 100,000
# round trips, each a request, a reply, a signature and a loop turn on both nodes
SMALL_PULL = 200
GROUP_ENTRIES = PULL_CHUNK // 2
# Acks to a writer go out at once when it waits for them (its pushes say `ack`, SPEC 17.5), else
# at most this often (pulled entries too): they only keep its view of the replicas fresh, or answer
# a replicas=N append whose push was lost a few ms later.
ACK_LAZY_S = 0.05
PRUNE_ACKS_SLACK = 1000  # acks of contexts out of RAM kept before a sweep drops them
MAX_EARLY_BYTES = 32 << 20  # early pushes kept (all contexts) while the gap before them is pulled
RETRY_UNSENT_TIMES = 5  # ... at most this many times per heartbeat interval
HEADS_PAGE = 2_000
MAX_VERIFYING = 1_000  # contexts whose writer is being asked whether it lost a tail, at once
# At most this many differing top buckets are narrowed down by `sync_digest` first (their
# fine digests, 2 KiB each); more differ when one node is far behind, and then asking for their
# heads at once costs no more than narrowing them down
MAX_NARROWED = 8
MAX_IDLE_ROUND_BACKOFF = 16  # heartbeats: longest wait before comparing again with a peer that had nothing for us
# ... after a comparison that went through this many heads for nothing (a peer far behind, catching
# up from us: each such comparison has it send all it holds again), the wait goes on up to
BIG_ROUND_HEADS = 20_000
MAX_BIG_ROUND_BACKOFF = 64  # heartbeats (32 s by default)
# A peer pulling entries from this node is catching up from it: comparing with it meanwhile would
# find it behind and cost it all its heads (at 1M contexts, ~60 MB and a look-up each per round).
# No comparison of more than MAX_NARROWED top buckets with it while it pulls (PULLING_BEATS after
# its last pull), but at least one every MAX_PULLING_SKIP heartbeats (2 minutes by default: a peer
# that never stops pulling still gets compared; each of those costs, at 1M contexts, all its heads).
PULLING_BEATS = 2
MAX_PULLING_SKIP = 240
MAX_HOLE_ASKS = 4  # damaged blocks (ledger.hole_block) being fetched again from peers at once
MAX_DIVERGED = 10_000  # remembered (context, peer) disagreements and logged forks; forgotten past that
DEAD_PROBE_EVERY = 5  # heartbeats: a dead peer still gets one every this many intervals
# A heartbeat that could not be sent (the connection to a peer is still being made, as right
# after start-up) is tried again this soon, not a whole interval later.
RETRY_UNSENT_S = 0.01
# A peer that is not a seed and stays dead this many dead-after spans is forgotten
# (10 heartbeats x 500 ms x 60 = 5 minutes by default): its address may be reused
# by a node that never meant to join this mesh.
FORGET_AFTER_DEAD_INTERVALS = 60
# A peer learned only by gossip that never answers (a made-up or stale address) is forgotten
# after this many dead-after spans, so it cannot keep a slot of `max_peers` for good.
FORGET_UNHEARD_AFTER_DEAD_INTERVALS = 2
# A peer whose heartbeats could not be sent this many dead-after spans in a row gets a new
# connection: ZeroMQ does not reconnect a connection it dropped for a protocol error (such as
# a message past MAXMSGSIZE), so without this one oversized reply would cut a peer off for good.
RESET_UNSENT_AFTER_DEAD_INTERVALS = 1
# Peers this node keeps (--max-peers): each is one DEALER socket, and a ZeroMQ context has
# 1,023 sockets in all (MAX_SOCKETS), which gossip alone could otherwise exhaust.
DEFAULT_MAX_PEERS = 64
MAX_MAX_PEERS = 512
MAX_REFUSED_LOGGED = 1_024  # addresses of other clusters remembered (to warn once each); bounded


class Transport(Protocol):
    def request(self, address: str, op: str, fields: dict[str, Any]) -> int | None:
        """Send a request to the peer at `address`; its id, or None when it could not be queued."""
        ...

    def subscribe(self, pub_address: str) -> None: ...

    def unsubscribe(self, pub_address: str) -> None: ...

    def forget(self, address: str) -> None:
        """The peer at `address` is no longer one: release what was held for it (its socket)."""
        ...


class Liveness(enum.StrEnum):
    """What this node believes of a peer. It changes only through `next_liveness`."""

    UNKNOWN = "unknown"  # learned of (a seed, gossip), never heard from
    ALIVE = "alive"  # spoke within `suspect_after` heartbeat intervals
    SUSPECT = "suspect"  # silent for `suspect_after` intervals: still a member, not yet given up
    DEAD = "dead"  # silent for `dead_after` intervals, or a node of another cluster at a seed address


ALIVE, SUSPECT, DEAD, UNKNOWN = Liveness.ALIVE, Liveness.SUSPECT, Liveness.DEAD, Liveness.UNKNOWN


def next_liveness(state: Liveness, *, heard: bool = False, silent: float = 0.0, suspect_after: int = 3,
                  dead_after: int = 10, foreign: bool = False) -> Liveness:
    """The one transition function of a peer's liveness: it spoke (`heard`), it has been silent
    for `silent` heartbeat intervals, or a node of another cluster answered at its address
    (`foreign`: a seed keeps its place, dead)."""
    if foreign:
        return DEAD
    if heard:
        return ALIVE
    if state == UNKNOWN:
        return state  # never heard from: no silence to time out (it is forgotten instead, see tick)
    if silent >= dead_after:
        return DEAD
    if silent >= suspect_after and state == ALIVE:
        return SUSPECT
    return state


@dataclass
class MeshStats:
    """The mesh's counters, shown whole in `status.replication` (SPEC 6.7, 17)."""

    heartbeats_sent: int = 0
    heartbeat_bytes: int = 0  # size of the last heartbeat sent (one per peer per interval)
    pushed_entries: int = 0
    skipped_pushes: int = 0  # pushed messages dropped unread (nothing new in them)
    push_mismatches: int = 0  # pushes that did not reproduce their writer's root (not applied)
    gap_pulls: int = 0  # pulls started by a gap in the pushes
    dropped_pushes: int = 0  # early pushes dropped for the bound (repair fetched them)
    pulled_entries: int = 0
    rewritten_entries: int = 0  # damaged entries rewritten from a peer's copy (ledger.repair_hole)
    pulled_bytes: int = 0  # bytes of pull replies (snapshot pages) received
    reply_bytes: int = 0
    refused_messages: int = 0  # peer messages dropped for values out of bounds (SPEC 17)
    refused_peers: int = 0  # new peers refused for max_peers
    bad_peer_addresses: int = 0  # peer addresses (gossip, pub) that did not parse, skipped
    peer_errors: int = 0  # failures handling one peer's message or sending to it, isolated
    ignored_acks: int = 0  # acks from node ids that are not known members
    acks_asked: int = 0  # contexts whose acks this node asked its replicas for again (`ask_acks`)
    unknown_gossip: int = 0  # gossiped peers whose node id is in no allowlist (with keys), not learned
    unsigned_pushes: int = 0  # pushed messages without a valid signature of their writer (with keys), not applied
    unsigned_pulls: int = 0  # pull chunks not covered by a head their writer signed (with keys), not applied


class Outstanding(NamedTuple):
    """A request sent to a peer whose reply has not come yet (`Mesh.pending`, by request id)."""

    address: str  # the peer's
    op: str  # as sent, or "repair" for a `snapshot` that fetches a damaged block again
    fields: dict[str, Any]  # as sent
    sent: float  # when (for giving up on it)


class Pull(NamedTuple):
    """A context to pull from a peer (17.2), up to `target` entries, whose root there is `root`."""

    context: str
    target: int
    root: bytes


@dataclass
class Peer:
    address: str  # its request (ROUTER) address, host:port
    node_id: str | None = None
    pub: str | None = None
    state: Liveness = UNKNOWN
    last_heard: float | None = None
    lamport: int = 0
    boot: str | None = None
    entries: int = 0
    sent: int = 0
    digest: list[int] = field(default_factory=list)
    syncing: bool = False  # a sync_digest, sync_heads or pull is under way with this peer
    no_fine: bool = False  # it answered sync_digest with an error (a version without it): top buckets only
    no_group: bool = False  # it answered snapshots with an error (a version without it): one context per pull
    pulls: collections.deque[Pull] = field(default_factory=collections.deque)  # (popped from near the front)
    # how many pulls at the front had every chunk asked for at the last `_next_pull`: it starts
    # there (hundreds of contexts in flight looked at again at every reply were 6% of a catch-up);
    # 0 whenever a chunk asked may have come back unapplied
    pull_cursor: int = 0
    pulled_entries: int = 0
    subscribed: str | None = None
    learned: float = 0.0  # when this node learned of it
    errors: int = 0  # failures while handling its messages or sending to it (peer_errors)
    bad_gossip: int = 0  # peer entries of its heartbeats whose address did not parse
    unsent_beats: int = 0  # heartbeats in a row that could not be sent to it
    idle_rounds: int = 0  # comparisons in a row (sync_heads rounds) that found nothing to pull from it
    round_heads: int = 0  # heads it sent in the comparison under way
    next_round_beat: int = 0  # no new comparison with it before this heartbeat (backoff, see _end_round)
    warned_silent: bool = False  # a seed that never answered was logged (once)
    conn: bytes | None = None  # its connection to our ROUTER (routing id of its heartbeats and pulls)
    pulled_us_beat: int = -(1 << 62)  # the heartbeat at which it last pulled entries from this node
    round_beat: int = -(1 << 62)  # the heartbeat at which this node last started a comparison with it


@dataclass
class Fork:
    context: str
    peer: str
    local_writer: str
    peer_writer: str
    local_size: int
    peer_size: int
    detected_lamport: int
    served_writer: str = ""  # whose history this node serves under the name (the rule's choice)
    set_aside: bool = False  # this node's own history was set aside (readable with get fork=...)
    histories_set_aside: int = 0  # how many times (a writer that lost tails in several crashes)


def canonical_writer(local_writer: str, peer_writer: str, peer_id: str | None, self_id: str) -> str | None:
    """Which of two histories of one context is served by default, the same on every node.

    Different writers (the context was created on both sides of a partition):
    the history of the writer whose id sorts first. One writer, two histories
    (it lost entries in a crash and wrote others under the same seqs): the one
    the writer holds now. None while that cannot be told (two replicas disagree
    and neither is the writer): decided once the writer itself is compared.
    """
    if local_writer != peer_writer:
        return min(local_writer, peer_writer)
    if local_writer == self_id or peer_id == local_writer:
        return local_writer
    return None


class Mesh:
    def __init__(
        self,
        ledger: Ledger,
        transport: Transport,
        *,
        address: str,
        pub: str,
        seeds: list[str],
        heartbeat_s: float,
        suspect_after: int = 3,
        dead_after: int = 10,
        boot: str = "",
        cluster: str = "ledger",
        on_applied: Callable[[ContextState], None] | None = None,
        ack_durable: bool = False,
        max_peers: int = DEFAULT_MAX_PEERS,
        seed_ids: dict[str, str] | None = None,
        known_id: Callable[[str], bool] | None = None,
        writer_key: Callable[[str], bytes | None] | None = None,
    ) -> None:
        self.stats = MeshStats()
        # With keys (node/access.py): only node ids bound to a key are learned by gossip, each
        # with its id (its key is how this node connects to it); None: any address, id unknown.
        self.known_id = known_id
        # With keys: a writer's public key by node id; pushed entries are applied only under a head
        # their writer signed (SPEC 13.6), and that head is kept for `head` replies
        self.writer_key = writer_key
        self.ledger = ledger
        self.transport = transport
        self.address = address
        self.pub = pub
        self.heartbeat_s = heartbeat_s
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self.boot = boot
        self.cluster = cluster
        self.seeds = {a for a in seeds if a != address}
        self.max_peers = max_peers
        self._cap_logged = False  # the refusal is logged once until a slot frees up
        self.forget_after_s = FORGET_AFTER_DEAD_INTERVALS * dead_after * heartbeat_s
        self.on_applied = on_applied or (lambda ctx: None)
        self.peers: dict[str, Peer] = {}  # by address
        self.by_id: dict[str, str] = {}  # node id -> address
        self._conns: dict[bytes, str] = {}  # a peer's connection to our ROUTER (routing id) -> its address
        # request id -> (address, op, fields, sent at)
        self.pending: dict[int, Outstanding] = {}
        self.now = 0.0  # the latest time given to any entry point
        self.forks: dict[str, Fork] = {}
        self._refused: set[str] = set()  # addresses of other clusters, warned about once
        self.ack_due: dict[str, str] = {}  # context -> its writer, to be told how far we hold it
        self.last_ack = -1e18
        self.ack_now = False  # a writer waits for our acks
        # sync durability: acknowledge only what is on disk here (flushed_seq), so that a
        # replicas=N reply means N other nodes hold the entry at this node's durability level
        self.ack_durable = ack_durable
        self.pulling: dict[str, str] = {}  # context -> the peer it is being pulled from
        # pushed messages that arrived past a gap, per context: (first seq, count, frames), in order
        self.early: dict[str, list[tuple[int, int, list[bytes]]]] = {}
        self.early_entries = 0
        self.early_bytes = 0
        self.replica_sizes: dict[str, dict[str, int]] = {}  # our context -> peer id -> size it holds
        self.on_ack: Callable[[float], None] = lambda now: None  # acks came in (the core's replicas=N)
        self.awaited: Callable[[], Collection[str]] = frozenset  # contexts whose appends wait for acks
        # our contexts whose acks the next heartbeats ask for again, until when (`ask_acks`)
        self.want_acks: dict[str, float] = {}
        self.last_beat = -1e18
        self.unsent: dict[str, int] = {}  # peers whose last heartbeat could not be sent -> retries so far
        self._last_retry = -1e18
        self.beats = 0
        self._verifying: dict[str, tuple[int, int]] = {}  # context -> (ctx id, size held) while its writer is asked
        self._lost_tail: set[str] = set()  # contexts whose writer lost a tail: pulled from the writer only
        self._diverged: dict[tuple[str, str], int] = {}  # (context, peer address) -> our ctx id it differs from
        self._fork_logged: set[tuple[str, int, str]] = set()
        self._hole_asks: dict[int, str] = {}  # request id -> context whose damaged block it fetches
        # With keys: contexts whose writer signed two histories (SPEC 13.6): both signed heads and the
        # proof from this node's copy; kept, shown in status and head, never acted on
        self.equivocations: dict[str, dict[str, Any]] = {}
        # pulls ask for entries packed (SPEC 17.2) where they are checked in C: each then stored as
        # it came (without the module each bin would be decoded on its own, then encoded again: no gain)
        self.packed = _ledger.ACCELERATED
        for s in seeds:
            if s != address:
                self.peers[s] = Peer(s)
        for s, node_id in (seed_ids or {}).items():
            if s in self.peers:
                self.peers[s].node_id = node_id
                self.by_id[node_id] = s

    # -- membership -------------------------------------------------------------------

    def _peer(self, address: str, node_id: str | None) -> Peer | None:
        """The peer at `address` (learned now if new); None for this node itself, or when the
        peer table is full (`max_peers`). `address` is already parsed (protocol.address)."""
        if address == self.address or node_id == self.ledger.node_id:
            return None
        known = self.peers.get(address)
        moving = node_id is not None and self.by_id.get(node_id) not in (None, address)
        if known is None and not moving and len(self.peers) >= self.max_peers:
            self.stats.refused_peers += 1
            if not self._cap_logged:
                self._cap_logged = True
                log.warning("not adding peer at %s%s: this node keeps at most %d peers (--max-peers); "
                            "further refusals are counted in status (refused_peers)", address,
                            f" ({node_id})" if node_id else "", self.max_peers)
            return None
        if known is not None and node_id is not None and known.node_id not in (None, node_id):
            # another node now answers at this address: not a restart of the old one
            log.info("the node at %s is now %s (was %s)", address, node_id, known.node_id)
            self._forget(known)
            self.peers[address] = Peer(address, learned=self.now)
        if node_id is not None:
            old = self.by_id.get(node_id)
            if old is not None and old != address:
                # the same node now speaks from another address: move it
                p = self.peers.get(old)
                if p is not None:
                    self._forget(p, keep_acks=True)
                log.info("peer %s moved from %s to %s", node_id, old, address)
        p = self.peers.get(address)
        if p is None:
            p = self.peers[address] = Peer(address, learned=self.now)
            log.info("learned of peer at %s%s", address, f" ({node_id})" if node_id else "")
        if node_id is not None:
            p.node_id = node_id
            self.by_id[node_id] = address
        return p

    def _heard(self, p: Peer, now: float, lamport: int | None = None) -> None:
        if p.state != ALIVE:
            log.info("peer %s at %s is %s", p.node_id or "?", p.address, "back" if p.state != UNKNOWN else "up")
        p.state = next_liveness(p.state, heard=True)
        p.last_heard = now
        if lamport is not None:
            p.lamport = max(p.lamport, lamport)
            self.ledger.observe(lamport)

    def _learn(self, p: Peer, m: dict[str, Any], now: float) -> None:
        boot = m.get("boot")
        if isinstance(boot, str):
            if p.boot is not None and boot != p.boot:
                log.info("peer %s restarted", p.node_id)
                p.idle_rounds = p.next_round_beat = 0  # compare at once: it may have lost or gained anything
                self._drop_early_of(p.node_id)  # what it pushed before may be lost with it
                self._forget_requests(p)  # and what we asked of it will not be answered
                if p.subscribed:
                    # a new connection to its PUB: the old one may have been dropped for good
                    # (ZeroMQ does not reconnect after a protocol error, e.g. an oversized message)
                    self.transport.unsubscribe(p.subscribed)
                    p.subscribed = None
            p.boot = boot
        pub = m.get("pub")
        if isinstance(pub, str) and pub != p.subscribed:
            try:
                pub = parse_address(pub, "pub")
            except RemoteProtocolError as exc:
                self._bad_address(p, exc.message)
                pub = None
        if isinstance(pub, str) and pub != p.subscribed:
            if p.subscribed:
                self.transport.unsubscribe(p.subscribed)
            p.pub = pub
            self.transport.subscribe(pub)
            p.subscribed = pub
        entries = m.get("entries")
        if type(entries) is int:
            p.entries = entries
        for item in m.get("peers") or ():
            if isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item):
                nid, addr = item
                if addr != self.address and nid != self.ledger.node_id and addr not in self.peers:
                    if nid in self.by_id:
                        continue  # known under its own address already
                    if self.known_id is None:
                        self._peer(addr, None)
                    elif self.known_id(nid):
                        self._peer(addr, nid)  # (connected to with nid's key: an impostor fails the handshake)
                    else:
                        self.stats.unknown_gossip += 1
        raw = m.get("digest")
        buckets = digest.decode(raw) if isinstance(raw, bytes) else None
        if buckets is not None:
            p.digest = buckets
            self._maybe_sync(p)

    def _bad_address(self, p: Peer, error: str, count: int = 1) -> None:
        """Peer data with an address that does not parse: skipped, counted, logged once per peer."""
        self.stats.bad_peer_addresses += count
        if not p.bad_gossip:
            log.warning("peer %s at %s sent %d address(es) that are not HOST:PORT, skipped (first: %s); "
                        "further ones are counted in status (bad_peer_addresses)", p.node_id or "?", p.address,
                        count, error)
        p.bad_gossip += count

    def peer_error(self, address: str, what: str, exc: BaseException | None = None, expected: bool = False) -> None:
        """A failure while handling the message of, or sending to, the peer at `address`: it is
        isolated to that peer (the loop goes on), counted, and logged (the 1st, 2nd, 4th, 8th...
        time per peer, so a peer that fails on every heartbeat does not flood the log), with a
        traceback unless it is `expected` (a resource error) or a protocol error."""
        self.stats.peer_errors += 1
        p = self.peers.get(address)
        n = 1
        if p is not None:
            p.errors += 1
            n = p.errors
        if n & (n - 1) == 0:
            log.warning("%s, peer %s at %s (failure %d with this peer): %s", what,
                        p.node_id if p is not None and p.node_id else "?", address, n,
                        f"{type(exc).__name__}: {exc}" if exc is not None else "",
                        exc_info=exc is not None and not expected
                        and not isinstance(exc, (LedgerError, RemoteProtocolError, OSError)))

    def heartbeat_fields(self) -> dict[str, Any]:
        buckets = self.ledger.digest(NBUCKETS)
        return {
            "node_id": self.ledger.node_id,
            "cluster": self.cluster,
            "address": self.address,
            "pub": self.pub,
            "boot": self.boot,
            "lamport": self.ledger.clock.value,
            "entries": self.ledger.entries_total,
            "peers": [[p.node_id, a] for a, p in self.peers.items() if p.node_id and p.state in (ALIVE, SUSPECT)],
            "digest": digest.encode(buckets),
            **self._want_acks_field(),
        }

    def ask_acks(self, name: str, until: float) -> None:
        """Have the heartbeats until `until` ask the replicas to acknowledge `name` (ours) again:
        a retried `replicas` append answered from its dedup_id, after what they acknowledged of
        its context was forgotten (acks of contexts out of RAM are not kept, `rpc_ack`), would
        otherwise wait for acks that never come (followers ack only entries they apply)."""
        want = self.want_acks
        want.pop(name, None)
        while len(want) >= codec.MAX_WANT_ACKS:
            del want[next(iter(want))]  # the oldest ask goes
        want[name] = until
        self.stats.acks_asked += 1

    def _want_acks_field(self) -> dict[str, Any]:
        want = self.want_acks
        if not want:
            return {}
        for name in [n for n, until in want.items() if until < self.now]:
            del want[name]
        return {"want_acks": list(want)} if want else {}

    def tick(self, now: float) -> None:
        """Liveness and heartbeats; call often (every loop turn is fine)."""
        self.now = now
        if now - self.last_beat < self.heartbeat_s:
            if self.unsent and now - self._last_retry >= RETRY_UNSENT_S:
                self._retry_unsent(now)
            return
        self.last_beat = now
        self.beats += 1
        self.unsent = {}
        fields = self.heartbeat_fields()
        if self.peers:
            self.stats.heartbeat_bytes = len(codec.encode_request("heartbeat", self.beats, fields))
        for p in list(self.peers.values()):
            try:
                self._tick_peer(p, now, fields)
            except Exception as exc:  # one peer's fault stays with it
                self.peer_error(p.address, "heartbeat failed", exc)
        self._last_retry = now
        self._expire_requests(now)
        self._prune_acks()
        if self.ledger.holes:
            self._repair_holes()

    def _tick_peer(self, p: Peer, now: float, fields: dict[str, Any]) -> None:
        if (p.state == DEAD and p.address not in self.seeds and p.last_heard is not None
                and now - p.last_heard > self.forget_after_s):
            log.info("forgetting peer %s at %s (dead for %.0f s)", p.node_id, p.address, now - p.last_heard)
            self._forget(p)
            return
        if (p.last_heard is None and p.address not in self.seeds
                and now - p.learned > FORGET_UNHEARD_AFTER_DEAD_INTERVALS * self.dead_after * self.heartbeat_s):
            log.info("forgetting peer at %s: it never answered", p.address)
            self._forget(p)
            return
        if (p.last_heard is None and not p.warned_silent and p.address in self.seeds
                and now - p.learned > self.dead_after * self.heartbeat_s):
            # a seed given in --peers that never answered (as long as a known peer takes to be
            # declared dead): nothing else would say so, and a typo'd port looks like a quiet mesh
            p.warned_silent = True
            log.warning("--peers %s has not answered in %.0f s: is a ledger-node of cluster %r listening there "
                        "(its request port, not its watch port) and reachable from here? This node keeps trying",
                        p.address, now - p.learned, self.cluster)
        if p.last_heard is not None:
            silent = (now - p.last_heard) / self.heartbeat_s
            was, p.state = p.state, next_liveness(p.state, silent=silent, suspect_after=self.suspect_after,
                                                  dead_after=self.dead_after)
            if p.state == DEAD and was != DEAD:
                log.warning("peer %s at %s is dead (silent %.1f s)", p.node_id or "?", p.address,
                            now - p.last_heard)
                p.syncing = False
                self._drop_pulls(p)
                self._drop_early_of(p.node_id)
            elif p.state == SUSPECT and was != SUSPECT:
                log.info("peer %s at %s is suspect", p.node_id or "?", p.address)
        if p.state == DEAD and self.beats % DEAD_PROBE_EVERY:
            return
        if self._send(p, "heartbeat", fields) is not None:
            self.stats.heartbeats_sent += 1
            p.unsent_beats = 0
            return
        if p.state != DEAD:
            self.unsent[p.address] = 0
        p.unsent_beats += 1
        if p.unsent_beats >= RESET_UNSENT_AFTER_DEAD_INTERVALS * self.dead_after:
            log.info("no heartbeat could be sent to %s for %d intervals; connecting to it anew",
                     p.address, p.unsent_beats)
            p.unsent_beats = 0
            self.transport.forget(p.address)

    def _retry_unsent(self, now: float) -> None:
        self._last_retry = now
        fields = self.heartbeat_fields()
        for address, tries in list(self.unsent.items()):
            p = self.peers.get(address)
            if p is None or p.state == DEAD or tries >= RETRY_UNSENT_TIMES:
                # not a connection still being made: the regular beats probe it
                del self.unsent[address]
                continue
            try:
                sent = self._send(p, "heartbeat", fields) is not None
            except Exception as exc:  # one peer's fault stays with it
                self.peer_error(address, "heartbeat failed", exc)
                sent = False
            if sent:
                self.stats.heartbeats_sent += 1
                p.unsent_beats = 0
                del self.unsent[address]
            else:
                self.unsent[address] = tries + 1

    def _forget(self, p: Peer, keep_acks: bool = False) -> None:
        """Drop `p` from the peer table (its slot of max_peers, its socket, its subscription, and
        unless it only moved to another address, what it acknowledged)."""
        if self.peers.get(p.address) is p:
            del self.peers[p.address]
        self.unsent.pop(p.address, None)
        if p.conn is not None and self._conns.get(p.conn) == p.address:
            del self._conns[p.conn]
        if p.node_id is not None and self.by_id.get(p.node_id) == p.address:
            del self.by_id[p.node_id]
            if not keep_acks:
                for sizes in self.replica_sizes.values():
                    sizes.pop(p.node_id, None)
        if p.subscribed:
            self.transport.unsubscribe(p.subscribed)
        self.transport.forget(p.address)
        if len(self.peers) < self.max_peers:
            self._cap_logged = False

    def _expire_requests(self, now: float) -> None:
        # A request whose reply was lost (or whose peer died) is forgotten after a
        # while, so that the sync it belonged to can start again.
        # A pull chunk may wait behind others at a busy peer; a sync_heads or head is answered at
        # once, so a lost one (a dropped reply, a peer that restarted) holds the repair up for a
        # few heartbeats only.
        limit = max(10 * self.heartbeat_s, 5.0)
        quick = max(4 * self.heartbeat_s, 1.0)
        for rid, (addr, op, _f, sent) in list(self.pending.items()):
            p = self.peers.get(addr)
            if p is None or p.state == DEAD or now - sent > (limit if op == "snapshot" else quick):
                self._abandon(rid)
                if p is not None:
                    p.syncing = False
                    self._drop_pulls(p)

    def _forget_requests(self, p: Peer) -> None:
        for rid in [rid for rid, (addr, _op, _f, _sent) in self.pending.items() if addr == p.address]:
            self._abandon(rid)
        p.syncing = False
        self._drop_pulls(p)

    def _abandon(self, rid: int) -> None:
        """A request whose reply will not come (or will be ignored): forget it and what waits on it."""
        _addr, op, fields, _sent = self.pending.pop(rid)
        if op == "head":
            self._verifying.pop(fields["context"], None)
        elif op == "repair":
            self._hole_asks.pop(rid, None)

    def _send(self, p: Peer, op: str, fields: dict[str, Any]) -> int | None:
        rid = self.transport.request(p.address, op, fields)
        if rid is not None:
            p.sent += 1
            if op not in ("heartbeat", "ack"):
                self.pending[rid] = Outstanding(p.address, op, fields, self.now)
        return rid

    def refuse(self, sender: str, what: str) -> None:
        """A peer message dropped for a value out of bounds: counted, and logged (not every one)."""
        self.stats.refused_messages += 1
        n = self.stats.refused_messages
        if n <= 10 or n % 1000 == 0:
            log.warning("dropped %s from %s (%d dropped so far)", what, sender, n)

    # -- requests from peers (served by the node's ROUTER) ------------------------------

    def rpc_heartbeat(self, hb: codec.Heartbeat, now: float, conn: bytes | None = None) -> dict[str, Any]:
        """A peer's heartbeat; `conn`: the routing id of its connection (its pulls come on it)."""
        self.now = now
        if hb.cluster != self.cluster:
            if hb.address not in self._refused and len(self._refused) < MAX_REFUSED_LOGGED:
                self._refused.add(hb.address)
                log.warning("refusing heartbeats of %s at %s: it belongs to cluster %r, this node to %r",
                            hb.node_id, hb.address, hb.cluster, self.cluster)
            raise Conflict(f"this node belongs to cluster {self.cluster!r}, not {hb.cluster!r}",
                           {"cluster": self.cluster})
        p = self._peer(hb.address, hb.node_id)
        fresh = False
        if p is not None:
            # a node just (re)started or back from the dead: answer with our digest, so it
            # can start its repair now rather than at our next heartbeat
            fresh = p.state != ALIVE or p.boot != hb.boot
            self._heard(p, now, hb.lamport)
            if conn is not None and conn != p.conn:
                if p.conn is not None and self._conns.get(p.conn) == p.address:
                    del self._conns[p.conn]
                p.conn = conn
                self._conns[conn] = p.address
            if hb.bad_peers:
                self._bad_address(p, hb.bad_peer_error, hb.bad_peers)
            self._learn(p, hb.as_map(), now)
            if hb.want_acks:
                self._ack_again(hb.node_id, hb.want_acks)
        else:
            # this node itself, or refused for max_peers: nothing is learned from it (its clock
            # included: entries reach this node only from peers, which carry their own clocks)
            self.stats.bad_peer_addresses += hb.bad_peers
        out = {"node_id": self.ledger.node_id, "lamport": self.ledger.clock.value, "boot": self.boot,
               "address": self.address, "pub": self.pub, "cluster": self.cluster}
        if fresh:
            out["digest"] = digest.encode(self.ledger.digest(NBUCKETS))
        return out

    def _ack_again(self, writer: str, names: Iterable[str]) -> None:
        """The writer asks for acks of these contexts again (`ask_acks`): those we hold of its are
        acknowledged at once, as far as `flush_acks` may (under `sync`, what is on our disk)."""
        contexts = self.ledger.contexts
        for name in names:
            ctx = contexts.peek(name)  # (a look for a peer: not let into the cache)
            if ctx is not None and ctx.writer == writer and writer != self.ledger.node_id and ctx.size:
                self.ack_due[name] = writer
                self.ack_now = True

    def pulled_by(self, conn: bytes | None) -> None:
        """Entries were served (snapshot, snapshots) on connection `conn`: when it is a peer's,
        that peer is catching up from this node (see PULLING_BEATS)."""
        address = self._conns.get(conn) if conn is not None else None
        p = self.peers.get(address) if address is not None else None
        if p is not None:
            p.pulled_us_beat = self.beats

    def rpc_sync_heads(self, req: codec.SyncHeads) -> dict[str, Any]:
        heads, more = self.ledger.heads_in_buckets(set(req.buckets), req.nbuckets, req.after, HEADS_PAGE)
        return {"heads": heads, "more": more}

    # -- replies to our requests ----------------------------------------------------------

    def on_reply(self, address: str, reply: dict[str, Any], now: float, nbytes: int = 0) -> None:
        self.now = now
        self.stats.reply_bytes += nbytes
        p = self.peers.get(address)
        if p is None:
            return
        err = reply.get("error") if not reply.get("ok") else None
        other = err.get("cluster") if isinstance(err, dict) else reply.get("cluster")
        if isinstance(other, str) and other != self.cluster:
            # a node of another cluster answers at this address: not a peer
            if address not in self._refused and len(self._refused) < MAX_REFUSED_LOGGED:
                self._refused.add(address)
                log.warning("the node at %s belongs to cluster %r, not %r; %s", address, other, self.cluster,
                            "it stays a seed but is not joined" if address in self.seeds else "forgetting it")
            if address in self.seeds:
                p.state = next_liveness(p.state, foreign=True)
            else:
                self._forget(p)
            return
        nid = reply.get("node_id")
        if isinstance(nid, str) and p.node_id != nid:
            if nid == self.ledger.node_id:
                log.warning("%s is this node itself; forgetting it as a peer", address)
                self._forget(p)
                return
            p = self._peer(address, nid) or p  # learn the id first, so the log can name it
        lamport = reply.get("lamport")
        if lamport is not None and not (type(lamport) is int and 0 <= lamport <= MAX_LAMPORT):
            # a clock past the ceiling would poison ours and, through our heartbeats, every node's
            self.refuse(address, f"a reply with lamport {lamport!r} (the ceiling is {MAX_LAMPORT})")
            return
        self._heard(p, now, lamport)
        if isinstance(reply.get("pub"), str) or isinstance(reply.get("boot"), str):
            self._learn(p, {k: reply[k] for k in ("pub", "boot", "digest") if k in reply}, now)
        rid = reply.get("id")
        req = self.pending.pop(rid, None) if type(rid) is int else None
        if req is None:
            return
        _, op, fields, _sent = req
        try:
            if op == "head":
                self._on_head(p, reply, fields)
                return
            if op == "repair":
                self._hole_asks.pop(rid, None)  # type: ignore[arg-type]  # (an int: it was in pending)
                self._on_repair(p, reply, fields)
                return
            if not reply.get("ok"):
                err = reply.get("error")
                if not isinstance(err, dict):  # a peer's reply is input like any other
                    err = {"code": "?", "message": f"a failed reply without an error map ({type(err).__name__})"}
                log.warning("%s to %s failed: %s %s", op, address, err.get("code"), err.get("message"))
                if op == "snapshot":
                    # only that context's pull: the peer's other contexts are unaffected (a fork
                    # of one context must not hold back the repair of the rest)
                    self._drop_pulls(p, fields["context"])
                    self._next_pull(p)
                    return
                if op == "snapshots":
                    names = [c[0] for c in fields["chunks"]]
                    if err.get("code") in ("UNKNOWN_OP", "BAD_REQUEST", "FORBIDDEN"):
                        # a peer of a version without snapshots: its contexts one per request
                        p.no_group = True
                        p.pull_cursor = 0
                        for name in names:
                            if self.pulling.get(name) == p.address:
                                del self.pulling[name]
                    else:
                        for name in names:
                            self._drop_pulls(p, name)
                    self._next_pull(p)
                    return
                if op == "sync_digest":
                    # a peer of a version without sync_digest (or failing it): the top buckets'
                    # heads, as before; not asked for fine digests again
                    p.no_fine = err.get("code") in ("UNKNOWN_OP", "BAD_REQUEST", "FORBIDDEN")
                    if self._send(p, "sync_heads", {"buckets": fields["buckets"], "nbuckets": NBUCKETS}) is None:
                        p.syncing = False
                    return
                p.syncing = False
                self._drop_pulls(p)
                return
            if op == "sync_heads":
                self._on_heads(p, reply, fields)
            elif op == "sync_digest":
                self._on_digest(p, reply, fields)
            elif op == "snapshot":
                self.stats.pulled_bytes += nbytes
                self._on_chunk(p, reply, fields)
            elif op == "snapshots":
                self.stats.pulled_bytes += nbytes
                self._on_chunks(p, reply, fields)
        except (LedgerError, RemoteProtocolError) as exc:
            log.warning("replication from %s stopped for now: %s", address, exc)
            p.syncing = False
            self._drop_pulls(p)

    # -- push ---------------------------------------------------------------------------

    def on_push(self, frames: list[bytes]) -> None:
        """A message from a peer's replication stream: apply entries that extend our replica.

        A message that starts past our size (one before it was lost: a high-water mark,
        a reconnection) is kept as early, and the missing range is pulled from the context's
        writer at once; once it is in, the early messages apply in order. So a lost message costs
        a round trip, not a wait for the next digest."""
        peek = watch.peek_entries(frames)
        if peek is not None:
            # Decide from the headers alone before paying for a full decode.
            name, first, count = peek
            ctx = self.ledger.contexts.get(name)
            size = ctx.size if ctx is not None else 0
            if first + count - 1 <= size or (ctx is not None and ctx.writer == self.ledger.node_id):
                self.stats.skipped_pushes += 1
                return
            if first > size + 1 or name in self.early:
                self._keep_early(name, ctx, first, count, frames)
                return
        self._apply_push(frames)

    def _apply_push(self, frames: list[bytes]) -> bool:
        """Apply one pushed message if it extends the replica; whether it did."""
        try:
            m = watch.decode_message(frames)
        except RemoteProtocolError:
            return False
        if not isinstance(m, watch.EntriesMsg) or not m.entries:
            return False
        ctx = self.ledger.contexts.get(m.context)
        size = ctx.size if ctx is not None else 0
        entries = [e for e in m.entries if e.seq > size]
        if not entries or entries[0].seq != size + 1:
            return False  # duplicate, or a gap: repair pulls it
        if ctx is not None and ctx.writer == self.ledger.node_id:
            return False  # ours: a peer cannot extend it (a fork shows in the digest)
        signed = None
        if self.writer_key is not None:
            signed = self._signed_head(m, entries[0].writer)
            if signed is None:
                return False
            if ctx is not None:
                self._check_equivocation(ctx, signed)
        try:
            applied = self.ledger.apply_replicated(m.context, entries, m.root)
        except LedgerError as exc:
            log.warning("pushed entries of %r not applied: %s", m.context, exc)
            return False
        if applied is None:
            # sound entries that do not end at their writer's root: our replica is not a
            # prefix of its history (it lost a tail in a crash and wrote others): compare
            assert m.root is not None
            self._push_diverges(m.context, entries[-1].seq, m.root, entries[0].writer)
            return False
        self.stats.pushed_entries += len(entries)
        if signed is not None:
            self.ledger.set_signed(applied, signed)
        self.ack_due[applied.name] = applied.writer
        if m.ack:
            self.ack_now = True
        self.on_applied(applied)
        return True

    def _signed_head(self, m: watch.EntriesMsg, writer: str) -> SignedHead | None:
        """The head `m` ends at, signed by `writer` with the key this node binds to it; None (counted,
        logged now and then) when the message carries no such signature: its entries are not applied."""
        key = self.writer_key(writer) if self.writer_key is not None else None
        if key is not None and m.root is not None and m.sig is not None:
            head = SignedHead(m.context, m.entries[-1].seq, m.root, key, 0, m.sig)
            if head.verify():
                return head
        self.stats.unsigned_pushes += 1
        why = ("its writer has no key here" if key is None else "no signature" if m.sig is None
               else "a signature that does not verify")
        self.refuse("(push stream)", f"pushed entries of {m.context!r} by {writer!r} ({why})")
        return None

    def _pull_signed(self, p: Peer, name: str, writer: str, end: int, root: bytes, reply: Mapping[str, Any]) -> bool:
        """With keys, a pull chunk is applied only under a head its writer signed (SPEC 17.2): one at
        exactly (end, root), or a later one with a consistency proof that (end, root) is a prefix of it."""
        key = self.writer_key(writer) if self.writer_key is not None else None
        why = "its writer has no key here"
        if key is not None:
            why = "no head signed by its writer"
            raw = reply.get("signed")
            if raw is not None:
                try:
                    h = heads.from_map(raw)
                    if h.context != name or not h.verify(key):
                        why = "a signed head that does not verify"
                    elif h.size == end:
                        if h.root == root:
                            self._check_set_aside(name, h)
                            return True
                        why = "a signed head of another root"
                    elif h.size > end:
                        proof = reply.get("signed_proof")
                        if not isinstance(proof, list) or len(proof) > 128:
                            raise RemoteProtocolError(NOT_FOUND, "no consistency proof")
                        merkle.verify_consistency(end, h.size, root, h.root, proof)
                        self._check_set_aside(name, h)
                        return True
                    else:
                        why = "a signed head short of the chunk"
                except (RemoteProtocolError, LedgerError, TypeError, ValueError):
                    why = "a signed head without a valid proof"
        self.stats.unsigned_pulls += 1
        self.refuse(p.address, f"a pull chunk of {name!r} up to #{end} by {writer!r} ({why})")
        return False

    def _check_equivocation(self, ctx: ContextState, new: SignedHead) -> None:
        """`new`, verified, and the signed head this node keeps for `ctx` (the same key): when they
        are two histories, keep both and the proof from this node's copy (SPEC 13.6). An async
        writer that lost its unflushed tail in a crash and wrote again does exactly this; so does a
        lying one. Recorded and logged, never acted on here (the fork rules of 17.4 do that)."""
        old = ctx.signed
        if (old is None or old.key != new.key or new.size > old.size or ctx.name in self.equivocations
                or len(self.equivocations) >= MAX_DIVERGED):
            return  # (a later head: this node's copy cannot tell whether it extends the kept one)
        ours = old.root if new.size == old.size else self.ledger.root_at(ctx, new.size)
        if ours == new.root:
            return
        proof = ([] if new.size == old.size else
                 merkle.consistency_proof(new.size, old.size, self.ledger.node_getter(ctx)))
        self.equivocations[ctx.name] = {
            "context": ctx.name, "writer": ctx.writer, "heads": [old.to_map(), new.to_map()],
            "root_at": new.size, "root": ours, "proof": proof,
        }
        log.warning("EQUIVOCATION: writer %s signed two histories of %r: %d entries with root %s, and %d with "
                    "root %s where its earlier signed head gives %s (an async writer that lost a tail in a crash "
                    "does this; both signed heads are kept in status)", ctx.writer, ctx.name, old.size,
                    old.root.hex()[:16], new.size, new.root.hex()[:16], ours.hex()[:16])

    def _check_set_aside(self, name: str, new: SignedHead) -> None:
        """A verified head of a context whose older history this node set aside (17.4): the same key
        signing both is an equivocation to keep (a writer that lost its tail and wrote again)."""
        for old_ctx in reversed(self.ledger.aside.get(name, ())):
            if old_ctx.signed is not None and old_ctx.signed.key == new.key:
                self._check_equivocation(old_ctx, new)
                return

    def _keep_signed(self, ctx: ContextState, raw: Any, size: int, root: bytes) -> None:
        """A pull reply's signed head (SPEC 13.6), kept for `head` when its writer signed exactly what
        this node now holds. (Pulled entries are not yet refused without one: SPEC 13.5.)"""
        if self.writer_key is None or raw is None:
            return
        key = self.writer_key(ctx.writer)
        try:
            h = heads.from_map(raw)
        except RemoteProtocolError:
            return
        if key is not None and (h.context, h.size, h.root) == (ctx.name, size, root) and h.verify(key):
            self.ledger.set_signed(ctx, h)

    def _keep_early(self, name: str, ctx: ContextState | None, first: int, count: int, frames: list[bytes]) -> None:
        nbytes = len(frames[-1])
        if self.early_bytes + nbytes > MAX_EARLY_BYTES:
            # too far behind to buffer: drop what is kept of it; the digest repair pulls it all
            self._drop_early(name)
            self.stats.dropped_pushes += 1
            return
        self.early.setdefault(name, []).append((first, count, frames))
        self.early_entries += count
        self.early_bytes += nbytes
        self._apply_early(name)  # applies what extends the replica, pulls the gap before the rest

    def _push_diverges(self, name: str, end: int, root: bytes, writer: str) -> None:
        self.stats.push_mismatches += 1
        self._drop_early(name)
        p = self.peers.get(self.by_id.get(writer, ""))
        log.warning("pushed entries of %r up to #%d do not reproduce writer %s's root on this replica; "
                    "comparing the histories", name, end, writer)
        if p is not None and p.state != DEAD:
            self._compare(p, name, end, root, writer)  # a pull that ends in the fork rule (17.4)
            self._next_pull(p)

    def _drop_early_of(self, writer: str | None) -> None:
        for name in list(self.early):
            ctx = self.ledger.contexts.get(name)
            if ctx is None or ctx.writer == writer:
                self._drop_early(name)

    def _pull_gap(self, name: str, ctx: ContextState | None, target: int) -> None:
        """Pull `name` up to `target` from its writer now (when it is a live peer and no pull
        of it is under way); a context we do not hold yet waits for the digest repair."""
        if ctx is None or name in self.pulling:
            return
        p = self.peers.get(self.by_id.get(ctx.writer, ""))
        if p is None or p.state == DEAD:
            return
        if not any(n == name for n, _t, _r in p.pulls):
            p.pulls.insert(0, Pull(name, target, b""))
            p.pull_cursor = 0
            self.stats.gap_pulls += 1
        self._next_pull(p)

    def _drop_early(self, name: str) -> None:
        for _first, count, frames in self.early.pop(name, ()):
            self.early_entries -= count
            self.early_bytes -= len(frames[-1])

    def _apply_early(self, name: str) -> None:
        """After a pull of `name`: apply the early messages that now extend it, in order."""
        early = self.early.get(name)
        while early:
            first, count, frames = early[0]
            ctx = self.ledger.contexts.get(name)
            size = ctx.size if ctx is not None else 0
            if first > size + 1:
                self._pull_gap(name, ctx, first - 1)  # another gap
                return
            early.pop(0)
            self.early_entries -= count
            self.early_bytes -= len(frames[-1])
            if first + count - 1 > size:
                self._apply_push(frames)
        self.early.pop(name, None)

    # -- repair ---------------------------------------------------------------------------

    def _maybe_sync(self, p: Peer) -> None:
        if p.syncing or p.state == DEAD or self.beats < p.next_round_beat:
            return
        differ = digest.differing(self.ledger.digest(NBUCKETS), p.digest)
        if not differ:
            return
        if (len(differ) > MAX_NARROWED and self.beats - p.pulled_us_beat <= PULLING_BEATS
                and self.beats - p.round_beat < MAX_PULLING_SKIP):
            # it is catching up from us (one repair session per pair at a time); a difference
            # of a few buckets is still compared at once (a few heads: cheap, and what a peer
            # pulling a gap all the time would otherwise keep from us)
            return
        fields: dict[str, Any]
        if len(differ) <= MAX_NARROWED and not p.no_fine:
            op, fields = "sync_digest", {"buckets": differ}
        else:
            op, fields = "sync_heads", {"buckets": differ, "nbuckets": NBUCKETS}
        if self._send(p, op, fields) is not None:
            p.syncing = True
            p.round_heads = 0
            p.round_beat = self.beats

    def _on_digest(self, p: Peer, reply: dict[str, Any], fields: dict[str, Any]) -> None:
        """The fine digests of the top buckets that differed: ask for the heads of the fine
        buckets that differ (one changed context among 1M: ~30 heads, not ~8,000)."""
        tops = fields["buckets"]
        theirs = codec.parse_digest_reply(reply, len(tops))
        ours = self.ledger.fine_digest(tops)
        fine = [f for b, mine, other in zip(tops, ours, theirs, strict=True)
                for f, x, y in zip(digest.fine_buckets(b), digest.decode(mine, digest.SUB) or [], other, strict=True)
                if x != y]
        if not fine:
            # equal by now (pushes arrived meanwhile): nothing to compare
            p.syncing = False
            self._end_round(p)
            return
        if self._send(p, "sync_heads", {"buckets": fine, "nbuckets": digest.FINE}) is None:
            p.syncing = False

    def _on_heads(self, p: Peer, reply: dict[str, Any], fields: dict[str, Any]) -> None:
        page = codec.parse_heads_reply(reply)
        p.round_heads += len(page.heads)
        listed = set()
        last_name: str | None = None  # the last well-formed head's: where the next page starts
        for name, size, root, writer in page.heads:
            listed.add(name)
            last_name = name
            self._compare(p, name, size, root, writer)
        after = fields.get("after")
        if last_name is not None and after is not None and last_name <= after:
            last_name = None  # a page that does not move on (a broken or hostile peer): stop paging
        if p.node_id is not None:
            # A context of that peer's that it did not list: it lost the whole context (a crash
            # before its first flush); asked once more, like a lost tail.
            if page.more and last_name is None:
                upto = after or ""  # a page we cannot place: judge nothing missing from it
            else:
                upto = last_name if page.more else None
            for name in self.ledger.names_in_buckets(set(fields["buckets"]), fields["nbuckets"],
                                                     fields.get("after"), upto, writer=p.node_id):
                ctx = self.ledger.contexts.get(name)
                if name not in listed and ctx is not None and ctx.size > 0:
                    self._verify_tail(p, ctx)
        if page.more and last_name is not None:
            nxt = dict(fields, after=last_name)
            if self._send(p, "sync_heads", nxt) is not None:
                return
        self._next_pull(p)
        self._end_round(p)

    def _end_round(self, p: Peer) -> None:
        """A comparison with `p` is over. When it found nothing to pull or check, `p` is the one
        behind (catching up from this node, say): its digest keeps differing from ours while it
        pulls, and comparing again at every heartbeat would have it send all its heads each time
        (a 100k-context catch-up: 343 MB of heads for 222 MB of entries). So the next comparison
        waits 2, 4, 8, then 16 heartbeats (up to 64 after a comparison of 20,000 heads or more: at 1M
        contexts each one had the peer send ~60 MB), until one finds work again or `p` restarts."""
        if p.pulls or self._in_flight(p, "snapshot") or self._in_flight(p, "head"):
            p.idle_rounds = 0
            p.next_round_beat = 0
        else:
            p.idle_rounds += 1
            cap = MAX_BIG_ROUND_BACKOFF if p.round_heads >= BIG_ROUND_HEADS else MAX_IDLE_ROUND_BACKOFF
            p.next_round_beat = self.beats + min(1 << p.idle_rounds, cap)

    def _compare(self, p: Peer, name: str, size: int, root: bytes, writer: str) -> None:
        ctx = self.ledger.contexts.cached(name)
        if ctx is None:
            # not in RAM: when its head on disk is the peer's, there is nothing to pull or check,
            # and no reason to read it into RAM (a catch-up compares every context once)
            brief = self.ledger.brief(name)
            if brief is not None and brief[:3] == (size, root, writer):
                return
            ctx = self.ledger.contexts.get(name) if brief is not None else None
        local_size = ctx.size if ctx is not None else 0
        if ctx is not None and ctx.writer != writer:
            self._fork(p, ctx, size, root, writer)
            return
        if size > local_size:
            if writer == self.ledger.node_id:
                repair = self.ledger.repairing(ctx) if ctx is not None else None
                if repair is not None:
                    # our disk lost entries our mark says we held: pull them back from this
                    # replica, up to the mark (its root is checked when the last one arrives)
                    if self._may_pull(p, name, ctx, writer):
                        p.pulls.append(Pull(name, min(size, repair[0]), root if size <= repair[0] else repair[1]))
                    return
                # the peer holds more of a context we write than we do: it cannot
                # be ours (we would have it); two histories
                self._fork(p, ctx, size, root, writer)
                return
            if not self._may_pull(p, name, ctx, writer):
                return
            p.pulls.append(Pull(name, size, root))
        elif ctx is not None:
            if size > 0 and self.ledger.root_at(ctx, size) != root:
                self._fork(p, ctx, size, root, writer)
            elif size < local_size and p.node_id == writer != self.ledger.node_id:
                # The writer itself holds less of its context than we do: it lost a tail in a
                # crash (async durability), or its heads were read before entries we got by push.
                self._verify_tail(p, ctx)

    def _may_pull(self, p: Peer, name: str, ctx: ContextState | None, writer: str) -> bool:
        """Whether to pull `name` from `p`: not from a peer already found to hold another history
        than ours, and, for a context whose writer lost a tail, only from the writer while it lives
        (a replica still holding the lost tail would hand it back)."""
        if ctx is not None and self._diverged.get((name, p.address)) == ctx.id:
            return False
        if name in self._lost_tail and p.node_id != writer:
            w = self.peers.get(self.by_id.get(writer, ""))
            if w is not None and w.state != DEAD:
                return False
        return True

    def _verify_tail(self, p: Peer, ctx: ContextState) -> None:
        """Ask the writer for its head now, when we hold `ctx.size` entries: a size below that
        in its answer is a lost tail for certain (what we hold, it published before we asked)."""
        if ctx.name in self._verifying or len(self._verifying) >= MAX_VERIFYING:
            return
        if self._send(p, "head", {"context": ctx.name}) is not None:
            self._verifying[ctx.name] = (ctx.id, ctx.size)

    def _on_head(self, p: Peer, reply: dict[str, Any], fields: dict[str, Any]) -> None:
        name = fields["context"]
        asked = self._verifying.pop(name, None)
        ctx = self.ledger.contexts.get(name)
        if asked is None or ctx is None or ctx.id != asked[0] or p.node_id != ctx.writer:
            return  # the context changed meanwhile (set aside, pulled): the next comparison decides
        if reply.get("ok"):
            head = codec.parse_head_reply(reply)
            if head.writer != ctx.writer:
                return
            if head.damaged:
                return  # its disk lost entries it is refilling from its replicas (ours): not a lost tail
            size, root, gone = head.size, head.root, False
        else:
            err = reply.get("error")
            if not (isinstance(err, dict) and err.get("code") == NOT_FOUND):
                return
            size, root, gone = 0, merkle.EMPTY_ROOT, True  # it lost the whole context
        if size >= asked[1]:
            return  # it holds what we held when we asked: the roots are compared as usual
        if reply.get("ok") and self.writer_key is not None and reply.get("signed") is not None:
            key = self.writer_key(ctx.writer)
            try:
                new = heads.from_map(reply["signed"])
            except RemoteProtocolError:
                new = None
            if new is not None and key is not None and new.context == name and new.verify(key):
                self._check_equivocation(ctx, new)
        self._lost_tail.add(name)
        self._fork(p, ctx, size, root, ctx.writer, replace=not gone)

    def _repair_holes(self) -> None:
        """Fetch again, from a peer, the block around the first damaged entry of a few contexts
        (found by reads or the scrub): from the writer while it lives, for a replica; from any
        live peer for a context this node writes. The ledger checks what comes back against its
        own Merkle tree, so a peer that holds another history cannot write anything."""
        ledger = self.ledger
        asking = set(self._hole_asks.values())
        for cid in list(ledger.holes)[:MAX_VERIFYING]:
            if len(self._hole_asks) >= MAX_HOLE_ASKS:
                return
            ctx = ledger.context_by_id(cid)
            if ctx is None or ctx.name in asking:
                continue
            block = ledger.hole_block(ctx)
            if block is None:
                continue
            p = self._hole_source(ctx)
            if p is None:
                continue
            first, last = block
            fields = {"context": ctx.name, "size": last, "after": first - 1, "limit": last - first + 1}
            rid = self._send(p, "snapshot", fields)
            if rid is not None:
                self.pending[rid] = Outstanding(p.address, "repair", fields, self.now)
                self._hole_asks[rid] = ctx.name

    def _hole_source(self, ctx: ContextState) -> Peer | None:
        if ctx.writer != self.ledger.node_id:
            w = self.peers.get(self.by_id.get(ctx.writer, ""))
            if w is not None and w.state == ALIVE:
                return w
        live = sorted((p for p in self.peers.values() if p.state == ALIVE and p.node_id is not None),
                      key=lambda p: p.address)
        return live[self.beats % len(live)] if live else None  # another one next time, if it fails

    def _on_repair(self, p: Peer, reply: dict[str, Any], fields: dict[str, Any]) -> None:
        name = fields["context"]
        if not reply.get("ok"):
            return  # that peer does not hold the block (yet): another peer is asked next time
        entries = list(codec.parse_chunk_reply(reply).entries)
        if self.ledger.repair_hole(name, entries):
            self.stats.rewritten_entries += len(entries)
        else:
            log.warning("damaged entries of %r: the copy from %s does not match this node's Merkle tree; "
                        "not written", name, p.node_id)

    def _fork(self, p: Peer, ctx: ContextState | None, peer_size: int, peer_root: bytes, peer_writer: str,
              replace: bool = True) -> None:
        if ctx is None:
            return
        me = self.ledger.node_id
        served = canonical_writer(ctx.writer, peer_writer, p.node_id, me)
        if served is None:
            # two replicas of one writer disagree: the writer decides when it is compared (17.4);
            # meanwhile nothing is pulled from that peer for this history of ours
            self._diverged[(ctx.name, p.address)] = ctx.id
            if len(self._diverged) > MAX_DIVERGED:
                self._diverged.clear()
            return
        if ctx.writer != peer_writer:
            theirs = served == peer_writer
        else:  # one writer, two histories: the writer's current one wins, and the peer is that writer
            theirs = served != me and p.node_id == served
        # Logged once per context, local history and peer: not at every heartbeat while the
        # other side has not switched yet.
        key = (ctx.name, ctx.id, p.node_id or p.address)
        if key not in self._fork_logged:
            if len(self._fork_logged) >= MAX_DIVERGED:
                self._fork_logged.clear()
            self._fork_logged.add(key)
            log.error("FORK: context %r differs between this node (writer %s's history, %d entries) and peer %s "
                      "(writer %s's history, %d entries); both histories are kept; serving %s", ctx.name, ctx.writer,
                      ctx.size, p.node_id, peer_writer, peer_size, f"{served}'s")
        f = self.forks.get(ctx.name)
        if f is None:
            f = self.forks[ctx.name] = Fork(ctx.name, p.node_id or p.address, ctx.writer, peer_writer, ctx.size,
                                            peer_size, self.ledger.clock.value, served)
        if theirs:
            self._drop_early(ctx.name)  # pushes of the history set aside
            self.ledger.set_aside(ctx.name, peer_writer, replace=replace)
            # the record says what happened last; every history set aside stays readable (17.4)
            f.peer, f.local_writer, f.peer_writer = p.node_id or p.address, ctx.writer, peer_writer
            f.local_size, f.peer_size, f.detected_lamport = ctx.size, peer_size, self.ledger.clock.value
            f.set_aside = True
            f.served_writer = peer_writer
            f.histories_set_aside += 1
            self._drop_pulls(p, ctx.name)
            if replace and peer_size > 0:
                p.pulls.append(Pull(ctx.name, peer_size, peer_root))

    def _drop_pulls(self, p: Peer, name: str | None = None) -> None:
        """Forget what we meant to pull from `p` (of context `name` only, if given)."""
        p.pull_cursor = 0
        if name is None:
            p.pulls.clear()
        else:
            p.pulls = collections.deque(x for x in p.pulls if x[0] != name)
        for n in [n for n, a in self.pulling.items() if a == p.address and name in (None, n)]:
            del self.pulling[n]

    def _in_flight(self, p: Peer, op: str) -> int:
        return sum(1 for a, o, _f, _t in self.pending.values() if a == p.address and o == op)

    def _next_pull(self, p: Peer) -> None:
        """Ask `p` for the next chunks of the contexts it has that we lack, in order, keeping at most
        PULL_WINDOW chunks' worth of entries (PULL_WINDOW * PULL_CHUNK) and MAX_PULL_REQUESTS
        requests in flight: the peer reads and sends one while this node applies another. A big
        context is pulled two chunks at a time, as before; small ones (a context per conversation,
        10 entries) many at once: one at a time cost a round trip each (100,000 of them took 40 s)."""
        inflight = 0
        asked = 0
        ends: dict[str, dict[int, int]] = {}  # context -> {after: size} of the chunks asked of p
        for a, o, f, _t in self.pending.values():
            if a == p.address and o == "snapshot":
                inflight += 1
                asked += f["limit"]
                ends.setdefault(f["context"], {})[f["after"]] = f["size"]
            elif a == p.address and o == "snapshots":
                inflight += 1
                for name, after, size in f["chunks"]:
                    asked += size - after
                    ends.setdefault(name, {})[after] = size
        budget = PULL_WINDOW * PULL_CHUNK
        group: list[list[Any]] = []  # small chunks for one `snapshots` request: [context, after, size]
        grouped = 0
        pulls = p.pulls
        if not inflight:
            p.pull_cursor = 0  # (nothing in flight: nothing before it can be, whatever happened)
        else:
            # pulls before the cursor are in flight or done: the done ones at the front go
            contexts = self.ledger.contexts
            while p.pull_cursor and pulls:
                name, target, _root = pulls[0]
                ctx = contexts.peek(name)  # (in RAM: just applied; else read, not let in)
                if ctx is None or ctx.size < target:
                    break
                pulls.popleft()
                p.pull_cursor -= 1
                if self.pulling.get(name) == p.address:
                    del self.pulling[name]

        def send_group() -> bool:
            nonlocal inflight, group, grouped
            fields = {"chunks": group, "signed": self.writer_key is not None, "packed": self.packed}
            ok = self._send(p, "snapshots", fields) is not None
            if ok:
                inflight += 1
            else:  # not sent: nothing of it is in flight
                for name, _after, _size in group:
                    if self.pulling.get(name) == p.address:
                        del self.pulling[name]
            group, grouped = [], 0
            return ok

        i = p.pull_cursor
        while i < len(pulls) and inflight < MAX_PULL_REQUESTS and asked < budget:
            name, target, root = pulls[i]
            asked_of = ends.get(name)
            if asked_of and max(asked_of.values()) >= target:
                # every chunk of it is asked for: the next context meanwhile, without reading this
                # one (not yet created here while its first chunk is in flight: a look-up on disk
                # for each context in flight at each reply was 17% of a 100k-context catch-up)
                if i == p.pull_cursor:
                    p.pull_cursor += 1
                i += 1
                continue
            ctx = self.ledger.contexts.get(name)
            size = ctx.size if ctx is not None else 0
            owner = self.pulling.get(name)
            if size >= target or (owner is not None and owner != p.address):
                # done, or already being pulled from another peer (one copy is enough)
                del pulls[i]  # (a deque: near the front this costs O(i), not O(len))
                if owner == p.address:
                    del self.pulling[name]
                continue
            start = size  # never ask twice for a chunk in flight: start after the last one asked
            while asked_of and start in asked_of:
                start = asked_of[start]
            if start >= target:
                if i == p.pull_cursor:
                    p.pull_cursor += 1
                i += 1  # every chunk of it is asked for: the next context meanwhile
                continue
            end = min(target, start + PULL_CHUNK)
            if end - start <= SMALL_PULL and not p.no_group:
                group.append([name, start, end])
                grouped += end - start
                if len(group) == codec.MAX_PULL_CHUNKS or grouped >= GROUP_ENTRIES:
                    if not send_group():
                        break
            else:
                fields = {"context": name, "size": end, "after": start, "limit": end - start, "packed": self.packed}
                if self._send(p, "snapshot", fields) is None:
                    break
                inflight += 1
            ends.setdefault(name, {})[start] = end
            self.pulling[name] = p.address
            asked += end - start
        if group:
            send_group()
        p.syncing = inflight > 0 or self._in_flight(p, "sync_heads") > 0 or self._in_flight(p, "sync_digest") > 0

    def _on_chunk(self, p: Peer, reply: dict[str, Any], fields: dict[str, Any]) -> None:
        if not self._apply_chunk(p, reply, fields):
            p.pull_cursor = 0
        self._next_pull(p)

    def _on_chunks(self, p: Peer, reply: dict[str, Any], fields: dict[str, Any]) -> None:
        """A `snapshots` reply: each chunk as a `snapshot` reply would be; a chunk the peer could
        not serve drops that context's pull only; chunks left out of a full reply are asked again."""
        asked = fields["chunks"]
        items = codec.parse_chunks_reply(reply, len(asked))
        if len(items) < len(asked):
            p.pull_cursor = 0  # (the chunks left out are asked again)
        for item, (name, after, size) in zip(items, asked, strict=False):
            if "error" in item:
                err = item["error"] if isinstance(item["error"], dict) else {}
                log.warning("snapshots to %s: %r failed: %s %s", p.address, name, err.get("code"), err.get("message"))
                self._drop_pulls(p, name)
                continue
            if item.get("context") != name:
                raise RemoteProtocolError(BAD_REQUEST, f"snapshots reply: chunk of {item.get('context')!r} "
                                          f"where {name!r} was asked")
            if not self._apply_chunk(p, item, {"context": name, "size": size, "after": after, "limit": size - after}):
                p.pull_cursor = 0
        self._next_pull(p)

    def _apply_chunk(self, p: Peer, reply: Mapping[str, Any], fields: dict[str, Any]) -> bool:
        """Apply a pull reply's chunk; whether it was applied whole (else it, or what is left of
        it, is to be asked again)."""
        name = fields["context"]
        end: int = fields["size"]
        ctx = self.ledger.contexts.get(name)
        size = ctx.size if ctx is not None else 0
        raw, root = codec.chunk_parts(reply)
        # the common case, a whole chunk from our size on, checked (and encoded) in C where built:
        # entries packed (SPEC 17.2) are stored as they came; else the maps are encoded again
        whole = len(raw) == end - size
        parts = None
        if raw and type(raw[0]) is bytes:
            parts = packed_parts(name, raw, size + 1) if whole else None
        if parts is None:
            raw = codec.unpack_entries(raw)  # (bins decoded, maps as they are: a peer may mix them)
            if whole:
                parts = wire_parts(name, raw, size + 1)
        entries: list[Entry] | WireParts
        if parts is not None:
            entries, first, last, writer = parts, size + 1, end, parts.writer
        else:
            # (pushes may have moved us on meanwhile)
            entries = [e for e in (entry_from_wire(m) for m in raw) if e.seq > size]
            first, last, writer = ((entries[0].seq, entries[-1].seq, entries[0].writer) if entries
                                   else (0, 0, ""))
        if entries and first == size + 1:
            whole = last == end
            if whole and self.writer_key is not None and not self._pull_signed(p, name, writer, end, root, reply):
                self._drop_pulls(p, name)
                return False
            if whole:
                # (the context as looked up above, unless checking the signed head may have changed it)
                applied = self.ledger.apply_replicated(name, entries, root,
                                                       (ctx,) if self.writer_key is None else None)
                if applied is None and ctx is not None and ctx.writer == self.ledger.node_id:
                    # a repair chunk that does not end at the root our mark recorded: this
                    # peer holds another history under our name; pull nothing more of it here
                    log.error("INTEGRITY: peer %s holds a history of %r, which this node writes, that is not "
                              "the one its high-water mark recorded; not repairing from it", p.node_id, name)
                    self._diverged[(name, p.address)] = ctx.id
                    self._drop_pulls(p, name)
                    return False
                if applied is None:
                    # the chunk is sound but does not end at the sender's root: two histories
                    self._drop_pulls(p)
                    p.syncing = False
                    self._fork(p, ctx, end, root, writer)
                    return False
                self.stats.pulled_entries += len(entries)
                p.pulled_entries += len(entries)
                self._keep_signed(applied, reply.get("signed"), end, root)
                # (within ACK_LAZY_S, not at once: a catch-up applies a reply of up to 64 contexts
                # every few ms, and an ack after each cost both nodes ~4% of their time)
                self.ack_due[applied.name] = applied.writer
                self.on_applied(applied)
                if name in self.early:
                    self._apply_early(name)
                return True
            else:
                # a page cut short (reply size cap): ask for a smaller chunk ending where it ended
                f2 = {"context": name, "size": last, "after": size, "limit": last - size, "packed": self.packed}
                self._send(p, "snapshot", f2)
                return False
        # (a reply that no longer extends the replica, asked for ahead of one that failed or
        # overtaken by pushes, is dropped: the next request starts from what we hold)
        return size >= end

    # -- acknowledgements (replicas=N) -------------------------------------------------------

    def flush_acks(self, now: float | None = None) -> None:
        """Tell each writer how far we now hold its contexts (one message per writer): at
        once when one waits for them (`ack_now`), else at most every ACK_LAZY_S. Under a
        stream of pushes an ack per loop turn cost a follower more than a tenth of its
        time, and the writer as much to read them.

        An ack that cannot be sent (no connection yet) stays due and goes with the
        next call; acks for a dead writer are dropped (it learns by repair)."""
        if not self.ack_due:
            return
        now = self.now if now is None else now
        if not self.ack_now and now - self.last_ack < ACK_LAZY_S:
            return
        self.last_ack = now
        self.ack_now = False
        by_writer: dict[str, list[list[Any]]] = {}
        for name, writer in self.ack_due.items():
            ctx = self.ledger.contexts.get(name)
            if ctx is not None:
                held = ctx.flushed_seq if self.ack_durable else ctx.size
                if held > 0:
                    by_writer.setdefault(writer, []).append([name, held])
        self.ack_due = {}
        for writer, acks in by_writer.items():
            addr = self.by_id.get(writer)
            p = self.peers.get(addr) if addr else None
            if p is None or p.state == DEAD:
                continue
            if self._send(p, "ack", {"node_id": self.ledger.node_id, "acks": acks}) is None:
                for name, _size in acks:
                    self.ack_due[name] = writer

    def on_flushed(self, contexts: Iterable[ContextState]) -> None:
        """Replicated entries reached the disk (sync durability): tell their writers now."""
        if not self.ack_durable:
            return
        me = self.ledger.node_id
        for ctx in contexts:
            if ctx.writer != me:
                self.ack_due[ctx.name] = ctx.writer
                self.ack_now = True

    def rpc_ack(self, req: codec.Ack, now: float) -> dict[str, Any]:
        addr = self.by_id.get(req.node_id)
        p = self.peers.get(addr) if addr else None
        if p is None:
            # not a member this node knows (a made-up id, or one forgotten): its acks would
            # grow replica_sizes without bound and could satisfy replicas=N with nobody
            self.stats.ignored_acks += 1
            return {"node_id": self.ledger.node_id}
        self._heard(p, now)
        contexts = self.ledger.contexts
        awaited: Collection[str] | None = None
        for name, size in req.acks:
            # Only what a replicas=N append may wait for is kept: a context in RAM (every append
            # waiting for acks is of one, unless it left since) or one an append waits for. A
            # follower catching up acknowledges every context it pulls: looking each one up on
            # disk cost a writer more than a tenth of its time serving a catch-up, and keeping
            # them all grew `replica_sizes` with every context it writes.
            ctx = contexts.cached(name)
            if ctx is None:
                if awaited is None:
                    awaited = self.awaited()
                if name not in awaited:
                    continue
                ctx = contexts.get(name)
            if ctx is None or ctx.writer != self.ledger.node_id:
                continue
            sizes = self.replica_sizes.setdefault(name, {})
            if size > sizes.get(req.node_id, 0):
                sizes[req.node_id] = min(size, ctx.size)
        self.on_ack(now)
        return {"node_id": self.ledger.node_id}

    def _prune_acks(self) -> None:
        """Forget what replicas acknowledged of contexts that left RAM, unless an append waits for
        them (`rpc_ack` keeps no new ones of those): at most a sweep per PRUNE_ACKS_SLACK contexts
        that left, and `replica_sizes` stays within twice the cache."""
        sizes, contexts = self.replica_sizes, self.ledger.contexts
        if len(sizes) <= 2 * contexts.in_ram + PRUNE_ACKS_SLACK:
            return
        awaited = self.awaited()
        for name in [n for n in sizes if n not in awaited and contexts.cached(n) is None]:
            del sizes[name]

    def live_peers(self) -> int:
        return sum(1 for p in self.peers.values() if p.state in (ALIVE, SUSPECT))

    def replicated(self, ctx: ContextState, seq: int) -> int:
        """How many other nodes have said they hold `ctx` up to `seq`."""
        sizes = self.replica_sizes.get(ctx.name)
        return sum(1 for s in sizes.values() if s >= seq) if sizes else 0

    # -- writers --------------------------------------------------------------------------

    def check_writer(self, ctx: ContextState) -> None:
        """Raise NOT_WRITER (with the writer's address) or UNAVAILABLE for a context we only replicate."""
        writer = ctx.writer
        addr = self.by_id.get(writer)
        p = self.peers.get(addr) if addr else None
        if p is None or p.state == DEAD:
            raise Unavailable(
                f"context {ctx.name!r} is written by node {writer!r}, which is "
                f"{'down' if p is not None else 'unknown to this node'}; appends are refused until it is "
                "back (reads are served here)",
                {"context": ctx.name, "writer": writer, "address": addr},
            )
        raise NotWriter(
            f"context {ctx.name!r} is written by node {writer!r} at {addr}",
            {"context": ctx.name, "writer": writer, "address": addr},
        )

    def status(self, now: float) -> dict[str, Any]:
        local_total = self.ledger.entries_total
        return {
            "max_peers": self.max_peers,
            "peers": [
                {
                    "id": p.node_id,
                    "address": p.address,
                    "pub": p.pub,
                    "state": str(p.state),
                    "last_heard_s": None if p.last_heard is None else round(now - p.last_heard, 3),
                    "entries": p.entries,
                    "behind": max(0, local_total - p.entries) if p.last_heard is not None else None,
                    "pulled_entries": p.pulled_entries,
                }
                for p in self.peers.values()
            ],
            "forks": [vars(f) for f in self.forks.values()],
            "equivocations": list(self.equivocations.values())[:100],
            "replication": {
                "heartbeat_ms": int(self.heartbeat_s * 1000),
                **asdict(self.stats),
                "held_push_entries": self.early_entries,
                "held_push_bytes": self.early_bytes,
                "replica_acks": sum(len(sizes) for sizes in self.replica_sizes.values()),
            },
        }

