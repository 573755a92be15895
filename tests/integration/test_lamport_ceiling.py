"""No Lamport value, from any sender, can poison a node's clock (issue #12, invariant 9).

Before the ceiling, one `append` with after_lamport 2^64-2 or one heartbeat with lamport
2^64-1 made every later append on the node answer INTERNAL, for good (a restart kept it), and
an `append_batch` with such a token answered INTERNAL after writing its first entries.
"""

from __future__ import annotations

import io

import msgpack
import pytest

from protocol import merkle
from protocol.client import Client
from protocol.entry import Entry, leaf_hash
from protocol.errors import BadRequest, IntegrityError, LedgerError, NotFound
from protocol.lamport import MAX_AFTER_LAMPORT, MAX_LAMPORT
from protocol.snapshot import encode_header

pytestmark = pytest.mark.timeout(90)

HUGE = [2**64 - 2, 2**64 - 1, MAX_LAMPORT + 1]


def heartbeat(lamport: int) -> dict:
    return {"node_id": "intruder", "cluster": "ledger", "address": "127.0.0.1:9", "boot": "b",
            "lamport": lamport, "entries": 0, "peers": [], "digest": b""}


def test_a_causal_token_above_the_bound_is_refused_and_changes_nothing(node, client: Client, zctx):
    client.append("c", b"first")
    for after in HUGE:
        with pytest.raises(BadRequest, match="after_lamport"):
            client.append("c", b"x", after_lamport=after)
        with pytest.raises(BadRequest, match="after_lamport"):
            client.append_batch("c", [b"a", b"b"], after_lamport=after)
        with pytest.raises(BadRequest, match="after_lamport"):
            client.append_batch("fresh", [b"a"], after_lamport=after)
    assert client.head("c").size == 1
    with pytest.raises(NotFound):
        client.head("fresh")  # a refused batch does not even create its context
    # the node goes on as before, and after a restart too
    e = client.append("c", b"second")
    assert e.seq == 2 and e.lamport < 1000
    node.pin_ports().stop()
    node.start()
    client2 = Client(node.address, timeout=5.0, zctx=zctx)
    try:
        assert [x.payload for x in client2.get("c").entries] == [b"first", b"second"]
        assert client2.append("c", b"third").seq == 3
    finally:
        client2.close()


def test_a_token_at_the_bound_is_honoured_and_the_clock_goes_on(node, client: Client):
    e = client.append("c", b"x", after_lamport=MAX_AFTER_LAMPORT)
    assert e.lamport == MAX_AFTER_LAMPORT + 1
    entries = client.append_batch("c", [b"%d" % i for i in range(100)], after_lamport=MAX_AFTER_LAMPORT)
    assert entries[-1].lamport == MAX_AFTER_LAMPORT + 101
    assert client.append("d", b"y").lamport == MAX_AFTER_LAMPORT + 102
    # an honest client now passes tokens above the bound (the lamports it read): accepted,
    # never refused, and honoured up to the bound; the clock goes on by its own ticks
    token = entries[-1].lamport
    assert client.append("d", b"z", after_lamport=token).lamport == MAX_AFTER_LAMPORT + 103
    for t in (MAX_LAMPORT, MAX_LAMPORT - 1):
        assert client.append("d", b"w", after_lamport=t).lamport < MAX_AFTER_LAMPORT + 200


@pytest.mark.parametrize("lamport", [2**64 - 1, MAX_LAMPORT + 1])
def test_a_heartbeat_with_a_clock_above_the_ceiling_is_refused_and_counted(node, client: Client, lamport):
    client.append("c", b"x")
    with pytest.raises(BadRequest, match="lamport"):
        client.call("heartbeat", **heartbeat(lamport))
    status = client.status()
    assert status["lamport"] < 1000
    assert status["replication"]["refused_messages"] == 1
    assert client.append("c", b"y").seq == 2


def test_a_heartbeat_at_the_ceiling_moves_the_clock_only_to_the_bound(node, client: Client):
    client.call("heartbeat", **heartbeat(MAX_LAMPORT))
    assert client.status()["lamport"] == MAX_AFTER_LAMPORT
    for i in range(3):
        assert client.append("c", b"%d" % i).lamport == MAX_AFTER_LAMPORT + 1 + i


def test_a_load_with_an_entry_above_the_ceiling_is_refused_as_integrity(node, client: Client):
    client.append("other", b"x")
    fields = dict(context="c", seq=1, key="", payload=b"p", metadata={}, lamport=2**64 - 2, ts_ns=1, writer="w")
    bad = Entry(**fields, hash=leaf_hash(**fields))  # a sound hash: only the ceiling refuses it
    f = merkle.Frontier()
    f.append(bad.hash)
    with pytest.raises(IntegrityError, match="ceiling"):
        client.call("load", context="c", load_id="l1", size=1, root=f.root(), entries=[bad.to_wire()], final=True)
    with pytest.raises(NotFound):
        client.head("c")
    assert client.status()["lamport"] < 1000
    assert client.append("other", b"y").seq == 2
    # the same through the client's snapshot-file path
    src = io.BytesIO(encode_header("c", 1, f.root()) + msgpack.packb(bad.to_wire(), use_bin_type=True))
    with pytest.raises(LedgerError):
        client.load("c", src)
    assert client.status()["loads_in_progress"] == 0
