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


# -- the second level (sync_digest) ----------------------------------------------------------


def test_fine_buckets_fixed_values_and_their_top_bucket():
    # mmh3_32(b"notes") = 909338798: fine bucket 909338798 % 32768 = 26798, whose top is 46
    assert digest.bucket_of(b"notes", digest.FINE) == 909338798 % 32768 == 26798
    assert 26798 % digest.NBUCKETS == 46 and 26798 in digest.fine_buckets(46)
    assert digest.fine_buckets(46)[:3] == [46, 174, 302] and len(digest.fine_buckets(46)) == digest.SUB == 256


def _ledger_with(names: list[str], seed: int):
    from node.ledger import Ledger
    from node.storage import MemoryKV
    from protocol import codec

    rng = random.Random(seed)
    led = Ledger(MemoryKV(), node_id="n1", sync_meta=False)
    for name in names:
        for _ in range(rng.randrange(1, 4)):
            led.append(codec.Append(name, "", rng.randbytes(4), {}))
    return led


def test_a_ledgers_fine_digest_adds_up_to_its_top_digest_and_its_indexes_match_a_scan():
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    names = [f"ctx-{rng.randrange(10**9)}" for _ in range(3000)]
    led = _ledger_with(names, seed)
    tops = led.digest(digest.NBUCKETS)
    for b, raw in zip(range(digest.NBUCKETS), led.fine_digest(range(digest.NBUCKETS)), strict=True):
        values = digest.decode(raw, digest.SUB)
        acc = 0
        for v in values or []:
            acc ^= v
        assert acc == tops[b]
    fine = sorted({digest.bucket_of(n.encode(), digest.FINE) for n in names})[:5]
    want = sorted(n for n in set(names) if digest.bucket_of(n.encode(), digest.FINE) in fine)
    heads, more = led.heads_in_buckets(set(fine), digest.FINE, None, 10_000)
    assert [h[0] for h in heads] == want and not more
    page, more = led.heads_in_buckets(set(fine), digest.FINE, want[0], 2)
    assert [h[0] for h in page] == want[1:3] and more == (len(want) > 3)
    assert led.names_in_buckets(set(fine), digest.FINE, None, want[1], writer="n1") == want[:2]
    # a context set aside (a fork) leaves both levels
    led.digest(digest.NBUCKETS)
    gone = want[0]
    led.set_aside(gone, "n1", replace=False)
    tops = led.digest(digest.NBUCKETS)
    b = digest.bucket_of(gone.encode())
    values = digest.decode(led.fine_digest([b])[0], digest.SUB) or []
    acc = 0
    for v in values:
        acc ^= v
    assert acc == tops[b]
    assert gone not in [h[0] for h in led.heads_in_buckets(set(fine), digest.FINE, None, 10_000)[0]]
