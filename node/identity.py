"""The node's long-term identity: its Ed25519 keypair in `<data>/node.key`, made on first start.

The file's text is protocol/keys.py's; this module only reads and writes it, with the
care a secret needs: it is created with mode 0600 in one step (never world-readable,
not even for a moment), written to a temporary name and renamed, so a crash leaves no
half-written key, and a key file that others can read is refused at start (as SSH
refuses a private key that others can read) rather than used.
"""

from __future__ import annotations

import os
import stat

from protocol.keys import Identity, KeyFileError, parse_key_file

KEY_FILE = "node.key"


class IdentityError(Exception):
    """The identity cannot be loaded or made; the message says why and what to do."""


def write_key_file(path: str, ident: Identity, overwrite: bool = False) -> None:
    """Write `ident` to `path` (mode 0600). Refuses to replace an existing file unless `overwrite`."""
    if os.path.lexists(path) and not overwrite:
        raise IdentityError(f"{path} already exists; it is not replaced (move it away first, or pass --force)")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, ident.to_text().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise IdentityError(f"cannot write key file {path}: {exc.strerror or exc}") from None
    folder = os.path.dirname(os.path.abspath(path))
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename itself survives a crash
        finally:
            os.close(dfd)
    except OSError:
        pass


def read_key_file(path: str) -> Identity:
    """The identity in the key file at `path`; refused if others may read it."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise IdentityError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"key file {path} can be read by other users (mode {stat.S_IMODE(st.st_mode):04o}); it holds a "
            f"secret key: run `chmod 600 {path}` (and make a new key if others may have read it)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(64 << 10)
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"cannot read key file {path}: {exc}") from None
    try:
        return parse_key_file(text, path)
    except KeyFileError as exc:
        raise IdentityError(str(exc)) from None


def load_or_create(data: str) -> tuple[Identity, bool]:
    """The node's identity from `<data>/node.key`, made there on first start; (identity, created).
    A throw-away node (`:memory:`) gets a new identity each start and writes nothing."""
    if data == ":memory:":
        return Identity.generate(), True
    path = os.path.join(data, KEY_FILE)
    if os.path.lexists(path):
        return read_key_file(path), False
    ident = Identity.generate()
    write_key_file(path, ident)
    return ident, True
