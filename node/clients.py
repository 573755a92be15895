"""What one client can make the node hold: its unread reply bytes and its connections (and
what its large junk requests can make the node do: `JunkGate`).

Reply bytes (`ReplyBudget`). ZeroMQ bounds a ROUTER's queue per client in messages (SNDHWM),
not bytes, and one get reply can be 16 MiB: a client that sends requests and never reads its
replies could make the node hold SNDHWM x 16 MiB. So:

- Every reply of TRACK_MIN bytes or more counts against its client until libzmq lets go of it
  (writes it to the connection, or drops it with the connection). pyzmq says when through a
  MessageTracker on a zero-copy send. A tracker costs more than a mid-sized reply weighs, so
  not every reply gets one: libzmq writes one connection's replies in order, so a tracker
  that is done vouches for every reply sent to that client before it. A reply gets a
  tracker when it is large (ZERO_COPY_MIN, where zero-copy pays for itself anyway) or when
  the untracked bytes sent to its client since its last tracker reach TRACK_EVERY. Replies
  under TRACK_MIN are not counted: the ROUTER's SNDHWM bounds them, at most SNDHWM x
  TRACK_MIN bytes per client.
- A client is cut off when a reply would take its unread bytes past the limit (a reply is
  always let through when nothing is outstanding, so one page larger than the limit still
  goes), or when the ROUTER refuses a reply because the client's queue is at SNDHWM
  (ROUTER_MANDATORY makes that an EAGAIN instead of a silent drop).
- While cut off, the client's requests are read and dropped unanswered, and so are replies
  already on their way to it: no CPU is spent on its requests and nothing more is queued.
  It is served again once everything queued for it has been let go (it read it, or its
  connection closed) and RETRY_S has passed; a client that still does not read is cut off
  again by its next reply. Every reply not sent counts in `client_replies_dropped`.

Connections (`ConnectionLimit`). ZeroMQ has no per-bind connection cap, so the node watches
its ROUTER and watch sockets with socket monitors: ZMQ_EVENT_ACCEPTED and
ZMQ_EVENT_DISCONNECTED carry the connection's file descriptor. Past `max_clients` live
connections a new one is shut down (shutdown(2) on a dup of its descriptor: libzmq sees the
connection end and closes it itself, so the node never closes a descriptor it does not own).
The descriptor is checked to be a TCP socket on the node's own port first, so a number reused
in between can never shut down storage or a peer link (at worst a newer connection to the
node that reused the number, its own event still queued, is closed in its place). Together with a raised RLIMIT_NOFILE and
LevelDB's bounded `max_open_files`, this keeps descriptors in reserve for storage. A
connection past the limit holds its descriptor until the loop reads its event (a loop turn);
a storm faster than that eats into OTHER_FDS, not into storage's share, unless it outruns
the loop by hundreds of connections.
"""

from __future__ import annotations

import collections
import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from node import sockets
from node.sockets import TRACK_MIN
from node.storage import MAX_OPEN_FILES

log = logging.getLogger(__name__)

ZERO_COPY_MIN = 64 << 10  # a reply this large always gets its own tracker
TRACK_EVERY = 256 << 10  # untracked bytes to one client before a reply gets a tracker
RETRY_S = 1.0  # a cut-off client is served again no sooner than this after its last drop

# File descriptors kept out of --max-clients: LevelDB's table cache (storage.MAX_OPEN_FILES)
# plus its log, manifest, lock and info files; and the rest of the process (peer links, each
# ZeroMQ socket's mailbox, the pyzmq zero-copy thread, stdio).
STORAGE_FDS = MAX_OPEN_FILES + 56
OTHER_FDS = 256
RESERVED_FDS = STORAGE_FDS + OTHER_FDS
DEFAULT_MAX_CLIENTS = 4096
MIN_CLIENTS = 16


DROP, SEND, TRACK = 0, 1, 2  # what `admit` says to do with a reply


class _Client:
    __slots__ = ("bytes", "sent", "uncovered", "cut", "retry_at")

    def __init__(self) -> None:
        self.bytes = 0  # counted reply bytes not known to be let go
        # (tracker, bytes it vouches for: its reply and the untracked ones before it)
        self.sent: collections.deque[tuple[Any, int]] = collections.deque()
        self.uncovered = 0  # bytes sent since the last tracker (no tracker vouches for them yet)
        self.cut = False
        self.retry_at = 0.0


class ReplyBudget:
    """Unread reply bytes per client identity, and which clients are cut off."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self.clients: dict[bytes, _Client] = {}
        self.cut: set[bytes] = set()  # idents cut off now (the loop checks this first: usually empty)
        self.held = 0  # tracked bytes not yet let go, all clients
        self.peak = 0
        self.dropped = 0  # replies not sent (and requests left unanswered) to cut-off clients
        self.cutoffs = 0

    def _reap(self, c: _Client) -> None:
        sent = c.sent
        while sent and sent[0][0].done:
            c.bytes -= sent[0][1]
            self.held -= sent.popleft()[1]

    def _forget(self, ident: bytes, c: _Client) -> None:
        """Drop a client with no tracker outstanding; its untracked bytes (under TRACK_EVERY)
        are taken as read."""
        self.held -= c.bytes
        del self.clients[ident]
        self.cut.discard(ident)

    def _cut_off(self, ident: bytes, c: _Client, why: str) -> None:
        if not c.cut:
            c.cut = True
            self.cut.add(ident)
            self.cutoffs += 1
            # a line per client cut off, but not a flood of them (a client stalled for good
            # is cut off again every RETRY_S)
            level = logging.WARNING if self.cutoffs <= 10 or not self.cutoffs % 1000 else logging.DEBUG
            log.log(level, "client %s cut off (%d so far): %s; its requests go unanswered until it reads",
                    ident.hex(), self.cutoffs, why)
        c.retry_at = self.clock() + RETRY_S
        self.dropped += 1

    def drop_request(self, ident: bytes) -> bool:
        """A request from a cut-off client: True to drop it unanswered, False to serve it
        (everything queued for it has been let go and RETRY_S has passed)."""
        c = self.clients.get(ident)
        if c is None:
            self.cut.discard(ident)
            return False
        self._reap(c)
        if not c.sent and self.clock() >= c.retry_at:
            self._forget(ident, c)
            return False
        self.dropped += 1
        return True

    def admit(self, ident: bytes, nbytes: int) -> int:
        """What to do with a reply of `nbytes` for `ident`: DROP (counted), SEND, or TRACK
        (send it zero-copy with a tracker, then report it through `sent`)."""
        c = self.clients.get(ident)
        if c is None:
            if nbytes < TRACK_MIN:
                return SEND  # a small reply (asked only while some client is cut off)
            c = self.clients[ident] = _Client()
        if c.cut:
            self.dropped += 1
            return DROP
        if nbytes < TRACK_MIN:
            return SEND
        self._reap(c)
        if c.bytes and c.bytes + nbytes > self.limit:
            self._cut_off(ident, c, f"{c.bytes} bytes of replies unread, the limit is {self.limit}")
            return DROP
        return TRACK if nbytes >= ZERO_COPY_MIN or c.uncovered + nbytes >= TRACK_EVERY else SEND

    def sent(self, ident: bytes, nbytes: int, tracker: Any | None) -> None:
        """A reply `admit` let through was handed to ZeroMQ (with its tracker, if TRACK)."""
        c = self.clients.get(ident)
        if c is None:
            c = self.clients[ident] = _Client()
        c.bytes += nbytes
        self.held += nbytes
        c.uncovered += nbytes
        if tracker is not None:
            c.sent.append((tracker, c.uncovered))
            c.uncovered = 0
        if self.held > self.peak:
            self.peak = self.held

    def refused(self, ident: bytes) -> None:
        """The ROUTER refused a reply (EAGAIN): the client's queue is at SNDHWM."""
        c = self.clients.get(ident)
        if c is None:
            c = self.clients[ident] = _Client()
        self._cut_off(ident, c, "its reply queue is full (it does not read)")

    def sweep(self) -> None:
        """Forget clients with nothing outstanding (housekeeping, about once a second)."""
        now = self.clock()
        for ident in list(self.clients):
            c = self.clients[ident]
            self._reap(c)
            if not c.sent and (not c.cut or now >= c.retry_at):
                self._forget(ident, c)

    def status(self) -> dict[str, Any]:
        return {
            "max_client_queue": self.limit,
            "client_queue_bytes": self.held,
            "client_queue_peak": self.peak,
            "clients_cut_off": len(self.cut),
            "client_cutoffs": self.cutoffs,
            "client_replies_dropped": self.dropped,
        }


JUNK_HOLD_S = 1.0  # a connection's large requests are refused unread this long after one was junk


class JunkGate:
    """Large requests of a connection whose last large request could not be decoded.

    A large junk frame is refused at its first byte when it cannot begin a msgpack map
    (codec.unpack_request), but junk that begins like one (a small map, then megabytes of
    anything) reaches msgpack, which copies the rest into its ExtraData error: as much work as
    a real request of that size, and a flood of them kept another client's p99 at ~85 ms. So
    once a request of the server's BIG_REQUEST bytes or more fails to decode, that connection's
    large requests are answered BAD_REQUEST unread for JUNK_HOLD_S: one decode a second per
    connection. Small requests are never looked at here. An entry lives JUNK_HOLD_S (swept
    every second), so there is at most one per connection that sent junk in the last 2 s."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.until: dict[bytes, float] = {}
        self.refused = 0
        self.clock = clock

    def holds(self, ident: bytes) -> bool:
        """Whether this large request is refused unread (counted)."""
        t = self.until.get(ident)
        if t is None:
            return False
        if self.clock() < t:
            self.refused += 1
            return True
        del self.until[ident]
        return False

    def junk(self, ident: bytes) -> None:
        self.until[ident] = self.clock() + JUNK_HOLD_S

    def sweep(self) -> None:
        now = self.clock()
        for ident in [i for i, t in self.until.items() if t <= now]:
            del self.until[ident]

    def status(self) -> dict[str, Any]:
        return {"junk_connections": len(self.until), "junk_refused_unread": self.refused}


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, want, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def clients_allowed(fd_limit: int) -> int:
    """Connections the descriptor limit leaves room for, after the storage and process reserve."""
    return fd_limit - RESERVED_FDS


class ConnectionLimit:
    """Counts live connections to the node's client-facing sockets; refuses those past the limit."""

    def __init__(self, socks: dict[str, tuple[zmq.Socket[Any], int]], limit: int) -> None:
        self.limit = limit
        self.monitors: dict[zmq.Socket[Any], tuple[str, int]] = {}
        for name, (sock, port) in socks.items():
            self.monitors[sockets.monitor(sock)] = (name, port)
        self.live: dict[str, set[int]] = {name: set() for name in socks}
        self.refused = 0
        self.accepted = 0
        self.peak = 0
        self.handshakes_failed = 0

    @property
    def count(self) -> int:
        return sum(len(fds) for fds in self.live.values())

    def on_events(self, mon: zmq.Socket[Any]) -> None:
        name, port = self.monitors[mon]
        live = self.live[name]
        for _ in range(10_000):
            try:
                frames = mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                ev = parse_monitor_message(frames)
            except Exception:
                continue
            fd = int(ev["value"])
            if ev["event"] == zmq.EVENT_ACCEPTED:
                if self.count >= self.limit:
                    self.refused += 1
                    if self.refused == 1 or not self.refused % 1000:
                        log.warning("connection refused: %d clients connected, the limit "
                                    "(--max-clients) is %d (%d refused so far)",
                                    self.count, self.limit, self.refused)
                    _shut(fd, port)
                else:
                    self.accepted += 1
                    live.add(fd)
                    self.peak = max(self.peak, self.count)
            elif ev["event"] == zmq.EVENT_DISCONNECTED:
                live.discard(fd)
            elif ev["event"] & sockets.HANDSHAKE_FAILED:
                self.handshakes_failed += 1
                if self.handshakes_failed in (1, 10) or not self.handshakes_failed % 1000:
                    log.warning("%s connection(s) failed the handshake on the %s socket (with keys: a client "
                                "without a key, with a key not allowlisted, or with another server key than "
                                "this node's public_key)", self.handshakes_failed, name)

    def close(self) -> None:
        for mon in self.monitors:
            mon.close(linger=0)

    def status(self) -> dict[str, Any]:
        return {
            "max_clients": self.limit,
            "connections": {name: len(fds) for name, fds in self.live.items()},
            "connections_peak": self.peak,
            "connections_refused": self.refused,
            "handshakes_failed": self.handshakes_failed,
        }


def _shut(fd: int, port: int) -> None:
    """End the TCP connection behind libzmq's descriptor `fd`, if it is still one to `port`."""
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return  # closed meanwhile, or not a socket: nothing to refuse
    try:
        if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6) \
                and s.getsockname()[1] == port:
            s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.close()
