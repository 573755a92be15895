"""N real node cores (node/core.py) stepped by hand: fake clock, fake network, invariants every step.

No sockets, no threads: each simulated node is the node's own `Core` (a `Ledger`
on a `MemoryKV`, its `Mesh`, the request handlers the server runs) and its real
`Publisher` on a fake watch socket; the mesh's transport puts messages on a
seeded network that drops, duplicates, delays and partitions them. Requests go
through the core's request path, replies and pushes through its peer events,
writes through its write batches, exactly as the server feeds them. Every step checks that every replica is a prefix of its writer's
log and that nothing acknowledged is lost; after healing, every root must
converge. Seeds are fixed per test id (a failure replays from its name); each run
prints its seed, LEDGER_SIM_SEED=<seed> replays one and LEDGER_SIM_SEEDS=<n> explores n.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
import zmq

from node import ledger as ledger_mod
from node import mesh as mesh_mod
from node.config import Config
from node.core import Core
from node.ledger import Ledger
from node.mesh import ALIVE, DEAD, Mesh
from node.publisher import Publisher
from node.storage import MemoryKV
from protocol import codec, watch
from protocol.entry import decode_entry
from protocol.errors import LedgerError

pytestmark = pytest.mark.timeout(120)

STEP = 0.05  # seconds of fake time per step
HEARTBEAT = 0.2


@dataclass(order=True)
class Msg:
    at: float
    n: int
    kind: str = field(compare=False)  # "req", "rep", "pub"
    src: str = field(compare=False)
    dst: str = field(compare=False)
    body: Any = field(compare=False)


class Network:
    def __init__(self, rng: random.Random, drop: float, dup: float, max_delay: float) -> None:
        self.rng = rng
        self.drop, self.dup, self.max_delay = drop, dup, max_delay
        self.queue: list[Msg] = []
        self.cut: set[frozenset[str]] = set()
        self.count = 0
        self.perfect = False

    def send(self, now: float, kind: str, src: str, dst: str, body: Any) -> None:
        if frozenset((src, dst)) in self.cut:
            return
        copies = 1
        if not self.perfect:
            if self.rng.random() < self.drop:
                return
            if self.rng.random() < self.dup:
                copies = 2
        for _ in range(copies):
            delay = 0.0 if self.perfect else self.rng.random() * self.max_delay
            self.count += 1
            self.queue.append(Msg(now + delay, self.count, kind, src, dst, body))

    def due(self, now: float) -> list[Msg]:
        ready = sorted(m for m in self.queue if m.at <= now)
        self.queue = [m for m in self.queue if m.at > now]
        return ready


def addr(name: str) -> str:
    """The request address of simulated node `name` (a real HOST:PORT, as the codec requires)."""
    return f"{name}:1"


def name_of(address: str) -> str:
    return address.rpartition(":")[0]


class FakeXPub:
    """The watch socket as the real `Publisher` uses it: what it sends is kept (`sent`, one list of
    frames per message) for the network to carry; subscriptions arrive as XPUB delivers them."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self._frames: list[bytes] = []
        self.inbox: list[bytes] = []  # subscription messages (\x01 + topic, \x00 + topic) not yet read

    def send(self, frame: bytes, flags: int = 0) -> None:
        self._frames.append(frame)
        if not flags & zmq.SNDMORE:
            self.sent.append(self._frames)
            self._frames = []

    def recv(self, flags: int = 0) -> bytes:
        if not self.inbox:
            raise zmq.Again()
        return self.inbox.pop(0)

    def setsockopt(self, option: int, value: Any) -> None:
        pass  # (which subscriber gets what is the network's: `SimNode.subscribers`)


class SimNode:
    """One node: the real `Core` (a `Ledger` on a `MemoryKV`, its `Mesh`, its request
    handlers) and the real `Publisher` on a fake watch socket, driven as the server drives
    them. The network knows nodes by name; the mesh, by address (`addr(name)`, its PUB at
    port 2). `kv` and `boot`: a node back from a crash with what that storage held."""

    def __init__(self, name: str, net: Network, seeds: list[str], kv: MemoryKV | None = None,
                 boot: str | None = None) -> None:
        self.name = name
        self.net = net
        self.rid = 0
        self.now = 0.0
        self.up = True
        self.subscribers: set[str] = set()  # nodes whose SUB is connected to this node's PUB
        config = Config(node_id=name, data=":memory:", host="127.0.0.1", port=1, pub_port=2, durability="async",
                        flush_ms=0, max_payload=1 << 20, hot_bytes=8 << 20, log_level="info",
                        peers=tuple(addr(s) for s in seeds), heartbeat_ms=int(HEARTBEAT * 1000),
                        suspect_after=3, dead_after=8)
        # (entries' timestamps from the fake clock too: a seed replays the same hashes)
        ledger = Ledger(MemoryKV() if kv is None else kv, node_id=name, sync_meta=False,
                        now_ns=lambda: int(self.now * 1e9))
        self.xpub = FakeXPub()
        self.publisher = Publisher(self.xpub, ledger, sync=False, heartbeat_ms=1000, now=lambda: self.now)  # type: ignore[arg-type]
        self.publisher.boot = boot or f"{name}-boot"
        self.core = Core(config, ledger, self, self.publisher, address=addr(name), pub=f"{name}:2")
        self.publisher.wants_ack = self.core.waits_for_replicas

    @property
    def ledger(self) -> Ledger:
        return self.core.ledger

    @property
    def mesh(self) -> Mesh:
        return self.core.mesh

    def add_subscriber(self, name: str) -> None:
        """`name`'s SUB connected and subscribed to the replication stream (SPEC 17.3)."""
        self.subscribers.add(name)
        self.xpub.inbox.append(b"\x01" + watch.REPL_PREFIX)

    # Transport ------------------------------------------------------------------------
    def request(self, address: str, op: str, fields: dict[str, Any]) -> int | None:
        self.rid += 1
        self.net.send(self.now, "req", self.name, name_of(address), codec.encode_request(op, self.rid, fields))
        if op == "snapshot":
            pulls = 1 + self.mesh._in_flight(self.mesh.peers[address], "snapshot")
            max_in_flight[0] = max(max_in_flight[0], pulls)
        return self.rid

    def subscribe(self, pub_address: str) -> None:
        if name_of(pub_address) in nodes:  # (a made-up peer's PUB: nothing there)
            nodes[name_of(pub_address)].add_subscriber(self.name)

    def unsubscribe(self, pub_address: str) -> None:
        other = nodes.get(name_of(pub_address))
        if other is not None and self.name in other.subscribers:
            other.subscribers.discard(self.name)
            other.xpub.inbox.append(b"\x00" + watch.REPL_PREFIX)

    def forget(self, address: str) -> None:
        pass

    # what the server does ---------------------------------------------------------------
    def append(self, req: codec.Append) -> dict[str, Any]:
        """A client's append, through the core's request path; the entry it made (decoded)."""
        fields: dict[str, Any] = {"context": req.context, "payload": req.payload}
        if req.key:
            fields["key"] = req.key
        self.core.request([b"client", codec.encode_request("append", 1, fields)], self.now)
        out = [f for f in self.core.outbox if f[0] == b"client"]
        self.core.outbox = [f for f in self.core.outbox if f[0] != b"client"]
        assert len(out) == 1, out
        reply = codec.decode_reply(out[0][-1])
        assert reply["ok"], reply
        return reply["entry"]

    def serve(self, src: str, frame: bytes) -> None:
        """A request from node `src` into the core; its reply onto the network."""
        self.core.request([src.encode(), frame], self.now)
        self.send_replies()

    def send_replies(self) -> None:
        out, self.core.outbox = self.core.outbox, []
        for frames in out:
            self.net.send(self.now, "rep", self.name, frames[0].decode(), frames[-1])

    def publish(self) -> None:
        """The real publisher's messages; the replication stream goes to every subscriber."""
        self.publisher.on_subscriptions()
        self.publisher.publish()
        sent, self.xpub.sent = self.xpub.sent, []
        for frames in sent:
            if frames[0].startswith(watch.REPL_PREFIX):  # (no watchers here: the rest reaches nobody)
                for sub in sorted(self.subscribers):
                    self.net.send(self.now, "pub", self.name, sub, frames)

    def write(self) -> None:
        """The flusher's part: the core's write batch, done at once."""
        batch = self.core.next_write(self.now, force=True)
        if batch is not None:
            batch.commit()
            self.core.written(batch.dirty, None, self.now)
            self.core.settle(self.now)

    def step(self, now: float) -> None:
        self.now = now
        if not self.up:
            return
        self.core.tick(now)
        self.send_replies()
        self.publish()
        self.write()


nodes: dict[str, SimNode] = {}
max_in_flight = [0]  # most pull chunks ever in flight from one node to one peer


def deliver(net: Network, now: float) -> None:
    for m in net.due(now):
        dst = nodes.get(m.dst)
        if dst is None or not dst.up:
            continue
        dst.now = now
        if m.kind == "pub":
            dst.core.push(m.body, now)
        elif m.kind == "req":
            dst.serve(m.src, m.body)
        else:
            dst.core.peer_reply(addr(m.src), m.body, now)


def check_invariants(appended: dict[str, list[bytes]], writer_of: dict[str, str]) -> None:
    for name, hashes in appended.items():
        w = nodes[writer_of[name]].ledger
        wctx = w.contexts.get(name)
        # nothing appended at the writer is lost, and its log is what was appended
        assert (wctx.size if wctx else 0) == len(hashes)
        for node in nodes.values():
            ctx = node.ledger.contexts.get(name)
            if ctx is None or node.name == writer_of[name]:
                continue
            assert ctx.writer == writer_of[name]
            assert ctx.size <= len(hashes), f"{node.name} holds more of {name!r} than its writer"
            # a prefix: same root at the replica's size
            assert ctx.frontier.root() == w.root_at(wctx, ctx.size), f"{node.name}'s {name!r} is not a prefix"
    for node in nodes.values():
        assert not node.mesh.forks, node.mesh.forks


def run(seed: int, n_nodes: int = 4, n_contexts: int = 6, steps: int = 400, heal_steps: int | None = None
        ) -> dict[str, Any]:
    rng = random.Random(seed)
    net = Network(rng, drop=0.1, dup=0.05, max_delay=0.3)
    nodes.clear()
    names = [f"n{i}" for i in range(n_nodes)]
    for i, name in enumerate(names):
        # a chain of seeds: everyone else is learned by gossip
        nodes[name] = SimNode(name, net, [names[i - 1]] if i else [])
    writer_of = {f"ctx{j}": names[j % n_nodes] for j in range(n_contexts)}
    appended: dict[str, list[bytes]] = {c: [] for c in writer_of}
    now = 0.0
    partition_until = -1.0
    fault_steps = int(steps * 0.7)
    for step in range(fault_steps + (steps - fault_steps if heal_steps is None else heal_steps)):
        now = step * STEP
        # faults: a partition now and then, a node paused (no processing, messages lost) now and then
        if step < fault_steps:
            if now > partition_until and rng.random() < 0.02:
                side = set(rng.sample(names, rng.randrange(1, n_nodes)))
                net.cut = {frozenset((a, b)) for a in side for b in names if b not in side}
                partition_until = now + rng.uniform(0.5, 3.0)
            elif now > partition_until:
                net.cut = set()
            for node in nodes.values():
                if node.up and rng.random() < 0.005:
                    node.up = False
                elif not node.up and rng.random() < 0.05:
                    node.up = True
            # appends at each context's writer (only a live one)
            for name, w in writer_of.items():
                if nodes[w].up and rng.random() < 0.3:
                    for _ in range(rng.randrange(1, 30)):
                        entry = nodes[w].append(codec.Append(name, rng.choice(["", "k"]),
                                                             rng.randbytes(rng.randrange(0, 40)), {}))
                        appended[name].append(entry["hash"])
        else:  # heal: no more faults, every node up
            net.cut = set()
            net.perfect = True
            for node in nodes.values():
                node.up = True
        for node in nodes.values():
            node.step(now)
        deliver(net, now)
        check_invariants(appended, writer_of)
    # after healing, every root has converged on every node
    for name in appended:
        wctx = nodes[writer_of[name]].ledger.contexts[name]
        for node in nodes.values():
            ctx = node.ledger.contexts.get(name)
            assert ctx is not None and (ctx.size, ctx.frontier.root()) == (wctx.size, wctx.frontier.root()), (
                f"seed {seed}: {node.name} has {ctx.size if ctx else None} of {name!r}, writer {wctx.size}")
    for node in nodes.values():
        assert all(p.state == ALIVE for p in node.mesh.peers.values()), (seed, node.name)
        assert len(node.mesh.peers) == n_nodes - 1
    return {"entries": sum(len(h) for h in appended.values()),
            "roots": {name: nodes[w].ledger.contexts[name].frontier.root().hex() for name, w in writer_of.items()},
            "pulled": sum(n.mesh.stats.pulled_entries for n in nodes.values()),
            "pushed": sum(n.mesh.stats.pushed_entries for n in nodes.values())}


def seeds() -> list[int]:
    """Fixed per test id, so a failure replays from its name; LEDGER_SIM_SEEDS=N explores N
    seeds (the long mode), LEDGER_SIM_SEED=S runs one."""
    env = os.environ.get("LEDGER_SIM_SEED")
    if env:
        return [int(env)]
    return [SEED_BASE + i for i in range(int(os.environ.get("LEDGER_SIM_SEEDS", "6")))]


SEED_BASE = 20_261_207


@pytest.mark.parametrize("seed", seeds())
def test_replicas_stay_prefixes_and_converge_under_drops_duplicates_delays_partitions_pauses(seed):
    print(f"mesh simulation seed {seed} (replay: LEDGER_SIM_SEED={seed})")
    stats = run(seed)
    # both paths did real work: pushes and repairs of what the faults lost
    assert stats["entries"] > 0 and stats["pushed"] > 0 and stats["pulled"] > 0, stats


@pytest.mark.parametrize("seed", seeds()[:3])
def test_pulls_of_many_small_chunks_several_in_flight_stay_prefixes_and_converge(seed, monkeypatch):
    # Tiny chunks: every repair is many chunks, PULL_WINDOW of them asked for ahead, with
    # their replies dropped, duplicated and reordered by the network.
    monkeypatch.setattr(mesh_mod, "PULL_CHUNK", 20)
    print(f"mesh simulation seed {seed} (replay: LEDGER_SIM_SEED={seed})")
    stats = run(seed, heal_steps=600)  # 30 s of healing: repairs come 20 entries at a time
    assert stats["pulled"] > 0, stats
    assert max_in_flight[0] >= 2, "never more than one chunk in flight: the window was not exercised"


def test_a_fixed_seed_replays_the_same_history():
    a = run(12345, steps=200, heal_steps=150)
    b = run(12345, steps=200, heal_steps=150)
    assert a == b


@pytest.mark.skipif(not ledger_mod.ACCELERATED, reason="node._accel is not built here (no C compiler)")
def test_pulls_through_the_c_path_or_without_it_replay_the_same_history(monkeypatch):
    """node/_accel.c applies most pulled chunks, packed (SPEC 17.2: stored as they came) or as
    maps (encoded again); without it (no compiler) the Python path applies them all: the same
    seed gives the same run, entry for entry, in all three ways."""
    real_maps, real_packed = mesh_mod.wire_parts, mesh_mod.packed_parts
    used: dict[str, list[bool]] = {"maps": [], "packed": []}
    mode = "packed"

    def counted(kind: str, real: Any) -> Any:
        def f(name: str, raw: list[Any], first: int) -> Any:
            out = real(name, raw, first) if mode != "python" else None
            used[kind].append(out is not None)
            return out
        return f

    monkeypatch.setattr(mesh_mod, "wire_parts", counted("maps", real_maps))
    monkeypatch.setattr(mesh_mod, "packed_parts", counted("packed", real_packed))
    a = run(12345, steps=200, heal_steps=150)
    assert a["pulled"] > 0 and sum(used["packed"]) > 0 and not any(used["maps"]), (a, used)

    mode = "maps"  # a node that does not ask for packed entries (or a peer that does not send them)
    monkeypatch.setattr(ledger_mod, "ACCELERATED", False)
    used = {"maps": [], "packed": []}
    assert run(12345, steps=200, heal_steps=150) == a
    assert sum(used["maps"]) > 0 and not used["packed"], used

    mode = "python"
    used = {"maps": [], "packed": []}
    assert run(12345, steps=200, heal_steps=150) == a and used["maps"] and not any(used["maps"])


def perfect_pair(a: str, b: str, seed: int) -> Network:
    """A perfect network and two nodes, `b` seeded with `a`."""
    net = Network(random.Random(seed), drop=0.0, dup=0.0, max_delay=0.0)
    net.perfect = True
    nodes.clear()
    nodes[a] = SimNode(a, net, [])
    nodes[b] = SimNode(b, net, [a])
    return net


def steps(net: Network, first: int, last: int, at: dict[int, Any] | None = None) -> None:
    """Run steps first..last-1 of every node and the network; `at[step]()` runs before that step."""
    for step in range(first, last):
        if at and step in at:
            at[step]()
        for node in list(nodes.values()):
            node.step(step * STEP)
        deliver(net, step * STEP)


class Stepper:
    """`steps` from step 0 on, keeping count: `run_for(n)` runs the next n steps."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self.step = 0

    @property
    def now(self) -> float:
        return self.step * STEP

    def run_for(self, n: int) -> None:
        steps(self.net, self.step, self.step + n)
        self.step += n

    def run_seconds(self, seconds: float) -> None:
        self.run_for(int(seconds / STEP))


def test_the_fork_rule_is_the_same_seen_from_either_side():
    from node.mesh import canonical_writer

    # two writers: the lowest id, whoever compares
    assert canonical_writer("b", "a", "a", "b") == "a" == canonical_writer("a", "b", "b", "a")
    assert canonical_writer("b", "a", "c", "d") == "a"  # seen by third parties alike
    # one writer, two histories: the writer's own, when the writer is one of the two sides
    assert canonical_writer("w", "w", "w", "r1") == "w"
    assert canonical_writer("w", "w", "r1", "w") == "w"
    assert canonical_writer("w", "w", "r1", "r2") is None  # two replicas disagree: wait for the writer


def test_two_sides_of_a_partition_create_one_context_and_converge_on_one_history():
    net = perfect_pair("a", "b", 3)
    net.cut = {frozenset(("a", "b"))}
    for i in range(4):
        nodes["a"].append(codec.Append("x", "", f"a{i}".encode(), {}))
    for i in range(7):
        nodes["b"].append(codec.Append("x", "", f"b{i}".encode(), {}))
    steps(net, 0, 200, {20: net.cut.clear})  # heal at step 20
    a, b = nodes["a"].ledger, nodes["b"].ledger
    assert (a.contexts["x"].size, a.contexts["x"].frontier.root()) == (b.contexts["x"].size,
                                                                       b.contexts["x"].frontier.root())
    assert b.contexts["x"].writer == "a" and [c.size for c in b.aside["x"]] == [7]  # b's history kept aside
    assert nodes["b"].mesh.forks["x"].set_aside and nodes["b"].mesh.forks["x"].served_writer == "a"
    assert not a.aside


def test_a_writer_that_lost_its_tail_and_wrote_again_is_followed_and_the_old_tail_kept():
    net = perfect_pair("w", "f", 4)
    for i in range(10):
        nodes["w"].append(codec.Append("log", "", f"old{i}".encode(), {}))
    steps(net, 0, 40)
    assert nodes["f"].ledger.contexts["log"].size == 10
    # w comes back from a crash that lost its last entries (async durability), then writes others
    nodes["w"] = SimNode("w", net, ["f"])
    for i in range(6):
        nodes["w"].append(codec.Append("log", "", f"new{i}".encode(), {}))
    steps(net, 40, 200)
    w, f = nodes["w"].ledger, nodes["f"].ledger
    assert (f.contexts["log"].size, f.contexts["log"].frontier.root()) == (6, w.contexts["log"].frontier.root())
    assert [c.size for c in f.aside["log"]] == [10]
    assert nodes["f"].mesh.forks["log"].served_writer == "w"


def test_a_peer_dead_for_long_is_forgotten_unless_it_is_a_seed_and_is_welcome_back():
    net = perfect_pair("a", "b", 5)
    nodes["c"] = SimNode("c", net, ["b"])
    run_for = Stepper(net).run_seconds
    run_for(5)
    assert set(nodes["a"].mesh.peers) == {addr("b"), addr("c")}
    nodes["b"].up = False
    forget = nodes["a"].mesh.forget_after_s
    run_for(forget / 2)
    assert nodes["a"].mesh.peers[addr("b")].state == "dead" and addr("b") in nodes["c"].mesh.peers
    run_for(forget / 2 + 5)
    assert addr("b") not in nodes["a"].mesh.peers  # forgotten: not a seed of a
    assert nodes["c"].mesh.peers[addr("b")].state == "dead"  # kept: c was told to join through b
    nodes["b"].up = True
    run_for(5)
    assert nodes["a"].mesh.peers[addr("b")].state == ALIVE and nodes["c"].mesh.peers[addr("b")].state == ALIVE


def test_another_node_answering_at_a_known_address_is_a_new_peer_not_a_restart():
    class NoNet:
        def request(self, address: str, op: str, fields: dict[str, Any]) -> int | None:
            return None

        def subscribe(self, pub_address: str) -> None:
            pass

        def unsubscribe(self, pub_address: str) -> None:
            pass

        def forget(self, address: str) -> None:
            pass

    m = Mesh(Ledger(MemoryKV(), node_id="me", sync_meta=False), NoNet(), address="me:1", pub="me:2",
             seeds=[], heartbeat_s=0.5)

    def hb(node_id: str, cluster: str = "ledger") -> codec.Heartbeat:
        return codec.Heartbeat(node_id, "h:1", "h:2", f"{node_id}-boot", 1, 0, (), b"", cluster)

    m.rpc_heartbeat(hb("old"), 1.0)
    assert m.peers["h:1"].node_id == "old" and m.by_id == {"old": "h:1"}
    m.rpc_heartbeat(hb("new"), 2.0)
    assert m.peers["h:1"].node_id == "new" and m.by_id == {"new": "h:1"}
    from protocol.errors import Conflict

    with pytest.raises(Conflict, match="cluster 'ledger', not 'other'"):
        m.rpc_heartbeat(hb("stranger", "other"), 3.0)
    assert m.peers["h:1"].node_id == "new"


def test_a_restarted_node_starts_its_repair_from_the_reply_to_its_first_heartbeat():
    # The writer answers a heartbeat from a node that restarted (a new boot) with its digest,
    # so the restarted node pulls at once instead of waiting for the writer's own next heartbeat.
    net = perfect_pair("a", "b", 7)
    for i in range(30):
        nodes["a"].append(codec.Append("notes", "", bytes([i]), {}))
    clock = Stepper(net)
    run_for = clock.run_seconds

    run_for(2)
    assert nodes["b"].ledger.contexts["notes"].size == 30
    nodes["a"].mesh.heartbeat_s = 1e9  # the writer sends no more heartbeats of its own
    nodes["b"] = SimNode("b", net, ["a"])  # restarted with an empty data folder
    nodes["b"].mesh.boot = "b-boot-2"
    run_for(10 * STEP)  # heartbeat, its reply, sync_heads, a pull: one step each way
    ctx = nodes["b"].ledger.contexts.get("notes")
    assert ctx is not None and ctx.size == 30, "the restarted node did not pull from the heartbeat reply"
    # a peer that keeps beating with the same boot gets no digest back: heartbeats stay small
    b_hb = codec.Heartbeat("b", addr("b"), "b:2", "b-boot-2", 1, 30, (), b"", "ledger")
    assert "digest" not in nodes["a"].mesh.rpc_heartbeat(b_hb, clock.now)


def test_a_heartbeat_that_could_not_be_sent_is_tried_again_soon_but_not_to_a_dead_peer():
    class Connecting:
        """Sends fail until `up` (a DEALER with IMMEDIATE whose connection is still being made)."""

        def __init__(self) -> None:
            self.up: set[str] = set()
            self.sent: list[tuple[float, str]] = []
            self.now = 0.0

        def request(self, address: str, op: str, fields: dict[str, Any]) -> int | None:
            if address not in self.up:
                return None
            self.sent.append((self.now, address))
            return len(self.sent)

        def subscribe(self, pub_address: str) -> None:
            pass

        def unsubscribe(self, pub_address: str) -> None:
            pass

        def forget(self, address: str) -> None:
            pass

    t = Connecting()
    m = Mesh(Ledger(MemoryKV(), node_id="me", sync_meta=False), t, address="me:1", pub="me:2",
             seeds=["a:1", "b:1"], heartbeat_s=0.5)
    m.tick(0.0)  # the first beat: neither connection is up yet
    assert t.sent == [] and set(m.unsent) == {"a:1", "b:1"}
    t.up.add("a:1")
    t.now = 0.005
    m.tick(0.005)  # too soon to retry
    assert t.sent == []
    t.now = 0.02
    m.tick(0.02)
    assert t.sent == [(0.02, "a:1")] and set(m.unsent) == {"b:1"}  # retried long before the next beat at 0.5
    m.peers["b:1"].state = DEAD
    t.up.add("b:1")
    t.now = 0.04
    m.tick(0.04)
    assert t.sent == [(0.02, "a:1")] and not m.unsent  # a dead peer waits for its slower probes
    # a seed that never answers is retried a few times per interval, not 100 times a second
    t.up.clear()
    m.tick(0.5)
    for i in range(1, 40):
        m.tick(0.5 + i * 0.011)
    assert not m.unsent and len(t.sent) == 1


def formed_pair(seed: int) -> tuple[SimNode, SimNode, Any]:
    """Writer a and follower b on a perfect network, formed, then with no heartbeats of their
    own any more (so only pushes and what they trigger move b); and a stepping function."""
    net = perfect_pair("a", "b", seed)
    a, b = nodes["a"], nodes["b"]
    run_for = Stepper(net).run_for
    a.append(codec.Append("notes", "", b"0", {}))
    run_for(40)
    assert b.ledger.contexts["notes"].size == 1
    a.mesh.heartbeat_s = b.mesh.heartbeat_s = 1e9
    return a, b, run_for


def test_a_lost_push_is_pulled_at_once_and_the_pushes_after_it_are_held_then_applied_in_order():
    a, b, run_for = formed_pair(11)
    lose = {"left": 1}
    real_send = a.net.send

    def send(now: float, kind: str, src: str, dst: str, body: Any) -> None:
        if kind == "pub" and lose["left"]:
            lose["left"] -= 1  # the next pushed message never arrives
            return
        real_send(now, kind, src, dst, body)

    a.net.send = send  # type: ignore[method-assign]
    pulled, pushed = b.mesh.stats.pulled_entries, b.mesh.stats.pushed_entries
    held = []
    for i in range(5):  # five pushed messages of 3 entries; the first is lost
        for j in range(3):
            a.append(codec.Append("notes", "", bytes([i, j]), {}))
        run_for(1)
        held.append(b.mesh.early_entries)
    assert held[:2] == [0, 3]  # the second message waits for the pull of the first
    run_for(4)
    ctx = b.ledger.contexts["notes"]
    assert ctx.size == 16 and ctx.frontier.root() == a.ledger.contexts["notes"].frontier.root()
    # exactly the lost message was pulled; everything else came by push
    assert b.mesh.stats.gap_pulls == 1 and b.mesh.stats.pulled_entries - pulled == 3 and b.mesh.stats.pushed_entries - pushed == 12
    assert not b.mesh.early and b.mesh.early_entries == 0


def test_early_pushes_are_bounded_and_dropped_for_the_digest_repair(monkeypatch):
    monkeypatch.setattr(mesh_mod, "MAX_EARLY_BYTES", 600)  # about 2 messages of 4 entries
    a, b, run_for = formed_pair(12)
    a.net.cut = {frozenset(("a", "b"))}
    a.append(codec.Append("notes", "", b"lost", {}))
    run_for(1)
    a.net.cut = set()
    for i in range(4):  # 4 messages of 4 entries after the lost one: past the bound of 10
        for j in range(4):
            a.append(codec.Append("notes", "", bytes([i, j]), {}))
        b.mesh.peers[addr("a")].state = DEAD  # no gap pull: only the bound acts
        run_for(1)
    assert b.mesh.stats.dropped_pushes >= 1 and b.mesh.early_bytes <= 600
    assert b.ledger.contexts["notes"].size == 1
    # the digest repair still brings everything
    b.mesh.peers[addr("a")].state = ALIVE
    a.mesh.heartbeat_s = b.mesh.heartbeat_s = HEARTBEAT
    run_for(20)
    assert b.ledger.contexts["notes"].size == 18


class Recording:
    """A transport that takes every request and records (op, fields) in `sent`."""

    def __init__(self, sent: list[tuple[str, dict[str, Any]]]) -> None:
        self.sent = sent

    def request(self, address: str, op: str, fields: dict[str, Any]) -> int | None:
        self.sent.append((op, fields))
        return len(self.sent)

    def subscribe(self, pub_address: str) -> None:
        pass

    def unsubscribe(self, pub_address: str) -> None:
        pass

    def forget(self, address: str) -> None:
        pass


def writer_and_follower(sent: list[tuple[str, dict[str, Any]]]) -> tuple[Ledger, Mesh]:
    """A writer's ledger "w" and a follower's mesh that knows it as the peer at w:1 (sends recorded)."""
    w = Ledger(MemoryKV(), node_id="w", sync_meta=False)
    m = Mesh(Ledger(MemoryKV(), node_id="me", sync_meta=False), Recording(sent), address="me:1", pub="me:2",
             seeds=[], heartbeat_s=0.5)
    m.rpc_heartbeat(codec.Heartbeat("w", "w:1", "w:2", "w-boot", 1, 0, (), b"", "ledger"), 0.0)
    sent.clear()
    return w, m


def test_acks_go_at_once_when_the_writer_waits_for_them_else_lazily():
    sent: list[tuple[str, dict[str, Any]]] = []
    w, m = writer_and_follower(sent)

    def push(n: int, ack: bool = False) -> None:
        blobs = [w.append(codec.Append("notes", "", bytes([i]), {})).blobs[0] for i in range(n)]
        ctx = w.contexts["notes"]
        m.on_push([watch.repl_topic("notes"), watch.encode_entries(ctx.name_packed, blobs, ack=ack)])

    def acks() -> list[Any]:
        return [f["acks"] for op, f in sent if op == "ack"]

    push(3)
    m.flush_acks(1.0)
    push(2)
    m.flush_acks(1.01)  # nobody waits: at most one ack per ACK_LAZY_S, saying the newest size
    assert acks() == [[["notes", 3]]]
    m.flush_acks(1.0 + mesh_mod.ACK_LAZY_S)
    assert acks() == [[["notes", 3]], [["notes", 5]]]
    push(1, ack=True)  # the writer holds a replicas=N reply for these
    m.flush_acks(1.0 + mesh_mod.ACK_LAZY_S + 0.001)
    assert acks()[-1] == [["notes", 6]]
    m.flush_acks(2.0)  # nothing new: nothing sent
    assert len(acks()) == 3


def test_pulled_entries_are_acknowledged_within_the_lazy_interval_not_after_every_reply():
    # a catch-up applies a reply of up to 64 contexts every few ms: an ack after each cost both nodes
    sent: list[tuple[str, dict[str, Any]]] = []
    w, m = writer_and_follower(sent)
    p = m.peers["w:1"]
    for name in ("x", "y"):
        w.append_batch(codec.AppendBatch(name, (("k", b"1", {}), ("k", b"2", {}))))

    def pull(name: str) -> None:
        fields, blobs = w.snapshot_page(codec.Snapshot(name, 2, 0, 2))
        m._apply_chunk(p, {**fields, "entries": [decode_entry(b).to_wire() for b in blobs]},
                       {"context": name, "size": 2, "after": 0, "limit": 2})

    def acks() -> list[Any]:
        return [f["acks"] for op, f in sent if op == "ack"]

    m.flush_acks(1.0)  # (nothing due yet: nothing sent, and the lazy interval not started)
    pull("x")
    m.flush_acks(1.0)
    pull("y")
    m.flush_acks(1.01)
    assert acks() == [[["x", 2]]] and not m.ack_now
    m.flush_acks(1.0 + mesh_mod.ACK_LAZY_S)  # y within the interval, with whatever else came meanwhile
    assert acks() == [[["x", 2]], [["y", 2]]]


def test_the_ack_flag_of_an_entries_message_round_trips():
    w = Ledger(MemoryKV(), node_id="w", sync_meta=False)
    blobs = [w.append(codec.Append("c", "", b"x", {})).blobs[0]]
    name_packed = w.contexts["c"].name_packed
    for ack in (False, True):
        frames = [watch.repl_topic("c"), watch.encode_entries(name_packed, blobs, ack=ack)]
        m = watch.decode_message(frames)
        assert isinstance(m, watch.EntriesMsg) and m.ack is ack and [e.seq for e in m.entries] == [1]
        assert watch.peek_entries(frames) == ("c", 1, 1)


# -- a writer that crashed and wrote its lost seqs again (async durability) ------------------------


def crashed_writer_setup(seed: int) -> tuple[SimNode, SimNode, Any, Any]:
    """a writes "x"#1 (flushed: survives), then more; returns a, b, run_for and a restart function
    that brings a back from what it had flushed then, under a new boot."""
    import copy

    net = perfect_pair("a", "b", seed)
    a, b = nodes["a"], nodes["b"]
    run_for = Stepper(net).run_for
    a.append(codec.Append("x", "", b"shared", {}))
    run_for(40)
    assert b.ledger.contexts["x"].size == 1
    saved = copy.deepcopy(a.ledger.kv)  # all a has on disk when it crashes later

    def restart() -> SimNode:
        na = SimNode("a", net, ["b"], kv=saved, boot="a-boot-2")
        for sub in a.subscribers:  # b's SUB socket reconnects by itself
            na.add_subscriber(sub)
        nodes["a"] = na
        return na

    return a, b, run_for, restart


def payloads(led: Ledger, ctx: Any) -> list[bytes]:
    return [decode_entry(led.entry_blob(ctx, s)).payload for s in range(1, ctx.size + 1)]


def test_pushes_of_a_rewritten_history_are_never_spliced_onto_the_lost_one():
    # b got a's entries 2..4 by push; a crashes, comes back with only #1 and writes 2..9 anew.
    # The pushes of 5..9 extend b's size but not a's history: their root says so, b keeps its
    # old 1..4 aside as it was and follows a's new history.
    a, b, run_for, restart = crashed_writer_setup(21)
    for i in range(3):
        a.append(codec.Append("x", "", b"old%d" % (2 + i), {}))
    run_for(2)
    assert payloads(b.ledger, b.ledger.contexts["x"]) == [b"shared", b"old2", b"old3", b"old4"]
    a.up = False
    na = restart()
    for i in range(8):
        na.append(codec.Append("x", "", b"new%d" % (2 + i), {}))
    run_for(40)
    bx, ax = b.ledger.contexts["x"], na.ledger.contexts["x"]
    assert payloads(b.ledger, bx) == payloads(na.ledger, ax) == [b"shared"] + [b"new%d" % i for i in range(2, 10)]
    assert bx.frontier.root() == ax.frontier.root()
    (old,) = b.ledger.aside["x"]
    assert payloads(b.ledger, old) == [b"shared", b"old2", b"old3", b"old4"]  # not spliced
    assert b.mesh.stats.push_mismatches >= 1


def test_pushes_held_for_a_writer_that_dies_are_dropped_not_applied_to_its_next_history():
    a, b, run_for, restart = crashed_writer_setup(22)
    real_send = a.net.send
    lose = {"left": 1}

    def send(now: float, kind: str, src: str, dst: str, body: Any) -> None:
        if kind == "pub" and lose["left"]:
            lose["left"] -= 1
            return
        real_send(now, kind, src, dst, body)

    a.net.send = send  # type: ignore[method-assign]
    for i in range(3):
        a.append(codec.Append("x", "", b"old%d" % (2 + i), {}))
    a.publish()  # lost
    for i in range(3):
        a.append(codec.Append("x", "", b"old%d" % (5 + i), {}))
    a.publish()
    a.up = False  # crashes before it answers the gap pull
    deliver(a.net, 0)
    run_for(1)
    assert b.mesh.early_entries == 3
    run_for(60)  # b declares a dead
    assert b.mesh.peers[addr("a")].state == "dead" and not b.mesh.early
    na = restart()
    for i in range(9):
        na.append(codec.Append("x", "", b"new%d" % (2 + i), {}))
    run_for(40)
    bx = b.ledger.contexts["x"]
    assert payloads(b.ledger, bx) == [b"shared"] + [b"new%d" % i for i in range(2, 11)]
    assert not b.mesh.forks and not b.ledger.aside


def test_a_duplicated_pull_reply_does_not_make_every_later_chunk_asked_twice(monkeypatch):
    monkeypatch.setattr(mesh_mod, "PULL_CHUNK", 100)
    a, b, run_for = formed_pair(23)
    a.net.cut = {frozenset(("a", "b"))}
    for i in range(3000):
        a.append(codec.Append("notes", "", b"%d" % i, {}))
    run_for(1)
    a.net.cut = set()
    a.mesh.heartbeat_s = b.mesh.heartbeat_s = HEARTBEAT  # the digest starts the repair
    asked: list[tuple[int, int]] = []
    real_request = b.request

    def request(address: str, op: str, fields: dict[str, Any]) -> int | None:
        if op == "snapshot":
            asked.append((fields["after"], fields["size"]))
        return real_request(address, op, fields)

    b.request = request  # type: ignore[method-assign]
    real_send = a.net.send
    dup = {"left": 1}

    def send(now: float, kind: str, src: str, dst: str, body: Any) -> None:
        real_send(now, kind, src, dst, body)
        if kind == "rep" and src == "a" and dup["left"] and len(body) > 5000:
            dup["left"] -= 1
            real_send(now, kind, src, dst, body)  # one pull reply arrives twice

    a.net.send = send  # type: ignore[method-assign]
    run_for(200)
    assert b.ledger.contexts["notes"].size == 3001
    assert dup["left"] == 0 and len(asked) <= len(set(asked)) + 2, f"{len(asked)} requests for {len(set(asked))} chunks"


def test_a_failed_pull_of_one_context_does_not_drop_the_pulls_of_the_others():
    a, b, run_for = formed_pair(24)
    for name in ("x", "y"):
        a.append(codec.Append(name, "", b"1", {}))
    asked: list[str] = []
    real_request = b.request

    def request(address: str, op: str, fields: dict[str, Any]) -> int | None:
        if op == "snapshot":
            asked.append(fields["context"])
        return real_request(address, op, fields)

    b.request = request  # type: ignore[method-assign]
    m, p = b.mesh, b.mesh.peers[addr("a")]
    p.no_group = True  # one context per request (a peer without `snapshots`); together: the next test
    p.pulls.clear()
    p.pulls.extend([("x", 1, b""), ("y", 1, b"")])
    m._next_pull(p)
    assert asked == ["x", "y"]  # small contexts are asked for together (MAX_PULL_REQUESTS in flight)
    rid_x = next(rid for rid, (_a, op, f, _t) in m.pending.items() if op == "snapshot" and f["context"] == "x")
    m.on_reply(addr("a"), {"ok": False, "id": rid_x, "node_id": "a", "error": {"code": "NOT_FOUND", "message": "no"}},
               b.now)
    # x's failure drops x alone; y's request is still in flight, not asked twice
    assert [n for n, _t, _r in p.pulls] == ["y"] and m.pulling == {"y": addr("a")} and asked == ["x", "y"]
    run_for(4)
    assert b.ledger.contexts["y"].size == 1  # y's pull went on


def test_small_contexts_are_pulled_together_and_one_that_fails_drops_only_its_own_pull():
    a, b, run_for = formed_pair(25)
    for name in ("x", "y", "z"):
        a.append(codec.Append(name, "", b"1", {}))
    asked: list[tuple[str, Any]] = []
    real_request = b.request

    def request(address: str, op: str, fields: dict[str, Any]) -> int | None:
        if op.startswith("snapshot"):
            asked.append((op, fields.get("chunks") or fields["context"]))
        return real_request(address, op, fields)

    b.request = request  # type: ignore[method-assign]
    m, p = b.mesh, b.mesh.peers[addr("a")]
    p.pulls.clear()
    p.pulls.extend([("x", 1, b""), ("y", 1, b""), ("z", 1, b"")])
    m._next_pull(p)
    assert asked == [("snapshots", [["x", 0, 1], ["y", 0, 1], ["z", 0, 1]])]  # one request for the three
    rid = next(rid for rid, (_a, op, _f, _t) in m.pending.items() if op == "snapshots")
    page = a.ledger.snapshot_page(codec.Snapshot("y", 1, 0, 1))
    y = {**page[0], "entries": [decode_entry(blob).to_wire() for blob in page[1]]}
    # x: the peer cannot serve it; y: served; z: left out of a full reply
    m.on_reply(addr("a"), {"ok": True, "id": rid, "node_id": "a",
                           "chunks": [{"context": "x", "error": {"code": "NOT_FOUND", "message": "no"}}, y]}, b.now)
    assert b.ledger.contexts["y"].size == 1 and "x" not in b.ledger.contexts
    assert [n for n, _t, _r in p.pulls] == ["z"] and asked[-1] == ("snapshots", [["z", 0, 1]])  # asked again
    run_for(4)
    assert b.ledger.contexts["z"].size == 1


def two_groups_in_flight(seed: int, monkeypatch: pytest.MonkeyPatch) -> tuple[SimNode, SimNode, Any, list[Any], int]:
    """b pulls x, y, z (z: 2 entries) and w1..w3 of a in two `snapshots` requests of three
    chunks; returns a, b, a's peer entry at b, what b asked, and the first request's id."""
    monkeypatch.setattr(codec, "MAX_PULL_CHUNKS", 3)
    a, b, _run_for = formed_pair(27)
    names = ["x", "y", "z", "w1", "w2", "w3"]
    for name in names:
        for payload in (b"1", b"2") if name == "z" else (b"1",):
            a.append(codec.Append(name, "", payload, {}))  # (its pushes never reach b: nothing is stepped)
    asked: list[Any] = []
    real_request = b.request

    def request(address: str, op: str, fields: dict[str, Any]) -> int | None:
        if op.startswith("snapshot"):
            asked.append((op, fields.get("chunks") or [fields["context"], fields["after"], fields["size"]]))
        return real_request(address, op, fields)

    b.request = request  # type: ignore[method-assign]
    m, p = b.mesh, b.mesh.peers[addr("a")]
    p.pulls.clear()
    p.pulls.extend([(n, 2 if n == "z" else 1, b"") for n in names])
    m._next_pull(p)
    assert [f for _op, f in asked] == [[["x", 0, 1], ["y", 0, 1], ["z", 0, 2]], [["w1", 0, 1], ["w2", 0, 1], ["w3", 0, 1]]]
    assert p.pull_cursor == 6  # every pull has its chunks asked: the next replies start after them
    rid = min(rid for rid, (_a, op, _f, _t) in m.pending.items() if op == "snapshots")
    return a, b, p, asked, rid


def chunk_of(a: SimNode, name: str, size: int, upto: int | None = None) -> dict[str, Any]:
    fields, blobs = a.ledger.snapshot_page(codec.Snapshot(name, size, 0, size))
    return {**fields, "entries": [decode_entry(blob).to_wire() for blob in blobs[:upto]]}


def test_a_chunk_left_out_of_a_full_reply_is_asked_again_while_later_pulls_are_in_flight(monkeypatch):
    a, b, p, asked, rid = two_groups_in_flight(28, monkeypatch)
    # a full reply: x and y, z left out (to be asked again), w1..w3 still in flight
    b.mesh.on_reply(addr("a"), {"ok": True, "id": rid, "node_id": "a",
                                "chunks": [chunk_of(a, "x", 1), chunk_of(a, "y", 1)]}, b.now)
    assert b.ledger.contexts["y"].size == 1 and asked[-1] == ("snapshots", [["z", 0, 2]])
    assert [n for n, _t, _r in p.pulls] == ["z", "w1", "w2", "w3"]  # x and y, done, left the front


def test_a_chunk_cut_short_is_asked_again_in_two_while_later_pulls_are_in_flight(monkeypatch):
    a, b, p, asked, rid = two_groups_in_flight(29, monkeypatch)
    # z's page cut short after its first entry (the reply's size cap): its first entry again, and the rest
    b.mesh.on_reply(addr("a"), {"ok": True, "id": rid, "node_id": "a",
                                "chunks": [chunk_of(a, "x", 1), chunk_of(a, "y", 1), chunk_of(a, "z", 2, upto=1)]},
                    b.now)
    assert asked[2:] == [("snapshot", ["z", 0, 1]), ("snapshots", [["z", 1, 2]])]


def test_a_peer_without_snapshots_is_pulled_from_one_context_per_request():
    a, b, run_for = formed_pair(26)
    for name in ("x", "y"):
        a.append(codec.Append(name, "", b"1", {}))
    m, p = b.mesh, b.mesh.peers[addr("a")]
    p.pulls.clear()
    p.pulls.extend([("x", 1, b""), ("y", 1, b"")])
    m._next_pull(p)
    rid = next(rid for rid, (_a, op, _f, _t) in m.pending.items() if op == "snapshots")
    m.on_reply(addr("a"), {"ok": False, "id": rid, "node_id": "a",
                           "error": {"code": "UNKNOWN_OP", "message": "unknown op 'snapshots'"}}, b.now)
    assert p.no_group and sorted(f["context"] for _a, op, f, _t in m.pending.values() if op == "snapshot") == ["x", "y"]
    run_for(4)
    assert b.ledger.contexts["x"].size == b.ledger.contexts["y"].size == 1


def test_in_sync_durability_a_follower_acks_only_what_is_on_its_disk():
    # replicas=N under --durability sync: "held by N" must mean on N other nodes' disks
    sent: list[tuple[str, dict[str, Any]]] = []

    w = Ledger(MemoryKV(), node_id="w", sync_meta=False)
    led = Ledger(MemoryKV(), node_id="me", sync_meta=False)
    m = Mesh(led, Recording(sent), address="me:1", pub="me:2", seeds=[], heartbeat_s=0.5, ack_durable=True)
    m.rpc_heartbeat(codec.Heartbeat("w", "w:1", "w:2", "w-boot", 1, 0, (), b"", "ledger"), 0.0)
    blobs = [w.append(codec.Append("notes", "", bytes([i]), {})).blobs[0] for i in range(4)]
    m.on_push([watch.repl_topic("notes"),
               watch.encode_entries(w.contexts["notes"].name_packed, blobs, ack=True,
                                    root=w.root_at(w.contexts["notes"], 4))])
    assert led.contexts["notes"].size == 4
    m.flush_acks(1.0)
    assert [f for op, f in sent if op == "ack"] == []  # in RAM only: nothing to acknowledge yet
    batch, dirty = led.take_pending()
    led.kv.write(batch.items(), sync=True)
    led.mark_flushed(dirty)
    m.on_flushed(dirty)  # what the server does when the flusher reports the batch on disk
    m.flush_acks(1.001)
    assert [f["acks"] for op, f in sent if op == "ack"] == [[["notes", 4]]]


# -- a writer crash in async mode: every replica follows the writer's history (issue #12) ----------


def restart_from(name: str, net: Network, kv: MemoryKV, boot: str, seeds: list[str]) -> SimNode:
    """`name` back from a crash with only what `kv` held (a copy taken earlier: the rest was unflushed)."""
    import copy

    old = nodes[name]
    n = SimNode(name, net, seeds, kv=copy.deepcopy(kv), boot=boot)
    for sub in old.subscribers:  # their SUB sockets reconnect by themselves
        n.add_subscriber(sub)
    nodes[name] = n
    return n


def fork_log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("FORK")]


def run_writer_crashes(seed: int, crashes: int = 4, contexts: int = 3) -> dict[str, Any]:
    """w writes; its replicas r1, r2 follow, with pushes lost now and then; w crashes `crashes` times
    back to what it had some steps earlier (an unflushed tail lost), sometimes writing again, sometimes
    not; r1 and r2 are cut from each other at times. After each crash and a few heartbeats of a
    perfect network, both replicas serve exactly w's history of every context."""
    import copy

    rng = random.Random(seed)
    net = Network(rng, drop=0.0, dup=0.0, max_delay=0.0)
    net.perfect = True
    nodes.clear()
    nodes["w"] = SimNode("w", net, [])
    nodes["r1"] = SimNode("r1", net, ["w"])
    nodes["r2"] = SimNode("r2", net, ["w", "r1"])
    names = [f"ctx{i}" for i in range(contexts)]
    st = Stepper(net)
    st.run_seconds(2)
    set_aside_total = 0
    for crash in range(crashes):
        saved = copy.deepcopy(nodes["w"].ledger.kv)  # what w will come back with
        lost = 0
        for _ in range(rng.randrange(5, 40)):
            for name in rng.sample(names, rng.randrange(1, contexts + 1)):
                for _ in range(rng.randrange(1, 4)):
                    nodes["w"].append(codec.Append(name, "", rng.randbytes(8), {}))
                    lost += 1
            if rng.random() < 0.3:
                net.cut = {frozenset(("r1", "r2"))} if rng.random() < 0.5 else set()
            if rng.random() < 0.2:  # a replica misses some pushes (only one of them holds a tail)
                nodes[rng.choice(["r1", "r2"])].up = False
            st.run_for(1)
            for r in ("r1", "r2"):
                nodes[r].up = True
        st.run_for(2)
        w = restart_from("w", net, saved, f"w-boot-{crash + 2}", ["r1"])
        if rng.random() < 0.6:  # sometimes the writer writes again, sometimes it stays behind
            for _ in range(rng.randrange(1, lost + 10)):
                w.append(codec.Append(rng.choice(names), "", rng.randbytes(8), {}))
        net.cut = set()
        st.run_seconds(40 * HEARTBEAT)  # 8 s: a lost pull reply is given up after 5 s (expiry), then repair
        for name in names:
            wctx = w.ledger.contexts.get(name)
            want = (wctx.size, wctx.frontier.root()) if wctx else None
            for r in ("r1", "r2"):
                ctx = nodes[r].ledger.contexts.get(name)
                got = (ctx.size, ctx.frontier.root()) if ctx else None
                if want is None:
                    assert got is None or got[0] == 0 or name in nodes[r].ledger.aside, (seed, crash, r, name)
                else:
                    assert got == want, f"seed {seed} crash {crash}: {r} serves {got} of {name!r}, w holds {want}"
    for r in ("r1", "r2"):
        set_aside_total += sum(len(v) for v in nodes[r].ledger.aside.values())
    return {"set_aside": set_aside_total}


@pytest.mark.parametrize("seed", seeds()[:4])
def test_after_writer_crashes_that_lost_tails_every_replica_serves_the_writers_history(seed):
    print(f"mesh simulation seed {seed} (replay: LEDGER_SIM_SEED={seed})")
    run_writer_crashes(seed)


def test_a_writer_that_lost_a_tail_and_writes_nothing_more_is_still_followed(caplog):
    # r holds w's #1..#5; w comes back with #1..#3 and stays there: r must not keep serving #4, #5
    import copy

    net = perfect_pair("w", "r", 31)
    w, r = nodes["w"], nodes["r"]
    st = Stepper(net)
    for i in range(3):
        w.append(codec.Append("x", "", b"kept%d" % i, {}))
    st.run_for(10)
    saved = copy.deepcopy(w.ledger.kv)
    for i in range(2):
        w.append(codec.Append("x", "", b"lost%d" % i, {}))
    st.run_for(10)
    assert r.ledger.contexts["x"].size == 5
    w = restart_from("w", net, saved, "w-boot-2", ["r"])
    st.run_seconds(10 * HEARTBEAT)
    rx, wx = r.ledger.contexts["x"], w.ledger.contexts["x"]
    assert (rx.size, rx.frontier.root()) == (wx.size, wx.frontier.root()) == (3, wx.frontier.root())
    (old,) = r.ledger.aside["x"]  # the lost tail is kept, and surfaced
    assert payloads(r.ledger, old) == [b"kept0", b"kept1", b"kept2", b"lost0", b"lost1"]
    assert r.mesh.forks["x"].set_aside and r.mesh.forks["x"].served_writer == "w"
    # w goes on writing; r follows
    for i in range(4):
        w.append(codec.Append("x", "", b"new%d" % i, {}))
    st.run_seconds(4 * HEARTBEAT)
    assert payloads(r.ledger, r.ledger.contexts["x"]) == [b"kept0", b"kept1", b"kept2"] + [b"new%d" % i
                                                                                           for i in range(4)]


def test_a_fork_is_logged_once_per_context_and_history_not_every_heartbeat(caplog):
    import copy
    import logging

    caplog.set_level(logging.ERROR, logger="node.mesh")
    net = perfect_pair("w", "r", 32)
    w, r = nodes["w"], nodes["r"]
    st = Stepper(net)
    w.append(codec.Append("x", "", b"a", {}))
    st.run_for(10)
    saved = copy.deepcopy(w.ledger.kv)
    w.append(codec.Append("x", "", b"b", {}))
    st.run_for(10)
    r.up = False  # r is away while w crashes and comes back behind it
    w = restart_from("w", net, saved, "w-boot-2", ["r"])
    st.run_seconds(2)
    r.up = True
    st.run_seconds(60 * HEARTBEAT)  # 60 heartbeats
    lines = fork_log_lines(caplog)
    assert 1 <= len(lines) <= 2, lines  # once on r (it sets its copy aside), at most once on w


def test_a_writer_that_loses_tails_twice_is_followed_twice_and_both_old_histories_stay_readable():
    import copy

    net = perfect_pair("w", "r", 33)
    w, r = nodes["w"], nodes["r"]
    st = Stepper(net)
    w.append(codec.Append("x", "", b"base", {}))
    st.run_for(10)
    for crash in (1, 2):
        saved = copy.deepcopy(w.ledger.kv)
        w.append(codec.Append("x", "", b"lost%d" % crash, {}))
        st.run_for(10)
        w = restart_from("w", net, saved, f"w-boot-{crash + 1}", ["r"])
        w.append(codec.Append("x", "", b"new%d" % crash, {}))
        st.run_seconds(10 * HEARTBEAT)
        assert payloads(r.ledger, r.ledger.contexts["x"]) == payloads(w.ledger, w.ledger.contexts["x"])
    assert payloads(r.ledger, r.ledger.contexts["x"]) == [b"base", b"new1", b"new2"]
    assert r.mesh.forks["x"].histories_set_aside == 2
    first, second, latest = (r.ledger.get(codec.Get("x", fork="w", fork_index=i)) for i in (1, 2, None))
    assert [decode_entry(b).payload for b in first[0]] == [b"base", b"lost1"]
    assert [decode_entry(b).payload for b in second[0]] == [b"base", b"new1", b"lost2"]
    assert latest[0] == second[0]
    with pytest.raises(LedgerError, match="#3"):
        r.ledger.get(codec.Get("x", fork="w", fork_index=3))


@pytest.mark.parametrize("fields, message", [
    ({"fork_index": 1}, "needs fork"), ({"fork": "w", "fork_index": 0}, "fork_index"),
    ({"fork": "w", "fork_index": 2**32 + 1}, "fork_index"), ({"fork": "w", "fork_index": "1"}, "fork_index"),
])
def test_fork_index_is_checked(fields, message):
    from protocol.errors import RemoteProtocolError

    with pytest.raises(RemoteProtocolError, match=message):
        codec.decode_request(codec.encode_request("get", 1, {"context": "x", **fields}), 1 << 20)
