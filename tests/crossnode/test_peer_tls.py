"""Trust between agents over TLS: a peer proves itself with a client certificate the answering agent's web
config verifies (mTLS), or it is refused — 401 without a credential, no TLS session with a stranger's
certificate. No kernel needed: an agent without a sensor answers an authenticated peer 503, which the asking
side reports as "remote evidence unavailable"."""

from __future__ import annotations

import aiohttp
import pytest

from bpf.clock import sample_clock_offset
from connprobe.agent import Agent
from connprobe.crossnode import EVIDENCE_PATH, Peer, PeerAsker, StaticPeers
from connprobe.web import start_server
from tests.agent.pki import CA
from tests.correlator.builders import result

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pki(tmp_path):
    ca = CA(tmp_path, "agents-ca")
    stranger = CA(tmp_path, "stranger-ca")
    return {"ca": ca, "server": ca.issue("node-b", server=True), "client": ca.issue("node-a", server=False),
            "stranger": stranger.issue("mallory", server=False)}


async def test_mtls_between_agents(tmp_path, pki):
    import ssl

    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {pki['server'].cert}\n  key_file: {pki['server'].key}\n"
                   f"  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {pki['ca'].path}\n")
    cfg = tmp_path / "b.yml"
    cfg.write_text("node: {name: node-b}\n")
    agent = Agent(cfg, kernel=False)
    await agent.start()
    server = await start_server(agent, "127.0.0.1", 0, web_config_path=str(web))
    url = f"https://127.0.0.1:{server.addresses[0][1]}"
    try:
        def ctx(pair=None):
            c = ssl.create_default_context(cafile=str(pki["ca"].path))
            if pair is not None:
                c.load_cert_chain(str(pair.cert), str(pair.key))
            return c

        r = result(ok=False)
        offset = sample_clock_offset()
        peer = PeerAsker(StaticPeers([("10.77.2.0/24", Peer(url, None, ctx(pki["client"]), 2.0))]))
        asked = await peer.ask(r, offset)
        await peer.close()
        # authenticated by its certificate; this agent has no sensor, and says so
        assert not asked[0].available and asked[0].reason.startswith("answered HTTP 503: no kernel evidence")
        anon = PeerAsker(StaticPeers([("10.77.2.0/24", Peer(url, None, ctx(), 2.0))]))
        got = await anon.ask(r, offset)
        await anon.close()
        assert got[0].reason.startswith("answered HTTP 401"), got
        stranger = PeerAsker(StaticPeers([("10.77.2.0/24", Peer(url, None, ctx(pki["stranger"]), 2.0))]))
        got = await stranger.ask(r, offset)
        await stranger.close()
        assert not got[0].available and "401" not in got[0].reason, got  # no TLS session at all
        async with aiohttp.ClientSession() as s:  # the rest of the web config still applies elsewhere
            async with s.get(url + "/-/healthy", ssl=ctx()) as resp:
                assert resp.status == 200
            async with s.get(url + EVIDENCE_PATH, ssl=ctx()) as resp:
                assert resp.status == 401
    finally:
        await server.cleanup()
        await agent.stop()
