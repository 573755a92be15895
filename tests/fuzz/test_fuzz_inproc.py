"""Fuzz, in process: hostile requests, pushes and peer replies into a real Server, checked by an honest oracle.

The Server is built as `ledger-node` builds it (Ledger on a MemoryKV, Mesh,
Publisher, flusher thread), but the test calls its entry points itself instead
of running its loop: `core.request` for a request, `mesh.on_push` for a message on a
peer's replication stream, `mesh.on_reply` for a peer's answer to a request the
node made, and the loop's own housekeeping (tick, flush hand-off, publish) in
between. The node's requests to peers go to a recording fake instead of sockets,
so that replies can be forged for them. Every request must get exactly one
reply, none INTERNAL; no entry point may raise; after the run every honest
context has the (size, root) the honest appends made.

Seed: printed; replay with LEDGER_FUZZ_SEED=<seed>. Count: LEDGER_FUZZ_N, or
LEDGER_FUZZ_LONG=1 / --fuzz-long for 1,000,000 (see README, "Fuzz testing").
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

import msgpack
import pytest

from node.config import Config
from node.ledger import Ledger
from node.server import Server
from node.storage import MemoryKV
from protocol import codec
from tests.fuzz import gen
from tests.fuzz.oracle import INTERNAL, Honest, check_after_run

N = gen.count_from_env(12_000, long=800_000)
LONG = N > 12_000
HONEST = ["honest-a", "honest-b", "honest-c"]
REPLICAS = ["r1", "r2"]  # written by an honest fake peer (gen.FakeWriter), replicated here
FUZZED = ["f1", "f2", "f3", "c", "x" * 256]
PEERS = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "[::1]:4"]


class FakeTransport:
    """Stands in for the server's peer sockets: remembers what the node asked of whom."""

    def __init__(self) -> None:
        self.rid = 0
        self.sent: dict[int, tuple[str, str, dict[str, Any]]] = {}
        self.subscribed: set[str] = set()

    def request(self, address: str, op: str, fields: dict[str, Any]) -> int | None:
        codec.encode_request(op, 1, fields)  # what the server would put on the wire must encode
        self.rid += 1
        self.sent[self.rid] = (address, op, fields)
        if len(self.sent) > 1000:
            self.sent.pop(next(iter(self.sent)))
        return self.rid

    def subscribe(self, pub_address: str) -> None:
        self.subscribed.add(pub_address)

    def unsubscribe(self, pub_address: str) -> None:
        self.subscribed.discard(pub_address)

    def forget(self, address: str) -> None:
        pass


def make_server(zctx: Any, cache: int = 100_000) -> tuple[Server, list[list[bytes]], FakeTransport]:
    cfg = Config(node_id="fz", data=":memory:", host="127.0.0.1", port=0, pub_port=0, durability="async",
                 flush_ms=5, max_payload=64 << 10, hot_bytes=8 << 20, log_level="info", replica_timeout_ms=0)
    # (with 3, recent entries leave RAM once on disk too, so that their contexts can)
    server = Server(cfg, Ledger(MemoryKV(), node_id="fz", sync_meta=False, context_cache=cache,
                                hot_bytes=64 << 20 if cache > 3 else 0), zctx=zctx)
    out: list[list[bytes]] = []
    server.core.outbox = out  # the core queues its replies here; they are read, not sent
    fake = FakeTransport()
    server.mesh.transport = fake
    return server, out, fake


@pytest.mark.timeout(7200 if LONG else 240)
# a cache of 3 contexts: every context goes out of RAM and comes back from disk all the time
@pytest.mark.parametrize("cache", [100_000, 3], ids=["cache-all", "cache-3"])
def test_hostile_requests_pushes_and_peer_replies_in_process(zctx, caplog, cache):
    seed = gen.seed_from_env()
    print(f"fuzz seed {seed} (replay with LEDGER_FUZZ_SEED={seed}), {N} messages")
    caplog.set_level(logging.ERROR)
    fz = gen.Fuzzer(seed, contexts=FUZZED, read_only=HONEST + REPLICAS, node_id="fz", addresses=PEERS,
                    max_payload=64 << 10, protected=REPLICAS)
    honest = Honest(fz.rng, HONEST)
    writer = gen.FakeWriter(fz.rng, REPLICAS, address="127.0.0.1:9")
    server, out, fake = make_server(zctx, cache)
    server.flusher.start()  # (idle: the test writes batches itself; started so that _shutdown can stop it)
    failures: list[str] = []
    kinds: dict[str, int] = {}
    now = 1000.0
    requests = 0

    def fail(what: str, detail: str) -> None:
        if len(failures) < 50:
            failures.append(f"{what}: {detail}")

    def call(op: str, fields: dict[str, Any]) -> dict[str, Any]:
        """One request through the core, its one reply decoded."""
        nonlocal requests
        fields = dict(fields)
        rid = fields.pop("id", f"check-{requests}")
        n = len(out)
        server.core.request([b"client", codec.encode_request(op, rid, fields)], now)
        requests += 1
        assert len(out) == n + 1, f"{op} got {len(out) - n} replies"
        return codec.decode_reply(out[-1][-1])

    try:
        # every protected context exists before the fuzzing starts (a hostile empty load could create it)
        for ctx in HONEST:
            honest.waiting["setup"] = (ctx, None)
            honest.on_reply(call("append", {"id": "setup", "context": ctx, "payload": b"first"}))
        assert call("heartbeat", writer.heartbeat())["ok"]
        for ctx in REPLICAS:
            writer.grow(ctx, 3)
            server.mesh.on_push(writer.push(ctx, 1, 3))
            assert server.ledger.contexts[ctx].size == 3
        named = FUZZED + HONEST + REPLICAS
        for i in range(N):
            out.clear()  # (replies are checked as they come; a long run must not keep them)
            if i and not i % 100_000:
                print(f"{i} messages, {len(failures)} failures so far", flush=True)
            r = fz.rng.random()
            sizes = {n: c.size for n in named if (c := server.ledger.contexts.get(n)) is not None}
            if r < 0.12:
                kind = "honest"
                op, fields = honest.request()
                reply = call(op, fields)
                honest.on_reply(reply)
            elif r < 0.72:
                kind = "request"
                frames = fz.frames()
                n = len(out)
                waiting = len(server.core.for_replicas)
                server.core.request([b"fuzzer", *frames], now)
                requests += 1
                # one reply, unless the append waits for replicas (answered at the next tick); a
                # peer's ack also answers the appends that waited for it
                released = max(0, waiting - len(server.core.for_replicas))
                if len(out) != n + 1 + released and not (len(out) == n and server.core.for_replicas):
                    fail("request", f"{len(out) - n} replies to {frames!r:.300}")
                for f in out[n:]:
                    try:
                        m = msgpack.unpackb(f[-1], raw=False)
                    except Exception as exc:
                        fail("reply", f"undecodable reply {f[-1]!r:.100} ({exc}) to {frames!r:.300}")
                        continue
                    if not m.get("ok") and (m.get("error") or {}).get("code") == INTERNAL:
                        fail("INTERNAL", f"{m['error'].get('message')} <- {frames!r:.300}")
            elif r < 0.84:
                kind = "push"
                frames = writer.next_push(sizes) if fz.chance(0.4) else fz.push(sizes)
                try:
                    server.mesh.on_push(frames)
                except Exception:
                    fail("on_push raised", f"{traceback.format_exc(limit=-3)} <- {frames!r:.300}")
            elif r < 0.96:
                kind = "peer reply"
                if fake.sent and fz.chance(0.7):
                    rid = fz.rng.choice(list(fake.sent))
                    address, op, sent_fields = fake.sent.pop(rid) if fz.chance(0.8) else fake.sent[rid]
                else:
                    rid, op, sent_fields = fz.rng.choice((None, 0, -1, 2**64 - 1, "x")), None, None
                    address = fz.rng.choice(PEERS)
                if address == writer.address and op is not None:
                    reply = writer.reply(rid, op, sent_fields or {})  # the writer is honest
                else:
                    reply = fz.reply(rid, op, sent_fields, sizes)
                raw = fz.pack(reply)
                try:
                    decoded = codec.decode_reply(raw)
                except Exception:
                    decoded = None  # the server drops a reply it cannot decode
                if decoded is not None:
                    try:
                        server.mesh.on_reply(address, decoded, now, len(raw))
                    except Exception:
                        fail("on_reply raised", f"{traceback.format_exc(limit=-3)} <- {address} {reply!r:.300}")
            else:
                kind = "tick"
                now += fz.rng.choice((0.01, 0.2, 1.0, 30.0))
                if not call("heartbeat", writer.heartbeat()).get("ok"):  # the writer keeps in touch
                    fail("heartbeat", "the fake writer's heartbeat was refused")
                try:
                    server.mesh.tick(now)
                    server.mesh.flush_acks(now)
                    server.core.check_replicated(now)
                    # Written here, not by the flusher thread: MemoryKV is not safe against a
                    # concurrent write (see test_known_bugs.py, the memory KV race).
                    server.ledger.flush_sync(sync=False)
                    server.publisher.publish()
                    server.publisher.heartbeat()
                except Exception:
                    fail("housekeeping raised", traceback.format_exc(limit=-3))
            kinds[kind] = kinds.get(kind, 0) + 1
        # the hostile peers fall silent; the writer keeps in touch: its contexts must converge
        for _ in range(200):
            if all(server.ledger.contexts[c].size == len(writer.logs[c]) for c in REPLICAS):
                break
            now += 0.2
            call("heartbeat", writer.heartbeat())
            server.mesh.tick(now)
            for rid, (address, op, sent_fields) in list(fake.sent.items()):
                if address == writer.address:
                    del fake.sent[rid]
                    server.mesh.on_reply(address, codec.decode_reply(fz.pack(writer.reply(rid, op, sent_fields))), now)
        else:
            fail("convergence", f"the replicas stopped short of their writer's history: "
                 f"{({c: server.ledger.contexts[c].size for c in REPLICAS})} of "
                 f"{({c: len(log) for c, log in writer.logs.items()})}; forks: {server.mesh.forks}")
        server.core.check_replicated(now + 1)  # replicas=N appends time out at once (replica_timeout_ms=0)
        problems = check_after_run(call, honest)
        for ctx in REPLICAS:
            bad = writer.check(ctx, call("head", {"context": ctx}))
            if bad:
                problems.append(bad)
        replicated = {c: server.ledger.contexts[c].size for c in REPLICAS if c in server.ledger.contexts}
        print(f"replicas: {replicated} of {({c: len(log) for c, log in writer.logs.items()})}")
    finally:
        server._shutdown()
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    print(f"messages by kind: {kinds}; requests by op: {fz.counts}; contexts: {len(server.ledger.contexts)}")
    assert not failures, f"seed {seed}:\n" + "\n".join(failures)
    assert not problems, f"seed {seed}:\n" + "\n".join(problems)
    assert not logged, f"seed {seed}: the node logged exceptions: {logged[:5]}"
    if cache == 3:  # the run went through the cache, not around it
        cached = server.ledger.contexts
        assert cached.evictions > 10 and cached.loads > 10, (cached.evictions, cached.loads)
