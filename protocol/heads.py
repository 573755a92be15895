"""Signed heads: a writer's Ed25519 signature over (context, size, root, its key, epoch) (SPEC 13.6).

A Merkle root alone proves that a node holds *some* history; a head signed by the
context's writer proves that the writer wrote this one, up to `size`. Anyone holding the
writer's public key checks it, whichever node served it, as Hypercore signs its logs.

The signed bytes (exact; big-endian integers):

    "converge-ledger signed head v1\\n"   31 bytes of ASCII: domain separation, so the
                                         signature means nothing in any other protocol
    u16  length of the context name in UTF-8, then those bytes
    u64  size
    32 B root (the Merkle root at `size`, SPEC 8.2)
    32 B the writer's Ed25519 public key
    u64  epoch (0: reserved for handing a context to another writer later)

The signature is Ed25519 (RFC 8032) over those bytes: 64 bytes. On the wire a signed head is a
map {context, size, root, key, epoch, sig} (SPEC 13.6); `from_map` validates every field of it.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from protocol.errors import BAD_REQUEST, RemoteProtocolError
from protocol.keys import Identity, verify

DOMAIN = b"converge-ledger signed head v1\n"
MAX_U64 = (1 << 64) - 1
MAX_CONTEXT_BYTES = 1024


class SignedHead(NamedTuple):
    context: str
    size: int
    root: bytes
    key: bytes  # the writer's Ed25519 public key
    epoch: int
    sig: bytes

    def verify(self, key: bytes | None = None) -> bool:
        """Whether `sig` is the signature of this head by `key` (default: the head's own `key`;
        a reader passes the writer's key it trusts, so that a head signed by anyone else fails)."""
        if key is not None and key != self.key:
            return False
        try:
            msg = head_bytes(self.context, self.size, self.root, self.key, self.epoch)
        except ValueError:
            return False
        return verify(self.key, msg, self.sig)

    def to_map(self) -> dict[str, Any]:
        return {"context": self.context, "size": self.size, "root": self.root, "key": self.key,
                "epoch": self.epoch, "sig": self.sig}


def head_bytes(context: str, size: int, root: bytes, key: bytes, epoch: int = 0) -> bytes:
    """The exact bytes a writer signs (module docstring)."""
    name = context.encode("utf-8")
    if len(name) > MAX_CONTEXT_BYTES:
        raise ValueError("context name too long")
    if not 0 <= size <= MAX_U64 or not 0 <= epoch <= MAX_U64:
        raise ValueError("size and epoch are u64")
    if len(root) != 32 or len(key) != 32:
        raise ValueError("root and key are 32 bytes")
    return b"".join((DOMAIN, struct.pack(">H", len(name)), name, struct.pack(">Q", size), root, key,
                     struct.pack(">Q", epoch)))


def sign_head(writer: Identity, context: str, size: int, root: bytes, epoch: int = 0) -> SignedHead:
    key = writer.public
    return SignedHead(context, size, root, key, epoch, writer.sign(head_bytes(context, size, root, key, epoch)))


def from_map(m: Any) -> SignedHead:
    """A signed head from its wire map; RemoteProtocolError (BAD_REQUEST) names what is wrong.
    (It checks the form, not the signature: `SignedHead.verify` does that.)"""
    if not isinstance(m, dict):
        raise RemoteProtocolError(BAD_REQUEST, "a signed head must be a map")
    context, size, root, key, epoch, sig = (m.get(k) for k in ("context", "size", "root", "key", "epoch", "sig"))
    if not isinstance(context, str) or len(context.encode("utf-8", "surrogatepass")) > MAX_CONTEXT_BYTES:
        raise RemoteProtocolError(BAD_REQUEST, "signed head: context must be a string")
    for name, v in (("size", size), ("epoch", epoch)):
        if type(v) is not int or not 0 <= v <= MAX_U64:
            raise RemoteProtocolError(BAD_REQUEST, f"signed head: {name} must be an integer 0..2^64-1")
    for name, v, n in (("root", root, 32), ("key", key, 32), ("sig", sig, 64)):
        if not isinstance(v, bytes) or len(v) != n:
            raise RemoteProtocolError(BAD_REQUEST, f"signed head: {name} must be {n} bytes")
    assert isinstance(size, int) and isinstance(epoch, int)
    assert isinstance(root, bytes) and isinstance(key, bytes) and isinstance(sig, bytes)
    return SignedHead(context, size, root, key, epoch, sig)
