"""protocol/address.py: what a peer address may be (SPEC 17.6), at its boundaries."""

from __future__ import annotations

import pytest

from protocol.address import parse_address, split_address
from protocol.errors import BAD_REQUEST, RemoteProtocolError


@pytest.mark.parametrize(("text", "normalized"), [
    ("127.0.0.1:7400", "127.0.0.1:7400"),
    ("10.0.0.7:1", "10.0.0.7:1"),
    ("10.0.0.7:65535", "10.0.0.7:65535"),
    ("10.0.0.7:007400", None),  # more than 5 digits
    ("10.0.0.7:07400", "10.0.0.7:7400"),
    ("[::1]:5", "[::1]:5"),
    ("[0:0:0:0:0:0:0:1]:5", "[::1]:5"),
    ("[FE80::1]:5", "[fe80::1]:5"),
    ("[::ffff:10.0.0.1]:5", "[::ffff:a00:1]:5"),
    ("localhost:7400", "localhost:7400"),
    ("Node-1.Example.COM:80", "node-1.example.com:80"),
    ("a:1", "a:1"),
    ("x" * 63 + ".y:1", "x" * 63 + ".y:1"),
    (".".join(["a" * 63] * 3) + "." + "b" * 61 + ":1", ".".join(["a" * 63] * 3) + "." + "b" * 61 + ":1"),  # 253
])
def test_valid_addresses_are_normalized(text, normalized):
    if normalized is None:
        with pytest.raises(RemoteProtocolError):
            parse_address(text)
    else:
        assert parse_address(text) == normalized


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty"),
    ("garbage", "no ':PORT'"),
    ("host:", "port must be a number"),
    (":1", "no host"),
    ("host:0", "1 to 65535"),
    ("host:65536", "1 to 65535"),
    ("host:99999", "1 to 65535"),
    ("host:-1", "1 to 65535"),
    ("host:+80", "1 to 65535"),
    ("host:8O", "1 to 65535"),
    ("host:\u0661\u0662", "ASCII"),  # Arabic-Indic digits: str.isdigit() says yes
    ("host:\u00b2", "ASCII"),  # superscript two
    ("h\u00f6st:1", "ASCII"),
    ("tcp://127.0.0.1:7400", "scheme"),
    (" 127.0.0.1:7400", "whitespace"),
    ("127.0.0.1:7400 ", "whitespace"),
    ("127.0.0.1 :7400", "whitespace"),
    ("host\n:1", "whitespace"),
    ("x" * 300 + ":1", "too long"),
    ("x" * 64 + ".y:1", "labels of 1..63"),
    (".".join(["a" * 63] * 4) + ":1", "at most 253"),  # 255 characters
    ("a..b:1", "labels"),
    (".a:1", "labels"),
    ("a.:1", "labels"),
    ("-a:1", "labels"),
    ("a-:1", "labels"),
    ("a_b:1", "labels"),
    ("a/b:1", "labels"),
    ("*:1", "labels"),
    ("256.0.0.1:1", "IPv4"),
    ("1.2.3:1", "IPv4"),
    ("1.2.3.4.5:1", "IPv4"),
    ("01.2.3.4:1", "IPv4"),
    ("123:1", "IPv4"),
    ("::1:5", "brackets"),
    ("[::1]", "port must be a number"),  # rpartition finds '::1]' as the port
    ("[::1:5", "brackets"),
    ("[]:5", "brackets"),
    ("[::g]:5", "brackets"),
    ("[1::2::3]:5", "IPv6"),
    ("[fe80::1%eth0]:5", "brackets"),
    ("[localhost]:5", "brackets"),
])
def test_invalid_addresses_are_refused_with_a_clear_message(text, why):
    with pytest.raises(RemoteProtocolError) as info:
        parse_address(text, "peer address")
    assert info.value.code == BAD_REQUEST
    assert why in info.value.message
    assert info.value.message.startswith("peer address")


@pytest.mark.parametrize("value", [None, 7400, b"127.0.0.1:1", ["a:1"]])
def test_a_non_string_is_refused(value):
    with pytest.raises(RemoteProtocolError, match="must be a string"):
        parse_address(value)


def test_a_long_address_is_cut_short_in_the_message():
    with pytest.raises(RemoteProtocolError) as info:
        parse_address("h" * 290 + ":0")
    assert len(info.value.message) < 200


def test_split_gives_the_host_without_brackets():
    assert split_address("[::1]:7400") == ("::1", 7400)
    assert split_address("Example.org:1") == ("example.org", 1)


def test_the_cache_of_parsed_addresses_agrees_with_the_full_parse():
    from protocol.address import _parse_str, format_address

    for text in ("10.0.0.1:7400", "a.b-c.d:1", "node:65535", "[::1]:1", "Host:7", "1.2.3.4:07400", "z9:1"):
        _parse_str.cache_clear()
        assert parse_address(text) == format_address(*split_address(text)) == parse_address(text)
    for bad in ("10.0.0.1:65536", "a:0", "256.1.1.1:1", "a" * 64 + ":1", "-a:1", "1.2.3:1", "a.:1"):
        for _ in range(2):  # failures are not cached as anything else
            with pytest.raises(RemoteProtocolError):
                parse_address(bad)
