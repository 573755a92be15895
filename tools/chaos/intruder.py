"""`--intruder`: a stranger in the run that keeps trying the attacks of issue #14 while the faults go on.

Each attempt goes to a random node, as one of three parties:

- `no key`: a plain client (no CURVE);
- `stranger`: a client with a key that is in no allowlist;
- `client key`: a client with an allowlisted `write` key (a legitimate client turned hostile).

and tries one of: a heartbeat claiming to be node `0` (the lowest id, which the fork rule favours)
or a real node's id; an `ack` from a made-up node id for every context; a `load` of a context whose
entries name writer `0`; a plain read. The checker (`check_intruder`) fails the run when any
harmful attempt was answered with anything but an error (a read by a key allowed to read is
fine), and when any node serves a context the intruder made or an entry it forged.

Without `--secure` every node answers the intruder: such a run is expected to fail, and shows
what keys close.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from typing import Any

import msgpack
import zmq

from node.ledger import Ledger
from node.storage import MemoryKV
from protocol import codec
from protocol.client import Client
from protocol.errors import LedgerError, Timeout
from protocol.keys import Identity

from .node import NodeProc

ATTEMPT_TIMEOUT = 0.3
INTRUDER_CONTEXT = "intruder"  # the prefix of the contexts its loads would make
FORGED_WRITERS = ("0", "ghost")


def forged_load(rng: random.Random) -> dict[str, Any]:
    """A one-entry load of a new context whose entry names writer `0`: sound hashes and root, a lie
    about who wrote it (the issue's load that made a context unwritable on every node)."""
    name = f"{INTRUDER_CONTEXT}-{rng.randrange(1 << 30)}"
    forger = Ledger(MemoryKV(), node_id="0", sync_meta=False)
    blob = forger.append(codec.Append(name, "", b"forged", {})).blobs[0]
    return {"context": name, "load_id": f"x{rng.randrange(1 << 30)}", "size": 1,
            "root": forger.contexts[name].frontier.root(), "entries": [msgpack.unpackb(blob, raw=False)],
            "final": True}


class Intruder:
    def __init__(self, nodes: list[NodeProc], zctx: zmq.Context[Any], seed: int, client_key: Identity | None) -> None:
        self.nodes = nodes
        self.zctx = zctx
        self.rng = random.Random(seed)
        self.client_key = client_key  # an allowlisted `write` key, on a run with keys
        self.stranger = Identity.generate()
        self.attempts: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()  # harmful attempts answered with something else than an error
        self.examples: list[str] = []

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(0.05):
            self.attempt()

    def _client(self, node: NodeProc, party: str) -> Client:
        kw: dict[str, Any] = {"timeout": ATTEMPT_TIMEOUT, "retries": 0, "zctx": self.zctx}
        if party == "stranger" and node.key is not None:
            kw.update(key=self.stranger, server_key=node.key.public_hex)
        elif party == "client key" and node.key is not None and self.client_key is not None:
            kw.update(key=self.client_key, server_key=node.key.public_hex)
        return Client(node.address, **kw)

    def attempt(self) -> None:
        node = self.rng.choice(self.nodes)
        if not node.running():
            return
        party = self.rng.choice(("no key", "stranger", "client key"))
        kind = self.rng.choice(("heartbeat as 0", "heartbeat as a node", "ack from a ghost", "forged load", "read"))
        other = self.rng.choice(self.nodes)
        ops: dict[str, tuple[str, dict[str, Any]]] = {
            "heartbeat as 0": ("heartbeat", {"node_id": "0", "address": "127.0.0.1:9", "pub": "127.0.0.1:10",
                                             "boot": "intruder", "lamport": 1, "entries": 0, "cluster": "ledger"}),
            "heartbeat as a node": ("heartbeat", {"node_id": other.name, "address": "127.0.0.1:9",
                                                  "pub": "127.0.0.1:10", "boot": "intruder", "lamport": 1,
                                                  "entries": 0, "cluster": "ledger"}),
            "ack from a ghost": ("ack", {"node_id": "ghost", "acks": [[f"c{i}", 1 << 30] for i in range(8)]}),
            "forged load": ("load", forged_load(self.rng)),
            "read": ("status", {}),
        }
        op, fields = ops[kind]
        label = f"{party}: {kind}"
        self.attempts[label] += 1
        c = self._client(node, party)
        try:
            c.call(op, retry=False, **fields)
        except (Timeout, LedgerError):
            return  # refused: no handshake (a timeout), or an error reply (FORBIDDEN, ...)
        except zmq.ZMQError:
            return
        finally:
            c.close()
        harmless = kind == "read" and party == "client key" and node.key is not None
        if not harmless:
            self.accepted[label] += 1
            if len(self.examples) < 10:
                self.examples.append(f"{label} at {node.name} was answered")

    def report(self) -> dict[str, Any]:
        return {"attempts": sum(self.attempts.values()), "accepted": sum(self.accepted.values()),
                "by_attack": {k: [self.attempts[k], self.accepted[k]] for k in sorted(self.attempts)}}


def check_intruder(intruder: Intruder, contexts_by_node: dict[str, list[str]],
                   writers_seen: set[str]) -> list[str]:
    """Problems: an attack answered, a context the intruder made, an entry by a forged writer."""
    problems = [f"intruder: {x}" for x in intruder.examples]
    for node, names in contexts_by_node.items():
        made = [n for n in names if n.startswith(INTRUDER_CONTEXT)]
        if made:
            problems.append(f"intruder: {node} serves contexts the intruder loaded: {made[:3]}")
    forged = writers_seen & set(FORGED_WRITERS)
    if forged:
        problems.append(f"intruder: entries by forged writers are served: {sorted(forged)}")
    return problems
