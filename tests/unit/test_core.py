"""The sans-I/O node core (node/core.py) driven by hand: events in, replies and write batches out.

No sockets, no threads, no clock: time is whatever the test passes in.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Any

import msgpack
import pytest

from node.config import Config
from node.core import Core, Reply, Request, WhenDurable, WhenReplicated, WriteBatch
from node.ledger import ContextState, Ledger
from node.storage import MemoryKV
from protocol import codec
from protocol.heads import sign_head
from protocol.keys import Identity

pytestmark = pytest.mark.timeout(30)

CLIENT = b"client-1"


class Wire:
    """The mesh's transport and the watch feed, recording what the core asks of them."""

    boot = "test-boot"

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, Any]]] = []
        self.marked: list[str] = []

    def request(self, address: str, op: str, fields: dict[str, Any]) -> int | None:
        self.sent.append((address, op, fields))
        return len(self.sent)

    def subscribe(self, pub_address: str) -> None:
        pass

    def unsubscribe(self, pub_address: str) -> None:
        pass

    def forget(self, address: str) -> None:
        pass

    def mark(self, ctx: ContextState) -> None:
        self.marked.append(ctx.name)

    def watchers(self, context: str) -> int:
        return 0


def make_core(durability: str = "async", node_id: str = "me", identity: Identity | None = None,
              address: str = "127.0.0.1:1", **kw: Any) -> tuple[Core, Wire]:
    cfg = Config(node_id=node_id, data=":memory:", host="127.0.0.1", port=1, pub_port=2, durability=durability,
                 flush_ms=10, max_payload=1 << 20, hot_bytes=8 << 20, log_level="info", **kw)
    wire = Wire()
    return Core(cfg, Ledger(MemoryKV(), node_id=node_id, sync_meta=False), wire, wire,
                address=address, pub="127.0.0.1:2", started=100.0, identity=identity), wire


def ask(core: Core, op: str, now: float = 100.0, ident: bytes = CLIENT, **fields: Any) -> list[dict[str, Any]]:
    """One request into the core; the replies it queued for `ident` (decoded), taken out of the outbox."""
    core.request([ident, codec.encode_request(op, 7, fields)], now)
    return take(core, ident)


def take(core: Core, ident: bytes = CLIENT) -> list[dict[str, Any]]:
    mine = [f for f in core.outbox if f[0] == ident]
    core.outbox = [f for f in core.outbox if f[0] != ident]
    return [codec.decode_reply(f[-1]) for f in mine]


def write(core: Core, now: float, error: str | None = None) -> WriteBatch:
    batch = core.next_write(now, force=True)
    assert batch is not None
    if error is None:
        batch.commit()
    core.written(batch.dirty, error, now)
    core.settle(now)
    return batch


def test_an_append_is_answered_now_in_async_mode_and_its_context_marked_for_the_watchers():
    core, wire = make_core()
    (r,) = ask(core, "append", context="notes", payload=b"x")
    assert r["ok"] and r["entry"]["seq"] == 1 and wire.marked == ["notes"]
    assert not core.for_disk


def test_in_sync_mode_the_reply_waits_for_disk_and_goes_when_the_write_is_done():
    core, _ = make_core("sync")
    assert ask(core, "append", context="notes", payload=b"x") == []
    assert len(core.for_disk) == 1 and isinstance(core.for_disk[0].answer, WhenDurable)
    batch = core.next_write(100.0)
    assert batch is not None and batch.keys > 0 and core.writing
    assert core.next_write(100.0) is None  # one write at a time
    batch.commit()
    assert take(core) == []  # on disk, but the core has not been told yet
    core.written(batch.dirty, None, 100.01)
    assert core.settle(100.01)
    (r,) = take(core)
    assert r["ok"] and r["entry"]["seq"] == 1 and not core.for_disk and not core.writing


OTHER, THIRD = b"client-2", b"client-3"


def test_while_storage_is_behind_writes_are_held_in_order_and_reads_answered_at_once():
    core, _ = make_core(write_buffer=1000)
    (r,) = ask(core, "append", context="notes", payload=b"a" * 2000)  # the buffer is past its bound now
    assert r["ok"] and core.backlogged()
    core.behind = True  # what the server sets while it reads requests in this state (Server._held_turn)
    assert ask(core, "append", context="notes", payload=b"b") == []  # held: no reply yet
    assert ask(core, "get", context="notes") == []  # behind its own connection's held append
    assert ask(core, "append_batch", ident=OTHER, context="other", entries=[{"payload": b"c"}]) == []  # held too
    (r,) = ask(core, "get", ident=THIRD, context="notes")  # a connection with nothing held is read at once
    assert r["ok"] and [e["seq"] for e in r["entries"]] == [1]
    (r,) = ask(core, "status", ident=THIRD)
    assert r["held_requests"] == 3 and r["held_requests_total"] == 3
    core.behind = False
    assert core.release(100.0) == 0  # storage is still behind: nothing served
    write(core, 100.0)
    assert not core.backlogged() and core.release(100.1) == 3 and not core.held
    a, g = take(core)
    assert a["entry"]["seq"] == 2 and [e["seq"] for e in g["entries"]] == [1, 2]  # in order: the get saw it
    (b,) = take(core, OTHER)
    assert b["ok"] and b["last_seq"] == 1
    (r,) = ask(core, "status", ident=THIRD)
    assert r["held_requests"] == 0 and r["held_requests_total"] == 3


def test_a_held_connections_bad_requests_wait_behind_its_held_ones_and_replies_keep_their_order():
    core, _ = make_core(write_buffer=1000)
    ask(core, "append", context="notes", payload=b"a" * 2000)
    core.behind = True
    sent = [codec.encode_request("append", 3, {"context": "notes", "payload": b"x"}),
            codec.encode_request("append", 4, {"context": 123}),  # not valid: answered in its turn
            b"\xc1 not msgpack",
            codec.encode_request("get", 6, {"context": "notes"})]
    for body in sent:
        core.request([CLIENT, body], 100.0)
    core.request([CLIENT, b"", sent[0]], 100.0)  # (a frame count of its own: held too)
    assert take(core) == [] and len(core.held) == 5 and core.holds_for(CLIENT) and not core.holds_for(OTHER)
    core.behind = False
    write(core, 100.0)
    core.release(100.1)
    replies = take(core)
    assert [r["id"] for r in replies] == [3, 4, None, 6, 3]
    assert [r.get("error", {}).get("code") for r in replies] == [None, "BAD_REQUEST", "BAD_REQUEST", None, None]
    assert [e["seq"] for e in replies[3]["entries"]] == [1, 2] and replies[4]["entry"]["seq"] == 3  # (no dedup_id)


def test_release_stops_once_the_outbox_holds_a_bound_of_pages_and_goes_on_when_called_again():
    core, _ = make_core(write_buffer=1000)
    ask(core, "append", context="notes", payload=b"a" * 5000)
    core.behind = True
    ask(core, "append", context="notes", payload=b"b")  # held; the gets behind it too (its connection)
    for i in range(3):
        core.request([CLIENT, codec.encode_request("get", 10 + i, {"context": "notes"})], 100.0)
    core.behind = False
    write(core, 100.0)
    core.outbox_bytes = 0  # (the first append's reply, a page, was sent)
    served: list[int] = []

    def serve(frames, now, who):  # type: ignore[no-untyped-def]
        served.append(len(frames[-1]))  # (the server passes its timed, logged request here)
        return core.request(frames, now, who)

    assert core.release(100.1, serve, max_outbox=4096) == 2  # the append, then a page of 5 KB: stop
    assert core.outbox_bytes >= 4096 and len(core.held) == 2 and len(served) == 2
    core.outbox_bytes = 0  # (what sending the replies does)
    assert core.release(100.1, serve, max_outbox=4096) == 1 and core.release(100.1, serve, max_outbox=4096) == 1
    assert [r["id"] for r in take(core)] == [7, 10, 11, 12] and not core.held


def test_held_requests_stop_at_their_bounds_and_are_refused_unavailable_when_the_node_stops(monkeypatch):
    import node.core as core_mod

    monkeypatch.setattr(core_mod, "MAX_HELD", 3)
    core, _ = make_core(write_buffer=1000)
    ask(core, "append", context="notes", payload=b"a" * 2000)
    core.behind = True
    for i in range(3):
        assert not core.hold_full()
        core.request([CLIENT, codec.encode_request("append", 10 + i, {"context": "notes", "payload": b"x"})], 100.0)
    assert core.hold_full() and take(core) == []
    core.refuse_held()
    replies = take(core)
    assert [r["id"] for r in replies] == [10, 11, 12] and {r["error"]["code"] for r in replies} == {"UNAVAILABLE"}
    assert "not served" in replies[0]["error"]["message"] and not core.held and core.held_bytes == 0
    assert core.ledger.contexts["notes"].size == 1


def test_a_failed_write_answers_the_waiting_replies_storage_and_refuses_appends():
    core, _ = make_core("sync")
    ask(core, "append", context="notes", payload=b"x")
    write(core, 100.0, error="IO error: No space left on device")
    (r,) = take(core)
    assert r["error"]["code"] == "STORAGE" and r["error"]["seq"] == 1
    assert "No space left" in r["error"]["error"]
    (r,) = ask(core, "append", context="notes", payload=b"y")
    assert r["error"]["code"] == "STORAGE"
    (r,) = ask(core, "get", context="notes")
    assert r["ok"] and len(r["entries"]) == 1  # the unwritten entry is still served from RAM


def test_async_writes_are_grouped_until_half_the_flush_interval():
    core, _ = make_core()
    ask(core, "append", context="notes", payload=b"x", now=100.0)
    assert core.next_write(100.0) is None and 0 < core.next_deadline_ms(100.0) <= 6  # due at 100.005
    ask(core, "append", context="notes", payload=b"y", now=100.002)
    assert core.next_write(100.002) is None
    batch = core.next_write(100.006)
    assert batch is not None and set(batch.dirty.values()) == {2}  # both appends, one write


def peer_heartbeat(core: Core, node_id: str = "p", address: str = "127.0.0.1:9", now: float = 100.0) -> None:
    (r,) = ask(core, "heartbeat", now=now, ident=b"peer", node_id=node_id, address=address,
               pub="127.0.0.1:10", boot="b", lamport=0, entries=0, cluster="ledger")
    assert r["ok"], r


def test_replicas_n_waits_for_acks_from_known_members_then_answers_with_the_count():
    core, wire = make_core()
    peer_heartbeat(core)
    assert ask(core, "append", context="notes", payload=b"x", replicas=1) == []
    assert isinstance(core.for_replicas[0].answer, WhenReplicated) and core.waits_for_replicas(
        core.ledger.contexts["notes"])
    ask(core, "ack", ident=b"ghost", node_id="ghost", acks=[["notes", 1]])  # not a member: not counted
    assert take(core) == [] and core.for_replicas
    assert core.mesh.awaited() == {"notes"}  # (its acks are kept even if it leaves RAM meanwhile)
    ask(core, "ack", ident=b"peer", node_id="p", acks=[["notes", 1]], now=100.1)
    (r,) = take(core)
    assert r["ok"] and r["replicated"] == 1 and r["entry"]["seq"] == 1 and not core.for_replicas
    assert core.mesh.awaited() == set()


def test_replicas_n_answers_unavailable_at_its_deadline_and_the_entry_stays():
    core, _ = make_core(replica_timeout_ms=500)
    peer_heartbeat(core)
    ask(core, "append", context="notes", payload=b"x", replicas=1, now=100.0)
    core.tick(100.4)
    assert take(core) == []
    core.tick(100.6)
    (r,) = take(core)
    assert r["error"]["code"] == "UNAVAILABLE"
    assert {k: r["error"][k] for k in ("context", "seq", "replicated", "required")} == {
        "context": "notes", "seq": 1, "replicated": 0, "required": 1}
    assert core.ledger.contexts["notes"].size == 1


def writer_and_replica() -> tuple[Core, Wire, Core, Wire]:
    """A writer "me" and a replica "p" that know each other (their heartbeats exchanged)."""
    w, wwire = make_core(replica_timeout_ms=3000)
    f, fwire = make_core(node_id="p", address="127.0.0.1:9")
    peer_heartbeat(w, node_id="p", address="127.0.0.1:9")
    peer_heartbeat(f, node_id="me", address="127.0.0.1:1")
    return w, wwire, f, fwire


def sent(wire: Wire, op: str) -> list[dict[str, Any]]:
    out = [fields for _addr, o, fields in wire.sent if o == op]
    wire.sent.clear()
    return out


@pytest.mark.parametrize("batch", [False, True])
def test_a_retried_replicas_append_after_its_acks_were_forgotten_asks_the_replicas_again(batch):
    from protocol.entry import entry_from_wire

    w, wwire, f, fwire = writer_and_replica()
    op, fields = (("append_batch", {"entries": [{"payload": b"x"}]}) if batch
                  else ("append", {"payload": b"x"}))
    dedup = {"dedup_id": b"d" * 16, "replicas": 1}
    assert ask(w, op, context="notes", **fields, **dedup) == []
    ctx = w.ledger.contexts["notes"]
    blob = w.ledger.entry_blob(ctx, 1)
    f.ledger.apply_replicated("notes", [entry_from_wire(codec.msgpack.unpackb(blob))], ctx.frontier.root())
    ask(w, "ack", ident=b"peer", node_id="p", acks=[["notes", 1]], now=100.01)
    (r,) = take(w)
    assert r["ok"] and r["replicated"] == 1
    # the context leaves the writer's RAM and what "p" acknowledged of it is swept (Mesh._prune_acks);
    # the client, which never got that reply, sends the append again
    w.mesh.replica_sizes.clear()
    assert ask(w, op, now=101.0, context="notes", **fields, **dedup) == []
    assert w.mesh.stats.acks_asked == 1 and list(w.mesh.want_acks) == ["notes"]
    sent(wwire, "heartbeat")
    w.tick(101.6)  # the next heartbeat asks "p" for its acks again
    (hb,) = sent(wwire, "heartbeat")
    assert hb["want_acks"] == ["notes"]
    ask(f, "heartbeat", now=101.6, ident=b"w", **hb)
    f.tick(101.61)
    (ack,) = sent(fwire, "ack")  # at once, not lazily: a writer waits
    assert ack == {"node_id": "p", "acks": [["notes", 1]]}
    ask(w, "ack", ident=b"peer", now=101.62, **ack)
    (r,) = take(w)  # without the ask: UNAVAILABLE at 104.0, although "p" holds the entry
    assert r["ok"] and r["deduplicated"] and r["replicated"] == 1 and ctx.size == 1
    assert w.mesh.want_acks == {}  # answered: the next heartbeats ask nothing
    w.tick(102.2)
    assert "want_acks" not in sent(wwire, "heartbeat")[0]


def test_asked_acks_go_only_to_the_context_s_writer_for_what_is_held_and_the_ask_expires():
    w, wwire, f, fwire = writer_and_replica()
    ask(f, "append", context="mine", payload=b"y")  # written by "p" itself
    hb = {**w.mesh.heartbeat_fields(), "want_acks": ["mine", "nothere"]}
    ask(f, "heartbeat", now=100.1, ident=b"w", **hb)
    f.tick(100.2)
    assert sent(fwire, "ack") == [] and f.mesh.ack_due == {}
    w.mesh.ask_acks("gone", until=100.5)
    assert w.mesh.heartbeat_fields()["want_acks"] == ["gone"]
    w.mesh.now = 100.6
    assert "want_acks" not in w.mesh.heartbeat_fields() and w.mesh.want_acks == {}
    for i in range(100):  # bounded: the oldest asks go
        w.mesh.ask_acks(f"c{i}", until=200.0)
    assert len(w.mesh.want_acks) == codec.MAX_WANT_ACKS and "c99" in w.mesh.want_acks and "c0" not in w.mesh.want_acks


def test_an_ask_for_acks_lasts_while_an_append_of_its_context_waits():
    core, _ = make_core()
    peer_heartbeat(core)
    ask(core, "append", context="notes", payload=b"a", replicas=1)
    ask(core, "append", context="notes", payload=b"b", replicas=1)
    core.mesh.ask_acks("notes", until=200.0)
    ask(core, "ack", ident=b"peer", node_id="p", acks=[["notes", 1]], now=100.1)
    (r,) = take(core)
    assert r["entry"]["seq"] == 1 and list(core.mesh.want_acks) == ["notes"]  # seq 2 still waits
    ask(core, "ack", ident=b"peer", node_id="p", acks=[["notes", 2]], now=100.2)
    (r,) = take(core)
    assert r["entry"]["seq"] == 2 and core.mesh.want_acks == {}


@pytest.mark.parametrize("want, message", [
    ("notes", "want_acks must be an array"),
    (["x"] * 65, "at most 64"),
    ([7], "want_acks item must be a string"),
    ([""], "want_acks item must not be empty"),
    (["x" * 2000], "want_acks item must be 1.."),
])
def test_a_heartbeat_with_bad_want_acks_is_refused_and_changes_nothing(want, message):
    f, fwire = make_core(node_id="p", address="127.0.0.1:9")
    (r,) = ask(f, "heartbeat", ident=b"w", node_id="me", address="127.0.0.1:1", pub="127.0.0.1:2", boot="b",
               lamport=0, entries=0, cluster="ledger", want_acks=want)
    assert r["error"]["code"] == "BAD_REQUEST" and message in r["error"]["message"], r
    assert f.mesh.peers == {} and f.mesh.ack_due == {}


def test_replicas_more_than_alive_is_refused_before_anything_is_appended():
    core, _ = make_core()
    (r,) = ask(core, "append", context="notes", payload=b"x", replicas=1)
    assert r["error"]["code"] == "UNAVAILABLE" and "notes" not in core.ledger.contexts


@pytest.mark.parametrize("frames, code", [
    ([CLIENT, b"a", b"b", codec.encode_request("ping", 1, {})], "BAD_REQUEST"),  # two envelope frames
    ([CLIENT, b"x", codec.encode_request("ping", 1, {})], "BAD_REQUEST"),  # a delimiter that is not empty
    ([CLIENT, b"\xc1junk"], "BAD_REQUEST"),  # not msgpack
    ([CLIENT, codec.encode_request("nope", 1, {})], "UNKNOWN_OP"),
])
def test_malformed_requests_get_one_error_reply_each(frames, code):
    core, _ = make_core()
    junk = core.request(frames, 100.0)
    (r,) = take(core)
    assert r["error"]["code"] == code
    assert junk == (frames[-1] == b"\xc1junk")  # only undecodable bytes count for the junk gate


def test_a_request_with_the_empty_delimiter_is_answered_under_it():
    core, _ = make_core()
    core.request([CLIENT, b"", codec.encode_request("ping", 1, {})], 100.0)
    (frames,) = core.outbox
    assert frames[:2] == [CLIENT, b""] and codec.decode_reply(frames[-1])["node_id"] == "me"


def test_a_bug_in_a_handler_is_an_internal_error_reply_and_the_core_keeps_serving(monkeypatch):
    core, _ = make_core()

    def broken(rq: Request, req: Any) -> Reply:
        raise ZeroDivisionError("boom")

    monkeypatch.setitem(core.handlers, "ping", broken)
    (r,) = ask(core, "ping")
    assert r["error"]["code"] == "INTERNAL" and "boom" in r["error"]["message"]
    (r,) = ask(core, "append", context="notes", payload=b"x")
    assert r["ok"]


def test_status_takes_its_time_from_the_request_and_adds_the_io_layers_counters():
    core, _ = make_core()
    core.io_status = lambda now: {"router": "tcp://x", "seen_now": now}
    (r,) = ask(core, "status", now=112.5)
    assert r["uptime_s"] == 12.5 and r["seen_now"] == 112.5 and r["router"] == "tcp://x"
    assert "replication" in r and r["durability"] == "async"


def test_the_core_module_imports_no_socket_clock_disk_or_thread_module():
    tree = ast.parse(pathlib.Path(__file__).parents[2].joinpath("node", "core.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"zmq", "time", "os", "socket", "plyvel", "threading", "asyncio", "select"}, imported


# -- pulls under signed heads (issue #14; SPEC 17.2, 13.6) -----------------------------------------


def pull_reply(core: Core, size: int, after: int = 0) -> dict[str, Any]:
    """`core`'s answer to a peer's pull of `notes` entries after..size (a snapshot page)."""
    core.request([b"peer", codec.encode_request("snapshot", 9, {"context": "notes", "size": size, "after": after,
                                                                "limit": 100})], 100.0)
    (r,) = take(core, b"peer")
    assert r["ok"], r
    return r


def test_with_keys_a_pull_chunk_is_applied_only_under_a_head_its_writer_signed():
    from node.mesh import Mesh

    writer = Identity.generate()
    wcore, _ = make_core(identity=writer)  # the writer, node id "me"
    for i in range(10):
        ask(wcore, "append", context="notes", payload=bytes([i]))
    puller = Mesh(Ledger(MemoryKV(), node_id="p", sync_meta=False), Wire(), address="127.0.0.1:9",
                  pub="127.0.0.1:10", seeds=[], heartbeat_s=0.5, writer_key={"me": writer.public}.get)
    peer = puller._peer("127.0.0.1:1", "me")
    assert peer is not None

    r = pull_reply(wcore, 5)  # from the writer: its head at exactly (5, root), signed now
    assert r["signed"]["size"] == 5 and "signed_proof" not in r
    puller._on_chunk(peer, {k: v for k, v in r.items() if k != "signed"}, {"context": "notes", "size": 5})
    assert "notes" not in puller.ledger.contexts and puller.stats.unsigned_pulls == 1  # no signature: refused
    forged = sign_head(Identity.generate(), "notes", 5, r["root"]).to_map()
    puller._on_chunk(peer, {**r, "signed": forged}, {"context": "notes", "size": 5})
    assert "notes" not in puller.ledger.contexts and puller.stats.unsigned_pulls == 2  # another key: refused
    puller._on_chunk(peer, r, {"context": "notes", "size": 5})
    ctx = puller.ledger.contexts["notes"]
    assert ctx.size == 5 and ctx.signed is not None and ctx.signed.size == 5

    # a replica that holds all 10 and the writer's head signed at 10 serves 6..8 with that head and
    # the consistency proof that its root at 8 is a prefix of the signed one
    rcore, _ = make_core(node_id="r")
    page = pull_reply(wcore, 10)
    from protocol.entry import entry_from_wire
    rcore.ledger.apply_replicated("notes", [entry_from_wire(e) for e in page["entries"]], page["root"])
    rcore.ledger.contexts["notes"].signed = sign_head(writer, "notes", 10, page["root"])
    r2 = pull_reply(rcore, 8, after=5)
    assert r2["signed"]["size"] == 10 and r2["signed_proof"]
    bad = {**r2, "signed_proof": [b"\x00" * 32] * len(r2["signed_proof"])}
    puller._on_chunk(peer, bad, {"context": "notes", "size": 8})
    assert ctx.size == 5 and puller.stats.unsigned_pulls == 3  # a proof that does not hold: refused
    puller._on_chunk(peer, r2, {"context": "notes", "size": 8})
    assert ctx.size == 8 and ctx.signed.size == 5  # applied; the head it keeps is one at a size it holds
    assert puller.stats.refused_messages == 3  # each refusal counted (and logged) as a peer message refused


def test_without_keys_pulls_need_no_signature():
    from node.mesh import Mesh

    wcore, _ = make_core(identity=Identity.generate())
    for i in range(3):
        ask(wcore, "append", context="notes", payload=bytes([i]))
    puller = Mesh(Ledger(MemoryKV(), node_id="p", sync_meta=False), Wire(), address="127.0.0.1:9",
                  pub="127.0.0.1:10", seeds=[], heartbeat_s=0.5)
    peer = puller._peer("127.0.0.1:1", "me")
    r = pull_reply(wcore, 3)
    puller._on_chunk(peer, {k: v for k, v in r.items() if k != "signed"}, {"context": "notes", "size": 3})
    assert puller.ledger.contexts["notes"].size == 3 and puller.stats.unsigned_pulls == 0


def test_sync_digest_answers_the_fine_digests_of_the_buckets_asked():
    from protocol import digest

    core, _ = make_core()
    ask(core, "append", context="notes", payload=b"x")
    (r,) = ask(core, "sync_digest", buckets=[46, 0])
    assert r["ok"] and [len(d) for d in r["digests"]] == [8 * digest.SUB] * 2
    values = digest.decode(r["digests"][0], digest.SUB) or []
    k = digest.fine_buckets(46).index(digest.bucket_of(b"notes", digest.FINE))
    assert values[k] == core.ledger.digest()[46] != 0 and values[:k] + values[k + 1:] == [0] * (digest.SUB - 1)
    (r,) = ask(core, "sync_digest", buckets=[46, 46])
    assert r["error"]["code"] == "BAD_REQUEST"


def test_every_request_only_nodes_send_is_allowed_to_peer_keys():
    from node.access import ROLE_OPS
    from node.core import PEER_OPS

    # a mesh op missing here would be FORBIDDEN between nodes with keys (and silently fall back)
    assert PEER_OPS <= ROLE_OPS["peer"] and "sync_digest" in PEER_OPS
    assert not PEER_OPS & (ROLE_OPS["admin"] - ROLE_OPS["peer"])


def test_snapshots_answers_several_contexts_with_an_error_item_for_one_it_cannot_serve(monkeypatch):
    import node.core as core_mod

    core, _ = make_core(identity=Identity.generate())
    for name in ("a", "b"):
        ask(core, "append_batch", context=name, entries=[{"payload": bytes([i]) * 100} for i in range(5)])
    (r,) = ask(core, "snapshots", chunks=[["a", 0, 5], ["nosuch", 0, 1], ["b", 2, 4]], signed=False)
    a, missing, b = r["chunks"]
    assert [e["seq"] for e in a["entries"]] == [1, 2, 3, 4, 5] and a["root"] == core.ledger.head("a")["root"]
    assert missing == {"context": "nosuch", "error": {"code": "NOT_FOUND", "message": "context 'nosuch' does not exist"}}
    assert [e["seq"] for e in b["entries"]] == [3, 4] and b["size"] == 4 and b["more"] is False
    assert "signed" not in a  # signed: false, the puller checks none (a node without keys)
    (r,) = ask(core, "snapshots", chunks=[["a", 0, 5]])
    assert r["chunks"][0]["signed"]["size"] == 5  # asked for (the default): the writer signs the page's head
    # the reply's entries stop at a reply's bytes: the first chunk fills it, the second is left out
    monkeypatch.setattr(core_mod, "MAX_REPLY_BYTES", 300)
    (r,) = ask(core, "snapshots", chunks=[["a", 0, 5], ["b", 0, 5]], signed=False)
    assert len(r["chunks"]) == 1 and 1 <= len(r["chunks"][0]["entries"]) < 5 and r["chunks"][0]["more"]


def test_snapshot_and_snapshots_send_entries_packed_when_asked_the_stored_bytes_each_in_a_bin():
    core, _ = make_core()
    ask(core, "append_batch", context="a", entries=[{"payload": bytes([i]) * 300, "key": f"k{i}"} for i in range(3)])
    ctx = core.ledger.contexts["a"]
    stored = [core.ledger.entry_blob(ctx, s) for s in (1, 2, 3)]
    (maps,) = ask(core, "snapshot", context="a", limit=3)
    (one,) = ask(core, "snapshot", context="a", limit=3, packed=True)
    assert one["entries"] == stored and [msgpack.unpackb(b, raw=False) for b in one["entries"]] == maps["entries"]
    assert {k: v for k, v in one.items() if k != "entries"} == {k: v for k, v in maps.items() if k != "entries"}
    (r,) = ask(core, "snapshots", chunks=[["a", 1, 3]], signed=False, packed=True)
    assert r["chunks"][0]["entries"] == stored[1:]
    (bad,) = ask(core, "snapshot", context="a", packed="yes")
    assert bad["error"]["code"] == "BAD_REQUEST" and "packed must be a boolean" in bad["error"]["message"]


def test_snapshots_is_for_nodes_only():
    from node.access import ROLE_OPS

    assert "snapshots" in ROLE_OPS["peer"] and all("snapshots" not in ROLE_OPS[r] for r in ("read", "write", "admin"))


def test_pages_served_to_a_peer_signed_or_not_do_not_let_their_contexts_into_the_cache():
    core, _ = make_core()
    led = core.ledger
    led.contexts.capacity = 1
    for n in ("a", "b", "c"):
        ask(core, "append_batch", context=n, entries=[{"key": "k", "payload": b"x"}] * 3)
    write(core, 101.0)
    for c in led.contexts.loaded():
        c.published_seq = c.size
    led.hot_limit = 0
    led.evict()
    led.digest()
    led.contexts.shrink()
    assert led.contexts.keys() == ["c"]
    loads = led.contexts.loads
    assert ask(core, "snapshot", context="a", after=0, limit=10)[0]["size"] == 3
    r = ask(core, "snapshots", chunks=[["b", 0, 3]], signed=True)[0]
    assert len(r["chunks"]) == 1 and r["chunks"][0]["size"] == 3
    assert led.contexts.keys() == ["c"] and led.contexts.loads == loads
