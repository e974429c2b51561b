"""Cross-node evidence found through the cluster (--kubernetes, connprobe/cluster/peers.py): the stand-in API
server (through the official client) places the lab's srv1 "pod" on node-b, whose InternalIP is loopback where
node B's agent of the two-node lab listens; node A's agent has no `peers:` and finds node B's agent through the
cluster: destination IP → pod → node → that node's agent."""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio

from connprobe.cluster.peers import ClusterPeers, cluster_peers
from connprobe.cluster.state import Backoff, ClusterState, load_api_client
from connprobe.cluster.view import ClusterView
from connprobe.config import PeerSettings
from connprobe.crossnode import FirstOf, Peer, StaticPeers
from connprobe.lab.topology import VIP, VIP_PORT, role_addresses
from connprobe.lab.twonode import TwoNodes
from correlator.types import Cause
from tests.cluster import labpods
from tests.cluster import objects as o

SRV1 = labpods.PODS["srv1"]


def seed(api, b_ip: str = "127.0.0.1") -> None:
    """node-a (the client's pod) and node-b (srv1's pod, named by the Service api's EndpointSlice)."""
    for ns in ("frontend", "payments"):
        api.apply(o.namespace(ns))
    api.apply(o.node("node-a", internal_ip="127.0.0.1"))
    api.apply(o.node("node-b", internal_ip=b_ip))
    api.apply(labpods.pod_object("client", node="node-a"))
    api.apply(labpods.pod_object("srv1", node="node-b"))
    api.apply(o.service("api", cluster_ips=VIP, ports=(("http", VIP_PORT),)))
    api.apply(o.endpoint_slice("api-abcde", "api", [(a, SRV1[1], "node-b", True) for a in role_addresses("srv1")],
                               port=8080, port_name="http"))


def view_of(api, tmp_path, node: str = "node-a") -> ClusterView:
    client = load_api_client(api.kubeconfig(tmp_path / f"kubeconfig-{node}"))
    state = ClusterState(client, node_name=node, watch_timeout=30, backoff=Backoff(base=0.02, cap=0.2))
    (tmp_path / "proc").mkdir(exist_ok=True)
    view = ClusterView(state, proc_root=str(tmp_path / "proc"), netns_refresh=3600).start()
    assert view.wait_synced(10)
    return view


@pytest.mark.timeout(30)
def test_destination_ip_to_pod_to_node_to_agent(api, tmp_path):
    seed(api)
    view = view_of(api, tmp_path)
    try:
        peers = ClusterPeers(view, port=9516, token=b"t0k", timeout=0.3)
        for addr in role_addresses("srv1"):
            peer = peers.peer_for(addr)
            assert peer == Peer("http://127.0.0.1:9516", b"t0k", None, 0.3), addr
        # this node's own pod: its evidence is this node's; nobody asked, nothing said
        client = role_addresses("client")[0]
        assert peers.peer_for(client) is None and peers.no_peer_reason(client) is None
        # an address the cluster does not place, a Service VIP (its endpoint is looked up via conntrack), junk
        for addr in (role_addresses("srv2")[0], VIP[0], "not-an-ip"):
            assert peers.peer_for(addr) is None
            assert peers.no_peer_reason(addr) == f"no agent known for IP {addr}"
        # static `peers:` win where they cover the address; the cluster answers for the rest
        static = StaticPeers.from_settings([PeerSettings(cidr="10.77.2.0/24", url="http://127.0.0.9:9999")])
        both = FirstOf(static, peers)
        assert both.peer_for(role_addresses("srv1")[0]).url == "http://127.0.0.9:9999"
        assert both.peer_for(role_addresses("srv1")[1]).url == "http://127.0.0.1:9516"
        assert both.no_peer_reason(client) is None
        assert both.no_peer_reason(role_addresses("srv2")[0]) == f"no agent known for IP {role_addresses('srv2')[0]}"
        # IPv6 node address, and https with the shared certificate when the web config has TLS
        api.apply(o.node("node-b", internal_ip="::1"))
        for _ in range(100):
            if view.state.node("node-b").addresses[0][1] == "::1":
                break
            time.sleep(0.05)
        assert peers.peer_for(role_addresses("srv1")[0]).url == "http://[::1]:9516"
        assert cluster_peers(view, listen_port=9443).peer_for(role_addresses("srv1")[0]).url == "http://[::1]:9443"
    finally:
        view.close()


@pytest.mark.timeout(30)
def test_unreadable_shared_certificate_is_one_line(api, tmp_path):
    from types import SimpleNamespace

    web = SimpleNamespace(tls=SimpleNamespace(cert_file=str(tmp_path / "missing.crt"), key_file="k"))
    with pytest.raises(ValueError) as exc:
        cluster_peers(SimpleNamespace(), listen_port=9516, web_config=web)
    assert str(exc.value).startswith(f"--kubernetes: peers' TLS: {tmp_path / 'missing.crt'}: ")
    assert "\n" not in str(exc.value)


# -- the two-node lab, node A finding node B through the cluster ---------------------------------------------

@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster_nodes(lab, tmp_path_factory):
    from tests.cluster.apiserver import FakeApiServer

    tmp = tmp_path_factory.mktemp("crossnode-cluster")
    api = FakeApiServer().start()
    view = None
    try:
        seed(api)
        view = await asyncio.to_thread(view_of, api, tmp)
        async with TwoNodes(lab, tmp / "nodes", static_peers=False) as nodes:
            assert nodes.a.asker is None  # no `peers:`: nobody to ask until the cluster says who
            nodes.a.set_cluster_resolver(cluster_peers(view, listen_port=nodes.b_port, token=nodes.a.peer_token))
            yield nodes, view
    finally:
        if view is not None:
            await asyncio.to_thread(view.close)
        api.stop()


@pytest.mark.kernel
@pytest.mark.timeout(180)
@pytest.mark.asyncio(loop_scope="module")
async def test_policy_drop_at_pod_on_node_b_found_through_the_cluster(lab, cluster_nodes):
    nodes, view = cluster_nodes
    for family in (4, 6):
        addr = nodes.server_addr(family)
        with lab.policy_drop("srv1", direction="in", port=8080) as fault:
            out = await nodes.probe(addr)
            assert fault.bites() > 0
        assert out.alone.sub_cause == "unknown/connect_timeout", out.alone.facts
        assert (out.asked.cause, out.asked.sub_cause) == (Cause.POLICY_DROP, "policy_drop/syn"), out.asked.facts
        assert "on node node-b" in out.asked.facts[0] and lab.ns("srv1").name in out.asked.facts[0]
        assert out.asked.remote[0].node == "node-b" and out.asked.remote[0].available
        named = view.name_verdict(out.asked)  # what the agent's pipeline does before the verdict goes out
        assert f"destination {addr}: pod payments/{SRV1[1]} on node node-b" in "\n".join(named.facts), named.facts


@pytest.mark.kernel
@pytest.mark.timeout(180)
@pytest.mark.asyncio(loop_scope="module")
async def test_address_the_cluster_does_not_know_says_no_agent_known(lab, cluster_nodes):
    nodes, _view = cluster_nodes
    outcome = await nodes.a.reload()  # a reload re-reads `peers:` (none) and keeps the cluster's resolver
    assert outcome.ok, outcome
    assert nodes.a.asker.resolver.peer_for(nodes.server_addr(4)).url == f"http://127.0.0.1:{nodes.b_port}"
    srv2 = nodes.server_addr(4, "srv2")  # a lab server no pod or EndpointSlice of the cluster names
    asked = nodes.a.asker.asked
    with lab.policy_drop("srv2", direction="in", port=8080):
        out = await nodes.probe(srv2)
    assert out.asked.sub_cause == "unknown/connect_timeout", out.asked.facts
    assert f"remote evidence unavailable (no agent known for IP {srv2})" in out.asked.facts
    assert nodes.a.asker.asked == asked  # no question went out: nothing to wait for


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_https_peer_found_through_the_cluster_presents_the_shared_certificate(api, tmp_path):
    """Agents of a DaemonSet share one certificate: a peer presenting it is trusted (pinned, reached by address
    whatever name it carries); one presenting another certificate gets no TLS session. No kernel: node B's
    agent has no sensor and answers the authenticated question 503, reported as remote evidence unavailable."""
    from bpf.clock import sample_clock_offset
    from connprobe.agent import Agent
    from connprobe.crossnode import PeerAsker
    from connprobe.web import start_server
    from connprobe.webconfig import load_web_config
    from tests.agent.pki import CA
    from tests.correlator.builders import SERVER, result

    ca = CA(tmp_path, "agents-ca")
    (tmp_path / "other").mkdir()
    shared, other = ca.issue("connprobe", server=True), CA(tmp_path / "other", "other-ca").issue("connprobe",
                                                                                                 server=True)
    token = tmp_path / "peer-token"
    token.write_text("s3cret\n")
    for ns in ("payments",):
        api.apply(o.namespace(ns))
    api.apply(o.node("node-b", internal_ip="127.0.0.1"))
    api.apply(o.endpoint_slice("api-x", "api", [(SERVER, "api-0", "node-b", True)], port=8080))
    view = await asyncio.to_thread(view_of, api, tmp_path)
    servers, agents = [], []
    try:
        async def node_b(pair) -> int:
            web = tmp_path / f"web-{len(servers)}.yml"
            web.write_text(f"tls_server_config:\n  cert_file: {pair.cert}\n  key_file: {pair.key}\n")
            cfg = tmp_path / f"b-{len(servers)}.yml"
            cfg.write_text(f"node: {{name: node-b, peer_token_file: {token}}}\n")
            agent = Agent(cfg, kernel=False)
            agents.append(agent)
            await agent.start()
            server = await start_server(agent, "127.0.0.1", 0, web_config_path=str(web))
            servers.append(server)
            return server.addresses[0][1]

        mine = tmp_path / "a-web.yml"
        mine.write_text(f"tls_server_config:\n  cert_file: {shared.cert}\n  key_file: {shared.key}\n")
        web_a = load_web_config(mine)
        for pair, expect in ((shared, "answered HTTP 503: no kernel evidence"), (other, None)):
            port = await node_b(pair)
            peers = cluster_peers(view, listen_port=port, web_config=web_a, token=b"s3cret")
            assert peers.peer_for(SERVER).url == f"https://127.0.0.1:{port}"
            asker = PeerAsker(peers)
            try:
                got = await asker.ask(result(ok=False), sample_clock_offset())
            finally:
                await asker.close()
            assert len(got) == 1 and not got[0].available, got
            if expect:
                assert got[0].reason.startswith(expect), got
            else:
                assert "certificate" in got[0].reason.lower() and "HTTP" not in got[0].reason, got
    finally:
        for s in servers:
            await s.cleanup()
        for a in agents:
            await a.stop()
        await asyncio.to_thread(view.close)


@pytest.mark.kernel
@pytest.mark.timeout(180)
@pytest.mark.asyncio(loop_scope="module")
async def test_diagnose_through_node_a_agent_asks_the_cluster_peers(lab, cluster_nodes, tmp_path):
    """`connprobe diagnose` on node A goes through its agent's channel: the agent asks the same peers (here the
    ones the cluster found) and the attempt comes back with node B's events marked with their node."""
    from connprobe.agentchannel import DiagnoseChannel, DiagnoseRequest, attempts_via_agent

    nodes, _view = cluster_nodes
    channel = DiagnoseChannel(nodes.a, tmp_path / "diagnose.sock")
    await channel.start()
    try:
        req = DiagnoseRequest(target=f"{nodes.server_addr(4)}:8080", source=lab.ns("client").name, timeout="1500ms")
        with lab.policy_drop("srv1", direction="in", port=8080):
            got = [a async for a, _events in attempts_via_agent(channel.path, req)]
    finally:
        await channel.close()
    assert channel.served == 1 and len(got) == 1
    v = got[0].verdict
    assert (str(v.cause), v.sub_cause) == ("policy_drop", "policy_drop/syn"), v.facts
    assert "on node node-b" in v.facts[0]
    assert v.remote and v.remote[0].node == "node-b" and v.remote[0].events[0].node == "node-b"
