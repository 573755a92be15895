"""The `curve` round family: a node with keys (CURVE on its sockets, a client allowlist; SPEC 13)
next to the plain node of `baseline`, each scenario the same requests as its plain counterpart:
append_seq_curve, append_pipelined_curve, get_one_curve. Their ratios to the plain scenarios of
the same round are the cost of authentication and encryption (issue #14's targets)."""

from __future__ import annotations

import os
from typing import Any

from node.identity import KEY_FILE, write_key_file
from protocol.keys import Identity, curve_public

from ..common import CURVE_SCENARIOS
from ..drivers import Dealer
from ..procs import start_node
from ..registry import Rounds, round_family
from .throughput import append_request, fill_reads


@round_family("curve", lambda only: only is None or bool(only & set(CURVE_SCENARIOS)))
def curve(r: Rounds) -> None:
    sizes, payload, rng = r.sizes, r.payload, r.rng
    data = os.path.join(r.workdir, "curve")
    os.makedirs(data, exist_ok=True)
    server, client = Identity.generate(), Identity.generate()
    write_key_file(os.path.join(data, KEY_FILE), server)
    allow = os.path.join(r.workdir, "curve-clients.txt")
    with open(allow, "w") as f:
        f.write(f"{client.public_hex} admin\n")
    node, _ = start_node(data, "--client-keys", allow, name="ledger (keys)")
    r.procs.append(node)
    d = Dealer(r.zctx, node.address, curve=(*client.curve_keypair(), curve_public(server.public)))

    def append_req(i: int) -> dict[str, Any]:
        return append_request(payload)

    _size, get_one = fill_reads(d, sizes.gets, payload, rng)  # the same reads as baseline's get_one

    r.add("append_seq_curve", lambda: d.seq(d.frames(sizes.seq, append_req)))
    r.add("append_pipelined_curve", lambda: d.pipelined(d.frames(sizes.pipelined, append_req)))
    r.add("get_one_curve", lambda: d.seq(d.frames(sizes.gets, get_one)))
    r.warmups.append(lambda: d.seq(d.frames(50, append_req)))
    r.finishers.append(d.close)
