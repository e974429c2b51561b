"""Identity: IP / netns inode → pod, service, node, at a given time."""

from __future__ import annotations

import os
import subprocess
import tracemalloc

import pytest

from connprobe.cluster.identity import IdentityCache, NetnsIndex, Workload, pod_uid_from_cgroup, workload_of
from connprobe.cluster.state import slim_endpoint_slice, slim_node, slim_pod
from tests.cluster import objects as o
from tests.cluster.apiserver import wait_until

pytestmark = pytest.mark.timeout(60)

UID = "3f9b7c1e-2d4a-4b8e-9f10-a1b2c3d4e5f6"
CID = "a" * 64


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- workloads


@pytest.mark.parametrize(
    ("owner", "labels", "expected"),
    [
        (("ReplicaSet", "api-5d8f7b9c4"), {"pod-template-hash": "5d8f7b9c4"}, Workload("Deployment", "api")),
        (("ReplicaSet", "bare-rs"), {}, Workload("ReplicaSet", "bare-rs")),
        (("StatefulSet", "db"), {}, Workload("StatefulSet", "db")),
        (("DaemonSet", "connprobe"), {}, Workload("DaemonSet", "connprobe")),
        (("Job", "backup-29000000"), {}, Workload("Job", "backup-29000000")),
        (None, {}, None),
    ],
)
def test_workload_of(owner, labels, expected):
    assert workload_of(slim_pod(o.pod("p", owner=owner, labels=labels))) == expected


# -- cgroup paths (shapes as kubelet, containerd and CRI-O write them)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # cgroup v2, systemd driver, containerd
        (
            f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/"
            f"cri-containerd-{CID}.scope\n",
            (UID, CID),
        ),
        # systemd driver, Guaranteed QoS, CRI-O
        (f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{CID}.scope\n", (UID, CID)),
        # CRI-O's conmon sits in the pod's cgroup (its netns is the host's: skipped by NetnsIndex)
        (
            f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice/"
            f"crio-conmon-{CID}.scope\n",
            (UID, None),
        ),
        # cgroupfs driver (v1 lines, several controllers)
        (
            f"12:memory:/kubepods/burstable/pod{UID}/{CID}\n11:cpu,cpuacct:/kubepods/burstable/pod{UID}/{CID}\n",
            (UID, CID),
        ),
        (f"0::/kubepods/pod{UID}/{CID}\n", (UID, CID)),
        # kind-style nesting under the kubelet's slice
        (
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
            f"kubelet-kubepods-besteffort-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n",
            (UID, CID),
        ),
        # the pod-level cgroup itself (the pause process on some setups)
        (
            f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice\n",
            (UID, None),
        ),
        # not pods
        ("0::/system.slice/containerd.service\n", None),
        ("0::/user.slice/user-0.slice/session-3.scope\n", None),
        ("0::/kubepods.slice/kubepods-burstable.slice\n", None),
        ("0::/system.slice/podman-1234.scope\n", None),
        ("", None),
    ],
)
def test_pod_uid_from_cgroup(text, expected):
    assert pod_uid_from_cgroup(text) == expected


def _fake_proc(root, processes, host_ns_target=None):
    """processes: pid -> (cgroup text, netns file key). Netns files are regular files (their inode plays the
    namespace inode) or symlinks to real namespace files."""
    inodes = {}
    for pid, (cgroup, ns) in processes.items():
        d = root / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "cgroup").write_text(cgroup)
        target = root / f"ns-{ns}" if not str(ns).startswith("/") else ns
        if not str(ns).startswith("/") and not target.exists():
            target.write_text("")
        (d / "ns" / "net").symlink_to(target)
        inodes[pid] = os.stat(target).st_ino
    return inodes


def _pod_cgroup(uid, cid=CID):
    slice_ = f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"
    return f"0::/kubepods.slice/kubepods-burstable.slice/{slice_}/cri-containerd-{cid}.scope\n"


def test_netns_index_on_a_fake_proc_tree(tmp_path):
    api_pod = slim_pod(
        o.pod("api-7f9c", owner=("ReplicaSet", "api-5d8f7b9c4"), labels={"pod-template-hash": "5d8f7b9c4"})
    )
    inodes = _fake_proc(
        tmp_path,
        {
            1: ("0::/init.scope\n", "host"),
            200: (_pod_cgroup(api_pod.uid), "pod-a"),  # pause
            201: (_pod_cgroup(api_pod.uid, "b" * 64), "pod-a"),  # app container, same netns
            300: (_pod_cgroup(api_pod.uid).replace("cri-containerd", "crio-conmon"), "host"),  # conmon
            400: ("0::/system.slice/sshd.service\n", "other"),
        },
    )
    (tmp_path / "self").symlink_to("1")
    (tmp_path / "meminfo").write_text("")
    assert NetnsIndex(tmp_path).scan() == {inodes[200]: api_pod.uid}
    clock = Clock()
    cache = IdentityCache(clock=clock)
    cache.on_change("pods", "ADDED", None, api_pod)
    cache.refresh_netns(NetnsIndex(tmp_path))
    ident = cache.netns(inodes[200])
    assert (ident.namespace, ident.name, ident.workload, ident.node) == (
        "payments",
        "api-7f9c",
        Workload("Deployment", "api"),
        "n1",
    )
    assert cache.describe(inodes[200]) == "pod payments/api-7f9c on node n1"
    assert cache.describe(inodes[400]) == f"netns {inodes[400]}"
    # the pod's processes exit: the namespace is no longer the pod's from now on, but was before
    before = clock.t
    clock.t += 10
    cache.refresh_netns({})
    assert cache.netns(inodes[200]) is None
    assert cache.netns(inodes[200], at=before).name == "api-7f9c"


def test_a_missing_proc_root_scans_to_nothing(tmp_path):
    assert NetnsIndex(tmp_path / "nope").scan() == {}


@pytest.mark.kernel
def test_netns_index_reads_the_inode_of_a_real_lab_namespace(lab, tmp_path):
    """A process in a lab namespace stands in for a pod's; its cgroup path (which a test cannot move into a
    kubepods slice) comes from the fake tree, its namespace inode from the kernel."""
    ns = lab.ns("srv1")
    proc = subprocess.Popen(["ip", "netns", "exec", ns.name, "sleep", "30"])
    try:
        wait_until(lambda: os.stat(f"/proc/{proc.pid}/ns/net").st_ino == os.stat(ns.path).st_ino)
        _fake_proc(
            tmp_path,
            {
                1: ("0::/init.scope\n", f"/proc/{os.getpid()}/ns/net"),
                proc.pid: (_pod_cgroup(UID), f"/proc/{proc.pid}/ns/net"),
            },
        )
        assert NetnsIndex(tmp_path).scan() == {ns.inode: UID}
        pod = slim_pod(o.pod("srv1-pod", uid=UID, node="n1"))
        cache = IdentityCache()
        cache.on_change("pods", "ADDED", None, pod)
        cache.refresh_netns(NetnsIndex(tmp_path))
        assert cache.describe(ns.inode) == "pod payments/srv1-pod on node n1"
        # the real /proc: the lab process is not in a pod, so nothing of it is claimed
        assert ns.inode not in NetnsIndex("/proc").scan()
    finally:
        proc.kill()
        proc.wait()


# -- IPs


def test_pod_ip_reuse_is_answered_for_the_time_asked(api, make_state):
    """Through the stand-in: the IP moves from one pod to another; lookups at the two times give the two pods."""
    clock = Clock(1000.0)
    state = make_state().start()
    assert state.wait_synced(10)
    cache = IdentityCache(clock=clock).follow(state)
    ip = "10.244.1.5"
    api.apply(o.pod("old-pod", ips=(ip, "fd00:10:244:1::5"), owner=("StatefulSet", "old")))
    wait_until(lambda: cache.lookup(ip) is not None)
    t_old = clock.t + 1
    clock.t = 1100.0
    api.delete("Pod", "payments", "old-pod")
    wait_until(lambda: cache.lookup(ip) is None)
    t_gap = clock.t + 1
    clock.t = 1200.0
    api.apply(o.pod("new-pod", ips=(ip,), owner=("DaemonSet", "new")))
    wait_until(lambda: cache.lookup(ip) is not None)
    t_new = clock.t + 1
    old, new = cache.lookup(ip, at=t_old), cache.lookup(ip, at=t_new)
    assert (old.name, old.workload, old.since, old.until) == ("old-pod", Workload("StatefulSet", "old"), 1000.0, 1100.0)
    assert (new.name, new.workload, new.since, new.until) == ("new-pod", Workload("DaemonSet", "new"), 1200.0, None)
    assert cache.lookup(ip, at=t_gap) is None
    assert cache.lookup("fd00:10:244:1:0::5", at=t_old).name == "old-pod"  # IPv6, any spelling
    assert cache.lookup("fd00:10:244:1::5", at=t_new) is None
    assert cache.describe(ip, at=t_old) == "pod payments/old-pod on node n1"
    assert cache.describe(ip, at=t_gap) == ip


def test_a_terminated_pod_no_longer_holds_its_ip():
    clock = Clock()
    cache = IdentityCache(clock=clock)
    running = slim_pod(o.pod("job-1", owner=("Job", "job")))
    cache.on_change("pods", "ADDED", None, running)
    clock.t += 5
    done = slim_pod(o.pod("job-1", owner=("Job", "job"), phase="Succeeded"))
    cache.on_change("pods", "MODIFIED", running, done)
    assert cache.lookup("10.244.1.5") is None
    hostnet = slim_pod(o.pod("node-exporter", ips=("192.0.2.1",), host_network=True))
    cache.on_change("pods", "ADDED", None, hostnet)
    assert cache.lookup("192.0.2.1") is None


def test_endpoint_slices_services_and_nodes(api, make_state):
    api.apply(o.pod("api-7f9c", owner=("ReplicaSet", "api-5d8f7b9c4"), labels={"pod-template-hash": "5d8f7b9c4"}))
    api.apply(o.service("api", cluster_ips=("10.96.0.10", "fd00:96::10")))
    api.apply(
        o.endpoint_slice(
            "api-x1", "api", [("10.244.1.5", "api-7f9c", "n1", True), ("10.244.2.7", "api-remote", "n2", False)]
        )
    )
    api.apply(o.endpoint_slice("api-admin-x1", "api-admin", [("10.244.1.5", "api-7f9c", "n1", True)]))
    api.apply(o.node("n2", internal_ip="192.0.2.2"))
    state = make_state().start()
    assert state.wait_synced(10)
    cache = IdentityCache().follow(state)
    local = cache.lookup("10.244.1.5")
    assert (local.kind, local.name, local.workload, local.node) == (
        "pod",
        "api-7f9c",
        Workload("Deployment", "api"),
        "n1",
    )
    assert local.services == ("payments/api", "payments/api-admin")
    remote = cache.lookup("10.244.2.7")  # a pod of another node, known from the EndpointSlice
    assert (remote.name, remote.namespace, remote.node, remote.services, remote.workload) == (
        "api-remote",
        "payments",
        "n2",
        ("payments/api",),
        None,
    )
    assert cache.describe("10.244.2.7") == "pod payments/api-remote on node n2"
    assert cache.describe("10.96.0.10") == cache.describe("fd00:96::10") == "service payments/api"
    assert cache.describe("192.0.2.2") == "node n2"
    assert cache.describe("203.0.113.9") == "203.0.113.9"
    assert cache.lookup("not-an-ip") is None
    # the slice drops the remote endpoint: from now on the address is nobody's
    api.apply(o.endpoint_slice("api-x1", "api", [("10.244.1.5", "api-7f9c", "n1", True)]))
    wait_until(lambda: cache.lookup("10.244.2.7") is None)
    assert cache.lookup("10.244.1.5").services == ("payments/api", "payments/api-admin")


def test_closed_spans_are_forgotten_after_the_retention():
    clock = Clock()
    cache = IdentityCache(clock=clock, retention=60)
    pod = slim_pod(o.pod("p"))
    cache.on_change("pods", "ADDED", None, pod)
    clock.t += 1
    cache.on_change("pods", "DELETED", pod, None)
    assert len(cache) == 1
    clock.t += 120
    cache.on_change("nodes", "ADDED", None, slim_node(o.node("n9", internal_ip="192.0.2.9")))
    assert len(cache) == 1  # only the node's address is left
    with pytest.raises(ValueError, match=r"^retention: "):
        IdentityCache(retention=0)


def measure_identity_cache(n_pods: int = 10_000) -> tuple[int, int, int]:
    """Bytes held by ClusterState-shaped slim records plus the identity cache for `n_pods` pods (each with an
    IPv4 and an IPv6 address, 3 labels, a Deployment owner) and one EndpointSlice entry each."""
    pods = [
        o.pod(
            f"web-{i:05d}-7f9c",
            namespace=f"ns-{i % 50}",
            ips=(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", f"fd00::{i:x}"),
            uid=f"00000000-0000-4000-8000-{i:012x}",
            owner=("ReplicaSet", f"web-{i % 200}-5d8f7b9c4"),
            labels={"app": f"web-{i % 200}", "pod-template-hash": "5d8f7b9c4", "tier": "frontend"},
            node=f"n{i % 100}",
        )
        for i in range(n_pods)
    ]
    slices = [
        o.endpoint_slice(
            f"svc-{j}-x",
            f"svc-{j}",
            [(p["status"]["podIP"], p["metadata"]["name"], "n2", True) for p in pods[j * 100 : (j + 1) * 100]],
            namespace=f"ns-{j % 50}",
        )
        for j in range(n_pods // 100)
    ]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        records = [slim_pod(p) for p in pods]
        eps = [slim_endpoint_slice(s) for s in slices]
        middle = tracemalloc.take_snapshot()
        cache = IdentityCache()
        for r in records:
            cache.on_change("pods", "ADDED", None, r)
        for s in eps:
            cache.on_change("endpointslices", "ADDED", None, s)
        after = tracemalloc.take_snapshot()
        held_records = sum(stat.size_diff for stat in middle.compare_to(before, "filename"))
        held_cache = sum(stat.size_diff for stat in after.compare_to(middle, "filename"))
        probe = pods[n_pods // 2]
        assert cache.lookup(probe["status"]["podIP"]).name == probe["metadata"]["name"]
        return held_records, held_cache, len(cache)
    finally:
        tracemalloc.stop()


def test_identity_cache_memory_at_10000_pods():
    records, cache, keys = measure_identity_cache(10_000)
    assert keys == 20_000
    # Recorded in BENCHMARKS.md; the bound only catches an order-of-magnitude regression.
    assert records + cache < 64 * 1024 * 1024
