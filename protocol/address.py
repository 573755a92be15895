"""Peer addresses (`host:port`): parsed and normalized before any socket is made.

A peer address arrives from a heartbeat (`address`, `pub`), a heartbeat reply
(`pub`), another node's gossip (`peers`) or the command line, and ends up in a
ZeroMQ `tcp://` endpoint. ZeroMQ refuses some strings by raising, resolves
others, and each connect holds a socket of a bounded pool, so the string is
checked here first (SPEC 17.6):

- `host` is an IPv4 dotted quad (`10.0.0.7`), an IPv6 literal in brackets
  (`[::1]`, no zone), or a DNS name: labels of ASCII letters, digits and `-`
  (not at either end of a label), 1..63 bytes each, 253 bytes in all, joined
  by `.`. A name whose labels are all digits must be a valid dotted quad.
- `port` is 1..65535 in ASCII digits (at most 5).
- No scheme (`tcp://`), no whitespace, nothing else.

The normalized form is what the mesh keys peers by, so one node cannot appear
twice under two spellings: DNS names lower-cased, IPv4 as read, IPv6
compressed (`[::1]`), the port without leading zeros.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

from protocol.errors import BAD_REQUEST, RemoteProtocolError

MAX_ADDRESS_BYTES = 300  # the longest a valid address can be: 253 (name) + 1 + 5 (port), with room
MAX_HOSTNAME_BYTES = 253
MAX_LABEL_BYTES = 63

_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$", re.ASCII)
_DIGITS = re.compile(r"^[0-9]{1,5}$", re.ASCII)
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]+$", re.ASCII)
# The common cases in one match each (a heartbeat carries up to 1,000 addresses)
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_FAST_IPV4 = re.compile(rf"^{_OCTET}(?:\.{_OCTET}){{3}}:[1-9][0-9]{{0,4}}$", re.ASCII)
_FAST_NAME = re.compile(r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?)*:[1-9][0-9]{0,4}$",
                        re.ASCII)


def _bad(what: str, text: str, why: str) -> RemoteProtocolError:
    shown = text if len(text) <= 80 else text[:77] + "..."
    return RemoteProtocolError(BAD_REQUEST, f"{what} {shown!r} is not HOST:PORT: {why}")


def split_address(text: object, what: str = "address") -> tuple[str, int]:
    """(normalized host, port) of a `host:port` string; IPv6 hosts come without brackets.

    Raises RemoteProtocolError(BAD_REQUEST) with a message naming `what`."""
    if not isinstance(text, str):
        raise RemoteProtocolError(BAD_REQUEST, f"{what} must be a string HOST:PORT, got {type(text).__name__}")
    if not text:
        raise RemoteProtocolError(BAD_REQUEST, f"{what} must not be empty (HOST:PORT)")
    if len(text) > MAX_ADDRESS_BYTES or not text.isascii():
        # every valid address is ASCII; len() of an ASCII string is its size in bytes
        why = "too long" if text.isascii() else "only ASCII letters, digits, '.', '-', ':' and [] are allowed"
        raise _bad(what, text, why)
    if "://" in text:
        raise _bad(what, text, "give HOST:PORT without a scheme such as tcp://")
    if any(c.isspace() for c in text):
        raise _bad(what, text, "whitespace is not allowed")
    host, sep, port = text.rpartition(":")
    if not sep:
        raise _bad(what, text, "no ':PORT'")
    if not host:
        raise _bad(what, text, "no host before ':'")
    if not _DIGITS.match(port) or not 1 <= int(port) <= 65535:
        raise _bad(what, text, "the port must be a number from 1 to 65535")
    return _host(what, text, host), int(port)


def _host(what: str, text: str, host: str) -> str:
    if host.startswith("["):
        inner = host[1:-1] if host.endswith("]") else ""
        if not inner or not _IPV6.match(inner):
            raise _bad(what, text, "an IPv6 host must be a literal address in brackets, e.g. [::1]:7400")
        try:
            return ipaddress.IPv6Address(inner).compressed
        except ValueError:
            raise _bad(what, text, "not a valid IPv6 address in the brackets") from None
    if ":" in host:
        raise _bad(what, text, "an IPv6 host must be in brackets, e.g. [::1]:7400")
    labels = host.split(".")
    if all(label.isdigit() for label in labels):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise _bad(what, text, "not a valid IPv4 address (four numbers 0..255, no leading zeros)") from None
    if len(host) > MAX_HOSTNAME_BYTES:
        raise _bad(what, text, f"a host name has at most {MAX_HOSTNAME_BYTES} characters")
    for label in labels:
        if not _LABEL.match(label):
            raise _bad(what, text, f"a host name is labels of 1..{MAX_LABEL_BYTES} letters, digits or '-' "
                       "(not first or last) joined by '.'")
    return host.lower()


def format_address(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: object, what: str = "address") -> str:
    """The normalized `host:port` form of a peer address, or RemoteProtocolError(BAD_REQUEST)."""
    if isinstance(text, str) and len(text) <= MAX_ADDRESS_BYTES:
        return _parse_str(text, what)
    host, port = split_address(text, what)
    return format_address(host, port)


@lru_cache(maxsize=4096)
def _parse_str(text: str, what: str) -> str:
    # Cached: the same few addresses come in every heartbeat (bad ones raise, and are not cached).
    # Already in normal form (an IPv4 or lower-case name, a port without leading zeros) is the
    # common case; everything else takes the full parse.
    if (_FAST_IPV4.match(text) or (_FAST_NAME.match(text) and len(text.rpartition(":")[0]) <= MAX_HOSTNAME_BYTES)) \
            and int(text.rpartition(":")[2]) <= 65535:
        return text
    host, port = split_address(text, what)
    return format_address(host, port)
