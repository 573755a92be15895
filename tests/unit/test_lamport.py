"""protocol.lamport: the clock never goes back, and the reservation rule that persists it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.lamport import (
    MAX_AFTER_LAMPORT,
    MAX_LAMPORT,
    RESERVE_STEP,
    ClockExhausted,
    LamportClock,
    needs_reservation,
    next_reservation,
)

pytestmark = pytest.mark.timeout(60)


def test_starts_at_zero_or_the_given_value_and_refuses_negative():
    assert LamportClock().value == 0
    assert LamportClock(41).value == 41
    with pytest.raises(ValueError):
        LamportClock(-1)


def test_tick_increments_and_returns_the_new_value():
    c = LamportClock()
    assert [c.tick() for _ in range(3)] == [1, 2, 3]
    assert c.value == 3


def test_tick_after_is_strictly_greater_than_after_and_than_the_clock():
    c = LamportClock(10)
    assert c.tick(after=100) == 101  # jumps past a causal token ahead of us
    assert c.value == 101
    assert c.tick(after=5) == 102  # an older token never takes us back
    assert c.tick(after=102) == 103  # equal to our clock: still strictly after
    assert c.tick(after=None) == 104


def test_observe_never_decreases_and_does_not_tick():
    c = LamportClock(50)
    c.observe(10)
    assert c.value == 50
    c.observe(50)
    assert c.value == 50
    c.observe(70)
    assert c.value == 70
    assert c.tick() == 71  # after observing x, the next local event is > x


@settings(max_examples=200, deadline=None, database=None)
@given(st.integers(0, 2**40), st.lists(st.tuples(st.sampled_from(["tick", "tick_after", "observe"]),
                                                 st.integers(0, 2**40)), max_size=40))
def test_random_events_keep_the_lamport_rules(start, events):
    c = LamportClock(start)
    for kind, x in events:
        before = c.value
        if kind == "tick":
            v = c.tick()
            assert v == before + 1 == c.value
        elif kind == "tick_after":
            v = c.tick(after=x)
            assert v > x and v > before and v == c.value == max(before, x) + 1
        else:
            c.observe(x)
            assert c.value == max(before, x)


def test_reservation_rule():
    # a value may be handed out only if it is covered by the reservation on disk
    assert not needs_reservation(5, 10)
    assert not needs_reservation(10, 10)
    assert needs_reservation(11, 10)
    assert next_reservation(11) == 11 + RESERVE_STEP
    assert not needs_reservation(11, next_reservation(11))
    assert RESERVE_STEP > 1  # otherwise every tick would write to disk


@settings(max_examples=100, deadline=None, database=None)
@given(st.integers(0, 10**9), st.lists(st.integers(0, 3 * RESERVE_STEP), max_size=30))
def test_restart_from_the_reservation_never_goes_back(start, jumps):
    # Simulate the node: reserve before handing out a value above the reservation,
    # "crash" at any point and restart from the reservation.
    reserved = start
    clock = LamportClock(start)
    handed_out = []
    writes = 0
    for j in jumps:
        v = clock.value + 1 + (j if j % 2 else 0)
        if needs_reservation(v, reserved):
            reserved = next_reservation(v)
            writes += 1
        clock.tick(after=v - 1)
        assert clock.value == v <= reserved
        handed_out.append(v)
        # a crash here: the restarted clock is past everything handed out
        assert LamportClock(reserved).tick() > max(handed_out)
    assert writes <= len(jumps)


def test_plain_ticks_reserve_rarely():
    reserved, clock, writes = 0, LamportClock(), 0
    for _ in range(3 * RESERVE_STEP // 1000):
        for _ in range(1000):
            v = clock.value + 1
            if needs_reservation(v, reserved):
                reserved = next_reservation(v)
                writes += 1
            clock.tick()
    assert clock.value == 3 * RESERVE_STEP
    assert writes == 3  # once per RESERVE_STEP ticks


# -- the ceiling (issue #12: one value near 2^64 made every later append fail) -----------------


def test_no_received_value_can_use_the_clock_up():
    c = LamportClock(5)
    c.observe(MAX_LAMPORT)  # the most a peer or a disk may say
    assert c.value == MAX_AFTER_LAMPORT  # moved, but only to where 2^62 ticks remain
    for _ in range(1000):
        c.tick()
    assert c.tick(MAX_AFTER_LAMPORT) == MAX_AFTER_LAMPORT + 1001
    with pytest.raises(ValueError):
        c.observe(MAX_LAMPORT + 1)  # callers refuse it at their edge; reaching here is a bug
    assert c.value == MAX_AFTER_LAMPORT + 1001


def test_peek_changes_nothing_and_refuses_to_pass_the_ceiling():
    c = LamportClock(10)
    assert c.peek() == 11 and c.peek(100, 3) == 103 and c.value == 10
    c = LamportClock(MAX_LAMPORT - 2)  # only a clock record written without the bound starts here
    assert c.peek(None, 2) == MAX_LAMPORT
    with pytest.raises(ClockExhausted):
        c.peek(None, 3)
    assert c.value == MAX_LAMPORT - 2
    assert c.tick(MAX_LAMPORT) == MAX_LAMPORT - 1  # a token is no help past the bound: one tick
    with pytest.raises(ClockExhausted):
        c.tick(None)
        c.tick(None)
    assert c.value == MAX_LAMPORT


def test_a_token_above_the_bound_is_honoured_only_up_to_it():
    c = LamportClock(5)
    assert c.tick(MAX_LAMPORT) == MAX_AFTER_LAMPORT + 1  # not exhausted by one request
    assert c.tick(MAX_AFTER_LAMPORT + 7) == MAX_AFTER_LAMPORT + 2  # the clock is past the bound: +1
    assert c.peek(MAX_LAMPORT, 10) == MAX_AFTER_LAMPORT + 12


def test_the_reservation_never_passes_the_ceiling():
    assert next_reservation(MAX_LAMPORT - 5) == MAX_LAMPORT
    assert next_reservation(7) == 7 + RESERVE_STEP
