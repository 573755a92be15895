"""protocol/vectors/*.json: the Python code reproduces every vector, and the files are up to date.

The checks here read the JSON as another-language client would and recompute
everything from it with the protocol package; they do not use the generator's
helpers, except in the tests of the generator itself at the end.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

from protocol import codec, merkle
from protocol.entry import Entry, decode_entry, entry_from_wire, leaf_hash
from protocol.errors import IntegrityError
from tools import make_vectors

pytestmark = pytest.mark.timeout(60)

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors"


def _no_json_numbers(text: str) -> Any:
    raise AssertionError(f"a JSON number ({text}) in a vector file: JSON.parse would round a u64 (SPEC 14)")


def _u64s(m: dict[str, Any]) -> dict[str, Any]:
    """The typed integer fields back to ints: they are decimal strings in the files."""
    for k in make_vectors.U64_FIELDS & m.keys():
        if isinstance(m[k], str) and m[k].isdigit():  # (the leaf template holds formulas: "<seq>")
            assert m[k] == "0" or m[k][0] != "0", m[k]
            m[k] = int(m[k])
    return m


def load(name: str) -> dict[str, Any]:
    # parse_int/parse_float refuse any JSON number: every integer is carried as a string
    return json.loads((VECTORS / name).read_text(encoding="utf-8"), object_hook=_u64s,
                      parse_int=_no_json_numbers, parse_float=_no_json_numbers)


def h(s: str) -> bytes:
    return bytes.fromhex(s)


def from_json(v: Any) -> Any:
    if isinstance(v, dict):
        if list(v) == ["$bin"]:
            return h(v["$bin"])
        if list(v) == ["$int"]:
            assert isinstance(v["$int"], str) and v["$int"].lstrip("-").isdigit()
            return int(v["$int"])
        return {k: from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [from_json(x) for x in v]
    return v


def test_every_file_has_a_description_and_vectors():
    names = sorted(p.name for p in VECTORS.glob("*.json"))
    assert set(make_vectors.BUILDERS) <= set(names)
    for name in make_vectors.BUILDERS:
        data = load(name)
        assert data["description"] and data["conventions"]
        for group in ("vectors", "valid", "invalid", "roots"):
            for v in data.get(group, []):
                assert isinstance(v, dict) and (group == "roots" or v["description"])


# -- entries -----------------------------------------------------------------------------


ENTRY_VECTORS = load("entries.json")["vectors"]


@pytest.mark.parametrize("v", ENTRY_VECTORS, ids=[v["description"][:40] for v in ENTRY_VECTORS])
def test_entry_hash_vectors(v):
    fields = dict(context=v["context"], seq=v["seq"], key=v["key"], payload=h(v["payload"]), metadata=v["metadata"],
                  lamport=v["lamport"], ts_ns=v["ts_ns"], writer=v["writer"])
    expected = h(v["hash"])
    assert leaf_hash(**fields) == expected
    assert hashlib.sha256(h(v["preimage"])).digest() == expected
    e = Entry(**fields, hash=expected)
    e.verify()
    assert decode_entry(e.encode()) == e
    pre = h(v["preimage"])
    assert pre[0] == 0 and int.from_bytes(pre[1:9], "big") == v["seq"]
    assert pre.endswith(len(fields["payload"]).to_bytes(4, "big") + fields["payload"])


def test_entry_vectors_cover_the_promised_cases():
    assert any(v["payload"] == "" for v in ENTRY_VECTORS)
    assert any(not v["context"].isascii() for v in ENTRY_VECTORS)
    assert any(len(v["metadata"]) >= 3 for v in ENTRY_VECTORS)
    assert len({v["hash"] for v in ENTRY_VECTORS}) == len(ENTRY_VECTORS)


# -- Merkle roots --------------------------------------------------------------------------

MERKLE = load("merkle_roots.json")


def template_leaf(seq: int) -> bytes:
    return leaf_hash("vectors", seq, "facts", f"entry {seq}".encode(), {}, seq, 1_700_000_000_000_000_000 + seq,
                     "node-a")


LEAVES = [h(x["hash"]) for x in MERKLE["leaves"]]


def test_leaves_follow_the_template():
    assert [x["index"] for x in MERKLE["leaves"]] == list(range(len(LEAVES)))
    assert LEAVES == [template_leaf(x["seq"]) for x in MERKLE["leaves"]]
    assert len(LEAVES) == 33


def test_roots_for_sizes_0_to_33():
    roots = MERKLE["roots"]
    assert [r["size"] for r in roots] == list(range(34))
    assert h(roots[0]["root"]) == hashlib.sha256(b"\x02" + bytes(8)).digest()
    assert h(roots[1]["root"]) == hashlib.sha256(b"\x02" + (1).to_bytes(8, "big") + LEAVES[0]).digest()
    f = merkle.Frontier()
    nodes = {}
    for r in roots:
        n = r["size"]
        if n:
            for level, index, node in f.append(LEAVES[n - 1]):
                nodes[(level, index)] = node
        assert f.root() == h(r["root"]), f"size {n}"
        assert merkle.root_at(n, lambda lv, ix: nodes[(lv, ix)]) == h(r["root"])


# -- proofs -------------------------------------------------------------------------------

ROOT_OF = {r["size"]: h(r["root"]) for r in MERKLE["roots"]}
INCLUSION = load("inclusion_proofs.json")
CONSISTENCY = load("consistency_proofs.json")


def stored_nodes() -> dict[tuple[int, int], bytes]:
    f = merkle.Frontier()
    nodes = {}
    for leaf in LEAVES:
        for level, index, node in f.append(leaf):
            nodes[(level, index)] = node
    return nodes


@pytest.mark.parametrize("v", INCLUSION["valid"], ids=[v["description"] for v in INCLUSION["valid"]])
def test_valid_inclusion_vectors(v):
    index, size = v["index"], v["size"]
    path = [h(p) for p in v["path"]]
    assert h(v["leaf"]) == LEAVES[index]
    assert h(v["root"]) == ROOT_OF[size]
    merkle.verify_inclusion(h(v["leaf"]), index, size, path, h(v["root"]))
    nodes = stored_nodes()
    assert merkle.inclusion_path(index, size, lambda lv, ix: nodes[(lv, ix)]) == path


@pytest.mark.parametrize("v", INCLUSION["invalid"], ids=[v["description"] for v in INCLUSION["invalid"]])
def test_invalid_inclusion_vectors(v):
    with pytest.raises(IntegrityError):
        merkle.verify_inclusion(h(v["leaf"]), v["index"], v["size"], [h(p) for p in v["path"]], h(v["root"]))


def test_inclusion_vectors_cover_the_edges():
    pairs = {(v["index"], v["size"]) for v in INCLUSION["valid"]}
    assert (0, 1) in pairs and (32, 33) in pairs and (0, 33) in pairs
    assert any(v["size"] & (v["size"] - 1) == 0 and v["size"] > 2 for v in INCLUSION["valid"])
    assert len(INCLUSION["invalid"]) >= 4


@pytest.mark.parametrize("v", CONSISTENCY["valid"], ids=[v["description"] for v in CONSISTENCY["valid"]])
def test_valid_consistency_vectors(v):
    first, second = v["first"], v["second"]
    proof = [h(p) for p in v["proof"]]
    assert h(v["first_root"]) == ROOT_OF[first] and h(v["second_root"]) == ROOT_OF[second]
    merkle.verify_consistency(first, second, h(v["first_root"]), h(v["second_root"]), proof)
    nodes = stored_nodes()
    assert merkle.consistency_proof(first, second, lambda lv, ix: nodes[(lv, ix)]) == proof


@pytest.mark.parametrize("v", CONSISTENCY["invalid"], ids=[v["description"] for v in CONSISTENCY["invalid"]])
def test_invalid_consistency_vectors(v):
    with pytest.raises(IntegrityError):
        merkle.verify_consistency(v["first"], v["second"], h(v["first_root"]), h(v["second_root"]),
                                  [h(p) for p in v["proof"]])


def test_consistency_vectors_cover_the_edges():
    pairs = {(v["first"], v["second"]) for v in CONSISTENCY["valid"]}
    assert (0, 0) in pairs and (0, 33) in pairs and (33, 33) in pairs and (8, 16) in pairs and (16, 32) in pairs
    assert any(m == n and m > 0 for m, n in pairs)
    assert len(CONSISTENCY["invalid"]) >= 4


# -- messages -----------------------------------------------------------------------------

MESSAGES = load("messages.json")["vectors"]


@pytest.mark.parametrize("v", MESSAGES, ids=[v["description"][:40] for v in MESSAGES])
def test_message_vectors_decode_to_the_stated_maps(v):
    frame = h(v["msgpack"])
    decoded = from_json(v["decoded"])
    assert msgpack.unpackb(frame, raw=False) == decoded
    if v["kind"] == "request":
        env = codec.decode_request(frame, 4 * 1024 * 1024)
        assert env.id == decoded["id"] and env.op == decoded["op"]
        fields = {k: x for k, x in decoded.items() if k not in ("v", "id", "op")}
        assert codec.encode_request(decoded["op"], decoded["id"], fields) == frame
    else:
        assert codec.decode_reply(frame) == decoded
        assert decoded["v"] == codec.PROTOCOL_VERSION
        if decoded["ok"]:
            for m in ([decoded["entry"]] if "entry" in decoded else []) + decoded.get("entries", []):
                entry_from_wire(m).verify()
        else:
            assert decoded["error"]["code"] and decoded["error"]["message"]


def test_message_vectors_reencode_byte_for_byte():
    by_desc = {v["description"].split(":")[0]: v for v in MESSAGES}
    append_reply = from_json(by_desc["ok reply to the append request"]["decoded"])
    blob = Entry(**append_reply["entry"]).encode()
    assert codec.encode_entry_reply(append_reply["id"], blob) == h(by_desc["ok reply to the append request"]["msgpack"])
    get_reply = from_json(by_desc["ok reply to the get request"]["decoded"])
    fields = {k: get_reply[k] for k in ("last_seq", "more", "next_after")}
    blobs = [Entry(**m).encode() for m in get_reply["entries"]]
    assert codec.encode_reply(get_reply["id"], fields, {"entries": blobs}) == h(
        by_desc["ok reply to the get request"]["msgpack"])
    errors = [from_json(v["decoded"]) for v in MESSAGES if v["kind"] == "reply" and not from_json(v["decoded"])["ok"]]
    assert {e["error"]["code"] for e in errors} >= {"BAD_REQUEST", "UNSUPPORTED_VERSION"}
    for e, v in zip(errors, [v for v in MESSAGES if v["kind"] == "reply" and "error" in v["decoded"]], strict=True):
        err = dict(e["error"])
        code, message = err.pop("code"), err.pop("message")
        assert codec.encode_error(e["id"], code, message, err) == h(v["msgpack"])


def test_message_vectors_cover_the_promised_messages():
    kinds = [(v["kind"], from_json(v["decoded"]).get("op"), from_json(v["decoded"]).get("ok")) for v in MESSAGES]
    assert ("request", "append", None) in kinds and ("request", "get", None) in kinds
    assert ("reply", None, True) in kinds and ("reply", None, False) in kinds


# -- the generator --------------------------------------------------------------------------


def test_vector_files_are_up_to_date():
    assert make_vectors.check(VECTORS) == [], "run `python -m tools.make_vectors` and commit the result"


def test_generator_is_deterministic_and_check_sees_changes(tmp_path, capsys):
    assert make_vectors.build() == make_vectors.build()
    assert make_vectors.main(["--check", "--out", str(tmp_path)]) == 1  # nothing there yet
    assert make_vectors.main(["--out", str(tmp_path)]) == 0
    assert make_vectors.main(["--check", "--out", str(tmp_path)]) == 0
    for name in make_vectors.BUILDERS:
        assert (tmp_path / name).read_text(encoding="utf-8") == (VECTORS / name).read_text(encoding="utf-8")
    p = tmp_path / "merkle_roots.json"
    p.write_text(p.read_text(encoding="utf-8").replace('"size": "33"', '"size": "34"'), encoding="utf-8")
    assert make_vectors.main(["--check", "--out", str(tmp_path)]) == 1
    assert "merkle_roots.json" in capsys.readouterr().err


def test_generator_json_helpers_round_trip():
    value = {"a": b"\x00\xff", "b": [b"", "s", 1, None, True, {"c": b"x"}], "u": 2**64 - 1, "i": -(2**63)}
    assert make_vectors.from_json_value(make_vectors.to_json_value(value)) == value
    assert from_json(make_vectors.to_json_value(value)) == value
    assert make_vectors.to_json_value(True) is True  # a bool is not an integer here


def test_u64_values_survive_a_parser_that_reads_numbers_as_doubles():
    """What JavaScript's JSON.parse does: every number becomes a double. The vectors hold no
    number, so the u64 values above 2^53 (ts_ns, seq 2^64-1, lamport 2^63-1) come through exact."""
    for name in make_vectors.BUILDERS:
        as_js = json.loads((VECTORS / name).read_text(encoding="utf-8"), parse_int=float)
        assert as_js == json.loads((VECTORS / name).read_text(encoding="utf-8"))
    top = [v for v in ENTRY_VECTORS if v["seq"] == 2**64 - 1]
    assert top and top[0]["lamport"] == 2**63 - 1
    assert any(v["ts_ns"] > 2**53 for v in ENTRY_VECTORS)
    entries = [m for v in MESSAGES for m in [v["decoded"].get("entry"), *v["decoded"].get("entries", [])] if m]
    assert entries and all(list(m["ts_ns"]) == ["$int"] and int(m["ts_ns"]["$int"]) > 2**53 for m in entries)


# -- signed heads (SPEC 13.6) ----------------------------------------------------------------


SIGNED_HEADS = load("signed_heads.json")


@pytest.mark.parametrize("v", SIGNED_HEADS["valid"], ids=lambda v: v["description"])
def test_signed_head_vectors_verify_and_their_bytes_are_exact(v):
    from protocol.heads import SignedHead, head_bytes
    from protocol.keys import Identity

    h = SignedHead(v["context"], v["size"], bytes.fromhex(v["root"]), bytes.fromhex(v["key"]), v["epoch"],
                   bytes.fromhex(v["sig"]))
    assert head_bytes(h.context, h.size, h.root, h.key, h.epoch).hex() == v["signed_bytes"]
    assert h.verify() and h.verify(bytes.fromhex(v["key"]))
    writer = Identity(bytes.fromhex(SIGNED_HEADS["writer_seed"]))
    assert writer.public == h.key and writer.sign(bytes.fromhex(v["signed_bytes"])) == h.sig  # Ed25519 is deterministic


@pytest.mark.parametrize("v", SIGNED_HEADS["invalid"], ids=lambda v: v["description"])
def test_invalid_signed_head_vectors_are_rejected(v):
    from protocol.heads import SignedHead

    h = SignedHead(v["context"], v["size"], bytes.fromhex(v["root"]), bytes.fromhex(v["key"]), v["epoch"],
                   bytes.fromhex(v["sig"]))
    assert not h.verify()
