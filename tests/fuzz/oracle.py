"""The honest side of a fuzz run: appends whose outcome is known, and the checks after the run.

`Honest` makes plain appends (and batches) to a few contexts the fuzzer never
writes, checks every entry the node answers with (seq follows the last one, the
leaf hash is right, the Lamport value is past the causal token it was given),
and keeps each context's leaf hashes, so that after the run its (size, root)
is known without asking the node. `verify_context` is `ledger verify` in
miniature: read every entry of a context, check seqs are dense and hashes right,
recompute the root and compare it with what `head` says.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from protocol import merkle
from protocol.entry import entry_from_wire

INTERNAL = "INTERNAL"


class Honest:
    def __init__(self, rng: random.Random, contexts: list[str]) -> None:
        self.rng = rng
        self.contexts = contexts
        self.leaves: dict[str, dict[int, bytes]] = {c: {} for c in contexts}
        self.waiting: dict[str, tuple[str, int | None]] = {}  # request id -> (context, causal token)
        self.lamport = 0  # the highest Lamport value seen in a reply
        self.n = 0
        self.failures: list[str] = []

    def request(self) -> tuple[str, dict[str, Any]]:
        """(op, fields) of the next honest request; its id is a string no fuzzed id uses."""
        self.n += 1
        rid = f"honest-{self.n}"
        ctx = self.rng.choice(self.contexts)
        token = self.lamport if self.rng.random() < 0.3 and self.lamport else None
        self.waiting[rid] = (ctx, token)
        fields: dict[str, Any] = {"id": rid, "context": ctx}
        if token is not None:
            fields["after_lamport"] = token
        if self.rng.random() < 0.2:
            fields["entries"] = [{"key": "facts", "payload": self.rng.randbytes(8), "metadata": {"n": str(i)}}
                                 for i in range(self.rng.randrange(1, 20))]
            return "append_batch", fields
        fields.update(key=self.rng.choice(("facts", "intents", "")), payload=self.rng.randbytes(self.rng.randrange(40)))
        return "append", fields

    def owns(self, rid: object) -> bool:
        return isinstance(rid, str) and rid in self.waiting

    def on_reply(self, reply: dict[str, Any]) -> None:
        ctx, token = self.waiting.pop(reply["id"])
        if not reply.get("ok"):
            self.failures.append(f"honest append to {ctx!r} refused: {reply.get('error')}")
            return
        raw = [reply["entry"]] if "entry" in reply else reply.get("entries", [])
        for m in raw:
            e = entry_from_wire(m)
            if e.context != ctx or e.computed_hash() != e.hash:
                self.failures.append(f"honest entry {e.context!r}#{e.seq} is not what was appended")
            if e.seq in self.leaves[ctx]:
                self.failures.append(f"{ctx!r}#{e.seq} was answered twice")
            if token is not None and e.lamport <= token:
                self.failures.append(f"{ctx!r}#{e.seq} has lamport {e.lamport}, not past its token {token}")
            self.leaves[ctx][e.seq] = e.hash
            self.lamport = max(self.lamport, e.lamport)

    def expected(self, ctx: str) -> tuple[int, bytes]:
        leaves = self.leaves[ctx]
        size = len(leaves)
        if sorted(leaves) != list(range(1, size + 1)):
            self.failures.append(f"honest seqs of {ctx!r} are not dense: {sorted(leaves)[:5]}...")
        f = merkle.Frontier()
        for seq in range(1, size + 1):
            f.append(leaves.get(seq, b"\x00" * 32))
        return size, f.root()


Call = Callable[[str, dict[str, Any]], dict[str, Any]]


def read_all(call: Call, ctx: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        r = call("get", {"context": ctx, "after": after, "limit": 10_000})
        if not r.get("ok"):
            raise AssertionError(f"get {ctx!r} after {after}: {r.get('error')}")
        out.extend(r["entries"])
        if not r["more"]:
            return out
        after = r["next_after"]


def verify_context(call: Call, ctx: str) -> list[str]:
    """What is wrong with `ctx` as the node serves it (dense seqs, hashes, root = head)."""
    problems = []
    head = call("head", {"context": ctx})
    if not head.get("ok"):
        return [f"head {ctx!r}: {head.get('error')}"]
    f = merkle.Frontier()
    for i, m in enumerate(read_all(call, ctx), 1):
        e = entry_from_wire(m)
        if e.seq != i or e.context != ctx:
            problems.append(f"{ctx!r}: entry {i} is {e.context!r}#{e.seq}")
            break
        if e.computed_hash() != e.hash:
            problems.append(f"{ctx!r}#{i} does not match its hash")
        f.append(e.hash)
    if (f.size, f.root()) != (head["size"], head["root"]):
        problems.append(f"{ctx!r}: head says size {head['size']}, the entries make {f.size} and another root")
    return problems


def all_contexts(call: Call) -> list[str]:
    names: list[str] = []
    after = None
    while True:
        r = call("contexts", {"limit": 10_000} if after is None else {"after": after, "limit": 10_000})
        if not r.get("ok"):
            raise AssertionError(f"contexts: {r.get('error')}")
        names += [c["name"] for c in r["contexts"]]
        if not r["more"]:
            return names
        after = r["next_after"]


def check_after_run(call: Call, honest: Honest) -> list[str]:
    """Alive, every honest context at its expected (size, root), every context self-consistent."""
    problems = list(honest.failures)
    seen = len(honest.failures)
    st = call("status", {})
    if not st.get("ok"):
        return problems + [f"status after the run: {st.get('error')}"]
    for ctx in honest.contexts:
        want = honest.expected(ctx)
        head = call("head", {"context": ctx})
        got = (head.get("size"), head.get("root")) if head.get("ok") else head.get("error")
        if got != want:
            problems.append(f"honest context {ctx!r}: (size, root) is {got!r}, the honest appends made {want!r}")
    for ctx in all_contexts(call):
        problems += verify_context(call, ctx)
    # and the node still takes honest appends (a poisoned clock answers INTERNAL here)
    for _ in range(2 * len(honest.contexts)):
        op, fields = honest.request()
        honest.on_reply(call(op, fields))
    return problems + honest.failures[seen:]
