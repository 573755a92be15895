"""Error codes of protocol v1 and the exceptions that carry them.

Two sides, as in h11: `RemoteProtocolError` is what decoding or validating
untrusted bytes raises (the node turns it into an error reply); `LedgerError`
and its subclasses are what the reference client raises when a node answers
with an error, one class per stable code.
"""

from __future__ import annotations

from typing import Any, ClassVar

# Stable error codes. Clients match on these strings, never on messages.
BAD_REQUEST = "BAD_REQUEST"
UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
UNKNOWN_OP = "UNKNOWN_OP"
TOO_LARGE = "TOO_LARGE"
NOT_FOUND = "NOT_FOUND"
CONFLICT = "CONFLICT"
INTEGRITY = "INTEGRITY"
NOT_WRITER = "NOT_WRITER"
UNAVAILABLE = "UNAVAILABLE"
STORAGE = "STORAGE"
FORBIDDEN = "FORBIDDEN"
INTERNAL = "INTERNAL"

ALL_CODES = (
    BAD_REQUEST,
    UNSUPPORTED_VERSION,
    UNKNOWN_OP,
    TOO_LARGE,
    NOT_FOUND,
    CONFLICT,
    INTEGRITY,
    NOT_WRITER,
    UNAVAILABLE,
    STORAGE,
    FORBIDDEN,
    INTERNAL,
)


class RemoteProtocolError(Exception):
    """Untrusted input broke the protocol; `code` says how.

    The only exception type the decoder raises for bad input. Any other
    exception escaping the decoder is a bug in it.
    """

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


class LedgerError(Exception):
    """An error reply from a node (or a client-side failure of the same kind)."""

    code: ClassVar[str] = INTERNAL

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BadRequest(LedgerError):
    code = BAD_REQUEST


class UnsupportedVersion(LedgerError):
    code = UNSUPPORTED_VERSION


class UnknownOp(LedgerError):
    code = UNKNOWN_OP


class TooLarge(LedgerError):
    code = TOO_LARGE


class NotFound(LedgerError):
    code = NOT_FOUND


class Conflict(LedgerError):
    """`expect_seq` did not match, or a load would fork an existing context."""

    code = CONFLICT


class IntegrityError(LedgerError):
    """A hash, root or proof did not verify (server-side or in the client)."""

    code = INTEGRITY


class NotWriter(LedgerError):
    code = NOT_WRITER


class Unavailable(LedgerError):
    code = UNAVAILABLE


class Timeout(Unavailable):
    """The node did not answer within the client's timeout."""


class Unreachable(Timeout):
    """Nothing listens at the node's address: the transport saw every connection attempt refused
    (the client's socket monitor), so the client gave up early instead of waiting out its timeout.
    A `Timeout` too (no answer came), so code that handles timeouts handles this."""


class ClientClosed(BadRequest):
    """The client (or watch) was used after `close()`: make a new one."""


class StorageError(LedgerError):
    """The node's disk failed a write (full, EIO, out of file descriptors): it takes no
    writes until its storage recovers. Retrying later is safe with the same `dedup_id`."""

    code = STORAGE


class Forbidden(LedgerError):
    """The connection's key may not do this (its role, or the contexts it is limited to; SPEC 13)."""

    code = FORBIDDEN


class InternalError(LedgerError):
    code = INTERNAL


_BY_CODE: dict[str, type[LedgerError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        UnsupportedVersion,
        UnknownOp,
        TooLarge,
        NotFound,
        Conflict,
        IntegrityError,
        NotWriter,
        Unavailable,
        StorageError,
        Forbidden,
        InternalError,
    )
}


def error_for(code: str, message: str, details: dict[str, Any] | None = None) -> LedgerError:
    """The exception for an error reply; unknown codes map to the base class."""
    cls = _BY_CODE.get(code)
    if cls is None:
        err = LedgerError(message, details)
        err.code = code  # type: ignore[misc]
        return err
    return cls(message, details)
