"""Converge Ledger protocol v1: the codec, entry hashing, the Merkle tree, the Lamport clock,
digests, snapshots, addresses, the watch cursor and the errors (SPEC.md is the text).

Pure code (no sockets, disk or clock reads) except `protocol.client`, the
reference client.
"""

from protocol.codec import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
