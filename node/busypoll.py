"""Adaptive busy-polling: after serving requests, spin briefly before sleeping in poll.

A client with one request in flight sends its next request a few tens of microseconds
after it reads the reply. If the loop has gone to sleep in `zmq_poll` by then, the
request pays for waking the thread, and on a virtual machine for waking an idle CPU:
measured here, a lone append took ~160 us through a sleeping node and ~90 us through
one that was still polling. So for a short window after each burst of requests the
loop polls with a zero timeout instead of sleeping (never past its next deadline: a
flush or an ack due runs on time).

Spinning holds a core for the window, which pays only when the next request comes
within it. A window that ends with nothing arrived is a miss, judged by how late the
next request comes: within `NEAR_MISS` windows it was a near miss (a client warming up
after a pause, or one that sends just slower than the window), which counts half; later,
it was wasted (a client that sends now and then). Measured: a back-to-back client on an
idle machine misses ~0.05% of windows. Past `MISS_RATE_OFF` (an exponentially weighted
average: seven wasted windows in a row, or about 14 near ones) spinning stops for
`COOLDOWN_S`; after that it starts again when `REARM` requests in a row each arrive
within one window of the previous burst (a command-line call of two requests does not
re-arm it).

A client that sends just inside the window (a steady 2,000 appends/s against a 500 us
window) is caught every time, so none of the above stops the spin, and the loop spins the
whole gap between requests: 83% of a core against 29% without spinning (issue #17). So the
spin also has a CPU budget: over the last second, at most `budget_pct` percent of a core is
spent spinning (a sliding window of slots of 1/`SLOTS_PER_S` s, each spin remembered for at
least a second; a spin is cut short when the budget runs out, and the loop sleeps in poll
until enough of the window has passed).
Time spinning is measured on the loop's own clock (wall time from the first turn of a spin
to its last): it counts time given away in `sched_yield` too, so it is never less than the
CPU the spin used. `budget_pct` 100 is no budget (the spin before issue #17).

Off by default (`--busy-poll-us 0`), since issue #17: measured (docs/benchmarks.md, "Busy-poll
budget"), a budget that keeps a steady 2,000/s client's node CPU within 1.3x of the figure
without spinning (10%) keeps little of the latency win under sustained load (p50 ~200 -> ~180 us,
against ~80 us unbounded); the win comes back only with a budget near the whole gap between
requests, which is the cost the issue is about. So spinning is for an operator who can spare
the CPU: `SUGGESTED_WINDOW_US` with the default budget speeds up bursts of one-at-a-time
requests (the budget's second holds 100 ms of spin) at a bounded cost; budget 100 keeps the
whole win on a core the node has to itself.

Pure logic on a clock the caller passes in; the loop (`node/server.py`) polls.
"""

from __future__ import annotations

from typing import Any

DEFAULT_WINDOW_US = 0  # off (issue #17; see above)
SUGGESTED_WINDOW_US = 500  # when turning it on: a one-at-a-time client's next request comes within it
MISS_WEIGHT = 1 / 64  # weight of the newest window in the miss rate
MISS_RATE_OFF = 0.1  # above this share of empty windows, spinning stops ...
COOLDOWN_S = 0.2  # ... for at least this long
NEAR_MISS = 1.5  # a request within this many windows of the last one made the miss a near one
REARM = 3  # requests in a row a window would have caught, to start spinning again
DEFAULT_BUDGET_PCT = 10  # share of one core the spin may use over any second (100: no budget)
SLOTS_PER_S = 10  # the budget's sliding window is kept in slots of 1/SLOTS_PER_S s: ...
BUDGET_SLOTS = SLOTS_PER_S + 1  # ... the current one and a second's worth before it
MIN_SPIN_S = 5e-6  # a spin the budget would end sooner than this is not started


class SpinBudget:
    """Seconds spent spinning over the last 1.0-1.1 s (BUDGET_SLOTS slots), against a cap.

    A spin counts in the sum until the slot it ended in is more than SLOTS_PER_S slots old,
    so for at least a second: any second's spinning is in the sum at that second's end, and a
    spin never starts past what is left, so no second holds more than the cap (to the loop's
    last turn of a spin, a few microseconds, and the clock's rounding)."""

    def __init__(self, budget_pct: int) -> None:
        self.pct = budget_pct
        self.cap = budget_pct / 100.0  # seconds per second
        self.unlimited = budget_pct >= 100
        self.slots = [0.0] * BUDGET_SLOTS
        self.slot = 0  # index of the newest slot: the slot number (time * SLOTS_PER_S) it holds ...
        self.slot_no = 0  # ... is this one
        self.total = 0.0  # sum of the slots
        self.runouts = 0  # times a spin was refused or cut short for want of budget
        self.dry = False  # the budget ran out and has not refilled since (one runout per episode)

    def _advance(self, now: float) -> None:
        no = int(now * SLOTS_PER_S)  # (not now // 0.1: 1.0 // 0.1 is 9.0)
        gap = no - self.slot_no
        if gap <= 0:
            return  # (a clock read a little earlier by the caller: the newest slot still counts)
        if gap >= BUDGET_SLOTS:
            self.slots = [0.0] * BUDGET_SLOTS
            self.total = 0.0
            self.slot = 0
        else:
            for _ in range(gap):
                self.slot = (self.slot + 1) % BUDGET_SLOTS
                self.total -= self.slots[self.slot]
                self.slots[self.slot] = 0.0
            if self.total < 1e-12:
                self.total = 0.0  # (float drift)
        self.slot_no = no

    def left(self, now: float) -> float:
        """Seconds of spinning allowed from `now` (inf without a budget)."""
        if self.unlimited:
            return float("inf")
        self._advance(now)
        left = self.cap - self.total
        if left >= MIN_SPIN_S:
            self.dry = False
            return left
        if not self.dry:
            self.dry = True
            self.runouts += 1
        return 0.0

    def spend(self, seconds: float, now: float) -> None:
        self._advance(now)
        self.slots[self.slot] += seconds
        self.total += seconds
        if not self.unlimited and self.cap - self.total < MIN_SPIN_S and not self.dry:
            self.dry = True  # a spin cut short by the budget
            self.runouts += 1

    def spent_share(self, now: float) -> float:
        """Share of one core spent spinning over the last second (1.0-1.1 s: the window's length)."""
        self._advance(now)
        return self.total


class BusyPoll:
    def __init__(self, window_us: int, budget_pct: int = DEFAULT_BUDGET_PCT) -> None:
        self.window = window_us / 1e6
        self.budget = SpinBudget(budget_pct)
        # the operator's choice (--busy-poll-us 0 or --busy-poll-budget 0 turns it off)
        self.enabled = window_us > 0 and budget_pct > 0
        self.active = self.enabled  # the adaptive state
        self.until = 0.0  # end of the current window; no spin once the clock is past it
        self.last = float("-inf")  # when the last burst of requests was served
        self.off_until = 0.0  # no restart before this
        self.miss_rate = 0.0
        self.judge_next = False
        self.close_in_row = 0  # while off: requests in a row a window would have caught
        self.hits = 0
        self.misses = 0
        self.stops = 0
        self.spun_s = 0.0

    def should_spin(self, now: float) -> bool:
        return self.active and now < self.until and self.budget.left(now) > 0

    def spin_end(self, now: float) -> float:
        """When a spin starting at `now` must end: the window's end, or sooner if the budget
        runs out first."""
        return min(self.until, now + self.budget.left(now))

    def served(self, now: float) -> None:
        """A burst of requests was answered at `now`: open a window."""
        self.last = now
        if self.active:
            self.until = now + self.window

    def spun(self, started: float, now: float, hit: bool | None) -> None:
        """A spin that began at `started` ended at `now`: with a request (`hit`), with the
        window run out (a miss), or with another event or a deadline (None: no verdict)."""
        self.spun_s += now - started
        self.budget.spend(now - started, now)
        if hit:
            self.hits += 1
            self.miss_rate -= self.miss_rate * MISS_WEIGHT
            # a miss still waiting for its verdict is left unjudged: the next request came
            # in a later window, and a request after it must not be charged for that miss
            self.judge_next = False
        elif hit is not None:
            self.misses += 1
            self.until = 0.0
            self.judge_next = True  # how late the next request comes tells what the miss was

    def arrived(self, now: float) -> None:
        """A request arrived while the loop slept (after a miss, or with spinning off)."""
        gap = now - self.last
        if self.judge_next:
            self.judge_next = False
            cost = 0.5 if gap <= NEAR_MISS * self.window else 1.0
            self.miss_rate += (cost - self.miss_rate) * MISS_WEIGHT
            if self.active and self.miss_rate > MISS_RATE_OFF:
                self.active = False
                self.off_until = now + COOLDOWN_S
                self.stops += 1
                self.close_in_row = 0
        elif self.enabled and not self.active and now >= self.off_until:
            self.close_in_row = self.close_in_row + 1 if gap <= self.window else 0
            if self.close_in_row >= REARM:
                self.active = True
                self.miss_rate = 0.0

    def status(self, now: float) -> dict[str, Any]:
        return {
            "busy_poll": {
                "window_us": round(self.window * 1e6),
                "active": self.active,
                "hits": self.hits,
                "misses": self.misses,
                "stops": self.stops,
                "spun_ms": round(self.spun_s * 1000, 1),
                "budget_pct": self.budget.pct,
                "spent_pct_last_s": round(self.budget.spent_share(now) * 100, 1),
                "budget_runouts": self.budget.runouts,
            }
        }
