"""The checks: one pure function per property, each run over the recorded history and the final logs.

`Evidence` holds what a run leaves behind: the operations (`tools.chaos.history`
records), the final log of every context, the watchers' deliveries, and the
`Promise` of the durability mode. Each check reads it and returns `Findings`
(counts by kind, one sentence per problem) and nothing else, so each can be
tested alone on a hand-built history:

- `check_lost_acked`: every acknowledged append is in the final log, under the
  seq and hash it was acknowledged with;
- `check_duplicates`: no dedup_id and no payload twice in a log;
- `check_order`: seqs dense from 1, and a client's later append gets a higher seq;
- `check_causality`: lamports rise along a log, above the token a client passed
  and above the client's own earlier appends;
- `check_reads`: what a read returned is what the final log holds;
- `check_watches`: a watcher saw the final log, whole, in order, once;
- `check_phantom_writes`: no append refused on every attempt is in a log;
- `check_unexpected_errors`: no INTERNAL, INTEGRITY or BAD_REQUEST answer.

`check_history` runs them all and merges their findings. `check_convergence`
and `check_forks` judge the final state of the nodes the same way.

Each mode has its promise. In sync mode nothing acknowledged may be missing. In
async mode an acknowledged append may be missing only if its context's writer was
killed within the flush interval (plus a second of slack) after acknowledging it;
what the replicas had of such a lost tail is set aside as a fork (readable with
`get fork=`), and a read or a watcher that saw it is judged against those
set-aside histories. Everything else (no duplicates, order, causality,
convergence, no fork but a writer's lost tail) holds as in sync mode.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from protocol.entry import Entry

from .common import MAX_PROBLEMS

STALE_S = 10.0            # async mode: how long after its writer's kill a replica may still serve a lost tail
CRASH_SLACK_S = 1.0       # async mode: past flush_ms, how late a flush may still be on a loaded machine
# The counted kinds of problem, in the order the report lists them.
VIOLATIONS = ("lost_acked", "duplicates", "order_violations", "causality_violations", "phantom_writes",
              "read_violations", "watch_violations", "unexpected_errors")

Op = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Promise:
    """What the durability mode promises: in async mode, what a writer's crash may take.

    `kills` [(node, t)], `writers` (context -> its writer node) and `aside`
    (context -> {hash hex: dedup} of every history set aside on any node)."""

    durability: str = "sync"
    flush_s: float = 0.0
    kills: Sequence[tuple[str, float]] = ()
    writers: Mapping[str, str] = field(default_factory=dict)
    aside: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @property
    def lenient(self) -> bool:
        return self.durability == "async"

    def crashed_with(self, op: Op) -> bool:
        """Its context's writer was killed between its invocation and `flush_s` (+ CRASH_SLACK_S) after
        its acknowledgement: in async mode, a crash that may take it."""
        w = self.writers.get(op["context"])
        return any(n == w and op["invoke"] <= t <= op["complete"] + self.flush_s + CRASH_SLACK_S
                   for n, t in self.kills)

    def kept_aside(self, ctx: str, h: str) -> bool:
        return self.lenient and h in self.aside.get(ctx, {})

    def lost_tail(self, ctx: str, h: str, t: float | None) -> str | None:
        """Why an entry served once that the final log does not hold is allowed, or None.

        In async mode, only as part of a tail its writer lost: "aside" when a replica
        kept it, "served_then_lost" when a kill of the writer at most STALE_S before
        the read explains it (a replica serves the lost tail until it has compared
        with the restarted writer; counted, so a run shows how often it happened)."""
        if not self.lenient:
            return None
        if self.kept_aside(ctx, h):
            return "aside"
        w = self.writers.get(ctx)
        if any(n == w and (t is None or tt >= t - STALE_S) for n, tt in self.kills):
            return "served_then_lost"
        return None


@dataclass(frozen=True, slots=True)
class Evidence:
    """What a check reads. `ops`: History records; appends carry `dedup` (kept in the entry's
    metadata `d`), `after_lamport`, and when ok `seq`, `lamport`, `hash` (hex); gets carry
    `entries` [[seq, hash hex], ...]. `watches`: {"name", "context", "delivered": [[seq, hash hex],
    ...], "errors": [...], and in async mode "earlier": the deliveries of watches ended by a switch
    of history}."""

    ops: Sequence[Op]
    logs: Mapping[str, Sequence[Entry]]
    watches: Sequence[Op] = ()
    promise: Promise = field(default_factory=Promise)


@dataclass(slots=True)
class Findings:
    """Counts by kind, and one sentence per problem (all of them: the merge caps the list)."""

    counts: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def problem(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        self.problems.append(text)


Check = Callable[[Evidence], Findings]


# -- what several checks read ---------------------------------------------------------------


def by_dedup(logs: Mapping[str, Sequence[Entry]]) -> dict[str, dict[str, list[Entry]]]:
    """Per context, the entries of each dedup_id (metadata `d`), in log order."""
    index: dict[str, dict[str, list[Entry]]] = {}
    for ctx, log in logs.items():
        found: dict[str, list[Entry]] = defaultdict(list)
        for e in log:
            d = e.metadata.get("d")
            if d is not None:
                found[d].append(e)
        index[ctx] = found
    return index


def acked_appends(ops: Sequence[Op]) -> list[Op]:
    return [op for op in ops if op.get("f") == "append" and op.get("type") == "ok"]


def client_runs(ev: Evidence) -> dict[str, list[Op]]:
    """Each client's acknowledged appends in invocation order, for the per-client order and
    causality checks. In async mode without those lost with their writer's tail (allowed by
    `check_lost_acked`): their seqs were given again."""
    index = by_dedup(ev.logs)
    runs: dict[str, list[Op]] = defaultdict(list)
    for op in acked_appends(ev.ops):
        if ev.promise.lenient and not index.get(op["context"], {}).get(op["dedup"]):
            continue
        runs[op["process"]].append(op)
    for its in runs.values():
        its.sort(key=lambda o: o["invoke"])
    return runs


# -- one check per property ---------------------------------------------------------------------


def check_lost_acked(ev: Evidence) -> Findings:
    """Every acknowledged append is in the final log as acknowledged. In async mode one its
    writer's crash may have taken is counted as `lost_in_crash` instead."""
    out = Findings()
    index = by_dedup(ev.logs)
    p = ev.promise
    for op in acked_appends(ev.ops):
        ctx, d = op["context"], op["dedup"]
        found = index.get(ctx, {}).get(d)
        if not found and p.lenient and p.crashed_with(op):
            out.counts["lost_in_crash"] += 1  # async durability's promise allows it
            if p.kept_aside(ctx, op["hash"]):
                out.counts["lost_in_crash_set_aside"] += 1
            continue
        if not found:
            out.problem("lost_acked", f"{ctx}: acknowledged append {d} (seq {op['seq']}, by {op['process']} at "
                        f"{op['node']}, t={op['complete']}) is not in the final log")
            continue
        e = found[0]
        if e.seq != op["seq"] or e.hash.hex() != op["hash"]:
            out.problem("lost_acked", f"{ctx}: acknowledged append {d} was seq {op['seq']} hash {op['hash'][:16]}, "
                        f"the final log has it as seq {e.seq} hash {e.hash.hex()[:16]}")
    return out


def check_duplicates(ev: Evidence) -> Findings:
    """No dedup_id twice in a log, and no payload twice (but for a dedup_id already reported)."""
    out = Findings()
    index = by_dedup(ev.logs)
    for ctx, log in ev.logs.items():
        found = index[ctx]
        for d, es in found.items():
            if len(es) > 1:
                out.problem("duplicates", f"{ctx}: dedup_id {d} appears {len(es)} times (seqs {[e.seq for e in es]})")
        payloads = Counter(e.payload for e in log)
        for pl, n in payloads.items():
            if n > 1 and not any(len(es) > 1 and es[0].payload == pl for es in found.values()):
                out.problem("duplicates", f"{ctx}: payload {pl[:40]!r} appears {n} times")
    return out


def check_order(ev: Evidence) -> Findings:
    """Seqs are dense from 1 in every log, and a client's append invoked after another of its
    appends in the same context was acknowledged has a higher seq."""
    out = Findings()
    for ctx, log in ev.logs.items():
        for i, e in enumerate(log, start=1):
            if e.seq != i:
                out.problem("order_violations",
                            f"{ctx}: entry {i} of the final log has seq {e.seq} (seq must be dense from 1)")
    for proc, its in client_runs(ev).items():
        last_in_ctx: dict[str, Op] = {}
        for op in its:
            before = last_in_ctx.get(op["context"])
            if before is not None and before["dedup"] != op["dedup"] and op["seq"] <= before["seq"]:
                out.problem("order_violations", f"{op['context']}: {proc}'s append {op['dedup']} (seq {op['seq']}) "
                            f"was invoked after its {before['dedup']} (seq {before['seq']}) was acknowledged")
            last_in_ctx[op["context"]] = op
    return out


def check_causality(ev: Evidence) -> Findings:
    """Lamports rise along every log; an acknowledged append's lamport is above the token
    (`after_lamport`) its client passed, and above that of the client's earlier acknowledged append
    (its token carried that one's)."""
    out = Findings()
    for ctx, log in ev.logs.items():
        prev_lamport = 0
        for e in log:
            if e.lamport <= prev_lamport:
                out.problem("causality_violations", f"{ctx}#{e.seq}: lamport {e.lamport} is not above the previous "
                            f"entry's {prev_lamport}")
            prev_lamport = max(prev_lamport, e.lamport)
    index = by_dedup(ev.logs)
    for op in acked_appends(ev.ops):
        after = op.get("after_lamport") or 0
        if index.get(op["context"], {}).get(op["dedup"]) and op["lamport"] <= after:
            out.problem("causality_violations", f"{op['context']}#{op['seq']}: append {op['dedup']} got lamport "
                        f"{op['lamport']}, not above the {after} its client had observed and passed")
    for proc, its in client_runs(ev).items():
        prev: Op | None = None
        for op in its:
            if prev is not None and prev["dedup"] != op["dedup"] and op["lamport"] <= prev["lamport"]:
                out.problem("causality_violations", f"{proc}: append {op['dedup']} got lamport {op['lamport']} after "
                            f"its earlier {prev['dedup']} was acknowledged with {prev['lamport']}")
            prev = op
    return out


def check_phantom_writes(ev: Evidence) -> Findings:
    """No append the node refused on every attempt is in the final log."""
    out = Findings()
    index = by_dedup(ev.logs)
    attempts: dict[tuple[str, str], list[Op]] = defaultdict(list)
    for op in ev.ops:
        if op.get("f") == "append":
            attempts[(op["context"], op["dedup"])].append(op)
    for (ctx, d), ats in attempts.items():
        if all(a.get("type") == "fail" for a in ats) and index.get(ctx, {}).get(d):
            out.problem("phantom_writes", f"{ctx}: append {d} was refused on every attempt "
                        f"({', '.join(str(a.get('error')) for a in ats)}) but is in the final log")
    return out


def check_reads(ev: Evidence) -> Findings:
    """Every entry a read returned is in the final log under its seq (or, in async mode, part of a
    writer's lost tail). One problem per read at most."""
    out = Findings()
    for op in ev.ops:
        if op.get("f") != "get" or op.get("type") != "ok":
            continue
        log = ev.logs.get(op["context"], [])
        for seq, h in op.get("entries", []):
            if (seq > len(log) or log[seq - 1].hash.hex() != h) and not _lost_tail(out, ev, op["context"], h,
                                                                                   op["invoke"]):
                out.problem("read_violations", f"{op['context']}#{seq}: {op['process']} read hash {h[:16]} at "
                            f"{op['node']} (t={op['invoke']}), which the final log does not hold")
                break
    return out


def check_watches(ev: Evidence) -> Findings:
    """Each watcher reported no error and saw its context's final log whole, in order, once. In
    async mode a watch ended by a switch of history saw seqs 1, 2, 3, ..., each in the final log
    or in a history kept aside (the writer's lost tail)."""
    out = Findings()
    for w in ev.watches:
        log = ev.logs.get(w["context"], [])
        want = [[e.seq, e.hash.hex()] for e in log]
        got = [list(x) for x in w["delivered"]]
        for err in w.get("errors", []):
            out.problem("watch_violations", f"watcher {w['name']} of {w['context']}: {err}")
        for seg in w.get("earlier", []):
            seqs = [s for s, _ in seg]
            bad = next((f"entry #{s} ({h[:16]}) is neither in the final log nor set aside" for s, h in seg
                        if not ((s <= len(log) and log[s - 1].hash.hex() == h)
                                or _lost_tail(out, ev, w["context"], h, None))),
                       None)
            if seqs != list(range(1, len(seqs) + 1)):
                bad = f"delivered seqs {seqs[:5]}... are not 1, 2, 3, ..."
            if bad:
                out.problem("watch_violations", f"watcher {w['name']} of {w['context']} before a history switch: {bad}")
        if got != want:
            seqs = [s for s, _ in got]
            dup = len(seqs) - len(set(seqs))
            first_bad = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
            why = (f"{dup} duplicate(s)" if dup else
                   f"differs from the final log at position {first_bad + 1}" if first_bad is not None else
                   f"saw {len(got)} of {len(want)} entries")
            out.problem("watch_violations", f"watcher {w['name']} of {w['context']} at {w.get('node')}: {why}")
    return out


def check_unexpected_errors(ev: Evidence) -> Findings:
    """No operation was answered INTERNAL, INTEGRITY or BAD_REQUEST: the workload sends only valid
    requests, so each is a bug."""
    out = Findings()
    for op in ev.ops:
        if op.get("type") == "fail" and op.get("error") in ("INTERNAL", "INTEGRITY", "BAD_REQUEST"):
            out.problem("unexpected_errors", f"{op['process']} {op['f']} {op['context']} at {op['node']} "
                        f"(t={op['invoke']}): {op['error']} {op.get('message', '')}")
    return out


def _lost_tail(out: Findings, ev: Evidence, ctx: str, h: str, t: float | None) -> bool:
    why = ev.promise.lost_tail(ctx, h, t)
    if why == "served_then_lost":
        out.counts["served_then_lost"] += 1
    return why is not None


# In the order of the report's summary line, which is the order their problems are listed in.
CHECKS: tuple[Check, ...] = (check_lost_acked, check_duplicates, check_order, check_causality, check_reads,
                             check_watches, check_phantom_writes, check_unexpected_errors)


def tally(ops: Sequence[Op]) -> dict[str, int]:
    """What the workload did: distinct appends acknowledged, failed (every attempt) and unknown,
    append attempts, successful reads."""
    attempts: dict[tuple[str, str], set[Any]] = defaultdict(set)
    for op in ops:
        if op.get("f") == "append":
            attempts[(op["context"], op["dedup"])].add(op.get("type"))
    outcomes = Counter("ok" if "ok" in kinds else "unknown" if "unknown" in kinds else "fail"
                       for kinds in attempts.values())
    return {
        "acked": outcomes["ok"],
        "writes_failed": outcomes["fail"],
        "writes_unknown": outcomes["unknown"],
        "attempts": sum(1 for op in ops if op.get("f") == "append"),
        "reads": sum(1 for op in ops if op.get("f") in ("get", "head") and op.get("type") == "ok"),
    }


def check_history(ops: Sequence[Op], logs: Mapping[str, Sequence[Entry]], watches: Sequence[Op], *,
                  durability: str = "sync", flush_s: float = 0.0, kills: Sequence[tuple[str, float]] = (),
                  writers: Mapping[str, str] | None = None,
                  aside: Mapping[str, Mapping[str, str]] | None = None,
                  checks: Sequence[Check] = CHECKS) -> dict[str, Any]:
    """Run every check over a recorded history and the final logs (one per context); merge their
    counts, and their problems (at most MAX_PROBLEMS listed, all counted), with `tally`'s figures.

    See `Evidence` for `ops` and `watches`, `Promise` for the async-mode arguments."""
    ev = Evidence(ops, logs, watches, Promise(durability, flush_s, tuple(kills), writers or {}, aside or {}))
    counts: Counter[str] = Counter()
    problems: list[str] = []
    for check in checks:
        found = check(ev)
        counts.update(found.counts)
        problems += found.problems[: MAX_PROBLEMS - len(problems)]
    t = tally(ops)
    result: dict[str, Any] = {k: counts[k] for k in VIOLATIONS}
    result["acked"] = t["acked"]
    for k in ("lost_in_crash", "lost_in_crash_set_aside", "served_then_lost"):
        result[k] = counts[k]
    for k in ("writes_failed", "writes_unknown", "attempts", "reads"):
        result[k] = t[k]
    result["problems"] = problems
    return result


# -- the final state of the nodes -------------------------------------------------------------


def check_convergence(converged: bool, timeout: float, heads: Mapping[str, Any]) -> list[str]:
    """A problem when the nodes did not reach the same (size, root) for every context in time."""
    return [] if converged else [f"not converged {timeout:g} s after healing: {json.dumps(heads)}"]


def check_forks(reported: Sequence[tuple[str, Mapping[str, Any]]], durability: str) -> list[str]:
    """The forks (node, its `status` fork record) that break the mode's promise: any, in sync
    mode; in async mode all but a writer's lost tail, where its own history is served."""
    bad = []
    for node, f in reported:
        lost_tail = f.get("local_writer") == f.get("peer_writer") == f.get("served_writer")
        if durability != "async" or not lost_tail:
            bad.append(f"{node}: {f}")
    return bad
