"""protocol.merkle against a naive reference tree written here, from the spec alone.

The reference builds every level from the leaf list (an odd last node is paired
with itself, inner = SHA-256(0x01 || left || right), a single leaf is its own top
node) and binds the size: root = SHA-256(0x02 || u64be(n) || top node), and
SHA-256(0x02 || u64be(0)) for the empty log. The module under test must agree
with it for every size and prefix, its proofs must verify and every tampered
proof must fail with IntegrityError, and roots and proofs must cost O(log n)
hashes and node look-ups.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocol import merkle
from protocol.entry import leaf_hash
from protocol.errors import IntegrityError

pytestmark = pytest.mark.timeout(60)

FAST = settings(max_examples=20, deadline=None, database=None)

Node = tuple[int, int]


# -- the naive reference -----------------------------------------------------------


def sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def naive_inner(left: bytes, right: bytes) -> bytes:
    return sha(b"\x01" + left + right)


def naive_bind(n: int, top: bytes) -> bytes:
    return sha(b"\x02" + n.to_bytes(8, "big") + top)


NAIVE_EMPTY = naive_bind(0, b"")


def naive_levels(leaves: list[bytes]) -> list[list[bytes]]:
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        cur = levels[-1]
        nxt = []
        for i in range(0, len(cur), 2):
            right = cur[i + 1] if i + 1 < len(cur) else cur[i]
            nxt.append(naive_inner(cur[i], right))
        levels.append(nxt)
    return levels


def naive_top(leaves: list[bytes]) -> bytes:
    return naive_levels(leaves)[-1][0]


def naive_root(leaves: list[bytes]) -> bytes:
    if not leaves:
        return NAIVE_EMPTY
    return naive_bind(len(leaves), naive_top(leaves))


def naive_path(leaves: list[bytes], index: int) -> list[bytes]:
    path = []
    for level in naive_levels(leaves)[:-1]:
        if index % 2 == 1:
            path.append(level[index - 1])
        elif index + 1 < len(level):
            path.append(level[index + 1])
        index //= 2
    return path


def complete_nodes(leaves: list[bytes]) -> dict[Node, bytes]:
    """Every node of the tree that covers only real leaves (never changes as the log grows)."""
    n = len(leaves)
    out = {}
    for lv, level in enumerate(naive_levels(leaves) if leaves else []):
        for ix, h in enumerate(level):
            if (ix + 1) << lv <= n:
                out[(lv, ix)] = h
    return out


def getter(nodes: dict[Node, bytes], size: int) -> Callable[[int, int], bytes]:
    """A `get` over stored complete nodes that fails if asked for a node not complete at `size`."""

    def get(level: int, index: int) -> bytes:
        assert (index + 1) << level <= size, f"asked for partial node {(level, index)} at size {size}"
        return nodes[(level, index)]

    return get


def make_leaves(n: int, salt: bytes = b"") -> list[bytes]:
    return [sha(b"leaf" + salt + i.to_bytes(4, "big")) for i in range(n)]


def flip(b: bytes, pos: int = 0) -> bytes:
    return b[:pos] + bytes([b[pos] ^ 0x01]) + b[pos + 1 :]


# -- the reference itself is right on hand-computed trees --------------------------


def test_reference_matches_hand_computed_small_trees():
    a, b, c = (sha(x) for x in (b"a", b"b", b"c"))
    assert naive_root([]) == hashlib.sha256(b"\x02" + bytes(8)).digest()
    assert naive_top([a]) == a
    assert naive_root([a]) == hashlib.sha256(b"\x02" + (1).to_bytes(8, "big") + a).digest()
    assert naive_top([a, b]) == hashlib.sha256(b"\x01" + a + b).digest()
    ab = naive_inner(a, b)
    cc = naive_inner(c, c)
    assert naive_top([a, b, c]) == naive_inner(ab, cc)
    assert naive_root([a, b, c]) == naive_bind(3, naive_inner(ab, cc))


def test_constants_and_inner_hash_follow_the_spec():
    a, b = sha(b"a"), sha(b"b")
    assert merkle.EMPTY_ROOT == NAIVE_EMPTY
    assert merkle.inner_hash(a, b) == naive_inner(a, b)
    assert merkle.inner_hash(a, b) != merkle.inner_hash(b, a)
    # domain separation: an inner node is not the plain hash of the concatenation
    assert merkle.inner_hash(a, b) != sha(a + b)


# -- peaks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, expected",
    [(0, []), (1, [(0, 0)]), (2, [(1, 0)]), (3, [(1, 0), (0, 2)]), (6, [(2, 0), (1, 2)]),
     (7, [(2, 0), (1, 2), (0, 6)]), (8, [(3, 0)]), (13, [(3, 0), (2, 2), (0, 12)])],
)
def test_peaks_examples(n, expected):
    assert merkle.peaks(n) == expected


@FAST
@given(st.integers(min_value=0, max_value=1 << 40))
def test_peaks_tile_the_prefix_largest_first(n):
    ps = merkle.peaks(n)
    assert len(ps) == bin(n).count("1")
    start = 0
    for level, index in ps:
        assert index << level == start
        start += 1 << level
    assert start == n
    assert [lv for lv, _ in ps] == sorted({lv for lv, _ in ps}, reverse=True)


# -- roots: Frontier and root_at agree with the reference at every size -------------


@FAST
@given(st.integers(min_value=0, max_value=300), st.binary(max_size=4))
@example(300, b"")
@example(256, b"")
@example(257, b"x")
def test_frontier_root_matches_reference_at_every_size(n, salt):
    leaves = make_leaves(n, salt)
    f = merkle.Frontier()
    assert f.root() == NAIVE_EMPTY
    for i, leaf in enumerate(leaves):
        f.append(leaf)
        assert f.size == i + 1
        assert f.root() == naive_root(leaves[: i + 1]), f"size {i + 1}"


@FAST
@given(st.integers(min_value=0, max_value=300), st.binary(max_size=4))
@example(300, b"")
@example(256, b"")
@example(257, b"x")
def test_root_at_from_complete_nodes_matches_reference_for_every_prefix(n, salt):
    leaves = make_leaves(n, salt)
    nodes = complete_nodes(leaves)
    for m in range(n + 1):
        assert merkle.root_at(m, getter(nodes, m)) == naive_root(leaves[:m]), f"prefix {m} of {n}"


@FAST
@given(st.integers(min_value=1, max_value=300))
def test_root_at_needs_only_the_peaks(n):
    leaves = make_leaves(n)
    nodes = complete_nodes(leaves)
    only_peaks = {p: nodes[p] for p in merkle.peaks(n)}
    assert merkle.root_at(n, lambda lv, ix: only_peaks[(lv, ix)]) == naive_root(leaves)


@FAST
@given(st.integers(min_value=0, max_value=300), st.integers(min_value=0, max_value=4))
def test_frontier_append_returns_exactly_the_newly_complete_nodes(n, keep_from):
    leaves = make_leaves(n)
    full = complete_nodes(leaves)
    f = merkle.Frontier()
    seen: dict[Node, bytes] = {}
    for i, leaf in enumerate(leaves):
        done = f.append(leaf, keep_from=keep_from)
        got = {(lv, ix): h for lv, ix, h in done}
        assert len(got) == len(done), "a node was reported twice"
        # the nodes completed by leaf i are exactly those whose last leaf is i
        expected = {(lv, ix): h for (lv, ix), h in full.items() if (ix + 1) << lv == i + 1 and lv >= keep_from}
        assert got == expected, f"after leaf {i}"
        seen.update(got)
    assert seen == {k: v for k, v in full.items() if k[0] >= keep_from}


@FAST
@given(st.integers(min_value=0, max_value=100), st.lists(st.integers(min_value=0, max_value=40), max_size=5),
       st.integers(min_value=1, max_value=4))
def test_frontier_extend_is_append_of_each_leaf(start, chunks, keep_from):
    leaves = make_leaves(start + sum(chunks))
    one, many = merkle.Frontier(), merkle.Frontier()
    for leaf in leaves[:start]:
        one.append(leaf)
        many.append(leaf)
    i = start
    for c in chunks:
        want = [d for leaf in leaves[i:i + c] for d in one.append(leaf, keep_from=keep_from)]
        many.root()  # a cached root must not survive an extend
        assert many.extend(leaves[i:i + c], keep_from) == want
        i += c
        assert (many.size, many.nodes, many.root()) == (one.size, one.nodes, naive_root(leaves[:i]))


@FAST
@given(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=60))
def test_frontier_load_resumes_where_it_left_off(n, more):
    leaves = make_leaves(n + more)
    nodes = complete_nodes(leaves[:n])
    f = merkle.Frontier.load(n, getter(nodes, n))
    assert f.size == n
    assert f.root() == naive_root(leaves[:n])
    for i in range(n, n + more):
        f.append(leaves[i])
        assert f.root() == naive_root(leaves[: i + 1])


def test_frontier_copy_is_independent_and_root_cache_is_invalidated():
    leaves = make_leaves(5)
    f = merkle.Frontier()
    for leaf in leaves[:4]:
        f.append(leaf)
    r4 = f.root()
    g = f.copy()
    g.append(leaves[4])
    assert f.size == 4 and f.root() == r4 == naive_root(leaves[:4])
    assert g.size == 5 and g.root() == naive_root(leaves)
    f.append(leaves[4])  # the cached root of size 4 must not survive an append
    assert f.root() == naive_root(leaves)


def test_frontier_get_only_serves_the_last_complete_node_of_a_level():
    leaves = make_leaves(6)
    f = merkle.Frontier()
    for leaf in leaves:
        f.append(leaf)
    nodes = complete_nodes(leaves)
    assert f.get(0, 5) == nodes[(0, 5)]
    assert f.get(1, 2) == nodes[(1, 2)]
    assert f.get(2, 0) == nodes[(2, 0)]
    for bad in [(0, 4), (1, 1), (3, 0), (0, 6)]:
        with pytest.raises(KeyError):
            f.get(*bad)


# -- inclusion proofs ---------------------------------------------------------------


def check_inclusion_for_every_leaf(leaves: list[bytes]) -> None:
    n = len(leaves)
    levels = naive_levels(leaves)
    nodes = complete_nodes(leaves)
    root = naive_bind(n, levels[-1][0])
    get = getter(nodes, n)
    longer = leaves + make_leaves(n, b"more")
    other_roots = {size: naive_root(longer[:size]) for size in (n - 1, n + 1, 2 * n) if size > 0}
    for i, leaf in enumerate(leaves):
        path = merkle.inclusion_path(i, n, get)
        expected_path, idx = [], i
        for level in levels[:-1]:
            if idx % 2 == 1:
                expected_path.append(level[idx - 1])
            elif idx + 1 < len(level):
                expected_path.append(level[idx + 1])
            idx //= 2
        assert path == expected_path, f"path of {i} in {n}"
        assert merkle.root_from_inclusion(leaf, i, n, path) == root
        merkle.verify_inclusion(leaf, i, n, path, root)

        bad_cases: list[tuple[bytes, int, int, list[bytes], bytes]] = []
        for j, elem in enumerate(path):
            for pos in (0, 31):
                bad_cases.append((leaf, i, n, path[:j] + [flip(elem, pos)] + path[j + 1 :], root))
        bad_cases.append((flip(leaf), i, n, path, root))
        bad_cases.append((leaf, i, n, path, flip(root)))
        for other in (i - 1, i + 1, n, -1):  # wrong index, in range or not
            bad_cases.append((leaf, other, n, path, root))
        # Wrong size, checked against the root of that size, and against this root:
        # the root binds its size, so a proof never verifies at another size
        # (index 0 has the same path shape at sizes 11 and 12, for example).
        for size, other_root in other_roots.items():
            bad_cases.append((leaf, i, size, path, other_root))
            bad_cases.append((leaf, i, size, path, root))
        bad_cases.append((leaf, i, n, path + [leaf], root))  # extra element
        bad_cases.append((leaf, i, n, [leaf] + path, root))
        if path:
            bad_cases.append((leaf, i, n, path[:-1], root))  # missing element
            bad_cases.append((leaf, i, n, path[1:], root))
        if len(path) > 1:
            bad_cases.append((leaf, i, n, path[::-1], root))  # reordered
        if n > 1:
            bad_cases.append((leaves[i - 1], i, n, path, root))  # another leaf of the same log
        for case in bad_cases:
            with pytest.raises(IntegrityError):
                merkle.verify_inclusion(*case)


@pytest.mark.parametrize("n", range(1, 40))
def test_inclusion_every_leaf_small_sizes(n):
    check_inclusion_for_every_leaf(make_leaves(n))


@FAST
@given(st.integers(min_value=1, max_value=300), st.binary(max_size=4))
@example(300, b"")
@example(256, b"")
@example(257, b"x")
def test_inclusion_every_leaf_random_sizes(n, salt):
    check_inclusion_for_every_leaf(make_leaves(n, salt))


@FAST
@given(st.integers(min_value=1, max_value=300), st.data())
def test_inclusion_proof_of_a_prefix_uses_only_its_complete_nodes(n, data):
    # Nodes are stored for a longer log; the proof at an older size must still be right.
    extra = data.draw(st.integers(min_value=0, max_value=50))
    leaves = make_leaves(n + extra)
    nodes = complete_nodes(leaves)
    i = data.draw(st.integers(min_value=0, max_value=n - 1))
    path = merkle.inclusion_path(i, n, getter(nodes, n))
    assert path == naive_path(leaves[:n], i)
    merkle.verify_inclusion(leaves[i], i, n, path, naive_root(leaves[:n]))


def test_inclusion_path_refuses_an_index_outside_the_tree():
    nodes = complete_nodes(make_leaves(4))
    for index, size in [(4, 4), (-1, 4), (0, 0)]:
        with pytest.raises(ValueError):
            merkle.inclusion_path(index, size, getter(nodes, 4))


# -- consistency proofs -------------------------------------------------------------


class Log:
    """A leaf list with its stored complete nodes and the reference root of every prefix."""

    def __init__(self, leaves: list[bytes]) -> None:
        self.leaves = leaves
        self.n = len(leaves)
        self.nodes = complete_nodes(leaves)
        self.roots = [naive_root(leaves[:m]) for m in range(self.n + 1)]
        self.other = naive_root(make_leaves(self.n, b"other"))


def check_consistency(log: Log, m: int, tamper: bool = True) -> None:
    n = log.n
    r1, r2 = log.roots[m], log.roots[n]
    proof = merkle.consistency_proof(m, n, getter(log.nodes, n))
    merkle.verify_consistency(m, n, r1, r2, proof)
    if not tamper:
        return
    other = log.other
    bad: list[tuple[int, int, bytes, bytes, list[bytes]]] = []
    for j, elem in enumerate(proof):
        bad.append((m, n, r1, r2, proof[:j] + [flip(elem)] + proof[j + 1 :]))
    bad.append((m, n, r1, r2, proof + [r2]))  # extra element
    if proof:
        bad.append((m, n, r1, r2, proof[:-1]))  # missing element
        bad.append((m, n, r1, r2, proof[1:]))
    if len(proof) > 1:
        bad.append((m, n, r1, r2, proof[::-1]))  # reordered
    bad.append((m, n, flip(r1), r2, proof))
    bad.append((m, n, r1, flip(r2), proof))
    if r1 != r2:
        bad.append((m, n, r2, r1, proof))  # roots swapped
        bad.append((m, n, r2, r2, proof))
    if other != r2:
        bad.append((m, n, r1, other, proof))  # second root of a different log
    if m > 0:
        bad.append((m, n, other, r2, proof))
    if m != n:
        bad.append((n, m, r2, r1, proof))  # sizes swapped
    # Wrong sizes. From the empty log a proof is vacuous (it only shows the peaks of n
    # make r2), and a root does not commit to its size by itself: see
    # test_proofs_alone_do_not_bind_the_size_the_seq_in_the_leaf_does.
    wrong_sizes = [(m + 1, n), (m, n + 1), (m - 1, n), (m, n - 1)] if m > 0 else [(-1, n), (1, n)]
    for m2, n2 in wrong_sizes:
        bad.append((m2, n2, r1, r2, proof))
    for case in bad:
        with pytest.raises(IntegrityError):
            merkle.verify_consistency(*case)


def test_consistency_every_pair_up_to_64():
    for n in range(65):
        log = Log(make_leaves(n))
        for m in range(n + 1):
            check_consistency(log, m, tamper=n <= 24)


@FAST
@given(st.integers(min_value=0, max_value=300), st.binary(max_size=4))
@example(300, b"")
@example(256, b"")
@example(257, b"x")
def test_consistency_every_prefix_random_sizes(n, salt):
    log = Log(make_leaves(n, salt))
    for m in range(n + 1):
        check_consistency(log, m)


def test_consistency_shape_at_the_edges():
    leaves = make_leaves(16)
    nodes = complete_nodes(leaves)
    get = getter(nodes, 16)
    # m == n: just the peaks of n
    assert merkle.consistency_proof(13, 13, getter(nodes, 13)) == [nodes[p] for p in merkle.peaks(13)]
    # m == 0: the peaks of n, all beyond the empty log
    assert merkle.consistency_proof(0, 16, get) == [nodes[(4, 0)]]
    # powers of two: the old root is the left half
    assert merkle.consistency_proof(8, 16, get) == [nodes[(3, 0)], nodes[(3, 1)]]
    merkle.verify_consistency(0, 0, NAIVE_EMPTY, NAIVE_EMPTY, [])
    with pytest.raises(IntegrityError):
        merkle.verify_consistency(0, 0, NAIVE_EMPTY, NAIVE_EMPTY, [NAIVE_EMPTY])


def test_consistency_proof_refuses_bad_sizes_and_verify_calls_them_integrity_errors():
    nodes = complete_nodes(make_leaves(8))
    for first, second in [(5, 4), (-1, 4)]:
        with pytest.raises(ValueError):
            merkle.consistency_proof(first, second, getter(nodes, 8))
        with pytest.raises(IntegrityError):
            merkle.verify_consistency(first, second, NAIVE_EMPTY, NAIVE_EMPTY, [])


def test_consistency_rejects_a_forked_log():
    # Same size-5 prefix length but different content: the proof from the fork must not verify.
    a = make_leaves(10)
    b = a[:4] + make_leaves(6, b"fork")
    proof_b = merkle.consistency_proof(5, 10, getter(complete_nodes(b), 10))
    with pytest.raises(IntegrityError):
        merkle.verify_consistency(5, 10, naive_root(a[:5]), naive_root(b), proof_b)


# -- cost: O(log n) hashes and look-ups, never a scan --------------------------------


class Counter:
    def __init__(self) -> None:
        self.hashes = 0
        self.gets = 0


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> Counter:
    c = Counter()
    real = merkle.inner_hash

    def counting_inner(left: bytes, right: bytes) -> bytes:
        c.hashes += 1
        return real(left, right)

    monkeypatch.setattr(merkle, "inner_hash", counting_inner)
    return c


# A stand-in for the stored nodes of 2**20 leaves, computed on demand. Every leaf is
# the same, so that the node of level L is the same everywhere and costs nothing to
# compute (outside the patched inner_hash); the tree is nevertheless consistent, so
# proofs taken from it verify.
UNIFORM = [sha(b"uniform leaf")]
for _ in range(64):
    UNIFORM.append(naive_inner(UNIFORM[-1], UNIFORM[-1]))


def lazy_get(c: Counter, size: int) -> Callable[[int, int], bytes]:
    def get(level: int, index: int) -> bytes:
        assert (index + 1) << level <= size, f"asked for partial node {(level, index)} at size {size}"
        c.gets += 1
        return UNIFORM[level]

    return get


COST_SIZES = sorted(
    {1, 2, 3, 5, 1000, 4095, 4096, 4097, 65535, 65537, 699051, 2**19 + 1, 2**20 - 1, 2**20}
    | {2**k for k in range(0, 21, 3)}
)


def bound(n: int) -> int:
    return 4 * max(n, 1).bit_length() + 4


@pytest.mark.parametrize("n", COST_SIZES)
def test_root_at_costs_log_n(counter, n):
    merkle.root_at(n, lazy_get(counter, n))
    assert counter.gets <= bound(n) and counter.hashes <= bound(n), (counter.gets, counter.hashes)


@pytest.mark.parametrize("n", COST_SIZES)
def test_inclusion_costs_log_n(counter, n):
    root = merkle.root_at(n, lazy_get(counter, n))
    for index in sorted({0, n // 3, n // 2, max(n - 2, 0), n - 1}):
        counter.gets = counter.hashes = 0
        path = merkle.inclusion_path(index, n, lazy_get(counter, n))
        assert counter.gets <= bound(n) and counter.hashes <= bound(n), (index, counter.gets, counter.hashes)
        counter.hashes = 0
        merkle.verify_inclusion(UNIFORM[0], index, n, path, root)
        assert counter.hashes <= bound(n), (index, counter.hashes)


@pytest.mark.parametrize("n", COST_SIZES)
def test_consistency_costs_log_n(counter, n):
    r2 = merkle.root_at(n, lazy_get(counter, n))
    for m in sorted({0, 1, n // 2, n // 3 + 1, n - 1, n} & set(range(n + 1))):
        r1 = merkle.root_at(m, lazy_get(counter, m))
        counter.gets = counter.hashes = 0
        proof = merkle.consistency_proof(m, n, lazy_get(counter, n))
        assert counter.gets <= bound(n) and counter.hashes == 0, (m, counter.gets)
        assert len(proof) <= bound(n)
        merkle.verify_consistency(m, n, r1, r2, proof)
        assert counter.hashes <= 3 * bound(n), (m, counter.hashes)


def test_frontier_append_is_amortised_constant(counter):
    f = merkle.Frontier()
    n = 1 << 12
    for i in range(n):
        f.append(sha(i.to_bytes(4, "big")))
    assert counter.hashes == n - 1  # one inner node per completed pair, nothing more
    counter.hashes = 0
    f.root()
    f.root()  # cached
    assert counter.hashes == 0  # a power of two: the root is the single peak


def test_frontier_load_costs_log_n(counter):
    n = 2**20 - 3
    f = merkle.Frontier.load(n, lazy_get(counter, n))
    assert counter.gets <= n.bit_length()
    counter.hashes = 0
    f.root()
    assert counter.hashes <= bound(n)


# -- CVE-2012-2459: the duplicated last leaf ------------------------------------------


def entry_leaf(seq: int, payload: bytes) -> bytes:
    return leaf_hash("ctx", seq, "facts", payload, {"m": "1"}, 100 + seq, 1_700_000_000 + seq, "node-a")


def frontier_root(leaves: list[bytes]) -> bytes:
    f = merkle.Frontier()
    for leaf in leaves:
        f.append(leaf)
    return f.root()


def test_duplicated_raw_leaf_collides_in_a_tree_without_seq_commitment():
    # The attack is real for bare leaf hashes: a Bitcoin-style tree's top node cannot
    # tell [h1, h2, h3] from [h1, h2, h3, h3]. That is why leaves must commit to seq
    # (and why the published root also binds the size).
    h1, h2, h3 = (sha(x) for x in (b"a", b"b", b"c"))
    assert naive_top([h1, h2, h3]) == naive_top([h1, h2, h3, h3])
    # ... and likewise one level up ([x1..x6] vs [x1..x6, x5, x6])
    xs = make_leaves(6)
    assert naive_top(xs) == naive_top(xs + xs[4:6])
    # the size-bound roots differ even for such bare leaves
    assert naive_root([h1, h2, h3]) != naive_root([h1, h2, h3, h3])
    assert frontier_root([h1, h2, h3]) != frontier_root([h1, h2, h3, h3])


def test_duplicated_entry_cannot_collide_because_leaves_commit_to_seq():
    a, b, c = entry_leaf(1, b"a"), entry_leaf(2, b"b"), entry_leaf(3, b"c")
    c_again = entry_leaf(4, b"c")  # same content as c, but the 4th entry
    assert c_again != c
    assert frontier_root([a, b, c]) != frontier_root([a, b, c, c_again])
    assert naive_root([a, b, c]) != naive_root([a, b, c, c_again])
    six = [entry_leaf(i + 1, bytes([i])) for i in range(6)]
    dup = six + [entry_leaf(7, bytes([4])), entry_leaf(8, bytes([5]))]
    assert frontier_root(six) != frontier_root(dup)


def test_a_leaf_cannot_pass_for_an_inner_node():
    # Domain separation: an entry leaf starts with 0x00 in its preimage, an inner node with 0x01,
    # so a two-leaf tree's root is never equal to a leaf made from the same 64 bytes.
    h1, h2 = sha(b"x"), sha(b"y")
    assert merkle.inner_hash(h1, h2) != sha(b"\x00" + h1 + h2)


def test_a_proof_cannot_be_replayed_at_a_phantom_size():
    # Without the size in the root, the top node of [l0, l1, l2] is also the top node
    # of the phantom log [l0, l1, l2, l2], and hash-only proofs for that size-4 log
    # would verify against the size-3 root. Binding the size makes both fail.
    es = [dict(context="ctx", seq=s, key="k", payload=b"p%d" % s, metadata={}, lamport=s, ts_ns=0, writer="w")
          for s in (1, 2, 3)]
    l0, l1, l2 = (leaf_hash(**e) for e in es)
    r3 = naive_root([l0, l1, l2])
    a = merkle.inner_hash(l0, l1)
    assert naive_top([l0, l1, l2]) == naive_top([l0, l1, l2, l2])  # the phantom exists at the top node
    with pytest.raises(IntegrityError):
        merkle.verify_consistency(2, 4, naive_root([l0, l1]), r3, [a, merkle.inner_hash(l2, l2)])
    with pytest.raises(IntegrityError):
        merkle.verify_inclusion(l2, 3, 4, [l2, a], r3)
    # and the leaf itself still commits to its seq: no entry with seq 4 hashes to l2
    claimed = dict(es[2], seq=4)
    assert leaf_hash(**claimed) != l2

