"""A node starts, appends, reads and stops cleanly."""

import pytest

pytestmark = pytest.mark.timeout(60)


def test_append_get_head_roundtrip(node, client):
    e = client.append("c1", b"hello", key="facts", metadata={"agent": "a1"})
    assert (e.seq, e.key, e.payload, e.metadata, e.writer) == (1, "facts", b"hello", {"agent": "a1"}, node.node_id)
    got = client.get("c1")
    assert [x.payload for x in got.entries] == [b"hello"]
    assert got.last_seq == 1 and not got.more
    h = client.head("c1")
    assert h.size == 1 and h.root == e.hash  # the root of one leaf is the leaf


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
