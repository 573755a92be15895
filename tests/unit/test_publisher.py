"""node.publisher over an inproc XPUB: what goes to watchers and what goes to peers (SPEC 17.3)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import zmq

from node.ledger import Ledger
from node.publisher import Publisher
from node.storage import MemoryKV
from protocol import codec, watch
from protocol.entry import decode_entry

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def zctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def sub(zctx: zmq.Context, addr: str, prefix: bytes) -> zmq.Socket:
    s = zctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SUBSCRIBE, prefix)
    s.connect(addr)
    return s


def drain(s: zmq.Socket) -> list[list[bytes]]:
    out = []
    while s.poll(100):
        out.append(s.recv_multipart())
    return out


def test_own_entries_go_to_peers_and_watchers_replicated_ones_to_watchers_only(zctx):
    xpub = zctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.XPUB_VERBOSER, 1)
    xpub.setsockopt(zmq.LINGER, 0)
    addr = f"inproc://pub-{id(xpub)}"
    xpub.bind(addr)
    me = Ledger(MemoryKV(), node_id="me", sync_meta=False)
    other = Ledger(MemoryKV(), node_id="other", sync_meta=False)
    pub = Publisher(xpub, me, sync=False, heartbeat_ms=60_000)
    peer = sub(zctx, addr, watch.REPL_PREFIX)
    watcher = sub(zctx, addr, watch.topic("theirs"))
    watcher_own = sub(zctx, addr, watch.topic("mine"))
    deadline = time.monotonic() + 5
    while (pub.peer_subs, len(pub.counts)) != (1, 2):
        assert time.monotonic() < deadline, "subscriptions never arrived"
        if xpub.poll(50):
            pub.on_subscriptions()
    drain(watcher), drain(watcher_own)  # the greetings
    own = me.append(codec.Append("mine", "", b"m1", {}))
    pub.mark(own.ctx)
    theirs = [decode_entry(other.append(codec.Append("theirs", "", b"t", {})).blobs[0]) for _ in range(2)]
    pub.mark(me.apply_replicated("theirs", theirs))
    unwatched = [decode_entry(other.append(codec.Append("quiet", "", b"q", {})).blobs[0])]
    pub.mark(me.apply_replicated("quiet", unwatched))
    pub.publish()

    to_peer = [watch.decode_message(f) for f in drain(peer)]
    assert [(m.context, [e.seq for e in m.entries]) for m in to_peer] == [("mine", [1])]
    assert drain(peer) == []
    got = [watch.decode_message(f) for f in drain(watcher)]
    assert [(m.context, [e.seq for e in m.entries]) for m in got] == [("theirs", [1, 2])]
    got_own = [watch.decode_message(f) for f in drain(watcher_own)]
    assert [(m.context, [e.seq for e in m.entries]) for m in got_own] == [("mine", [1])]
    st = pub.status()
    assert (st["replication_subscribers"], st["replication_entries"], st["published_entries"]) == (1, 1, 3)
    # a peer's subscription is not a watcher
    assert st["watchers"] == 2 and st["wildcard_subscriptions"] == 0
    for s in (peer, watcher, watcher_own, xpub):
        s.close(linger=0)


def test_replication_topics_never_match_a_watch_topic():
    for name in ["a", "é" * 128, "x" * 256]:
        t = watch.topic(name)
        assert not t.startswith(watch.REPL_PREFIX)
        assert watch.context_of_message_topic(watch.repl_topic(name)) == name
        assert watch.context_of_topic(watch.repl_topic(name)) is None  # not counted as a watcher


def test_the_replication_stream_says_ack_while_the_writer_waits_for_replicas(zctx):
    xpub = zctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.LINGER, 0)
    addr = f"inproc://pub-ack-{id(xpub)}"
    xpub.bind(addr)
    me = Ledger(MemoryKV(), node_id="me", sync_meta=False)
    waiting: set[str] = set()
    pub = Publisher(xpub, me, sync=False, heartbeat_ms=60_000, wants_ack=lambda ctx: ctx.name in waiting)
    peer = sub(zctx, addr, watch.REPL_PREFIX)
    deadline = time.monotonic() + 5
    while pub.peer_subs != 1:
        assert time.monotonic() < deadline, "subscription never arrived"
        if xpub.poll(50):
            pub.on_subscriptions()
    for name in ("plain", "held"):
        pub.mark(me.append(codec.Append(name, "", b"x", {})).ctx)
    waiting.add("held")
    pub.publish()
    got = {m.context: m.ack for m in (watch.decode_message(f) for f in drain(peer))}
    assert got == {"plain": False, "held": True}
    peer.close(linger=0)
    xpub.close(linger=0)


# -- the watch registry's bounds (--max-watch-topics) and its cost per loop turn (SPEC 16.5) --------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def registry(zctx: zmq.Context, name: str, **kw) -> tuple[zmq.Socket, str, Ledger, Publisher, Clock]:
    xpub = zctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.XPUB_VERBOSER, 1)
    xpub.setsockopt(zmq.LINGER, 0)
    xpub.setsockopt(zmq.SNDHWM, 0)
    addr = f"inproc://{name}-{id(xpub)}"
    xpub.bind(addr)
    led = Ledger(MemoryKV(), node_id="me", sync_meta=False)
    clock = Clock()
    return xpub, addr, led, Publisher(xpub, led, sync=False, now=clock, **kw), clock


def take_in(xpub: zmq.Socket, pub: Publisher, seen: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not seen():
        assert time.monotonic() < deadline, "subscriptions never arrived"
        if xpub.poll(50):
            pub.on_subscriptions()


def test_subscriptions_past_max_watch_topics_are_refused_counted_and_not_tracked(zctx):
    xpub, addr, led, pub, _ = registry(zctx, "cap", heartbeat_ms=60_000, max_topics=2)
    a = sub(zctx, addr, watch.topic("a"))
    b = sub(zctx, addr, watch.topic("b"))
    take_in(xpub, pub, lambda: len(pub.counts) == 2)
    a2 = sub(zctx, addr, watch.topic("a"))  # one more watcher of a tracked topic is no new topic
    c = sub(zctx, addr, watch.topic("c"))
    take_in(xpub, pub, lambda: pub.counts.get(watch.topic("a")) == 2 and pub.topics_refused == 1)
    assert set(pub.counts) == {watch.topic("a"), watch.topic("b")} and set(pub.last_sent) == set(pub.counts)
    # the refused watcher hears one head that says so, and nothing of what is appended later
    greet = [watch.decode_message(f) for f in drain(c)]
    assert [(m.context, m.limited, m.watchers) for m in greet] == [("c", True, 0)]
    # (a hears a greeting for itself and one for a2)
    assert [m.limited for m in (watch.decode_message(f) for f in drain(a))] == [False, False]
    drain(b), drain(a2)
    for name in ("a", "c"):
        pub.mark(led.append(codec.Append(name, "", b"x", {})).ctx)
    pub.publish()
    assert drain(c) == []
    assert [m.context for m in (watch.decode_message(f) for f in drain(a))] == ["a"]
    st = pub.status()
    assert (st["watched_contexts"], st["watch_topics_refused"], st["max_watch_topics"]) == (2, 1, 2)
    # its unsubscription counts nothing down; a freed slot takes the next new topic
    c.close(linger=0)
    b.close(linger=0)
    take_in(xpub, pub, lambda: watch.topic("b") not in pub.counts)
    assert pub.counts == {watch.topic("a"): 2}
    d = sub(zctx, addr, watch.topic("d"))
    take_in(xpub, pub, lambda: watch.topic("d") in pub.counts)
    assert [m.limited for m in (watch.decode_message(f) for f in drain(d))] == [False]
    for s in (a, a2, d, xpub):
        s.close(linger=0)


def test_heartbeats_go_oldest_first_within_a_budget_per_call_and_reach_every_topic(zctx):
    n = 3000
    xpub, addr, led, pub, clock = registry(zctx, "hb", heartbeat_ms=1000, max_topics=n)
    s = zctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 0)
    s.setsockopt(zmq.SNDHWM, 0)
    s.connect(addr)
    for i in range(n):
        s.setsockopt(zmq.SUBSCRIBE, watch.topic(f"t{i}"))
    calls = 0

    def read() -> bool:
        nonlocal calls
        calls += 1
        return len(pub.counts) == n

    take_in(xpub, pub, read)
    assert calls >= 3  # one call reads at most MAX_SUBSCRIPTIONS_PER_CALL of them
    assert len(drain(s)) == n  # the greetings
    pub.mark(led.append(codec.Append("t7", "", b"x", {})).ctx)
    clock.t += 0.5
    pub.publish()  # t7 was sent to half an interval later than the rest
    assert len(drain(s)) == 1
    clock.t += 0.6
    pub.heartbeat()
    budget = 64 + 2 * n // 10  # twice a fair share per 0.1 s call
    first = [watch.decode_message(f).context for f in drain(s)]
    assert len(first) == budget and "t7" not in first
    heads = list(first)
    for _ in range(8):  # the rest of this interval
        clock.t += 0.1
        pub.heartbeat()
        heads += [watch.decode_message(f).context for f in drain(s)]
    # every topic got exactly one head per interval in the end (t7 too, once it was due)
    assert sorted(heads) == sorted(f"t{i}" for i in range(n))
    s.close(linger=0)
    xpub.close(linger=0)
