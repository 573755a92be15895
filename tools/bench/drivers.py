"""What drives a node from this process and times it: `Sample`, the bare DEALER driver (sequential and
pipelined), Redis Streams, paced appends, pipelined appends with per-request times, round-robin requests."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from .common import WINDOW


@dataclass
class Sample:
    ops: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds per request

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


class Dealer:
    """A bare DEALER driver, the same for the echo server and the ledger."""

    def __init__(self, zctx: zmq.Context[Any], address: str,
                 curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        """`curve`: (public, secret, server public) Curve25519 keys, for a node with keys."""
        self.s = zctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            self.s.setsockopt(zmq.CURVE_PUBLICKEY, curve[0])
            self.s.setsockopt(zmq.CURVE_SECRETKEY, curve[1])
            self.s.setsockopt(zmq.CURVE_SERVERKEY, curve[2])
        self.s.setsockopt(zmq.SNDHWM, 100_000)
        self.s.setsockopt(zmq.RCVHWM, 100_000)
        self.s.setsockopt(zmq.RCVTIMEO, 30_000)
        self.s.connect(address)
        self.next_id = 1

    def close(self) -> None:
        self.s.close(linger=0)

    def frames(self, n: int, make: Callable[[int], dict[str, Any]]) -> list[bytes]:
        out = []
        for _ in range(n):
            m = make(self.next_id)
            m["v"] = 1
            m["id"] = self.next_id
            self.next_id += 1
            out.append(msgpack.packb(m, use_bin_type=True))
        return out

    def request(self, m: dict[str, Any]) -> bytes:
        """One request, its raw reply (RuntimeError unless ok)."""
        (frame,) = self.frames(1, lambda i: dict(m))
        self.s.send(frame)
        reply: bytes = self.s.recv()
        if b"\xa2ok\xc3" not in reply:
            raise RuntimeError(f"request failed: {msgpack.unpackb(reply)}")
        return reply

    def seq(self, frames: Sequence[bytes], check: bool = True) -> Sample:
        s = self.s
        lat = []
        pc = time.perf_counter
        t0 = pc()
        for f in frames:
            t = pc()
            s.send(f)
            reply = s.recv()
            lat.append(pc() - t)
            if check and b"\xa2ok\xc3" not in reply:
                raise RuntimeError(f"request failed: {msgpack.unpackb(reply)}")
        return Sample(len(frames), pc() - t0, lat)

    def pipelined(self, frames: Sequence[bytes], window: int = WINDOW, count_per_reply: int = 1) -> Sample:
        s = self.s
        pc = time.perf_counter
        sent_at: list[float] = []
        lat = []
        n = len(frames)
        sent = got = 0
        t0 = pc()
        while got < n:
            while sent < n and sent - got < window:
                sent_at.append(pc())
                s.send(frames[sent])
                sent += 1
            reply = s.recv()
            lat.append(pc() - sent_at[got])
            got += 1
            if b"\xa2ok\xc3" not in reply:
                raise RuntimeError(f"request failed: {msgpack.unpackb(reply)}")
        return Sample(n * count_per_reply, pc() - t0, lat)


def redis_seq(r: Any, n: int, payload: bytes) -> Sample:
    lat = []
    pc = time.perf_counter
    t0 = pc()
    for _ in range(n):
        t = pc()
        r.xadd("bench", {"payload": payload})
        lat.append(pc() - t)
    return Sample(n, pc() - t0, lat)


def redis_pipelined(r: Any, n: int, payload: bytes) -> Sample:
    pc = time.perf_counter
    lat = []
    t0 = pc()
    done = 0
    while done < n:
        k = min(WINDOW, n - done)
        t = pc()
        pipe = r.pipeline(transaction=False)
        for _ in range(k):
            pipe.xadd("bench", {"payload": payload})
        pipe.execute()
        lat.append((pc() - t) / k)
        done += k
    return Sample(n, pc() - t0, lat)


def paced_appends(dealer: Dealer, context: str, n: int, rate: float, payload: bytes,
                  ) -> tuple[float, dict[tuple[str, int], int]]:
    """`n` appends, one at a time, started on a fixed schedule of `rate` per second.

    Returns the seconds taken and each entry's acknowledgement time (monotonic ns) by seq.
    """
    frames = dealer.frames(n, lambda i: {"op": "append", "context": context, "key": "k", "payload": payload})
    s = dealer.s
    mono = time.monotonic_ns
    unpackb = msgpack.unpackb
    acks: dict[tuple[str, int], int] = {}
    step = 1e9 / rate
    t0 = mono()
    for i, f in enumerate(frames):
        wait = t0 + int(i * step) - mono()
        if wait > 0:
            time.sleep(wait / 1e9)
        s.send(f)
        reply = s.recv()
        t = mono()
        m = unpackb(reply)
        if not m.get("ok"):
            raise RuntimeError(f"append failed: {m}")
        acks[(context, m["entry"]["seq"])] = t
    return (mono() - t0) / 1e9, acks


def pipelined_timed(dealer: Dealer, frames: Sequence[bytes], window: int = WINDOW, at: str = "ack",
                    ) -> tuple[Sample, dict[tuple[str, int], int]]:
    """Dealer.pipelined, also noting per entry (monotonic ns) when its append was sent
    (`at="submit"`) or when its acknowledgement was read (`at="ack"`).

    A pipelined appender reads its acknowledgements late (it is busy sending), often after
    the watchers have the entry: submission is the time a delivery latency can start from.
    """
    s = dealer.s
    mono = time.monotonic_ns
    unpackb = msgpack.unpackb
    sent_at: list[int] = []
    lat = []
    times: dict[tuple[str, int], int] = {}
    n = len(frames)
    sent = got = 0
    t0 = mono()
    while got < n:
        while sent < n and sent - got < window:
            sent_at.append(mono())
            s.send(frames[sent])
            sent += 1
        reply = s.recv()
        t = mono()
        lat.append((t - sent_at[got]) / 1e9)
        m = unpackb(reply)
        if not m.get("ok"):
            raise RuntimeError(f"request failed: {m}")
        # replies come in request order
        times[(m["entry"]["context"], m["entry"]["seq"])] = sent_at[got] if at == "submit" else t
        got += 1
    return Sample(n, (mono() - t0) / 1e9, lat), times


def round_robin(contexts: Sequence[str], first_id: int, payload: bytes) -> Callable[[int], dict[str, Any]]:
    """Append requests over `contexts` in turn (Dealer.frames passes request ids from `first_id`)."""
    def make(i: int) -> dict[str, Any]:
        return {"op": "append", "context": contexts[(i - first_id) % len(contexts)], "key": "k", "payload": payload}
    return make
