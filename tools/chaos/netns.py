"""Network partitions: each node in its own network namespace, cut apart with iptables.

Needs root, iproute2 and iptables (`partition_support` says why not, in one
sentence, when they are missing). The harness stays on the bridge and reaches
every node whatever the partition: a partition cuts node-to-node traffic only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable

from .common import ChaosError

NS_PORT = 7400            # in a namespace every node has its own port space


def partition_support() -> str | None:
    """None when partitions can run here, else why not (for one clear message)."""
    if os.geteuid() != 0:
        return "network partitions need root (network namespaces and iptables)"
    missing = [t for t in ("ip", "iptables") if shutil.which(t) is None]
    if missing:
        return f"network partitions need {' and '.join(missing)} (iproute2, iptables) on the PATH"
    probe = f"lcprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    try:
        r = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-w", "-S"], capture_output=True, text=True)
        if r.returncode != 0:
            return f"iptables does not work in a network namespace: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Netns:
    """Each node in its own network namespace, joined by a bridge in the harness's.

    Node i listens on 10.213.K.i; the bridge holds .254, so the harness (and
    its clients) reach every node whatever the partition: a partition cuts
    node-to-node traffic only, with iptables DROP rules inside the namespaces
    of both sides (no REJECT: a partition looks like silence, not an error).
    Nothing is routed anywhere but this /24, which exists only here."""

    def __init__(self, count: int) -> None:
        pid = os.getpid()
        self.tag = f"lc{pid}"
        self.bridge = f"{self.tag}br"
        self.names = [f"ledger-chaos-{pid}-n{i}" for i in range(1, count + 1)]
        self.subnet = self._free_subnet(pid)
        self.ips = [f"{self.subnet}.{i}" for i in range(1, count + 1)]
        self.created: list[str] = []
        self.bridge_up = False

    @staticmethod
    def _free_subnet(pid: int) -> str:
        used = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
        for k in range(250):
            cand = f"10.213.{(pid + k) % 250 + 1}"
            if f" {cand}." not in used:
                return cand
        raise ChaosError("no free 10.213.x.0/24 subnet for the namespaces")

    @staticmethod
    def _ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise ChaosError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def setup(self) -> None:
        self._ip("link", "add", self.bridge, "type", "bridge")
        self.bridge_up = True
        self._ip("addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for i, (ns, ip) in enumerate(zip(self.names, self.ips, strict=True), start=1):
            self._ip("netns", "add", ns)
            self.created.append(ns)
            host_end = f"{self.tag}v{i}"
            self._ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._ip("link", "set", host_end, "master", self.bridge)
            self._ip("link", "set", host_end, "up")
            self._ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
            self._ip("-n", ns, "link", "set", "lo", "up")

    def _iptables(self, ns: str, *args: str) -> None:
        r = subprocess.run(["ip", "netns", "exec", ns, "iptables", "-w", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise ChaosError(f"iptables {' '.join(args)} in {ns}: {r.stderr.strip()}")

    def cut(self, side: Iterable[int]) -> None:
        """Drop all traffic between the nodes of `side` (indexes) and every other node."""
        a = set(side)
        b = [i for i in range(len(self.names)) if i not in a]
        for i in a:
            for j in b:
                for x, y in ((i, j), (j, i)):
                    self._iptables(self.names[x], "-A", "INPUT", "-s", self.ips[y], "-j", "DROP")
                    self._iptables(self.names[x], "-A", "OUTPUT", "-d", self.ips[y], "-j", "DROP")

    def heal(self) -> None:
        for ns in self.names:
            self._iptables(ns, "-F")

    def teardown(self) -> list[str]:
        errors = []
        # Delete the veth pairs first: a namespace that is gone from `ip netns` can
        # linger in the kernel a while, its veths (and their host ends) with it.
        for i in range(1, len(self.created) + 1):
            subprocess.run(["ip", "link", "del", f"{self.tag}v{i}"], capture_output=True)
        for ns in self.created:
            r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if r.returncode != 0:
                errors.append(f"ip netns del {ns}: {r.stderr.strip()}")
        self.created = []
        if self.bridge_up:
            r = subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, text=True)
            if r.returncode != 0:
                errors.append(f"ip link del {self.bridge}: {r.stderr.strip()}")
            self.bridge_up = False
        return errors
