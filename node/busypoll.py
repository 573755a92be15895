"""Adaptive busy-polling: after serving requests, spin briefly before sleeping in poll.

A client with one request in flight sends its next request a few tens of microseconds
after it reads the reply. If the loop has gone to sleep in `zmq_poll` by then, the
request pays for waking the thread, and on a virtual machine for waking an idle CPU:
measured here, a lone append took ~160 us through a sleeping node and ~90 us through
one that was still polling. So for a short window after each burst of requests the
loop polls with a zero timeout instead of sleeping.

Spinning holds a core for the window, which pays only when the next request comes
within it and another core is free to run the client. Both show in one number, the
share of windows that end with nothing arrived (misses): about 0.2% for a client
sending back to back on an idle machine, every window for a client sending once a
millisecond, and ~15% when a CPU-bound process competes for the cores (the client
then waits for a core while the node spins on one). Past `MISS_RATE_OFF` (an
exponentially weighted average: seven misses in a row are enough) spinning stops
for `COOLDOWN_S`; after that it starts again when a request arrives within one window
of the previous burst, that is when a window would have caught it.

Pure logic on a clock the caller passes in; the loop (`node/server.py`) polls.
"""

from __future__ import annotations

from typing import Any

DEFAULT_WINDOW_US = 500
MISS_WEIGHT = 1 / 64  # weight of the newest window in the miss rate
MISS_RATE_OFF = 0.1  # above this share of empty windows, spinning stops ...
COOLDOWN_S = 0.2  # ... for at least this long
NEAR_MISS = 1.5  # a request within this many windows of the last one made the miss a near one


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

    def spun(self, started: float, now: float, hit: bool) -> None:
        """A spin that began at `started` ended at `now`, with an event (`hit`) or not."""
        self.spun_s += now - started
        if hit:
            self.hits += 1
            self.miss_rate -= self.miss_rate * MISS_WEIGHT
        else:
            self.misses += 1
            self.until = 0.0
            self.judge_next = True  # how late the next request comes tells what the miss was

    def arrived(self, now: float) -> None:
        """A request arrived while the loop slept (after a miss, or with spinning off)."""
        gap = now - self.last
        if self.judge_next:
            self.judge_next = False
            # A request just past the window (a client warming up after a pause) says the
            # window was a little short, not that spinning is wasted; later than that, it
            # was wasted: a client that sends now and then, or one waiting for a core.
            wasted = gap > NEAR_MISS * self.window
            self.miss_rate += (float(wasted) - self.miss_rate) * MISS_WEIGHT
            if self.active and self.miss_rate > MISS_RATE_OFF:
                self.active = False
                self.off_until = now + COOLDOWN_S
                self.stops += 1
        elif self.enabled and not self.active and now >= self.off_until and gap <= self.window:
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
