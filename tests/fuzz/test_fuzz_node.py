"""Fuzz, against a real `ledger-node`: pipelined hostile requests, and a fake peer that answers hostile.

One DEALER sends windows of requests (hostile frames mixed with honest appends)
and reads every reply. The fuzzed heartbeats name a fake peer this test runs (a
ROUTER and a PUB on loopback), so the node also meets hostile replies to its own
heartbeats, `sync_heads` and pulls, and hostile messages on the replication
stream. After the run: the node is alive, never answered INTERNAL, logged no
traceback, every honest context has the (size, root) its honest appends made and
every context verifies; then it stops cleanly and, restarted on its data, still
serves the same.

Seed: printed; replay with LEDGER_FUZZ_SEED=<seed>. Count: LEDGER_FUZZ_N, or
LEDGER_FUZZ_LONG=1 / --fuzz-long (see README, "Fuzz testing").
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgpack
import pytest
import zmq

from protocol import codec
from tests.fuzz import gen
from tests.fuzz.oracle import INTERNAL, Honest, check_after_run

N = gen.count_from_env(5_000, long=200_000)
LONG = N > 5_000
WINDOW = int(os.environ.get("LEDGER_FUZZ_WINDOW", "100"))  # requests in flight (1 to find the one that fails)
HONEST = ["honest-a", "honest-b"]
FUZZED = ["f1", "f2", "c"]
REPLICAS = ["r1", "r2"]  # written by the publishing fake peer, an honest writer (gen.FakeWriter)
NODE_FLAGS = ("--id", "fz", "--durability", "async", "--heartbeat-ms", "50", "--replica-timeout-ms", "50",
              "--max-payload", "64K", "--dead-after", "4")


class FakePeer:
    """A ROUTER that answers the node's peer requests, hostile; or, with a `writer`, an honest
    writer's ROUTER and PUB (which also carries hostile pushes)."""

    def __init__(self, zctx: zmq.Context, fz: gen.Fuzzer, requests: dict[str, int],
                 writer_contexts: list[str] | None = None) -> None:
        self.fz = fz
        self.router = zctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.pub = None
        self.writer = None
        if writer_contexts is not None:
            self.pub = zctx.socket(zmq.PUB)
            self.pub.setsockopt(zmq.LINGER, 0)
            pub_port = self.pub.bind_to_random_port("tcp://127.0.0.1")
            self.writer = gen.FakeWriter(fz.rng, writer_contexts, f"127.0.0.1:{self.port}", f"127.0.0.1:{pub_port}")
        self.requests = requests  # op -> how many the node sent us

    def serve(self) -> None:
        while self.router.poll(0):
            ident, *frames = self.router.recv_multipart()
            try:
                m = msgpack.unpackb(frames[-1], raw=False)
            except Exception:
                continue
            op = m.get("op") if isinstance(m, dict) else None
            self.requests[str(op)] = self.requests.get(str(op), 0) + 1
            fz = self.fz
            if self.writer is not None:
                # the writer answers honestly (a changed id, cluster or pub would also make the
                # node drop its subscription: gen.LIVE_PUB_STABLE)
                body = fz.pack(self.writer.reply(m.get("id"), str(op), m))
            else:
                body = fz.garbage_frame() if fz.chance(0.05) else fz.pack(fz.reply(m.get("id"), op, m, {}))
            self.router.send_multipart([ident, body])

    def heartbeat(self) -> bytes:
        assert self.writer is not None
        return codec.encode_request("heartbeat", "writer", self.writer.heartbeat())

    def push(self) -> None:
        assert self.pub is not None and self.writer is not None
        fz = self.fz
        self.pub.send_multipart(self.writer.next_push(self.writer.pushed) if fz.chance(0.5) else fz.push({}))

    def close(self) -> None:
        self.router.close(linger=0)
        if self.pub is not None:
            self.pub.close(linger=0)


def dealer(zctx: zmq.Context, address: str) -> zmq.Socket:
    s = zctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 0)
    s.setsockopt(zmq.RCVHWM, 0)
    s.connect(address)
    return s


@pytest.mark.timeout(7200 if LONG else 180)
def test_hostile_messages_against_a_real_node(node_factory, zctx):
    seed = gen.seed_from_env()
    print(f"fuzz seed {seed} (replay with LEDGER_FUZZ_SEED={seed}), {N} requests")
    node = node_factory(*NODE_FLAGS)
    fz = gen.Fuzzer(seed, contexts=FUZZED, read_only=HONEST + REPLICAS, node_id="fz", addresses=["127.0.0.1:1"],
                     max_payload=64 << 10, protected=REPLICAS)
    asked: dict[str, int] = {}
    peer = FakePeer(zctx, fz, asked)  # answers hostile
    publisher = FakePeer(zctx, fz, asked, REPLICAS)  # an honest writer; its stream carries hostile pushes too
    writer = publisher.writer
    assert writer is not None
    # the fuzzed heartbeats name the answering fake peer and closed ports, never the publisher
    fz.addresses = [f"127.0.0.1:{peer.port}", f"127.0.0.1:{peer.port}", "127.0.0.1:1"]
    fz.pubs = ["127.0.0.1:1", "127.0.0.1:2"] + ([] if gen.LIVE_PUB_STABLE else [str(writer.pub)])
    honest = Honest(fz.rng, HONEST)
    s = dealer(zctx, node.address)
    failures: list[str] = []
    replies = 0

    def fail(msg: str) -> None:
        if len(failures) < 50:
            failures.append(msg)

    def call(op: str, fields: dict[str, Any]) -> dict[str, Any]:
        fields = dict(fields)
        rid = fields.pop("id", f"check-{time.monotonic_ns()}")
        s.send(codec.encode_request(op, rid, fields))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            peer.serve()
            publisher.serve()
            if s.poll(10):
                m = codec.decode_reply(s.recv_multipart()[-1])
                if m.get("id") == rid:
                    return m
        raise AssertionError(f"no reply to {op} within 20 s (node alive: {node.proc.poll() is None})")

    try:
        # every protected context exists before the fuzzing starts (a hostile empty load could create it)
        for ctx in HONEST:
            honest.waiting["setup"] = (ctx, None)
            honest.on_reply(call("append", {"id": "setup", "context": ctx, "payload": b"first"}))
        for ctx in REPLICAS:
            writer.grow(ctx, 3)
        deadline = time.monotonic() + 15
        while not all(call("head", {"context": c}).get("ok") for c in REPLICAS):  # pulled by repair
            assert time.monotonic() < deadline, (f"the node did not replicate the fake writer's contexts; it asked "
                                                 f"{asked}:\n{node.output()[-3000:]}")
            call("heartbeat", writer.heartbeat())
            time.sleep(0.05)
        sent = 0
        while sent < N and not failures:
            if sent and not sent % 50_000:
                print(f"{sent} requests", flush=True)
            window: dict[int, list[bytes]] = {}
            s.send(publisher.heartbeat())
            window[-1] = []
            for _ in range(min(WINDOW, N - sent)):
                if fz.chance(0.1):
                    op, fields = honest.request()
                    rid = fields.pop("id")
                    frames = [codec.encode_request(op, rid, fields)]
                else:
                    frames = fz.frames()
                s.send_multipart(frames)
                window[sent] = frames
                sent += 1
            for _ in range(3):
                publisher.push()
            got = 0
            deadline = time.monotonic() + 20
            while got < len(window):
                peer.serve()
                publisher.serve()
                if not s.poll(5):
                    if time.monotonic() > deadline:
                        fail(f"{len(window) - got} of {len(window)} requests unanswered after 20 s "
                             f"(node alive: {node.proc.poll() is None}); the window was {list(window.values())!r:.2000}")
                        break
                    continue
                body = s.recv_multipart()[-1]
                got += 1
                replies += 1
                try:
                    m = msgpack.unpackb(body, raw=False)
                except Exception as exc:
                    fail(f"undecodable reply {body!r:.200} ({exc})")
                    continue
                if honest.owns(m.get("id")):
                    honest.on_reply(m)
                elif not m.get("ok") and (m.get("error") or {}).get("code") == INTERNAL:
                    fail(f"INTERNAL: {m['error'].get('message')} (window: {list(window.values())!r:.3000})")
        if node.proc.poll() is not None:
            fail(f"the node exited: {node.output()[-3000:]}")
        if not failures:
            # the hostile peers fall silent; the writer keeps in touch: its contexts must converge
            deadline = time.monotonic() + 20
            while any(call("head", {"context": c}).get("size") != len(writer.logs[c]) for c in REPLICAS):
                if time.monotonic() > deadline:
                    fail("the replicas stopped short of their writer's history")
                    break
                call("heartbeat", writer.heartbeat())
                time.sleep(0.05)
            failures += check_after_run(call, honest)
            heads = {c: call("head", {"context": c}) for c in REPLICAS}
            failures += [bad for c, h in heads.items() if (bad := writer.check(c, h))]
            print(f"replicas: {({c: h.get('size') for c, h in heads.items()})} of "
                  f"{({c: len(log) for c, log in writer.logs.items()})}")
        before = {c: honest.expected(c) for c in HONEST}
        s.close(linger=0)
        peer.close()
        publisher.close()
        rc = node.stop()
        if rc != 0:
            fail(f"the node exited with {rc} at SIGTERM")
        logged = [ln for ln in node.lines if "Traceback" in ln or "internal error" in ln]
        if logged:
            fail(f"the node logged tracebacks: {node.output()[-4000:]}")
        if not failures:
            # restarted on its data, it serves exactly what it acknowledged
            node.start()
            s = dealer(zctx, node.address)
            peer = FakePeer(zctx, fz, asked)  # (nothing names it now: call() serves it anyway)
            publisher = FakePeer(zctx, fz, asked)
            for c, want in before.items():
                head = call("head", {"context": c})
                if (head.get("size"), head.get("root")) != want:
                    fail(f"after a restart {c!r} is {head!r:.200}, not {want!r}")
    finally:
        s.close(linger=0)
        peer.close()
        publisher.close()
    print(f"{sent} requests, {replies} replies; requests by op: {fz.counts}; "
          f"the node asked the fake peer: {asked}")
    assert not failures, f"seed {seed}:\n" + "\n".join(failures)
