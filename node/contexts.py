"""The contexts a ledger serves, by name: a bounded cache over their `C` records.

A node may hold a million contexts; most are idle. The state of a context in RAM (its
`ContextState`: size, frontier, writer, hot tail) is made from its `C` record on first use and
kept in a least-recently-used cache of `capacity` contexts. Only a context with nothing in
flight may leave it (the ledger says which: `evictable`): one with entries or a head not on
disk yet, a hot tail, a digest update pending, damage being repaired. The cache is a soft bound:
when every context in it is busy it grows, and shrinks again as they settle.

Names removed during this run (a history set aside by a fork) are remembered, so that their
`C` record, still on disk until something replaces it, is not loaded back. So are, for a while,
names looked up and found nowhere: a catch-up asks for each new context twice (when it pulls it,
when it applies it) before creating it, and each look-up on disk cost ~5 us (5% of a catch-up of
many small contexts). Every context is created through `add`, which forgets that it was absent.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

DEFAULT_CAPACITY = 100_000
EVICT_SCAN = 64  # contexts looked at for each one let in, at most: a busy cache grows instead of stalling
MAX_ABSENT = 16_384  # names remembered as found nowhere (forgotten all at once past this)

S = TypeVar("S")


class ContextTable(Generic[S]):
    def __init__(self, load: Callable[[str], S | None], evictable: Callable[[S], bool],
                 admitted: Callable[[S], None], evicted: Callable[[S], None],
                 capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("the context cache holds at least one context")
        self._live: OrderedDict[str, S] = OrderedDict()
        self._load = load
        self._evictable = evictable
        self._admitted = admitted
        self._evicted = evicted
        self._gone: set[str] = set()
        self._absent: set[str] = set()  # looked up and found nowhere, since (see the module's docstring)
        self.capacity = capacity
        self.count = 0  # contexts served, loaded or not
        self.loads = 0  # contexts read from storage into the cache
        self.evictions = 0

    def get(self, name: str, default: S | None = None) -> S | None:
        live = self._live
        ctx = live.get(name)
        if ctx is not None:
            live.move_to_end(name)
            return ctx
        if name in self._gone or name in self._absent:
            return default
        ctx = self._load(name)
        if ctx is None:
            self._found_nowhere(name)
            return default
        self.loads += 1
        self._admit(name, ctx)
        return ctx

    def peek(self, name: str) -> S | None:
        """The context, from the cache or else read without being let in (listings, the scrub,
        heads for a peer: one look each, which must not push out what is in use)."""
        ctx = self._live.get(name)
        if ctx is not None or name in self._gone or name in self._absent:
            return ctx
        ctx = self._load(name)
        if ctx is None:
            self._found_nowhere(name)
        return ctx

    def _found_nowhere(self, name: str) -> None:
        if len(self._absent) >= MAX_ABSENT:
            self._absent.clear()
        self._absent.add(name)

    def __getitem__(self, name: str) -> S:
        ctx = self.get(name)
        if ctx is None:
            raise KeyError(name)
        return ctx

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __len__(self) -> int:
        return self.count

    @property
    def in_ram(self) -> int:
        """How many contexts are in the cache now."""
        return len(self._live)

    def cached(self, name: str) -> S | None:
        """The context if it is in the cache, without reading anything."""
        return self._live.get(name)

    def loaded(self) -> Iterator[S]:
        """The contexts in the cache (every context with anything in flight is among them)."""
        return iter(list(self._live.values()))

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._live))

    def keys(self) -> list[str]:
        return list(self._live)

    def items(self) -> list[tuple[str, S]]:
        """The (name, context) pairs in the cache (not every context served: see `count`)."""
        return list(self._live.items())

    def gone(self, name: str) -> bool:
        """Whether `name` was removed during this run (its `C` record is not to be served)."""
        return name in self._gone

    def values(self) -> Iterator[S]:
        return self.loaded()

    def add(self, name: str, ctx: S) -> None:
        """A context created now (or read at start-up), counted."""
        self.count += 1
        self._gone.discard(name)
        self._absent.discard(name)
        self._admit(name, ctx)

    def keep(self, name: str, ctx: S) -> None:
        """Let in a context read with `peek` that must stay in RAM (damage found in it)."""
        if name not in self._live:
            self._admit(name, ctx)

    def pop(self, name: str, default: S | None = None, gone: bool = True) -> S | None:
        """Remove `name` from what is served: with `gone`, its `C` record stays on disk until
        something replaces it and is not to be loaded back; else it never reached the disk."""
        ctx = self.get(name)
        if ctx is None:
            return default
        del self._live[name]
        if gone:
            self._gone.add(name)
        self.count -= 1
        self._evicted(ctx)
        return ctx

    def shrink(self, budget: int | None = None, room: int = 0) -> int:
        """Evict idle contexts, least recently used first, down to the capacity (less `room`);
        returns how many. A busy context looked at goes to the back (a second chance), so that
        the next call looks at others; at most `budget` contexts are looked at (all when None)."""
        live = self._live
        over = len(live) + room - self.capacity
        if over <= 0:
            return 0
        looks = len(live) if budget is None else min(len(live), budget)
        evictable, evicted = self._evictable, self._evicted
        out = 0
        while out < over and looks > 0:
            looks -= 1
            name = next(iter(live))
            ctx = live[name]
            if evictable(ctx):
                del live[name]
                evicted(ctx)
                out += 1
            else:
                live.move_to_end(name)
        self.evictions += out
        return out

    def _admit(self, name: str, ctx: S) -> None:
        # room is made before it goes in: the context just asked for is never the one evicted
        if len(self._live) >= self.capacity:
            self.shrink(EVICT_SCAN, room=1)
        self._live[name] = ctx
        self._admitted(ctx)
