"""Peer input that is hostile or broken (issue #12, SPEC 17.6), at the codec and the mesh core:
addresses checked before use, the peer table capped, acks only from members, one peer's fault
isolated to it. No sockets: the mesh runs on a recording transport with a hand-set clock."""

from __future__ import annotations

import logging
from typing import Any

import msgpack
import pytest

from node.ledger import Ledger
from node.mesh import ALIVE, DEFAULT_MAX_PEERS, Mesh
from node.storage import MemoryKV
from protocol import codec, merkle, watch
from protocol.entry import decode_entry
from protocol.errors import RemoteProtocolError

pytestmark = pytest.mark.timeout(60)


def hb_frame(node_id: str = "p", address: str = "10.0.0.2:7400", peers: list[Any] | None = None,
             **extra: Any) -> bytes:
    fields: dict[str, Any] = {"node_id": node_id, "address": address, "pub": "10.0.0.2:7401", "boot": "b",
                              "lamport": 1, "entries": 0, "peers": peers or [], "cluster": "ledger", **extra}
    return codec.encode_request("heartbeat", 1, fields)


def decode_hb(frame: bytes) -> codec.Heartbeat:
    req = codec.decode_request(frame, 1 << 20).request
    assert isinstance(req, codec.Heartbeat)
    return req


# -- codec -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["garbage", "", "host:", ":1", "host:0", "host:65536", "tcp://h:1", " h:1",
                                 "h:\u0661", "x" * 300 + ":1", "[::1]"])
@pytest.mark.parametrize("field", ["address", "pub"])
def test_a_heartbeat_with_a_bad_address_or_pub_is_a_bad_request(field, bad):
    with pytest.raises(RemoteProtocolError) as info:
        codec.decode_request(hb_frame(**{field: bad}), 1 << 20)
    assert info.value.code == "BAD_REQUEST" and field in info.value.message


def test_heartbeat_addresses_are_normalized():
    h = decode_hb(hb_frame(address="Node-2.Example:07400", pub="[0::1]:7401"))
    assert (h.address, h.pub) == ("node-2.example:7400", "[::1]:7401")


def test_bad_gossiped_peers_are_skipped_and_counted_not_a_reason_to_refuse():
    h = decode_hb(hb_frame(peers=[["a", "garbage"], ["b", "10.0.0.3:1"], ["c", "10.0.0.4:0"], ["d", "D.x:2"]]))
    assert h.peers == (("b", "10.0.0.3:1"), ("d", "d.x:2"))
    assert h.bad_peers == 2 and "'garbage'" in h.bad_peer_error
    with pytest.raises(RemoteProtocolError):  # a malformed pair is still a bad request
        codec.decode_request(hb_frame(peers=[["a"]]), 1 << 20)


# -- the mesh core ---------------------------------------------------------------------------


class Recording:
    """Takes every request (or raises for the addresses in `fail`), records what happens."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.fail: set[str] = set()
        self.down: set[str] = set()  # sends to these return None (not connected)
        self.subscribed: set[str] = set()
        self.forgotten: list[str] = []

    def request(self, address: str, op: str, fields: dict[str, Any]) -> int | None:
        if address in self.fail:
            raise OSError(24, "Too many open files")
        if address in self.down:
            return None
        self.sent.append((address, op))
        return len(self.sent)

    def subscribe(self, pub_address: str) -> None:
        self.subscribed.add(pub_address)

    def unsubscribe(self, pub_address: str) -> None:
        self.subscribed.discard(pub_address)

    def forget(self, address: str) -> None:
        self.forgotten.append(address)


def mesh(t: Recording, **kw: Any) -> Mesh:
    return Mesh(Ledger(MemoryKV(), node_id="me", sync_meta=False), t, address="10.0.0.1:7400",
                pub="10.0.0.1:7401", heartbeat_s=0.5, **{"seeds": [], **kw})


def gossip(n: int, start: int = 0) -> list[list[str]]:
    return [[f"g{i}", f"192.0.2.{1 + i // 1000}:{10_000 + i % 1000}"] for i in range(start, start + n)]


def test_the_peer_table_is_capped_and_refusals_are_counted_and_logged_once(caplog):
    t = Recording()
    m = mesh(t, max_peers=5)
    with caplog.at_level(logging.WARNING, logger="node.mesh"):
        m.rpc_heartbeat(decode_hb(hb_frame(peers=gossip(1000))), 1.0)
        m.rpc_heartbeat(decode_hb(hb_frame(peers=gossip(100, 1000))), 1.1)
        m.rpc_heartbeat(decode_hb(hb_frame("q", "10.0.0.9:7400")), 1.2)  # a new sender: refused too
    assert len(m.peers) == 5 and "10.0.0.2:7400" in m.peers
    assert m.stats.refused_peers == 1100 - 4 + 1
    assert sum("keeps at most 5 peers" in r.message for r in caplog.records) == 1
    m.tick(2.0)
    assert len({a for a, op in t.sent if op == "heartbeat"}) == 5  # sockets only for those kept
    st = m.status(2.0)
    assert st["max_peers"] == 5 and st["replication"]["refused_peers"] == m.stats.refused_peers
    assert DEFAULT_MAX_PEERS == 64


def test_a_moving_or_replaced_peer_is_not_refused_at_the_cap():
    m = mesh(Recording(), max_peers=1)
    m.rpc_heartbeat(decode_hb(hb_frame("p", "10.0.0.2:7400")), 1.0)
    m.rpc_heartbeat(decode_hb(hb_frame("p", "10.0.0.3:7400")), 1.1)  # the same node, moved
    assert list(m.peers) == ["10.0.0.3:7400"] and m.peers["10.0.0.3:7400"].node_id == "p"
    m.rpc_heartbeat(decode_hb(hb_frame("p2", "10.0.0.3:7400")), 1.2)  # another node at that address
    assert m.peers["10.0.0.3:7400"].node_id == "p2" and m.stats.refused_peers == 0


def test_gossiped_peers_that_never_answer_are_forgotten_and_free_their_slots():
    t = Recording()
    m = mesh(t, max_peers=4, dead_after=10)
    m.rpc_heartbeat(decode_hb(hb_frame(peers=gossip(10))), 0.0)
    assert len(m.peers) == 4
    now = 0.0
    while now < 2 * 10 * 0.5 + 1:  # two dead-after spans
        now += 0.5
        m.rpc_heartbeat(decode_hb(hb_frame()), now)  # the gossiper itself stays alive
        m.tick(now)
    assert list(m.peers) == ["10.0.0.2:7400"]
    assert len(t.forgotten) == 3  # their sockets are released
    m.rpc_heartbeat(decode_hb(hb_frame("n", "10.0.0.5:7400")), now)
    assert "10.0.0.5:7400" in m.peers  # a slot for a real newcomer


def test_a_peer_whose_heartbeats_cannot_be_sent_is_connected_anew():
    t = Recording()
    m = mesh(t, seeds=["10.0.0.2:7400"], dead_after=4)
    t.down.add("10.0.0.2:7400")
    for i in range(8):
        m.tick(i * 0.5)
    assert t.forgotten == ["10.0.0.2:7400"] * 2  # every dead-after span, never more often


def test_a_bad_pub_in_a_heartbeat_reply_is_skipped_and_counted():
    t = Recording()
    m = mesh(t, seeds=["10.0.0.2:7400"])
    m.on_reply("10.0.0.2:7400", {"ok": True, "node_id": "p", "pub": "garbage", "boot": "b"}, 1.0)
    m.on_reply("10.0.0.2:7400", {"ok": True, "node_id": "p", "pub": "tcp://10.0.0.2:7401", "boot": "b"}, 1.1)
    assert t.subscribed == set() and m.stats.bad_peer_addresses == 2
    assert m.peers["10.0.0.2:7400"].state == ALIVE
    m.on_reply("10.0.0.2:7400", {"ok": True, "node_id": "p", "pub": "10.0.0.2:7401", "boot": "b"}, 1.2)
    assert t.subscribed == {"10.0.0.2:7401"}


def test_a_peer_that_fails_is_logged_counted_and_the_others_still_get_their_heartbeats(caplog):
    t = Recording()
    m = mesh(t, seeds=["10.0.0.2:7400", "10.0.0.3:7400"])
    t.fail.add("10.0.0.2:7400")
    with caplog.at_level(logging.WARNING, logger="node.mesh"):
        for i in range(8):
            m.tick(i * 0.5)
    assert [a for a, _op in t.sent] == ["10.0.0.3:7400"] * 8
    assert m.stats.peer_errors == 8 and m.status(4.0)["replication"]["peer_errors"] == 8
    logged = [r.message for r in caplog.records if "10.0.0.2:7400" in r.message]
    assert len(logged) == 4 and "Too many open files" in logged[0]  # the 1st, 2nd, 4th and 8th


def test_acks_count_only_from_known_members_and_go_when_they_are_forgotten():
    t = Recording()
    m = mesh(t)
    ctx = m.ledger.append(codec.Append("c", "", b"x", {})).ctx
    for i in range(1000):
        m.rpc_ack(codec.Ack(f"ghost{i}", (("c", 1),)), 1.0)
    assert m.replica_sizes.get("c", {}) == {} and m.replicated(ctx, 1) == 0
    assert m.stats.ignored_acks == 1000 and m.status(1.0)["replication"]["replica_acks"] == 0
    m.rpc_heartbeat(decode_hb(hb_frame("p", "10.0.0.2:7400")), 1.0)
    m.rpc_ack(codec.Ack("p", (("c", 1),)), 1.1)
    assert m.replicated(ctx, 1) == 1 and m.status(1.1)["replication"]["replica_acks"] == 1
    m._forget(m.peers["10.0.0.2:7400"])
    assert m.replicated(ctx, 1) == 0 and m.replica_sizes["c"] == {}
    m.rpc_ack(codec.Ack("p", (("c", 1),)), 1.2)  # forgotten: not a member any more
    assert m.replicated(ctx, 1) == 0 and m.stats.ignored_acks == 1001


def small_cache_mesh(tmp_path, n: int) -> tuple[Mesh, Any]:
    """A writer (node "n1") of contexts c0..c{n-1}, 3 entries each, with a cache of 2 contexts:
    all but two are out of RAM; peer "p" is a member. Returns the mesh and its CountingKV."""
    from tests.unit.test_context_cache import CountingKV, fill, make, settle

    kv = CountingKV()
    led = make(kv, tmp_path, cache=2)
    for i in range(n):
        fill(led, f"c{i}", 3)
    settle(led)
    m = Mesh(led, Recording(), address="10.0.0.1:7400", pub="10.0.0.1:7401", heartbeat_s=0.5, seeds=[])
    m.rpc_heartbeat(decode_hb(hb_frame("p", "10.0.0.2:7400")), 1.0)
    return m, kv


def test_acks_of_contexts_out_of_ram_are_not_read_nor_kept_unless_an_append_waits_for_them(tmp_path):
    m, kv = small_cache_mesh(tmp_path, 6)
    led = m.ledger
    in_ram = {f"c{i}" for i in range(6) if led.contexts.cached(f"c{i}") is not None}
    assert len(in_ram) == 2
    reads = kv.ctx_reads
    m.rpc_ack(codec.Ack("p", tuple((f"c{i}", 3) for i in range(6))), 1.1)
    # a follower catching up acks every context: one disk read each cost the writer >10% of its time
    assert kv.ctx_reads == reads and led.contexts.loads == 0
    assert set(m.replica_sizes) == in_ram and all(v == {"p": 3} for v in m.replica_sizes.values())
    out = sorted({f"c{i}" for i in range(6)} - in_ram)[0]
    m.awaited = lambda: {out}  # an append of it waits for replicas (it left RAM since)
    m.rpc_ack(codec.Ack("p", ((out, 3),)), 1.2)
    assert m.replica_sizes[out] == {"p": 3} and m.replicated(led.contexts[out], 3) == 1


def test_acks_of_contexts_that_left_ram_are_swept_past_the_slack_unless_awaited(tmp_path, monkeypatch):
    from node import mesh as mesh_mod
    from tests.unit.test_context_cache import fill, settle

    monkeypatch.setattr(mesh_mod, "PRUNE_ACKS_SLACK", 1)
    m, _kv = small_cache_mesh(tmp_path, 2)
    led = m.ledger
    acked: list[str] = []
    for i in range(2, 8):  # each acked while in RAM, then pushed out by the next ones
        fill(led, f"c{i}", 3)
        m.rpc_ack(codec.Ack("p", ((f"c{i}", 3),)), 1.1)
        acked.append(f"c{i}")
        settle(led)
    assert set(m.replica_sizes) == set(acked)  # kept while below the slack
    m.awaited = lambda: {"c2"}
    m.tick(2.0)  # a heartbeat: 6 kept of which 2 in RAM, > 2 * 2 + 1
    in_ram = {n for n in acked if led.contexts.cached(n) is not None}
    assert len(in_ram) == 2 and set(m.replica_sizes) == in_ram | {"c2"}
    assert m.status(2.0)["replication"]["replica_acks"] == 3


def test_heartbeats_of_other_clusters_from_many_addresses_do_not_grow_the_node():
    from node.mesh import MAX_REFUSED_LOGGED
    from protocol.errors import Conflict

    m = mesh(Recording())
    for i in range(MAX_REFUSED_LOGGED + 500):
        with pytest.raises(Conflict):
            m.rpc_heartbeat(decode_hb(hb_frame("o", f"192.0.2.9:{1 + i}", cluster="other")), 1.0)
    assert len(m._refused) == MAX_REFUSED_LOGGED and not m.peers


# -- the seeded simulation -------------------------------------------------------------------


def test_in_the_simulation_bad_addresses_and_a_gossip_flood_do_not_stop_replication():
    from tests.unit import test_mesh_sim as sim

    seed = 4242
    print("seed", seed)
    net = sim.perfect_pair("a", "b", seed)
    clock = sim.Stepper(net)
    a, b = sim.nodes["a"], sim.nodes["b"]
    clock.run_seconds(2)
    # a hostile sender: a garbage address (refused by the codec), then a flood of gossip
    net.send(clock.now, "req", "evil", "a", hb_frame("evil", "garbage"))
    flood = gossip(999)  # + 1 bad one: the most one heartbeat may carry
    net.send(clock.now, "req", "evil", "a", hb_frame("evil", "evil:1", flood + [["x", "garbage"]], pub="evil:2"))
    net.send(clock.now, "req", "evil", "a", codec.encode_request(
        "ack", 9, {"node_id": "ghost", "acks": [["notes", 5]]}))
    for i in range(20):
        a.ledger.append(codec.Append("notes", "", bytes([i]), {}))
    clock.run_seconds(2)
    assert len(a.mesh.peers) == DEFAULT_MAX_PEERS and a.mesh.stats.refused_peers > 0
    assert a.mesh.stats.bad_peer_addresses == 1 and a.mesh.stats.ignored_acks == 1
    assert b.ledger.contexts["notes"].size == 20  # replication went on
    clock.run_seconds(2 * 8 * sim.HEARTBEAT + 2)  # the made-up peers never answer: forgotten
    # (the sender itself spoke: it is dead now, and forgotten only after the usual while)
    assert set(a.mesh.peers) == {sim.addr("b"), "evil:1"} and a.mesh.peers[sim.addr("b")].state == ALIVE
    assert set(a.mesh.replica_sizes.get("notes", {})) <= {"b"}


# -- configuration ---------------------------------------------------------------------------


def test_max_peers_flag_and_environment():
    from node.config import ConfigError, parse

    assert parse([], {}).max_peers == DEFAULT_MAX_PEERS
    assert parse([], {"LEDGER_MAX_PEERS": "9"}).max_peers == 9
    assert parse(["--max-peers", "3"], {"LEDGER_MAX_PEERS": "9"}).max_peers == 3
    for bad in ("0", "513", "-1", "x", "\u0661", ""):
        with pytest.raises(ConfigError, match="--max-peers must be an integer from 1 to 512"):
            parse(["--max-peers", bad], {})
    with pytest.raises(ConfigError, match="more than --max-peers"):
        parse(["--max-peers", "1", "--peers", "10.0.0.1:1,10.0.0.2:1"], {})


@pytest.mark.parametrize("bad", ["garbage", "host:", ":1", "h:0", "h:65536", "tcp://h:1", "::1:5", "h:\u00b2",
                                 "x" * 300 + ":1"])
def test_peers_and_advertise_must_be_host_port(bad):
    from node.config import ConfigError, parse

    with pytest.raises(ConfigError, match="--peers: .* is not HOST:PORT"):
        parse(["--peers", f"10.0.0.1:1,{bad}"], {})
    with pytest.raises(ConfigError, match="--advertise .* is not HOST:PORT"):
        parse(["--advertise", bad], {})


def test_peers_are_normalized_and_deduplicated():
    from node.config import ConfigError, parse

    c = parse(["--peers", " Node.A:7400, [0::1]:7400 ,node.a:7400", "--advertise", "Me.Example:7400",
               "--insecure"], {})
    assert c.peers == ("node.a:7400", "[::1]:7400") and c.advertise == "me.example:7400"
    with pytest.raises(ConfigError, match="reach"):
        parse(["--advertise", "0.0.0.0:7400"], {})


# -- typed peer replies (protocol/codec.py) ---------------------------------------------------

ROOT = b"r" * 32


def test_a_heads_page_keeps_its_well_formed_items_and_counts_the_rest():
    page = codec.parse_heads_reply({"heads": [["a", 3, ROOT, "w", 9], ["b", -1, ROOT, "w", 1], ["c", 1, b"short", "w", 1],
                                              ["d", 1 << 64, ROOT, "w", 1], "junk", ["e", 2, ROOT, 7, 1],
                                              ["f", True, ROOT, "w", 1]], "more": 1})
    assert page.heads == (codec.HeadItem("a", 3, ROOT, "w"),) and page.malformed == 6
    assert page.more is False  # only `true` is true
    with pytest.raises(RemoteProtocolError):
        codec.parse_heads_reply({"heads": {"a": 1}})



def test_a_heads_item_naming_a_context_or_writer_no_context_can_have_is_skipped():
    # a peer's heads name what this node then pulls (and creates): 1..256 bytes of UTF-8, a writer 1..64
    page = codec.parse_heads_reply({"heads": [["", 1, ROOT, "w", 1], ["c" * 257, 1, ROOT, "w", 1],
                                              ["\udc80", 1, ROOT, "w", 1], ["é" * 128, 1, ROOT, "w", 1],
                                              ["ok", 1, ROOT, "", 1], ["ok", 1, ROOT, "w" * 65, 1],
                                              ["é" * 129, 1, ROOT, "w", 1]]})
    assert page.heads == (codec.HeadItem("é" * 128, 1, ROOT, "w"),) and page.malformed == 6


def test_asked_acks_look_contexts_up_without_letting_them_into_the_cache(tmp_path):
    m, _kv = small_cache_mesh(tmp_path, 6)
    led = m.ledger
    m.ledger.node_id = "f"  # (a replica of the contexts "n1" writes)
    out = [f"c{i}" for i in range(6) if led.contexts.cached(f"c{i}") is None]
    assert len(out) == 4
    loads = led.contexts.loads
    m._ack_again("n1", out)
    assert {n for n in out if led.contexts.cached(n) is not None} == set()
    assert set(m.ack_due) == set(out) and m.ack_now and led.contexts.loads == loads


@pytest.mark.parametrize("bad", [{"size": -1}, {"size": "3"}, {"root": b"x" * 31}, {"writer": None}, {"size": 1 << 64}])
def test_a_head_reply_without_a_well_formed_size_root_and_writer_is_refused(bad):
    good = {"ok": True, "size": 3, "root": ROOT, "writer": "w"}
    assert codec.parse_head_reply(good) == codec.HeadInfo(3, ROOT, "w", False)
    assert codec.parse_head_reply({**good, "damaged": {"size": 1}}).damaged
    with pytest.raises(RemoteProtocolError):
        codec.parse_head_reply({**good, **bad})


@pytest.mark.parametrize("bad", [{"root": b"x" * 31}, {"root": "r" * 32}, {"entries": None}, {"entries": [{"seq": 1}]}])
def test_a_snapshot_reply_that_is_not_a_chunk_is_refused(bad):
    with pytest.raises(RemoteProtocolError):
        codec.parse_chunk_reply({"ok": True, "entries": [], "root": ROOT, **bad})


@pytest.mark.parametrize("grouped", [False, True], ids=["snapshot", "snapshots"])
def test_a_chunk_with_a_malformed_root_is_not_taken_for_a_fork(grouped):
    """Before the typed replies, a pulled chunk's root of the wrong length reached the root
    comparison and set the local history aside as a fork. The same inside a `snapshots` reply."""
    w = Ledger(MemoryKV(), node_id="w", sync_meta=False)
    for i in range(3):
        w.append(codec.Append("c", "", bytes([i]), {}))
    t = Recording()
    m = mesh(t, seeds=["10.0.0.2:7400"])
    m.on_reply("10.0.0.2:7400", {"ok": True, "node_id": "w", "pub": "10.0.0.2:7401", "boot": "b"}, 1.0)
    m.ledger.apply_replicated("c", [e for e in map(decode_entry, w.snapshot_page(
        codec.Snapshot(context="c", after=0, limit=1, size=None))[1])])
    p = m.peers["10.0.0.2:7400"]
    p.pulls.append(("c", 3, w.head("c")["root"]))
    p.no_group = not grouped
    m._next_pull(p)
    rid, (_a, op, fields, _t) = next(iter(m.pending.items()))
    page = w.snapshot_page(codec.Snapshot(context="c", after=1, limit=2, size=3))[1]
    chunk = {"context": "c", "root": w.head("c")["root"][:31], "entries": [decode_entry(b).to_wire() for b in page]}
    if grouped:
        assert op == "snapshots" and fields["chunks"] == [["c", 1, 3]] and fields["signed"] is False
        m.on_reply("10.0.0.2:7400", {"ok": True, "id": rid, "node_id": "w", "chunks": [chunk]}, 1.1)
    else:
        assert op == "snapshot" and fields["after"] == 1
        m.on_reply("10.0.0.2:7400", {"ok": True, "id": rid, "node_id": "w", **chunk}, 1.1)
    assert m.forks == {} and "c" not in m.ledger.aside and m.ledger.contexts["c"].size == 1


@pytest.mark.parametrize("grouped", [False, True], ids=["snapshot", "snapshots"])
@pytest.mark.parametrize("answer", ["packed", "maps", "junk", "a longer encoding", "mixed, a map first",
                                    "mixed, a bin first"])
def test_a_pull_asks_for_packed_entries_and_takes_them_or_maps_and_refuses_junk(grouped, answer, caplog):
    """SPEC 17.2: a node with the C path asks for entries packed (each a bin of its stored bytes)
    and stores them as they came; a peer that does not know the field answers maps, taken as
    before; a packed entry that is not msgpack stops that peer's pulls for now, nothing stored; one
    in a longer encoding than the shortest is stored as its canonical bytes."""
    from node import ledger as ledger_mod

    w = Ledger(MemoryKV(), node_id="w", sync_meta=False)
    for i in range(4):
        w.append(codec.Append("c", f"k{i}", bytes([i]) * 300, {}))
    t = Recording()
    m = mesh(t, seeds=["10.0.0.2:7400"])
    m.on_reply("10.0.0.2:7400", {"ok": True, "node_id": "w", "pub": "10.0.0.2:7401", "boot": "b"}, 1.0)
    p = m.peers["10.0.0.2:7400"]
    root = w.head("c")["root"]
    p.pulls.append(("c", 4, root))
    p.no_group = not grouped
    m._next_pull(p)
    rid, (_a, op, fields, _t) = next(iter(m.pending.items()))
    assert fields["packed"] is ledger_mod.ACCELERATED
    page, blobs = w.snapshot_page(codec.Snapshot(context="c", after=0, limit=4, size=4))
    entries: Any = codec.packed_array(blobs) if answer != "maps" else blobs
    if answer == "junk":
        entries = codec.packed_array([*blobs[:2], b"\xc1", blobs[3]])
    elif answer.startswith("mixed"):  # (SPEC 17.2: item by item; no node of ours mixes them)
        items = [msgpack.packb(msgpack.unpackb(b, raw=False), use_bin_type=True) if (i % 2 == 0) == answer.endswith(
            "map first") else codec.packed_array([b])[1:] for i, b in enumerate(blobs)]
        entries = codec.array_header(len(items)) + b"".join(items)
    elif answer == "a longer encoding":
        entries = codec.packed_array([*blobs[:2], blobs[2].replace(b"\xa3seq\x03", b"\xa3seq\xcc\x03"), blobs[3]])
    if grouped:
        assert op == "snapshots" and fields["chunks"] == [["c", 0, 4]]
        reply = codec.encode_reply(rid, {"node_id": "w"}, {"chunks": [codec.encode_map(page, {"entries": entries})]})
    else:
        assert op == "snapshot" and fields["after"] == 0
        reply = codec.encode_reply(rid, {"node_id": "w", **page}, {"entries": entries})
    with caplog.at_level(logging.WARNING, logger="node.mesh"):
        m.on_reply("10.0.0.2:7400", codec.decode_reply(reply), 1.1)
    if answer == "junk":
        assert "c" not in m.ledger.contexts and not p.pulls and m.stats.pulled_entries == 0
        assert "entries[2]: a packed entry that is not one msgpack value" in caplog.text
        return
    ctx = m.ledger.contexts["c"]
    assert ctx.size == 4 and ctx.frontier.root() == root and m.stats.pulled_entries == 4
    assert [m.ledger.entry_blob(ctx, s) for s in range(1, 5)] == blobs  # (the canonical bytes, whichever way)


# -- peer liveness ------------------------------------------------------------------------------


def test_liveness_changes_only_by_its_transition_function():
    from node.mesh import DEAD, SUSPECT, UNKNOWN, Liveness, next_liveness
    nl = lambda s, **kw: next_liveness(s, suspect_after=3, dead_after=10, **kw)  # noqa: E731
    assert nl(UNKNOWN, silent=50) == UNKNOWN  # never heard: nothing to time out from
    assert nl(UNKNOWN, heard=True) == ALIVE and nl(DEAD, heard=True) == ALIVE
    assert nl(ALIVE, silent=2.9) == ALIVE and nl(ALIVE, silent=3) == SUSPECT and nl(SUSPECT, silent=9) == SUSPECT
    assert nl(SUSPECT, silent=10) == DEAD and nl(ALIVE, silent=10) == DEAD  # straight to dead after a pause
    assert nl(ALIVE, foreign=True) == DEAD
    assert [str(s) for s in Liveness] == ["unknown", "alive", "suspect", "dead"]  # what status shows


# -- signed pushes (issue #14; SPEC 13.6) ------------------------------------------------------


def signed_push_setup() -> tuple[Mesh, Ledger, Any, Any]:
    from protocol.keys import Identity

    writer_key, mallory = Identity.generate(), Identity.generate()
    keys = {"w": writer_key.public}
    m = mesh(Recording(), writer_key=keys.get)
    w = Ledger(MemoryKV(), node_id="w", sync_meta=False)
    return m, w, writer_key, mallory


def push_of(w: Ledger, n: int, signer: Any = None, sig: bytes | None = None) -> list[bytes]:
    from protocol.heads import head_bytes

    blobs = [w.append(codec.Append("notes", "", bytes([i]), {})).blobs[0] for i in range(n)]
    ctx = w.contexts["notes"]
    root = w.root_at(ctx, ctx.size)
    if signer is not None:
        sig = signer.sign(head_bytes("notes", ctx.size, root, signer.public))
    return [watch.repl_topic("notes"), watch.encode_entries(ctx.name_packed, blobs, root=root, sig=sig)]


def test_with_keys_a_push_is_applied_only_under_a_head_its_writer_signed(caplog):
    m, w, writer_key, mallory = signed_push_setup()
    m.on_push(push_of(w, 3))  # no signature (a node without keys, or a forger)
    assert "notes" not in m.ledger.contexts and m.stats.unsigned_pushes == 1
    w1 = Ledger(MemoryKV(), node_id="w", sync_meta=False)
    m.on_push(push_of(w1, 3, signer=mallory))  # signed, but by a key other than the writer's
    assert "notes" not in m.ledger.contexts and m.stats.unsigned_pushes == 2
    w2 = Ledger(MemoryKV(), node_id="w", sync_meta=False)
    m.on_push(push_of(w2, 3, sig=b"\x00" * 64))  # a signature that does not verify
    assert "notes" not in m.ledger.contexts and m.stats.unsigned_pushes == 3
    w3 = Ledger(MemoryKV(), node_id="w", sync_meta=False)
    m.on_push(push_of(w3, 3, signer=writer_key))
    ctx = m.ledger.contexts["notes"]
    assert ctx.size == 3 and ctx.signed is not None and ctx.signed.size == 3 and ctx.signed.verify(writer_key.public)
    assert "no signature" in caplog.text and m.stats.refused_messages >= 3


def test_with_keys_a_push_by_a_writer_with_no_key_here_is_refused():
    from protocol.keys import Identity

    m = mesh(Recording(), writer_key={}.get)
    w = Ledger(MemoryKV(), node_id="stranger", sync_meta=False)
    m.on_push(push_of(w, 2, signer=Identity.generate()))
    assert "notes" not in m.ledger.contexts and m.stats.unsigned_pushes == 1


@pytest.mark.parametrize("sig", [b"short", b"x" * 65, "text" * 16, 7])
def test_a_sig_field_that_is_not_64_bytes_makes_the_message_malformed(sig):
    import msgpack

    w = Ledger(MemoryKV(), node_id="w", sync_meta=False)
    blob = w.append(codec.Append("notes", "", b"x", {})).blobs[0]
    body = msgpack.packb({"v": 1, "type": "entries", "context": "notes", "root": b"r" * 32, "sig": sig,
                          "entries": [msgpack.unpackb(blob)]}, use_bin_type=True)
    with pytest.raises(RemoteProtocolError, match="sig must be 64 bytes"):
        watch.decode_message([watch.repl_topic("notes"), body])


def test_with_keys_two_histories_signed_by_one_writer_are_kept_as_its_equivocation(caplog):
    from protocol import merkle
    from protocol.heads import sign_head

    m, w, writer_key, _mallory = signed_push_setup()
    m.on_push(push_of(w, 3, signer=writer_key))
    ctx = m.ledger.contexts["notes"]
    assert ctx.signed is not None and ctx.signed.size == 3
    # the same writer's head at size 2 of its own history: a prefix, nothing to keep
    m._check_equivocation(ctx, sign_head(writer_key, "notes", 2, w.root_at(w.contexts["notes"], 2)))
    assert not m.equivocations
    # the writer lost its tail and wrote another second entry: its key signed another root at size 2
    w2 = Ledger(MemoryKV(), node_id="w", sync_meta=False)
    w2.append(codec.Append("notes", "", bytes([0]), {}))
    w2.append(codec.Append("notes", "", b"other", {}))
    other = sign_head(writer_key, "notes", 2, w2.root_at(w2.contexts["notes"], 2))
    m._check_equivocation(ctx, other)
    rec = m.equivocations["notes"]
    assert rec["writer"] == "w" and rec["heads"] == [ctx.signed.to_map(), other.to_map()]
    assert rec["root"] != other.root  # this node's copy at size 2, which the first signed head covers:
    merkle.verify_consistency(2, 3, rec["root"], ctx.signed.root, rec["proof"])  # anyone can check it
    assert "EQUIVOCATION" in caplog.text and m.status(0.0)["equivocations"] == [rec]


# -- anti-entropy rounds (issue #15) -----------------------------------------------------------


def test_comparisons_with_a_peer_that_has_nothing_for_us_back_off_and_resume_when_one_finds_work():
    from protocol import digest
    from protocol.digest import NBUCKETS

    t = Recording()
    m = mesh(t)
    for i in range(3):
        m.ledger.append(codec.Append(f"c{i}", "", b"x", {}))
    empty = digest.encode([0] * NBUCKETS)  # the peer holds nothing: it is the one catching up

    def beat(now: float) -> int:
        """A heartbeat from the peer (its digest differs from ours), then our tick; comparisons
        started (a few top buckets differ: each starts with sync_digest)."""
        n = len(t.sent)
        m.rpc_heartbeat(decode_hb(hb_frame(digest=empty)), now)
        m.tick(now)
        return sum(1 for _a, op in t.sent[n:] if op == "sync_digest")

    def answer_rounds(heads: list[list[Any]]) -> None:
        while any(op in ("sync_digest", "sync_heads") for _a, op, _f, _s in m.pending.values()):
            for rid, (address, op, fields, _s) in list(m.pending.items()):
                if op == "sync_heads":
                    m.on_reply(address, {"ok": True, "id": rid, "heads": heads, "more": False}, m.now)
                elif op == "sync_digest":  # the peer holds nothing: every fine bucket is 0
                    zeros = [bytes(8 * digest.SUB)] * len(fields["buckets"])
                    m.on_reply(address, {"ok": True, "id": rid, "digests": zeros}, m.now)

    now = 0.0
    rounds = []
    for _ in range(30):
        rounds.append(beat(now))
        answer_rounds([])  # nothing to pull from it
        now += 0.5
    # a comparison at the first beat, then 2, 4, 8, 16, 16 heartbeats after each empty one ended
    # (the round ends one beat after it starts here): 4 in 30 beats, not 30
    starts = [i for i, n in enumerate(rounds) if n]
    assert [b - a for a, b in zip(starts, starts[1:], strict=False)] == [3, 5, 9, 17][:len(starts) - 1], starts
    p = m.peers["10.0.0.2:7400"]
    assert p.idle_rounds >= 4
    # the peer gets a context we lack: the next comparison finds a pull, and the backoff is gone
    while not beat(now):
        now += 0.5
        m.tick(now)
    answer_rounds([["new", 5, b"r" * 32, "p", 9]])
    assert p.pulls and p.idle_rounds == 0 and p.next_round_beat == 0


def test_a_fruitless_comparison_of_many_heads_backs_off_longer():
    """A peer far behind us (catching up) sends all it holds at each comparison: after a comparison
    of BIG_ROUND_HEADS heads that found nothing, the wait grows past 16 heartbeats, up to 64."""
    from node.mesh import BIG_ROUND_HEADS, MAX_BIG_ROUND_BACKOFF
    from protocol import digest
    from protocol.digest import NBUCKETS

    t = Recording()
    m = mesh(t)
    m.ledger.append(codec.Append("c0", "", b"x", {}))
    empty = digest.encode([0] * NBUCKETS)
    # heads of contexts it holds empty (as if just created): nothing to pull, nothing to check
    many = [[f"e{i:06d}", 0, merkle.EMPTY_ROOT, "p", 0] for i in range(BIG_ROUND_HEADS)]

    def one_beat(now: float, heads: list[list[Any]]) -> bool:
        n = len(t.sent)
        m.rpc_heartbeat(decode_hb(hb_frame(digest=empty)), now)
        m.tick(now)
        started = any(op in ("sync_digest", "sync_heads") for _a, op in t.sent[n:])
        while any(op in ("sync_digest", "sync_heads") for _a, op, _f, _s in m.pending.values()):
            for rid, (address, op, fields, _s) in list(m.pending.items()):
                if op == "sync_heads":
                    m.on_reply(address, {"ok": True, "id": rid, "heads": heads if fields.get("after") is None else [],
                                         "more": False}, m.now)
                elif op == "sync_digest":
                    m.on_reply(address, {"ok": True, "id": rid, "digests": [bytes(8 * digest.SUB)] * len(
                        fields["buckets"])}, m.now)
        return started

    def intervals(heads: list[list[Any]], beats: int) -> list[int]:
        starts = [i for i in range(beats) if one_beat(i * 0.5, heads)]
        return [b - a for a, b in zip(starts, starts[1:], strict=False)]

    assert max(intervals(many, 140)) == MAX_BIG_ROUND_BACKOFF + 1
    small = Recording()
    m = mesh(small)
    t = small
    m.ledger.append(codec.Append("c0", "", b"x", {}))
    assert max(intervals(many[:100], 140)) == 17  # a small comparison: 16 at most, as before


def test_one_changed_context_among_thousands_is_found_by_its_fine_bucket():
    """Two nodes with the same 5,000 contexts; the peer has one more entry in one of them. Our
    comparison asks the fine digest of the one top bucket that differs (2 KiB), then the heads of
    the one fine bucket that differs: a head or two, not the ~40 of its top bucket."""
    from protocol import digest

    t = Recording()
    m = mesh(t)
    # the same entries on both sides (same writer, clock and order): a replica in sync
    m.ledger.now_ns = lambda: 1
    theirs = Ledger(MemoryKV(), node_id="me", sync_meta=False, now_ns=lambda: 1)
    for i in range(5000):
        for led in (m.ledger, theirs):
            led.append(codec.Append(f"c{i}", "", b"x", {}))
    theirs.append(codec.Append("c1234", "", b"more", {}))
    m.rpc_heartbeat(decode_hb(hb_frame(digest=digest.encode(theirs.digest()))), 0.0)
    m.tick(0.0)
    asked = [(op, f) for _a, op, f, _s in m.pending.values()]
    assert asked == [("sync_digest", {"buckets": [digest.bucket_of(b"c1234")]})]
    rid, (address, _op, fields, _s) = next(iter(m.pending.items()))
    m.on_reply(address, {"ok": True, "id": rid, "digests": theirs.fine_digest(fields["buckets"])}, 0.0)
    asked = [(op, f) for _a, op, f, _s in m.pending.values()]
    assert asked == [("sync_heads", {"buckets": [digest.bucket_of(b"c1234", digest.FINE)], "nbuckets": digest.FINE})]
    heads, more = theirs.heads_in_buckets({digest.bucket_of(b"c1234", digest.FINE)}, digest.FINE, None, 2000)
    assert "c1234" in [h[0] for h in heads] and len(heads) <= 3 and not more
    top, _ = theirs.heads_in_buckets({digest.bucket_of(b"c1234")}, digest.NBUCKETS, None, 2000)
    assert len(top) > 20  # what one level would have sent


def test_a_peer_without_sync_digest_is_compared_by_top_buckets_from_then_on():
    from protocol import digest

    t = Recording()
    m = mesh(t)
    m.ledger.append(codec.Append("c", "", b"x", {}))
    empty = digest.encode([0] * digest.NBUCKETS)
    m.rpc_heartbeat(decode_hb(hb_frame(digest=empty)), 0.0)
    m.tick(0.0)
    rid, (address, op, fields, _s) = next(iter(m.pending.items()))
    assert op == "sync_digest"
    m.on_reply(address, {"ok": False, "id": rid, "error": {"code": "UNKNOWN_OP", "message": "unknown op"}}, 0.0)
    asked = [(op, f) for _a, op, f, _s in m.pending.values()]
    assert asked == [("sync_heads", {"buckets": fields["buckets"], "nbuckets": digest.NBUCKETS})]
    assert m.peers[address].no_fine


def test_a_seed_that_never_answers_is_logged_once_with_what_to_check(caplog):
    m = mesh(Recording(), seeds=["10.0.0.9:7400"])
    m.dead_after = 4
    with caplog.at_level(logging.WARNING, logger="node.mesh"):
        for i in range(1, 40):
            m.tick(i * 0.5)
    warned = [r.getMessage() for r in caplog.records if "has not answered" in r.getMessage()]
    assert len(warned) == 1 and "--peers 10.0.0.9:7400" in warned[0] and "not its watch port" in warned[0]
    assert "10.0.0.9:7400" in m.peers  # and it keeps trying


def test_a_seed_that_answers_in_time_is_not_warned_about(caplog):
    m = mesh(Recording(), seeds=["10.0.0.9:7400"])
    m.dead_after = 4
    with caplog.at_level(logging.WARNING, logger="node.mesh"):
        m.tick(0.5)
        m.rpc_heartbeat(codec.Heartbeat("n9", "10.0.0.9:7400", "10.0.0.9:7401", "b", 1, 0, (), b"", "ledger"), 1.0)
        for i in range(3, 40):
            m.tick(i * 0.5)
    assert not [r for r in caplog.records if "has not answered" in r.getMessage()]


# -- one repair session per pair (issue #15) ---------------------------------------------------


def test_no_comparison_with_a_peer_while_it_pulls_from_this_node_but_one_at_least_every_max_skip():
    from node.mesh import MAX_NARROWED, MAX_PULLING_SKIP, PULLING_BEATS
    from protocol import digest
    from protocol.digest import NBUCKETS

    t = Recording()
    m = mesh(t)
    for i in range(40):  # our digest differs from the peer's in more buckets than are narrowed down
        m.ledger.append_batch(codec.AppendBatch(f"c{i}", (("k", b"v", {}),)))
    empty = digest.encode([0] * NBUCKETS)
    assert len(digest.differing(m.ledger.digest(NBUCKETS), [0] * NBUCKETS)) > MAX_NARROWED
    now = 0.0

    def beat(pull: bool, conn: bytes = b"conn-p") -> int:
        """One heartbeat interval: ours, the peer's (on `conn`), and a pull of it when `pull`;
        how many comparisons this node started with it then."""
        nonlocal now
        now += 0.5
        before = sum(op in ("sync_heads", "sync_digest") for _a, op in t.sent)
        m.tick(now)
        if pull:
            m.pulled_by(conn)
        m.rpc_heartbeat(decode_hb(hb_frame(digest=empty)), now, conn)
        p.syncing = False  # (each comparison ends at once, finding nothing: the peer is behind)
        p.next_round_beat = 0  # (the backoff after it is another rule's)
        return sum(op in ("sync_heads", "sync_digest") for _a, op in t.sent) - before

    m.rpc_heartbeat(decode_hb(hb_frame(digest=empty)), now, b"conn-p")
    p = m.peers["10.0.0.2:7400"]
    assert sum(op == "sync_heads" for _a, op in t.sent) == 1  # compared at once
    p.syncing = False
    # it pulls from us at every heartbeat: compared again only once MAX_PULLING_SKIP have passed
    counts = [beat(pull=True) for _ in range(2 * MAX_PULLING_SKIP)]
    assert sum(counts) == 2 and counts.index(1) == MAX_PULLING_SKIP - 1
    # a pull on a connection that is not a peer's (a client's snapshot) changes nothing
    m.pulled_by(b"a-client")
    m.pulled_by(None)
    # once it stops pulling, compared again PULLING_BEATS heartbeats later, then at each one
    counts = [beat(pull=False) for _ in range(PULLING_BEATS + 2)]
    assert counts == [0] * PULLING_BEATS + [1, 1]


def test_a_difference_of_a_few_buckets_is_compared_at_once_even_with_a_peer_pulling_from_us():
    from protocol import digest
    from protocol.digest import NBUCKETS

    t = Recording()
    m = mesh(t)
    m.ledger.append_batch(codec.AppendBatch("c", (("k", b"v", {}),)))  # one bucket differs
    empty = digest.encode([0] * NBUCKETS)
    m.rpc_heartbeat(decode_hb(hb_frame(digest=empty)), 0.0, b"conn-p")
    p = m.peers["10.0.0.2:7400"]
    p.syncing = False
    m.tick(0.5)
    m.pulled_by(b"conn-p")  # it pulls a gap from us all the time
    before = len(t.sent)
    m.rpc_heartbeat(decode_hb(hb_frame(digest=empty)), 0.5, b"conn-p")
    assert [op for _a, op in t.sent[before:]] == ["sync_digest"]  # narrowed down at once all the same


def test_a_peer_forgotten_or_reconnected_leaves_no_stale_connection():
    t = Recording()
    m = mesh(t)
    m.rpc_heartbeat(decode_hb(hb_frame()), 1.0, b"c1")
    m.rpc_heartbeat(decode_hb(hb_frame()), 1.1, b"c2")  # it reconnected: a new routing id
    assert m._conns == {b"c2": "10.0.0.2:7400"} and m.peers["10.0.0.2:7400"].conn == b"c2"
    m._forget(m.peers["10.0.0.2:7400"])
    assert m._conns == {}
    m.pulled_by(b"c2")  # (no peer behind it any more: nothing happens)
