"""Every socket the node opens is made here, with its options in one place.

ROUTER_MANDATORY so a reply to a vanished client raises instead of vanishing
silently; ROUTER_HANDOVER so a client reconnecting under the same identity
takes over; LINGER bounded so shutdown never hangs on a dead peer; MAXMSGSIZE
so an oversized frame is cut off before it is buffered. Later CURVE options
belong here too.

The ROUTER's SNDHWM bounds, in messages, what a client that does not read can
make the node queue; node/clients.py bounds the bytes (replies of TRACK_MIN
bytes or more are tracked and counted against their client), so the messages
left to SNDHWM weigh at most ROUTER_SNDHWM x TRACK_MIN.
"""

from __future__ import annotations

import errno
from typing import Any

import zmq

from protocol import watch

LINGER_MS = 1000
ROUTER_HWM = 10_000  # requests queued per client before ZeroMQ stops reading its connection
ROUTER_SNDHWM = 4_000  # replies queued per client; past it the client is cut off (node/clients.py)
TRACK_MIN = 4096  # replies from this size on are sent zero-copy and tracked (node/clients.py)
HANDSHAKE_MS = 5000  # a connection that has not completed ZeroMQ's handshake by then is closed
MONITOR_HWM = 100_000  # connection events queued for the loop (node/clients.py)
WATCH_MAX_MSG = 1024  # a subscription message: 1 + topic (2 + at most 256, or 2 + that for peers)
PUB_HWM = 1_000  # messages queued per watcher before its messages are dropped


class BindError(Exception):
    """An address the node cannot listen on (in use, not local, not resolvable)."""


AddressInUse = BindError  # the old name


def _bind(sock: zmq.Socket[Any], host: str, port: int) -> int:
    ipv6 = ":" in host
    shown = f"[{host}]:{port}" if ipv6 else f"{host}:{port}"
    endpoint = f"tcp://[{host}]" if ipv6 else f"tcp://{host}"
    if ipv6:
        sock.setsockopt(zmq.IPV6, 1)
    try:
        if port == 0:
            return int(sock.bind_to_random_port(endpoint))
        sock.bind(f"{endpoint}:{port}")
        return port
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        if exc.errno == zmq.EADDRINUSE:
            raise BindError(f"{shown}: the port is already in use") from None
        if exc.errno == zmq.EADDRNOTAVAIL:
            raise BindError(f"{shown}: {host} is not an address of this machine") from None
        if exc.errno == errno.ENODEV:
            raise BindError(f"{shown}: {host!r} is not an IP address or interface of this machine "
                            "(use an IP address, e.g. 127.0.0.1 or 0.0.0.0)") from None
        raise BindError(f"{shown}: {exc.strerror}") from None


def curve_server(s: zmq.Socket[Any], secret: bytes | None) -> None:
    """Make `s` a CURVE server with this Curve25519 secret key (a node with keys; node/zap.py
    admits the clients). ZAP_ENFORCE_DOMAIN: no handshake passes unless the ZAP handler says so,
    even if it were not bound."""
    if secret is None:
        return
    s.setsockopt(zmq.CURVE_SERVER, 1)
    s.setsockopt(zmq.CURVE_SECRETKEY, secret)
    s.setsockopt(zmq.ZAP_DOMAIN, b"ledger")
    s.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def curve_client(s: zmq.Socket[Any], keys: tuple[bytes, bytes] | None, server: bytes | None) -> None:
    """Make `s` a CURVE client with (public, secret) Curve25519 `keys`, for the server key
    `server` (set before each connect: libzmq takes it per connection)."""
    if keys is None or server is None:
        return
    s.setsockopt(zmq.CURVE_PUBLICKEY, keys[0])
    s.setsockopt(zmq.CURVE_SECRETKEY, keys[1])
    s.setsockopt(zmq.CURVE_SERVERKEY, server)


def router(ctx: zmq.Context[Any], host: str, port: int, max_msg: int,
           curve: bytes | None = None) -> tuple[zmq.Socket[Any], int]:
    s = ctx.socket(zmq.ROUTER)
    curve_server(s, curve)
    s.setsockopt(zmq.LINGER, LINGER_MS)
    s.setsockopt(zmq.ROUTER_MANDATORY, 1)
    s.setsockopt(zmq.ROUTER_HANDOVER, 1)
    s.setsockopt(zmq.SNDHWM, ROUTER_SNDHWM)
    s.setsockopt(zmq.RCVHWM, ROUTER_HWM)
    s.setsockopt(zmq.MAXMSGSIZE, max_msg)
    # a TCP connection that never speaks ZeroMQ would hold one of --max-clients' places
    s.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
    # pyzmq copies a copy=False frame below this size; the node sends tracked replies from
    # TRACK_MIN bytes on, and a copied frame's tracker is done at once (nothing counted)
    s.copy_threshold = TRACK_MIN
    return s, _bind(s, host, port)


def xpub(ctx: zmq.Context[Any], host: str, port: int, hwm: int = PUB_HWM,
         curve: bytes | None = None) -> tuple[zmq.Socket[Any], int]:
    """The watch socket. XPUB_MANUAL: ZeroMQ hands the node every subscribe and every
    unsubscribe (disconnects included) and applies none of them: the watch registry
    (node.publisher) counts them and applies the ones it accepts, so that it can refuse
    a watcher of a context that has --max-watchers-per-context already (in ZeroMQ's own
    mode a subscriber to a topic already served gets every message, whatever the node
    thinks). XPUB_VERBOSER is what ZeroMQ's own mode would need for the same counts. Sends
    never block: past SNDHWM a slow watcher's messages are dropped (it refills
    by seq), so no watcher can slow the writer. What it receives is only
    subscriptions, so MAXMSGSIZE is a topic's size: a larger message ends its
    connection before it is buffered."""
    s = ctx.socket(zmq.XPUB)
    curve_server(s, curve)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, hwm)
    s.setsockopt(zmq.RCVHWM, ROUTER_HWM)
    s.setsockopt(zmq.MAXMSGSIZE, WATCH_MAX_MSG)
    s.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
    s.setsockopt(zmq.XPUB_VERBOSER, 1)
    s.setsockopt(zmq.XPUB_MANUAL, 1)
    return s, _bind(s, host, port)


# a connection whose ZMTP handshake failed: with keys, a client without one, with an unknown key
# (the ZAP handler's 400) or with another server key than this node's
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def monitor(sock: zmq.Socket[Any]) -> zmq.Socket[Any]:
    """A monitor of `sock`'s accepted and ended connections (each event carries the
    connection's descriptor): how the node counts clients, as ZeroMQ has no
    connection limit of its own."""
    # libzmq's I/O thread blocks on a full monitor pipe (events are sent without DONTWAIT),
    # which would stall every connection during a connection storm while the loop is busy:
    # a deep receive queue here (events are ~100 bytes) instead of pyzmq's default 1,000.
    addr = f"inproc://ledger-monitor-{id(sock)}"
    sock.monitor(addr, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED)
    mon: zmq.Socket[Any] = sock.context.socket(zmq.PAIR)
    mon.setsockopt(zmq.LINGER, 0)
    mon.setsockopt(zmq.RCVHWM, MONITOR_HWM)
    mon.connect(addr)
    return mon


def wake_pair(ctx: zmq.Context[Any], name: str) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
    """An inproc PAIR: the receiving end for the loop, the sending end for a thread."""
    rx = ctx.socket(zmq.PAIR)
    rx.setsockopt(zmq.LINGER, 0)
    rx.bind(f"inproc://{name}")
    tx = ctx.socket(zmq.PAIR)
    tx.setsockopt(zmq.LINGER, 0)
    tx.connect(f"inproc://{name}")
    return rx, tx


def peer_dealer(ctx: zmq.Context[Any], address: str, max_msg: int,
                curve: tuple[bytes, bytes] | None = None, server: bytes | None = None) -> zmq.Socket[Any]:
    """A DEALER to one peer's ROUTER. IMMEDIATE and SNDTIMEO=0 with a small SNDHWM:
    what a dead or slow peer cannot take is dropped at once, never queued to flood
    it when it returns (heartbeats are periodic; repair requests are re-sent).
    MAXMSGSIZE: a reply larger than any legitimate one (server.max_peer_message) drops
    the connection before it is buffered. `address` is parsed already (protocol.address);
    a ZMQError here (too many sockets, a refused endpoint) closes the socket and is raised."""
    s: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    try:
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)
        s.setsockopt(zmq.SNDHWM, 100)
        s.setsockopt(zmq.SNDTIMEO, 0)
        s.setsockopt(zmq.RCVHWM, ROUTER_HWM)
        s.setsockopt(zmq.MAXMSGSIZE, max_msg)
        if address.startswith("["):
            s.setsockopt(zmq.IPV6, 1)
        curve_client(s, curve, server)
        s.connect(f"tcp://{address}")
    except zmq.ZMQError:
        s.close(linger=0)
        raise
    return s


def peer_sub(ctx: zmq.Context[Any], max_msg: int) -> zmq.Socket[Any]:
    """One SUB connected to every peer's PUB, subscribed to the replication stream (the
    entries each peer writes itself), not to what its watchers get. MAXMSGSIZE as for
    peer_dealer: a larger pushed message drops that peer's connection (it reconnects;
    what it would have pushed comes by repair)."""
    s: zmq.Socket[Any] = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 100_000)
    s.setsockopt(zmq.MAXMSGSIZE, max_msg)
    s.setsockopt(zmq.IPV6, 1)
    s.setsockopt(zmq.SUBSCRIBE, watch.REPL_PREFIX)
    return s
