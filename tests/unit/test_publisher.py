"""node.publisher over an inproc XPUB: what goes to watchers and what goes to peers (SPEC 17.3)."""

from __future__ import annotations

import time

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
