"""The ZAP handler (ZeroMQ RFC 27): which CURVE keys may connect to this node's sockets.

libzmq asks the handler bound at `inproc://zeromq.zap.01` of the node's ZeroMQ context
about every CURVE handshake on a socket that is a CURVE server (the ROUTER and the watch
XPUB). The handler answers from the allowlists (node/access.py): 200 with the key's user
id (`peer:NODE_ID` or `client:HEX`), which libzmq attaches to every message of that
connection as its `User-Id` property, or 400. It runs on the node's loop (a REP socket
the loop polls), never in a thread: one request is a dict look-up, and a handshake waits
at most one loop turn.

It must be bound before any CURVE server socket accepts: libzmq lets a handshake through
when no handler is bound (ZAP_ENFORCE_DOMAIN is off by default); `Zap` is therefore made
first, and the server sockets also set ZAP_ENFORCE_DOMAIN.

Refusals are counted and logged, at most one line per key per minute, so a stranger
retrying in a loop cannot fill the log.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq

from node.access import Access
from protocol.keys import curve_public

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
DOMAIN = b"ledger"
LOG_EVERY_S = 60.0
MAX_LOGGED_KEYS = 1_024


class Zap:
    def __init__(self, zctx: zmq.Context[Any], access: Access) -> None:
        self.sock: zmq.Socket[Any] = zctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self.accepted = 0
        self.refused = 0
        self.malformed = 0
        self._logged: dict[bytes, float] = {}
        self.set_access(access)

    def set_access(self, access: Access) -> None:
        """New allowlists (a reload): handshakes from now on are judged by them."""
        self.access = access
        self._by_curve: dict[bytes, str] = {}
        for node_id, key in access.peers.items():
            self._by_curve[curve_public(key)] = f"peer:{node_id}"
        for key in access.clients:
            self._by_curve.setdefault(curve_public(key), f"client:{key.hex()}")

    def handle(self, limit: int = 100) -> None:
        """Answer the handshakes waiting (at most `limit`)."""
        for _ in range(limit):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.sock.send_multipart(self._answer(frames))

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:
            self.malformed += 1
            rid = frames[1] if len(frames) > 1 else b""
            return [b"1.0", rid, b"500", b"malformed ZAP request", b"", b""]
        version, rid, _domain, address, _routing, mechanism, *creds = frames
        if mechanism != b"CURVE" or len(creds) != 1 or len(creds[0]) != 32:
            self.refused += 1
            return [version, rid, b"400", b"only CURVE keys are accepted", b"", b""]
        user = self._by_curve.get(creds[0])
        if user is None:
            self.refused += 1
            self._log_refusal(creds[0], address)
            return [version, rid, b"400", b"key not allowed", b"", b""]
        self.accepted += 1
        return [version, rid, b"200", b"OK", user.encode(), b""]

    def _log_refusal(self, key: bytes, address: bytes) -> None:
        now = time.monotonic()
        last = self._logged.get(key)
        if last is not None and now - last < LOG_EVERY_S:
            return
        if len(self._logged) >= MAX_LOGGED_KEYS:
            self._logged.clear()
        self._logged[key] = now
        log.warning("refused a connection from %s: its CURVE key %s is in no allowlist of this node (%d refused "
                    "so far)", address.decode(errors="replace") or "?", key.hex(), self.refused)

    def status(self) -> dict[str, Any]:
        return {"handshakes_accepted": self.accepted, "handshakes_refused": self.refused,
                "peer_keys": len(self.access.peers), "client_keys": len(self.access.clients)}

    def close(self) -> None:
        self.sock.close(linger=0)
