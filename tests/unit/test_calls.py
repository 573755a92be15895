"""What both reference clients share without I/O (protocol/calls.py): replies matched to requests,
what a socket monitor says about a connection, addresses, and a flow driven by hand."""

from __future__ import annotations

import msgpack
import pytest

from protocol import calls
from protocol.errors import IntegrityError, NotFound, Unreachable

pytestmark = pytest.mark.timeout(30)


def reply(rid: object, **fields: object) -> bytes:
    return msgpack.packb({"v": 1, "id": rid, "ok": True, **fields}, use_bin_type=True)


def test_replies_match_by_id_and_a_nil_id_answers_the_oldest_waiting_request():
    book = calls.ReplyBook()
    for rid in (1, 2, 3):
        book.sent(rid, f"kept{rid}")
    assert book.match(reply(2))[::2] == (2, "kept2")  # by id, out of order
    assert book.match(reply(None, ok=False))[::2] == (1, "kept1")  # no id: the oldest still waiting
    assert book.match(reply(2)) is None  # answered already: nothing waits for it
    assert book.match(b"\xc1 not msgpack") is None
    assert book.match(msgpack.packb([1, 2])) is None
    book.forget(3)
    assert book.match(reply(None)) is None and len(book) == 0  # nothing left to answer


def test_a_link_is_unreachable_only_when_refused_with_no_connection_up():
    link = calls.Link()
    assert not link.unreachable
    link.on_event("refused")
    assert link.unreachable and not link.ever_up
    link.on_event("up")
    assert not link.unreachable and link.ever_up
    link.on_event("refused")  # (a refusal while a connection is up says nothing)
    assert not link.unreachable
    link.on_event("down")
    assert not link.unreachable
    link.on_event("refused")  # the reconnection the drop scheduled: not yet a refusal
    assert not link.unreachable
    link.on_event("refused")  # that attempt failed: nothing listens now
    assert link.unreachable and link.ever_up


def test_a_node_that_drops_every_handshake_is_not_called_unreachable():
    # a node with keys and a keyless client: connected, dropped, reconnected, dropped, ...
    link = calls.Link()
    for _ in range(5):
        link.on_event("up")
        link.on_event("down")
        link.on_event("refused")
        assert not link.unreachable


def test_a_handshake_closed_without_a_word_is_a_socket_type_mismatch_to_probe_once():
    # libzmq 4.3, no keys, a DEALER at a PUB: connected, then closed, no handshake event, no retry
    link = calls.Link()
    link.on_event("up")
    assert not link.probe_due
    link.on_event("down")
    assert link.mismatch and link.probe_due and link.verdict is None
    link.on_probe(True)
    assert link.verdict == "watch" and not link.probe_due  # probed once, the verdict sticks
    other = calls.Link()
    for kind in ("up", "mismatch", "down"):  # a libzmq that says so: invalid metadata
        other.on_event(kind)
    other.on_probe(False)  # no PUB answered a SUB: some other kind of socket
    assert other.verdict == "other"


def test_handshakes_failing_with_no_detail_are_probed_but_only_a_pub_gives_a_verdict():
    # with keys the PUB drops the connection first: only "failed" handshakes (so also a node at
    # its connection limit): a probe after the second, and no claim unless a PUB answers
    link = calls.Link()
    for _ in range(2):
        assert not link.probe_due
        for kind in ("up", "failed", "down", "refused"):
            link.on_event(kind)
    assert link.probe_due and not link.mismatch
    link.on_probe(False)
    assert link.verdict is None and not link.probe_due


def test_a_request_port_or_a_refusal_over_keys_is_never_probed():
    link = calls.Link()
    for kind in ("up", "handshake", "down", "refused", "up", "handshake"):  # a node that restarted
        link.on_event(kind)
    assert not link.mismatch and not link.probe_due
    keyless = calls.Link()  # a keyless client at a node with keys: failed, then refused over keys
    for kind in ("up", "failed", "down", "refused", "up", "rejected", "down", "refused", "up", "failed", "down"):
        keyless.on_event(kind)
    assert not keyless.probe_due and keyless.verdict is None


def test_what_a_client_says_when_a_call_reached_no_request_port():
    watch = calls.not_a_request_port("tcp://10.0.0.1:7401", "watch")
    assert "tcp://10.0.0.1:7401 is a node's watch (PUB) port" in watch.message and "try 10.0.0.1:7400" in watch.message
    assert watch.details["reason"] == "watch_port" and watch.code == "UNAVAILABLE"
    other = calls.not_a_request_port("tcp://h:9", "other")
    assert "ZeroMQ socket of another kind" in other.message and other.details["request_port_guess"] == "h:8"
    refused = Unreachable("nothing listening at tcp://h:1 (connection refused)", {"address": "tcp://h:1"})
    both = calls.unreachable_of([refused, watch])
    assert both.message.startswith("nothing listening at tcp://h:1 (connection refused); tcp://10.0.0.1:7401 is")
    assert both.details["addresses"] == ["tcp://h:1", "tcp://10.0.0.1:7401"]
    plain = calls.unreachable_of([refused, Unreachable("x", {"address": "tcp://h:2"})])
    assert plain.message == "nothing listening at tcp://h:1, tcp://h:2 (connection refused)"
    assert calls.unreachable_of([watch]) is watch


def test_addresses_one_many_or_comma_separated():
    assert calls.addresses_of("127.0.0.1:1") == ["tcp://127.0.0.1:1"]
    assert calls.addresses_of(["a:1", "tcp://b:2", "a:1"]) == ["tcp://a:1", "tcp://b:2"]
    assert calls.addresses_of(" a:1 , :2 ") == ["tcp://a:1", "tcp://127.0.0.1:2"]
    for bad in ("", [], "a", "a:x"):
        with pytest.raises(ValueError):
            calls.addresses_of(bad)


def test_timeout_text_says_the_time_waited_and_when_an_append_may_have_happened():
    t = calls.timeout_text("tcp://h:1", "append", 2.04, 2, False)
    assert "in 2.0 s (2 attempts)" in t and "may or may not have been applied" in t
    assert "may or may not" not in calls.timeout_text("tcp://h:1", "get", 2.0, 1, True)


def test_a_flow_asks_what_it_needs_and_can_be_told_of_errors():
    flow = calls.size_flow("c")
    step = next(flow)
    assert step == calls.Call("head", {"context": "c"})
    with pytest.raises(StopIteration) as stop:
        flow.throw(NotFound("no such context"))
    assert stop.value.value == 0  # NOT_FOUND is an empty context here
    flow = calls.consistency_flow("c", 1, 2, b"\x00" * 32)
    next(flow)
    with pytest.raises(IntegrityError, match="not the one you know"):
        flow.send({"context": "c", "first": 1, "second": 2, "first_root": b"\x01" * 32,
                   "second_root": b"\x02" * 32, "proof": []})
