"""`ledger-node`: parse configuration, open storage, bind, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace

from node import __version__, clients, reqlog
from node.access import AccessError, load_access
from node.config import ConfigError, parse
from node.identity import KEY_FILE, IdentityError, load_or_create
from node.ledger import ACCELERATED, HASHING_IN_C, DataDirError, Ledger
from node.marks import Journal
from node.server import Server
from node.sockets import AddressInUse
from node.storage import KV, LevelDBKV, MemoryKV, StorageLocked, WriteFailed

log = logging.getLogger("node")


def _fail(msg: str) -> int:
    print(f"ledger-node: error: {msg}", file=sys.stderr, flush=True)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--check" or any(a.startswith("--check=") for a in args[:1]):
        # `ledger-node --check DATA`: an offline check of a stopped node's folder (node/check.py)
        data = args[0].partition("=")[2] if "=" in args[0] else (args[1] if len(args) > 1 else "")
        if not data or len(args) > (1 if "=" in args[0] else 2):
            return _fail("usage: ledger-node --check DATA")
        from node.check import check
        return check(data, sys.stdout)
    if any(a == "--check" or a.startswith("--check=") for a in args):
        # argparse would take it anywhere and start a serving node: never on a folder meant to be checked
        return _fail("--check must come first and alone: ledger-node --check DATA")
    try:
        cfg = parse(argv)
    except ConfigError as exc:
        return _fail(str(exc))
    reqlog.configure(cfg.log_level, cfg.log_format)
    if cfg.config_file:
        log.info("settings read from %s (flags and LEDGER_* variables win over it)", cfg.config_file)
    if not ACCELERATED:
        log.info("node/_accel.c is not built (no C compiler where this was installed): pulled entries are "
                 "applied in pure Python, which takes ~2x the CPU of a catch-up; everything else is the same")
    elif not HASHING_IN_C:
        log.info("node/_accel.c found no OpenSSL libcrypto in this process: SHA-256 is left to hashlib "
                 "(a catch-up takes a little more CPU; everything else is the same)")
    # Descriptors: the soft limit goes up to the hard one, and clients get what is left after
    # storage's and the process's reserve, so LevelDB never meets "Too many open files".
    fd_limit = clients.raise_fd_limit()
    allowed = clients.clients_allowed(fd_limit)
    if cfg.max_clients is None:
        if allowed < clients.MIN_CLIENTS:
            return _fail(f"the open-files limit is {fd_limit}: too low (the node keeps {clients.RESERVED_FDS} "
                         f"for storage and itself, and needs room for {clients.MIN_CLIENTS} clients); raise "
                         "it (ulimit -n)")
        cfg = replace(cfg, max_clients=min(clients.DEFAULT_MAX_CLIENTS, allowed))
    elif cfg.max_clients > allowed:
        return _fail(f"--max-clients {cfg.max_clients} does not fit the open-files limit of {fd_limit} (the "
                     f"node keeps {clients.RESERVED_FDS} for storage and itself): use at most {max(allowed, 0)}, "
                     "or raise the limit (ulimit -n)")
    kv: KV
    # a folder this start creates is removed again if the node cannot start: a failed first
    # start (a port in use, say) must not leave a data folder claimed by a generated id
    created = cfg.data != ":memory:" and not os.path.exists(cfg.data)
    if cfg.data == ":memory:":
        kv = MemoryKV()
    else:
        try:
            os.makedirs(cfg.data, exist_ok=True)
            kv = LevelDBKV(cfg.data)
        except StorageLocked:
            return _fail(
                f"data folder {cfg.data!r} is in use by another ledger-node (its LevelDB lock is held); "
                "stop that node or choose another --data"
            )
        except OSError as exc:
            return _fail(f"cannot open data folder {cfg.data!r}: {exc}")
        except Exception as exc:  # plyvel.Error and friends (corruption, permissions)
            return _fail(f"cannot open data folder {cfg.data!r}: {exc}")
    # Start-up makes a few objects per context and frees almost none: no cyclic GC until they
    # are frozen below (at 1M contexts one collection of them takes ~2 s)
    gc.disable()
    try:
        journal = None if cfg.data == ":memory:" else Journal(cfg.data, lazy=True)
        ledger = Ledger(
            kv, node_id=cfg.node_id, max_payload=cfg.max_payload, hot_bytes=cfg.hot_bytes,
            sync_meta=cfg.data != ":memory:", max_loads=cfg.max_loads, max_staged_bytes=cfg.max_staged_bytes,
            journal=journal, durable_reads=cfg.sync, context_cache=cfg.context_cache,
        )
    except DataDirError as exc:
        kv.close()
        return _fail(str(exc))
    except WriteFailed as exc:  # start-up writes its id, drops staged loads: a full disk fails here
        kv.close()
        return _fail(f"cannot write to data folder {cfg.data!r}: {exc}; free space or fix the disk, then start again")
    except Exception as exc:  # a damaged folder (LevelDB corruption, a broken record): one line, no traceback
        kv.close()
        log.debug("start-up failed", exc_info=True)
        return _fail(f"data folder {cfg.data!r} is damaged and cannot be served: {type(exc).__name__}: {exc}; "
                     "run `ledger-node --check DATA` on it, or move it away and let this node refill from its peers")
    try:
        identity, new_key = load_or_create(cfg.data)
    except IdentityError as exc:
        kv.close()
        return _fail(str(exc))
    access = None
    if cfg.secure:
        try:
            access = load_access(cfg)
        except AccessError as exc:
            kv.close()
            return _fail(str(exc))
    if access is not None and access.peers:
        bound = access.peers.get(ledger.node_id)
        if bound is not None and bound != identity.public:
            kv.close()
            return _fail(f"--peer-keys binds this node's id {ledger.node_id!r} to {bound.hex()}, but its key "
                         f"({os.path.join(cfg.data, KEY_FILE)}) is {identity.public_hex}: its peers would refuse it; "
                         "fix the allowlist or the key file")
        if bound is None:
            log.warning("this node's id %r is not in --peer-keys: the other nodes refuse it unless their lists bind "
                        "it to %s", ledger.node_id, identity.public_hex)
    if new_key and cfg.data != ":memory:":
        log.info("made this node's identity key in %s (public key %s)", os.path.join(cfg.data, KEY_FILE),
                 identity.public_hex)
    if cfg.accept_damage:
        accepted = ledger.accept_damage()
        log.warning("--accept-damage: %s", f"went on from what the disk holds of {', '.join(map(repr, accepted))}"
                    if accepted else "no damaged context this node writes; nothing to accept")
    try:
        server = Server(cfg, ledger, identity=identity, access=access)
    except AddressInUse as exc:
        kv.close()
        if created:
            shutil.rmtree(cfg.data, ignore_errors=True)
        return _fail(f"cannot listen on {exc}; pick another "
                     + ("--metrics address" if str(exc).startswith("--metrics") else "--listen / --pub-port")
                     + (" or stop whatever uses it" if "in use" in str(exc) else ""))
    if cfg.insecure:
        log.warning("--insecure: serving on %s without authentication: anyone who can reach it can read, "
                    "append and join the mesh as a peer; use it only on a network you trust", server.router_address)
    if cfg.host in ("0.0.0.0", "::") and not cfg.advertise:
        logging.getLogger("node").warning(
            "listening on all interfaces (%s) without --advertise: peers, and clients sent here by "
            "NOT_WRITER, would be told to dial %s; set --advertise HOST:PORT to an address they can reach",
            cfg.host, cfg.host)
    # The node's long-lived state (hot tail, buffers) holds no reference cycles;
    # the default GC thresholds would walk it every few thousand appends, a
    # pause of tens of milliseconds with a full hot tail. Collect rarely, and
    # never scan what start-up loaded (frozen as it is: collecting it first cost ~2 s at 1M
    # contexts for the few cycles start-up leaves).
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    gc.enable()
    if access is not None:
        def reload(*_: object) -> None:
            server.reload_keys = True  # read by the loop, between requests

        signal.signal(signal.SIGHUP, reload)
    signal.signal(signal.SIGTERM, server.stop)
    signal.signal(signal.SIGINT, server.stop)

    def ready() -> None:
        flush = f"flushed within {cfg.flush_ms} ms" if not cfg.sync else "fsynced before every reply"
        security = ("INSECURE: no authentication, beyond loopback" if cfg.insecure
                    else f"CURVE, {len(access.peers)} peer key(s), {len(access.clients)} client key(s)"
                    if access is not None else "loopback only (no authentication configured)")
        metrics_line = (f"  metrics (HTTP):    http://{server.metrics.address}/metrics, /healthz, /readyz\n"
                        if server.metrics is not None else "")
        print(
            f"ledger-node {__version__} id={ledger.node_id}\n"
            f"  requests (ROUTER): {server.router_address}\n"
            f"  watch (PUB):       {server.pub_address}\n"
            f"{metrics_line}"
            f"  data:              {cfg.data} ({len(ledger.contexts)} contexts, {ledger.entries_total} entries)\n"
            f"  durability:        {cfg.durability} ({flush})\n"
            f"  identity:          {identity.public_hex}\n"
            f"  security:          {security}\n"
            f"ready router={server.router_address} pub={server.pub_address} id={ledger.node_id}",
            flush=True,
        )

    try:
        server.run(ready)
    finally:
        kv.close()
        ledger.close()
    print("ledger-node: stopped cleanly", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
