"""The node mesh as part of the cluster target source (connprobe/targets/mesh.py): K peer probes chosen by
rendezvous hashing among the Ready nodes the stand-in API server lists, followed as nodes come, go and turn
NotReady; the node-local essentials (DNS through the node's resolv.conf and the cluster DNS Service, the API
server through Service default/kubernetes) — and the API probe really reaches the stand-in API server."""

from __future__ import annotations

import asyncio

import pytest
import yaml

from connprobe.cluster.mesh import peers
from connprobe.cluster.options import add_arguments, add_mesh_arguments, mesh_options
from connprobe.cluster.state import Backoff, ClusterState, load_api_client
from connprobe.cluster.view import ClusterView
from connprobe.targets import ConfigFile
from connprobe.targets.cluster import ClusterTargets
from connprobe.targets.mesh import MeshOptions, first_nameserver
from prober.env import ProbeEnv
from prober.runner import run_probe
from tests.cluster import objects as o
from tests.cluster.apiserver import wait_until

pytestmark = pytest.mark.timeout(90)

# Node addresses on loopback: load() only builds probes from them, nothing here sends to a peer.
NODES = {f"n{i}": f"127.0.1.{i}" for i in range(1, 9)}


def _no_probes(path):
    """A configuration file with no probes of its own: every probe comes from the cluster."""
    path.write_text(yaml.safe_dump({"probes": []}))
    return path


def _view(api, tmp_path) -> ClusterView:
    """The cluster as node n1 sees it through the stand-in API server (not started)."""
    client = load_api_client(api.kubeconfig(tmp_path / "kc"))
    return ClusterView(ClusterState(client, node_name="n1", watch_timeout=30, backoff=Backoff(0.02, 0.2)),
                       proc_root=str(tmp_path / "proc"))


def _mesh(reloads_of, source: ClusterTargets) -> dict[str, str]:
    return {p.name: p.target for p in reloads_of.probes if p.name.startswith("mesh/node/")}


def test_peers_follow_nodes_and_the_essentials_come_from_the_cluster(api, tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# the node's\nsearch example.internal\nnameserver 127.0.0.77\nnameserver 127.0.0.78\n")
    cfg = _no_probes(tmp_path / "c.yml")
    for name, ip in NODES.items():
        api.apply(o.node(name, internal_ip=ip))
    api.apply(o.service("kube-dns", namespace="kube-system", cluster_ips=("127.0.2.10",), ports=(("dns", 53),)))
    view = _view(api, tmp_path)
    mesh = MeshOptions(k=3, port=9516, interval=10.0, resolv_conf=str(resolv))
    source = ClusterTargets(ConfigFile(cfg), view, resync=0.3, mesh=mesh)

    async def go():
        await source.start()
        reloads: asyncio.Queue = asyncio.Queue()

        async def changed():
            await reloads.put(source.load())

        async def until(pred):
            while True:
                got = await asyncio.wait_for(reloads.get(), 10)
                if pred(got):
                    return got

        watch = asyncio.create_task(source.watch(changed))
        try:
            await asyncio.to_thread(view.wait_synced, 10)
            got = source.load()
            want = peers("n1", list(NODES), 3)
            assert len(want) == 3
            assert _mesh(got, source) == {f"mesh/node/{p}": f"http://{NODES[p]}:9516/-/healthy" for p in want}
            specs = {p.name: p for p in got.probes}
            peer = specs[f"mesh/node/{want[0]}"]
            assert peer.labels == {"mesh": "node", "peer_node": want[0]} and peer.interval == 10.0
            assert specs["mesh/dns-node"].target == "127.0.0.77:53"  # the first nameserver of the node's file
            assert specs["mesh/dns-pod"].target == "127.0.2.10:53"
            assert specs["mesh/dns-pod"].module.dns.query_name == "kubernetes.default.svc.cluster.local"
            assert "mesh/api" not in specs
            assert source.notes == ("mesh/api: service default/kubernetes does not exist",)

            # a chosen peer goes NotReady: it is replaced by the next-ranked node, the others stay
            sick = want[1]
            api.apply(o.node(sick, ready=False, internal_ip=NODES[sick]))
            after = set(peers("n1", [n for n in NODES if n != sick], 3))
            got = await until(lambda c: set(_mesh(c, source)) == {f"mesh/node/{p}" for p in after})
            assert len(after - set(want)) == 1 and sick not in after
            # it comes back: the first set again
            api.apply(o.node(sick, internal_ip=NODES[sick]))
            await until(lambda c: set(_mesh(c, source)) == {f"mesh/node/{p}" for p in want})
            # a node that is not among the peers leaves: nothing changes; a chosen one leaves: one peer changes
            gone = want[2]
            api.delete("Node", None, gone)
            left = peers("n1", [n for n in NODES if n != gone], 3)
            got = await until(lambda c: set(_mesh(c, source)) == {f"mesh/node/{p}" for p in left})
            assert len(set(want) - set(left)) == 1
            # the API server appears as Service default/kubernetes: the probe targets its VIP with the client's
            # scheme (the stand-in speaks http)
            api.apply(o.service("kubernetes", namespace="default", cluster_ips=("127.0.0.1",),
                                ports=(("https", api.port),)))
            got = await until(lambda c: any(p.name == "mesh/api" for p in c.probes))
            assert {p.name: p.target for p in got.probes}["mesh/api"] == f"http://127.0.0.1:{api.port}/readyz"
            assert source.notes == ()
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        return {p.name: p for p in got.probes}["mesh/api"]

    try:
        api_probe = asyncio.run(go())
    finally:
        view.close()

    # the probe reaches the stand-in API server (it answers 401 without a token: "it answers")
    async def once():
        async with ProbeEnv() as env:
            return await run_probe(api_probe, env)

    before = len([r for r in api.requests if r[0] == "/readyz"])
    (result,) = asyncio.run(once())
    assert result.ok, result
    assert len([r for r in api.requests if r[0] == "/readyz"]) == before + 1


def test_k_zero_gives_only_the_essentials_and_a_bad_resolv_conf_is_a_note(api, tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver not-an-address\x00\n" + "x" * 200 + "\n")
    assert first_nameserver(str(resolv)) is None and first_nameserver(str(tmp_path / "none")) is None
    (tmp_path / "ok").write_text("nameserver fe80::1%eth0\n")
    assert first_nameserver(str(tmp_path / "ok")) == "fe80::1"
    cfg = _no_probes(tmp_path / "c.yml")
    api.apply(o.node("n1", internal_ip="127.0.1.1"))
    api.apply(o.node("n2", internal_ip="127.0.1.2"))
    view = _view(api, tmp_path)
    try:
        view.start()
        assert view.wait_synced(10)
        source = ClusterTargets(ConfigFile(cfg), view, mesh=MeshOptions(k=0, resolv_conf=str(resolv)))
        assert source.load().probes == ()
        assert source.notes == (f"mesh/dns-node: no nameserver in {resolv}",
                                "mesh/dns-pod: service kube-system/kube-dns does not exist",
                                "mesh/api: service default/kubernetes does not exist")
        # hostile Node objects: a name that is no DNS name, an address that is none
        api.apply(o.node("N3\n{evil}", internal_ip="127.0.1.3"))
        api.apply(o.node("n4", internal_ip="not-an-ip"))
        wait_until(lambda: len(view.state.nodes()) == 4)
        source = ClusterTargets(ConfigFile(cfg), view, mesh=MeshOptions(k=5, resolv_conf=str(resolv)))
        assert [p.name for p in source.load().probes] == ["mesh/node/n2"]
        assert source.notes[:2] == (
            "mesh: node 'N3\\n{evil}' left out: not a DNS name of at most 128 characters",
            "mesh: 1 of 5 peers (nodes besides this one: 2, Ready with an address: 1)")
    finally:
        view.close()


def _args(*argv: str):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    add_mesh_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize(("argv", "error"), [
    (("--kubernetes.mesh", "3"), "connprobe agent: --kubernetes.mesh needs --kubernetes"),
    (("--kubernetes", "--kubernetes.mesh", "-1"), "connprobe agent: --kubernetes.mesh: -1 must be a whole number "
                                                  "from 0 to 1000"),
    (("--kubernetes", "--kubernetes.mesh", "2", "--kubernetes.mesh-interval", "2ms"),
     "connprobe agent: --kubernetes.mesh-interval: 2ms must be from 1s to 1h"),
    (("--kubernetes", "--kubernetes.mesh", "2", "--kubernetes.mesh-interval", "soon"),
     "connprobe agent: --kubernetes.mesh-interval: "),
    (("--kubernetes", "--kubernetes.mesh", "2", "--kubernetes.dns-service", "kube-dns"),
     "connprobe agent: --kubernetes.dns-service: 'kube-dns' must be NAMESPACE/NAME"),
    (("--kubernetes", "--kubernetes.mesh", "2", "--kubernetes.dns-name", "bad name!"),
     "connprobe agent: --kubernetes.dns-name: "),
    (("--kubernetes", "--kubernetes.mesh", "2", "--kubernetes.mesh-source", "pod x"),
     "connprobe agent: --kubernetes.mesh-source: "),
])
def test_bad_mesh_options_are_one_line_errors(argv, error):
    with pytest.raises(ValueError) as info:
        mesh_options(_args(*argv), 9516)
    text = str(info.value)
    assert text.startswith(error) and "\n" not in text, text


def test_https_agents_verify_peers_with_the_shared_certificate():
    from connprobe.webconfig import TLSServerConfig, WebConfig

    web = WebConfig(tls=TLSServerConfig(cert_file="/etc/connprobe/web/tls.crt", key_file="/etc/connprobe/web/tls.key"))
    opts = mesh_options(_args("--kubernetes", "--kubernetes.mesh", "4"), 9443, web)
    assert (opts.k, opts.port, opts.scheme) == (4, 9443, "https")
    tls = opts.peer_module_spec({}).http.tls
    assert (tls.ca_file, tls.server_name, tls.insecure_skip_verify) == ("/etc/connprobe/web/tls.crt", "connprobe",
                                                                       False)
    assert mesh_options(_args("--kubernetes"), 9516) is None  # off by default


def _shared_cert(tmp_path, name: str) -> tuple[str, str]:
    """The agents' shared certificate, made as deploy/kubernetes/web-config-secret.yaml says."""
    import subprocess

    key, crt = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "2", "-subj", "/CN=connprobe", "-addext", "subjectAltName=DNS:connprobe",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True, timeout=30)
    return str(crt), str(key)


def test_a_peer_agent_over_https_with_basic_auth_is_verified_with_the_shared_certificate(api, tmp_path):
    import socket
    import sys
    import time

    import bcrypt

    from connprobe.targets.mesh import mesh_probes
    from connprobe.webconfig import load_web_config
    from tests.agent.helpers import REPO, Daemon, free_port

    crt, key = _shared_cert(tmp_path, "shared")
    other_crt, _ = _shared_cert(tmp_path, "other")  # same name, another key: not the agents' certificate
    web = tmp_path / "web.yml"
    web.write_text(yaml.safe_dump({
        "tls_server_config": {"cert_file": crt, "key_file": key},
        "basic_auth_users": {"prometheus": bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()}}))
    port = free_port()
    cfg = _no_probes(tmp_path / "peer.yml")
    api.apply(o.node("n1", internal_ip="127.0.0.1"))
    api.apply(o.node("n2", internal_ip="127.0.0.2"))
    view = _view(api, tmp_path)
    peer = Daemon("peer", ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "connprobe.cli", "agent", "--config",
                           str(cfg), "--no-kernel", "--no-config-watch", "--listen", f"127.0.0.2:{port}",
                           "--web.config.file", str(web)], tmp_path)
    try:
        peer.start()
        view.start()
        assert view.wait_synced(10)
        deadline = time.monotonic() + 60
        while True:  # the peer is up when it accepts connections
            peer.check_alive()
            try:
                socket.create_connection(("127.0.0.2", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, peer.log()[-2000:]
                time.sleep(0.2)

        def peer_probe(web_config):
            opts = mesh_options(_args("--kubernetes", "--kubernetes.mesh", "1"), port, web_config)
            probes, _ = mesh_probes(opts, view)
            (spec,) = [p for p in probes if p.name == "mesh/node/n2"]
            return spec

        from connprobe.webconfig import TLSServerConfig, WebConfig

        spec = peer_probe(load_web_config(web))
        assert spec.target == f"https://127.0.0.2:{port}/-/healthy"
        stranger = peer_probe(WebConfig(tls=TLSServerConfig(cert_file=other_crt, key_file="")))

        async def both():
            async with ProbeEnv() as env:
                got = [*(await run_probe(spec, env)), *(await run_probe(stranger, env))]
            await asyncio.sleep(0.2)  # the failed handshake's transport closes on the loop: let it, before it ends
            return got

        good, bad = asyncio.run(both())
        assert good.ok, good  # TLS verified for "connprobe", and no password needed for /-/healthy
        # a certificate the peer does not hold: the probe fails (it verifies, it does not just connect)
        assert not bad.ok and "certificate" in (bad.error_detail or "").lower(), bad
    finally:
        view.close()
        peer.stop()
    assert "Traceback" not in peer.log()


def test_the_api_probe_goes_over_tls_with_the_service_accounts_ca(tmp_path, monkeypatch):
    """In-cluster: mesh/api speaks https to the kubernetes Service's VIP, verified with the service account's CA
    for the name kubernetes.default.svc (which the API server's certificate carries)."""
    import subprocess

    from kubernetes.config import incluster_config

    from connprobe.targets.mesh import mesh_probes
    from tests.cluster.apiserver import FakeApiServer

    key, cert = tmp_path / "tls.key", tmp_path / "ca.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=kube-apiserver", "-addext",
                    "subjectAltName=DNS:kubernetes.default.svc,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    token = tmp_path / "token"
    token.write_text("in-cluster-token")
    server = FakeApiServer(token="in-cluster-token", tls=(str(cert), str(key))).start()
    view = None
    try:
        server.apply(o.service("kubernetes", namespace="default", cluster_ips=("127.0.0.1",),
                               ports=(("https", server.port),)))
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
        monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
        monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(cert))
        state = ClusterState(load_api_client(), node_name="n1", watch_timeout=30)
        view = ClusterView(state, proc_root=str(tmp_path / "proc"))
        view.start()
        assert view.wait_synced(10)
        probes, _ = mesh_probes(MeshOptions(k=0, resolv_conf=str(tmp_path / "none")), view,
                                api_client=state.api_client)
        (spec,) = probes
        assert spec.name == "mesh/api" and spec.target == f"https://127.0.0.1:{server.port}/readyz"
        tls = spec.module.http.tls
        assert (tls.ca_file, tls.server_name) == (str(cert), "kubernetes.default.svc")

        async def once():
            async with ProbeEnv() as env:
                return await run_probe(spec, env)

        before = len([r for r in server.requests if r[0] == "/readyz"])
        (result,) = asyncio.run(once())
        assert result.ok, result  # 401 without a token: the API server answers
        assert len([r for r in server.requests if r[0] == "/readyz"]) == before + 1
    finally:
        if view is not None:
            view.close()
        server.stop()


def test_a_mesh_module_the_config_lacks_is_a_config_error(api, tmp_path):
    from connprobe.config import ConfigError

    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"modules": {"http_2xx": {"prober": "http"}, "tcp": {"prober": "tcp"}},
                                   "probes": []}))
    client = load_api_client(api.kubeconfig(tmp_path / "kc"))
    view = ClusterView(ClusterState(client, node_name="n1", watch_timeout=30), proc_root=str(tmp_path / "proc"))
    api.apply(o.node("n2", internal_ip="127.0.1.2"))
    try:
        view.start()
        assert view.wait_synced(10)
        for name, error in (("peer", "--kubernetes.mesh-module: no module 'peer' in the config (known: http_2xx, "
                                     "tcp)"),
                            ("tcp", "--kubernetes.mesh-module: tcp is a tcp module; the peers' health endpoint "
                                    "needs an http one")):
            source = ClusterTargets(ConfigFile(cfg), view, mesh=MeshOptions(k=1, peer_module=name))
            with pytest.raises(ConfigError) as info:
                source.load()
            assert info.value.errors == [error]
        source = ClusterTargets(ConfigFile(cfg), view, mesh=MeshOptions(k=1, peer_module="http_2xx"))
        (peer,) = [p for p in source.load().probes if p.name.startswith("mesh/node/")]
        assert peer.module.prober == "http" and peer.module.http.valid_status_codes == ()
    finally:
        view.close()
