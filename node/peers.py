"""The node's sockets to its peers: one DEALER per peer's ROUTER, one SUB on all their PUBs.

`Peers` is the mesh's `Transport` in the server (node/mesh.py decides what to
send; this module only sends it, never queueing what ZeroMQ will not take), and
reads what comes back, handing each reply and pushed message to the core
(node/core.py). The mesh simulation replaces it with a seeded fake network.

Reading is bounded in time per loop turn (PUSH_SLICE_S for the pushes, as much
again for the replies): a flood of pushes (a peer's bulk load) or a peer
streaming pull chunks must not keep the loop from answering requests and
heartbeats; the rest waits in the sockets. The peer read first changes every
turn, so one busy peer does not starve the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from node import sockets
from protocol import codec

if TYPE_CHECKING:
    from node.core import Core

PUSH_SLICE_S = 0.02  # longest the loop spends applying pushes (or peer replies) before it serves requests again


class Peers:
    def __init__(self, zctx: zmq.Context[Any], poller: zmq.Poller, max_msg: int,
                 curve: tuple[bytes, bytes] | None = None) -> None:
        self.zctx = zctx
        # With keys: this node's (public, secret) Curve25519 keys, and `server_key(address)` gives
        # the key a peer (by its ROUTER or PUB address) must prove; None when it is not known
        self.curve = curve
        self.server_key: Callable[[str], bytes | None] = lambda address: None
        self.unkeyed = 0  # requests and subscriptions not made: the peer's key is not known
        self.poller = poller
        self.max_msg = max_msg
        self.core: Core | None = None  # set once the core exists (it holds the mesh this serves)
        self.socks: dict[str, zmq.Socket[Any]] = {}  # by the peer's ROUTER address
        self.addr: dict[zmq.Socket[Any], str] = {}
        self._rid = 1
        self._turn = 0
        self.sub = sockets.peer_sub(zctx, max_msg)
        poller.register(self.sub, zmq.POLLIN)
        self._sub_addresses: set[str] = set()  # the peers' PUB addresses it is connected to
        self._sub_stale = False  # a peer's PUB was dropped: make the socket anew (unsubscribe)
        self.sub_renewals = 0
        self._forgotten: list[zmq.Socket[Any]] = []  # sockets of forgotten peers, closed between loop turns

    def _error(self, address: str, what: str, exc: BaseException) -> None:
        if self.core is not None:
            self.core.mesh.peer_error(address, what, exc, expected=True)

    # -- the Transport (node/mesh.py) -----------------------------------------------------

    def request(self, address: str, op: str, fields: dict[str, Any]) -> int | None:
        s = self.socks.get(address)
        if s is None:
            server = self.server_key(address) if self.curve is not None else None
            if self.curve is not None and server is None:
                self.unkeyed += 1
                return None  # (only peers whose node id is bound to a key are connected to)
            try:
                s = sockets.peer_dealer(self.zctx, address, self.max_msg, self.curve, server)
            except zmq.ZMQError as exc:
                # EMFILE (ZeroMQ's MAX_SOCKETS or the fd limit), EINVAL (an endpoint ZeroMQ
                # refuses): nothing is sent to this peer now; the mesh retries on its next beat
                self._error(address, f"no socket for {op}", exc)
                return None
            self.socks[address] = s
            self.addr[s] = address
            self.poller.register(s, zmq.POLLIN)
        rid = self._rid
        self._rid += 1
        try:
            s.send(codec.encode_request(op, rid, fields), zmq.NOBLOCK)
        except zmq.ZMQError:
            return None  # not connected, or its queue is full: dropped, never queued
        return rid

    def subscribe(self, pub_address: str) -> None:
        self._sub_addresses.add(pub_address)
        self._connect_sub(pub_address)

    def _connect_sub(self, pub_address: str) -> None:
        if self.curve is not None:
            server = self.server_key(pub_address)
            if server is None:
                self.unkeyed += 1
                return
            sockets.curve_client(self.sub, self.curve, server)
        try:
            self.sub.connect(f"tcp://{pub_address}")
        except zmq.ZMQError as exc:
            self._error(pub_address, "subscribing to its PUB failed", exc)

    def unsubscribe(self, pub_address: str) -> None:
        # Not zmq_disconnect: libzmq (4.3.5) may process the end of that pipe between two
        # frames of a message it is handing out, and aborts ("Assertion failed: !_more
        # (src/fq.cpp:80)", seen in a chaos run when a peer restarted). The SUB socket is
        # made anew instead, at the start of the next loop turn; pushes in flight from the
        # other peers are lost with it, and their gaps are pulled (17.3).
        if pub_address in self._sub_addresses:
            self._sub_addresses.discard(pub_address)
            self._sub_stale = True

    def forget(self, address: str) -> None:
        s = self.socks.pop(address, None)
        if s is not None:
            # closed after this loop turn: `receive` may be reading it right now
            del self.addr[s]
            self._forgotten.append(s)

    # -- between loop turns -----------------------------------------------------------------

    def tidy(self) -> None:
        """Close forgotten peers' sockets; make the SUB anew if a PUB was dropped."""
        if self._forgotten:
            for s in self._forgotten:
                self.poller.unregister(s)
                s.close(linger=0)
            self._forgotten = []
        if self._sub_stale:
            self._sub_stale = False
            old = self.sub
            self.poller.unregister(old)
            old.close(linger=0)
            self.sub = sockets.peer_sub(self.zctx, self.max_msg)
            self.poller.register(self.sub, zmq.POLLIN)
            self.sub_renewals += 1
            for a in sorted(self._sub_addresses):
                self._connect_sub(a)

    def receive(self, events: dict[Any, int], core: Core) -> None:
        """Hand what the peer sockets in `events` hold to the core, bounded in time."""
        now = time.monotonic()
        if self.sub in events:
            sub = self.sub
            deadline = now + PUSH_SLICE_S
            for _ in range(1000):
                if time.monotonic() > deadline:
                    break
                try:
                    frames = sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                core.push(frames, time.monotonic())
        deadline = time.monotonic() + PUSH_SLICE_S
        socks = list(self.addr.items())
        if socks:
            self._turn = (self._turn + 1) % len(socks)
            socks = socks[self._turn:] + socks[:self._turn]
        for s, address in socks:
            if s not in events or s.closed:
                continue
            for _ in range(100):
                now = time.monotonic()
                if now > deadline:
                    break
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                core.peer_reply(address, frames[-1], now)
                if self.socks.get(address) is not s:
                    break  # forgotten while handling it (closed after this turn)

    def close(self) -> None:
        for s in [self.sub, *self.socks.values(), *self._forgotten]:
            s.close(linger=0)
