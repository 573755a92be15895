"""`ledger backup DIR` and `ledger restore DIR`: every context of a node, as verified snapshot files.

A backup folder holds one snapshot file per context (SPEC 10, verified against the node's root
while it is written, fsynced, renamed into place) and `backup.json`, the manifest:

    {"format": "converge-ledger-backup", "version": 1, "node": <node id>, "started": <unix s>,
     "finished": <unix s> or null, "contexts": {<name>: {"file", "size", "root" (hex)}}}

The manifest is rewritten (atomically) every few seconds and at the end, so a backup cut short
is resumed by running it again: a context whose file is listed and whose head on the node is
still that size and root is kept, anything else is snapshotted (again). `restore` loads each
listed file into the node, skipping a context the node already holds at that size and root; the
node verifies every entry, and a context it refuses (CONFLICT: another history) is reported and
the others go on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

from protocol import merkle
from protocol.client import Client
from protocol.errors import LedgerError, NotFound
from protocol.snapshot import SnapshotVerifier, encode_header, read_snapshot
from tools.progress import Progress

IMPORT_BATCH = 500  # entries per append_batch of an import (one dedup id each)
MANIFEST = "backup.json"
FORMAT = "converge-ledger-backup"
SAVE_EVERY_S = 5.0
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,200}\.snap")  # what file_name makes: no path, no dot-dot
_ROOT_HEX = re.compile(r"[0-9a-f]{64}")


class BackupError(Exception):
    """A backup folder that cannot be used (not one, another format, unreadable)."""


def file_name(context: str) -> str:
    """A file name for a context's snapshot: readable, and unique by a hash of the whole name."""
    safe = _UNSAFE.sub("_", context)[:40].strip("._") or "context"
    return f"{safe}-{hashlib.sha256(context.encode()).hexdigest()[:16]}.snap"


def write_snapshot(c: Client, context: str, target: str,
                   on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """A verified snapshot of `context` at `target`: written beside it, fsynced, then renamed, so a
    failure or Ctrl-C never leaves a partial file under the target's name."""
    target = os.path.abspath(target)
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{os.urandom(4).hex()}.partial")
    # O_EXCL: never follow or clobber anything already there; 0o666: the usual umask permissions
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                info = c.snapshot(context, f, on_progress=on_progress)
            except NotFound:
                # no such context: an empty snapshot of it (what importing it would add: nothing)
                f.seek(0)
                f.truncate()
                f.write(encode_header(context, 0, merkle.EMPTY_ROOT))
                info = {"context": context, "size": 0, "root": merkle.EMPTY_ROOT, "missing": True}
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return info


def read_manifest(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except FileNotFoundError:
        raise BackupError(f"{folder!r} holds no {MANIFEST}: not a backup folder (made by `ledger backup`)") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"cannot read {path!r}: {exc}") from None
    if not (isinstance(m, dict) and m.get("format") == FORMAT and m.get("version") == 1
            and isinstance(m.get("contexts"), dict)):
        raise BackupError(f"{path!r} is not a {FORMAT} version 1 manifest")
    for name, info in m["contexts"].items():
        # a manifest is input: each entry a plain file name in the folder, a size, a 32-byte root
        if not (isinstance(info, dict) and isinstance(info.get("file"), str) and _FILE_NAME.fullmatch(info["file"])
                and type(info.get("size")) is int and 0 <= info["size"] < 1 << 64
                and isinstance(info.get("root"), str) and _ROOT_HEX.fullmatch(info["root"])):
            raise BackupError(f"{path!r}: the entry of context {name!r} is malformed (it needs a file name in the "
                              "folder, a size and a 64-digit hex root)")
    return m


def _save(folder: str, m: dict[str, Any]) -> None:
    path = os.path.join(folder, MANIFEST)
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(m, f, ensure_ascii=False, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _counts(done: int, total: int, nbytes: int, progress: Progress) -> str:
    return f"{done:,}/{total:,} contexts, {nbytes / 1e6:,.1f} MB, {progress.elapsed():,.1f} s"


def _holds(c: Client, name: str, listed: dict[str, Any]) -> bool:
    """Whether the node holds `name` at the size and root a manifest lists for it."""
    try:
        h = c.head(name)
    except NotFound:
        return False
    return bool(h.size == listed["size"] and h.root.hex() == listed["root"])


def backup(c: Client, folder: str, quiet: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Back up every context into `folder` (made if missing; resumed if it holds a backup)."""
    os.makedirs(folder, exist_ok=True)
    try:
        m = read_manifest(folder)
    except BackupError:
        if os.path.exists(os.path.join(folder, MANIFEST)):
            raise
        m = {"format": FORMAT, "version": 1, "contexts": {}}
    node = c.status().get("node_id")
    if m.get("node") not in (None, node):
        raise BackupError(f"{folder!r} holds a backup of node {m['node']!r}, not of {node!r}: use another folder")
    m.update(node=node, started=m.get("started") or round(time.time(), 3), finished=None)
    listed = c.contexts()
    total = len(listed)
    with Progress("backup", quiet) as progress:
        kept = written = nbytes = 0
        saved = time.monotonic()
        for i, item in enumerate(listed):
            name = item["name"]
            old = m["contexts"].get(name)
            if old is not None and os.path.isfile(os.path.join(folder, old["file"])) and _holds(c, name, old):
                kept += 1
                progress.update(_counts(i + 1, total, nbytes, progress))
                continue
            fname = file_name(name)
            info = write_snapshot(c, name, os.path.join(folder, fname))
            nbytes += os.path.getsize(os.path.join(folder, fname))
            m["contexts"][name] = {"file": fname, "size": info["size"], "root": bytes(info["root"]).hex()}
            written += 1
            progress.update(_counts(i + 1, total, nbytes, progress))
            if time.monotonic() - saved >= SAVE_EVERY_S:
                _save(folder, m)
                saved = time.monotonic()
        m["finished"] = round(time.time(), 3)
        _save(folder, m)
        progress.done(_counts(len(listed), len(listed), nbytes, progress))
    gone = sorted(set(m["contexts"]) - {it["name"] for it in listed})
    if gone:
        say(f"note: {len(gone)} context(s) in the backup are no longer on the node (kept in the backup): "
            + ", ".join(map(repr, gone[:10])) + (" ..." if len(gone) > 10 else ""))
    return {"folder": folder, "node": node, "contexts": len(listed), "written": written, "kept": kept,
            "bytes_written": nbytes}


def restore(c: Client, folder: str, quiet: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Load every context of the backup in `folder` into the node; returns a summary whose
    `failed` lists the contexts that could not be restored (and why)."""
    m = read_manifest(folder)
    if m.get("finished") is None:
        say(f"note: the backup in {folder!r} was not finished; restoring the contexts it holds")
    items = sorted(m["contexts"].items())
    with Progress("restore", quiet) as progress:
        total = len(items)
        loaded = present = nbytes = 0
        failed: list[dict[str, str]] = []
        for i, (name, info) in enumerate(items):
            if _holds(c, name, info):
                present += 1
                progress.update(_counts(i + 1, total, nbytes, progress))
                continue
            path = os.path.join(folder, info["file"])
            try:
                with open(path, "rb") as f:
                    c.load(name, f)
                nbytes += os.path.getsize(path)
                loaded += 1
            except (LedgerError, OSError, ValueError) as exc:
                failed.append({"context": name, "error": str(exc)})
                say(f"restore: {name!r} not restored: {exc}")
            progress.update(_counts(i + 1, total, nbytes, progress))
        progress.done(_counts(len(items), len(items), nbytes, progress))
    return {"folder": folder, "backup_of": m.get("node"), "contexts": len(items), "loaded": loaded,
            "already_there": present, "bytes_loaded": nbytes, "failed": failed}


def import_snapshot(c: Client, context: str, path: str,
                    on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Append the entries of the snapshot file at `path` (of any context) to `context`, after its
    own, as new entries: same key, payload and metadata, plus `import.context`, `import.seq` and
    `import.hash` naming the entry they copy. The file is verified whole (every hash, its root)
    before anything is appended; batches carry dedup ids made of the snapshot's root and seqs, so
    an import cut short and run again does not append anything twice (SPEC 6.1: the node keeps
    the last 10,000 dedup ids of a context, i.e. imports of up to 5M entries)."""
    with open(path, "rb") as f:
        header, entries = read_snapshot(f)
        verifier = SnapshotVerifier(header["context"], header["size"], header["root"])
        for e in entries:
            verifier.add(e)
        verifier.finish()
    source, tag = header["context"], bytes(header["root"]).hex()[:16]
    first = last = None
    batch: list[tuple[str, bytes, dict[str, str]]] = []
    seqs: list[int] = []

    def flush() -> None:
        nonlocal first, last
        got = c.append_batch(context, batch, dedup_id=f"import:{tag}:{seqs[0]}-{seqs[-1]}")
        first = got[0].seq if first is None else first
        last = got[-1].seq
        if on_progress is not None:
            on_progress(seqs[-1], header["size"])
        batch.clear()
        seqs.clear()

    with open(path, "rb") as f:
        _, entries = read_snapshot(f)
        for e in entries:
            meta = dict(e.metadata)
            meta.update({"import.context": source, "import.seq": str(e.seq), "import.hash": e.hash.hex()})
            batch.append((e.key, e.payload, meta))
            seqs.append(e.seq)
            if len(batch) >= IMPORT_BATCH:
                flush()
        if batch:
            flush()
    return {"context": context, "imported": header["size"], "from_context": source,
            "from_root": bytes(header["root"]).hex(), "first_seq": first, "last_seq": last}
