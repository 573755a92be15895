"""ledger-chaos's checks, one at a time: each on a tiny history that breaks exactly its property, and on
one that keeps it."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.entry import Entry, leaf_hash
from tools.chaos import checks
from tools.chaos.checks import Evidence, Findings, Promise
from tools.chaos.common import MAX_PROBLEMS


def entry(seq: int, lamport: int, dedup: str, payload: bytes | None = None, ctx: str = "c") -> Entry:
    payload = payload if payload is not None else dedup.encode()
    md = {"d": dedup}
    return Entry(ctx, seq, "chaos", payload, md, lamport, 0, "n1", leaf_hash(ctx, seq, "chaos", payload, md, lamport,
                                                                            0, "n1"))


def ack(e: Entry, t: float, proc: str = "w1", after: int = 0, **kw: Any) -> dict[str, Any]:
    return {"process": proc, "f": "append", "context": e.context, "node": "n1", "invoke": t, "complete": t + 0.01,
            "type": "ok", "dedup": e.metadata["d"], "seq": e.seq, "lamport": e.lamport, "hash": e.hash.hex(),
            "after_lamport": after, **kw}


def refused(dedup: str, t: float, error: str = "UNAVAILABLE") -> dict[str, Any]:
    return {"process": "w2", "f": "append", "context": "c", "node": "n2", "invoke": t, "complete": t + 0.01,
            "type": "fail", "error": error, "dedup": dedup}


def read(pairs: list[list[Any]], t: float = 1.0) -> dict[str, Any]:
    return {"process": "r1", "f": "get", "context": "c", "node": "n2", "invoke": t, "complete": t + 0.01,
            "type": "ok", "entries": pairs}


def sh(e: Entry) -> list[Any]:
    return [e.seq, e.hash.hex()]


E1, E2, E3 = entry(1, 1, "w1-1"), entry(2, 2, "w1-2"), entry(3, 3, "w1-3")
GOOD_LOG = [E1, E2, E3]
GOOD_OPS = [ack(E1, 0.0), ack(E2, 1.0, after=1), ack(E3, 2.0, after=2), read([sh(E1), sh(E2)])]
GOOD_WATCH = {"name": "watch-c", "context": "c", "node": "n2", "delivered": [sh(e) for e in GOOD_LOG], "errors": []}
ASYNC = dict(durability="async", flush_s=0.5, writers={"c": "n1"})


def only(found: Findings, kind: str, n: int = 1) -> None:
    """`found` counts `n` problems of `kind` and nothing else, one sentence each."""
    assert dict(found.counts) == {kind: n}, found
    assert len(found.problems) == n


def _with(log: list[Entry], ops: list[dict[str, Any]] = GOOD_OPS, **watch: Any) -> Evidence:
    """GOOD_OPS over `log`, watched whole (unless `watch` says otherwise)."""
    return Evidence(ops, {"c": log}, [{**GOOD_WATCH, "delivered": [sh(e) for e in log], **watch}])


# For each check, the clean history changed so that it breaks that property and no other.
BROKEN: dict[str, tuple[str, Evidence]] = {
    "check_lost_acked": ("lost_acked", _with([E1, E2])),
    "check_duplicates": ("duplicates", _with([*GOOD_LOG, entry(4, 4, "w1-1")])),
    "check_order": ("order_violations", _with([*GOOD_LOG, entry(5, 4, "w3-1")])),
    "check_causality": ("causality_violations", _with([*GOOD_LOG, entry(4, 3, "w3-1")])),
    "check_reads": ("read_violations", _with(GOOD_LOG, [*GOOD_OPS, read([[2, "00" * 32]])])),
    "check_watches": ("watch_violations", _with(GOOD_LOG, delivered=[sh(E1), sh(E2)])),
    "check_phantom_writes": ("phantom_writes", _with([*GOOD_LOG, entry(4, 4, "w3-1")],
                                                     [*GOOD_OPS, refused("w3-1", 3.0)])),
    "check_unexpected_errors": ("unexpected_errors", _with(GOOD_LOG, [*GOOD_OPS, refused("w3-2", 3.0, "INTERNAL")])),
}


def test_every_check_has_a_broken_history():
    assert sorted(BROKEN) == sorted(c.__name__ for c in checks.CHECKS)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_check_holds_on_the_clean_history_and_finds_exactly_its_own_break(name):
    kind, broken = BROKEN[name]
    for check in checks.CHECKS:
        clean = check(Evidence(GOOD_OPS, {"c": GOOD_LOG}, [GOOD_WATCH]))
        assert clean.problems == [] and not +clean.counts, (check.__name__, clean)
        found = check(broken)
        if check.__name__ == name:
            only(found, kind)
        else:
            assert found.problems == [], (check.__name__, found.problems)


# -- lost acknowledged writes ------------------------------------------------------------------------


def test_lost_acked_finds_an_acknowledged_append_missing_or_moved():
    only(checks.check_lost_acked(Evidence(GOOD_OPS, {"c": [E1, E2]})), "lost_acked")
    moved = entry(2, 2, "w1-3")  # w1-3 is in the log, but not as acknowledged (seq 3)
    found = checks.check_lost_acked(Evidence(GOOD_OPS, {"c": [E1, E2, moved]}))
    only(found, "lost_acked")
    assert "w1-3 was seq 3" in found.problems[0]


def test_lost_acked_in_async_mode_allows_only_a_loss_inside_the_writers_crash_window():
    ops = [ack(E1, 0.0), ack(E2, 1.0)]
    inside = Promise(kills=[("n1", 1.3)], aside={"c": {E2.hash.hex(): "w1-2"}}, **ASYNC)
    found = checks.check_lost_acked(Evidence(ops, {"c": [E1]}, promise=inside))
    assert found.problems == [] and found.counts == {"lost_in_crash": 1, "lost_in_crash_set_aside": 1}
    # the same loss in sync mode, after the window, or at another node's kill
    for promise in (Promise(kills=[("n1", 1.3)], writers={"c": "n1"}), Promise(kills=[("n1", 2.6)], **ASYNC),
                    Promise(kills=[("n2", 1.3)], **ASYNC)):
        only(checks.check_lost_acked(Evidence(ops, {"c": [E1]}, promise=promise)), "lost_acked")


def test_the_async_crash_window_runs_from_invocation_to_flush_plus_slack_after_the_ack():
    p = Promise(kills=[("n1", 5.0)], **ASYNC)
    op = {"context": "c", "invoke": 4.0, "complete": 5.0 - 0.5 - checks.CRASH_SLACK_S}
    assert p.crashed_with(op)
    assert not p.crashed_with(dict(op, complete=op["complete"] - 0.01))
    assert not p.crashed_with(dict(op, invoke=5.01))
    assert not Promise(kills=[("n1", 5.0)], **ASYNC).crashed_with(dict(op, context="other"))


# -- duplicates ---------------------------------------------------------------------------------------


def test_duplicates_finds_a_dedup_id_twice_and_a_payload_twice():
    twice = entry(3, 3, "w1-1")  # w1-1 again (same payload): one problem, not two
    found = checks.check_duplicates(Evidence([], {"c": [E1, E2, twice]}))
    only(found, "duplicates")
    assert "dedup_id w1-1 appears 2 times (seqs [1, 3])" in found.problems[0]
    same_payload = entry(3, 3, "w1-3", payload=b"w1-1")
    found = checks.check_duplicates(Evidence([], {"c": [E1, E2, same_payload]}))
    only(found, "duplicates")
    assert "payload b'w1-1' appears 2 times" in found.problems[0]


# -- order -----------------------------------------------------------------------------------------------


def test_order_finds_a_gap_in_the_seqs_of_a_log():
    found = checks.check_order(Evidence([], {"c": [E1, E3]}))
    only(found, "order_violations")
    assert "entry 2 of the final log has seq 3" in found.problems[0]


def test_order_finds_a_later_append_of_one_client_with_a_lower_seq():
    a, b = entry(2, 5, "w1-1"), entry(1, 4, "w1-2")  # w1-2 invoked after w1-1 was acknowledged
    found = checks.check_order(Evidence([ack(a, 0.0), ack(b, 1.0)], {"c": [b, a]}))
    only(found, "order_violations")
    # another client's append may well land below
    assert not checks.check_order(Evidence([ack(a, 0.0), ack(b, 1.0, proc="w2")], {"c": [b, a]})).problems


# -- causality ---------------------------------------------------------------------------------------------


def test_causality_finds_a_lamport_that_does_not_rise_along_the_log():
    low = entry(2, 1, "w1-2")
    only(checks.check_causality(Evidence([], {"c": [E1, low]})), "causality_violations")


def test_causality_finds_a_token_not_honoured():
    found = checks.check_causality(Evidence([ack(E1, 0.0), ack(E2, 1.0, after=7, proc="w2")], {"c": [E1, E2]}))
    only(found, "causality_violations")
    assert "not above the 7 its client had observed" in found.problems[0]


def test_causality_finds_a_client_whose_later_append_has_a_lower_lamport():
    # two contexts, so the log order itself is fine: w1's second append is below its first
    a, b = entry(1, 5, "w1-1", ctx="a"), entry(1, 4, "w1-2", ctx="b")
    found = checks.check_causality(Evidence([ack(a, 0.0), ack(b, 1.0)], {"a": [a], "b": [b]}))
    only(found, "causality_violations")
    assert "after its earlier w1-1 was acknowledged with 5" in found.problems[0]


# -- reads ---------------------------------------------------------------------------------------------------


def test_reads_finds_an_entry_the_final_log_does_not_hold():
    other = entry(2, 9, "nobody")
    found = checks.check_reads(Evidence([read([sh(E1), sh(other), [3, "00" * 32]])], {"c": GOOD_LOG}))
    only(found, "read_violations")  # one per read
    only(checks.check_reads(Evidence([read([sh(E3)])], {"c": [E1, E2]})), "read_violations")  # past the end


def test_reads_in_async_mode_allow_a_lost_tail_kept_aside_or_served_soon_after_a_writer_kill():
    lost = entry(3, 3, "w1-3")
    ev = dict(ops=[read([sh(lost)], t=5.0)], logs={"c": [E1, E2]})
    aside = Promise(aside={"c": {lost.hash.hex(): "w1-3"}}, **ASYNC)
    assert checks.check_reads(Evidence(**ev, promise=aside)).counts == {}
    recent = Promise(kills=[("n1", 5.0 - checks.STALE_S)], **ASYNC)
    assert checks.check_reads(Evidence(**ev, promise=recent)).counts == {"served_then_lost": 1}
    stale = Promise(kills=[("n1", 5.0 - checks.STALE_S - 0.1)], **ASYNC)
    only(checks.check_reads(Evidence(**ev, promise=stale)), "read_violations")


# -- watches -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("delivered, why", [
    ([sh(E1), sh(E1), sh(E2), sh(E3)], "1 duplicate(s)"),
    ([sh(E1), sh(E3), sh(E2)], "differs from the final log at position 2"),
    ([sh(E1), sh(E2)], "saw 2 of 3 entries"),
])
def test_watches_find_a_watcher_that_did_not_see_the_final_log_once_in_order(delivered, why):
    found = checks.check_watches(Evidence([], {"c": GOOD_LOG}, [dict(GOOD_WATCH, delivered=delivered)]))
    only(found, "watch_violations")
    assert why in found.problems[0]


def test_watches_report_a_watchers_error():
    w = dict(GOOD_WATCH, errors=["INTEGRITY: gap"])
    only(checks.check_watches(Evidence([], {"c": GOOD_LOG}, [w])), "watch_violations")


def test_watches_judge_a_watch_ended_by_a_history_switch():
    lost = entry(3, 3, "w1-3")
    promise = Promise(aside={"c": {lost.hash.hex(): "w1-3"}}, **ASYNC)
    ok = dict(GOOD_WATCH, earlier=[[sh(E1), sh(E2), sh(lost)]])
    assert not checks.check_watches(Evidence([], {"c": GOOD_LOG}, [ok], promise)).problems
    gap = dict(GOOD_WATCH, earlier=[[sh(E1), sh(E3)]])
    only(checks.check_watches(Evidence([], {"c": GOOD_LOG}, [gap], promise)), "watch_violations")
    stranger = dict(GOOD_WATCH, earlier=[[sh(E1), sh(entry(2, 9, "nobody"))]])
    only(checks.check_watches(Evidence([], {"c": GOOD_LOG}, [stranger], promise)), "watch_violations")


# -- phantom writes, unexpected errors --------------------------------------------------------------------


def test_phantom_writes_finds_an_append_refused_on_every_attempt_yet_present():
    ghost = entry(4, 4, "w2-1")
    ops = [refused("w2-1", 1.0), refused("w2-1", 2.0, "NOT_WRITER")]
    found = checks.check_phantom_writes(Evidence(ops, {"c": [*GOOD_LOG, ghost]}))
    only(found, "phantom_writes")
    assert "(UNAVAILABLE, NOT_WRITER)" in found.problems[0]
    # one unknown attempt may have applied it
    unknown = dict(refused("w2-1", 3.0), type="unknown")
    assert not checks.check_phantom_writes(Evidence([*ops, unknown], {"c": [*GOOD_LOG, ghost]})).problems


@pytest.mark.parametrize("code", ["INTERNAL", "INTEGRITY", "BAD_REQUEST"])
def test_unexpected_errors_finds_an_answer_the_workload_must_never_get(code):
    only(checks.check_unexpected_errors(Evidence([refused("w2-1", 1.0, code)], {"c": GOOD_LOG})), "unexpected_errors")
    assert not checks.check_unexpected_errors(Evidence([refused("w2-1", 1.0, "TIMEOUT")], {"c": GOOD_LOG})).problems


# -- the final state -----------------------------------------------------------------------------------------


def test_convergence_and_forks():
    assert checks.check_convergence(True, 60.0, {}) == []
    (p,) = checks.check_convergence(False, 60.0, {"c": {"n1": [3, "ab"], "n2": "UNAVAILABLE"}})
    assert p.startswith("not converged 60 s after healing: ") and "UNAVAILABLE" in p
    lost_tail = {"context": "c", "local_writer": "n1", "peer_writer": "n1", "served_writer": "n1"}
    split = dict(lost_tail, peer_writer="n2")
    assert checks.check_forks([("n2", lost_tail)], "async") == []
    assert checks.check_forks([("n2", lost_tail)], "sync") == [f"n2: {lost_tail}"]
    assert checks.check_forks([("n3", split)], "async") == [f"n3: {split}"]


# -- check_history runs them all and merges --------------------------------------------------------------


def test_check_history_runs_every_check_and_merges_counts_problems_and_figures():
    ops = [*GOOD_OPS, refused("w2-9", 3.0, "INTERNAL"), dict(refused("w2-8", 3.5), type="unknown")]
    r = checks.check_history(ops, {"c": [E1, E3]}, [GOOD_WATCH])
    assert r["lost_acked"] == 1 and r["order_violations"] == 1 and r["watch_violations"] == 1
    assert r["read_violations"] == 1 and r["unexpected_errors"] == 1
    assert (r["acked"], r["writes_failed"], r["writes_unknown"], r["attempts"], r["reads"]) == (3, 1, 1, 5, 1)
    assert len(r["problems"]) == sum(r[k] for k in checks.VIOLATIONS)
    # the problems come in the order of the checks
    assert r["problems"][0].startswith("c: acknowledged append w1-2")
    assert r["problems"][-1].startswith("w2 append c at n2")
    # with the checks replaced, nothing is found: the counts come from the checks alone
    empty = checks.check_history(ops, {"c": [E1, E3]}, [GOOD_WATCH], checks=[lambda ev: Findings()])
    assert [empty[k] for k in checks.VIOLATIONS] == [0] * len(checks.VIOLATIONS) and empty["problems"] == []


def test_check_history_lists_at_most_max_problems_and_counts_them_all():
    ops = [refused(f"w2-{i}", float(i), "INTERNAL") for i in range(MAX_PROBLEMS + 7)]
    r = checks.check_history(ops, {"c": GOOD_LOG}, [])
    assert r["unexpected_errors"] == MAX_PROBLEMS + 7 and len(r["problems"]) == MAX_PROBLEMS
