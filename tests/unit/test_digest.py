"""The heartbeat digest (SPEC 17.2): buckets, items, XOR, encoding; fixed values for other languages."""

from __future__ import annotations

import random

import pytest

from protocol import digest
from protocol.merkle import EMPTY_ROOT

pytestmark = pytest.mark.timeout(30)


def test_fixed_values_other_implementations_can_check():
    # mmh3_32(b"notes", seed 0) = 909338798 (unsigned); 909338798 % 128 = 46
    assert digest.bucket_of(b"notes") == 46
    assert digest.bucket_of(b"abc") == 3017643002 % 128 == 122
    # first 8 bytes of SHA-256(03 0005 "notes" 0000000000000000 <root of the empty log>)
    assert digest.digest_item(b"notes", 0, EMPTY_ROOT) == 0x0EA13DD394A3CB0F


def test_xor_digest_is_order_independent_and_detects_any_change():
    rng = random.Random(7)
    ctxs = {f"c{i}".encode(): (rng.randrange(100), rng.randbytes(32)) for i in range(300)}

    def build(items):
        b = [0] * digest.NBUCKETS
        for name, (size, root) in items:
            b[digest.bucket_of(name)] ^= digest.digest_item(name, size, root)
        return b

    a = build(ctxs.items())
    assert build(reversed(list(ctxs.items()))) == a
    changed = dict(ctxs)
    changed[b"c42"] = (ctxs[b"c42"][0] + 1, ctxs[b"c42"][1])
    diff = digest.differing(a, build(changed.items()))
    assert diff == [digest.bucket_of(b"c42")]


def test_encode_decode_round_trip_and_bad_lengths():
    b = [random.Random(1).getrandbits(64) for _ in range(digest.NBUCKETS)]
    raw = digest.encode(b)
    assert len(raw) == 1024 and digest.decode(raw) == b
    assert digest.decode(raw[:-1]) is None and digest.decode(b"") is None
