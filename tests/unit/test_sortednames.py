"""node.sortednames.SortedNames against a plain sorted list, under random operations."""

from __future__ import annotations

import bisect
import os
import random

import pytest

from node import sortednames
from node.sortednames import SortedNames

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(sortednames, "LOAD", 4)  # splits and emptied chunks happen often


def test_it_behaves_as_a_sorted_list_under_random_adds_discards_and_pages(small_chunks):
    seed = int(os.environ.get("SEED", random.randrange(1 << 30)))
    print("seed", seed)
    rng = random.Random(seed)
    alphabet = ["a", "b", "é", "z", "\U0001f600", "\uffff"]  # above U+FFFF too: str order is code point order
    ref: list[str] = []
    names = SortedNames()
    for _ in range(3000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 4)))
        if rng.random() < 0.6:
            if name not in ref:
                bisect.insort(ref, name)
                names.add(name)
        else:
            if name in ref:
                ref.remove(name)
            names.discard(name)
        assert len(names) == len(ref)
        probe = rng.choice([None, name, "", "zz", "b"])
        start = 0 if probe is None else bisect.bisect_right(ref, probe)
        assert list(names.iter_from(probe)) == ref[start:]
        if probe is not None:
            assert list(names.iter_from(probe, inclusive=True)) == ref[bisect.bisect_left(ref, probe):]
        limit = rng.randrange(1, 6)
        assert names.page(probe, limit) == (ref[start:start + limit], start + limit < len(ref))
        assert (name in names) == (name in ref)
    assert sorted(ref, key=lambda s: s.encode()) == ref  # the order SPEC gives: UTF-8 bytes


def test_built_from_names_in_any_order_and_empty():
    assert list(SortedNames(["c", "a", "b"]).iter_from(None)) == ["a", "b", "c"]
    empty = SortedNames()
    assert list(empty.iter_from(None)) == [] and empty.page("x", 5) == ([], False) and "x" not in empty
    empty.discard("x")
    assert len(empty) == 0


def test_chunks_stay_bounded(small_chunks):
    names = SortedNames()
    for i in range(1000):
        names.add(f"{(i * 7919) % 1000:04d}")
    assert max(len(c) for c in names._chunks) <= 2 * sortednames.LOAD
    assert list(names.iter_from(None)) == [f"{i:04d}" for i in range(1000)]
