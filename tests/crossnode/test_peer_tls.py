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


_ENCRYPTED_KEY_CHECKS = """
import asyncio, fcntl, json, logging, os, sys, termios, types
fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty is this session's terminal: where OpenSSL would ask
logging.disable(logging.CRITICAL)
from connprobe.agent import Agent
from connprobe.cluster.peers import cluster_peers
from connprobe.config import PeerSettings
from connprobe.crossnode import Peer, PeerConfigError
from connprobe.web import start_server
from connprobe.webconfig import WebConfigError, load_web_config
m = json.loads(sys.argv[1])

def say(*words):
    os.write(1, (" ".join(map(str, words)) + "\\n").encode())

def web_yml(key):
    with open(m["web"], "w") as f:
        f.write(f"tls_server_config:\\n  cert_file: {m['cert']}\\n  key_file: {key}\\n")

web_yml(m["enc"])
try:
    load_web_config(m["web"])
    say("LOADED")
except WebConfigError as exc:
    say("ERROR", exc)
try:
    cluster_peers(None, listen_port=9516, web_config=types.SimpleNamespace(
        tls=types.SimpleNamespace(cert_file=m["cert"], key_file=m["enc"])))
    say("LOADED")
except ValueError as exc:
    say("ERROR", exc)
try:
    Peer.from_settings(PeerSettings(cidr="10.77.2.0/24", url="https://127.0.0.1:1", cert_file=m["cert"],
                                    key_file=m["enc"]))
    say("LOADED")
except PeerConfigError as exc:
    say("ERROR", exc)

async def reload():
    web_yml(m["key"])
    agent = Agent(m["cfg"], kernel=False)
    await agent.start()
    server = await start_server(agent, "127.0.0.1", 0, web_config_path=m["web"])
    try:
        web_yml(m["enc"])
        say("RELOAD", await server.reload_web_config() or "applied")
    finally:
        await server.cleanup()
        await agent.stop()

asyncio.run(reload())
"""


def test_encrypted_key_is_an_error_not_a_pass_phrase_prompt(tmp_path, pki):
    """The agent's own TLS key (the web config at start and at reload, the shared certificate peers present, a
    `peers:` client key) encrypted with a pass phrase: one line naming the file, never OpenSSL's prompt on the
    terminal (a root agent started in a shell, or reloading, would wait there for ever)."""
    import json

    from tests.agent.pki import encrypted_copy, run_on_pty

    server = pki["server"]
    enc = encrypted_copy(server)
    cfg = tmp_path / "b.yml"
    cfg.write_text("node: {name: node-b}\n")
    web = tmp_path / "web.yml"
    arg = json.dumps({"cert": str(server.cert), "key": str(server.key), "enc": str(enc), "web": str(web),
                      "cfg": str(cfg)})
    text = run_on_pty(_ENCRYPTED_KEY_CHECKS, arg, lines=4)
    assert "pass phrase:" not in text.lower(), text
    said = "the private key is encrypted with a pass phrase (not supported: give it unencrypted)"
    assert text.strip().splitlines() == [
        f"ERROR {web}: tls_server_config.key_file: {str(enc)!r}: {said}",
        f"ERROR --kubernetes: peers' TLS: key_file {enc}: {said}",
        f"ERROR peers (https://127.0.0.1:1): key_file {enc}: {said}",
        f"RELOAD {web}: tls_server_config.key_file: {str(enc)!r}: {said}",
    ], text
