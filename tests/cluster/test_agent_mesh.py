"""`connprobe agent --kubernetes.mesh K` in the lab: real peer agents listen inside lab namespaces (srv1, srv2
stand in for nodes n2, n3 of the stand-in API server); the agent probes their /-/healthy from the client
namespace (--kubernetes.mesh-source), creates and removes the peer probes as Node objects appear, disappear and go
NotReady, and asks the lab's DNS server through the node's resolv.conf and through the cluster DNS Service.
Traffic goes only to lab namespaces (and the stand-in API server on loopback)."""

from __future__ import annotations

import sys

import pytest

from connprobe.lab.topology import role_addresses
from tests.agent.helpers import (
    REPO,
    AgentProcess,
    Daemon,
    free_port,
    http_get,
    last_recent,
    samples_named,
    wait_for,
    write_config,
)
from tests.cluster import objects as o

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(240)]


def _peer_series(agent: AgentProcess) -> set[str]:
    return {dict(k)["probe"] for k in samples_named(agent.metrics(), "probe_success")
            if dict(k)["probe"].startswith("mesh/node/")}


def _peer(lab, role: str, port: int, tmp_path) -> Daemon:
    cfg = write_config(tmp_path / f"peer-{role}.yml", [])
    argv = ["ip", "netns", "exec", lab.ns(role).name, "env", f"PYTHONPATH={REPO}", sys.executable, "-m",
            "connprobe.cli", "agent", "--config", str(cfg), "--no-kernel", "--no-config-watch",
            "--listen", f"{role_addresses(role)[0]}:{port}"]
    return Daemon(f"peer-{role}", argv, tmp_path).start()


def test_agent_probes_its_peers_health_and_follows_nodes(lab, api, tmp_path):
    port = free_port()  # the agent's port; its peers listen on the same one in their namespaces (as a DaemonSet)
    dns = role_addresses("dns")[0]
    resolv = tmp_path / "node-resolv.conf"
    resolv.write_text(f"nameserver {dns}\n")  # the node's resolver: the lab's DNS server, not the host's
    api.apply(o.node("n1", internal_ip="127.0.0.1"))
    api.apply(o.node("n2", internal_ip=role_addresses("srv1")[0]))
    api.apply(o.node("n3", internal_ip=role_addresses("srv2")[0]))
    api.apply(o.service("kube-dns", namespace="kube-system", cluster_ips=(dns,), ports=(("dns", 53),)))
    cfg = write_config(tmp_path / "agent.yml", [])
    agent = AgentProcess(cfg, tmp_path, "--no-kernel", "--kubernetes", "--kubernetes.kubeconfig",
                         api.kubeconfig(tmp_path / "kubeconfig"), "--kubernetes.node", "n1",
                         "--kubernetes.proc", str(tmp_path / "proc"), "--kubernetes.mesh", "2",
                         "--kubernetes.mesh-interval", "1s",
                         "--kubernetes.mesh-source", f"netns {lab.ns('client').name}",
                         "--kubernetes.resolv-conf", str(resolv), "--kubernetes.dns-name", "srv1.lab.test",
                         port=port)
    peers = [_peer(lab, "srv1", port, tmp_path), _peer(lab, "srv2", port, tmp_path)]
    try:
        agent.start()
        for name in ("mesh/node/n2", "mesh/node/n3", "mesh/dns-node", "mesh/dns-pod"):
            wait_for(lambda n=name: (last_recent(agent, n) or {}).get("cause") == "ok", 60, f"{name} ok")
        m = agent.metrics()
        source = lab.ns("client").name
        target = f"http://{role_addresses('srv1')[0]}:{port}/-/healthy"
        assert samples_named(m, "probe_success", probe="mesh/node/n2", target=target, source=source)
        assert samples_named(m, "connprobe_probe_labels", probe="mesh/node/n2", peer_node="n2", mesh="node")
        assert samples_named(m, "probe_success", probe="mesh/dns-node", target=f"{dns}:53")
        # a peer agent that stops answering fails its probe (it was the agent answering, not anything else)
        peers[1].stop()
        wait_for(lambda: (last_recent(agent, "mesh/node/n3") or {}).get("cause") not in (None, "ok"), 30,
                 "mesh/node/n3 failing")
        # n3 goes NotReady: its probe and series go; back to Ready: they come back
        api.apply(o.node("n3", ready=False, internal_ip=role_addresses("srv2")[0]))
        wait_for(lambda: _peer_series(agent) == {"mesh/node/n2"}, 30, "n3's series to go")
        api.apply(o.node("n3", internal_ip=role_addresses("srv2")[0]))
        wait_for(lambda: _peer_series(agent) == {"mesh/node/n2", "mesh/node/n3"}, 30, "n3's series back")
        # n2 leaves the cluster: its probe goes
        api.delete("Node", None, "n2")
        wait_for(lambda: _peer_series(agent) == {"mesh/node/n3"}, 30, "n2's series to go")
        code, page = http_get(agent.url + "/")  # the status page says what the mesh lacks now
        assert code == 200
        assert "mesh: 1 of 2 peers (nodes besides this one: 1, Ready with an address: 1)" in page
        assert "mesh/api: service default/kubernetes does not exist" in page
    finally:
        rc = agent.stop()
        for p in peers:
            p.stop()
    assert rc == 0, agent.stderr()[-3000:]
    # the agent itself listens on loopback here (the test reaches it there): it says its peers could not reach it
    assert "--kubernetes.mesh: this agent listens on 127.0.0.1 only" in agent.stderr()
    for p in peers:
        assert "Traceback" not in p.log(), p.log()[-2000:]
