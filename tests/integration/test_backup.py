"""`ledger backup DIR` / `ledger restore DIR`: a whole node, verified, resumable, idempotent."""

from __future__ import annotations

import json

import pytest

from protocol.client import Client
from tests.integration.test_cli import one, run
from tools import backup as backups

pytestmark = pytest.mark.timeout(90)

NAMES = ["notes", "traces/agent 1", "ünïcode/ctx", "a" * 200]


def _fill(n, zctx) -> dict:
    with Client(n.address, zctx=zctx) as c:
        for i, name in enumerate(NAMES):
            for j in range(5 + 3 * i):
                c.append(name, f"{name}:{j}")
        return {name: c.head(name) for name in NAMES}


def _heads(n, zctx) -> dict:
    with Client(n.address, zctx=zctx) as c:
        return {name: (h.size, h.root) for name in NAMES for h in [c.head(name)]}


def test_backup_then_restore_into_an_empty_node_gives_the_same_heads(node_factory, zctx, tmp_path, capsys):
    n1 = node_factory(name="n1")
    want = {k: (h.size, h.root) for k, h in _fill(n1, zctx).items()}
    folder = tmp_path / "bk"
    rc, out, err = run(capsys, n1, "backup", str(folder))
    assert rc == 0 and err == ""  # --json: no progress lines
    summary = one(out)
    assert summary["contexts"] == 4 and summary["written"] == 4 and summary["kept"] == 0
    manifest = json.loads((folder / backups.MANIFEST).read_text())
    assert manifest["finished"] is not None and set(manifest["contexts"]) == set(NAMES)
    assert len({v["file"] for v in manifest["contexts"].values()}) == 4  # distinct files, long name too

    n2 = node_factory(name="n2")
    rc, out, _ = run(capsys, n2, "restore", str(folder))
    assert rc == 0 and one(out)["loaded"] == 4 and one(out)["failed"] == []
    assert _heads(n2, zctx) == want
    rc, out, _ = run(capsys, n2, "restore", str(folder))  # again: nothing to do
    assert rc == 0 and one(out)["already_there"] == 4 and one(out)["loaded"] == 0


def test_a_backup_run_again_keeps_what_did_not_change(node_factory, zctx, tmp_path, capsys):
    n1 = node_factory()
    _fill(n1, zctx)
    folder = tmp_path / "bk"
    assert run(capsys, n1, "backup", str(folder))[0] == 0
    rc, out, _ = run(capsys, n1, "backup", str(folder))
    assert rc == 0 and one(out)["kept"] == 4 and one(out)["written"] == 0
    with Client(n1.address, zctx=zctx) as c:
        c.append("notes", "later")
    rc, out, _ = run(capsys, n1, "backup", str(folder))
    assert one(out)["kept"] == 3 and one(out)["written"] == 1
    assert json.loads((folder / backups.MANIFEST).read_text())["contexts"]["notes"]["size"] == 6


def test_progress_goes_to_stderr_without_json(node_factory, zctx, tmp_path, capsys):
    n1 = node_factory()
    _fill(n1, zctx)
    rc, out, err = run(capsys, n1, "backup", str(tmp_path / "bk"), as_json=False)
    assert rc == 0 and "backup: 4/4 contexts" in err and "written: 4" in out


def test_restore_refuses_a_folder_that_is_no_backup_before_asking_the_node(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    rc, _, err = run(capsys, "127.0.0.1:1", "restore", str(tmp_path / "x"))
    assert rc == 2 and "holds no backup.json" in err
    (tmp_path / "x" / backups.MANIFEST).write_text('{"format": "something else"}')
    rc, _, err = run(capsys, "127.0.0.1:1", "restore", str(tmp_path / "x"))
    assert rc == 2 and "is not a converge-ledger-backup version 1 manifest" in err


def test_a_backup_folder_of_another_node_is_refused(node_factory, zctx, tmp_path, capsys):
    n1, n2 = node_factory(name="n1"), node_factory(name="n2")
    _fill(n1, zctx)
    assert run(capsys, n1, "backup", str(tmp_path / "bk"))[0] == 0
    rc, _, err = run(capsys, n2, "backup", str(tmp_path / "bk"))
    assert rc == 2 and "holds a backup of node" in err


def test_a_context_the_node_holds_differently_is_reported_and_the_rest_restored(node_factory, zctx, tmp_path,
                                                                                 capsys):
    n1 = node_factory(name="n1")
    want = {k: (h.size, h.root) for k, h in _fill(n1, zctx).items()}
    assert run(capsys, n1, "backup", str(tmp_path / "bk"))[0] == 0
    n2 = node_factory(name="n2")
    with Client(n2.address, zctx=zctx) as c:
        c.append("notes", "another history")
    rc, out, err = run(capsys, n2, "restore", str(tmp_path / "bk"))
    summary = one(out)
    assert rc == 1 and [f["context"] for f in summary["failed"]] == ["notes"] and summary["loaded"] == 3
    assert "CONFLICT" in summary["failed"][0]["error"] and "'notes' not restored" in err
    got = _heads(n2, zctx)
    assert all(got[k] == want[k] for k in NAMES if k != "notes")


def test_load_import_branches_a_context_with_its_origin_in_metadata(node, zctx, tmp_path, capsys):
    with Client(node.address, zctx=zctx) as c:
        for i in range(3):
            c.append("agent-a", f"fact {i}", key="facts", metadata={"by": "a"})
        c.append("agent-b", "b's own")
        src = c.head("agent-a")
    snap = tmp_path / "a.snap"
    assert run(capsys, node, "snapshot", "agent-a", "-o", str(snap))[0] == 0
    rc, out, _ = run(capsys, node, "load", "agent-b", str(snap), "--import")
    assert rc == 0 and one(out)["imported"] == 3 and (one(out)["first_seq"], one(out)["last_seq"]) == (2, 4)
    again = one(run(capsys, node, "load", "agent-b", str(snap), "--import")[1])
    assert (again["first_seq"], again["last_seq"]) == (2, 4)  # run again: nothing appended twice
    with Client(node.address, zctx=zctx) as c:
        es = c.get("agent-b").entries
        orig = c.get("agent-a").entries
    assert [e.payload for e in es] == [b"b's own", b"fact 0", b"fact 1", b"fact 2"]
    assert es[1].key == "facts" and es[1].metadata == {
        "by": "a", "import.context": "agent-a", "import.seq": "1", "import.hash": orig[0].hash.hex()}
    assert src.size == 3


def test_a_snapshot_of_an_unknown_context_is_empty_with_a_note(node, tmp_path, capsys):
    snap = tmp_path / "none.snap"
    rc, out, err = run(capsys, node, "snapshot", "nosuch", "-o", str(snap))
    assert rc == 0 and one(out)["size"] == 0 and "does not exist on the node: wrote an empty snapshot" in err
    rc, out, _ = run(capsys, node, "load", "target", str(snap), "--import")
    assert rc == 0 and one(out)["imported"] == 0


def test_an_import_of_a_damaged_snapshot_appends_nothing(node, zctx, tmp_path, capsys):
    with Client(node.address, zctx=zctx) as c:
        for i in range(3):
            c.append("src", f"payload-{i}")
    snap = tmp_path / "s.snap"
    assert run(capsys, node, "snapshot", "src", "-o", str(snap))[0] == 0
    data = bytearray(snap.read_bytes())
    i = data.rfind(b"payload-2")
    data[i] ^= 0x01
    snap.write_bytes(bytes(data))
    rc, _, err = run(capsys, node, "load", "dst", str(snap), "--import")
    assert rc in (1, 2) and ("INTEGRITY" in err or "does not match" in err), err
    with Client(node.address, zctx=zctx) as c:
        assert c.contexts() == [{"name": "src", "size": 3}]


@pytest.mark.parametrize("entry", [
    {"file": "../../etc/passwd", "size": 1, "root": "00" * 32},
    {"file": "/etc/passwd", "size": 1, "root": "00" * 32},
    {"file": "x.snap", "size": -1, "root": "00" * 32},
    {"file": "x.snap", "size": 2**64, "root": "00" * 32},
    {"file": "x.snap", "size": 1, "root": "zz"},
    {"file": "x.snap", "root": "00" * 32},
    ["not", "a", "map"],
])
def test_a_manifest_with_a_malformed_entry_is_refused_before_anything_is_read(tmp_path, capsys, entry):
    folder = tmp_path / "bk"
    folder.mkdir()
    (folder / backups.MANIFEST).write_text(json.dumps(
        {"format": backups.FORMAT, "version": 1, "contexts": {"c": entry}}))
    rc, _, err = run(capsys, "127.0.0.1:1", "restore", str(folder))
    assert rc == 2 and "the entry of context 'c' is malformed" in err
