"""What both reference clients share without I/O (protocol/calls.py): replies matched to requests,
what a socket monitor says about a connection, addresses, and a flow driven by hand."""

from __future__ import annotations

import msgpack
import pytest

from protocol import calls
from protocol.errors import IntegrityError, NotFound

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
