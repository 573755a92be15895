"""The Merkle tree over a context's log: hashing, roots, proofs, verification.

Theory of operation
-------------------
Leaves are entry hashes (see `protocol.entry.leaf_hash`, which starts with
0x00 and commits to the entry's seq). An inner node is
SHA-256(0x01 || left || right). The tree is Bitcoin-style: at every level an
odd last node is paired with itself; the top node of a single leaf is that
leaf. The published *root* of a log of n entries binds the size:
SHA-256(0x02 || u64be(n) || top node), and for n = 0, SHA-256(0x02 || u64be(0)).

Because leaves commit to their seq, the duplicated last node can never equal a
real neighbour, so the CVE-2012-2459 mutation ([a,b,c] versus [a,b,c,c]) gives
a different root; domain separation keeps a leaf from passing as an inner node.
Binding the size into the root means a proof can never be replayed at another
size (without it, the top node of [l0,l1,l2] is also that of [l0,l1,l2,l2], so
hash-only proofs for the phantom 4-leaf log would verify).

Node (level, index) covers leaves [index * 2**level, (index + 1) * 2**level).
It is *complete* in a log of size n when it lies entirely inside [0, n); a
complete node never changes as the log grows, so complete nodes are what we
persist. The nodes on the right edge of a log that is not a power of two are
partial and are recomputed from O(log n) complete nodes when needed.

The *peaks* of n are the complete nodes that tile [0, n) from the left, one
per set bit of n, largest first. The root of size n, and every proof, is
computed from peaks and their neighbours with O(log n) node look-ups and
O(log n) hashes, never a scan. This module does no I/O: callers pass a
`get(level, index) -> bytes` that reads complete nodes from wherever they live.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import ClassVar

from protocol.errors import IntegrityError

INNER_PREFIX = b"\x01"
ROOT_PREFIX = b"\x02"


def bind_root(size: int, tree_hash: bytes) -> bytes:
    """The published root: the tree hash bound to the size it covers."""
    return hashlib.sha256(ROOT_PREFIX + size.to_bytes(8, "big") + tree_hash).digest()


EMPTY_ROOT = bind_root(0, b"")

GetNode = Callable[[int, int], bytes]

_sha256 = hashlib.sha256


def inner_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(INNER_PREFIX + left + right).digest()


def peaks(n: int) -> list[tuple[int, int]]:
    """(level, index) of the complete nodes tiling [0, n), largest first."""
    out: list[tuple[int, int]] = []
    start = 0
    for level in range(n.bit_length() - 1, -1, -1):
        if n >> level & 1:
            out.append((level, start >> level))
            start += 1 << level
    return out


def root_at(n: int, get: GetNode) -> bytes:
    """Root of the first n leaves, from complete nodes only (its peaks)."""
    if n == 0:
        return EMPTY_ROOT
    return bind_root(n, tree_hash_at(n, get))


def tree_hash_at(n: int, get: GetNode) -> bytes:
    """The top node of the Bitcoin-style tree over the first n >= 1 leaves."""
    return _walk_edge(n, get, None)


def _edges(n: int, get: GetNode) -> dict[int, bytes]:
    """Hash of the last node at every level of a tree of n leaves (n > 0)."""
    edges: dict[int, bytes] = {}
    _walk_edge(n, get, edges)
    return edges


def _walk_edge(n: int, get: GetNode, edges: dict[int, bytes] | None) -> bytes:
    """Climb the right edge from the smallest peak; optionally record every level."""
    level = (n & -n).bit_length() - 1  # the smallest peak's level
    count = n >> level  # nodes at this level; odd by construction
    if edges is not None:
        # below the smallest peak the last node of each level is complete
        for low in range(level):
            edges[low] = get(low, (n >> low) - 1)
    edge = get(level, count - 1)
    while True:
        if edges is not None:
            edges[level] = edge
        if count == 1:
            return edge
        if count % 2 == 0:
            edge = inner_hash(get(level, count - 2), edge)
        else:
            edge = inner_hash(edge, edge)
        count = (count + 1) // 2
        level += 1


def _check_index(index: int, size: int) -> None:
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} outside a tree of size {size}")


def inclusion_path(index: int, size: int, get: GetNode) -> list[bytes]:
    """Sibling hashes from leaf `index` (0-based) up to the root of `size`.

    A node paired with itself contributes no hash: the verifier knows from
    (index, size) where that happens.
    """
    _check_index(index, size)
    edges = _edges(size, get)
    path: list[bytes] = []
    level = 0
    count = size
    idx = index
    while count > 1:
        if idx % 2 == 1:
            path.append(get(level, idx - 1))
        elif idx + 1 < count:
            sib = idx + 1
            complete = (sib + 1) << level <= size
            path.append(get(level, sib) if complete else edges[level])
        idx //= 2
        count = (count + 1) // 2
        level += 1
    return path


def root_from_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes:
    """The root that `path` proves `leaf` at `index` to be under, at `size`."""
    # index and size come with an untrusted proof: out of range is a bad proof, not a caller bug.
    if not 0 <= index < size:
        raise IntegrityError(f"inclusion proof names leaf {index} outside a tree of size {size}")
    node = leaf
    level = 0
    count = size
    idx = index
    used = 0
    while count > 1:
        if idx % 2 == 1 or idx + 1 < count:
            if used >= len(path):
                raise IntegrityError("inclusion proof is too short")
            sib = path[used]
            used += 1
            node = inner_hash(sib, node) if idx % 2 == 1 else inner_hash(node, sib)
        else:
            node = inner_hash(node, node)
        idx //= 2
        count = (count + 1) // 2
        level += 1
    if used != len(path):
        raise IntegrityError("inclusion proof is too long")
    return bind_root(size, node)


def verify_inclusion(
    leaf: bytes, index: int, size: int, path: Sequence[bytes], root: bytes
) -> None:
    """Raise IntegrityError unless `path` proves `leaf` at `index` under `root`."""
    if root_from_inclusion(leaf, index, size, path) != root:
        raise IntegrityError(f"inclusion proof for leaf {index} does not match the root of size {size}")


def _consistency_walk(first: int, second: int, fetch: Callable[[int, int], bytes]) -> list[bytes]:
    """Hashes of the nodes a consistency proof carries, in proof order.

    First the peaks of `first`; then, for every peak of `second`, the nodes
    that lie wholly beyond `first` needed to build it, depth first, left to
    right. Nodes wholly inside [0, first) are peaks of `first` already sent.
    """
    out = [fetch(level, index) for level, index in peaks(first)]

    def walk(level: int, index: int) -> None:
        lo = index << level
        hi = (index + 1) << level
        if hi <= first:
            return
        if lo >= first:
            out.append(fetch(level, index))
            return
        walk(level - 1, 2 * index)
        walk(level - 1, 2 * index + 1)

    for level, index in peaks(second):
        walk(level, index)
    return out


def consistency_proof(first: int, second: int, get: GetNode) -> list[bytes]:
    """Proof that the log of size `first` is a prefix of the log of size `second`."""
    if not 0 <= first <= second:
        raise ValueError(f"consistency needs 0 <= first <= second, got {first} and {second}")
    return _consistency_walk(first, second, get)


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> None:
    """Raise IntegrityError unless `proof` shows size `first` is a prefix of `second`."""
    if not 0 <= first <= second:
        raise IntegrityError(f"consistency needs 0 <= first <= second, got {first} and {second}")
    first_peaks = peaks(first)
    if len(proof) < len(first_peaks):
        raise IntegrityError("consistency proof is too short")
    known = {node: proof[i] for i, node in enumerate(first_peaks)}
    pos = len(first_peaks)

    def get_first(level: int, index: int) -> bytes:
        try:
            return known[(level, index)]
        except KeyError:
            raise IntegrityError("consistency proof does not fit its sizes") from None

    if root_at(first, get_first) != first_root:
        raise IntegrityError(f"consistency proof does not match the root of size {first}")

    def build(level: int, index: int) -> bytes:
        nonlocal pos
        lo = index << level
        hi = (index + 1) << level
        if hi <= first:
            return get_first(level, index)
        if lo >= first:
            if pos >= len(proof):
                raise IntegrityError("consistency proof is too short")
            pos += 1
            return proof[pos - 1]
        return inner_hash(build(level - 1, 2 * index), build(level - 1, 2 * index + 1))

    second_known = {node: build(*node) for node in peaks(second)}
    if pos != len(proof):
        raise IntegrityError("consistency proof is too long")
    if root_at(second, lambda lv, ix: second_known[(lv, ix)]) != second_root:
        raise IntegrityError(f"consistency proof does not match the root of size {second}")


class Frontier:
    """The last complete node of every level: enough to extend a tree and take its root.

    Appending a leaf costs one hash on average (amortised) and returns the
    newly completed nodes so the caller can persist them; `root()` costs
    O(log n) hashes and is cached until the next append.
    """

    __slots__ = ("size", "nodes", "_root")

    # The same work done faster elsewhere, where a node plugs it in (node/ledger.py: its C code,
    # node/_accel.c): `accel_extend(nodes, size, leaves, keep_from)` updates `nodes` in place and
    # returns what `extend` returns, `accel_root(nodes, size)` returns `root()`; either may return
    # None (not done there: done here). This module stays pure; its results are the same either way.
    accel_extend: ClassVar[Callable[[list[bytes], int, Sequence[bytes], int], list[tuple[int, int, bytes]] | None]
                           | None] = None
    accel_root: ClassVar[Callable[[list[bytes], int], bytes | None] | None] = None

    def __init__(self, size: int = 0, nodes: list[bytes] | None = None, root: bytes | None = None) -> None:
        self.size = size
        self.nodes: list[bytes] = nodes if nodes is not None else []
        self._root: bytes | None = root  # the caller vouches for it (a stored head), else computed

    @classmethod
    def load(cls, size: int, get: GetNode) -> Frontier:
        """Rebuild from persisted complete nodes with O(log n) look-ups."""
        nodes = [get(level, (size >> level) - 1) for level in range(size.bit_length())]
        return cls(size, nodes)

    def append(self, leaf: bytes, keep_from: int = 0) -> list[tuple[int, int, bytes]]:
        """Add a leaf; return every (level, index, hash) of level >= `keep_from`
        that became complete (the caller persists them)."""
        index = self.size
        done = [(0, index, leaf)] if keep_from == 0 else []
        nodes = self.nodes
        node = leaf
        level = 0
        while index % 2 == 1:
            # nodes[level] is still the previous complete node: our left sibling.
            parent = inner_hash(nodes[level], node)
            nodes[level] = node
            level += 1
            index //= 2
            node = parent
            if level >= keep_from:
                done.append((level, index, parent))
        if level < len(nodes):
            nodes[level] = node
        else:
            nodes.append(node)
        self.size += 1
        self._root = None
        return done

    def extend(self, leaves: Sequence[bytes], keep_from: int) -> list[tuple[int, int, bytes]]:
        """`append` of each leaf in turn (keep_from >= 1), in one call: a batch's hot loop."""
        fast = Frontier.accel_extend
        if fast is not None:
            out = fast(self.nodes, self.size, leaves, keep_from)
            if out is not None:
                self.size += len(leaves)
                self._root = None
                return out
        done: list[tuple[int, int, bytes]] = []
        nodes = self.nodes
        size = self.size
        sha = _sha256
        for leaf in leaves:
            index = size
            node = leaf
            level = 0
            while index & 1:
                parent = sha(INNER_PREFIX + nodes[level] + node).digest()
                nodes[level] = node
                level += 1
                index >>= 1
                node = parent
                if level >= keep_from:
                    done.append((level, index, parent))
            if level < len(nodes):
                nodes[level] = node
            else:
                nodes.append(node)
            size += 1
        self.size = size
        self._root = None
        return done

    def root(self) -> bytes:
        if self._root is None:
            fast = Frontier.accel_root
            root = fast(self.nodes, self.size) if fast is not None else None
            self._root = root if root is not None else root_at(self.size, self.get)
        return self._root

    def get(self, level: int, index: int) -> bytes:
        """A complete node that the frontier holds (the last one of its level)."""
        if level >= len(self.nodes) or index != (self.size >> level) - 1:
            raise KeyError((level, index))
        return self.nodes[level]

    def copy(self) -> Frontier:
        return Frontier(self.size, list(self.nodes))
