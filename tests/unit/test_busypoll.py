"""The adaptive busy-poll window, stepped on a hand-driven clock."""

from __future__ import annotations

import pytest

import random

from node.busypoll import COOLDOWN_S, MIN_SPIN_S, NEAR_MISS, REARM, SLOTS_PER_S, BusyPoll, SpinBudget

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
    assert not b.should_spin(1.0 + W / 10) and b.status(1.0)["busy_poll"]["active"] is False


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
    s = b.status(0.0005)["busy_poll"]
    assert s == {"window_us": 250, "active": True, "hits": 1, "misses": 1, "stops": 0, "spun_ms": 0.2,
                 "budget_pct": 10, "spent_pct_last_s": 0.0, "budget_runouts": 0}


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


# -- the CPU budget (issue #17) ---------------------------------------------------------------


def steady_client(b: BusyPoll, t: float, seconds: float, gap: float, turnaround: float) -> float:
    """A client sending every `gap` s that the window catches: the node serves each request in
    `turnaround` s and spins until the next one comes (or as long as the loop lets it)."""
    end = t + seconds
    while t < end:
        b.served(t)
        if b.should_spin(t):
            stop = min(t + gap - turnaround, b.spin_end(t))
            b.spun(t, stop, hit=stop >= t + gap - turnaround or None)
        else:
            b.arrived(t + gap - turnaround)
        t += gap
    return t


def test_a_client_inside_the_window_gets_the_spin_only_up_to_the_budget():
    # 2,000 requests/s, each spin 360 us: unbounded that is 72% of a core (issue #17)
    b = BusyPoll(500, budget_pct=10)
    t = steady_client(b, 1.0, 3.0, gap=0.0005, turnaround=0.00014)
    assert b.budget.spent_share(t) <= 0.10 + 1e-9
    # over 3 s it spun at most 10% of the time (a second's spin is remembered for 1.0-1.1 s,
    # so it gets a little less)
    assert b.spun_s <= 3 * 0.10 + 1e-9, b.spun_s
    assert b.spun_s >= 3 * 0.10 / 1.1 - 0.01  # and it did spend what it had
    assert b.budget.runouts >= 3  # once per second at least: each second it runs dry
    assert b.hits > 0 and b.status(t)["busy_poll"]["budget_runouts"] == b.budget.runouts


def test_without_a_budget_the_same_client_spins_most_of_the_time():
    # what the budget prevents (and --busy-poll-budget 100 keeps: the spin before issue #17)
    b = BusyPoll(500, budget_pct=100)
    steady_client(b, 1.0, 3.0, gap=0.0005, turnaround=0.00014)
    assert b.spun_s > 3 * 0.7 and b.budget.runouts == 0


def test_a_spin_is_cut_short_where_the_budget_runs_out():
    b = BusyPoll(500, budget_pct=10)
    b.budget.spend(0.1 - 0.0002, 1.0)  # 200 us left of this second's 100 ms
    b.served(1.0)
    assert b.should_spin(1.0)
    assert b.spin_end(1.0) == pytest.approx(1.0002)  # not the window's end (1.0005)
    b.spun(1.0, 1.0002, hit=None)  # the loop stops there: no verdict, not a miss
    assert b.misses == 0 and b.budget.runouts == 1
    assert not b.should_spin(1.0002)
    assert b.budget.runouts == 1  # one run-out, however often it is asked while dry


def test_the_budget_refills_as_the_window_slides():
    b = BusyPoll(500, budget_pct=10)
    b.budget.spend(0.1, 1.0)  # all of it, in the slot 1.0-1.1 s
    b.served(1.05)
    assert not b.should_spin(1.05)
    # that slot is remembered until a whole second after its end: not at 2.0 s, nor at 2.099 s
    b.served(2.099)
    assert not b.should_spin(2.099)
    t = 2.1 + 1e-6
    b.served(t)
    assert b.should_spin(t + 0.0001) and b.budget.spent_share(t + 0.0001) == 0.0
    assert b.budget.runouts == 1


def test_spending_is_spread_over_slots_and_forgotten_after_a_second():
    budget = SpinBudget(10)
    for i in range(20):  # 5 ms every 50 ms for a second: 10% of it
        budget.spend(0.005, 2.025 + i * 0.05)
    assert budget.spent_share(2.99) == pytest.approx(0.10)
    assert budget.left(2.99) == 0.0 and budget.runouts == 1
    assert budget.spent_share(3.05) == pytest.approx(0.10)  # 2.0-2.1 s is still remembered ...
    assert budget.spent_share(3.15) == pytest.approx(0.09)  # ... until 3.1 s
    assert budget.left(3.15) == pytest.approx(0.01)
    assert budget.spent_share(10.0) == 0.0  # long idle: everything forgotten at once
    assert budget.left(10.0) == pytest.approx(0.1)


def test_no_second_holds_more_than_the_budget_whatever_the_spins():
    # spins of random lengths at random moments, each started only when the budget allows and
    # cut where it says: then every interval of one second holds at most the budget
    seed = 17
    rng = random.Random(seed)
    budget = SpinBudget(10)
    spins: list[tuple[float, float]] = []
    t = 5.0
    while t < 15.0:
        t += rng.choice((rng.uniform(0, 0.0005), rng.uniform(0, 0.05)))
        left = budget.left(t)
        if left > 0:
            length = min(rng.uniform(0, 0.03), left)
            budget.spend(length, t + length)
            spins.append((t, t + length))
            t += length
    for i in range(int(10 / 0.001)):  # every window [a, a + 1) with a on a 1 ms grid
        a = 5.0 + i * 0.001
        inside = sum(min(e, a + 1) - max(s, a) for s, e in spins if e > a and s < a + 1)
        assert inside <= 0.10 + 1e-9, (seed, a, inside)
    assert sum(e - s for s, e in spins) > 0.9  # (it did spin: ~10% of 10 s)


def test_a_spend_is_remembered_for_at_least_a_second():
    budget = SpinBudget(10)
    budget.spend(0.1, 1.0999)  # at the very end of a slot
    for t in (1.5, 2.0, 2.0998):
        assert budget.left(t) == 0.0, t
    assert budget.left(1.0999 + 1.0 + 1 / SLOTS_PER_S) == pytest.approx(0.1)


def test_a_sliver_of_budget_is_not_worth_a_spin():
    budget = SpinBudget(10)
    budget.spend(0.1 - MIN_SPIN_S / 2, 1.0)
    assert budget.left(1.0) == 0.0 and budget.runouts == 1


def test_budget_100_is_no_budget_and_0_turns_busy_polling_off():
    b = BusyPoll(500, budget_pct=100)
    b.budget.spend(5.0, 1.0)  # more than a second's worth (the test says so, the budget does not care)
    b.served(1.0)
    assert b.should_spin(1.0) and b.spin_end(1.0) == pytest.approx(1.0 + W)
    off = BusyPoll(500, budget_pct=0)
    off.served(1.0)
    assert not off.enabled and not off.should_spin(1.0)
    off.arrived(1.0 + W / 10)  # a request right after the last one
    off.served(1.0 + W / 10)
    assert not off.should_spin(1.0 + W / 10)


def test_status_reports_the_budget_and_the_share_spent_over_the_last_second():
    b = BusyPoll(500, budget_pct=20)
    b.served(5.0)
    b.spun(5.0, 5.03, hit=True)
    b.spun(5.2, 5.25, hit=True)
    s = b.status(5.3)["busy_poll"]
    assert (s["budget_pct"], s["spent_pct_last_s"], s["budget_runouts"]) == (20, 8.0, 0)
    assert b.status(6.15)["busy_poll"]["spent_pct_last_s"] == 5.0  # (5.0-5.1 s is forgotten)
    assert b.status(7.0)["busy_poll"]["spent_pct_last_s"] == 0.0
