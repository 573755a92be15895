"""Converge Ledger protocol v1: codec, entry hashing, Merkle tree, Lamport clock, errors.

Pure code (no sockets, disk or clock reads) except `protocol.client`, the
reference client.
"""

from protocol.codec import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
