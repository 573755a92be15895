"""`ledger-node --check DATA`: read a stopped node's data folder whole and say what is damaged.

Every entry of every context (served or set aside by a fork) is read with LevelDB's checksums
on, must follow the one before it (seq dense from 1) and match its leaf hash; the root rebuilt
from the entries must be the one the node would serve (from its stored Merkle nodes), and the
durable high-water mark (node/marks.py) must be covered by what is there. Nothing of the
ledger's is written (LevelDB itself, as at any open, replays its log into a table).
One line per problem, then a summary; exit status 0 when clean, 1 when damaged, 2 when the
folder cannot be read at all. It reads everything: run it offline, not on a serving node's
folder (LevelDB's lock refuses that anyway).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import msgpack

from node import marks
from node import storage as st
from node.ledger import _getter
from protocol import merkle
from protocol.entry import leaf_hash_named, leaf_names


def _entry_ok(names: bytes, seq: int, blob: bytes) -> tuple[bool, bytes]:
    try:
        e = msgpack.unpackb(blob)
        h = e["hash"]
        ok = e["seq"] == seq and h == leaf_hash_named(
            names, seq, e["key"].encode(), e["payload"], e["metadata"], e["lamport"], e["ts_ns"])
        return ok, h
    except Exception:
        return False, b""


def _leaf_of(kv: st.LevelDBKV, cid: int) -> Callable[[int], bytes]:
    def leaf(index: int) -> bytes:
        return msgpack.unpackb(kv.get(st.entry_key(cid, index + 1)) or b"\xc0")["hash"]  # type: ignore[no-any-return]
    return leaf


def check(path: str, out: Any) -> int:
    def say(msg: str) -> None:
        print(msg, file=out, flush=True)

    if not os.path.isdir(path):
        say(f"ledger-node: error: {path!r} is not a data folder")
        return 2
    try:
        kv = st.LevelDBKV(path, create=False)
    except st.StorageLocked:
        say(f"ledger-node: error: {path!r} is in use by a running ledger-node (its LevelDB lock is held); "
            "stop that node first (--check reads a stopped node's folder)")
        return 2
    except Exception as exc:
        say(f"ledger-node: error: cannot open {path!r}: {type(exc).__name__}: {exc}")
        return 2
    problems = 0
    entries = 0
    try:
        try:
            with open(os.path.join(path, marks.FILE), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        hw, hw_names, good = marks.parse(data)
        if good < len(data):
            say(f"note: {marks.FILE}: {len(data) - good} bytes after the last whole record are ignored")
        histories: list[tuple[str, dict[str, Any]]] = []
        for key, value in kv.scan(st.CTX, st.prefix_end(st.CTX)):
            histories.append((key[1:].decode(errors="replace"), msgpack.unpackb(value)))
        for key, value in kv.scan(st.ASIDE, st.prefix_end(st.ASIDE)):
            info = msgpack.unpackb(value)
            histories.append((f"{info['name']} (set aside, #{st.u32_of(key)})", {**info, "id": st.u32_of(key)}))
        seen = set()
        for label, info in histories:
            cid = info["id"]
            seen.add(cid)
            name = label.split(" (set aside", 1)[0]
            names = leaf_names(name.encode(), str(info["writer"]).encode())
            mark = hw.get(cid)
            mark_root = None
            frontier = merkle.Frontier()
            seq = 0
            trouble = None
            p = st.entry_prefix(cid)
            try:
                for k, v in kv.scan(p, st.prefix_end(p)):
                    s = st.seq_of_entry_key(k)
                    if s != seq + 1:
                        trouble = f"entries {seq + 1}..{s - 1} are missing"
                        break
                    ok, h = _entry_ok(names, s, v)
                    if not ok:
                        trouble = f"entry #{s} does not match its hash"
                        break
                    frontier.append(h)
                    seq = s
                    entries += 1
                    if mark is not None and seq == mark[0]:
                        mark_root = frontier.root()
            except st.Corruption as exc:
                trouble = f"storage is damaged after entry #{seq} ({exc})"
            if trouble is None and seq:
                try:
                    served = merkle.Frontier.load(seq, _getter(_leaf_of(kv, cid), kv.get, cid)).root()
                    if served != frontier.root():
                        trouble = "its stored Merkle nodes do not match its entries"
                except Exception as exc:
                    trouble = f"its stored Merkle nodes are damaged ({exc})"
            if trouble is not None:
                problems += 1
                say(f"DAMAGED {label!r}: {trouble}; the first {seq} entries are sound")
            if mark is not None and mark[0] > 0:
                if seq < mark[0]:
                    problems += 1
                    say(f"DAMAGED {label!r}: holds {seq} sound entries of the {mark[0]} it held "
                        f"(root {mark[1].hex()})")
                elif mark_root != mark[1]:
                    problems += 1
                    say(f"DAMAGED {label!r}: its first {mark[0]} entries differ from the ones it held "
                        f"(root {mark[1].hex()})")
        for cid, (size, root) in hw.items():
            if cid not in seen and size > 0:
                problems += 1
                name = hw_names.get(cid, ("?", "?"))[0]
                say(f"DAMAGED {name!r} (#{cid}): gone from the data folder; it held {size} entries (root {root.hex()})")
    except Exception as exc:
        say(f"ledger-node: error: reading {path!r} failed: {type(exc).__name__}: {exc}")
        return 2
    finally:
        kv.close()
    if problems:
        say(f"{path}: {problems} problem(s) in {len(histories)} histories ({entries} sound entries read); "
            "start the node to serve the sound part and repair the rest from its peers")
        return 1
    say(f"{path}: ok ({len(histories)} histories, {entries} entries, every hash and root checked)")
    return 0
