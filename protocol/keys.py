"""Identity keys: one Ed25519 keypair per node or client, and its key file's text (SPEC 13.2).

Pure: text in, keys out; reading and writing the file is the caller's (node/identity.py,
the `ledger keygen` command).

Why Ed25519 through PyNaCl (libsodium): one long-term key serves both jobs a node has.
It signs (the heads of the logs a writer keeps, so any reader can check them against
the writer's key), and libsodium's Ed25519-to-Curve25519 conversion turns the same
keypair into the Curve25519 keypair ZeroMQ's CURVE handshake uses, so a node has one
identity to provision, pin and revoke, not two. Ed25519 signatures are deterministic
(no per-signature randomness to get wrong), 64 bytes, and verify at tens of thousands
per second per core; libsodium is audited and ships inside PyNaCl's wheels.

A public key is written as 64 lowercase hex digits (its 32 bytes), as Hypercore writes
its keys: unambiguous to read aloud, paste and grep.

The key file is text:

    # Converge Ledger identity key (Ed25519). Keep this file secret (mode 0600).
    public-key: <64 hex digits>
    secret-key: <64 hex digits: the 32-byte seed>

Lines starting with '#' and blank lines are ignored; both fields are required, each
once, and the public key must be the one the seed gives (a file edited by hand, or the
halves of two files pasted together, is refused rather than half-trusted).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import nacl.bindings
import nacl.signing

KEY_BYTES = 32
_HEX = re.compile(r"^[0-9a-f]{64}$")
HEADER = "# Converge Ledger identity key (Ed25519). Keep this file secret (mode 0600)."


class KeyFileError(ValueError):
    """A key file or a public key that cannot be used, with what is wrong with it."""


@dataclass(frozen=True)
class Identity:
    """An Ed25519 keypair. `seed` is the secret (32 bytes); everything else derives from it."""

    seed: bytes

    def __post_init__(self) -> None:
        if len(self.seed) != KEY_BYTES:
            raise KeyFileError(f"a secret key is {KEY_BYTES} bytes, got {len(self.seed)}")

    @classmethod
    def generate(cls) -> Identity:
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @functools.cached_property
    def _signing_key(self) -> nacl.signing.SigningKey:
        # (made once: expanding the seed costs about as much as a signature)
        return nacl.signing.SigningKey(self.seed)

    @functools.cached_property
    def public(self) -> bytes:
        return bytes(self._signing_key.verify_key)

    @property
    def public_hex(self) -> str:
        return self.public.hex()

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message`."""
        return bytes(self._signing_key.sign(message).signature)

    def curve_keypair(self) -> tuple[bytes, bytes]:
        """(public, secret) Curve25519 keys for ZeroMQ's CURVE, converted from this keypair."""
        sk = nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(self.seed + self.public)
        return curve_public(self.public), bytes(sk)

    def to_text(self) -> str:
        return f"{HEADER}\npublic-key: {self.public_hex}\nsecret-key: {self.seed.hex()}\n"


def parse_public_key(text: str, what: str = "public key") -> bytes:
    """A public key written as 64 hex digits (case-insensitive, surrounding space ignored)."""
    t = text.strip().lower()
    if not _HEX.match(t):
        raise KeyFileError(f"{what} must be 64 hex digits (32 bytes), got {text.strip()[:80]!r}")
    raw = bytes.fromhex(t)
    try:
        curve_public(raw)  # not every 32 bytes is a point of the curve
    except Exception:
        raise KeyFileError(f"{what} {t} is not a valid Ed25519 public key") from None
    return raw


def curve_public(ed25519_public: bytes) -> bytes:
    """The Curve25519 public key (for CURVE) of an Ed25519 public key."""
    return bytes(nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(ed25519_public))


def verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is `public`'s Ed25519 signature of `message`."""
    try:
        nacl.signing.VerifyKey(public).verify(message, signature)
        return True
    except Exception:  # BadSignatureError, or a malformed key or signature
        return False


def parse_key_file(text: str, source: str = "key file") -> Identity:
    """The identity in a key file's text (see the module docstring); KeyFileError says what is wrong."""
    fields: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        name = name.strip().lower()
        if not sep or name not in ("public-key", "secret-key"):
            raise KeyFileError(f"{source}, line {n}: expected 'public-key: HEX' or 'secret-key: HEX'")
        if name in fields:
            raise KeyFileError(f"{source}, line {n}: {name} given twice")
        fields[name] = value.strip().lower()
    for name in ("secret-key", "public-key"):
        if name not in fields:
            raise KeyFileError(f"{source}: no {name} line")
        if not _HEX.match(fields[name]):
            raise KeyFileError(f"{source}: {name} must be 64 hex digits (32 bytes)")
    ident = Identity(bytes.fromhex(fields["secret-key"]))
    if ident.public_hex != fields["public-key"]:
        raise KeyFileError(f"{source}: its public-key is not the one its secret-key gives "
                           f"({ident.public_hex}); the file was edited or pieced together")
    return ident
