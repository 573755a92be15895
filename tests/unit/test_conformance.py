"""protocol/CONFORMANCE.md cannot rot: its quotes are SPEC.md's words, every MUST of SPEC.md is in
one of them, and every test it names exists. Also the few MUSTs no other test pinned."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import msgpack
import pytest

from protocol import codec, merkle
from protocol.client import Client
from protocol.entry import Entry, entry_from_wire, leaf_hash
from protocol.errors import BAD_REQUEST, IntegrityError, LedgerError, RemoteProtocolError, error_for

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "protocol" / "SPEC.md"
CHECKLIST = ROOT / "protocol" / "CONFORMANCE.md"
ROW = re.compile(r"^\| (C\d+) \| ([\d.]+) \| “(.+?)” \| (.*) \|$")
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")


def normal(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@cache
def rows() -> list[tuple[str, str, str, list[tuple[str, str]], str]]:
    """(id, section, quote, [(file, test)], the 'pinned by' cell) of every checklist row."""
    out = []
    for line in CHECKLIST.read_text(encoding="utf-8").splitlines():
        if line.startswith("| C"):
            m = ROW.match(line)
            assert m, f"a checklist row that does not parse: {line[:80]}"
            out.append((m[1], m[2], m[3], TEST_REF.findall(m[4]), m[4]))
    return out


@cache
def defined_functions(path: str) -> frozenset[str]:
    """The test functions a file defines (parsed, not imported: integration modules start nodes)."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    return frozenset(n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def test_the_checklist_has_rows_with_unique_ids_in_order():
    ids = [r[0] for r in rows()]
    assert len(ids) >= 70
    assert ids == [f"C{i:02d}" for i in range(1, len(ids) + 1)]


def test_every_quote_is_in_the_spec_word_for_word():
    spec = normal(SPEC.read_text(encoding="utf-8"))
    for rid, section, quote, _, _ in rows():
        at = spec.find(normal(quote))
        assert at >= 0, f"{rid}: SPEC.md no longer says “{quote[:70]}…”: update the row with the spec"
        heading = spec.rfind(" ## ", 0, at), spec.rfind(" ### ", 0, at)
        title = spec[max(heading) + 1:].split(" ", 2)[1]
        assert title.rstrip(".") == section, f"{rid}: the quote is in section {title}, the row says {section}"


def test_every_must_of_the_spec_is_in_a_quote():
    spec = normal(SPEC.read_text(encoding="utf-8"))
    spans = [(i, i + len(q)) for q in (normal(r[2]) for r in rows()) if (i := spec.find(q)) >= 0]
    start = spec.find("## 3. Architecture")  # section 2 defines the words
    missing = [spec[max(0, m.start() - 60):m.start() + 40] for m in re.finditer(r"\bMUST\b", spec)
               if m.start() > start and not any(a <= m.start() < b for a, b in spans)]
    assert not missing, "MUSTs with no row in CONFORMANCE.md:\n" + "\n".join(f"…{x}…" for x in missing)


def test_every_named_test_exists():
    for rid, _, _, refs, cell in rows():
        assert refs or cell.startswith("not pinned:"), f"{rid} names no test and does not say why"
        for path, name in refs:
            assert (ROOT / path).is_file(), f"{rid}: {path} does not exist"
            assert name in defined_functions(path), f"{rid}: {path} has no {name}"


# -- MUSTs no other test pinned -------------------------------------------------------------


def test_integers_in_wider_formats_and_maps_in_any_key_order_decode_alike():
    """5.1: an integer in a wider msgpack format than needed is the same integer; 7.1: entry
    maps and request bodies decode whatever their key order."""
    f = dict(context="c", seq=3, key="k", payload=b"p", metadata={"m": "v"}, lamport=9, ts_ns=2**62, writer="w")
    e = Entry(**f, hash=leaf_hash(**f))
    wire = e.to_wire()
    assert entry_from_wire(dict(reversed(list(wire.items())))) == e
    packer = msgpack.Packer(use_bin_type=True)
    wide = (b"\x85" + packer.pack("after") + b"\xcf" + (2).to_bytes(8, "big")  # uint 64 holding 2
            + packer.pack("context") + packer.pack("c") + packer.pack("op") + packer.pack("get")
            + packer.pack("id") + b"\xd3" + (5).to_bytes(8, "big")  # int 64 holding 5
            + packer.pack("v") + b"\xd0\x01")  # int 8 holding 1
    env = codec.decode_request(wide, 1024)
    assert (env.id, env.op, env.request) == (5, "get", codec.Get("c", after=2))


@pytest.mark.parametrize("body", [
    {"v": 1, "id": 1, "op": "ping", 7: 1},
    {"v": 1, "id": 1, "op": "append", "context": "c", b"dedup_id": b"d"},
    {"v": 1, "id": 1, "op": "append_batch", "context": "c", "entries": [{"payload": b"a"}, {b"key": "x", "payload": b"b"}]},
    {"v": 1, "id": 1, "op": "append_batch", "context": "c", "entries": [{"payload": b"a", None: 1}]},
])
def test_map_keys_that_are_not_strings_are_refused_by_the_decoder(body):
    with pytest.raises(RemoteProtocolError) as info:
        codec.decode_request(msgpack.packb(body, use_bin_type=True), 1024)
    assert info.value.code == BAD_REQUEST and "keys must be strings" in info.value.message
    # unknown *string* keys are still ignored (5.1), at both levels
    ok = {"v": 1, "id": 1, "op": "append_batch", "context": "c", "later": 1, "entries": [{"payload": b"a", "later": 2}]}
    assert codec.decode_request(msgpack.packb(ok, use_bin_type=True), 1024).request.items == (("", b"a", {}),)


def test_a_client_compares_the_first_root_it_knows(monkeypatch):
    """6.11: a client that knows a root for `first` compares it with the node's `first_root`
    before it verifies the proof (the proof alone would verify a consistent forged history)."""
    leaves = [bytes([i]) * 32 for i in range(8)]
    nodes: dict[tuple[int, int], bytes] = {}
    f = merkle.Frontier()
    roots = [f.root()]
    for leaf in leaves:
        for level, index, h in f.append(leaf):
            nodes[(level, index)] = h
        roots.append(f.root())
    proof = merkle.consistency_proof(3, 8, lambda lv, ix: nodes[(lv, ix)])
    c = Client("127.0.0.1:9")  # never connects: `call` is replaced
    monkeypatch.setattr(c, "call", lambda op, **kw: {"context": "x", "first": 3, "second": 8, "first_root": roots[3],
                                                     "second_root": roots[8], "proof": proof})
    assert c.consistency("x", 3, first_root=roots[3]).second_root == roots[8]
    with pytest.raises(IntegrityError, match="not the one you know"):
        c.consistency("x", 3, first_root=roots[2])


def test_an_unknown_error_code_is_an_error():
    """11: a code the client does not know is still an error, with its code and details kept."""
    err = error_for("SOMETHING_NEW", "a later version's error", {"x": 1})
    assert isinstance(err, LedgerError) and err.code == "SOMETHING_NEW" and err.details == {"x": 1}
