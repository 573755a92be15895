"""Node configuration: flags, their environment variables, a config file and defaults, validated.

Every flag `--foo-bar` can also be set as `LEDGER_FOO_BAR`, or as `foo-bar` (or `foo_bar`) in
the TOML file given by `--config FILE` / `LEDGER_CONFIG`. Precedence: flag > environment > file
> default. Validation raises ConfigError with a message meant for a person (never `assert`,
which `python -O` strips); a file value is checked by the same rules as the flag.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from node import __version__
from node.busypoll import DEFAULT_BUDGET_PCT as DEFAULT_BUSY_POLL_BUDGET
from node.busypoll import DEFAULT_WINDOW_US as DEFAULT_BUSY_POLL_US
from node.busypoll import SUGGESTED_WINDOW_US
from node.mesh import DEFAULT_MAX_PEERS, MAX_MAX_PEERS
from protocol.address import parse_address, split_address
from protocol.errors import RemoteProtocolError

DEFAULT_PORT = 7400
DEFAULT_MAX_PAYLOAD = 4 << 20
DEFAULT_HOT_BYTES = 64 << 20
DEFAULT_MAX_CLIENT_QUEUE = 64 << 20
MIN_MAX_REQUEST = 16 << 20
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Config:
    node_id: str | None
    data: str
    host: str
    port: int
    pub_port: int | None
    durability: str
    flush_ms: int
    max_payload: int
    hot_bytes: int
    log_level: str
    write_buffer: int = 16 << 20
    watch_heartbeat_ms: int = 1000
    watch_queue: int = 1_000
    peers: tuple[str, ...] = ()
    heartbeat_ms: int = 500
    advertise: str | None = None
    suspect_after: int = 3
    dead_after: int = 10
    replica_timeout_ms: int = 3000
    cluster: str = "ledger"
    busy_poll_us: int = DEFAULT_BUSY_POLL_US
    busy_poll_budget: int = DEFAULT_BUSY_POLL_BUDGET  # percent of one core, over any second
    max_loads: int = 4
    context_cache: int = 100_000
    max_staged_bytes: int = 256 << 20
    max_watch_topics: int = 10_000
    max_watchers_per_context: int = 1_000
    max_client_queue: int = DEFAULT_MAX_CLIENT_QUEUE
    max_clients: int | None = None  # None: from the open-files limit (node/clients.py)
    max_peers: int = DEFAULT_MAX_PEERS
    accept_damage: bool = False
    insecure: bool = False  # serve beyond loopback without authentication (--insecure)
    peer_keys: str | None = None  # --peer-keys FILE: NODE_ID PUBLIC_KEY lines (node/access.py)
    client_keys: str | None = None  # --client-keys FILE: PUBLIC_KEY ROLE [PREFIX,...] lines
    seed_ids: tuple[tuple[str, str], ...] = ()  # (address, node id) of the --peers given as ID@HOST:PORT
    log_format: str = "text"  # --log-format: text, or json (one object per line, node/reqlog.py)
    slow_ms: int | None = None  # --slow-ms: log requests that take the loop this long or more
    metrics: tuple[str, int] | None = None  # --metrics HOST:PORT: Prometheus, /healthz, /readyz (node/metrics.py)
    ready_lag: int = 10_000  # --ready-lag: entries a live peer may hold beyond ours while /readyz says ready
    config_file: str | None = None  # --config: the TOML file the settings were read from, if any

    @property
    def secure(self) -> bool:
        """Keys are configured: every socket uses CURVE and only allowlisted keys connect."""
        return self.peer_keys is not None or self.client_keys is not None

    @property
    def sync(self) -> bool:
        return self.durability == "sync"

    @property
    def max_request(self) -> int:
        """Largest request frame accepted: a payload at the limit plus room for the rest."""
        return max(self.max_payload + (1 << 20), MIN_MAX_REQUEST)


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE | re.ASCII)
_MULT = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _int_flag(raw: str, flag: str, lo: int, hi: int, note: str = "") -> str:
    """`raw` when it is an integer (ASCII digits) in lo..hi, else a one-line ConfigError."""
    if not _digits(raw) or not lo <= int(raw) <= hi:
        raise ConfigError(f"{flag} must be an integer from {lo}{note} to {hi}, got {raw!r}")
    return raw


def _digits(text: str) -> bool:
    """Only ASCII digits ('²'.isdigit() is True, and int() refuses it)."""
    return text.isascii() and text.isdigit()


def parse_size(text: str) -> int:
    """'4194304', '4MiB', '4M', '512k' -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use bytes, or a number with K, M or G)")
    unit = (m.group(2) or "").lower()[:1]
    return int(m.group(1)) * _MULT[unit]


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what} must be HOST:PORT, got {text!r}")
    if not _digits(port) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: port must be 0..65535, got {port!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether `host` (as given to --listen or --advertise, IPv6 without brackets) is a loopback
    address: 127.0.0.0/8, ::1 (also IPv4-mapped), or the name localhost. Any other name is not:
    what it resolves to is not this node's to know."""
    h = host.strip("[]").lower()
    if h == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ledger-node",
        description="Run a Converge Ledger node. Every flag can also be set by its LEDGER_* "
        "environment variable (shown in brackets); flags win.",
    )
    p.add_argument("--config", metavar="FILE", help="a TOML file of settings: `flag-name = value` for any flag "
                   "below (e.g. `listen = \"127.0.0.1:7400\"`, `peers = [\"h1:7400\", \"h2:7400\"]`, "
                   "`insecure = true`); flags and LEDGER_* variables win over it [LEDGER_CONFIG]")
    p.add_argument("--id", help="node id, kept in the data folder; generated on first start [LEDGER_ID]")
    p.add_argument("--data", help="data folder (LevelDB), or :memory: for a throw-away node "
                   "[LEDGER_DATA] (default ./ledger-data)")
    p.add_argument("--listen", help="HOST:PORT of the request (ROUTER) socket; port 0 picks a free "
                   "one [LEDGER_LISTEN] (default 127.0.0.1:7400)")
    p.add_argument("--pub-port", help="port of the watch (PUB) socket [LEDGER_PUB_PORT] "
                   "(default: listen port + 1, or a free port when listening on port 0)")
    p.add_argument("--durability", choices=("async", "sync"),
                   help="async: acknowledged in RAM, on disk within --flush-ms; sync: fsynced "
                   "before the reply, appends in flight share one fsync [LEDGER_DURABILITY] (default async)")
    p.add_argument("--flush-ms", help="async mode: longest time an acknowledged append stays "
                   "only in RAM [LEDGER_FLUSH_MS] (default 10)")
    p.add_argument("--max-payload", help="largest payload in bytes (4MiB, 512K, ... accepted) "
                   "[LEDGER_MAX_PAYLOAD] (default 4MiB)")
    p.add_argument("--hot-bytes", help="RAM for recent entries of all contexts together "
                   "[LEDGER_HOT_BYTES] (default 64MiB)")
    p.add_argument("--context-cache", help="contexts kept in RAM (the others are read from disk on first "
                   "use, ~2 KB each) [LEDGER_CONTEXT_CACHE] (default 100000)")
    p.add_argument("--write-buffer", help="RAM for appends acknowledged but not yet on disk; when full, "
                   "the node stops reading requests until storage catches up [LEDGER_WRITE_BUFFER] (default 16MiB)")
    p.add_argument("--watch-heartbeat-ms", help="a watched context that published nothing for this long "
                   "gets a head message, so watchers tell a quiet context from a dead node "
                   "[LEDGER_WATCH_HEARTBEAT_MS] (default 1000)")
    p.add_argument("--watch-queue", help="messages queued per watcher before that watcher's messages are "
                   "dropped (it refills them by seq when it reads again); bounds the node's RAM per slow "
                   "watcher [LEDGER_WATCH_QUEUE] (default 1000; a message holds at most 64 KiB)")
    p.add_argument("--max-watch-topics", help="distinct context topics the node tracks watchers for; a "
                   "subscription to another topic past it is refused (counted in status, answered with one "
                   "`head` marked `limited`, nothing else published on it: the watcher polls) "
                   "[LEDGER_MAX_WATCH_TOPICS] (default 10000)")
    p.add_argument("--max-watchers-per-context", help="subscriptions the node holds per context topic (and "
                   "prefix subscriptions, node-wide); one more is refused like a topic past --max-watch-topics "
                   "(counted in status, answered with one `head` marked `limited`: that watcher polls) "
                   "[LEDGER_MAX_WATCHERS_PER_CONTEXT] (default 1000)")
    p.add_argument("--max-loads", help="snapshot loads in progress at once; a new one past it is answered "
                   "UNAVAILABLE [LEDGER_MAX_LOADS] (default 4)")
    p.add_argument("--max-staged-bytes", help="bytes all loads in progress may stage on disk together "
                   "(256MiB, 1G, ... accepted); a chunk past it is refused [LEDGER_MAX_STAGED_BYTES] "
                   "(default 256MiB)")
    p.add_argument("--peers", metavar="HOST:PORT[,HOST:PORT...]", help="request addresses of other nodes to "
                   "join; one is enough, the rest is learned by gossip. HOST: an IPv4 address, an IPv6 address in "
                   "brackets or a DNS name; PORT: 1..65535 [LEDGER_PEERS] (default: none)")
    p.add_argument("--cluster", help="name of the mesh this node belongs to; nodes refuse heartbeats from "
                   "other clusters, so a node never joins a mesh by accident [LEDGER_CLUSTER] (default ledger)")
    p.add_argument("--max-peers", help="most other nodes this node keeps in its peer table (each is one socket); "
                   "new peers past it, from heartbeats or gossip, are refused and counted in status "
                   f"[LEDGER_MAX_PEERS] (default {DEFAULT_MAX_PEERS}, at most {MAX_MAX_PEERS})")
    p.add_argument("--heartbeat-ms", help="interval of the gossip heartbeat between nodes "
                   "[LEDGER_HEARTBEAT_MS] (default 500)")
    p.add_argument("--advertise", metavar="HOST:PORT", help="the request address other nodes should use, "
                   "when it differs from --listen (e.g. listening on 0.0.0.0) [LEDGER_ADVERTISE]")
    p.add_argument("--suspect-after", help="heartbeats of silence before a peer is suspect "
                   "[LEDGER_SUSPECT_AFTER] (default 3)")
    p.add_argument("--dead-after", help="heartbeats of silence before a peer is dead [LEDGER_DEAD_AFTER] (default 10)")
    p.add_argument("--replica-timeout-ms", help="how long an append with replicas=N waits for N other nodes "
                   "before it is answered with an error saying how many hold it [LEDGER_REPLICA_TIMEOUT_MS] "
                   "(default 3000)")
    p.add_argument("--busy-poll-us", help="after answering requests, keep polling without sleeping for this "
                   "long, so a client's next request is not slowed by waking the node; it stops by itself "
                   "when requests come further apart, and spends at most --busy-poll-budget. 0 is off; "
                   f"{SUGGESTED_WINDOW_US} suits one-at-a-time clients when the node can spare the CPU "
                   f"[LEDGER_BUSY_POLL_US] (default {DEFAULT_BUSY_POLL_US})")
    p.add_argument("--busy-poll-budget", metavar="PCT", help="the most busy-polling may spend, in percent of "
                   "one core over any second; past it the node sleeps in poll until the budget refills. 100 "
                   "is no budget, 0 turns busy-polling off [LEDGER_BUSY_POLL_BUDGET] "
                   f"(default {DEFAULT_BUSY_POLL_BUDGET})")
    p.add_argument("--max-client-queue", help="reply bytes the node holds for one client that has not read "
                   "them; a client past it is cut off (its requests go unanswered, counted in status, until "
                   "it has read what was queued) [LEDGER_MAX_CLIENT_QUEUE] (default 64MiB)")
    p.add_argument("--max-clients", help="connections to the request and watch sockets together; past it "
                   "new connections are closed at once (peers count too) [LEDGER_MAX_CLIENTS] "
                   "(default 4096, or less when the open-files limit leaves less room)")
    p.add_argument("--accept-damage", action="store_true",
                   help="for a context this node writes that came back from disk shorter than it was (its "
                   "high-water mark) and that no peer can refill: go on from what the disk holds and take "
                   "appends again at once, asking no peer: the lost entries are gone from this node (a live "
                   "replica that holds them sets them aside as a fork). Without it such a context refuses appends while it is refilled from peers "
                   "(a flag, not a variable: meant for one start)")
    p.add_argument("--peer-keys", metavar="FILE|DIR", help="turns authentication on: the nodes of the mesh (a folder: its files together), "
                   "one 'NODE_ID PUBLIC_KEY' line each; every socket then uses CURVE, a node id is accepted only "
                   "from the key it is bound to, and --peers entries are NODE_ID@HOST:PORT. Re-read on SIGHUP "
                   "[LEDGER_PEER_KEYS]")
    p.add_argument("--client-keys", metavar="FILE|DIR", help="turns authentication on: the clients allowed (a folder: its files together), one "
                   "'PUBLIC_KEY ROLE [PREFIX,...]' line each, ROLE read, write or admin, PREFIXes limiting the "
                   "contexts it may touch. Re-read on SIGHUP [LEDGER_CLIENT_KEYS]")
    p.add_argument("--insecure", action="store_true",
                   help="serve on a non-loopback --listen or --advertise address without authentication: anyone "
                   "who can reach the ports can read, append and join the mesh as a peer. Without it a node "
                   "serves only on loopback (127.0.0.0/8, ::1, localhost). Use it only on a network you trust; "
                   "logged at start and shown in status [LEDGER_INSECURE=1]")
    p.add_argument("--log-level", help="debug, info, warning or error; debug logs every request (logger "
                   "node.requests) [LEDGER_LOG_LEVEL] (default info)")
    p.add_argument("--log-format", help="text, or json: one object per line with the keys ts, level, logger, msg "
                   "(and op, id, context, outcome, us, bytes on request lines) [LEDGER_LOG_FORMAT] (default text)")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics (/metrics), /healthz and "
                   "/readyz over HTTP there (port 0: any free port, printed at start); no authentication: "
                   "keep it on loopback or a monitoring network [LEDGER_METRICS] (default off)")
    p.add_argument("--ready-lag", metavar="N", help="/readyz says not ready while a live peer holds more than N "
                   "entries this node does not [LEDGER_READY_LAG] (default 10000)")
    p.add_argument("--slow-ms", metavar="N", help="log a warning (logger node.slow) for every request that takes the "
                   "request loop N ms or more (0: every request) [LEDGER_SLOW_MS] (default off)")
    p.add_argument("--check", metavar="DATA", help="read a stopped node's data folder whole (every entry's hash, "
                   "every root, the high-water marks), report damage and exit (0 clean, 1 damaged, 2 unreadable); "
                   "it must be the first argument")
    p.add_argument("--version", action="version", version=f"ledger-node {__version__}")
    return p


# settings a config file may not hold: one-off actions and what names the file itself
_NOT_IN_FILE = {"CONFIG": "it names the file", "CHECK": "an action, not a setting",
                "ACCEPT_DAMAGE": "a flag for one start (--accept-damage)", "VERSION": "an action, not a setting"}


def settings_names(parser: argparse.ArgumentParser) -> set[str]:
    """The LEDGER_* names of the parser's options (each flag's help names its variable)."""
    return set(re.findall(r"\[LEDGER_([A-Z_]+)", parser.format_help())) | {"INSECURE"}


def read_config_file(path: str, known: set[str]) -> dict[str, str]:
    """A TOML config file as {NAME: the value as a flag would give it}; ConfigError on anything
    that is not a known setting with a string, integer, boolean or (for lists) array value."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: not valid TOML: {exc}") from None
    out: dict[str, str] = {}
    for key, value in raw.items():
        name = key.upper().replace("-", "_")
        if name in _NOT_IN_FILE:
            raise ConfigError(f"--config {path}: {key!r} cannot be set in a config file ({_NOT_IN_FILE[name]})")
        if name not in known:
            raise ConfigError(f"--config {path}: unknown setting {key!r}; settings are the flags' names without "
                              "the leading dashes (ledger-node --help)")
        if isinstance(value, bool):
            out[name] = "1" if value else "0"
        elif isinstance(value, (int, str)):
            out[name] = str(value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[name] = ",".join(value)
        else:
            raise ConfigError(f"--config {path}: {key!r} must be a string, an integer, true/false or a list of "
                              f"strings, got {type(value).__name__}")
    return out


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    env = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    config_file = args.config or env.get("LEDGER_CONFIG") or None
    from_file = read_config_file(config_file, settings_names(parser)) if config_file else {}

    def pick(flag: str | None, name: str, default: str) -> str:
        if flag is not None:
            return flag
        value = env.get("LEDGER_" + name)
        return value if value is not None else from_file.get(name, default)

    node_id = pick(args.id, "ID", "") or None
    if node_id is not None and not ID_RE.match(node_id):
        raise ConfigError(
            f"--id must be 1..64 characters of letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit; got {node_id!r}"
        )
    data = pick(args.data, "DATA", "./ledger-data")
    host, port = parse_hostport(pick(args.listen, "LISTEN", f"127.0.0.1:{DEFAULT_PORT}"), "--listen")
    pub_raw = pick(args.pub_port, "PUB_PORT", "")
    pub_port: int | None
    if pub_raw:
        if not _digits(pub_raw) or not 0 <= int(pub_raw) <= 65535:
            raise ConfigError(f"--pub-port must be 0..65535, got {pub_raw!r}")
        pub_port = int(pub_raw)
    else:
        pub_port = None if port == 0 else port + 1
        if pub_port is not None and pub_port > 65535:
            raise ConfigError(f"--listen port {port} leaves no room for the PUB socket; set --pub-port")
    if pub_port is not None and pub_port != 0 and pub_port == port:
        raise ConfigError("--pub-port must differ from the --listen port")
    durability = pick(args.durability, "DURABILITY", "async")
    if durability not in ("async", "sync"):
        raise ConfigError(f"--durability must be async or sync, got {durability!r}")
    flush_raw = _int_flag(pick(args.flush_ms, "FLUSH_MS", "10"), "--flush-ms", 1, 60_000)
    def size(flag: str | None, name: str, default: int) -> int:
        try:
            return parse_size(pick(flag, name, str(default)))
        except ValueError as exc:  # which setting: --max-payload, LEDGER_MAX_PAYLOAD or the file's
            raise ConfigError(f"--{name.lower().replace('_', '-')}: {exc}") from None

    max_payload = size(args.max_payload, "MAX_PAYLOAD", DEFAULT_MAX_PAYLOAD)
    hot_bytes = size(args.hot_bytes, "HOT_BYTES", DEFAULT_HOT_BYTES)
    write_buffer = size(args.write_buffer, "WRITE_BUFFER", 16 << 20)
    max_staged = size(args.max_staged_bytes, "MAX_STAGED_BYTES", 256 << 20)
    if not 1 <= max_payload <= 1 << 30:
        raise ConfigError(f"--max-payload must be from 1 byte to 1GiB, got {max_payload}")
    hb_raw = _int_flag(pick(args.watch_heartbeat_ms, "WATCH_HEARTBEAT_MS", "1000"), "--watch-heartbeat-ms", 10, 60_000)
    wq_raw = _int_flag(pick(args.watch_queue, "WATCH_QUEUE", "1000"), "--watch-queue", 1, 1_000_000)
    if not 1 <= max_staged <= 1 << 40:
        raise ConfigError(f"--max-staged-bytes must be from 1 byte to 1TiB, got {max_staged}")
    ml_raw = _int_flag(pick(args.max_loads, "MAX_LOADS", "4"), "--max-loads", 1, 1000)
    cc_raw = _int_flag(pick(args.context_cache, "CONTEXT_CACHE", "100000"), "--context-cache", 1, 1 << 32)
    mt_raw = _int_flag(pick(args.max_watch_topics, "MAX_WATCH_TOPICS", "10000"), "--max-watch-topics", 1, 10_000_000)
    mw_raw = _int_flag(pick(args.max_watchers_per_context, "MAX_WATCHERS_PER_CONTEXT", "1000"),
                       "--max-watchers-per-context", 1, 1_000_000)
    peer_keys = pick(args.peer_keys, "PEER_KEYS", "") or None
    client_keys = pick(args.client_keys, "CLIENT_KEYS", "") or None
    secure = peer_keys is not None or client_keys is not None
    peers_raw = pick(args.peers, "PEERS", "")
    peers: list[str] = []
    seed_ids: dict[str, str] = {}
    for item in (x.strip() for x in peers_raw.split(",")):
        if item:
            seed_id, at, item = item.rpartition("@")
            if at and not ID_RE.match(seed_id):
                raise ConfigError(f"--peers: {seed_id!r} before '@' is not a node id")
            if secure and not at:
                raise ConfigError(f"--peers {item!r}: with keys, each entry names its node, NODE_ID@HOST:PORT "
                                  "(its key is looked up in --peer-keys)")
            try:
                addr = parse_address(item, "--peers:")
            except RemoteProtocolError as exc:
                raise ConfigError(exc.message) from None
            if addr not in peers:
                peers.append(addr)
            if at:
                seed_ids[addr] = seed_id
    mp_raw = _int_flag(pick(args.max_peers, "MAX_PEERS", str(DEFAULT_MAX_PEERS)), "--max-peers", 1, MAX_MAX_PEERS)
    if len(peers) > int(mp_raw):
        raise ConfigError(f"--peers lists {len(peers)} nodes, more than --max-peers ({mp_raw})")
    cluster = pick(args.cluster, "CLUSTER", "ledger")
    if not ID_RE.match(cluster):
        raise ConfigError(f"--cluster must be 1..64 letters, digits, '.', '_' or '-', got {cluster!r}")
    hbm_raw = _int_flag(pick(args.heartbeat_ms, "HEARTBEAT_MS", "500"), "--heartbeat-ms", 10, 60_000)
    advertise = pick(args.advertise, "ADVERTISE", "") or None
    if advertise is not None:
        try:
            ah, ap = split_address(advertise, "--advertise")
        except RemoteProtocolError as exc:
            raise ConfigError(exc.message) from None
        if ah in ("0.0.0.0", "::"):
            raise ConfigError(f"--advertise must be an address others can reach, got {advertise!r}")
        advertise = parse_address(advertise)
    sa_raw = pick(args.suspect_after, "SUSPECT_AFTER", "3")
    da_raw = pick(args.dead_after, "DEAD_AFTER", "10")
    if not _digits(sa_raw) or not _digits(da_raw) or not 1 <= int(sa_raw) < int(da_raw) <= 1000:
        raise ConfigError(f"--suspect-after and --dead-after must be integers with 1 <= suspect-after < "
                          f"dead-after <= 1000, got {sa_raw!r} and {da_raw!r}")
    rt_raw = _int_flag(pick(args.replica_timeout_ms, "REPLICA_TIMEOUT_MS", "3000"), "--replica-timeout-ms", 1, 600_000)
    bp_raw = _int_flag(pick(args.busy_poll_us, "BUSY_POLL_US", str(DEFAULT_BUSY_POLL_US)), "--busy-poll-us", 0, 10_000, ' (off)')
    bb_raw = _int_flag(pick(args.busy_poll_budget, "BUSY_POLL_BUDGET", str(DEFAULT_BUSY_POLL_BUDGET)),
                       "--busy-poll-budget", 0, 100, " (off)")
    max_client_queue = size(args.max_client_queue, "MAX_CLIENT_QUEUE", DEFAULT_MAX_CLIENT_QUEUE)
    if not 64 << 10 <= max_client_queue <= 1 << 40:
        raise ConfigError(f"--max-client-queue must be from 64KiB to 1TiB, got {max_client_queue}")
    mc_raw = pick(args.max_clients, "MAX_CLIENTS", "")
    max_clients: int | None = None
    if mc_raw:
        if not _digits(mc_raw) or not 1 <= int(mc_raw) <= 1_000_000:
            raise ConfigError(f"--max-clients must be an integer from 1 to 1000000, got {mc_raw!r}")
        max_clients = int(mc_raw)
    insecure_raw = "1" if args.insecure else env.get("LEDGER_INSECURE", from_file.get("INSECURE", ""))
    if insecure_raw not in ("", "0", "1"):
        raise ConfigError(f"LEDGER_INSECURE must be 1 or 0, got {insecure_raw!r}")
    insecure = insecure_raw == "1"
    if insecure and secure:
        raise ConfigError("--insecure and keys (--peer-keys, --client-keys) exclude each other: with keys the node "
                          "authenticates everyone; drop --insecure")
    if not insecure and not secure:
        for flag, h in (("--listen", host), ("--advertise", advertise.rpartition(":")[0] if advertise else None)):
            if h is not None and not is_loopback(h):
                raise ConfigError(
                    f"{flag} {h!r} is not a loopback address. Without authentication a node serves only on "
                    "loopback: anyone who can reach its ports could read, append and join the mesh as a peer. "
                    "Configure keys (--peer-keys, --client-keys; README, \"Security\"), or, on a network you "
                    "trust, add --insecure")
    level = pick(args.log_level, "LOG_LEVEL", "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"--log-level must be debug, info, warning or error, got {level!r}")
    log_format = pick(args.log_format, "LOG_FORMAT", "text").lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"--log-format must be text or json, got {log_format!r}")
    slow_raw = pick(args.slow_ms, "SLOW_MS", "")
    slow_ms = int(_int_flag(slow_raw, "--slow-ms", 0, 3_600_000)) if slow_raw else None
    metrics_raw = pick(args.metrics, "METRICS", "")
    metrics = parse_hostport(metrics_raw, "--metrics") if metrics_raw else None
    ready_lag = int(_int_flag(pick(args.ready_lag, "READY_LAG", "10000"), "--ready-lag", 0, 1 << 62))
    return Config(
        node_id=node_id, data=data, host=host, port=port, pub_port=pub_port,
        durability=durability, flush_ms=int(flush_raw), max_payload=max_payload,
        hot_bytes=hot_bytes, log_level=level, write_buffer=max(write_buffer, 1),
        watch_heartbeat_ms=int(hb_raw), watch_queue=int(wq_raw), peers=tuple(peers),
        heartbeat_ms=int(hbm_raw), advertise=advertise, suspect_after=int(sa_raw), dead_after=int(da_raw),
        replica_timeout_ms=int(rt_raw), cluster=cluster, busy_poll_us=int(bp_raw),
        busy_poll_budget=int(bb_raw),
        max_loads=int(ml_raw), context_cache=int(cc_raw), max_staged_bytes=max_staged, max_watch_topics=int(mt_raw),
        max_watchers_per_context=int(mw_raw),
        max_client_queue=max_client_queue, max_clients=max_clients, max_peers=int(mp_raw),
        accept_damage=bool(args.accept_damage), insecure=insecure,
        peer_keys=peer_keys, client_keys=client_keys, seed_ids=tuple(seed_ids.items()),
        log_format=log_format, slow_ms=slow_ms, metrics=metrics, ready_lag=ready_lag, config_file=config_file,
    )
