"""The context names in order, for paging: a sorted list cut into chunks.

One sorted Python list made each new name cost a move of every name after it: creating
1,000,000 contexts in random name order (UUIDs, a context per conversation) took 97 s of
insertion alone. Chunks of at most 2 x LOAD names make an insertion cost one bisect over the
chunks' last names and one insertion into a chunk, whatever the count (the idea of the
`sortedcontainers` package, kept to what the node needs: add, discard, in-order iteration
from a name, a page).

Order is Python's `str` order, which is the order of the names' code points and so of their
UTF-8 bytes (SPEC's order for listings).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

LOAD = 1000  # a chunk is split in two past 2 x LOAD names


class SortedNames:
    __slots__ = ("_chunks", "_maxes", "_len")

    def __init__(self, names: Iterable[str] = ()) -> None:
        ordered = sorted(names)
        self._chunks: list[list[str]] = [ordered[i:i + LOAD] for i in range(0, len(ordered), LOAD)]
        self._maxes: list[str] = [c[-1] for c in self._chunks]
        self._len = len(ordered)

    def __len__(self) -> int:
        return self._len

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        i = bisect.bisect_left(self._maxes, name)
        if i == len(self._maxes):
            return False
        chunk = self._chunks[i]
        j = bisect.bisect_left(chunk, name)
        return j < len(chunk) and chunk[j] == name

    def add(self, name: str) -> None:
        """Insert `name` (the caller knows it is not there yet)."""
        maxes, chunks = self._maxes, self._chunks
        if not chunks:
            chunks.append([name])
            maxes.append(name)
            self._len = 1
            return
        i = bisect.bisect_left(maxes, name)
        if i == len(maxes):
            i -= 1  # past every name: the last chunk grows
        chunk = chunks[i]
        bisect.insort(chunk, name)
        maxes[i] = chunk[-1]
        self._len += 1
        if len(chunk) > 2 * LOAD:
            chunks[i:i + 1] = [chunk[:LOAD], chunk[LOAD:]]
            maxes[i:i + 1] = [chunk[LOAD - 1], chunk[-1]]

    def discard(self, name: str) -> None:
        maxes, chunks = self._maxes, self._chunks
        i = bisect.bisect_left(maxes, name)
        if i == len(maxes):
            return
        chunk = chunks[i]
        j = bisect.bisect_left(chunk, name)
        if j == len(chunk) or chunk[j] != name:
            return
        del chunk[j]
        self._len -= 1
        if chunk:
            maxes[i] = chunk[-1]
        else:
            del chunks[i]
            del maxes[i]

    def iter_from(self, name: str | None, inclusive: bool = False) -> Iterator[str]:
        """The names after `name` (from it too, if `inclusive` and it is there), in order; all of
        them for None. Do not add or discard while iterating."""
        chunks = self._chunks
        if not chunks:
            return
        if name is None:
            i, j = 0, 0
        else:
            find = bisect.bisect_left if inclusive else bisect.bisect_right
            i = find(self._maxes, name)
            if i == len(chunks):
                return
            j = find(chunks[i], name)
        yield from chunks[i][j:] if j else chunks[i]
        for chunk in chunks[i + 1:]:
            yield from chunk

    def page(self, after: str | None, limit: int) -> tuple[list[str], bool]:
        """Up to `limit` names after `after`, and whether more follow."""
        out: list[str] = []
        it = self.iter_from(after)
        for name in it:
            if len(out) == limit:
                return out, True
            out.append(name)
        return out, False
