"""Node configuration: flags, their environment variables, a config file and defaults, validated.

The options themselves (names, rules, defaults, help) are the rows of node/options.py; this module
reads them into a `Config` and checks what ties several together. Every flag `--foo-bar` can also be set as `LEDGER_FOO_BAR`, or as `foo-bar` (or `foo_bar`) in
the TOML file given by `--config FILE` / `LEDGER_CONFIG`. Precedence: flag > environment > file
> default. Validation raises ConfigError with a message meant for a person (never `assert`,
which `python -O` strips); a file value is checked by the same rules as the flag.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from node import __version__, options
from node.options import SETTINGS, ConfigError, default, parse_hostport, parse_size

__all__ = ["Config", "ConfigError", "build_parser", "is_loopback", "parse", "parse_hostport", "parse_size",
           "read_config_file", "settings_names"]

MIN_MAX_REQUEST = 16 << 20


@dataclass(frozen=True)
class Config:
    """The settings a node runs with. Its defaults are node/options.py's (written once, there)."""

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
    write_buffer: int = default("--write-buffer")
    watch_heartbeat_ms: int = default("--watch-heartbeat-ms")
    watch_queue: int = default("--watch-queue")
    peers: tuple[str, ...] = ()
    heartbeat_ms: int = default("--heartbeat-ms")
    advertise: str | None = default("--advertise")
    suspect_after: int = default("--suspect-after")
    dead_after: int = default("--dead-after")
    replica_timeout_ms: int = default("--replica-timeout-ms")
    cluster: str = default("--cluster")
    busy_poll_us: int = default("--busy-poll-us")
    busy_poll_budget: int = default("--busy-poll-budget")  # percent of one core, over any second
    max_loads: int = default("--max-loads")
    context_cache: int = default("--context-cache")
    max_staged_bytes: int = default("--max-staged-bytes")
    max_watch_topics: int = default("--max-watch-topics")
    max_watchers_per_context: int = default("--max-watchers-per-context")
    max_client_queue: int = default("--max-client-queue")
    max_clients: int | None = default("--max-clients")  # None: from the open-files limit (node/clients.py)
    max_peers: int = default("--max-peers")
    accept_damage: bool = default("--accept-damage")
    insecure: bool = default("--insecure")  # serve beyond loopback without authentication (--insecure)
    peer_keys: str | None = default("--peer-keys")  # --peer-keys FILE: NODE_ID PUBLIC_KEY lines (node/access.py)
    client_keys: str | None = default("--client-keys")  # --client-keys FILE: PUBLIC_KEY ROLE [PREFIX,...] lines
    seed_ids: tuple[tuple[str, str], ...] = ()  # (address, node id) of the --peers given as ID@HOST:PORT
    log_format: str = default("--log-format")  # text, or json (one object per line, node/reqlog.py)
    slow_ms: int | None = default("--slow-ms")  # log requests that take the loop this long or more
    metrics: tuple[str, int] | None = default("--metrics")  # Prometheus, /healthz, /readyz (node/metrics.py)
    ready_lag: int = default("--ready-lag")  # entries a live peer may hold beyond ours while /readyz says ready
    config_file: str | None = default("--config")  # the TOML file the settings were read from, if any

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

    def report(self) -> dict[str, Any]:
        """status.config: the effective value of each setting safe to show, by setting name."""
        return {o.name: o.report(self) for o in SETTINGS if o.status}


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
    """`ledger-node`'s parser, one argument per row of node/options.py, in its groups. No argument
    has an argparse default: what was not given comes from the environment, the file or the row."""
    p = argparse.ArgumentParser(
        prog="ledger-node",
        description="Run a Converge Ledger node. Every setting can also be given by its LEDGER_* environment "
        "variable (shown in brackets) or in the --config file; flags win over variables, which win over the file.",
    )
    groups: dict[str, Any] = {}
    for o in options.OPTIONS:
        if o.group not in groups:
            groups[o.group] = p.add_argument_group(o.group)
        g = groups[o.group]
        helptext = options.help_text(o).replace("%", "%%")
        if o.kind == options.VERSION:
            g.add_argument(o.flag, action="version", version=f"ledger-node {__version__}", help=helptext)
        elif o.kind == options.SWITCH:
            g.add_argument(o.flag, action="store_true", default=None, help=helptext)
        else:
            g.add_argument(o.flag, metavar=o.metavar, choices=o.choices or None, help=helptext)
    return p


def settings_names(parser: argparse.ArgumentParser | None = None) -> set[str]:
    """The names of the settings (upper case, underscores): what a config file and LEDGER_* may set."""
    return {o.key for o in SETTINGS}


def read_config_file(path: str, known: set[str] | None = None) -> dict[str, str]:
    """A TOML config file as {NAME: the value as a flag would give it}; ConfigError on anything
    that is not a known setting with a string, integer, boolean or (for lists) array value."""
    known = settings_names() if known is None else known
    refused = {o.key: o.not_in_file for o in options.OPTIONS if o.not_in_file}
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
        if name in refused:
            raise ConfigError(f"--config {path}: {key!r} cannot be set in a config file ({refused[name]})")
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
    args = build_parser().parse_args(argv)
    config_file = args.config or env.get("LEDGER_CONFIG") or None
    from_file = read_config_file(config_file) if config_file else {}

    # each setting: the flag, else its variable, else the file, else the row's default
    v: dict[str, Any] = {}
    for o in SETTINGS:
        if o.flag == "--config":
            v[o.name] = config_file
            continue
        given = getattr(args, o.dest)
        raw: str | None
        if o.kind == options.SWITCH:
            raw = "1" if given else None
        else:
            raw = given
        if raw is None and o.env_var is not None:
            raw = env.get(o.env_var)
        if raw is None and o.not_in_file is None:
            raw = from_file.get(o.key)
        v[o.name] = o.default if raw is None or o.parse is None else o.parse(raw, o.flag)

    # what ties settings together
    host, port = v["listen"]
    pub_port = v["pub-port"]
    if pub_port is None:
        pub_port = None if port == 0 else port + 1
        if pub_port is not None and pub_port > 65535:
            raise ConfigError(f"--listen port {port} leaves no room for the PUB socket; set --pub-port")
    if pub_port is not None and pub_port != 0 and pub_port == port:
        raise ConfigError("--pub-port must differ from the --listen port")
    secure = v["peer-keys"] is not None or v["client-keys"] is not None
    seeds: tuple[tuple[str, str | None], ...] = v["peers"]
    for addr, seed_id in seeds:
        if secure and seed_id is None:
            raise ConfigError(f"--peers {addr!r}: with keys, each entry names its node, NODE_ID@HOST:PORT "
                              "(its key is looked up in --peer-keys)")
    if len(seeds) > v["max-peers"]:
        raise ConfigError(f"--peers lists {len(seeds)} nodes, more than --max-peers ({v['max-peers']})")
    if not v["suspect-after"] < v["dead-after"]:
        raise ConfigError(f"--suspect-after and --dead-after must be integers with 1 <= suspect-after < "
                          f"dead-after <= 1000, got {str(v['suspect-after'])!r} and {str(v['dead-after'])!r}")
    insecure, advertise = v["insecure"], v["advertise"]
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
    fields = {o.attr: v[o.name] for o in SETTINGS if o.flag not in ("--listen", "--peers")}
    fields.update(host=host, port=port, pub_port=pub_port, peers=tuple(a for a, _ in seeds),
                  seed_ids=tuple((a, i) for a, i in seeds if i is not None))
    return Config(**fields)
