"""The node's options, one row each: the single place a flag's name, variable, rule, default and
help are written.

`OPTIONS` is read by node/config.py (the argparse parser of `ledger-node` and its `--help`, the
LEDGER_* variables, the names a `--config` file may hold, and the defaults of `Config`), by the
core's `status` reply (`config`: the effective value of every row marked `status`), and by
`python -m node.options --markdown`, which prints the README's configuration table (a test keeps
the README's copy in sync: `python -m node.options --write-readme` rewrites it).

A row's `default` is the value `Config` holds when nothing sets the option, in the type `parse`
returns; `parse(text, flag)` turns what a flag, a variable or the file gave into that value, or
raises ConfigError with one line for a person. Rules that tie several options together (the
watch port next to the request port, keys and `--peers`, loopback without keys) are
node/config.py's, after every row is read.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.busypoll import DEFAULT_BUDGET_PCT, DEFAULT_WINDOW_US, SUGGESTED_WINDOW_US
from node.clients import DEFAULT_MAX_CLIENTS, RESERVED_FDS
from node.contexts import DEFAULT_CAPACITY as DEFAULT_CONTEXT_CACHE
from node.ledger import DEFAULT_MAX_STAGED_BYTES
from node.mesh import DEFAULT_MAX_PEERS, MAX_MAX_PEERS
from node.metrics import DEFAULT_READY_LAG
from node.publisher import DEFAULT_MAX_TOPICS, DEFAULT_MAX_WATCHERS
from protocol.address import parse_address, split_address
from protocol.errors import RemoteProtocolError

ENV_PREFIX = "LEDGER_"
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# the kinds of row: a setting with a value, a setting without one (a switch: given or not), and a
# one-off action (not a setting: no variable, not in a file, not in status)
VALUE, SWITCH, ACTION, VERSION = "value", "switch", "action", "version"


class ConfigError(Exception):
    pass


Parse = Callable[[str, str], Any]


@dataclass(frozen=True)
class Option:
    flag: str  # "--flush-ms"; its setting name (in a config file, in status.config) drops the dashes
    help: str  # what it does: --help and the README
    default: Any = None  # the value when nothing sets it, as `parse` returns it (None: unset)
    parse: Parse | None = None  # (text, flag) -> value, ConfigError when the text is not one
    metavar: str | None = None
    group: str = ""
    kind: str = VALUE
    field: str | None = None  # the Config attribute, when not the setting name with underscores
    shown: str | None = None  # how the default reads when it is not a plain value ("listen port + 1")
    show: Callable[[Any], str] = str  # how a value reads (sizes: 4MiB)
    env: bool = True  # has a LEDGER_* variable
    not_in_file: str | None = None  # why a config file may not hold it (None: it may)
    status: bool = True  # reported in status.config (False: what names the key lists)
    read: Callable[[Any], Any] | None = None  # its value in a Config, when not one attribute
    shown_in_status: Callable[[Any], Any] | None = None  # a value as status gives it (default: tuples as lists)
    more: str = ""  # README only: what is too long for --help
    choices: tuple[str, ...] = ()  # argparse's choices (its own message for another word)

    @property
    def name(self) -> str:
        return self.flag[2:]

    @property
    def key(self) -> str:
        """The name in upper case with underscores: what a config file's name is compared as."""
        return self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        """The argparse attribute."""
        return self.name.replace("-", "_")

    @property
    def attr(self) -> str:
        return self.field or self.dest

    @property
    def env_var(self) -> str | None:
        return ENV_PREFIX + self.key if self.env and self.kind in (VALUE, SWITCH) else None

    @property
    def is_setting(self) -> bool:
        return self.kind in (VALUE, SWITCH)

    @property
    def default_text(self) -> str:
        """The default as --help and the README say it ('' for an action)."""
        if self.shown is not None:
            return self.shown
        if self.kind != VALUE:
            return "off" if self.kind == SWITCH else ""
        return "none" if self.default in (None, ()) else self.show(self.default)

    def value(self, cfg: Any) -> Any:
        """This option's value in a Config, in the type `parse` returns."""
        return self.read(cfg) if self.read is not None else getattr(cfg, self.attr)

    def report(self, cfg: Any) -> Any:
        """This option's value in a Config as status shows it: strings, integers, lists, nil."""
        v = self.value(cfg)
        if v is not None and self.shown_in_status is not None:
            return self.shown_in_status(v)
        return list(v) if isinstance(v, tuple) else v


# -- rules a value follows ---------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE | re.ASCII)
_MULT = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def digits(text: str) -> bool:
    """Only ASCII digits ('²'.isdigit() is True, and int() refuses it)."""
    return text.isascii() and text.isdigit()


def int_flag(raw: str, flag: str, lo: int, hi: int, note: str = "") -> str:
    """`raw` when it is an integer (ASCII digits) in lo..hi, else a one-line ConfigError."""
    if not digits(raw) or not lo <= int(raw) <= hi:
        raise ConfigError(f"{flag} must be an integer from {lo}{note} to {hi}, got {raw!r}")
    return raw


def parse_size(text: str) -> int:
    """'4194304', '4MiB', '4M', '512k' -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use bytes, or a number with K, M or G)")
    unit = (m.group(2) or "").lower()[:1]
    return int(m.group(1)) * _MULT[unit]


def format_size(n: int) -> str:
    """Bytes as the README and --help write them: 4MiB, 512KiB, 1000."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what} must be HOST:PORT, got {text!r}")
    if not digits(port) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: port must be 0..65535, got {port!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def join_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def integer(lo: int, hi: int, note: str = "") -> Parse:
    return lambda text, flag: int(int_flag(text, flag, lo, hi, note))


def optional(parse: Parse) -> Parse:
    """An empty text is 'not set' (None), as an unset variable."""
    return lambda text, flag: parse(text, flag) if text else None


def size(lo: int = 0, hi: int | None = None, range_text: str = "") -> Parse:
    def parse(text: str, flag: str) -> int:
        try:
            n = parse_size(text)
        except ValueError as exc:  # which setting: the flag, its variable or the file's
            raise ConfigError(f"{flag}: {exc}") from None
        if hi is not None and not lo <= n <= hi:
            raise ConfigError(f"{flag} must be from {range_text}, got {n}")
        return n
    return parse


def one_of(*words: str, lower: bool = False) -> Parse:
    said = ", ".join(words[:-1]) + " or " + words[-1]

    def parse(text: str, flag: str) -> str:
        value = text.lower() if lower else text
        if value not in words:
            raise ConfigError(f"{flag} must be {said}, got {value!r}")
        return value
    return parse


def text(text: str, flag: str) -> str:
    return text


def node_id(text: str, flag: str) -> str | None:
    if text and not ID_RE.match(text):
        raise ConfigError(f"{flag} must be 1..64 characters of letters, digits, '.', '_' or '-', "
                          f"starting with a letter or digit; got {text!r}")
    return text or None


def cluster(text: str, flag: str) -> str:
    if not ID_RE.match(text):
        raise ConfigError(f"{flag} must be 1..64 letters, digits, '.', '_' or '-', got {text!r}")
    return text


def hostport(text: str, flag: str) -> tuple[str, int]:
    return parse_hostport(text, flag)


def port(text: str, flag: str) -> int | None:
    if not text:
        return None
    if not digits(text) or not 0 <= int(text) <= 65535:
        raise ConfigError(f"{flag} must be 0..65535, got {text!r}")
    return int(text)


def peers(text: str, flag: str) -> tuple[tuple[str, str | None], ...]:
    """'[ID@]HOST:PORT,...' -> ((address, node id or None), ...), addresses normalized, the first
    of each kept (a later entry's id wins). Whether ids are needed is node/config.py's (keys)."""
    out: dict[str, str | None] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        seed_id, at, item = item.rpartition("@")
        if at and not ID_RE.match(seed_id):
            raise ConfigError(f"{flag}: {seed_id!r} before '@' is not a node id")
        try:
            addr = parse_address(item, f"{flag}:")
        except RemoteProtocolError as exc:
            raise ConfigError(exc.message) from None
        if at or addr not in out:
            out[addr] = seed_id if at else out.get(addr)
    return tuple(out.items())


def advertise(text: str, flag: str) -> str | None:
    if not text:
        return None
    try:
        host, _ = split_address(text, flag)
    except RemoteProtocolError as exc:
        raise ConfigError(exc.message) from None
    if host in ("0.0.0.0", "::"):
        raise ConfigError(f"{flag} must be an address others can reach, got {text!r}")
    return parse_address(text)


def switch(text: str, flag: str) -> bool:
    """A switch's variable or file value: 1 or 0 (empty: 0)."""
    if text not in ("", "0", "1"):
        raise ConfigError(f"{ENV_PREFIX}{flag[2:].upper().replace('-', '_')} must be 1 or 0, got {text!r}")
    return text == "1"


def _listen_of(cfg: Any) -> tuple[str, int]:
    return (cfg.host, cfg.port)


def _peers_of(cfg: Any) -> tuple[tuple[str, str | None], ...]:
    ids = dict(cfg.seed_ids)
    return tuple((addr, ids.get(addr)) for addr in cfg.peers)


def _hostport_text(v: tuple[str, int]) -> str:
    return join_hostport(*v)


def _peers_text(v: tuple[tuple[str, str | None], ...]) -> list[str]:
    return [f"{i}@{a}" if i else a for a, i in v]


def write_buffer(text: str, flag: str) -> int:
    return max(int(size()(text, flag)), 1)


# -- the table -------------------------------------------------------------------------------

NODE, STORAGE, WATCH, MESH, SECURITY, LIMITS, LATENCY, LOGS, ONE_OFF = (
    "node", "durability and memory", "watchers", "mesh", "security", "limits", "busy-polling",
    "logs and metrics", "one-off actions")

OPTIONS: tuple[Option, ...] = (
    Option("--config", "a TOML file of settings, `flag-name = value` for any setting here (`listen = "
           "\"127.0.0.1:7400\"`, `peers = [\"h1:7400\", \"h2:7400\"]`, `insecure = true`, `busy-poll-us = 500`), "
           "checked by the same rules as the flags, an unknown name refused; flags and LEDGER_* variables win over "
           "it. `status.config_file` names it", parse=optional(text), metavar="FILE", group=NODE, field="config_file",
           not_in_file="it names the file"),
    Option("--id", "node id, kept in the data folder, which refuses a different one; generated on first start",
           parse=node_id, metavar="NAME", group=NODE, field="node_id", shown="generated"),
    Option("--data", "data folder (LevelDB), or `:memory:` for a throw-away node", "./ledger-data", text,
           metavar="DIR", group=NODE),
    Option("--listen", "HOST:PORT of the request (ROUTER) socket; port 0 picks a free one", ("127.0.0.1", 7400),
           hostport, metavar="HOST:PORT", group=NODE, show=_hostport_text, read=_listen_of,
           shown_in_status=_hostport_text),
    Option("--pub-port", "port of the watch (PUB) socket", parse=port, metavar="PORT", group=NODE,
           shown="listen port + 1, or a free port when listening on port 0"),
    Option("--durability", "async: acknowledged in RAM, on disk within --flush-ms; sync: fsynced before the reply, "
           "appends in flight share one fsync (see \"Durability\")", "async", one_of("async", "sync"),
           metavar="async|sync", group=STORAGE, choices=("async", "sync")),
    Option("--flush-ms", "async mode: longest time an acknowledged append stays only in RAM", 10,
           integer(1, 60_000), metavar="N", group=STORAGE),
    Option("--max-payload", "largest payload in bytes (`512K`, `4MiB`, ... accepted)", 4 << 20,
           size(1, 1 << 30, "1 byte to 1GiB"), metavar="BYTES", group=STORAGE, show=format_size),
    Option("--hot-bytes", "RAM for recent entries of all contexts together", 64 << 20, size(), metavar="BYTES",
           group=STORAGE, show=format_size),
    Option("--context-cache", "contexts kept in RAM, ~2 KB each; the others are read from disk when first used, "
           "and only idle ones leave RAM", DEFAULT_CONTEXT_CACHE, integer(1, 1 << 32), metavar="N", group=STORAGE,
           more="(see \"Memory\")"),
    Option("--write-buffer", "RAM for appends acknowledged but not yet on disk; when full, requests that write are "
           "held until storage catches up, and reads still answered, until as many bytes of requests are held; then "
           "no request is read (back-pressure, never unbounded memory)", 16 << 20, write_buffer,
           metavar="BYTES", group=STORAGE, show=format_size),
    Option("--watch-heartbeat-ms", "a watched context that published nothing for this long gets a `head` message, "
           "so watchers tell a quiet context from a dead node", 1000, integer(10, 60_000), metavar="N", group=WATCH),
    Option("--watch-queue", "messages (of at most 64 KiB) queued per watcher; past it that watcher's messages are "
           "dropped (it refills them by seq when it reads again), so a stalled watcher never slows appends",
           1000, integer(1, 1_000_000), metavar="N", group=WATCH,
           more="and pins at most about N x 64 KiB of the node's RAM (shared by all watchers of the same messages)"),
    Option("--max-watch-topics", "distinct contexts the node tracks watchers for; a subscription to one more is "
           "refused (counted in status): its watcher gets one `head` marked `limited` and then polls",
           DEFAULT_MAX_TOPICS, integer(1, 10_000_000), metavar="N", group=WATCH, more="(see Limits)"),
    Option("--max-watchers-per-context", "subscriptions the node holds per context (prefix subscriptions: as many "
           "node-wide); one more is refused like a topic past --max-watch-topics: that watcher alone gets one "
           "`head` marked `limited` and then polls", DEFAULT_MAX_WATCHERS, integer(1, 1_000_000), metavar="N",
           group=WATCH, more="(see Limits). Peers' replication subscriptions are never refused"),
    Option("--peers", "request addresses of other nodes to join; one is enough, the rest is learned by gossip. "
           "HOST: an IPv4 address, an IPv6 address in brackets (`[::1]:7400`) or a DNS name; PORT: 1..65535; no "
           "`tcp://`. With keys each entry is NODE_ID@HOST:PORT", (), peers, metavar="HOST:PORT[,HOST:PORT...]",
           group=MESH, read=_peers_of, shown_in_status=_peers_text),
    Option("--cluster", "name of the mesh this node belongs to; nodes refuse heartbeats from other clusters, so a "
           "node never joins a mesh by accident", "ledger", cluster, metavar="NAME", group=MESH),
    Option("--max-peers", f"most other nodes this node keeps in its peer table (1..{MAX_MAX_PEERS}; each is one "
           "socket); new peers past it, from heartbeats or gossip, are refused, logged once and counted "
           "(`status.replication.refused_peers`)", DEFAULT_MAX_PEERS, integer(1, MAX_MAX_PEERS), metavar="N",
           group=MESH),
    Option("--advertise", "the request address other nodes should dial, when it differs from --listen (set it when "
           "listening on 0.0.0.0)", parse=advertise, metavar="HOST:PORT", group=MESH, shown="the --listen address"),
    Option("--heartbeat-ms", "interval of the gossip heartbeat between nodes", 500, integer(10, 60_000),
           metavar="N", group=MESH),
    Option("--suspect-after", "heartbeats of silence before a peer is suspect (less than --dead-after)", 3,
           integer(1, 1000), metavar="N", group=MESH),
    Option("--dead-after", "heartbeats of silence before a peer is dead", 10, integer(1, 1000), metavar="N",
           group=MESH),
    Option("--replica-timeout-ms", "how long an append with replicas=N waits for N other nodes before it is "
           "answered with an error saying how many hold it (the entry stays)", 3000, integer(1, 600_000),
           metavar="N", group=MESH),
    Option("--peer-keys", "turns authentication on: the nodes of the mesh, one `NODE_ID PUBLIC_KEY` line each (a "
           "folder: its files together); every socket then uses CURVE, a node id is accepted only from the key it "
           "is bound to, and --peers entries are NODE_ID@HOST:PORT. Re-read on SIGHUP", parse=optional(text),
           metavar="FILE|DIR", group=SECURITY, status=False, more="(see \"Security\")"),
    Option("--client-keys", "turns authentication on: the clients allowed, one `PUBLIC_KEY ROLE [PREFIX,...]` line "
           "each (a folder: its files together), ROLE read, write or admin, PREFIXes limiting the contexts it may "
           "touch. Re-read on SIGHUP", parse=optional(text), metavar="FILE|DIR", group=SECURITY, status=False),
    Option("--insecure", "serve on a non-loopback --listen or --advertise address without authentication: anyone "
           "who can reach the ports can read, append and join the mesh as a peer. Without it a node serves only on "
           "loopback (127.0.0.0/8, ::1, localhost). Use it only on a network you trust; logged at start and shown "
           "in status", False, switch, group=SECURITY, kind=SWITCH, more="(see \"Security\" below)"),
    Option("--max-loads", "snapshot loads in progress at once; one more is answered `UNAVAILABLE`", 4,
           integer(1, 1000), metavar="N", group=LIMITS),
    Option("--max-staged-bytes", "bytes all loads in progress may stage on disk together (`256MiB`, `1G`, ... "
           "accepted); a chunk past it is refused: a larger snapshot cannot be loaded (`TOO_LARGE`: raise it)",
           DEFAULT_MAX_STAGED_BYTES, size(1, 1 << 40, "1 byte to 1TiB"), metavar="BYTES", group=LIMITS,
           show=format_size),
    Option("--max-client-queue", "reply bytes the node holds for one client that has not read them; a client past "
           "it is cut off: its requests go unanswered (counted in `status.client_replies_dropped`) until it has "
           "read what was queued", 64 << 20, size(64 << 10, 1 << 40, "64KiB to 1TiB"), metavar="BYTES",
           group=LIMITS, show=format_size),
    Option("--max-clients", "connections to the request and watch sockets together (peers count too); past it new "
           "connections are closed at once", parse=optional(integer(1, 1_000_000)), metavar="N", group=LIMITS,
           shown=f"{DEFAULT_MAX_CLIENTS}, or less when the open-files limit leaves less room",
           more="The node raises its open-files limit to the hard limit at start and keeps "
           f"{RESERVED_FDS} descriptors out of this for storage and itself; a larger value is refused at start"),
    Option("--busy-poll-us", "after answering requests, keep polling without sleeping for up to N microseconds, so "
           "a client's next request is not slowed by waking the node; never past a flush or ack deadline, it stops "
           "by itself when requests come further apart, and spends at most --busy-poll-budget. 0 is off; "
           f"{SUGGESTED_WINDOW_US} suits one-at-a-time clients when the node can spare the CPU. `status.busy_poll` "
           "shows what it did", DEFAULT_WINDOW_US, integer(0, 10_000, " (off)"), metavar="N", group=LATENCY,
           show=lambda v: f"{v} (off)" if v == 0 else str(v),
           more="**Turn it on** when clients send one request at a time and wait for each reply (an agent's run of "
           "calls, a CLI script): one-at-a-time appends and gets then take ~90-110 µs instead of ~130-160 µs here, "
           "in bursts; for a steady stream of such requests the default budget keeps only a little of that "
           "(docs/benchmarks.md, \"Busy-poll budget\"). Leave it off where the node shares its cores with busier "
           "work (agent runtimes on the same machine), and for pipelining or batching clients, which it does not "
           "speed up"),
    Option("--busy-poll-budget", "the most busy-polling may spend, in percent of one core over any second; past it "
           "the node sleeps in poll until the budget refills. 100 is no budget, 0 turns busy-polling off",
           DEFAULT_BUDGET_PCT, integer(0, 100, " (off)"), metavar="PCT", group=LATENCY,
           more="The node measures it with a sliding window of 100 ms slots that remembers each spin for 1.0-1.1 s. "
           "`status.busy_poll` shows `budget_pct`, `spent_pct_last_s` and `budget_runouts`. `100` keeps the whole "
           "latency win of a steady one-at-a-time client at up to a whole core (a node with a core of its own)"),
    Option("--log-level", "debug, info, warning or error; debug also logs every request (logger `node.requests`)",
           "info", one_of("debug", "info", "warning", "error", lower=True), metavar="LEVEL", group=LOGS),
    Option("--log-format", "text, or json: one JSON object per line on stderr with the keys ts (UTC, ms), level, "
           "logger, msg, and on request lines op, id, context, outcome, us, bytes; exc holds a traceback", "text",
           one_of("text", "json", lower=True), metavar="F", group=LOGS,
           more="`outcome` is `ok`, an error code, or `waiting` for a reply that goes once on disk or "
           "replicated. The start-up banner stays text on stdout"),
    Option("--slow-ms", "log a warning (logger `node.slow`) for each request that takes the request loop N ms or "
           "more (0: every request); waits for the disk or replicas after that are not counted",
           parse=optional(integer(0, 3_600_000)), metavar="N", group=LOGS, shown="off"),
    Option("--metrics", "serve Prometheus metrics (/metrics), /healthz and /readyz over HTTP there (port 0: any "
           "free port, printed at start); no authentication: keep it on loopback or a monitoring network",
           parse=optional(hostport), metavar="HOST:PORT", group=LOGS, shown="off", shown_in_status=_hostport_text,
           more="(see \"Metrics and health\")"),
    Option("--ready-lag", "/readyz says not ready (503) while a live peer holds more than N entries this node does "
           "not", DEFAULT_READY_LAG, integer(0, 1 << 62), metavar="N", group=LOGS),
    Option("--accept-damage", "for a context this node writes that came back from disk shorter than it was (its "
           "high-water mark) and that no peer can refill: go on from what the disk holds and take appends again at "
           "once, asking no peer: the lost entries are gone from this node (a live replica that holds them sets "
           "them aside as a fork). Without it such a context refuses appends while it is refilled from peers. A "
           "flag for one start, no variable", False, switch, group=ONE_OFF, kind=SWITCH, env=False,
           not_in_file="a flag for one start (--accept-damage)"),
    Option("--check", "read a stopped node's data folder whole (every entry's hash, every root, the high-water "
           "marks), print one line per damaged context and exit: 0 clean, 1 damaged, 2 unreadable. It must be "
           "the first argument", metavar="DATA", group=ONE_OFF, kind=ACTION, not_in_file="an action, not a setting"),
    Option("--version", "print the version and exit", group=ONE_OFF, kind=VERSION,
           not_in_file="an action, not a setting"),
)

BY_FLAG = {o.flag: o for o in OPTIONS}
SETTINGS = tuple(o for o in OPTIONS if o.is_setting)


def default(flag: str) -> Any:
    """The default of one option (for Config's fields: each default is written once, above)."""
    return BY_FLAG[flag].default


def help_text(o: Option) -> str:
    """The option's --help line: its text, its variable in brackets, its default."""
    parts = [o.help]
    if o.env_var is not None:
        parts.append(f"[{o.env_var}=1]" if o.kind == SWITCH else f"[{o.env_var}]")
    if o.kind == VALUE:
        parts.append(f"(default {o.default_text})")
    return " ".join(parts)


# -- the README's table ----------------------------------------------------------------------

BEGIN = "<!-- options table: generated by `python -m node.options --write-readme`; edit node/options.py -->"
END = "<!-- end of options table -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def _cell(s: str) -> str:
    return s.replace("|", "\\|")


def markdown() -> str:
    """The configuration table of the README, one row per option."""
    rows = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for o in OPTIONS:
        flag = f"`{o.flag}{' ' + o.metavar if o.metavar else ''}`"
        env = "" if o.env_var is None else f"`{o.env_var}=1`" if o.kind == SWITCH else f"`{o.env_var}`"
        dflt = o.default_text
        if o.kind == VALUE and o.shown is None and o.default not in (None, ()):
            dflt = f"`{dflt}`"
        meaning = o.help
        if o.more:  # a sentence of its own, or words that go on from the help's last one
            meaning += (" " if o.more[0] == "(" or o.more[0].islower() else ". ") + o.more
        rows.append(f"| {_cell(flag)} | {env} | {_cell(dflt)} | {_cell(meaning)} |")
    return "\n".join(rows) + "\n"


def readme_table(readme: str) -> str | None:
    """The table between the markers of a README's text (None: no markers)."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        return None
    return readme[start + len(BEGIN):end].strip("\n") + "\n"


def with_table(readme: str) -> str:
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no options table markers ({BEGIN} ... {END})")
    return readme[:start + len(BEGIN)] + "\n" + markdown() + readme[end:]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--markdown"]:
        sys.stdout.write(markdown())
        return 0
    if args == ["--write-readme"]:
        README.write_text(with_table(README.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"wrote the options table of {README}")
        return 0
    print("usage: python -m node.options --markdown | --write-readme", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
