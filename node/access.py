"""Who may do what: the key allowlists and the one authorization rule (SPEC 13).

Parsing is pure (allowlist text in, `Access` out; `load_access` reads the files); `Access.check(principal, op, context)` is the rule
the core applies to every request of a node that has keys. The ZAP handler (node/zap.py)
admits a CURVE handshake only for a key listed here and tags its connection with the
key's user id; every request then carries that id and is checked here.

Two files, each a list of lines (`#` starts a comment, blank lines are ignored):

- peer keys (`--peer-keys FILE`): `NODE_ID PUBLIC_KEY`. Binds each node id to its key: a
  peer message naming node id X is accepted only over a connection authenticated with X's
  key, and this node connects to X only if X proves that key.
- client keys (`--client-keys FILE`): `PUBLIC_KEY ROLE [PREFIX,...]`, ROLE one of
  `read` (get, head, contexts, proof, consistency, snapshot, watch, status, ping), `write`
  (those and append, append_batch) or `admin` (those and load). With prefixes, the key may
  touch only contexts whose names start with one of them (read and write alike).

Roles are data: a later role (a mirror, a partial replica) is a new row of ROLE_OPS.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from protocol.errors import Forbidden
from protocol.keys import KeyFileError, parse_public_key

READ_OPS = frozenset(("get", "head", "contexts", "proof", "consistency", "snapshot", "status", "ping"))
ROLE_OPS: dict[str, frozenset[str]] = {
    "read": READ_OPS,
    "write": READ_OPS | {"append", "append_batch"},
    "admin": READ_OPS | {"append", "append_batch", "load"},
    # a peer: the mesh's own requests (SPEC 17), pulls (snapshot), and what a follower asks its writer
    "peer": frozenset(("heartbeat", "sync_heads", "sync_digest", "ack", "snapshot", "snapshots", "head", "ping",
                       "status")),
}
CONTEXT_OPS = frozenset(("get", "head", "proof", "consistency", "snapshot", "append", "append_batch", "load"))
MAX_LINES = 100_000
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # as node/config.py's --id


class Principal(NamedTuple):
    """The authenticated party of a connection."""

    role: str  # a key of ROLE_OPS
    name: str  # a peer's node id, or a client key's hex
    prefixes: tuple[str, ...] = ()  # contexts it may touch ((): all)


@dataclass
class Access:
    """The allowlists of a node with keys. `users` maps a ZAP user id to its principal."""

    peers: dict[str, bytes] = field(default_factory=dict)  # node id -> Ed25519 public key
    clients: dict[bytes, Principal] = field(default_factory=dict)  # Ed25519 public key -> principal

    @property
    def users(self) -> dict[str, Principal]:
        out = {f"peer:{node_id}": Principal("peer", node_id) for node_id in self.peers}
        out.update({f"client:{k.hex()}": p for k, p in self.clients.items()})
        return out

    def user_of(self, public: bytes) -> str | None:
        """The ZAP user id of an Ed25519 public key, or None when it is not allowed in."""
        for node_id, k in self.peers.items():
            if k == public:
                return f"peer:{node_id}"
        if public in self.clients:
            return f"client:{public.hex()}"
        return None

    def check(self, who: Principal | None, op: str, context: str | None) -> None:
        """Raise Forbidden unless `who` may run `op` (on `context`)."""
        if who is None:
            raise Forbidden(f"{op}: this connection's key is not (or no longer) allowed on this node")
        if op not in ROLE_OPS.get(who.role, ()):
            raise Forbidden(f"{op} is not allowed for the {who.role} role", {"role": who.role})
        if who.prefixes and context is not None and op in CONTEXT_OPS and not context.startswith(who.prefixes):
            raise Forbidden(f"{op} of context {context!r} is not allowed for this key (it may touch contexts "
                            f"starting with {', '.join(map(repr, who.prefixes))})",
                            {"role": who.role, "context": context})


def may_watch(who: Principal | None, context: str | None, replication: bool) -> bool:
    """Whether `who` may subscribe: to a context's topic (`context`), to a prefix of topics that may
    match any context (`context` None), or to the replication stream (peers only: it carries every
    context this node writes)."""
    if who is None:
        return False
    if replication:
        return who.role == "peer"
    if context is None:
        return not who.prefixes
    return not who.prefixes or context.startswith(who.prefixes)


def _lines(text: str, source: str) -> list[tuple[int, list[str]]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if n > MAX_LINES:
            raise KeyFileError(f"{source}: more than {MAX_LINES} lines")
        words = line.split("#", 1)[0].split()
        if words:
            out.append((n, words))
    return out


def parse_peer_keys(text: str, source: str = "peer keys") -> dict[str, bytes]:
    """`NODE_ID PUBLIC_KEY` lines: node id -> key. A node id or a key listed twice is refused."""
    peers: dict[str, bytes] = {}
    for n, words in _lines(text, source):
        if len(words) != 2:
            raise KeyFileError(f"{source}, line {n}: expected 'NODE_ID PUBLIC_KEY'")
        node_id, key_text = words
        if not ID_RE.match(node_id):
            raise KeyFileError(f"{source}, line {n}: {node_id!r} is not a node id")
        key = parse_public_key(key_text, f"{source}, line {n}: the key")
        if node_id in peers:
            raise KeyFileError(f"{source}, line {n}: node {node_id} is listed twice")
        if key in peers.values():
            raise KeyFileError(f"{source}, line {n}: this key is already bound to another node id")
        peers[node_id] = key
    return peers


def parse_client_keys(text: str, source: str = "client keys") -> dict[bytes, Principal]:
    """`PUBLIC_KEY ROLE [PREFIX,...]` lines: key -> principal."""
    clients: dict[bytes, Principal] = {}
    for n, words in _lines(text, source):
        if len(words) not in (2, 3):
            raise KeyFileError(f"{source}, line {n}: expected 'PUBLIC_KEY ROLE [PREFIX,...]'")
        key = parse_public_key(words[0], f"{source}, line {n}: the key")
        role = words[1]
        if role not in ("read", "write", "admin"):
            raise KeyFileError(f"{source}, line {n}: role must be read, write or admin, got {role!r}")
        prefixes: tuple[str, ...] = ()
        if len(words) == 3:
            prefixes = tuple(p for p in words[2].split(",") if p)
            if not prefixes:
                raise KeyFileError(f"{source}, line {n}: an empty list of context prefixes")
        if key in clients:
            raise KeyFileError(f"{source}, line {n}: this key is listed twice")
        clients[key] = Principal(role, key.hex(), prefixes)
    return clients


class AccessError(Exception):
    """The allowlist files cannot be used; the message says which line and why."""


def _files(path: str) -> list[str]:
    """`path` itself, or the files of a folder (sorted; hidden ones and sub-folders skipped): one file
    per node or client is easier to provision and revoke than one shared list."""
    if not os.path.isdir(path):
        return [path]
    return [os.path.join(path, n) for n in sorted(os.listdir(path))
            if not n.startswith(".") and os.path.isfile(os.path.join(path, n))]


def load_access(config: Any) -> Access:
    """Read the allowlists a node was started with (`--peer-keys`, `--client-keys`: a file, or a
    folder whose files together are the list; a node id or key in two of them is refused)."""
    access = Access()
    for path, parse in ((config.peer_keys, parse_peer_keys), (config.client_keys, parse_client_keys)):
        if path is None:
            continue
        merged: dict[Any, Any] = {}
        for name in _files(path):
            try:
                with open(name, encoding="utf-8") as f:
                    text = f.read(64 << 20)
            except (OSError, UnicodeDecodeError) as exc:
                raise AccessError(f"cannot read {name}: {getattr(exc, 'strerror', None) or exc}") from None
            try:
                parsed = parse(text, name)
            except KeyFileError as exc:
                raise AccessError(str(exc)) from None
            for k, v in parsed.items():
                if k in merged or (parse is parse_peer_keys and v in merged.values()):
                    raise AccessError(f"{name}: {k if isinstance(k, str) else k.hex()} is listed in another file of "
                                      f"{path} too")
                merged[k] = v
        if parse is parse_peer_keys:
            access.peers = merged
        else:
            access.clients = merged
    for address, node_id in config.seed_ids:
        if node_id not in access.peers:
            raise AccessError(f"--peers {node_id}@{address}: node {node_id} is not in --peer-keys, so its key "
                              "is unknown and it could not be authenticated")
    return access
