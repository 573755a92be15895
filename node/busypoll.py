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

Pure logic on a clock the caller passes in; the loop (`node/server.py`) polls.
"""

from __future__ import annotations

from typing import Any

DEFAULT_WINDOW_US = 500
MISS_WEIGHT = 1 / 64  # weight of the newest window in the miss rate
MISS_RATE_OFF = 0.1  # above this share of empty windows, spinning stops ...
COOLDOWN_S = 0.2  # ... for at least this long
NEAR_MISS = 1.5  # a request within this many windows of the last one made the miss a near one
REARM = 3  # requests in a row a window would have caught, to start spinning again


class BusyPoll:
    def __init__(self, window_us: int) -> None:
        self.window = window_us / 1e6
        self.enabled = window_us > 0  # the operator's choice (--busy-poll-us 0 turns it off)
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
        return self.active and now < self.until

    def served(self, now: float) -> None:
        """A burst of requests was answered at `now`: open a window."""
        self.last = now
        if self.active:
            self.until = now + self.window

    def spun(self, started: float, now: float, hit: bool | None) -> None:
        """A spin that began at `started` ended at `now`: with a request (`hit`), with the
        window run out (a miss), or with another event or a deadline (None: no verdict)."""
        self.spun_s += now - started
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

    def status(self) -> dict[str, Any]:
        return {
            "busy_poll": {
                "window_us": round(self.window * 1e6),
                "active": self.active,
                "hits": self.hits,
                "misses": self.misses,
                "stops": self.stops,
                "spun_ms": round(self.spun_s * 1000, 1),
            }
        }
