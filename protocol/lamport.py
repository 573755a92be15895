"""The Lamport clock, and the reservation rule that keeps it monotonic across crashes.

The clock itself is pure. Persistence works by reservation: the node stores a
value R on disk (synchronously) before it hands out any clock value above R,
and starts from R after a restart. Writing R ahead in big steps makes the
write rare (once per `RESERVE_STEP` ticks) while kill -9, or a machine crash,
can never make the clock go back.
"""

from __future__ import annotations

RESERVE_STEP = 100_000


class LamportClock:
    __slots__ = ("value",)

    def __init__(self, value: int = 0) -> None:
        if value < 0:
            raise ValueError("a Lamport clock starts at 0 or more")
        self.value = value

    def tick(self, after: int | None = None) -> int:
        """A local event (an append), causally after `after` if given."""
        v = self.value
        if after is not None and after > v:
            v = after
        self.value = v + 1
        return self.value

    def observe(self, other: int) -> None:
        """A clock value received from elsewhere: never fall behind it."""
        if other > self.value:
            self.value = other


def needs_reservation(next_value: int, reserved: int) -> bool:
    return next_value > reserved


def next_reservation(next_value: int) -> int:
    return next_value + RESERVE_STEP
