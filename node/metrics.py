"""`--metrics HOST:PORT`: Prometheus metrics, `/healthz` and `/readyz` over HTTP.

The HTTP side runs in a thread of its own (one request at a time: scrapes and probes are rare)
and never touches the node's state: it asks the request loop for what it needs (`Job`) through
a queue and an inproc wake-up socket, and waits for the answer. What comes from the loop is
built there, between requests, from the same fields as `status`; what costs I/O (the data
folder's size, /proc) is read in the HTTP thread.

- `GET /metrics`: Prometheus text format 0.0.4 (`render`).
- `GET /healthz`: 200 while the request loop answers within HEALTH_TIMEOUT_S, else 503.
- `GET /readyz`: 200 when storage takes writes and no live peer holds more than `ready_lag`
  entries this node does not (caught up), else 503 with the reasons, one a line.

Request latencies are timed by `RequestTimer`, which wraps the core's `request` only when
metrics are on: the time a request takes the loop (a wait for the disk or replicas after it is
not counted), by op.
"""

from __future__ import annotations

import http.server
import logging
import os
import queue
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0
SCRAPE_TIMEOUT_S = 5.0
DEFAULT_READY_LAG = 10_000
# latency buckets, seconds (the histogram's `le` bounds): 50 us .. 1 s
_perf_counter = time.perf_counter
_bisect = bisect_left
BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.25, 1.0)


class Histogram:
    """Counts per bucket (not cumulative until rendered), a sum and a count."""

    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1


class RequestTimer:
    """Wraps the core's `request`: the loop time of each request, and its bytes, by op."""

    def __init__(self, request: Callable[..., bool], last_op: Callable[[], str]) -> None:
        self._request = request
        self._last_op = last_op
        self.latency: dict[str, Histogram] = {}
        self.bytes: dict[str, int] = {}

    def copy(self) -> RequestTimer:
        """What it counted so far, apart from the live one (a scrape renders it in another thread)."""
        c = RequestTimer(self._request, self._last_op)
        for op, h in self.latency.items():
            k = c.latency[op] = Histogram()
            k.counts, k.sum, k.count = list(h.counts), h.sum, h.count
        c.bytes = dict(self.bytes)
        return c

    def __call__(self, frames: list[Any], now: float, who: Any = None) -> bool:
        # on every request: kept to ~0.4 us (the histogram's update inlined)
        clock = _perf_counter
        t0 = clock()
        junk = self._request(frames, now, who)
        took = clock() - t0
        op = self._last_op() if not junk else "invalid"
        if op == "held":
            return junk  # held until storage catches up (node/core.py): counted when it is served
        h = self.latency.get(op)
        if h is None:
            h = self.latency[op] = Histogram()
        h.counts[_bisect(BUCKETS, took)] += 1
        h.sum += took
        h.count += 1
        b = self.bytes
        b[op] = b.get(op, 0) + len(frames[-1])
        return junk


# -- the text format ---------------------------------------------------------------------------


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, object]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _num(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


class Text:
    """Builds the exposition: each family's HELP and TYPE once, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[Mapping[str, object], float]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_num(value)}")

    def one(self, name: str, kind: str, help_text: str, value: float | None) -> None:
        if value is not None:
            self.family(name, kind, help_text, [({}, value)])

    def histogram(self, name: str, help_text: str, by_op: Mapping[str, Histogram]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        for op, h in sorted(by_op.items()):
            acc = 0
            for bound, n in zip((*BUCKETS, float("inf")), h.counts):
                acc += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                self.lines.append(f'{name}_bucket{{op="{_escape(op)}",le="{le}"}} {acc}')
            self.lines.append(f'{name}_sum{{op="{_escape(op)}"}} {h.sum!r}')
            self.lines.append(f'{name}_count{{op="{_escape(op)}"}} {h.count}')

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(st: Mapping[str, Any], op_counts: Mapping[str, int], error_counts: Mapping[tuple[str, str], int],
           timer: RequestTimer | None, proc: Mapping[str, float]) -> str:
    """The metrics text of one scrape: `st` is what `status` answers (node/core.py), the counts
    are the core's, `proc` what `process_figures` read."""
    t = Text()
    t.family("ledger_info", "gauge", "The node: 1, with its version, id, durability and security as labels.",
             [({"version": st.get("version"), "node_id": st.get("node_id"), "durability": st.get("durability"),
                "security": st.get("security"), "cluster": st.get("cluster")}, 1)])
    t.one("ledger_uptime_seconds", "gauge", "Seconds since the node started.", st.get("uptime_s"))
    t.family("ledger_requests_total", "counter", "Requests decoded, by op.",
             [({"op": op}, n) for op, n in sorted(op_counts.items())])
    t.family("ledger_request_errors_total", "counter", "Requests answered with an error, by op and error code "
             "(op `invalid`: no known op could be read).",
             [({"op": op, "code": code}, n) for (op, code), n in sorted(error_counts.items())])
    if timer is not None:
        t.histogram("ledger_request_duration_seconds", "Time a request took the request loop, by op (a wait "
                    "for the disk or replicas after it is not counted).", timer.latency)
        t.family("ledger_request_bytes_total", "counter", "Bytes of requests received, by op.",
                 [({"op": op}, n) for op, n in sorted(timer.bytes.items())])
    t.one("ledger_contexts", "gauge", "Contexts held.", st.get("contexts"))
    cache = st.get("context_cache") or {}
    t.one("ledger_context_cache_contexts", "gauge", "Contexts in RAM now (--context-cache bounds the idle ones).",
          cache.get("loaded"))
    t.one("ledger_context_cache_loads_total", "counter", "Contexts read from storage on first use.", cache.get("loads"))
    t.one("ledger_context_cache_evictions_total", "counter", "Idle contexts that left RAM.", cache.get("evictions"))
    t.one("ledger_entries", "gauge", "Entries held, over all contexts.", st.get("entries"))
    t.one("ledger_lamport", "gauge", "The node's Lamport clock.", st.get("lamport"))
    t.one("ledger_pending_writes", "gauge", "Keys waiting for storage.", st.get("pending_writes"))
    t.one("ledger_hot_bytes", "gauge", "Bytes of recent entries kept in RAM.", st.get("hot_bytes"))
    storage = st.get("storage") or {}
    t.one("ledger_storage_ok", "gauge", "1 while storage takes writes, 0 after a write failed.",
          1 if storage.get("state") == "ok" else 0)
    t.one("ledger_storage_write_errors_total", "counter", "Storage writes that failed.", storage.get("write_errors"))
    t.one("ledger_storage_recoveries_total", "counter", "Recoveries after failed writes.", storage.get("recoveries"))
    t.one("ledger_write_batches_total", "counter", "Batches written to storage.", st.get("write_batches"))
    t.one("ledger_written_keys_total", "counter", "Keys written to storage.", st.get("written_keys"))
    t.one("ledger_write_stalls_total", "counter", "Times the request loop waited for storage to catch up "
          "(back-pressure).", st.get("backpressure_waits"))
    t.one("ledger_held_requests", "gauge", "Requests held until storage catches up: writes, and what their "
          "connections sent after them (other reads are answered meanwhile).", st.get("held_requests"))
    t.one("ledger_held_requests_total", "counter", "Requests held until storage caught up.",
          st.get("held_requests_total"))
    if "storage_bytes" in proc:
        t.family("ledger_storage_bytes", "gauge", "Bytes of the data folder's files, by store.",
                 [({"store": k}, v) for k, v in (("main", proc["storage_bytes"]),
                                                ("entries", proc.get("entries_bytes", 0)))])
    t.one("ledger_integrity_errors_total", "counter", "Entries read from disk that did not match their hash.",
          st.get("integrity_errors"))
    t.one("ledger_damaged_contexts", "gauge", "Contexts that came back from disk damaged, not repaired yet.",
          len(st.get("damaged") or ()))
    conns = st.get("connections") or {}
    t.family("ledger_connections", "gauge", "Open connections, by socket.",
             [({"socket": k}, v) for k, v in sorted(conns.items())])
    t.one("ledger_clients_cut_off_total", "counter", "Clients cut off for not reading their replies.",
          st.get("client_cutoffs"))
    t.one("ledger_watchers", "gauge", "Watch subscriptions.", st.get("watchers"))
    t.one("ledger_watched_contexts", "gauge", "Contexts with at least one watcher.", st.get("watched_contexts"))
    t.one("ledger_published_entries_total", "counter", "Entries published to watchers.", st.get("published_entries"))
    t.one("ledger_publish_drops_total", "counter", "Watch messages dropped (a watcher's queue full).",
          st.get("publish_drops"))
    busy = st.get("busy_poll") or {}
    if "spun_ms" in busy:
        t.one("ledger_busy_poll_seconds_total", "counter", "Seconds the request loop spent busy-polling.",
              busy["spun_ms"] / 1000.0)
    peers = st.get("peers") or []
    states: dict[str, int] = {}
    for p in peers:
        states[str(p.get("state"))] = states.get(str(p.get("state")), 0) + 1
    t.family("ledger_peers", "gauge", "Peers, by state.", [({"state": k}, v) for k, v in sorted(states.items())])
    t.family("ledger_peer_behind_entries", "gauge", "Entries a peer holds fewer than this node (from its "
             "heartbeats; the replication lag seen from here), by peer.",
             [({"peer": p.get("id") or p.get("address")}, p["behind"]) for p in peers if p.get("behind") is not None])
    t.family("ledger_peer_ahead_entries", "gauge", "Entries a peer holds more than this node (what this node "
             "still has to pull), by peer.",
             [({"peer": p.get("id") or p.get("address")}, max(0, (p.get("entries") or 0) - (st.get("entries") or 0)))
              for p in peers if p.get("last_heard_s") is not None])
    t.family("ledger_peer_last_heard_seconds", "gauge", "Seconds since a peer's last heartbeat, by peer.",
             [({"peer": p.get("id") or p.get("address")}, p["last_heard_s"]) for p in peers
              if p.get("last_heard_s") is not None])
    rep = st.get("replication") or {}
    for key, help_text in (
        ("pulled_entries", "Entries pulled from peers."),
        ("pulled_bytes", "Bytes of entries pulled from peers."),
        ("pushed_entries", "Entries pushed to peers."),
        ("gap_pulls", "Pulls started by a gap in pushes."),
        ("heartbeats_sent", "Heartbeats sent."),
        ("reply_bytes", "Bytes of peers' replies to this node's repair requests."),
        ("refused_messages", "Peer messages refused."),
        ("peer_errors", "Errors talking to peers."),
    ):
        t.one(f"ledger_replication_{key}_total", "counter", help_text, rep.get(key))
    t.one("ledger_forks", "gauge", "Forks seen (histories set aside).", len(st.get("forks") or ()))
    t.one("ledger_equivocations", "gauge", "Equivocations recorded (a writer signed two heads of one size).",
          len(st.get("equivocations") or ()))
    t.one("process_resident_memory_bytes", "gauge", "Resident memory of the node process.", proc.get("rss"))
    t.one("process_open_fds", "gauge", "Open file descriptors of the node process.", proc.get("fds"))
    t.one("process_cpu_seconds_total", "counter", "CPU time of the node process (user and system).",
          proc.get("cpu"))
    return t.text()


def _folder_bytes(path: str) -> int:
    total = 0
    try:
        with os.scandir(path) as it:
            for e in it:
                if e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
    except OSError:
        pass
    return total


def process_figures(data: str) -> dict[str, float]:
    """RSS, open fds, CPU time, and the data folder's bytes (its own files; entries/ apart)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/statm") as f:
            out["rss"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        out["fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass  # not Linux: left out
    t = os.times()
    out["cpu"] = t.user + t.system
    if data != ":memory:":
        out["storage_bytes"] = _folder_bytes(data)
        out["entries_bytes"] = _folder_bytes(os.path.join(data, "entries"))
    return out


# -- the loop's side: jobs ------------------------------------------------------------------------


class Job:
    """One question for the request loop: `kind` is `metrics` or `health`; the loop sets
    `result` (text, or the status fields) and `done`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.result: Any = None
        self.done = threading.Event()


def readiness(st: Mapping[str, Any], ready_lag: int) -> list[str]:
    """Why the node is not ready (empty: ready)."""
    why = []
    storage = st.get("storage") or {}
    if storage.get("state") != "ok":
        why.append(f"storage is not taking writes ({storage.get('state')}: {storage.get('error', '')})")
    local = st.get("entries") or 0
    for p in st.get("peers") or ():
        if p.get("state") == "alive" and (p.get("entries") or 0) - local > ready_lag:
            why.append(f"peer {p.get('id') or p.get('address')} holds {(p.get('entries') or 0) - local} entries "
                       f"more than this node (catching up; ready within {ready_lag})")
    return why


class Endpoint:
    """The HTTP thread. `ask(kind)` puts a Job for the loop and wakes it; the loop calls `serve`
    for each job waiting (see node/server.py)."""

    def __init__(self, host: str, port: int, data: str, wake: Callable[[], None], ready_lag: int) -> None:
        self.jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._wake = wake
        self._wake_lock = threading.Lock()
        self.data = data
        self.ready_lag = ready_lag
        self.scrapes = 0
        self.closing = False
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            server_version = "ledger-node"

            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                endpoint.handle(self)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("metrics endpoint: " + format, *args)

        self.httpd = http.server.HTTPServer((host, port), Handler)
        self.httpd.timeout = 1.0
        self.address = f"{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.closing = True
        while not self.jobs.empty():  # a scrape waiting for the loop, which stops: answered 503 at once
            self.jobs.get_nowait().done.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def ask(self, kind: str, timeout: float) -> Job:
        job = Job(kind)
        if self.closing:
            return job
        self.jobs.put(job)
        with self._wake_lock:
            self._wake()
        job.done.wait(timeout)
        return job

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        if path == "/metrics":
            proc = process_figures(self.data)
            job = self.ask("metrics", SCRAPE_TIMEOUT_S)
            if job.result is None:
                return self._send(h, 503, "the request loop did not answer within "
                                  f"{SCRAPE_TIMEOUT_S:g} s\n")
            self.scrapes += 1
            text = job.result(proc)
            return self._send(h, 200, text, "text/plain; version=0.0.4; charset=utf-8")
        if path == "/healthz":
            t0 = time.monotonic()
            job = self.ask("health", HEALTH_TIMEOUT_S)
            if job.result is None:
                return self._send(h, 503, f"the request loop has not answered for {time.monotonic() - t0:.1f} s\n")
            return self._send(h, 200, "ok\n")
        if path == "/readyz":
            job = self.ask("ready", HEALTH_TIMEOUT_S)
            if job.result is None:
                return self._send(h, 503, "the request loop did not answer\n")
            why = readiness(job.result, self.ready_lag)
            return self._send(h, 503 if why else 200, "\n".join(why) + "\n" if why else "ready\n")
        return self._send(h, 404, "not found: try /metrics, /healthz or /readyz\n")

    @staticmethod
    def _send(h: http.server.BaseHTTPRequestHandler, code: int, body: str,
              ctype: str = "text/plain; charset=utf-8") -> None:
        data = body.encode()
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
