"""SPEC 6.9 as an outside implementer reads it (issue #18): how a node recognises a load's first
chunk, what `received` counts, older snapshots, empty snapshots, and who writes a loaded context."""

from __future__ import annotations

import io

import pytest

from node import storage as st
from protocol import codec
from protocol.errors import BadRequest, Conflict, IntegrityError
from protocol.merkle import EMPTY_ROOT
from protocol.snapshot import read_snapshot
from tests.unit.test_ledger import app, keys_of, load_bytes, make, snapshot_bytes, snapshot_bytes_prefix

pytestmark = pytest.mark.timeout(60)


def source(n: int = 10):
    src = make()
    for i in range(n):
        app(src, "ctx", payload=str(i).encode())
    return src


def entries_of(blob: bytes):
    header, entries = read_snapshot(io.BytesIO(blob))
    return header, list(entries)


def test_a_first_chunk_not_at_seq_1_is_an_unknown_load_and_a_gap_later_is_integrity():
    header, es = entries_of(snapshot_bytes(source(), "ctx"))
    dst = make(node_id="n2")
    # a load_id the node has no load for starts a load: it must begin at seq 1
    with pytest.raises(BadRequest, match="unknown"):
        dst.load(codec.Load("ctx", "L1", 10, header["root"], tuple(es[3:6])), sync=False)
    assert dst.status()["loads_in_progress"] == 0 and "ctx" not in dst.contexts
    # within a load in progress, an entry that does not follow is INTEGRITY, and drops the load
    assert dst.load(codec.Load("ctx", "L1", 10, header["root"], tuple(es[:3])), sync=False) is None
    with pytest.raises(IntegrityError):
        dst.load(codec.Load("ctx", "L1", 10, header["root"], tuple(es[4:6])), sync=False)
    assert dst.status()["loads_in_progress"] == 0 and "ctx" not in dst.contexts
    assert not any(k.startswith(st.STAGE) for k in keys_of(dst.kv))


def test_received_counts_the_entries_the_load_holds_so_far():
    header, es = entries_of(snapshot_bytes(source(), "ctx"))
    dst = make(node_id="n2")
    for end in (3, 7):
        start = 0 if end == 3 else 3
        assert dst.load(codec.Load("ctx", "L1", 10, header["root"], tuple(es[start:end])), sync=False) is None
        assert dst.load_received("L1") == end  # entries of every chunk so far, not chunks, not this chunk's
    assert dst.load_received("unknown") == 0


def test_loading_an_older_shorter_snapshot_of_the_same_history_is_harmless():
    src = source()
    dst = make(node_id="n2")
    assert load_bytes(dst, "ctx", snapshot_bytes(src, "ctx"))["size"] == 10
    root = dst.head("ctx")["root"]
    before = keys_of(dst.kv)
    head = load_bytes(dst, "ctx", snapshot_bytes_prefix(src, "ctx", 4), chunk=2)
    assert head is not None and (head["size"], head["root"]) == (10, root)  # the context's head, unchanged
    assert keys_of(dst.kv) == before  # nothing staged, nothing written
    assert dst.status()["loads_in_progress"] == 0


def test_an_older_snapshot_of_another_history_is_a_conflict_at_its_first_chunk():
    dst = make(node_id="n2")
    load_bytes(dst, "ctx", snapshot_bytes(source(), "ctx"))
    other = make()  # the same writer's id, another history (a writer that lost a tail, async)
    for i in range(4):
        app(other, "ctx", payload=b"other %d" % i)
    header, es = entries_of(snapshot_bytes(other, "ctx"))
    with pytest.raises(Conflict) as info:
        dst.load(codec.Load("ctx", "L2", 4, header["root"], tuple(es[:2])), sync=False)
    assert info.value.details == {"size": 10}
    assert dst.status()["loads_in_progress"] == 0 and dst.head("ctx")["size"] == 10


def test_an_older_snapshot_whose_entries_do_not_match_its_root_is_integrity():
    src = source()
    dst = make(node_id="n2")
    load_bytes(dst, "ctx", snapshot_bytes(src, "ctx"))
    header, es = entries_of(snapshot_bytes_prefix(src, "ctx", 4))
    with pytest.raises(IntegrityError):  # the entries are checked even though nothing is added
        dst.load(codec.Load("ctx", "L3", 4, header["root"], tuple(es[:3]), final=True), sync=False)


def test_an_empty_snapshot_creates_an_empty_context_written_by_the_loading_node():
    dst = make(node_id="n2")
    head = dst.load(codec.Load("fresh", "L1", 0, EMPTY_ROOT, (), final=True), sync=False)
    assert head is not None and (head["size"], head["writer"], head["root"]) == (0, "n2", EMPTY_ROOT)
    assert dst.head("fresh")["size"] == 0
    app(dst, "other")
    # into a context that exists, it adds nothing
    assert dst.load(codec.Load("other", "L2", 0, EMPTY_ROOT, (), final=True), sync=False)["size"] == 1


def test_a_loaded_context_keeps_the_writer_its_entries_name():
    """One context, one writer, named in every entry (SPEC 17): a node that loads another
    node's snapshot holds a replica of that writer's context; its own snapshot it writes on."""
    dst = make(node_id="n2")
    load_bytes(dst, "ctx", snapshot_bytes(source(3), "ctx"))
    assert dst.head("ctx")["writer"] == "n1" and dst.contexts["ctx"].writer == "n1"
    fields, blobs = dst.snapshot_page(codec.Snapshot("ctx", limit=10))  # reads re-check the hashes
    assert len(blobs) == 3 and dst.status()["integrity_errors"] == 0
    own = make(node_id="n1")
    load_bytes(own, "ctx", snapshot_bytes(source(3), "ctx"))
    assert (app(own, "ctx", payload=b"new").seq, own.head("ctx")["writer"]) == (4, "n1")


def test_a_snapshot_whose_entries_name_two_writers_is_integrity():
    header, es = entries_of(snapshot_bytes(source(4), "ctx"))
    other = make(node_id="n9")
    for i in range(4):
        app(other, "ctx", payload=str(i).encode())
    _, theirs = entries_of(snapshot_bytes(other, "ctx"))
    dst = make(node_id="n2")
    with pytest.raises(IntegrityError, match="one writer"):
        dst.load(codec.Load("ctx", "L1", 4, header["root"], (es[0], theirs[1])), sync=False)
    assert "ctx" not in dst.contexts and dst.status()["loads_in_progress"] == 0


def test_a_snapshot_of_another_writer_does_not_extend_a_context_written_here():
    dst = make(node_id="n2")
    app(dst, "ctx", payload=b"mine")
    header, es = entries_of(snapshot_bytes(source(3), "ctx"))
    with pytest.raises(Conflict) as info:
        dst.load(codec.Load("ctx", "L1", 3, header["root"], tuple(es)), sync=False)
    assert info.value.details["writer"] == "n2" and dst.head("ctx")["size"] == 1
