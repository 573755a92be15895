"""The per-client reply budget (node/clients.py), stepped by hand with fake trackers and a fake clock."""

from __future__ import annotations

import pytest

from node import clients
from node.clients import ReplyBudget
from node.sockets import TRACK_MIN

MIB = 1 << 20


class Tracker:
    def __init__(self) -> None:
        self.done = False


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def send(b: ReplyBudget, ident: bytes, n: int) -> Tracker | None:
    """What the server does with one reply: ask, then hand it over (with a tracker if told).
    None: dropped; a Tracker (already done when the reply was sent without one)."""
    how = b.admit(ident, n)
    if how == clients.DROP:
        return None
    t = Tracker()
    if how == clients.TRACK:
        b.sent(ident, n, t)
    else:
        t.done = True
        if n >= TRACK_MIN:
            b.sent(ident, n, None)
    return t


@pytest.mark.timeout(10)
def test_a_reader_is_never_cut_off_and_its_bytes_are_given_back() -> None:
    b = ReplyBudget(4 * MIB, clock=Clock())
    for _ in range(100):
        t = send(b, b"a", 3 * MIB)
        assert t is not None
        t.done = True  # written to the connection before the next one
    b.sweep()
    assert b.held == 0 and not b.clients and not b.cut
    assert b.status()["client_cutoffs"] == 0 and b.status()["client_replies_dropped"] == 0


@pytest.mark.timeout(10)
def test_a_client_that_does_not_read_is_cut_off_at_the_limit_and_its_requests_dropped() -> None:
    clock = Clock()
    b = ReplyBudget(4 * MIB, clock=clock)
    sent = [send(b, b"x", MIB) for _ in range(4)]
    assert all(t is not None for t in sent) and b.held == 4 * MIB
    assert send(b, b"x", MIB) is None  # past the limit: cut off, this reply dropped
    assert b"x" in b.cut
    assert b.drop_request(b"x")  # its next requests go unanswered...
    assert send(b, b"x", 10) is None  # ...and so does any reply still on its way
    assert b.held == 4 * MIB  # nothing more was queued
    # another client is not affected
    assert send(b, b"y", MIB) is not None
    st = b.status()
    assert st["client_cutoffs"] == 1 and st["clients_cut_off"] == 1 and st["client_replies_dropped"] == 3
    # it reads everything: served again once the retry time has passed
    for t in sent:
        assert t is not None
        t.done = True
    assert b.drop_request(b"x")  # not yet: RETRY_S since its last drop
    clock.now += clients.RETRY_S
    assert not b.drop_request(b"x")
    assert b"x" not in b.cut and send(b, b"x", MIB) is not None


@pytest.mark.timeout(10)
def test_one_reply_larger_than_the_limit_goes_when_nothing_is_outstanding() -> None:
    b = ReplyBudget(MIB, clock=Clock())
    assert send(b, b"x", 16 * MIB) is not None
    assert send(b, b"x", TRACK_MIN) is None  # the next counted one waits for the big one to be read
    assert send(b, b"x", 1) is None  # and, cut off, nothing more goes
    assert b.cutoffs == 1


@pytest.mark.timeout(10)
def test_a_full_reply_queue_cuts_off_and_a_still_stalled_client_is_cut_off_again() -> None:
    clock = Clock()
    b = ReplyBudget(MIB, clock=clock)
    b.refused(b"x")  # the ROUTER said EAGAIN: its queue is at SNDHWM
    assert b.drop_request(b"x")
    clock.now += clients.RETRY_S
    assert not b.drop_request(b"x")  # tried again (nothing tracked is outstanding)...
    b.refused(b"x")  # ...and its queue is still full
    assert b.drop_request(b"x") and b.cutoffs == 2 and b.dropped == 4


@pytest.mark.timeout(10)
def test_a_gone_client_is_forgotten() -> None:
    clock = Clock()
    b = ReplyBudget(MIB, clock=clock)
    t = send(b, b"x", MIB)
    assert send(b, b"x", MIB) is None
    assert t is not None
    t.done = True  # its connection closed: libzmq let go of the reply
    clock.now += clients.RETRY_S
    b.sweep()
    assert not b.clients and not b.cut and b.held == 0


@pytest.mark.timeout(10)
def test_mid_sized_replies_share_a_tracker_that_vouches_for_those_before_it() -> None:
    clock = Clock()
    b = ReplyBudget(4 * MIB, clock=clock)
    n = 10_000
    tracked = []
    for _ in range(100):  # ~1 MiB in all: a tracker every TRACK_EVERY bytes, not one per reply
        how = b.admit(b"x", n)
        assert how != clients.DROP
        t = Tracker() if how == clients.TRACK else None
        b.sent(b"x", n, t)
        if t is not None:
            tracked.append(t)
    assert 2 <= len(tracked) <= 100 * n // clients.TRACK_EVERY
    assert b.held == 100 * n
    tracked[-1].done = tracked[0].done = True
    b.sweep()  # the first is done; the last is done but waits its turn (in order)
    assert 0 < b.held < 100 * n
    for t in tracked:
        t.done = True
    b.sweep()  # all trackers done; the few untracked bytes after the last are taken as read
    assert b.held == 0 and not b.clients
    # small replies are not counted at all
    assert b.admit(b"y", TRACK_MIN - 1) == clients.SEND and b"y" not in b.clients


@pytest.mark.timeout(10)
def test_a_stalled_client_of_mid_sized_replies_is_cut_off_too() -> None:
    b = ReplyBudget(MIB, clock=Clock())
    sent = 0
    while b.admit(b"x", 10_000) != clients.DROP:
        b.sent(b"x", 10_000, Tracker() if b.clients[b"x"].uncovered + 10_000 >= clients.TRACK_EVERY else None)
        sent += 1
        assert sent < 1000
    b.sweep()
    assert b"x" in b.cut and b.held <= MIB


@pytest.mark.timeout(10)
def test_clients_allowed_keeps_the_storage_reserve() -> None:
    assert clients.clients_allowed(1024) == 1024 - clients.RESERVED_FDS
    assert clients.RESERVED_FDS > clients.STORAGE_FDS > 200


def test_junk_gate_refuses_a_junk_senders_large_requests_for_a_while_then_forgets_it() -> None:
    now = [100.0]
    gate = clients.JunkGate(clock=lambda: now[0])
    assert not gate.holds(b"a")
    gate.junk(b"a")
    assert gate.holds(b"a") and gate.holds(b"a") and not gate.holds(b"b")
    assert gate.status() == {"junk_connections": 1, "junk_refused_unread": 2}
    now[0] += clients.JUNK_HOLD_S
    assert not gate.holds(b"a")  # served again, and forgotten
    assert gate.status()["junk_connections"] == 0
    gate.junk(b"b")
    gate.junk(b"c")
    now[0] += clients.JUNK_HOLD_S / 2
    gate.junk(b"c")  # junk again: held from now on
    now[0] += clients.JUNK_HOLD_S / 2
    gate.sweep()
    assert set(gate.until) == {b"c"}  # the sweep bounds it to connections that sent junk lately
