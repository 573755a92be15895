"""The anti-entropy digest nodes exchange in heartbeats (SPEC section 17.2).

A context's bucket is mmh3_32(name) mod `NBUCKETS`; its item is the first 8
bytes of SHA-256(0x03 || u16be(len(name)) || name || u64be(size) || root); a
bucket's value is the XOR of its contexts' items. XOR lets a node update one
context's contribution in O(1) and makes the digest independent of order.
"""

from __future__ import annotations

import hashlib

import mmh3

NBUCKETS = 128
# The second level (SPEC 17.2, `sync_digest`): a context's fine bucket is mmh3_32(name) mod FINE;
# its top bucket is that mod NBUCKETS (NBUCKETS divides FINE). Top bucket b holds the SUB fine
# buckets b, b + NBUCKETS, b + 2 x NBUCKETS, ... in that order.
FINE = 32768
SUB = FINE // NBUCKETS
DIGEST_PREFIX = b"\x03"


def bucket_of(name: bytes, nbuckets: int = NBUCKETS) -> int:
    return int(mmh3.hash(name, 0, signed=False)) % nbuckets


def fine_buckets(top: int) -> list[int]:
    """The fine buckets of top bucket `top`, in the order of a `sync_digest` reply."""
    return [top + NBUCKETS * k for k in range(SUB)]


def digest_item(name: bytes, size: int, root: bytes) -> int:
    h = hashlib.sha256(DIGEST_PREFIX + len(name).to_bytes(2, "big") + name + size.to_bytes(8, "big") + root)
    return int.from_bytes(h.digest()[:8], "big")


def encode(buckets: list[int]) -> bytes:
    return b"".join(b.to_bytes(8, "big") for b in buckets)


def decode(raw: bytes, nbuckets: int = NBUCKETS) -> list[int] | None:
    """Bucket values from a heartbeat's `digest`, or None when it is not nbuckets x 8 bytes."""
    if len(raw) != 8 * nbuckets:
        return None
    return [int.from_bytes(raw[i:i + 8], "big") for i in range(0, len(raw), 8)]


def differing(a: list[int], b: list[int]) -> list[int]:
    """The buckets whose values differ (the ones worth a sync_heads)."""
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
