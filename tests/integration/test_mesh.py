"""The mesh with real processes: gossip, push and repair, single-writer routing, forks, restarts."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from protocol.client import Client
from protocol.errors import NotFound, NotWriter, Unavailable
from tests.conftest import NodeProcess

pytestmark = pytest.mark.timeout(150)

FAST = ("--heartbeat-ms", "100", "--suspect-after", "3", "--dead-after", "8")


def hostport(n: NodeProcess) -> str:
    return n.address.split("://", 1)[1]


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def heads(nodes: list[NodeProcess], zctx, context: str) -> list[tuple[int, bytes] | None]:
    out: list[tuple[int, bytes] | None] = []
    for n in nodes:
        with Client(n.address, zctx=zctx, timeout=2) as c:
            try:
                h = c.head(context)
                out.append((h.size, h.root))
            except NotFound:
                out.append(None)
    return out


def converged(nodes: list[NodeProcess], zctx, contexts: list[str], size: dict[str, int] | None = None) -> bool:
    for name in contexts:
        hs = heads(nodes, zctx, name)
        if None in hs or len(set(hs)) != 1:
            return False
        if size is not None and hs[0] is not None and hs[0][0] != size[name]:
            return False
    return True


def status(n: NodeProcess, zctx) -> dict[str, Any]:
    with Client(n.address, zctx=zctx, timeout=2) as c:
        return c.status()


def mesh(node_factory, count: int, *flags: str) -> list[NodeProcess]:
    first = node_factory(*FAST, *flags, name="n1", env={"LEDGER_ID": "n1"})
    nodes = [first]
    for i in range(2, count + 1):
        # each seeded with the previous one only: the rest is learned by gossip
        nodes.append(node_factory(*FAST, *flags, "--peers", hostport(nodes[-1]), name=f"n{i}",
                                  env={"LEDGER_ID": f"n{i}"}))
    return nodes


def all_alive(nodes: list[NodeProcess], zctx) -> bool:
    for n in nodes:
        peers = status(n, zctx)["peers"]
        if sorted(p["id"] for p in peers if p["state"] == "alive") != sorted(m.node_id for m in nodes if m is not n):
            return False
    return True


def test_three_nodes_learn_each_other_by_gossip_and_converge(node_factory, zctx):
    nodes = mesh(node_factory, 3)
    wait_for(lambda: all_alive(nodes, zctx), what="every node to know every other as alive")
    with Client(nodes[0].address, zctx=zctx) as c1, Client(nodes[2].address, zctx=zctx) as c3:
        for _ in c1.append_many("from-n1", (f"a{i}" for i in range(500))):
            pass
        c1.append_batch("batch-n1", [f"b{i}" for i in range(300)])
        e3 = c3.append("from-n3", "written at n3")
        assert e3.writer == "n3"
    names = ["from-n1", "batch-n1", "from-n3"]
    wait_for(lambda: converged(nodes, zctx, names, {"from-n1": 500, "batch-n1": 300, "from-n3": 1}),
             what="all nodes to hold every context")
    st = status(nodes[1], zctx)
    assert {p["id"]: p["state"] for p in st["peers"]} == {"n1": "alive", "n3": "alive"}
    assert st["forks"] == [] and st["replication"]["pushed_entries"] + st["replication"]["pulled_entries"] == 801
    # every replica serves verifiable reads and proofs of the same history
    with Client(nodes[1].address, zctx=zctx) as c2:
        assert c2.verify_context("from-n1")["size"] == 500
        assert c2.proof("from-n1", 250).size == 500
        assert c2.head("from-n3").writer == "n3"


def test_appends_at_a_replica_are_redirected_to_the_writer(node_factory, zctx):
    n1, n2 = mesh(node_factory, 2)
    with Client(n1.address, zctx=zctx) as c1:
        c1.append("routed", "first")
    wait_for(lambda: converged([n1, n2], zctx, ["routed"]), what="replication")
    with Client(n2.address, zctx=zctx) as c2:
        with pytest.raises(NotWriter) as info:
            c2.call("append", context="routed", payload=b"raw")  # the wire reply names the writer
        assert info.value.details["writer"] == "n1" and info.value.details["address"] == hostport(n1)
        e = c2.append("routed", "via n2")  # the client follows it
        assert (e.seq, e.writer) == (2, "n1")
        es = list(c2.append_many("routed", (f"p{i}" for i in range(2000)), dedup_prefix="pm"))
        assert [x.seq for x in es] == list(range(3, 2003)) and {x.writer for x in es} == {"n1"}
        b = c2.append_batch("routed", ["x", "y"])
        assert [x.seq for x in b] == [2003, 2004]
    from tools import cli

    out = io.StringIO()
    args = cli.parse_args(["--node", hostport(n2), "--json", "append", "routed", "by the cli"])
    assert cli.run(args, cli.Output(True, out)) == 0
    assert '"writer":"n1"' in out.getvalue() and '"seq":2005' in out.getvalue()


def test_killed_follower_pulls_exactly_the_tail_it_missed(node_factory, zctx):
    n1, n2 = mesh(node_factory, 2)
    n2.pin_ports()
    with Client(n1.address, zctx=zctx) as c1:
        for _ in c1.append_many("tail", (b"x" * 100 for _ in range(3000))):
            pass
        wait_for(lambda: converged([n1, n2], zctx, ["tail"]), what="first replication")
        wait_for(lambda: status(n2, zctx)["pending_writes"] == 0, what="the replica to be on disk")
        n2.kill()
        for _ in c1.append_many("tail", (b"y" * 100 for _ in range(2000))):
            pass
    n2.start()
    wait_for(lambda: converged([n1, n2], zctx, ["tail"], {"tail": 5000}), what="catch-up after restart")
    rep = status(n2, zctx)["replication"]
    # about k entries (k = 2,000 of N = 5,000) crossed the wire, not N
    assert rep["pulled_entries"] + rep["pushed_entries"] == 2000
    assert rep["pulled_bytes"] < 2000 * 400, rep


def test_writer_down_appends_fail_clearly_reads_go_on_and_new_contexts_work(node_factory, zctx):
    n1, n2, n3 = mesh(node_factory, 3)
    n1.pin_ports()
    with Client(n1.address, zctx=zctx) as c1:
        c1.append("owned", "by n1")
    wait_for(lambda: converged([n1, n2, n3], zctx, ["owned"]), what="replication")
    n1.kill()
    with Client(n2.address, zctx=zctx, timeout=3) as c2:
        wait_for(lambda: any(p["id"] == "n1" and p["state"] == "dead" for p in status(n2, zctx)["peers"]),
                 what="n1 to be declared dead")
        with pytest.raises(Unavailable, match="'n1'.*down"):
            c2.append("owned", "while n1 is down")
        assert [e.payload for e in c2.get("owned").entries] == [b"by n1"]  # reads are served
        e = c2.append("new-on-n2", "fine")
        assert e.writer == "n2"
    wait_for(lambda: converged([n2, n3], zctx, ["new-on-n2"]), what="n3 to get n2's context")
    # n1 comes back under its id and is accepted at once; appends reach it again
    n1.start()
    # (n3 is where the append goes: it must have heard n1 again too, not only n2)
    wait_for(lambda: all(any(p["id"] == "n1" and p["state"] == "alive" for p in status(n, zctx)["peers"])
                         for n in (n2, n3)), what="n1 to be alive again")
    with Client(n3.address, zctx=zctx) as c3:
        assert c3.append("owned", "after the restart").seq == 2
    wait_for(lambda: converged([n1, n2, n3], zctx, ["owned", "new-on-n2"]), what="convergence after restart")


def test_late_joiner_with_empty_data_receives_every_context(node_factory, zctx):
    n1, n2 = mesh(node_factory, 2)
    with Client(n1.address, zctx=zctx) as c1, Client(n2.address, zctx=zctx) as c2:
        for i in range(30):
            c1.append(f"ctx{i}", f"v{i}")
        for _ in c2.append_many("big", (b"z" for _ in range(12_000))):
            pass
    late = node_factory(*FAST, "--peers", hostport(n2), name="late", env={"LEDGER_ID": "late"})
    names = [f"ctx{i}" for i in range(30)] + ["big"]
    wait_for(lambda: converged([n1, n2, late], zctx, names), 60, what="the late joiner to catch up")
    with Client(late.address, zctx=zctx) as c:
        assert c.verify_context("big")["size"] == 12_000
        assert len(c.contexts()) == 31


def test_a_fork_is_detected_one_history_served_everywhere_and_nothing_dropped(node_factory, zctx):
    a = node_factory(*FAST, name="a", env={"LEDGER_ID": "a"})
    b = node_factory(*FAST, name="b", env={"LEDGER_ID": "b"})
    b.pin_ports()
    with Client(a.address, zctx=zctx) as ca, Client(b.address, zctx=zctx) as cb:
        for i in range(5):
            ca.append("split", f"a{i}")
            cb.append("split", f"b{i}")
        for i in range(3):
            cb.append("split", f"b-more{i}")  # b's history is longer: length does not decide
        ha, hb = ca.head("split"), cb.head("split")
    assert (ha.size, hb.size) == (5, 8) and ha.root != hb.root
    b.stop()
    b.args += ["--peers", hostport(a)]
    b.start()
    # b, whose history loses by the rule (lowest writer id first), says so; a says so too when it
    # compared before b had switched (a race: a may only ever see b serving a's history)
    forks = wait_for(lambda: status(b, zctx)["forks"], what="b to see the fork")
    assert forks[0]["context"] == "split" and forks[0]["served_writer"] == "a" and forks[0]["set_aside"]
    assert all(f["served_writer"] == "a" for f in status(a, zctx)["forks"])
    # both nodes now serve a's history under the name...
    wait_for(lambda: converged([a, b], zctx, ["split"], {"split": 5}), what="b to serve a's history")
    with Client(b.address, zctx=zctx) as cb:
        assert [e.payload for e in cb.get("split").entries] == [f"a{i}".encode() for i in range(5)]
        # ...b keeps its own, readable as the fork of writer b
        kept = cb.call("get", context="split", fork="b")
        assert [e["payload"] for e in kept["entries"]] == [f"b{i}".encode() for i in range(5)] + [
            f"b-more{i}".encode() for i in range(3)]
        assert cb.call("head", context="split")["fork"]["set_aside"] is True
        # and appends at b go to the one writer left, a
        assert cb.append("split", "after the fork").writer == "a"
    with Client(a.address, zctx=zctx) as ca:
        assert ca.call("head", context="split").get("fork", {}).get("set_aside", False) is False
        assert ca.head("split").size == 6
    assert "FORK: context 'split'" in a.output() + b.output()
    # the set-aside history survives a restart of b
    b.stop()
    b.start()
    with Client(b.address, zctx=zctx) as cb:
        assert len(cb.call("get", context="split", fork="b")["entries"]) == 8
        assert cb.head("split").writer == "a"


def test_lamport_clock_advances_past_replicated_entries_and_causal_tokens(node_factory, zctx):
    n1, n2 = mesh(node_factory, 2)
    with Client(n1.address, zctx=zctx) as c1, Client(n2.address, zctx=zctx) as c2:
        hi = c1.append("clock-a", "x", after_lamport=5_000_000)
        wait_for(lambda: converged([n1, n2], zctx, ["clock-a"]), what="replication")
        later = c2.append("clock-b", "after seeing x")  # no token: the replica has seen it
        assert later.lamport > hi.lamport
        token = c2.append("clock-c", "y", after_lamport=later.lamport + 10)
        back = c1.append("clock-d", "z", after_lamport=token.lamport)  # token carried to another node
        assert back.lamport > token.lamport


def test_status_reports_peers_and_heartbeats_stay_small(node_factory, zctx):
    n1, n2 = mesh(node_factory, 2)
    with Client(n1.address, zctx=zctx) as c1:
        c1.append_batch("s", ["a"] * 10)
        for i in range(200):
            c1.append(f"many{i}", "x")
    wait_for(lambda: status(n2, zctx)["contexts"] == 201, what="replication of 201 contexts")
    # (waited for, not read once: on a loaded 2-core machine one heartbeat can come late)
    # (and until n1 has built a heartbeat since it knew n2: heartbeat_bytes is measured then)
    st = wait_for(lambda: (s := status(n1, zctx))["peers"] and s["peers"][0]["state"] == "alive"
                  and s["peers"][0]["last_heard_s"] < 2 and s["replication"]["heartbeat_bytes"] > 0 and s,
                  what="n2 alive and heard from lately, and a heartbeat built for it")
    (p,) = st["peers"]
    assert p["id"] == "n2" and p["address"] == hostport(n2)
    assert "behind" in p and st["advertise"] == hostport(n1)
    assert 0 < st["replication"]["heartbeat_bytes"] <= 2048


def test_cluster_launcher_starts_a_mesh_and_stops_it(zctx, tmp_path):
    from tools.cluster import run_cluster

    out = io.StringIO()
    stop = threading.Event()
    t = threading.Thread(target=run_cluster, args=(3, str(tmp_path), "127.0.0.1", 0, FAST, out, stop),
                         daemon=True)
    t.start()
    line = wait_for(lambda: next((x for x in out.getvalue().splitlines() if x.startswith("ready nodes=")), None),
                    30, what="the ready line")
    addrs = line.split("=", 1)[1].split(",")
    assert len(addrs) == 3
    with Client(addrs[0], zctx=zctx) as c:
        c.append("cl", "x")
    with Client(addrs[2], zctx=zctx) as c:
        wait_for(lambda: c.get("cl").entries, what="replication inside the launched cluster")
    stop.set()
    t.join(30)
    assert not t.is_alive() and "stopped 3 node(s)" in out.getvalue()


def test_cluster_launcher_with_keys_gives_every_node_a_key_and_one_admin_client_key(zctx, tmp_path):
    from protocol.errors import Timeout
    from protocol.keys import parse_key_file
    from tools.cluster import run_cluster

    out = io.StringIO()
    stop = threading.Event()
    t = threading.Thread(target=run_cluster, args=(2, str(tmp_path), "127.0.0.1", 0, FAST, out, stop),
                         kwargs={"keys": True}, daemon=True)
    t.start()
    line = wait_for(lambda: next((x for x in out.getvalue().splitlines() if x.startswith("ready nodes=")), None),
                    30, what="the ready line")
    addrs = line.split("=", 1)[1].split(",")
    key = parse_key_file((tmp_path / "client.key").read_text())
    servers = [parse_key_file((tmp_path / f"n{i}" / "node.key").read_text()).public_hex for i in (1, 2)]
    assert f"--server-key {servers[0]}" in out.getvalue() and f"key {servers[1]}" in out.getvalue()
    with Client(addrs[0], key=key, server_key=servers[0], zctx=zctx) as c:
        assert c.status()["security"] == "curve"
        c.append("cl", "x")
    with Client(addrs[1], key=key, server_key=servers[1], zctx=zctx) as c:
        wait_for(lambda: c.get("cl").entries, what="replication between nodes with keys")
    with Client(addrs[0], zctx=zctx, timeout=0.5, retries=0) as plain, pytest.raises(Timeout):
        plain.ping()  # no key: not let in
    stop.set()
    t.join(30)
    assert not t.is_alive() and "stopped 2 node(s)" in out.getvalue()


def test_replicated_acks_wait_for_n_other_nodes_or_say_how_many_hold_it(node_factory, zctx):
    n1, n2, n3 = mesh(node_factory, 3, "--replica-timeout-ms", "1500")
    wait_for(lambda: all_alive([n1, n2, n3], zctx), what="the mesh to form")
    with Client(n1.address, zctx=zctx) as c1:
        e = c1.append("acked", "on three nodes", replicas=2)
        assert c1.last_replicated == 2
        for n in (n2, n3):  # acknowledged means they hold it now, not later
            with Client(n.address, zctx=zctx) as c:
                assert c.get("acked").entries[0].hash == e.hash
        b = c1.append_batch("acked", ["x", "y"], replicas=1)
        assert [x.seq for x in b] == [2, 3] and c1.last_replicated >= 1
    with Client(n2.address, zctx=zctx) as c2:  # via a replica: redirected, still acknowledged by 2
        assert c2.append("acked", "via n2", replicas=2).seq == 4 and c2.last_replicated == 2
    n3.kill()
    with Client(n1.address, zctx=zctx, timeout=10) as c1:
        with pytest.raises(Unavailable) as info:
            c1.append("acked", "only n2 can hold this", replicas=2)
        assert info.value.details["replicated"] == 1 and info.value.details["required"] == 2
        assert c1.head("acked").size == 5  # the entry stays appended
    from tools import cli

    out = io.StringIO()
    args = cli.parse_args(["--node", hostport(n1), "--json", "append", "acked", "cli", "--replicas", "1"])
    assert cli.run(args, cli.Output(True, out)) == 0
    assert '"replicated":1' in out.getvalue()


def test_merged_read_orders_entries_of_many_contexts_causally(node_factory, zctx):
    n1, n2 = mesh(node_factory, 2)
    with Client(n1.address, zctx=zctx) as c1, Client(n2.address, zctx=zctx) as c2:
        a1 = c1.append("m-a", "question")
        b1 = c2.append("m-b", "answer", after_lamport=a1.lamport)  # written at n2 after reading a1
        a2 = c1.append("m-a", "follow-up", after_lamport=b1.lamport)
        c2.append("m-c", "unrelated")
        for i in range(50):
            c1.append("m-a", f"more{i}")
        wait_for(lambda: converged([n1, n2], zctx, ["m-a", "m-b", "m-c"]), what="replication")
        got = list(c2.merged(["m-a", "m-b", "m-c"]))
        assert len(got) == 54
        keys = [(e.lamport, e.writer, e.context, e.seq) for e in got]
        assert keys == sorted(keys)
        pos = {(e.context, e.seq): i for i, e in enumerate(got)}
        assert pos[("m-a", 1)] < pos[("m-b", 1)] < pos[("m-a", 2)]
        later = list(c2.merged(["m-a", "m-b"], after_lamport=b1.lamport))
        assert later[0] == a2 and all(e.lamport > b1.lamport for e in later) and len(later) == 51
    from tools import cli

    out = io.StringIO()
    args = cli.parse_args(["--node", hostport(n1), "--json", "merged", "m-b", "m-a", "--limit", "3"])
    assert cli.run(args, cli.Output(True, out)) == 0
    assert [line.count('"context"') for line in out.getvalue().splitlines()] == [1, 1, 1]
    assert '"payload":"answer"' in out.getvalue().splitlines()[1]


def test_nodes_of_different_clusters_never_join(node_factory, zctx):
    a = node_factory(*FAST, "--cluster", "blue", name="a", env={"LEDGER_ID": "a"})
    b = node_factory(*FAST, "--cluster", "green", "--peers", hostport(a), name="b", env={"LEDGER_ID": "b"})
    with Client(a.address, zctx=zctx) as ca:
        ca.append("blue-only", "x")
    wait_for(lambda: "belongs to cluster" in a.output() and "belongs to cluster" in b.output(),
             what="both sides to log the refusal")
    time.sleep(0.5)
    assert status(a, zctx)["peers"] == [] and status(a, zctx)["cluster"] == "blue"
    assert all(p["state"] != "alive" for p in status(b, zctx)["peers"])
    with Client(b.address, zctx=zctx) as cb:
        with pytest.raises(NotFound):
            cb.head("blue-only")


def test_replicas_beyond_the_live_peers_fail_at_once_and_append_nothing(node_factory, zctx):
    n = node_factory(*FAST)
    with Client(n.address, zctx=zctx) as c:
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="knows only 0 other node"):
            c.append("alone", "x", replicas=1)
        assert time.monotonic() - t0 < 2  # not the replica timeout
        with pytest.raises(NotFound):
            c.head("alone")


def test_head_shows_a_fork_and_get_reads_the_set_aside_history_from_client_and_cli(node_factory, zctx):
    a = node_factory(*FAST, name="a", env={"LEDGER_ID": "a"})
    b = node_factory(*FAST, name="b", env={"LEDGER_ID": "b"})
    with Client(b.address, zctx=zctx) as cb, Client(a.address, zctx=zctx) as ca:
        ca.append("f2", "from a")
        cb.append("f2", "from b")
    b.pin_ports()
    b.stop()
    b.args += ["--peers", hostport(a)]
    b.start()
    with Client(b.address, zctx=zctx) as cb:
        h = wait_for(lambda: cb.head("f2") if cb.head("f2").writer == "a" else None, what="b to switch to a's")
        assert h.fork is not None and h.fork["set_aside"] and h.fork["served_writer"] == "a"
        assert [e.payload for e in cb.get("f2", fork="b").entries] == [b"from b"]
    from tools import cli

    out = io.StringIO()
    assert cli.run(cli.parse_args(["--node", hostport(b), "--json", "get", "f2", "--fork", "b"]),
                   cli.Output(True, out)) == 0
    assert '"payload":"from b"' in out.getvalue()
    out = io.StringIO()
    assert cli.run(cli.parse_args(["--node", hostport(b), "--json", "head", "f2"]), cli.Output(True, out)) == 0
    assert '"served_writer":"a"' in out.getvalue()


def test_replicated_acks_in_sync_durability_are_sent_once_the_follower_has_flushed(node_factory, zctx):
    # (that a follower acks nothing before its own flush is pinned by the unit test in
    # test_mesh_sim; here: the acks after each flush do arrive, for single appends and batches)
    n1, n2 = mesh(node_factory, 2, "--durability", "sync", "--replica-timeout-ms", "5000")
    wait_for(lambda: all_alive([n1, n2], zctx), what="the mesh to form")
    with Client(n1.address, zctx=zctx) as c1:
        for i in range(20):
            e = c1.append("durable", f"e{i}", replicas=1)
            assert c1.last_replicated == 1
        b = c1.append_batch("durable", [f"b{i}" for i in range(50)], replicas=1)
        assert c1.last_replicated == 1 and b[-1].seq == 70
    n2.kill()
    n2.start()
    with Client(n2.address, zctx=zctx) as c2:
        assert c2.head("durable").size == 70 and c2.get("durable", after=19, limit=1).entries[0].hash == e.hash


@pytest.mark.timeout(90)
def test_ledger_cluster_runs_from_a_folder_with_its_own_node_and_tools_packages(zctx, tmp_path):
    """An agent project's own `node/`, `protocol/` or `tools/` folder must not shadow ours in the
    nodes the tools start (they run `python -P`): before, `ledger cluster` failed there with
    "No module named node.main"."""
    for pkg in ("node", "protocol", "tools"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text(f"raise ImportError('the project\\'s own {pkg} was imported')\n")
    ledger = os.path.join(os.path.dirname(sys.executable), "ledger")
    proc = subprocess.Popen([ledger, "cluster", "--nodes", "2", "--data", str(tmp_path / "data")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready nodes="):
                break
        out = "".join(lines)
        assert "ready nodes=" in out and "own" not in out, out
        addrs = out.split("ready nodes=", 1)[1].split()[0].split(",")
        with Client(addrs[0], zctx=zctx) as c:
            assert c.append("shadow", "x").seq == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_replication_push_is_never_refused_by_max_watchers_per_context(node_factory, zctx):
    """A peer's subscription to the replication stream is no watcher: with the bound at 1 and
    that one place taken by a watcher, the writer still pushes to its peer."""
    n1, n2 = mesh(node_factory, 2, "--max-watchers-per-context", "1")
    wait_for(lambda: all_alive([n1, n2], zctx), what="the mesh")
    with Client(n1.address, zctx=zctx) as c1:
        with c1.watch("pushed", after=0) as w:
            assert not w.limited
            wait_for(lambda: status(n1, zctx)["replication_subscribers"] >= 1, what="n2's subscription")
            for i in range(50):
                c1.append("pushed", f"p{i}")
            wait_for(lambda: converged([n1, n2], zctx, ["pushed"], {"pushed": 50}), what="replication")
            with c1.watch("pushed", after=0) as w2:  # the context's one place is w's
                assert w2.limited
            st = status(n1, zctx)
            assert st["replication_entries"] >= 50 and st["watchers_refused"] == 1
            assert status(n2, zctx)["replication"]["pushed_entries"] >= 50


@pytest.mark.timeout(120)
def test_nodes_that_keep_two_contexts_in_ram_replicate_and_restart_every_context(node_factory, zctx):
    """Issue #15: with --context-cache 2 every context goes out of RAM and comes back all the time:
    replication, catch-up of a late joiner, listings and a clean restart see every one of them."""
    n1, n2 = mesh(node_factory, 2, "--context-cache", "2", "--hot-bytes", "1")
    names = [f"c{i:02d}" for i in range(40)]
    with Client(n1.address, zctx=zctx) as c1:
        for i, name in enumerate(names):
            c1.append_batch(name, [f"{name}-{k}" for k in range(i % 5 + 1)])
    want = {name: i % 5 + 1 for i, name in enumerate(names)}
    wait_for(lambda: converged([n1, n2], zctx, names, want), 60, what="replication through tiny caches")
    late = node_factory(*FAST, "--context-cache", "2", "--hot-bytes", "1", "--peers", hostport(n2), name="late",
                        env={"LEDGER_ID": "late"})
    wait_for(lambda: converged([n1, n2, late], zctx, names, want), 60, what="a late joiner with a tiny cache")
    # (recent entries leave RAM at once with --hot-bytes 1, and then their contexts can)
    wait_for(lambda: status(late, zctx)["context_cache"]["loaded"] <= 2, what="the cache to shrink back to 2")
    for n in (n1, n2, late):
        cache = status(n, zctx)["context_cache"]
        assert cache["capacity"] == 2 and cache["evictions"] >= 38 and cache["loads"] > 0, cache
    before = heads([late], zctx, "c17")
    assert late.stop() == 0
    late.start()
    assert "40 contexts after a clean stop" in late.output()
    with Client(late.address, zctx=zctx) as c:
        assert [d["name"] for d in c.contexts()] == names
        assert c.verify_context("c39")["size"] == 5
    assert heads([late], zctx, "c17") == before
