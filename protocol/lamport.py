"""The Lamport clock, and the reservation rule that keeps it monotonic across crashes.

The clock itself is pure. Persistence works by reservation: the node stores a
value R on disk (synchronously) before it hands out any clock value above R,
and starts from R after a restart. Writing R ahead in big steps makes the
write rare (once per `RESERVE_STEP` ticks) while kill -9, or a machine crash,
can never make the clock go back.
"""

from __future__ import annotations

RESERVE_STEP = 100_000

# Every Lamport value a node stores, sends or accepts (in an entry, a heartbeat, a head) is at
# most MAX_LAMPORT: 2^64-1 passed validation once and made the next tick overflow the u64 of
# the leaf hash, so every later append failed, on every node it reached.
MAX_LAMPORT = (1 << 63) - 1
# A client's causal token (`after_lamport`) is honoured up to MAX_AFTER_LAMPORT, and a value
# received from elsewhere moves the clock at most to it (`observe`). Only the node's own ticks go
# past, and 2^62 of them remain (centuries at a billion appends a second): no input, whoever sent
# it, can use the clock up. Honest values stay far below: they grow by one per append. (A token
# above the bound is accepted, not refused: once some input moved clocks to the bound, honest
# clients pass tokens above it, taken from the entries they read.)
MAX_AFTER_LAMPORT = 1 << 62


class ClockExhausted(Exception):
    """The next tick would pass MAX_LAMPORT (only a clock record on disk written without the bounds gets here)."""


class LamportClock:
    __slots__ = ("value",)

    def __init__(self, value: int = 0) -> None:
        if value < 0:
            raise ValueError("a Lamport clock starts at 0 or more")
        self.value = value

    def peek(self, after: int | None = None, count: int = 1) -> int:
        """The value the `count`-th next tick would give (causally after `after`), changing
        nothing; raises ClockExhausted past MAX_LAMPORT, so a refused append moves no clock."""
        v = self.value
        if after is not None and after > v:
            v = after if after <= MAX_AFTER_LAMPORT else max(v, MAX_AFTER_LAMPORT)
        v += count
        if v > MAX_LAMPORT:
            raise ClockExhausted(f"the Lamport clock would pass {MAX_LAMPORT}")
        return v

    def tick(self, after: int | None = None) -> int:
        """A local event (an append), causally after `after` if given."""
        self.value = self.peek(after)
        return self.value

    def observe(self, other: int) -> None:
        """A clock value received from elsewhere: never fall behind it (up to MAX_AFTER_LAMPORT,
        so that what a peer or a disk says cannot use the clock up). Callers refuse values above
        MAX_LAMPORT at their edge, each answering its sender its own way."""
        if other > MAX_LAMPORT:
            raise ValueError(f"Lamport value {other} is above the ceiling {MAX_LAMPORT}")
        if other > MAX_AFTER_LAMPORT:
            other = MAX_AFTER_LAMPORT
        if other > self.value:
            self.value = other


def needs_reservation(next_value: int, reserved: int) -> bool:
    return next_value > reserved


def next_reservation(next_value: int) -> int:
    # capped, so that "below the reservation" (the append fast path) always means "in range"
    return min(next_value + RESERVE_STEP, MAX_LAMPORT)
