"""`ledger`: the command-line client of a Converge Ledger node.

A thin shell over the reference client (`protocol.client.Client`): it parses
arguments, reads local input (payloads, snapshot files) before it talks to the
node, calls the client, and prints results either for people or, with
`--json`, as exactly one JSON object per line.

Exit codes: 0 success; 1 an error from the node, a failed verification or a
node that does not answer; 2 a usage error or bad local input (a missing file,
a malformed --meta); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

import zmq

from protocol import codec
from protocol.client import DEFAULT_TIMEOUT, Client, Head, normalize_address
from protocol.entry import Entry
from protocol.errors import IntegrityError, LedgerError, RemoteProtocolError, Timeout, TooLarge, Unreachable
from protocol.keys import Identity, KeyFileError, parse_public_key
from protocol.snapshot import read_snapshot
from tools import backup as backups
from tools.cluster import ClusterError, run_cluster
from tools.progress import Progress
from tools.progress import say as _say_above

DEFAULT_NODE = "127.0.0.1:7400"
PROG = "ledger"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# Payloads above this are checked against the node's own limit first: a frame
# above the node's request limit is dropped by ZeroMQ without a reply, which
# would look like a dead node instead of a clear TOO_LARGE.
LARGE_PAYLOAD = 1 << 20
# A progress line (stderr, not with --json) for snapshot, load and verify once they have taken
# this long: a quick command prints what it always printed and nothing more.
PROGRESS_AFTER_S = 1.0


class UsageError(Exception):
    """Bad arguments or bad local input; exit code 2."""


# -- argument parsing ------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return v


def _uint(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) >= 1 << 64:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return int(text)


def _seq(text: str) -> int:
    v = _uint(text)
    if v < 1:
        raise argparse.ArgumentTypeError("seq starts at 1")
    return v


def _meta(text: str) -> tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r} (no '=')")
    if not k:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r} (empty key)")
    return k, v


def _global_options(defaults: bool) -> argparse.ArgumentParser:
    # The same options on the top-level parser and on every command, so that
    # `ledger head c1 --json` works as well as `ledger --json head c1`.
    # SUPPRESS keeps a command's unset option from hiding the top-level one.
    p = argparse.ArgumentParser(add_help=False)
    d: dict[str, Any] = {} if defaults else {"default": argparse.SUPPRESS}
    p.add_argument("--node", metavar="HOST:PORT", help=f"node to talk to, or several with commas, tried in that order "
                   f"(default $LEDGER_NODE or {DEFAULT_NODE})", **d)
    p.add_argument("--json", action="store_true", help="one JSON object per line", **d)
    p.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help=f"how long to wait for the node to answer (default {DEFAULT_TIMEOUT:g})",
        **d,
    )
    p.add_argument("--key-file", metavar="FILE", help="this client's key file (`ledger keygen`), for a node with "
                   "keys (default $LEDGER_KEY_FILE)", **d)
    p.add_argument("--server-key", metavar="HEX", help="the node's public key (its `status` public_key), for a "
                   "node with keys (default $LEDGER_SERVER_KEY)", **d)
    return p


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("converge-ledger")
    except Exception:  # not installed as a distribution (a source checkout on sys.path)
        from node import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    common = _global_options(defaults=False)
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Command-line client of a Converge Ledger node.",
        epilog="Exit codes: 0 ok, 1 error from the node or failed verification, 2 usage error, 130 interrupted.",
        parents=[common],
    )
    p.add_argument("--version", action="version", version=f"{PROG} {_version()} (protocol v{codec.PROTOCOL_VERSION})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    a = sub.add_parser(
        "append",
        parents=[common],
        help="append one entry (or one per line with --lines)",
        description="Append an entry. The payload comes from PAYLOAD, or --file, or else all of stdin.",
    )
    a.add_argument("context")
    a.add_argument("payload", nargs="?", help="the payload as text (default: --file, else stdin)")
    a.add_argument("--key", default="", help="type tag of the entry (facts, intents, traces, ...)")
    a.add_argument(
        "--meta", type=_meta, action="append", default=[], metavar="K=V", help="a metadata pair; may be repeated"
    )
    a.add_argument("--file", metavar="PATH", help="read the payload from this file (raw bytes)")
    a.add_argument(
        "--lines",
        action="store_true",
        help="one entry per line of stdin (or of --file), pipelined; one output line per entry",
    )
    a.add_argument(
        "--dedup-id",
        metavar="ID",
        help="a retry with the same id returns the original entry (with --lines: ID:0, ID:1, ...); "
        "default: a random id, so the client's own retry is safe",
    )
    a.add_argument("--expect-seq", type=_uint, metavar="N", help="append only if the context's last seq is N")
    a.add_argument("--after-lamport", type=_uint, metavar="N", help="the entry's lamport will be greater than N")
    a.add_argument("--replicas", type=_uint, metavar="N", help="answer only once N other nodes hold the entry "
                   "(an error past the node's replica timeout says how many do; the entry stays appended)")

    g = sub.add_parser("get", parents=[common], help="print entries of a context")
    g.add_argument("context")
    g.add_argument("--key", help="only entries with this key")
    g.add_argument("--after", type=_uint, default=0, metavar="N", help="only entries with seq > N")
    g.add_argument("--limit", type=_uint, metavar="N", help="print at most N entries (default: all)")
    g.add_argument("--fork", metavar="WRITER", help="read the history written by WRITER that a fork set aside "
                   "on this node (see `ledger head`)")
    g.add_argument("--fork-index", type=_uint, metavar="N", help="with --fork: the N-th history of WRITER set "
                   "aside here, from 1 (default: the latest; a writer that lost tails in several crashes)")
    g.add_argument("--writer-key", metavar="HEX", help="check every entry against the head its writer signed with "
                   "this key (an inclusion proof each) before printing it: exit 1 unless they all check")
    g.add_argument("--pin", action="store_true", help="as `head --pin`: the writer's key pinned on first use")

    h = sub.add_parser("head", parents=[common], help="size, Merkle root, last lamport and writer of a context")
    h.add_argument("context")
    h.add_argument("--writer-key", metavar="HEX", help="check the head against one signed by this writer key "
                   "(the writer node's public_key): exit 1 unless it is")
    h.add_argument("--pin", action="store_true", help="check against the key pinned for the context's writer, "
                   "pinning the one its signed head names on first use ($LEDGER_KNOWN_WRITERS, default "
                   "~/.config/converge-ledger/known_writers)")

    sub.add_parser("contexts", parents=[common], help="every context with its size")
    sub.add_parser("status", parents=[common], help="the node's status")

    s = sub.add_parser("snapshot", parents=[common], help="write a verified snapshot file of a context")
    s.add_argument("context")
    s.add_argument("-o", "--output", required=True, metavar="FILE", help="the snapshot file to write")

    ld = sub.add_parser("load", parents=[common], help="load a snapshot file into a context")
    ld.add_argument("context")
    ld.add_argument("file")
    ld.add_argument("--fail-if-exists", action="store_true", help="refuse if the context already exists")
    ld.add_argument("--import", dest="import_", action="store_true",
                    help="append the snapshot's entries (of any context) after CONTEXT's own, as new entries "
                    "that record where they come from in metadata (import.context, import.seq, import.hash): "
                    "to branch an agent's memory into another context")

    bk = sub.add_parser("backup", parents=[common], help="every context of the node into DIR, as verified "
                        "snapshot files and a manifest (run again to resume, or to bring it up to date)")
    bk.add_argument("dir", metavar="DIR")
    rs = sub.add_parser("restore", parents=[common], help="load every context of a backup DIR into the node "
                        "(contexts it already holds at that size and root are skipped)")
    rs.add_argument("dir", metavar="DIR")

    pr = sub.add_parser("proof", parents=[common], help="inclusion proof of one entry, verified locally")
    pr.add_argument("context")
    pr.add_argument("seq", type=_seq)
    pr.add_argument("--writer-key", metavar="HEX", help="prove it against the root its writer signed with this key")
    pr.add_argument("--pin", action="store_true", help="as `head --pin`: the writer's key pinned on first use")

    v = sub.add_parser("verify", parents=[common], help="download a context, re-hash every entry, recompute the root")
    v.add_argument("context")
    v.add_argument("--writer-key", metavar="HEX", help="also check the entries against the head their writer signed "
                   "with this key (the writer node's public_key): exit 1 unless they match")
    v.add_argument("--pin", action="store_true", help="as `head --pin`: the writer's key pinned on first use")

    mg = sub.add_parser("merged", parents=[common],
                        help="entries of several contexts in one causal order (lamport, writer, context, seq)")
    mg.add_argument("contexts", nargs="+", metavar="CONTEXT")
    mg.add_argument("--after-lamport", type=_uint, default=0, metavar="N", help="only entries with lamport > N")
    mg.add_argument("--limit", type=_uint, metavar="N", help="print at most N entries")

    cl = sub.add_parser(
        "cluster",
        help="start a mesh of nodes on this machine; Ctrl-C stops them all",
        description="Start N ledger-node processes that form one mesh (node 1 first, the others seeded with "
        "its address), print their addresses and a ready line, and stop them all on Ctrl-C. Flags after "
        "'--' go to every node, e.g. `ledger cluster --nodes 3 -- --durability sync`.",
    )
    cl.add_argument("--nodes", type=int, default=3, metavar="N", help="how many nodes (default 3)")
    cl.add_argument("--data", metavar="DIR", help="keep node data in DIR/n1, DIR/n2, ... (default: a throw-away "
                    "temporary folder)")
    cl.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    cl.add_argument("--port-base", type=int, default=0, metavar="PORT",
                    help="node i listens on PORT + 10*(i-1), its watch socket one above (default: free ports)")
    cl.add_argument("--keys", action="store_true", help="give every node a key and CURVE on its sockets, and "
                    "write one admin client key (DIR/client.key); always on when --host is not loopback")
    cl.add_argument("node_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    kg = sub.add_parser(
        "keygen",
        parents=[common],
        help="make an identity key file (Ed25519) for a client or a node, and print its public key",
        description="Write a new identity key to FILE (mode 0600; an existing file is not replaced without "
        "--force) and print its public key, the 64 hex digits other nodes' allowlists name. With --show, "
        "print the public key of an existing key file instead. A node makes its own key (DATA/node.key) on "
        "first start; this is for clients and for provisioning nodes ahead of time.",
    )
    kg.add_argument("file", metavar="FILE")
    kg.add_argument("--force", action="store_true", help="replace FILE if it exists (its old key is lost)")
    kg.add_argument("--show", action="store_true", help="print the public key of the existing FILE, make nothing")

    w = sub.add_parser(
        "watch",
        parents=[common],
        help="print a context's entries as they are appended, until interrupted",
        description="Follow a context: every entry after --after (default: only new ones), then live, "
        "exactly once and in order. Survives restarts of the node (notes go to stderr). "
        "Stop with Ctrl-C.",
    )
    w.add_argument("context")
    w.add_argument("--after", type=_uint, metavar="N", help="start with the entries after seq N (default: only new ones)")
    w.add_argument("--key", help="only entries with this key")
    w.add_argument("--count", type=_uint, metavar="N", help="stop after printing N entries")
    w.add_argument("--writer-key", metavar="HEX", help="prove every entry under the head its writer signed with "
                   "this key before printing it (an inclusion proof each): stop with exit 1 at one that is not")
    w.add_argument("--pin", action="store_true", help="as `head --pin`: the writer's key pinned on first use")
    w.add_argument("--max-outage", type=_positive_float, metavar="SECONDS",
                   help="give up (exit 1) when the node stays unreachable this long (default: keep trying)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and fill in defaults; argparse exits (SystemExit) on a usage error."""
    p = build_parser()
    args, extra = p.parse_known_args(argv)
    if extra:
        # argparse cannot take an optional positional after options (`append c --key k "text"`):
        # one leftover word is the payload there; anything else is an error as usual.
        if args.command == "append" and args.payload is None and len(extra) == 1 and not extra[0].startswith("-"):
            args.payload = extra[0]
        else:
            p.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "node", None) is None:
        args.node = os.environ.get("LEDGER_NODE") or DEFAULT_NODE
    if getattr(args, "timeout", None) is None:
        args.timeout = DEFAULT_TIMEOUT
    if getattr(args, "key_file", None) is None:
        args.key_file = os.environ.get("LEDGER_KEY_FILE") or None
    if getattr(args, "server_key", None) is None:
        args.server_key = os.environ.get("LEDGER_SERVER_KEY") or None
    args.json = bool(getattr(args, "json", False))
    if args.command == "append":
        if args.lines and args.payload is not None:
            p.error("append: give PAYLOAD or --lines, not both")
        if args.payload is not None and args.file is not None:
            p.error("append: give PAYLOAD or --file, not both")
        if args.lines and (args.expect_seq is not None or args.after_lamport is not None or args.replicas):
            p.error("append: --expect-seq, --after-lamport and --replicas apply to one entry; "
                    "they cannot be used with --lines")
    return args


# -- output ------------------------------------------------------------------------


def _hex(b: bytes) -> str:
    return b.hex()


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def entry_json(e: Entry) -> dict[str, Any]:
    d: dict[str, Any] = {"context": e.context, "seq": e.seq, "key": e.key}
    try:
        d["payload"] = e.payload.decode("utf-8")
    except UnicodeDecodeError:
        d["payload_b64"] = base64.b64encode(e.payload).decode("ascii")
    d.update(metadata=dict(e.metadata), lamport=e.lamport, ts_ns=e.ts_ns, writer=e.writer, hash=_hex(e.hash))
    return d


def _payload_text(p: bytes) -> str:
    try:
        t = p.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(p)} bytes, base64> {base64.b64encode(p).decode('ascii')}"
    # Newlines or control characters would break the one-entry-per-line layout.
    if t.isprintable():
        return t
    return json.dumps(t, ensure_ascii=False)


def entry_text(e: Entry) -> str:
    parts = [f"{e.context}#{e.seq}"]
    if e.key:
        parts.append(f"[{e.key}]")
    parts.append(f"lamport={e.lamport} writer={e.writer}")
    if e.metadata:
        parts.append("{" + ", ".join(f"{k}={v}" for k, v in sorted(e.metadata.items())) + "}")
    return " ".join(parts) + "  " + _payload_text(e.payload)


def head_json(h: Head) -> dict[str, Any]:
    d: dict[str, Any] = {"context": h.context, "size": h.size, "root": _hex(h.root), "lamport": h.lamport,
                         "writer": h.writer, "watchers": h.watchers}
    if h.fork is not None:
        d["fork"] = h.fork
    if h.damaged is not None:
        d["damaged"] = {k: _hex(v) if isinstance(v, bytes) else v for k, v in h.damaged.items()}
    if h.signed is not None:
        d["signed"] = {"size": h.signed.size, "root": _hex(h.signed.root), "key": _hex(h.signed.key),
                       "epoch": h.signed.epoch, "sig": _hex(h.signed.sig)}
    if h.verified is not None:
        d["verified_size"] = h.verified
    return d


class Output:
    """Writes results to stdout, as JSON lines or for people."""

    def __init__(self, as_json: bool, stream: IO[str] | None = None) -> None:
        self.as_json = as_json
        self.stream = stream if stream is not None else sys.stdout

    def line(self, text: str) -> None:
        self.stream.write(text + "\n")

    def obj(self, d: dict[str, Any]) -> None:
        self.line(json.dumps(_jsonable(d), ensure_ascii=False, separators=(",", ":")))

    def entry(self, e: Entry) -> None:
        if self.as_json:
            self.obj(entry_json(e))
        else:
            self.line(entry_text(e))

    def fields(self, d: dict[str, Any]) -> None:
        """A summary: one JSON object, or `key: value` lines."""
        if self.as_json:
            self.obj(d)
            return
        for k, v in d.items():
            if isinstance(v, list):
                self.line(f"{k}:" + ("" if v else " none"))
                for x in v:
                    shown = _jsonable(x)
                    if isinstance(shown, dict):
                        shown = "  ".join(f"{a}={b}" for a, b in shown.items())
                    self.line(f"  {shown}")
            elif isinstance(v, dict):
                self.line(f"{k}: " + ("  ".join(f"{a}={_jsonable(b)}" for a, b in v.items()) or "none"))
            else:
                self.line(f"{k}: {_jsonable(v)}")


# -- local input -------------------------------------------------------------------


def _stdin_bytes() -> IO[bytes]:
    stream: Any = sys.stdin
    src: IO[bytes] = stream.buffer if hasattr(stream, "buffer") else stream
    return src


def _read_payload(args: argparse.Namespace) -> bytes:
    if args.payload is not None:
        return str(args.payload).encode("utf-8", "surrogateescape")
    if args.file is not None:
        try:
            with open(args.file, "rb") as f:
                return f.read()
        except OSError as exc:
            raise UsageError(f"cannot read --file {args.file!r}: {exc.strerror or exc}") from None
    if sys.stdin is None:
        raise UsageError("no payload: give PAYLOAD, --file or pipe it on stdin")
    if sys.stdin.isatty():
        sys.stderr.write("ledger: reading the payload from stdin (end with Ctrl-D)\n")
    return _stdin_bytes().read()


def _lines(src: IO[bytes]) -> Iterator[bytes]:
    """Lines without their terminator ('\\n' or '\\r\\n'), read lazily."""
    for raw in src:
        if raw.endswith(b"\n"):
            raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        yield raw


# -- commands ----------------------------------------------------------------------


def cmd_append(c: Client, args: argparse.Namespace, out: Output, payload: bytes | None = None) -> int:
    metadata = dict(args.meta) or None
    if args.lines:
        src: IO[bytes]
        if args.file is not None:
            try:
                src = open(args.file, "rb")
            except OSError as exc:
                raise UsageError(f"cannot read --file {args.file!r}: {exc.strerror or exc}") from None
        else:
            if sys.stdin is None:
                raise UsageError("--lines reads stdin, but there is none")
            src = _stdin_bytes()
        try:
            for e in c.append_many(
                args.context, _lines(src), key=args.key, metadata=metadata, dedup_prefix=args.dedup_id
            ):
                out.entry(e)
        finally:
            if args.file is not None:
                src.close()
        return EXIT_OK

    if payload is None:
        payload = _read_payload(args)
    if len(payload) > LARGE_PAYLOAD:
        limit = c.status().get("max_payload")
        if isinstance(limit, int) and len(payload) > limit:
            raise TooLarge(f"payload is {len(payload)} bytes, the node's limit is {limit}", {"limit": limit})
    # A random dedup id makes the client's retry after a timeout safe: a retry
    # of an append that did land returns that entry instead of a second one.
    dedup = args.dedup_id if args.dedup_id is not None else "cli-" + os.urandom(12).hex()
    e = c.append(
        args.context,
        payload,
        key=args.key,
        metadata=metadata,
        dedup_id=dedup,
        expect_seq=args.expect_seq,
        after_lamport=args.after_lamport,
        replicas=args.replicas or None,
    )
    if c.last_replicated is None:
        out.entry(e)
    elif out.as_json:
        out.obj({**entry_json(e), "replicated": c.last_replicated})
    else:
        out.line(f"{entry_text(e)}  (held by {c.last_replicated} other node(s))")
    return EXIT_OK


def cmd_get(c: Client, args: argparse.Namespace, out: Output) -> int:
    if args.fork is not None and (args.writer_key is not None or args.pin):
        raise UsageError("--fork reads a history set aside here, which no current signed head covers: "
                         "--writer-key and --pin do not apply")
    if args.fork is not None:
        after, left = args.after, args.limit
        while left is None or left > 0:
            page = c.get(args.context, key=args.key, after=after, limit=codec.MAX_GET_LIMIT, fork=args.fork,
                         fork_index=args.fork_index or None)
            for e in page.entries[:left]:
                out.entry(e)
            if left is not None:
                left -= len(page.entries)
            if not page.more:
                break
            after = page.next_after
        return EXIT_OK
    shown = 0
    writer_key = _writer_key(args, c)
    if writer_key is not None:
        # checked against the head the writer signed, a page at a time, before it is printed
        left, after = args.limit, args.after
        while left is None or left > 0:
            page = c.get(args.context, key=args.key, after=after,
                         limit=codec.MAX_GET_LIMIT if left is None else min(left, codec.MAX_GET_LIMIT))
            entries = page.entries if left is None else page.entries[:left]
            c.check_entries(args.context, entries, writer_key)
            for e in entries:
                out.entry(e)
            shown += len(entries)
            if left is not None:
                left -= len(entries)
            if not page.more:
                break
            after = page.next_after
    elif args.limit is None:
        for e in c.iter_entries(args.context, key=args.key, after=args.after):
            out.entry(e)
            shown += 1
    else:
        left, after = args.limit, args.after
        # A page may hold fewer entries than asked (reply size cap), so keep paging.
        while left > 0:
            page = c.get(args.context, key=args.key, after=after, limit=min(left, codec.MAX_GET_LIMIT))
            for e in page.entries[:left]:
                out.entry(e)
                shown += 1
            left -= len(page.entries)
            if not page.more:
                break
            after = page.next_after
    if not shown:
        # an empty answer of a context that exists is a valid one (exit 0); a context the node does
        # not have is NOT_FOUND (exit 1), as for `head` and `verify` (the node answers a `get` of
        # it with no entries: a mistyped name must not look like an empty context)
        c.head(args.context)
    return EXIT_OK


def cmd_watch(c: Client, args: argparse.Namespace, out: Output) -> int:
    def note(kind: str, text: str) -> None:
        sys.stderr.write(f"{PROG}: {text}\n")
        sys.stderr.flush()

    printed = 0
    with c.watch(args.context, after=args.after, key=args.key, max_outage=args.max_outage, on_event=note,
                 writer_key=_writer_key(args, c)) as w:
        if args.count == 0:
            return EXIT_OK
        for e in w:
            out.entry(e)
            out.stream.flush()  # a watcher is read live, often through a pipe
            printed += 1
            if args.count is not None and printed >= args.count:
                break
    return EXIT_OK


def cmd_merged(c: Client, args: argparse.Namespace, out: Output) -> int:
    for i, e in enumerate(c.merged(args.contexts, after_lamport=args.after_lamport)):
        if args.limit is not None and i >= args.limit:
            break
        out.entry(e)
    return EXIT_OK


def known_writers_path() -> str:
    """Where `--pin` keeps the writer keys it learned ($LEDGER_KNOWN_WRITERS, else in the user's config)."""
    return os.environ.get("LEDGER_KNOWN_WRITERS") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "converge-ledger", "known_writers")


def _writer_key(args: argparse.Namespace, c: Client | None = None) -> bytes | None:
    """The writer key to check the context against: `--writer-key`, or with `--pin` the key pinned
    for its writer, learned from the writer's signed head on first use (as SSH's known_hosts)."""
    if args.writer_key is not None and getattr(args, "pin", False):
        raise UsageError("--writer-key and --pin exclude each other: give the key, or let --pin find it")
    if args.writer_key is not None:
        try:
            return parse_public_key(args.writer_key, "--writer-key")
        except KeyFileError as exc:
            raise UsageError(str(exc)) from None
    if not getattr(args, "pin", False) or c is None:
        return None
    from node.access import parse_peer_keys

    path = known_writers_path()
    try:
        with open(path, encoding="utf-8") as f:
            known = parse_peer_keys(f.read(), path)
    except FileNotFoundError:
        known = {}
    except (OSError, UnicodeDecodeError, KeyFileError) as exc:
        raise UsageError(f"cannot use the known writers file: {exc}") from None
    h = c.head(args.context)
    if h.writer in known:
        if h.signed is not None and h.signed.key != known[h.writer]:
            raise IntegrityError(f"the key of writer {h.writer!r} changed: {path} pins {known[h.writer].hex()}, "
                                 f"the node serves heads signed by {h.signed.key.hex()}; if the writer was given a new "
                                 "key on purpose, remove its line from that file")
        return known[h.writer]
    if h.signed is None or not h.signed.verify():
        raise IntegrityError(f"{args.context!r}: the node sent no head signed by its writer {h.writer!r}; "
                             "nothing to pin")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{h.writer} {h.signed.key.hex()}\n")
    sys.stderr.write(f"{PROG}: pinned writer {h.writer}'s key {h.signed.key.hex()} on first use, in {path}\n")
    return h.signed.key


def cmd_head(c: Client, args: argparse.Namespace, out: Output) -> int:
    out.fields(head_json(c.head(args.context, writer_key=_writer_key(args, c))))
    return EXIT_OK


def cmd_contexts(c: Client, args: argparse.Namespace, out: Output) -> int:
    items = c.contexts()
    if out.as_json:
        for it in items:
            out.obj({"name": it["name"], "size": it["size"]})
        return EXIT_OK
    width = max((len(str(it["name"])) for it in items), default=0)
    for it in items:
        out.line(f"{it['name']:<{width}}  {it['size']}")
    return EXIT_OK


def cmd_status(c: Client, args: argparse.Namespace, out: Output) -> int:
    out.fields(c.status())
    return EXIT_OK


def _entries_progress(what: str, args: argparse.Namespace) -> Progress:
    return Progress(what, quiet=args.json, delay=PROGRESS_AFTER_S)


def _counter(p: Progress) -> Callable[[int, int], None]:
    """An `on_progress(done, total)` of the client that updates `p`."""
    def on(done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 100.0
        p.update(f"{done:,}/{total:,} entries ({pct:.0f}%), {p.elapsed():,.1f} s")
    return on


def cmd_snapshot(c: Client, args: argparse.Namespace, out: Output) -> int:
    with _entries_progress("snapshot", args) as p:
        info = backups.write_snapshot(c, args.context, args.output, on_progress=_counter(p))
        p.done()
    target = os.path.abspath(args.output)
    if info.get("missing"):
        sys.stderr.write(f"note: context {args.context!r} does not exist on the node: wrote an empty snapshot "
                         "(size 0)\n")
    out.fields(
        {
            "context": info["context"],
            "size": info["size"],
            "root": _hex(info["root"]),
            "file": args.output,
            "bytes": os.path.getsize(target),
        }
    )
    return EXIT_OK


def _say(text: str) -> None:
    _say_above(text)  # (above the progress line, when one is drawn)


def cmd_backup(c: Client, args: argparse.Namespace, out: Output) -> int:
    try:
        out.fields(backups.backup(c, args.dir, args.json, _say))
    except backups.BackupError as exc:
        raise UsageError(str(exc)) from None
    return EXIT_OK


def cmd_restore(c: Client, args: argparse.Namespace, out: Output) -> int:
    summary = backups.restore(c, args.dir, args.json, _say)
    out.fields(summary)
    return EXIT_ERROR if summary["failed"] else EXIT_OK


def cmd_load(c: Client, args: argparse.Namespace, out: Output, src: IO[bytes]) -> int:
    with _entries_progress("load", args) as p:
        if args.import_:
            summary = backups.import_snapshot(c, args.context, args.file, on_progress=_counter(p))
            p.done()
            out.fields(summary)
            return EXIT_OK
        h = c.load(args.context, src, fail_if_exists=args.fail_if_exists, on_progress=_counter(p))
        p.done()
    d = head_json(h)
    d["file"] = args.file
    out.fields(d)
    return EXIT_OK


def cmd_proof(c: Client, args: argparse.Namespace, out: Output) -> int:
    # the client verifies the path against the root (with a writer key: the root its writer signed)
    p = c.proof(args.context, args.seq, writer_key=_writer_key(args, c))
    page = c.get(args.context, after=args.seq - 1, limit=1)
    if not page.entries or page.entries[0].seq != args.seq:
        raise IntegrityError(f"the node proved entry #{args.seq} of {args.context!r} but did not return it")
    if page.entries[0].hash != p.leaf:
        raise IntegrityError(f"entry #{args.seq} of {args.context!r} does not hash to the proven leaf")
    d = {
        "context": p.context,
        "seq": p.seq,
        "size": p.size,
        "leaf": _hex(p.leaf),
        "root": _hex(p.root),
        "path": [_hex(x) for x in p.path],
        "verified": True,
    }
    if out.as_json:
        out.obj(d)
    else:
        d.pop("verified")
        out.fields(d)
        out.line("verified")
    return EXIT_OK


def cmd_verify(c: Client, args: argparse.Namespace, out: Output) -> int:
    writer_key = _writer_key(args, c)
    try:
        with _entries_progress("verify", args) as p:
            r = c.verify_context(args.context, writer_key=writer_key, on_progress=_counter(p))
            p.done()
    except RemoteProtocolError as exc:  # a malformed entry from the node
        raise IntegrityError(f"the node sent a malformed entry: {exc.message}") from None
    if out.as_json:
        obj = {"context": r["context"], "size": r["size"], "root": _hex(r["root"]), "verified": True}
        if "signed_size" in r:
            obj["signed_size"] = r["signed_size"]
        out.obj(obj)
    else:
        signed = (f"; signed by its writer up to #{r['signed_size']}" if "signed_size" in r else "")
        out.line(f"verified {r['context']}: {r['size']} entries, root {_hex(r['root'])}{signed}")
    damaged = c.head(args.context).damaged
    if damaged is not None:
        # what it serves is sound, but not all it held: say so, and fail
        print(f"ledger: context {args.context!r} is reported damaged by the node ({damaged}); what was verified "
              "is what it serves now", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


COMMANDS = {
    "get": cmd_get,
    "head": cmd_head,
    "contexts": cmd_contexts,
    "status": cmd_status,
    "snapshot": cmd_snapshot,
    "proof": cmd_proof,
    "verify": cmd_verify,
    "watch": cmd_watch,
    "merged": cmd_merged,
    "backup": cmd_backup,
    "restore": cmd_restore,
}


def _node_address(text: str) -> str:
    """HOST:PORT, or several with commas (the client fails over between them, in that order)."""
    out = []
    for item in text.split(","):
        try:
            address = normalize_address(item.strip())
        except ValueError as exc:
            raise UsageError(f"--node: {exc}") from None
        if address.startswith("tcp://"):
            port = address.rpartition(":")[2]
            if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
                raise UsageError(f"--node: port must be 1..65535, got {port!r}")
        out.append(address)
    return ",".join(out)


def _check_output(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write {path!r}: folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"cannot write {path!r}: it is a folder")


def _open_snapshot(args: argparse.Namespace) -> IO[bytes]:
    """The snapshot file of a load, its header checked (entries are checked while loading)."""
    try:
        src = open(args.file, "rb")
    except OSError as exc:
        raise UsageError(f"cannot read {args.file!r}: {exc.strerror or exc}") from None
    try:
        header, _ = read_snapshot(src)
        if args.import_ and args.fail_if_exists:
            raise UsageError("load: --import appends to a context, whether it exists or not: "
                             "--fail-if-exists does not apply")
        if header["context"] != args.context and not args.import_:
            # The client would refuse too, but as a generic error; say it plainly.
            raise UsageError(
                f"{args.file!r} is a snapshot of context {header['context']!r}, not {args.context!r} "
                "(entries are hashed with their context name and cannot be renamed)"
            )
        src.seek(0)
    except IntegrityError as exc:
        src.close()
        raise UsageError(f"{args.file!r}: {exc.message}") from None
    except BaseException:
        src.close()
        raise
    return src


def _keys(args: argparse.Namespace) -> dict[str, Any]:
    """The client's key and the node's public key, for a node with keys (`--key-file`, `--server-key`)."""
    from node.identity import IdentityError, read_key_file

    if args.key_file is None and args.server_key is None:
        return {}
    if args.key_file is None or args.server_key is None:
        raise UsageError("--key-file and --server-key go together (a node with keys needs this client's key and "
                         "its own public key)")
    try:
        return {"key": read_key_file(args.key_file), "server_key": parse_public_key(args.server_key, "--server-key")}
    except IdentityError as exc:
        raise UsageError(str(exc)) from None
    except KeyFileError as exc:
        raise UsageError(str(exc)) from None


def cmd_keygen(args: argparse.Namespace, out: Output) -> int:
    from node.identity import IdentityError, read_key_file, write_key_file

    try:
        if args.show:
            ident = read_key_file(args.file)
        else:
            ident = Identity.generate()
            write_key_file(args.file, ident, overwrite=args.force)
    except IdentityError as exc:
        raise UsageError(str(exc)) from None
    out.fields({"public_key": ident.public_hex, "file": args.file})
    if not args.show and not args.json:
        sys.stderr.write(f"{PROG}: wrote a secret key to {args.file} (mode 0600): keep it private\n")
    return 0


def run(args: argparse.Namespace, out: Output | None = None) -> int:
    """Run one parsed command; errors propagate (see `main`)."""
    out = out or Output(args.json)
    if args.command == "cluster":
        extra = list(args.node_args)
        if extra and extra[0] == "--":
            extra = extra[1:]
        if not 0 <= args.port_base <= 65535 - 10 * args.nodes:
            raise UsageError(f"--port-base {args.port_base} leaves no room for {args.nodes} nodes")
        try:
            return run_cluster(args.nodes, args.data, args.host, args.port_base, extra, out.stream, keys=args.keys)
        except ClusterError as exc:
            raise UsageError(str(exc)) from None
    if args.command == "keygen":
        return cmd_keygen(args, out)
    address = _node_address(args.node)
    # Local input first: a missing file is reported without waiting on a node.
    payload: bytes | None = None
    load_src: IO[bytes] | None = None
    if args.command == "append":
        if args.file is not None and not os.path.isfile(args.file):
            raise UsageError(f"cannot read --file {args.file!r}: no such file")
        if not args.lines:
            payload = _read_payload(args)
    elif args.command == "snapshot":
        _check_output(args.output)
    elif args.command == "load":
        load_src = _open_snapshot(args)
    elif args.command == "restore":
        try:
            backups.read_manifest(args.dir)  # a folder that is no backup: said before any node is asked
        except backups.BackupError as exc:
            raise UsageError(str(exc)) from None
    zctx: zmq.Context[Any] = zmq.Context()
    try:
        try:
            c = Client(address, timeout=args.timeout, zctx=zctx, **_keys(args))
        except zmq.ZMQError as exc:
            raise UsageError(f"--node: cannot connect to {address}: {exc.strerror}") from None
        try:
            # One ping without retry, so a node that is not there is reported
            # after --timeout, not after every retry of the real request.
            try:
                c.call("ping", retry=False)  # (past addresses where nothing listens, with several)
            except Unreachable:
                raise  # nothing listens there: keys have nothing to do with it
            except Timeout as exc:
                # a node with keys does not answer a client it does not let in: say so
                hint = ("; or it does not let this key in: is it in the node's client allowlist, and is "
                        "--server-key the node's public_key?" if args.key_file else
                        "; a node with keys answers only clients with an allowlisted key (--key-file, "
                        "--server-key)")
                raise Timeout(exc.message + hint, exc.details) from None
            if args.command == "append":
                return cmd_append(c, args, out, payload)
            if load_src is not None:
                return cmd_load(c, args, out, load_src)
            return COMMANDS[args.command](c, args, out)
        finally:
            c.close()
    finally:
        if load_src is not None:
            load_src.close()
        zctx.destroy(linger=0)


def main(argv: Sequence[str] | None = None) -> int:
    """The `ledger` console script. Returns the exit code."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    err = sys.stderr
    try:
        return run(args)
    except UsageError as exc:
        err.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    except LedgerError as exc:
        if getattr(args, "json", False):
            # --json: the error as one JSON object too, so a script reads one format
            obj = {"error": {**_jsonable(exc.details), "code": exc.code, "message": exc.message}}
            err.write(json.dumps(obj, separators=(",", ":")) + "\n")
        else:
            err.write(f"{PROG}: error: {exc}\n")  # "CODE: message"
        return EXIT_ERROR
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`ledger get c | head`): not an error worth a traceback.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return EXIT_ERROR
    except OSError as exc:  # writing the snapshot, reading stdin, ...
        err.write(f"{PROG}: error: {exc}\n")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
