"""`connprobe agent --kubernetes` in the lab: lab namespaces stand in for pods (tests/cluster/labpods.py), the
stand-in API server lists them; a NetworkPolicy-like nftables drop in the "destination pod" gives a verdict
naming that pod and its node, the metrics stay at workload level, and /-/ready says when the state is stale."""

from __future__ import annotations

import json

import pytest

from connprobe.lab.topology import role_addresses
from tests.agent.helpers import AgentProcess, http_get, last_recent, samples_named, wait_for, write_config
from tests.cluster import labpods

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(240)]


def _log(agent: AgentProcess) -> list[dict]:
    return [json.loads(x) for x in agent.log_json.read_text().splitlines()]


def test_agent_names_the_destination_pod_of_a_policy_drop(lab, api, tmp_path):
    labpods.seed(api)
    proc = labpods.fake_proc(tmp_path / "proc", lab)
    ledger = role_addresses("srv2")[0]
    cfg = write_config(tmp_path / "agent.yml", [
        {"name": "ledger", "module": "tcp", "target": f"{ledger}:8080", "source": f"netns {lab.ns('client').name}",
         "interval": "2s", "jitter": 0}], {"tcp": {"prober": "tcp", "timeout": "1.5s"}})
    agent = AgentProcess(cfg, tmp_path, "--kubernetes", "--kubernetes.kubeconfig",
                         api.kubeconfig(tmp_path / "kubeconfig"), "--kubernetes.node", labpods.NODE,
                         "--kubernetes.proc", str(proc))
    try:
        agent.start()
        wait_for(lambda: "cluster state fresh" in http_get(agent.url + "/-/ready")[1], 20, "a synced cluster state")
        assert http_get(agent.url + "/-/ready")[1].strip() == (
            "connprobe agent is Ready (kernel sensor attached). cluster state fresh: 3 pods on node n1, "
            "2 services, 2 nodes.")
        wait_for(lambda: (last_recent(agent, "ledger") or {}).get("cause") == "ok", 20, "ledger healthy")
        with lab.policy_drop("srv2", direction="in", port=8080):
            last = wait_for(lambda: (d := last_recent(agent, "ledger")) and d["cause"] == "policy_drop" and d, 30,
                            "a policy_drop verdict")
        facts = last["facts"]
        inode = lab.ns("srv2").inode
        assert any(f"in pod payments/ledger-0 on node n1 (netns inode {inode})" in f for f in facts), facts
        assert (f"destination {ledger}: pod payments/ledger-0 on node n1 (workload statefulset/ledger; "
                "service payments/ledger)") in facts
        assert any(f.startswith("source: pod frontend/web-5d8f7b9c4-x2x7q on node n1 (workload deployment/web")
                   for f in facts), facts
        assert "pod payments/ledger-0 on node n1" in last["summary"]
        # the JSON log carries the same names
        logged = [x for x in _log(agent) if x["cause"] == "policy_drop"]
        assert logged and any("pod payments/ledger-0" in f for f in logged[-1]["facts"])
        # metrics: workload level (a series per destination workload, node and cause), no pod names or IPs
        m = agent.metrics()
        assert samples_named(m, "connprobe_cluster_verdicts_total", dst_namespace="payments",
                             dst_workload="statefulset/ledger", dst_node="n1", cause="policy_drop")
        series = samples_named(m, "connprobe_cluster_verdicts_total")
        assert series and all("ledger-0" not in v and ledger not in v for key in series for _, v in key)
        assert samples_named(m, "connprobe_cluster_watch_up", kind="pods") == {frozenset({("kind", "pods")}): 1.0}
        # the status page names the pods in the timeline and says the cluster state
        code, page = http_get(agent.url + "/")
        assert code == 200 and "cluster state fresh" in page and "in pod payments/ledger-0 on node n1" in page
        # the API server goes away: still ready (probes run on the last known state), but it says so
        api.stop()
        api.drop_watches()
        wait_for(lambda: "cluster state STALE since" in http_get(agent.url + "/-/ready")[1], 30, "stale state")
        code, text = http_get(agent.url + "/-/ready")
        assert code == 200 and "using the last known state" in text
        assert samples_named(agent.metrics(), "connprobe_cluster_state_stale") == {frozenset(): 1.0}
    finally:
        rc = agent.stop()
    assert rc == 0, agent.stderr()[-3000:]


def test_agent_kubernetes_flags_fail_with_one_line(tmp_path):
    import subprocess
    import sys

    cfg = write_config(tmp_path / "agent.yml", [], None)
    base = [sys.executable, "-m", "connprobe.cli", "agent", "--config", str(cfg), "--no-kernel", "--kubernetes"]
    out = subprocess.run([*base, "--kubernetes.kubeconfig", str(tmp_path / "nope"), "--kubernetes.node", "n1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"connprobe agent: --kubernetes: kubeconfig {tmp_path / 'nope'}: "
        + out.stderr.split(f"kubeconfig {tmp_path / 'nope'}: ", 1)[1].strip()]
    out = subprocess.run(base, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and out.stderr.strip() == (
        "connprobe agent: --kubernetes needs this node's name: --kubernetes.node NAME or $NODE_NAME")


def test_selector_source_and_service_target_follow_pods_as_they_come_and_go(lab, api, tmp_path):
    labpods.seed(api, roles=("srv1", "srv2"))  # the frontend pod is not there yet
    proc = labpods.fake_proc(tmp_path / "proc", lab)
    cfg = write_config(tmp_path / "agent.yml", [
        {"name": "to-api", "module": "tcp", "target": "svc/payments/api:http", "endpoints": True,
         "source": {"namespace": "frontend", "selector": {"app": "web"}}, "interval": "2s", "jitter": 0}],
        {"tcp": {"prober": "tcp", "timeout": "1.5s"}})
    agent = AgentProcess(cfg, tmp_path, "--kubernetes", "--kubernetes.kubeconfig",
                         api.kubeconfig(tmp_path / "kubeconfig"), "--kubernetes.node", labpods.NODE,
                         "--kubernetes.proc", str(proc))
    pod = labpods.PODS["client"][1]
    vip_probe, ep_probe = f"to-api@{pod}", f"to-api@{pod}~{labpods.PODS['srv1'][1]}"
    try:
        agent.start()
        wait_for(lambda: "cluster state fresh" in http_get(agent.url + "/-/ready")[1], 20, "a synced cluster state")
        assert not samples_named(agent.metrics(), "probe_success")
        api.apply(labpods.pod_object("client"))
        for name in (vip_probe, ep_probe):
            wait_for(lambda n=name: (last_recent(agent, n) or {}).get("cause") == "ok", 30, f"{name} healthy")
        m = agent.metrics()
        source = lab.ns("client").name
        assert samples_named(m, "probe_success", probe=vip_probe, target="10.96.0.10:80", source=source)
        endpoint = f"{role_addresses('srv1')[0]}:8080"
        assert samples_named(m, "probe_success", probe=ep_probe, target=endpoint, source=source)
        last = last_recent(agent, vip_probe)
        assert "destination 10.96.0.10: service payments/api" in last["facts"]
        # the pod goes: its probes and their series go
        api.delete("Pod", "frontend", pod)
        wait_for(lambda: not samples_named(agent.metrics(), "probe_success"), 30, "the pod's series to go")
        assert http_get(agent.url + "/")[0] == 200
    finally:
        rc = agent.stop()
    assert rc == 0, agent.stderr()[-3000:]
    assert ": 2 probes (2 added, 0 removed, 0 changed)" in agent.stderr()  # the reload the cluster asked for
