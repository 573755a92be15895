"""Identity keys (protocol/keys.py) and the node's key file (node/identity.py)."""

from __future__ import annotations

import os
import stat

import pytest

from node import identity
from protocol.keys import Identity, KeyFileError, curve_public, parse_key_file, parse_public_key, verify

pytestmark = pytest.mark.timeout(30)

SEED = bytes(range(32))


def test_a_key_file_round_trips_and_its_public_key_is_the_seeds():
    ident = Identity(SEED)
    text = ident.to_text()
    assert text.startswith("#") and f"public-key: {ident.public_hex}" in text
    assert parse_key_file(text) == ident
    assert len(ident.public) == 32 and len(ident.public_hex) == 64


def test_one_identity_signs_and_gives_the_curve_keypair_for_zeromq():
    ident = Identity(SEED)
    sig = ident.sign(b"head")
    assert len(sig) == 64 and verify(ident.public, b"head", sig)
    assert not verify(ident.public, b"head!", sig)
    assert not verify(Identity.generate().public, b"head", sig)
    assert not verify(b"\x00" * 5, b"head", sig)  # a malformed key is a failed check, not a crash
    pub, sec = ident.curve_keypair()
    assert pub == curve_public(ident.public) and len(sec) == 32
    import nacl.bindings
    assert nacl.bindings.crypto_scalarmult_base(sec) == pub  # the secret half gives the public half


@pytest.mark.parametrize("text, message", [
    ("", "no secret-key line"),
    ("public-key: " + "ab" * 32 + "\n", "no secret-key line"),
    ("secret-key: " + SEED.hex() + "\n", "no public-key line"),
    ("secret-key: xyz\npublic-key: " + "ab" * 32, "64 hex digits"),
    ("secret-key: " + SEED.hex() + "\nsecret-key: " + SEED.hex(), "given twice"),
    ("secret-key " + SEED.hex(), "line 1: expected"),
    ("private: 1", "line 1: expected"),
    ("secret-key: " + SEED.hex() + "\npublic-key: " + Identity.generate().public_hex, "not the one its secret-key"),
])
def test_a_broken_key_file_is_refused_with_what_is_wrong(text, message):
    with pytest.raises(KeyFileError, match=message):
        parse_key_file(text)


def test_public_keys_are_64_hex_digits_and_a_curve_point():
    ident = Identity(SEED)
    assert parse_public_key(f"  {ident.public_hex.upper()} \n") == ident.public
    for bad in ("", "ab" * 31, "ab" * 33, "zz" * 32, "0x" + "ab" * 31):
        with pytest.raises(KeyFileError, match="64 hex digits"):
            parse_public_key(bad)
    # 32 bytes that are not a point of the curve (libsodium refuses to convert them)
    not_a_point = bytes.fromhex("0100000000000000000000000000000000000000000000000000000000000080")
    with pytest.raises(KeyFileError, match="not a valid"):
        parse_public_key(not_a_point.hex())


def test_the_node_makes_its_key_once_with_mode_0600_and_keeps_it(tmp_path):
    ident, created = identity.load_or_create(str(tmp_path))
    path = tmp_path / identity.KEY_FILE
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created = identity.load_or_create(str(tmp_path))
    assert again == ident and not created
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no temporary file left


def test_a_throw_away_node_writes_no_key(tmp_path):
    a, _ = identity.load_or_create(":memory:")
    b, _ = identity.load_or_create(":memory:")
    assert a != b


def test_a_key_file_others_can_read_is_refused(tmp_path):
    identity.load_or_create(str(tmp_path))
    path = tmp_path / identity.KEY_FILE
    path.chmod(0o644)
    with pytest.raises(identity.IdentityError, match=r"mode 0644.*chmod 600"):
        identity.load_or_create(str(tmp_path))


def test_a_damaged_key_file_is_refused_not_replaced(tmp_path):
    path = tmp_path / identity.KEY_FILE
    path.write_text("secret-key: " + "00" * 31 + "\n")
    path.chmod(0o600)
    with pytest.raises(identity.IdentityError, match="64 hex digits"):
        identity.load_or_create(str(tmp_path))
    assert path.read_text() == "secret-key: " + "00" * 31 + "\n"  # left as it was, for the operator


def test_write_key_file_does_not_replace_an_existing_file(tmp_path):
    path = str(tmp_path / "client.key")
    identity.write_key_file(path, Identity(SEED))
    with pytest.raises(identity.IdentityError, match="already exists"):
        identity.write_key_file(path, Identity.generate())
    assert identity.read_key_file(path) == Identity(SEED)
    identity.write_key_file(path, Identity.generate(), overwrite=True)
    assert identity.read_key_file(path) != Identity(SEED)


# -- signed heads (protocol/heads.py) ------------------------------------------------------------


def test_a_signed_head_verifies_only_for_the_writer_key_a_reader_trusts():
    from protocol.heads import from_map, sign_head

    writer, mallory = Identity(SEED), Identity.generate()
    h = sign_head(writer, "notes", 3, b"r" * 32)
    assert h.verify() and h.verify(writer.public)
    assert not h.verify(mallory.public)  # the reader pins the writer's key: a head by anyone else fails
    forged = sign_head(mallory, "notes", 3, b"r" * 32)
    assert forged.verify() and not forged.verify(writer.public)
    assert from_map(h.to_map()) == h
    assert not h._replace(context="\udcff").verify()  # not encodable: a failed check, not a crash


@pytest.mark.parametrize("change, says", [
    ({"size": -1}, "size"), ({"size": 1 << 64}, "size"), ({"size": "3"}, "size"), ({"epoch": True}, "epoch"),
    ({"root": b"r" * 31}, "root"), ({"key": "k" * 32}, "key"), ({"sig": b"s" * 63}, "sig"),
    ({"context": 7}, "context"), ({"context": "x" * 1025}, "context"),
])
def test_a_malformed_signed_head_map_is_refused_with_the_field(change, says):
    from protocol.errors import RemoteProtocolError
    from protocol.heads import from_map, sign_head

    m = {**sign_head(Identity(SEED), "notes", 3, b"r" * 32).to_map(), **change}
    with pytest.raises(RemoteProtocolError, match=says):
        from_map(m)
    with pytest.raises(RemoteProtocolError, match="map"):
        from_map([1, 2])


# -- allowlists (node/access.py) -----------------------------------------------------------------


def test_an_allowlist_may_be_a_folder_of_files_one_per_party(tmp_path):
    from types import SimpleNamespace

    from node.access import AccessError, load_access

    a, b, c = (Identity.generate() for _ in range(3))
    peers = tmp_path / "peers.d"
    peers.mkdir()
    (peers / "n1").write_text(f"n1 {a.public_hex}\n")
    (peers / "n2.txt").write_text(f"# node two\nn2 {b.public_hex}\n")
    (peers / ".n3.swp").write_text("junk that is skipped")
    clients = tmp_path / "clients.txt"
    clients.write_text(f"{c.public_hex} read notes\n")
    cfg = SimpleNamespace(peer_keys=str(peers), client_keys=str(clients), seed_ids=(("h:1", "n2"),))
    access = load_access(cfg)
    assert access.peers == {"n1": a.public, "n2": b.public} and access.clients[c.public].prefixes == ("notes",)
    (peers / "n9").write_text(f"n9 {a.public_hex}\n")  # n1's key again, under another id
    with pytest.raises(AccessError, match="listed in another file"):
        load_access(cfg)
    (peers / "n9").write_text(f"n1 {c.public_hex}\n")  # n1 again, with another key
    with pytest.raises(AccessError, match="listed in another file"):
        load_access(cfg)
    (peers / "n9").unlink()
    with pytest.raises(AccessError, match="node n7 is not in --peer-keys"):
        load_access(SimpleNamespace(peer_keys=str(peers), client_keys=None, seed_ids=(("h:1", "n7"),)))
