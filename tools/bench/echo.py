"""The bare pyzmq baseline server (`python -m tools.bench _echo PORT_FILE`, started by `procs.start_echo`)."""

from __future__ import annotations

import hashlib
import os

import msgpack
import zmq


def echo_server(port_file: str) -> None:
    """The least any node must do per request: decode, hash once, reply."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 10_000)
    s.setsockopt(zmq.RCVHWM, 10_000)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(port_file + ".tmp", port_file)
    unpackb = msgpack.unpackb
    packb = msgpack.packb
    sha = hashlib.sha256
    while True:
        ident, body = s.recv_multipart()
        m = unpackb(body)
        h = sha(m["payload"]).digest()
        s.send_multipart([ident, packb({"v": 1, "id": m["id"], "ok": True, "hash": h})])
