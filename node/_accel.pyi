# node/_accel.c (optional; see node/ledger.py `wire_parts`, `packed_parts` and `Ledger.verified`)
from typing import Any

def replica_parts(
    maps: list[Any], first_seq: int, context: str, writer: str, names: bytes, context_packed: bytes,
    writer_packed: bytes,
) -> tuple[list[bytes], list[bytes], list[str], list[bytes], int, int] | None: ...
def stored_preimage(blob: bytes, seq: int, names: bytes, context_packed: bytes, writer_packed: bytes) -> bytes | None: ...
def packed_parts(
    blobs: list[Any], first_seq: int, context: str,
) -> tuple[list[bytes], list[bytes], list[str], int, int, str] | None: ...
