"""Converge Ledger for library users: `from converge_ledger import Client`.

The public names of the reference client and the protocol, under one import name of their own.
The code still lives in the top-level `protocol` and `node` packages (a project folder of those
names ahead of site-packages on sys.path shadows them; moving them in here is issue #13's); this
module names what is meant to be used:

    from converge_ledger import Client, NotFound

    with Client("127.0.0.1:7400") as c:
        entry = c.append("notes", b"hello")
        for e in c.get("notes").entries:
            print(e.seq, e.payload)

Anything not listed in `__all__` may change without notice.
"""

from node import __version__
from node.identity import read_key_file
from protocol.aioclient import AsyncClient, AsyncWatch
from protocol.client import Client, ConsistencyProof, GetResult, Head, InclusionProof, Watch
from protocol.codec import PROTOCOL_VERSION
from protocol.entry import Entry
from protocol.errors import (
    BadRequest,
    ClientClosed,
    Conflict,
    Forbidden,
    IntegrityError,
    InternalError,
    LedgerError,
    NotFound,
    NotWriter,
    StorageError,
    Timeout,
    TooLarge,
    Unavailable,
    UnknownOp,
    Unreachable,
    UnsupportedVersion,
)
from protocol.keys import Identity

__all__ = [
    "read_key_file",
    "PROTOCOL_VERSION",
    "AsyncClient",
    "AsyncWatch",
    "BadRequest",
    "Client",
    "ClientClosed",
    "Conflict",
    "ConsistencyProof",
    "Entry",
    "GetResult",
    "Head",
    "InclusionProof",
    "Identity",
    "IntegrityError",
    "InternalError",
    "LedgerError",
    "NotFound",
    "NotWriter",
    "StorageError",
    "Forbidden",
    "Timeout",
    "TooLarge",
    "Unavailable",
    "UnknownOp",
    "Unreachable",
    "UnsupportedVersion",
    "Watch",
    "__version__",
]
