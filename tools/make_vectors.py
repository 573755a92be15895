"""Write the protocol test vectors in `protocol/vectors/` (deterministically).

    python -m tools.make_vectors            write the files
    python -m tools.make_vectors --check    exit 1 if the files differ from what the code makes now

The vectors let a client in another language check itself against this
implementation: entry leaf hashes (with their preimage), Merkle roots for
sizes 0..33, inclusion and consistency proofs (valid ones and a few that must
be rejected), and encoded requests and replies. Everything here is computed
by the `protocol` package; the only independent computation is the leaf
preimage, which is built from the layout in `protocol.entry` and checked
against `leaf_hash` before anything is written.

JSON conventions: byte strings are lowercase hex; in decoded messages a
msgpack binary value is written {"$bin": "<hex>"} to tell it from a string, and a
msgpack integer {"$int": "<decimal>"}. Every integer is a string of decimal digits,
never a JSON number: JavaScript's JSON.parse reads numbers as doubles and silently
rounds those above 2^53 (a ts_ns, a seq near 2^64). `u64_fields` makes the typed
fields (seq, size, ...) strings; `to_json_value` tags the integers of messages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack

import protocol
from protocol import codec, merkle
from protocol.entry import Entry, leaf_hash
from protocol.errors import IntegrityError, RemoteProtocolError

VECTORS_DIR = Path(protocol.__file__).resolve().parent / "vectors"

CONVENTIONS = (
    "Byte strings are lowercase hex. Integers are never JSON numbers (a parser that reads numbers as "
    "doubles, such as JavaScript's JSON.parse, silently rounds those above 2^53): the integer fields of "
    "vectors (seq, lamport, ts_ns, size, index, first, second, epoch) are strings of decimal digits, "
    'and in a decoded message a msgpack integer is written {"$int": "<decimal>"} and a msgpack bin '
    'value {"$bin": "<hex>"}; every other value is the JSON form of the msgpack value (str, bool, nil, '
    "array, map). Entry fields: seq, lamport and ts_ns are unsigned 64-bit integers (lamport at most "
    "2^63-1, SPEC 9.1); context, key, "
    "writer and metadata keys and values are UTF-8 strings; metadata is hashed sorted by the UTF-8 "
    "bytes of its keys, whatever order it is listed in here."
)

MERKLE_ROOT_SIZES = range(34)
INCLUSION_PAIRS = [
    (0, 1), (0, 2), (1, 2), (0, 3), (2, 3), (3, 4), (4, 5), (4, 6), (5, 6), (6, 7), (0, 8), (7, 8), (8, 9),
    (12, 13), (15, 16), (16, 17), (10, 21), (20, 33), (0, 33), (31, 33), (32, 33),
]
CONSISTENCY_PAIRS = [
    (0, 0), (0, 1), (0, 33), (1, 1), (1, 2), (1, 33), (2, 3), (3, 4), (3, 7), (4, 8), (5, 6), (6, 8), (7, 8),
    (8, 16), (16, 32), (8, 33), (12, 29), (13, 13), (17, 33), (31, 32), (32, 33), (33, 33),
]


U64_FIELDS = frozenset({"seq", "lamport", "ts_ns", "size", "index", "first", "second", "epoch"})


def u64_fields(v: Any) -> Any:
    """`v` with the integer values of U64_FIELDS, at any depth, as decimal strings."""
    if isinstance(v, dict):
        return {k: (str(x) if k in U64_FIELDS and type(x) is int else u64_fields(x)) for k, x in v.items()}
    if isinstance(v, list):
        return [u64_fields(x) for x in v]
    return v


# -- entries --------------------------------------------------------------------------


def _lp(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def leaf_preimage(e: Mapping[str, Any]) -> bytes:
    """The bytes SHA-256 runs over, from the layout documented in protocol.entry."""
    pairs = sorted((k.encode(), v.encode()) for k, v in e["metadata"].items())
    return b"".join([
        b"\x00",
        struct.pack(">QQQ", e["seq"], e["lamport"], e["ts_ns"]),
        _lp(e["context"].encode()), _lp(e["writer"].encode()), _lp(e["key"].encode()),
        struct.pack(">I", len(pairs)),
        *(_lp(k) + _lp(v) for k, v in pairs),
        _lp(e["payload"]),
    ])


ENTRY_CASES: list[tuple[str, dict[str, Any]]] = [
    ("a plain entry: ASCII names, no metadata", dict(
        context="orders", seq=1, key="facts", payload=b"hello", metadata={}, lamport=1,
        ts_ns=1_700_000_000_000_000_000, writer="node-a")),
    ("the same content as the first entry at seq 2: the leaf commits to seq", dict(
        context="orders", seq=2, key="facts", payload=b"hello", metadata={}, lamport=1,
        ts_ns=1_700_000_000_000_000_000, writer="node-a")),
    ("empty payload and empty key", dict(
        context="orders", seq=3, key="", payload=b"", metadata={}, lamport=7, ts_ns=1_700_000_000_000_000_001,
        writer="node-a")),
    ("unicode context, key and writer (lengths are UTF-8 bytes, not characters)", dict(
        context="héllo/世界/🙂", seq=1, key="traces·é", payload="ünïcødé payload".encode(), metadata={},
        lamport=12, ts_ns=1_700_000_000_123_456_789, writer="nœud-β")),
    ("several metadata pairs listed out of order, one empty value, one non-ASCII key", dict(
        context="agents/planner", seq=5, key="intents", payload=b'{"goal":"ship"}',
        metadata={"zeta": "26", "alpha": "1", "mid": "", "ключ": "значение"}, lamport=99,
        ts_ns=1_700_000_000_000_000_500, writer="node-b")),
    ("binary payload of every byte value; seq at the 64-bit maximum, lamport at its ceiling 2^63-1", dict(
        context="c", seq=2**64 - 1, key="k", payload=bytes(range(256)), metadata={"a": "b"}, lamport=2**63 - 1,
        ts_ns=0, writer="w")),
]


def entry_vectors() -> dict[str, Any]:
    vectors = []
    for description, e in ENTRY_CASES:
        pre = leaf_preimage(e)
        h = leaf_hash(**e)
        if hashlib.sha256(pre).digest() != h:  # not assert: must hold under python -O too
            raise RuntimeError(f"leaf_hash disagrees with the documented layout for {description!r}")
        vectors.append({
            "description": description,
            "context": e["context"],
            "seq": e["seq"],
            "key": e["key"],
            "payload": e["payload"].hex(),
            "metadata": e["metadata"],
            "lamport": e["lamport"],
            "ts_ns": e["ts_ns"],
            "writer": e["writer"],
            "preimage": pre.hex(),
            "hash": h.hex(),
        })
    return {
        "description": "Entry leaf hashes: SHA-256 of the preimage; the preimage layout is in protocol/entry.py "
                       "and SPEC.md.",
        "conventions": CONVENTIONS,
        "vectors": vectors,
    }


# -- Merkle -----------------------------------------------------------------------------

LEAF_TEMPLATE = {
    "context": "vectors", "key": "facts", "payload": "utf8('entry <seq>')", "metadata": {},
    "lamport": "<seq>", "ts_ns": "1700000000000000000 + <seq>", "writer": "node-a",
}


def merkle_entry(seq: int) -> dict[str, Any]:
    return dict(context="vectors", seq=seq, key="facts", payload=f"entry {seq}".encode(), metadata={},
                lamport=seq, ts_ns=1_700_000_000_000_000_000 + seq, writer="node-a")


def merkle_leaves(n: int = max(MERKLE_ROOT_SIZES)) -> list[bytes]:
    return [leaf_hash(**merkle_entry(seq)) for seq in range(1, n + 1)]


class _Tree:
    """All leaves in a Frontier, with every completed node kept for proofs."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        self.nodes: dict[tuple[int, int], bytes] = {}
        self.roots = [merkle.EMPTY_ROOT]
        f = merkle.Frontier()
        for leaf in leaves:
            for level, index, h in f.append(leaf):
                self.nodes[(level, index)] = h
            self.roots.append(f.root())

    def get(self, level: int, index: int) -> bytes:
        return self.nodes[(level, index)]


def merkle_root_vectors() -> dict[str, Any]:
    leaves = merkle_leaves()
    tree = _Tree(leaves)
    return {
        "description": "Merkle roots of the first n leaves, n = 0..33. Leaf i (0-based) is the leaf hash of the "
                       "entry with seq i+1 made from the template. Inner node = SHA-256(0x01 || left || right); "
                       "an odd last node of a level is paired with itself; a single leaf is its own top node. "
                       "The root binds the size: SHA-256(0x02 || u64be(n) || top node); the empty root is "
                       "SHA-256(0x02 || u64be(0)).",
        "conventions": CONVENTIONS,
        "leaf_template": LEAF_TEMPLATE,
        "leaves": [{"index": i, "seq": i + 1, "hash": h.hex()} for i, h in enumerate(leaves)],
        "roots": [{"size": n, "root": tree.roots[n].hex()} for n in MERKLE_ROOT_SIZES],
    }


def _flip(b: bytes) -> bytes:
    return bytes([b[0] ^ 0x01]) + b[1:]


def inclusion_vectors() -> dict[str, Any]:
    leaves = merkle_leaves()
    tree = _Tree(leaves)
    valid = []
    for index, size in INCLUSION_PAIRS:
        path = merkle.inclusion_path(index, size, tree.get)
        merkle.verify_inclusion(leaves[index], index, size, path, tree.roots[size])
        valid.append({
            "description": f"leaf {index} in a tree of {size}",
            "index": index, "size": size, "leaf": leaves[index].hex(),
            "path": [p.hex() for p in path], "root": tree.roots[size].hex(),
        })
    p6 = merkle.inclusion_path(4, 6, tree.get)
    invalid_cases = [
        ("a path element with one bit flipped", 4, 6, leaves[4], [_flip(p6[0])] + p6[1:], tree.roots[6]),
        ("the right path for leaf 4 given as leaf 5", 5, 6, leaves[4], p6, tree.roots[6]),
        ("one element too many", 4, 6, leaves[4], p6 + [leaves[0]], tree.roots[6]),
        ("one element missing", 4, 6, leaves[4], p6[:-1], tree.roots[6]),
        ("checked against the root of another size", 4, 7, leaves[4], p6, tree.roots[7]),
        ("an index outside the tree", 6, 6, leaves[4], p6, tree.roots[6]),
    ]
    invalid = []
    for description, index, size, leaf, path, root in invalid_cases:
        try:
            merkle.verify_inclusion(leaf, index, size, path, root)
        except IntegrityError:
            pass
        else:
            raise RuntimeError(f"invalid inclusion vector {description!r} verifies")
        invalid.append({
            "description": description, "index": index, "size": size, "leaf": leaf.hex(),
            "path": [p.hex() for p in path], "root": root.hex(),
        })
    return {
        "description": "Inclusion proofs over the leaves of merkle_roots.json: sibling hashes from the leaf up; "
                       "a level where the node is paired with itself contributes no hash. Every 'valid' proof "
                       "MUST verify to 'root'; every 'invalid' one MUST be rejected.",
        "conventions": CONVENTIONS,
        "valid": valid,
        "invalid": invalid,
    }


def consistency_vectors() -> dict[str, Any]:
    tree = _Tree(merkle_leaves())
    valid = []
    for first, second in CONSISTENCY_PAIRS:
        proof = merkle.consistency_proof(first, second, tree.get)
        merkle.verify_consistency(first, second, tree.roots[first], tree.roots[second], proof)
        valid.append({
            "description": f"the first {first} leaves are a prefix of the first {second}",
            "first": first, "second": second, "first_root": tree.roots[first].hex(),
            "second_root": tree.roots[second].hex(), "proof": [p.hex() for p in proof],
        })
    p = merkle.consistency_proof(5, 12, tree.get)
    r5, r12 = tree.roots[5], tree.roots[12]
    invalid_cases = [
        ("a proof element with one bit flipped", 5, 12, r5, r12, [_flip(p[0])] + p[1:]),
        ("the roots swapped", 5, 12, r12, r5, p),
        ("the second root of another size", 5, 12, r5, tree.roots[13], p),
        ("one element too many", 5, 12, r5, r12, p + [r5]),
        ("one element missing", 5, 12, r5, r12, p[:-1]),
        ("first greater than second", 12, 5, r12, r5, p),
    ]
    invalid = []
    for description, first, second, fr, sr, proof in invalid_cases:
        try:
            merkle.verify_consistency(first, second, fr, sr, proof)
        except IntegrityError:
            pass
        else:
            raise RuntimeError(f"invalid consistency vector {description!r} verifies")
        invalid.append({
            "description": description, "first": first, "second": second, "first_root": fr.hex(),
            "second_root": sr.hex(), "proof": [x.hex() for x in proof],
        })
    return {
        "description": "Consistency proofs over the leaves of merkle_roots.json: first the peaks of the first "
                       "size (one complete subtree per set bit, largest first), then, for every peak of the "
                       "second size left to right, the nodes wholly beyond the first size needed to build it, "
                       "depth first. Every 'valid' proof MUST verify; every 'invalid' one MUST be rejected.",
        "conventions": CONVENTIONS,
        "valid": valid,
        "invalid": invalid,
    }


# -- messages ---------------------------------------------------------------------------


def to_json_value(v: Any) -> Any:
    """A decoded msgpack value in the JSON convention ({"$bin": hex} for binary, {"$int": decimal}
    for integers)."""
    if isinstance(v, bytes):
        return {"$bin": v.hex()}
    if type(v) is int:
        return {"$int": str(v)}
    if isinstance(v, dict):
        return {k: to_json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_json_value(x) for x in v]
    return v


def from_json_value(v: Any) -> Any:
    """The inverse of `to_json_value`."""
    if isinstance(v, dict):
        if set(v) == {"$bin"}:
            return bytes.fromhex(v["$bin"])
        if set(v) == {"$int"}:
            return int(v["$int"])
        return {k: from_json_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [from_json_value(x) for x in v]
    return v


def _entry(seq: int) -> Entry:
    f = dict(context="orders", seq=seq, key="facts", payload=b"hello %d" % seq, metadata={"source": "agent-7"},
             lamport=40 + seq, ts_ns=1_700_000_000_000_000_000 + seq, writer="node-a")
    return Entry(**f, hash=leaf_hash(**f))


def _error_reply(rid: codec.RequestId, frame: bytes) -> bytes:
    try:
        codec.decode_request(frame, 4 * 1024 * 1024)
    except RemoteProtocolError as e:
        return codec.encode_error(rid, e.code, e.message, e.details)
    raise RuntimeError("the error example decoded without error")


def message_vectors() -> dict[str, Any]:
    e1, e2 = _entry(1), _entry(2)
    cases: list[tuple[str, str, bytes]] = [
        ("request", "append request: one entry with metadata; binary payload",
         codec.encode_request("append", 1, {"context": "orders", "key": "facts", "payload": b"hello 1",
                                            "metadata": {"source": "agent-7"}})),
        ("request", "get request: entries of key 'facts' after seq 0, at most 100, with a string id",
         codec.encode_request("get", "req-2", {"context": "orders", "key": "facts", "after": 0, "limit": 100})),
        ("reply", "ok reply to the append request: the stored entry (seq 1)",
         codec.encode_entry_reply(1, e1.encode())),
        ("reply", "ok reply to the get request: two entries and paging fields",
         codec.encode_reply("req-2", {"last_seq": 2, "more": False, "next_after": 2},
                            {"entries": [e1.encode(), e2.encode()]})),
        ("reply", "error reply: a head request with no context (id 4 is echoed)",
         _error_reply(4, codec.encode_request("head", 4, {}))),
        ("reply", "error reply: protocol version 2 is refused with the supported versions",
         _error_reply(5, msgpack.packb({"v": 2, "id": 5, "op": "ping"}, use_bin_type=True))),
    ]
    vectors = []
    for kind, description, frame in cases:
        decoded = msgpack.unpackb(frame, raw=False)
        if kind == "request":
            codec.decode_request(frame, 4 * 1024 * 1024)  # must be a valid request
        else:
            codec.decode_reply(frame)
        vectors.append({"description": description, "kind": kind, "msgpack": frame.hex(),
                        "decoded": to_json_value(decoded)})
    return {
        "description": "Encoded protocol v1 messages. A decoder MUST turn 'msgpack' into 'decoded'. Map key "
                       "order in the bytes is this implementation's; an encoder that orders keys differently "
                       "is conforming if the decoded maps are equal.",
        "conventions": CONVENTIONS,
        "vectors": vectors,
    }


# -- files ------------------------------------------------------------------------------

def signed_head_vectors() -> dict[str, Any]:
    """Heads signed by a writer whose secret key is fixed here (a test key: never use it)."""
    from protocol.heads import SignedHead, head_bytes, sign_head
    from protocol.keys import Identity

    writer = Identity(hashlib.sha256(b"converge-ledger test vector writer").digest())
    other = Identity(hashlib.sha256(b"converge-ledger test vector other writer").digest())
    tree = _Tree(merkle_leaves())
    valid = []
    for description, context, size, epoch in (
        ("an empty context", "notes", 0, 0),
        ("13 entries", "notes", 13, 0),
        ("a name in UTF-8 beyond ASCII", "agent/ünïcode-7", 33, 0),
        ("a later epoch (reserved for writer handoff)", "notes", 5, 2),
    ):
        root = tree.roots[size]
        h = sign_head(writer, context, size, root, epoch)
        valid.append({"description": description, "context": context, "size": size, "root": root.hex(),
                      "key": h.key.hex(), "epoch": epoch,
                      "signed_bytes": head_bytes(context, size, root, h.key, epoch).hex(), "sig": h.sig.hex()})
    good = sign_head(writer, "notes", 13, tree.roots[13])
    invalid_cases = [
        ("the signature with one bit flipped", good._replace(sig=_flip(good.sig))),
        ("another size than the one signed", good._replace(size=12)),
        ("another root than the one signed", good._replace(root=tree.roots[12])),
        ("another context than the one signed", good._replace(context="notes2")),
        ("another epoch than the one signed", good._replace(epoch=1)),
        ("signed by another writer than the key it names", good._replace(sig=sign_head(other, "notes", 13,
                                                                                       tree.roots[13]).sig)),
    ]
    invalid = []
    for description, h in invalid_cases:
        if SignedHead(*h).verify():
            raise RuntimeError(f"invalid signed head vector {description!r} verifies")
        invalid.append({"description": description, "context": h.context, "size": h.size, "root": h.root.hex(),
                        "key": h.key.hex(), "epoch": h.epoch, "sig": h.sig.hex()})
    return {
        "description": "Heads signed by a context's writer (SPEC 13.6): Ed25519 (RFC 8032) over 'converge-ledger "
                       "signed head v1\\n', u16 length and UTF-8 bytes of the context name, u64 size, the 32-byte "
                       "root, the writer's 32-byte public key, u64 epoch (big-endian). The writer's secret key "
                       "is sha256('converge-ledger test vector writer') as an Ed25519 seed. Roots are those of "
                       "merkle_roots.json. Every 'valid' head MUST verify against its key and its signed_bytes "
                       "MUST match byte for byte; every 'invalid' one MUST be rejected.",
        "conventions": CONVENTIONS,
        "writer_seed": writer.seed.hex(),
        "valid": valid,
        "invalid": invalid,
    }


BUILDERS = {
    "entries.json": entry_vectors,
    "merkle_roots.json": merkle_root_vectors,
    "inclusion_proofs.json": inclusion_vectors,
    "consistency_proofs.json": consistency_vectors,
    "messages.json": message_vectors,
    "signed_heads.json": signed_head_vectors,
}


def render(data: Any) -> str:
    return json.dumps(u64_fields(data), indent=2, ensure_ascii=False) + "\n"


def build() -> dict[str, str]:
    """File name -> its full text."""
    return {name: render(make()) for name, make in BUILDERS.items()}


def write(out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in build().items():
        (out / name).write_text(text, encoding="utf-8")
        written.append(name)
    return written


def check(out: Path) -> list[str]:
    """Names of the files that are missing or differ from what the code makes now."""
    stale = []
    for name, text in build().items():
        path = out / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(name)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.make_vectors", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if any file differs")
    p.add_argument("--out", type=Path, default=VECTORS_DIR, help=f"vectors folder (default {VECTORS_DIR})")
    args = p.parse_args(argv)
    if args.check:
        stale = check(args.out)
        for name in stale:
            print(f"make_vectors: {args.out / name} is missing or out of date", file=sys.stderr)
        if stale:
            print("make_vectors: run `python -m tools.make_vectors` and review the diff", file=sys.stderr)
            return 1
        print(f"make_vectors: {len(BUILDERS)} vector files in {args.out} are up to date")
        return 0
    for name in write(args.out):
        print(f"make_vectors: wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
