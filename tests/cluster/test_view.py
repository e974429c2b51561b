"""ClusterView: verdicts naming pods, services and nodes (at probe time), bounded metrics, staleness."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry

from connprobe.cluster.state import Backoff, ClusterState, load_api_client
from connprobe.cluster.view import ClusterView, result_wall_time
from correlator.types import Cause, Verdict
from prober.types import Flow, ProbeKind, ProbeResult, Proto
from tests.cluster import objects as o
from tests.cluster.apiserver import wait_until

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _view(api, tmp_path, clock=time.time, proc=None) -> ClusterView:
    client = load_api_client(api.kubeconfig(tmp_path / "kubeconfig"))
    state = ClusterState(client, node_name="n1", watch_timeout=30, backoff=Backoff(base=0.02, cap=0.2))
    return ClusterView(state, proc_root=str(proc or tmp_path / "proc"), clock=clock)


def _verdict(address: str, netns: int, start_ns: int) -> Verdict:
    flow = Flow(Proto.TCP, "10.244.1.9", 40000, address, 8080, netns)
    r = ProbeResult("api", ProbeKind.TCP, f"{address}:8080", "host", start_ns, start_ns + 10**9, False,
                    address=address, flows=(flow,))
    facts = (f"probe to {address}:8080 failed", "our SYN was dropped by NETFILTER_DROP in netns 4026599999")
    return Verdict(r, Cause.POLICY_DROP, "policy_drop/syn", 0.9, "syn_dropped", (), facts,
                   f"api: dropped in netns 4026599999 on the way to {address}")


def test_a_verdict_names_the_pod_that_held_the_address_when_the_probe_ran(api, tmp_path):
    clock = Clock(1000.0)
    ip = "10.244.2.7"
    api.apply(o.pod("old-pod", node="n1", ips=(ip,), owner=("StatefulSet", "old")))
    api.apply(o.endpoint_slice("api-1", "api", [(ip, "old-pod", "n1", True)]))
    view = _view(api, tmp_path, clock).start()
    try:
        assert view.wait_synced(10)
        wait_until(lambda: view.who(ip) is not None)
        probe_at = 1000.5
        clock.t = 1100.0
        api.delete("Pod", "payments", "old-pod")
        api.apply(o.endpoint_slice("api-1", "api", []))
        wait_until(lambda: view.who(ip) is None)
        clock.t = 1200.0
        api.apply(o.pod("new-pod", node="n1", ips=(ip,), owner=("DaemonSet", "new")))
        wait_until(lambda: view.who(ip) is not None)

        before = view.name_verdict(_verdict(ip, 4026599999, 0), at=probe_at)
        after = view.name_verdict(_verdict(ip, 4026599999, 0), at=1200.5)
        assert before.facts[0] == f"probe to {ip}:8080 (pod payments/old-pod on node n1) failed"
        assert (f"destination {ip}: pod payments/old-pod on node n1 (workload statefulset/old; service payments/api)"
                in before.facts)
        assert f"destination {ip}: pod payments/new-pod on node n1 (workload daemonset/new)" in after.facts
        # an inode no pod of this node has stays as it was
        assert "in netns 4026599999" in before.facts[1] and "in netns 4026599999" in before.summary
        assert view.node_of(ip) == "n1" and view.node_of(ip, at=probe_at) == "n1"
        assert view.node_of("203.0.113.1") is None
        # bounded metric: namespace/workload/node/cause, never the pod's name or address
        view.observe(before, at=probe_at)
        view.observe(after, at=1200.5)
        view.observe(_verdict("203.0.113.1", 1, 0), at=1200.5)
        registry = CollectorRegistry()
        registry.register(view)
        got = registry.get_sample_value
        assert got("connprobe_cluster_verdicts_total", {"dst_namespace": "payments", "dst_workload": "statefulset/old",
                                                         "dst_node": "n1", "cause": "policy_drop"}) == 1
        assert got("connprobe_cluster_verdicts_total", {"dst_namespace": "", "dst_workload": "external",
                                                         "dst_node": "", "cause": "policy_drop"}) == 1
        names = {s.labels.get("dst_workload") for m in registry.collect() for s in m.samples}
        assert not any(n and ("old-pod" in n or ip in n) for n in names)
    finally:
        view.close()


def test_result_wall_time_converts_monotonic_stamps():
    r = _verdict("10.0.0.1", 1, 5_000_000_000).result
    assert result_wall_time(r, now=1000.0, now_ns=7_000_000_000) == 998.0


def test_readiness_and_watch_health_say_when_the_state_is_stale(api, tmp_path):
    api.apply(o.pod("api-1"))
    api.apply(o.service("api"))
    view = _view(api, tmp_path).start()
    registry = CollectorRegistry()
    registry.register(view)
    try:
        assert view.wait_synced(10)
        assert view.readiness() == "cluster state fresh: 1 pods on node n1, 1 services, 0 nodes"
        assert registry.get_sample_value("connprobe_cluster_watch_up", {"kind": "pods"}) == 1
        api.stop()
        api.drop_watches()
        wait_until(lambda: view.state.stale, 15)
        text = view.readiness()
        assert text.startswith("cluster state STALE since ") and text.endswith("; using the last known state")
        assert "cannot connect to the API server" in text or "connection to the API server lost" in text
        assert registry.get_sample_value("connprobe_cluster_state_stale") == 1
        wait_until(lambda: registry.get_sample_value("connprobe_cluster_watch_up", {"kind": "pods"}) == 0)
        assert view.who("10.244.1.5").name == "api-1"  # the last known state is kept
        api.start()
        wait_until(lambda: not view.state.stale, 15)
        assert view.readiness().startswith("cluster state fresh")
    finally:
        view.close()
