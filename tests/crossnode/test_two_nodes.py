"""The two-node lab (connprobe/lab/twonode.py): node A's agent probes from the client namespace and, when its
own kernel's evidence does not decide, asks node B's agent (servers' namespaces, its own sensor and web
endpoint on loopback). Real sensors, real nftables policies, real HTTP between the agents."""

from __future__ import annotations

import asyncio
import urllib.parse

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from connprobe.lab.twonode import TwoNodes
from correlator.types import Cause
from tests.crossnode.peers import serve_evidence

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(180)]

FAMILIES = [4, 6]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def nodes(lab, tmp_path_factory):
    async with TwoNodes(lab, tmp_path_factory.mktemp("twonode")) as n:
        yield n


async def test_syn_dropped_by_policy_at_b_names_node_b(lab, nodes):
    for family in FAMILIES:
        addr = nodes.server_addr(family)
        with lab.policy_drop("srv1", direction="in", port=8080) as fault:
            out = await nodes.probe(addr)
            bit = fault.bites()
        assert bit > 0
        # node A alone: its SYNs left, nothing dropped on its node
        assert (out.alone.cause, out.alone.sub_cause) == (Cause.UNKNOWN, "unknown/connect_timeout"), out.alone.facts
        assert (out.asked.cause, out.asked.sub_cause) == (Cause.POLICY_DROP, "policy_drop/syn"), out.asked.facts
        assert "NETFILTER_DROP" in out.asked.facts[0] and "on node node-b" in out.asked.facts[0]
        assert lab.ns("srv1").name in out.asked.facts[0]
        assert out.asked.remote[0].node == "node-b" and out.asked.remote[0].available
    from prometheus_client import generate_latest

    a_text = generate_latest(nodes.a.registry).decode()
    b_text = generate_latest(nodes.b.registry).decode()
    assert 'connprobe_peer_questions_total{result="answered"}' in a_text
    assert "connprobe_peer_questions_answered_total 0.0" not in b_text
    foreign = [ln for ln in a_text.splitlines() if ln.startswith("connprobe_kernel_events_foreign_total")]
    assert foreign and float(foreign[0].split()[-1]) > 0  # node B's drops, seen by node A's kernel, left out


async def test_healthy_probe_asks_nobody(nodes):
    out = await nodes.probe(nodes.server_addr(4))
    assert out.asked.cause == Cause.OK and not out.asked.remote


async def test_peer_refuses_without_credential_and_rejects_hostile_queries(nodes):
    url = nodes.b_url + "/api/evidence"
    q = {"proto": "tcp", "saddr": "10.77.1.2", "sport": "40000", "daddr": "10.77.2.11", "dport": "8080",
         "from": "1", "to": "2"}
    async with aiohttp.ClientSession() as s:
        async with s.get(url, params=q) as r:
            assert r.status == 401 and "credential" in await r.text()
        async with s.get(url, params=q, headers={"Authorization": "Bearer not-the-token"}) as r:
            assert r.status == 401
        async with s.get(url, params=q, headers={"Authorization": "Basic dTpw"}) as r:
            assert r.status == 401
        ok = {"Authorization": f"Bearer {nodes.token}"}
        async with s.get(url, params=q, headers=ok) as r:
            assert r.status == 200
            doc = await r.json()
            assert doc["node"] == "node-b" and doc["events"] == [] and doc["watching"] is True
        for field, value, word in [("sport", "70000", "sport"), ("saddr", "10.77.1.2; rm", "saddr"),
                                   ("from", "-1", "from"), ("to", "1e9", "to"), ("proto", "sctp", "proto"),
                                   ("junk", "1", "junk")]:
            bad = {**q, field: value}
            async with s.get(url + "?" + urllib.parse.urlencode(bad), headers=ok) as r:
                text = await r.text()
                assert r.status == 400 and text.startswith(word) and text.count("\n") == 1, (field, text)
        async with s.get(url + "?" + urllib.parse.urlencode(q) + "&sport=1", headers=ok) as r:
            assert r.status == 400 and "more than once" in await r.text()


async def test_skewed_peer_clock_changes_nothing(lab, tmp_path):
    async with TwoNodes(lab, tmp_path / "skew", skew_ns=7_000_000_000) as skewed:
        with lab.policy_drop("srv1", direction="in", port=8080):
            out = await skewed.probe(skewed.server_addr(4))
    assert out.asked.sub_cause == "policy_drop/syn", out.asked.facts
    assert out.asked.remote[0].uncertainty_ns < 200_000_000  # the skew was measured, not trusted


async def test_peer_down_says_remote_evidence_unavailable(lab, tmp_path):
    with socket_closed() as port:
        async with TwoNodes(lab, tmp_path / "down", peer_url=f"http://127.0.0.1:{port}") as down:
            with lab.policy_drop("srv1", direction="in", port=8080):
                out = await down.probe(down.server_addr(4))
    assert out.asked.sub_cause == "unknown/connect_timeout"
    assert any(f.startswith("remote evidence unavailable from http://127.0.0.1") and "unreachable" in f
               for f in out.asked.facts), out.asked.facts


async def test_slow_peer_the_deadline_holds(lab, tmp_path):
    state = {"started": 0, "answered": 0}
    release = asyncio.Event()

    async def slow(request):
        state["started"] += 1
        await release.wait()
        state["answered"] += 1
        return web.json_response({})

    runner, url = await serve_evidence(slow)
    port = runner.addresses[0][1]
    try:
        async with TwoNodes(lab, tmp_path / "slow", peer_url=url,
                            peer_timeout="300ms") as slowpeer:
            with lab.policy_drop("srv1", direction="in", port=8080):
                out = await slowpeer.probe(slowpeer.server_addr(4))
            # the verdict came while the peer was still thinking about the question
            assert state["started"] == 1 and state["answered"] == 0
    finally:
        release.set()
        await runner.cleanup()
    assert out.asked.sub_cause == "unknown/connect_timeout"
    assert f"remote evidence unavailable from http://127.0.0.1:{port} (no answer within 300 ms)" in out.asked.facts


class socket_closed:
    """A loopback port nothing listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        return None


async def _diagnose(*args: str) -> tuple[int, str, str]:
    import os
    import sys

    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "connprobe.cli", "diagnose", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env={**os.environ, "COLUMNS": "200"})
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


async def test_diagnose_asks_the_same_peers_and_marks_remote_events(lab, nodes):
    import json
    from pathlib import Path

    import jsonschema

    schema = json.loads((Path(__file__).resolve().parents[2] / "docs" / "diagnose.schema.json").read_text())
    cfg = str(nodes.workdir / "node-a.yml")
    args = ["--peers", cfg, "--from", lab.ns("client").name, "--timeout", "1500ms", "10.77.2.11:8080"]
    with lab.policy_drop("srv1", direction="in", port=8080):
        code, out, err = await _diagnose(*args, "--json")
        code_text, text, _ = await _diagnose(*args)
    assert code == 1, err
    doc = json.loads(out)
    jsonschema.validate(doc, schema)
    a = doc["attempts"][0]
    assert (a["verdict"]["cause"], a["verdict"]["sub_cause"]) == ("policy_drop", "policy_drop/syn"), a["verdict"]
    remote = [e for e in a["events"] if e["node"] == "node-b"]
    assert remote and all(e["netns_name"] == lab.ns("srv1").name and "at_uncertainty_ms" in e for e in remote)
    assert a["remote"][0]["node"] == "node-b" and a["remote"][0]["available"]
    assert code_text == 1 and "▲ kernel node-b drop NETFILTER_DROP" in text, text
    assert "on node node-b" in text


async def test_diagnose_peers_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("peers: [{cidr: 10.0.0.0/99, url: 'http://127.0.0.1:1'}]\n")
    code, _out, err = await _diagnose("--peers", str(bad), "--no-kernel", "127.0.0.1:1")
    assert code == 2 and err.startswith("connprobe diagnose: --peers: ") and err.count("\n") == 1, err
