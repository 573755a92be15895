"""A node starts, appends, reads and stops cleanly."""

import pytest

from protocol import merkle

pytestmark = pytest.mark.timeout(60)


def test_append_get_head_roundtrip(node, client):
    e = client.append("c1", b"hello", key="facts", metadata={"agent": "a1"})
    assert (e.seq, e.key, e.payload, e.metadata, e.writer) == (1, "facts", b"hello", {"agent": "a1"}, node.node_id)
    got = client.get("c1")
    assert [x.payload for x in got.entries] == [b"hello"]
    assert got.last_seq == 1 and not got.more
    h = client.head("c1")
    assert h.size == 1 and h.root == merkle.bind_root(1, e.hash)  # one leaf is its own top node


def test_sigterm_exits_zero(node):
    assert node.stop() == 0


def test_append_many_hands_back_acknowledged_entries_while_input_is_slow(client):
    import time

    produced = []
    seen_when_produced = []
    got = []

    def slow():
        for i in range(10):
            time.sleep(0.02)  # a producer like `tail -f`
            seen_when_produced.append(len(got))
            produced.append(i)
            yield f"line {i}"

    for e in client.append_many("slow", slow(), window=1000):
        got.append(e)
    assert [e.seq for e in got] == list(range(1, 11))
    # entries came back while the producer was still producing, not all at the end
    assert seen_when_produced[-1] >= 5, seen_when_produced


def test_client_proof_checks_the_entry_against_the_leaf(node, client, monkeypatch):
    from protocol.errors import IntegrityError

    for i in range(5):
        client.append("p", f"e{i}")
    p = client.proof("p", 3)
    assert p.seq == 3 and p.size == 5
    real_call = client.call

    def lying_call(op, **fields):
        if op == "get":  # the proof is honest, the entry served for seq 3 is not
            fields = dict(fields, after=fields["after"] + 1)
        return real_call(op, **fields)

    monkeypatch.setattr(client, "call", lying_call)
    with pytest.raises(IntegrityError, match="proven leaf"):
        client.proof("p", 3)
    assert client.proof("p", 3, check_entry=False).seq == 3  # the hash-only proof itself is fine
