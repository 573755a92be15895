"""The worked examples in protocol/SPEC.md are what the code produces."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protocol import codec, merkle
from protocol.entry import Entry, leaf_hash

pytestmark = pytest.mark.timeout(30)

SPEC = (Path(__file__).resolve().parents[2] / "protocol" / "SPEC.md").read_text()
FIELDS = dict(context="notes", seq=1, key="facts", payload=b"hi", metadata={"agent": "a1"}, lamport=7,
              ts_ns=1_700_000_000_000_000_000, writer="node-1")


def hex_blocks() -> list[str]:
    """The bytes shown in each code block of the spec: even-length hex tokens,
    with quoted annotations dropped."""
    out = []
    for block in re.findall(r"```\n(.*?)```", SPEC, re.S):
        text = re.sub(r'"[^"]*"', " ", block)
        out.append("".join(t for t in re.split(r"[\s,()]+", text) if re.fullmatch(r"(?:[0-9a-f]{2})+", t)))
    return out


def test_leaf_hash_and_roots_of_the_example():
    h = leaf_hash(**FIELDS)
    assert h.hex() in SPEC
    assert merkle.bind_root(1, h).hex() in SPEC
    assert merkle.EMPTY_ROOT.hex() in SPEC


def test_example_messages_are_the_encoded_bytes():
    h = leaf_hash(**FIELDS)
    req = codec.encode_request("append", 1, {"context": "notes", "key": "facts", "payload": b"hi",
                                             "metadata": {"agent": "a1"}})
    reply = codec.encode_entry_reply(1, Entry(hash=h, **FIELDS).encode())
    err = codec.encode_error(2, "NOT_FOUND", "context 'x' does not exist", {"context": "x"})
    blocks = hex_blocks()
    for msg in (req, reply, err):
        assert msg.hex() in blocks, f"SPEC.md shows no block with exactly the bytes {msg.hex()}"


def test_example_leaf_preimage_is_shown_byte_for_byte():
    import hashlib

    pre = next(b for b in hex_blocks() if b.startswith("00") and len(b) > 100)
    assert hashlib.sha256(bytes.fromhex(pre)).digest() == leaf_hash(**FIELDS)


def test_example_watch_message_is_the_published_bytes():
    from protocol import watch
    from protocol.entry import packed_str

    e = Entry(hash=leaf_hash(**FIELDS), **FIELDS)
    blocks = hex_blocks()
    assert watch.topic("notes").hex() in blocks
    assert watch.encode_entries(packed_str("notes"), [e.encode()]).hex() in blocks
