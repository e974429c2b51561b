"""The agent's view of its cluster: cluster state + identity, and what the rest of the app asks of them.

`ClusterView` owns a `ClusterState` (list+watch), an `IdentityCache` following it and a `NetnsIndex` for the
network namespaces of this node's pods (rescanned every `netns_refresh` seconds, and at once — at most once a
second — when a verdict names an inode it does not know). It answers:

- `node_of(ip, at)`: which node holds an address (a pod's node, or the node itself) — for cross-node evidence;
- `who(ip, at)` / `who_netns(inode, at)`: the `Identity` at probe time;
- `name_verdict(verdict)`: the verdict with its facts naming pods, services and nodes instead of bare IPs and
  netns inodes, plus a "destination: ..." (and "source: ...") fact;
- `netns_names()`: inode → "pod NS/NAME on node N" for the timelines of the status page and diagnose;
- `readiness()`: one line for `/-/ready` and the status page, saying when the state is stale;
- `collect()`: watch health and `connprobe_cluster_verdicts_total`, whose labels are bounded
  (destination namespace, workload or service, node, cause — never pod names, UIDs or IPs).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from connprobe.cluster.identity import Identity, IdentityCache, NetnsIndex
from connprobe.cluster.state import ClusterState
from correlator.types import Verdict
from prober.types import ProbeResult

log = logging.getLogger("connprobe.cluster")

_NETNS = re.compile(r"\bnetns (\d+)\b")
# Address-looking tokens in a fact, with their port if any: IPv4, [IPv6]:port, or a bare IPv6 (hex groups with
# at least two colons); each is checked by ipaddress before it is looked up.
_ADDR = re.compile(
    r"(?<![\w.:\[])(?P<v4>\d{1,3}(?:\.\d{1,3}){3})(?P<p4>:\d{1,5})?(?![\w.])"
    r"|\[(?P<v6b>[0-9A-Fa-f:.]{2,45})\](?P<p6>:\d{1,5})?"
    r"|(?<![\w:.\[])(?P<v6>[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7})(?![\w:\]])"
)
VERDICT_LABELS = ("dst_namespace", "dst_workload", "dst_node", "cause")


def result_wall_time(result: ProbeResult, *, now: float | None = None, now_ns: int | None = None) -> float:
    """The wall-clock time a result's probe started (its stamps are CLOCK_MONOTONIC)."""
    now = time.time() if now is None else now
    now_ns = time.monotonic_ns() if now_ns is None else now_ns
    return now - max(0, now_ns - result.start_ns) / 1e9


def workload_label(ident: Identity | None) -> tuple[str, str, str]:
    """(namespace, workload, node) for the bounded metric: a pod's workload ("deployment/api"; a bare pod
    counts as "pod"), a service as "service/NAME", a node as "node"; outside the cluster ("", "external", "")."""
    if ident is None:
        return "", "external", ""
    if ident.kind == "pod":
        return ident.namespace or "", str(ident.workload) if ident.workload else "pod", ident.node or ""
    if ident.kind == "service":
        return ident.namespace or "", f"service/{ident.name}", ""
    return "", "node", ident.name


class ClusterView:
    def __init__(
        self,
        state: ClusterState,
        *,
        proc_root: str = "/proc",
        netns_refresh: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.node_name = state.node_name
        self.identity = IdentityCache(clock=clock)
        self.netns_index = NetnsIndex(proc_root)
        self.netns_refresh = netns_refresh
        self._clock = clock
        self._stop = threading.Event()
        self._rescan_lock = threading.Lock()
        self._last_scan = 0.0
        self._thread: threading.Thread | None = None
        self._verdicts: Counter[tuple[str, ...]] = Counter()
        self._uid_inode: dict[str, int] = {}
        self.discovery_problems: tuple[str, ...] = ()  # set by the agent: Services with a bad annotation
        self._counts_lock = threading.Lock()

    # -- lifecycle
    def start(self) -> ClusterView:
        self.identity.follow(self.state)
        self.state.subscribe(self._on_pod_change)
        self.state.start()
        self._thread = threading.Thread(target=self._refresher, name="connprobe-cluster-netns", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.state.close()

    def wait_synced(self, timeout: float | None = None) -> bool:
        if not self.state.wait_synced(timeout):
            return False
        self.rescan_netns(force=True)
        return True

    def _on_pod_change(self, kind: str, etype: str, old: Any, new: Any) -> None:
        if kind == "pods" and etype == "ADDED":
            self._last_scan = 0.0  # a new pod of this node: its namespace is named at the next lookup

    def _refresher(self) -> None:
        while not self._stop.wait(self.netns_refresh):
            self.rescan_netns(force=True)

    def rescan_netns(self, force: bool = False) -> None:
        """Rescan /proc for pods' namespaces; without `force` at most once a second."""
        with self._rescan_lock:
            now = time.monotonic()
            if not force and now - self._last_scan < 1.0:
                return
            self._last_scan = now
            try:
                mapping = self.netns_index.scan()
                self._uid_inode = {uid: inode for inode, uid in mapping.items()}
                self.identity.refresh_netns(mapping)
            except Exception as e:  # a scan must never take the agent down
                log.warning("scanning %s for pods' namespaces failed: %s", self.netns_index.proc_root, e)

    # -- answers
    def who(self, ip: str, at: float | None = None) -> Identity | None:
        return self.identity.lookup(ip, at)

    def who_netns(self, inode: int, at: float | None = None) -> Identity | None:
        ident = self.identity.netns(inode, at)
        if ident is None and at is None:
            self.rescan_netns()
            ident = self.identity.netns(inode, at)
        return ident

    def node_of(self, ip: str, at: float | None = None) -> str | None:
        """The node that holds `ip` at time `at` (now by default): the node of the pod holding it, or the node
        whose address it is; None for a Service VIP, an address outside the cluster, or a pod of another node
        no EndpointSlice names."""
        ident = self.identity.lookup(ip, at)
        return ident.node if ident is not None else None

    def pod_netns(self) -> dict[str, int]:
        """Pod UID → network namespace inode, for this node's pods, from the last scan (rescanned if a second old)."""
        self.rescan_netns()
        return dict(self._uid_inode)

    def netns_names(self) -> dict[int, str]:
        """netns inode → "pod NS/NAME on node N" for the pods of this node known now (timelines)."""
        self.rescan_netns()
        out = {}
        for inode in self._netns_inodes():
            ident = self.identity.netns(inode)
            if ident is not None and ident.name:
                out[inode] = ident.describe()
        return out

    def _netns_inodes(self) -> list[int]:
        with self.identity._lock:  # the cache's keys: "netns:<inode>"
            keys = [k for k in self.identity._by_key if k.startswith("netns:")]
        return [int(k[6:]) for k in keys]

    # -- verdicts
    def name_verdict(self, v: Verdict, at: float | None = None) -> Verdict:
        """The verdict with pods, services and nodes named where known (at the time the probe ran)."""
        r = v.result
        at = result_wall_time(r) if at is None else at
        named: dict[str, str] = {}

        def ip_text(m: re.Match[str]) -> str:
            token = m.group("v4") or m.group("v6b") or m.group("v6")
            whole = m.group(0)
            if token not in named:
                try:
                    ipaddress.ip_address(token)
                except ValueError:
                    named[token] = ""
                else:
                    ident = self.who(token, at)
                    named[token] = f" ({ident.describe()})" if ident is not None else ""
            return whole + named[token]

        def netns_text(m: re.Match[str]) -> str:
            ident = self.who_netns(int(m.group(1)), at) or self.who_netns(int(m.group(1)))
            return f"{ident.describe()} (netns inode {m.group(1)})" if ident is not None and ident.name else m.group(0)

        def rewrite(text: str) -> str:
            return _NETNS.sub(netns_text, _ADDR.sub(ip_text, text))

        facts = [rewrite(f) for f in v.facts]
        extra = []
        if r.address:
            dst = self.who(r.address, at)
            if dst is not None:
                extra.append(f"destination {r.address}: {_long(dst)}")
        src_inode = next((f.netns for f in r.flows if f.netns), None)
        if src_inode:
            src = self.who_netns(src_inode, at) or self.who_netns(src_inode)
            if src is not None and src.name:
                extra.append(f"source: {_long(src)}")
        return replace(v, facts=(*facts, *extra), summary=rewrite(v.summary))

    def observe(self, v: Verdict, at: float | None = None) -> None:
        """Count a verdict by its destination's namespace, workload and node (bounded labels)."""
        r = v.result
        ident = None
        if r.address:
            ident = self.who(r.address, result_wall_time(r) if at is None else at)
        key = (*workload_label(ident), str(v.cause))
        with self._counts_lock:
            self._verdicts[key] += 1

    # -- health
    def readiness(self) -> str:
        """One line: whether the cluster state is synced, fresh or stale (and since when, and why)."""
        s = self.state
        if s.stale:
            since = time.strftime("%H:%M:%S UTC", time.gmtime(s.stale_since or 0))
            return f"cluster state STALE since {since} ({s.last_error}); using the last known state"
        if not s.synced:
            return "cluster state syncing (first list not done yet)"
        return (f"cluster state fresh: {len(s.pods())} pods on node {self.node_name}, {len(s.services())} services, "
                f"{len(s.nodes())} nodes")

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield from self.state.collect()
        fam = CounterMetricFamily(
            "connprobe_cluster_verdicts",
            "Verdicts by destination: namespace, workload (deployment/NAME, service/NAME, pod, node, external), "
            "node and cause. Bounded: never pod names, UIDs or IPs.",
            labels=list(VERDICT_LABELS),
        )
        with self._counts_lock:
            items = sorted(self._verdicts.items())
        for key, n in items:
            fam.add_metric(list(key), n)
        yield fam
        yield GaugeMetricFamily(
            "connprobe_discovery_invalid_services",
            "Services whose connprobe.io/* annotations are invalid (each named on the status page and in the log)",
            value=len(self.discovery_problems),
        )

    def describe(self) -> Iterator[Any]:
        return iter(())


def _long(ident: Identity) -> str:
    text = ident.describe()
    more = []
    if ident.workload is not None:
        more.append(f"workload {ident.workload}")
    if ident.services and ident.kind == "pod":
        more.append("service " + ", ".join(ident.services))
    return f"{text} ({'; '.join(more)})" if more else text

