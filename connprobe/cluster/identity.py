"""Who an address or a network namespace belongs to, at a given time.

`IdentityCache` maps an IP (IPv4 or IPv6) or a netns inode to an `Identity`: a pod (namespace, name, UID,
workload, the services whose EndpointSlices list it, its node), a Service VIP, or a node. It is fed by
`ClusterState`'s change callbacks, from several sources with a precedence (as cilium's ipcache):

    pods of this node  >  pods named by EndpointSlices (other nodes)  >  Service cluster IPs  >  node addresses

Each source owns its entries, so an entry ends when its owner says so. Every entry is a time span: the
address was held by that pod from when the agent saw it take the address until it saw it let go (pod deleted,
terminated, or its IP changed). `lookup(ip, at=t)` answers with the holder *at time t*, so a probe is labelled
with the pod that held the address when the probe ran, even after the IP moved to another pod. Closed spans
are forgotten after `retention` seconds.

`NetnsIndex` maps network namespace inodes to pod UIDs for the pods of this node, from `/proc/<pid>/ns/net`
and the pod UID in `/proc/<pid>/cgroup` (`pod_uid_from_cgroup`: systemd and cgroupfs drivers, containerd,
CRI-O and Docker path shapes). The `/proc` root is a parameter, so tests use a fake tree.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from connprobe.cluster.state import (
    ENDPOINT_SLICE,
    NODE,
    POD,
    SERVICE,
    EndpointSliceInfo,
    NodeInfo,
    PodInfo,
    ServiceInfo,
)

log = logging.getLogger("connprobe.cluster")

RANK_LOCAL_POD, RANK_ENDPOINT_POD, RANK_SERVICE, RANK_NODE = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Workload:
    kind: str  # Deployment, StatefulSet, DaemonSet, Job, ReplicaSet, CronJob ...
    name: str

    def __str__(self) -> str:
        return f"{self.kind.lower()}/{self.name}"


@dataclass(frozen=True, slots=True)
class Identity:
    kind: str  # "pod", "service" or "node"
    name: str
    namespace: str | None = None
    uid: str | None = None
    workload: Workload | None = None
    services: tuple[str, ...] = ()  # "namespace/name"
    node: str | None = None
    since: float | None = None  # when the agent saw the address (or netns) taken
    until: float | None = None  # when it saw it let go; None: still held

    def describe(self) -> str:
        if self.kind == "pod":
            who = f"pod {self.namespace}/{self.name}" if self.name else f"pod with UID {self.uid}"
            return f"{who} on node {self.node}" if self.node else who
        if self.kind == "service":
            return f"service {self.namespace}/{self.name}"
        return f"node {self.name}"


def workload_of(pod: PodInfo) -> Workload | None:
    """The workload owning a pod: a ReplicaSet's Deployment (the name without the pod-template-hash),
    a StatefulSet, DaemonSet, Job, or whatever else controls it."""
    if not pod.owner_kind or not pod.owner_name:
        return None
    if pod.owner_kind == "ReplicaSet":
        template_hash = pod.labels.get("pod-template-hash")
        if template_hash and pod.owner_name.endswith("-" + template_hash):
            return Workload("Deployment", pod.owner_name[: -len(template_hash) - 1])
    return Workload(pod.owner_kind, pod.owner_name)


class _Span:
    __slots__ = ("end", "identity", "owner", "rank", "start")

    def __init__(self, start: float, rank: int, owner: tuple[str, str], identity: Identity) -> None:
        self.start, self.end, self.rank, self.owner, self.identity = start, None, rank, owner, identity


def _norm_ip(ip: str) -> str | None:
    try:
        norm = ipaddress.ip_address(ip.split("%", 1)[0]).compressed
    except ValueError:
        return None
    return ip if norm == ip else norm  # share the record's string when it is already canonical


def _netns_key(inode: int) -> str:
    return f"netns:{inode}"


class IdentityCache:
    """IP / netns inode → `Identity`, with the time span each was held. Thread-safe.

    Feed it with `state.subscribe(cache.on_change)` (it also reads what the state already holds), and with
    `refresh_netns(netns_index)` for the network namespaces of this node's pods.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time, retention: float = 900.0) -> None:
        if not retention > 0:
            raise ValueError(f"retention: must be a positive number of seconds, got {retention!r}")
        self._clock = clock
        self._retention = retention
        self._lock = threading.Lock()
        self._by_key: dict[str, tuple[_Span, ...]] = {}  # tuples: most addresses have one span
        self._open: dict[tuple[str, str], dict[str, _Span]] = {}
        self._local_pods: dict[str, PodInfo] = {}
        self._last_prune = clock()

    # -- feeding
    def follow(self, state) -> IdentityCache:
        """Subscribe to `state`, taking in what it already holds first."""
        state.subscribe(self.on_change, replay=True)
        return self

    def on_change(self, kind: str, etype: str, old, new) -> None:
        obj = new if new is not None else old
        if kind == POD:
            self._pod(obj, deleted=new is None)
        elif kind == ENDPOINT_SLICE:
            self._endpoint_slice(obj, deleted=new is None)
        elif kind == SERVICE:
            self._service(obj, deleted=new is None)
        elif kind == NODE:
            self._node(obj, deleted=new is None)

    def _pod(self, pod: PodInfo, deleted: bool) -> None:
        with self._lock:
            if deleted:
                self._local_pods.pop(pod.uid, None)
            else:
                self._local_pods[pod.uid] = pod
        entries: dict[str, Identity] = {}
        if not deleted and pod.holds_ips:
            ident = Identity("pod", pod.name, pod.namespace, pod.uid, workload_of(pod), node=pod.node or None)
            for ip in pod.ips:
                if (key := _norm_ip(ip)) is not None:
                    entries[key] = ident
        self._set(("pod", pod.uid), RANK_LOCAL_POD, entries)

    def _endpoint_slice(self, eps: EndpointSliceInfo, deleted: bool) -> None:
        entries: dict[str, Identity] = {}
        if not deleted:
            services = (f"{eps.namespace}/{eps.service}",) if eps.service else ()
            for ep in eps.endpoints:
                if not ep.pod_name:
                    continue
                ident = Identity("pod", ep.pod_name, ep.pod_namespace, ep.pod_uid, services=services, node=ep.node)
                for ip in ep.addresses:
                    if (key := _norm_ip(ip)) is not None:
                        entries[key] = ident
        self._set(("eps", f"{eps.namespace}/{eps.name}"), RANK_ENDPOINT_POD, entries)

    def _service(self, svc: ServiceInfo, deleted: bool) -> None:
        entries: dict[str, Identity] = {}
        if not deleted:
            ident = Identity("service", svc.name, svc.namespace, svc.uid, services=(f"{svc.namespace}/{svc.name}",))
            for ip in svc.cluster_ips:
                if (key := _norm_ip(ip)) is not None:
                    entries[key] = ident
        self._set(("svc", f"{svc.namespace}/{svc.name}"), RANK_SERVICE, entries)

    def _node(self, node: NodeInfo, deleted: bool) -> None:
        entries: dict[str, Identity] = {}
        if not deleted:
            ident = Identity("node", node.name, uid=node.uid, node=node.name)
            for type_, address in node.addresses:
                if type_ in ("InternalIP", "ExternalIP") and (key := _norm_ip(address)) is not None:
                    entries[key] = ident
        self._set(("node", node.name), RANK_NODE, entries)

    def refresh_netns(self, netns: NetnsIndex | Mapping[int, str]) -> None:
        """Take the current netns inode → pod UID map (a `NetnsIndex` is scanned now)."""
        mapping = netns.scan() if isinstance(netns, NetnsIndex) else netns
        with self._lock:
            pods = dict(self._local_pods)
        entries: dict[str, Identity] = {}
        for inode, uid in mapping.items():
            pod = pods.get(uid)
            if pod is None:
                entries[_netns_key(inode)] = Identity("pod", "", uid=uid)
            else:
                entries[_netns_key(inode)] = Identity(
                    "pod", pod.name, pod.namespace, pod.uid, workload_of(pod), node=pod.node or None
                )
        self._set(("netns", ""), RANK_LOCAL_POD, entries)

    def _set(self, owner: tuple[str, str], rank: int, entries: dict[str, Identity]) -> None:
        now = self._clock()
        with self._lock:
            current = self._open.get(owner, {})
            for key, span in list(current.items()):
                if entries.get(key) != span.identity:
                    span.end = now
                    del current[key]
            for key, ident in entries.items():
                if key not in current:
                    span = _Span(now, rank, owner, ident)
                    current[key] = span
                    self._by_key[key] = (*self._by_key.get(key, ()), span)
            if current:
                self._open[owner] = current
            else:
                self._open.pop(owner, None)
            if now - self._last_prune >= min(60.0, self._retention):
                self._prune(now)

    def _prune(self, now: float) -> None:
        horizon = now - self._retention
        for key in list(self._by_key):
            held = self._by_key[key]
            spans = tuple(s for s in held if s.end is None or s.end >= horizon)
            if not spans:
                del self._by_key[key]
            elif len(spans) != len(held):
                self._by_key[key] = spans
        self._last_prune = now

    # -- answers
    def lookup(self, ip: str, at: float | None = None) -> Identity | None:
        """Who held `ip` at time `at` (default: now); None when nobody the agent knows of."""
        key = _norm_ip(ip)
        return None if key is None else self._lookup(key, at)

    def netns(self, inode: int, at: float | None = None) -> Identity | None:
        """The pod whose network namespace had inode `inode` at time `at` (pods of this node)."""
        return self._lookup(_netns_key(inode), at)

    def _lookup(self, key: str, at: float | None) -> Identity | None:
        at = self._clock() if at is None else at
        with self._lock:
            held = [s for s in self._by_key.get(key, ()) if s.start <= at and (s.end is None or at < s.end)]
        if not held:
            return None
        best = min(held, key=lambda s: (s.rank, -s.start))
        ident = best.identity
        if ident.kind == "pod":
            services = {
                svc
                for s in held
                if s.rank == RANK_ENDPOINT_POD and (s.identity.uid == ident.uid or not s.identity.uid)
                for svc in s.identity.services
            }
            node = ident.node or next((s.identity.node for s in held if s.identity.node), None)
            ident = replace(ident, services=tuple(sorted(services)), node=node)
        return replace(ident, since=best.start, until=best.end)

    def describe(self, ip_or_inode: str | int, at: float | None = None) -> str:
        """Human text for a verdict: "pod payments/api-7f9c on node n2", "service ns/name", "node n2";
        the bare address or "netns N" when unknown."""
        if isinstance(ip_or_inode, int):
            ident = self.netns(ip_or_inode, at)
            return ident.describe() if ident else f"netns {ip_or_inode}"
        ident = self.lookup(ip_or_inode, at)
        return ident.describe() if ident else str(ip_or_inode)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_key)


# ---------------------------------------------------------------------------------------------------------
# netns inode → pod UID


_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32}"
# A path component naming the pod: "pod<uid>" (cgroupfs) or "kubepods-<qos>-pod<uid>.slice" (systemd).
_POD_COMPONENT = re.compile(rf"^(?:.*-)?pod({_UID})(?:\.slice)?$")
_CONTAINER = re.compile(
    r"(?:^|[-:])(?:cri-containerd|crio|docker|cri-dockerd)[-:]([0-9a-f]{64})(?:\.scope)?$|^([0-9a-f]{64})$"
)


def pod_uid_from_cgroup(text: str) -> tuple[str, str | None] | None:
    """(pod UID, container ID or None) from the text of /proc/<pid>/cgroup, or None for a process not in a pod.

    Handles cgroup v1 and v2 lines and both kubelet cgroup drivers:
      systemd:  /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/
                cri-containerd-<id>.scope   (CRI-O: crio-<id>.scope; crio-conmon-<id>.scope is CRI-O's monitor)
      cgroupfs: /kubepods/burstable/pod<uid>/<id>   (Guaranteed pods: /kubepods/pod<uid>/<id>)
    """
    for line in text.splitlines():
        path = line.split(":", 2)[-1].strip()
        if "pod" not in path:
            continue
        parts = [p for p in path.split("/") if p]
        for i, part in enumerate(parts):
            # kind-style nesting puts "<slice>:cri-containerd:<id>" in one component
            head = part.split(":", 1)[0]
            match = _POD_COMPONENT.match(head)
            if not match:
                continue
            uid = match.group(1).replace("_", "-")
            container = None
            rest = parts[i + 1 :] or ([part.split(":", 1)[1]] if ":" in part else [])
            if rest:
                c = _CONTAINER.search(rest[-1])
                if c:
                    container = c.group(1) or c.group(2)
            return uid, container
    return None


class NetnsIndex:
    """Network namespace inode → pod UID for the pods of this node, by scanning `<proc_root>/*`.

    A process in the host's network namespace (that of PID 1, or of this process when PID 1's cannot be read:
    the agent runs with the host network) is skipped: CRI-O's conmon, host-network pods.
    """

    def __init__(self, proc_root: str | os.PathLike[str] = "/proc") -> None:
        self.proc_root = Path(proc_root)

    def _inode(self, pid: str) -> int | None:
        try:
            return os.stat(self.proc_root / pid / "ns" / "net").st_ino
        except OSError:
            return None

    def scan(self) -> dict[int, str]:
        host = self._inode("1") or self._inode("self")
        found: dict[int, str] = {}
        try:
            entries = [e.name for e in os.scandir(self.proc_root) if e.name.isdigit()]
        except OSError as e:
            log.warning("cannot list %s: %s", self.proc_root, e.strerror)
            return found
        for pid in entries:
            try:
                text = (self.proc_root / pid / "cgroup").read_text(errors="replace")
            except OSError:
                continue  # gone, or not ours to read
            parsed = pod_uid_from_cgroup(text)
            if parsed is None:
                continue
            inode = self._inode(pid)
            if inode is None or inode == host:
                continue
            uid = parsed[0]
            if found.setdefault(inode, uid) != uid:
                log.warning("netns %d is shared by pods %s and %s; keeping the first", inode, found[inode], uid)
        return found
