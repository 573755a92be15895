"""The adaptive busy-poll window, stepped on a hand-driven clock."""

from __future__ import annotations

import pytest

from node.busypoll import COOLDOWN_S, NEAR_MISS, REARM, BusyPoll

pytestmark = pytest.mark.timeout(10)

W = 500e-6  # the window of BusyPoll(500), in seconds


def miss(b: BusyPoll, t: float, next_after: float) -> float:
    """Serve at t, spin a whole window for nothing, the next request comes `next_after` later."""
    b.served(t)
    if b.should_spin(t):  # (once spinning has stopped there is no window to miss)
        b.spun(t, t + W, hit=False)
    b.arrived(t + next_after)
    return t + next_after


def test_zero_window_never_spins_and_never_turns_on():
    b = BusyPoll(0)
    b.served(1.0)
    assert not b.should_spin(1.0)
    b.arrived(1.0 + W / 10)  # a request right after the last one
    b.served(1.0 + W / 10)
    assert not b.should_spin(1.0 + W / 10) and b.status()["busy_poll"]["active"] is False


def test_a_window_opens_after_serving_and_closes_after_its_length():
    b = BusyPoll(500)
    assert not b.should_spin(0.0)  # nothing served yet
    b.served(1.0)
    assert b.should_spin(1.0) and b.should_spin(1.0 + W * 0.99)
    assert not b.should_spin(1.0 + W * 1.01)


def test_a_miss_closes_the_window_at_once():
    b = BusyPoll(500)
    b.served(1.0)
    b.spun(1.0, 1.0 + W, hit=False)
    assert not b.should_spin(1.0)  # even with the clock read before the end
    assert (b.hits, b.misses) == (0, 1)


def test_wasted_windows_in_a_row_stop_spinning_for_the_cooldown():
    b = BusyPoll(500)
    t = 1.0
    for _ in range(6):  # a client sending every 5 ms: each window is wasted
        t = miss(b, t, 0.005)
    assert b.active  # six are not enough ...
    t = miss(b, t, 0.005)
    assert not b.active and b.stops == 1  # ... seven are
    b.served(t)
    assert not b.should_spin(t)
    # within the cooldown, even back-to-back requests leave it off
    b.arrived(t + W / 10)
    assert not b.active
    # after it, requests in a row that a window would have caught turn it back on
    t += COOLDOWN_S
    for _ in range(REARM - 1):
        b.served(t)
        t += W / 2
        b.arrived(t)
    assert not b.active  # (a command-line call, a ping then an append, is not enough)
    b.served(t)
    t += W / 2
    b.arrived(t)
    assert b.active and b.miss_rate == 0.0
    b.served(t)
    assert b.should_spin(t)


def test_after_the_cooldown_requests_far_apart_leave_it_off():
    b = BusyPoll(500)
    t = 1.0
    for _ in range(7):
        t = miss(b, t, 0.005)
    assert not b.active
    t += COOLDOWN_S
    for _ in range(5):
        b.served(t)
        t += 0.001  # a client sending once a millisecond: a window would not catch it
        b.arrived(t)
    assert not b.active


def test_a_few_near_misses_do_not_stop_spinning_but_many_do():
    # a client warming up after a pause sends just after the window ends: the window was
    # short, not wasted, and counts half
    b = BusyPoll(500)
    t = 1.0
    for _ in range(14):
        t = miss(b, t, W * (NEAR_MISS - 0.1))
    assert b.active and b.stops == 0
    # a client that keeps sending just slower than the window wastes a quarter of its windows
    # or more: spinning would hold a core for little, so it stops
    for _ in range(200):
        if b.stops:
            break
        for _ in range(3):
            b.served(t)
            b.spun(t, t + W / 2, hit=True)
            t += W / 2
        t = miss(b, t, W * 1.1)
    assert b.stops >= 1


def test_an_event_that_is_not_a_request_gives_no_verdict():
    b = BusyPoll(500)
    b.served(1.0)
    b.spun(1.0, 1.0 + W / 4, hit=None)  # a finished write, a peer's message, a deadline
    assert (b.hits, b.misses) == (0, 0) and b.spun_s == pytest.approx(W / 4)
    assert b.should_spin(1.0 + W / 2)  # the window is still open
    b.arrived(1.0 + 0.01)  # and nothing is judged by the next request
    assert b.miss_rate == 0.0


def test_hits_between_misses_keep_the_rate_low():
    b = BusyPoll(500)
    t = 1.0
    for _ in range(20):
        for _ in range(20):  # 20 caught requests ...
            b.served(t)
            b.spun(t, t + W / 10, hit=True)
            t += W / 10
        t = miss(b, t, 0.005)  # ... then one wasted window: ~5%
    assert b.active and b.stops == 0 and (b.hits, b.misses) == (400, 20)


def test_status_reports_the_time_spent_spinning():
    b = BusyPoll(250)
    b.served(0.0)
    b.spun(0.0, 0.0002, hit=True)
    b.spun(0.0002, 0.00025, hit=False)
    s = b.status()["busy_poll"]
    assert s == {"window_us": 250, "active": True, "hits": 1, "misses": 1, "stops": 0, "spun_ms": 0.2}


def test_a_miss_followed_by_a_hit_in_a_later_window_is_not_charged_to_a_later_request():
    # sync mode: a reply held for the disk opens a new window before the request after the
    # miss came through a sleeping poll (found by a review helper)
    b = BusyPoll(500)
    b.served(1.0)
    b.spun(1.0, 1.0005, hit=False)
    b.served(1.002)
    b.spun(1.002, 1.00205, hit=True)
    b.served(1.0021)
    b.arrived(1.0022)  # 100 us after the last burst
    assert b.miss_rate == 0.0
