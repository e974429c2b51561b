"""A peer agent that answers nonsense (not JSON, too large, wrong types, a redirect, a hang) makes the question
"remote evidence unavailable (why)" — one line, within the deadline, never an exception."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from aiohttp import web

from bpf.clock import sample_clock_offset
from connprobe.crossnode import Peer, PeerAsker, StaticPeers
from tests.correlator.builders import TCP_FLOW, result
from tests.crossnode.peers import serve_evidence

pytestmark = pytest.mark.timeout(60)

GOOD = {"node": "b", "watching": True, "clock_uncertainty_ns": 1, "received_ns": 5, "replied_ns": 6, "events": []}


async def _recording_peer() -> tuple[web.AppRunner, str, list[dict]]:
    """A peer that answers GOOD and keeps the query string of every question it was asked."""
    seen: list[dict] = []

    async def handler(request):
        seen.append(dict(request.query))
        return web.json_response(GOOD)

    runner, url = await serve_evidence(handler)
    return runner, url, seen


@pytest.mark.parametrize("answer, why", [
    (lambda: web.Response(text="<html>"), "answer invalid: not JSON"),
    (lambda: web.Response(body=b"[" * (5 << 20)), "answer larger than 4 MiB"),
    (lambda: web.json_response({**GOOD, "events": [{"kind": "explode"}]}), "answer invalid: events.0"),
    (lambda: web.json_response({**GOOD, "node": "b\nFAKE LOG LINE"}), "answer invalid: node"),
    (lambda: web.json_response({**GOOD, "received_ns": "5"}), "answer invalid: received_ns"),
    (lambda: web.json_response([1, 2]), "answer invalid: "),
    (lambda: web.Response(body=b"[" * 100_000 + b"]" * 100_000), "answer invalid: nested too deeply"),
    (lambda: web.HTTPFound("http://169.254.169.254/"), "answered HTTP 302"),
    (lambda: web.Response(status=500, text="boom\nsecond line"), "answered HTTP 500: boom"),
])
async def test_hostile_answers_are_reasons(answer, why):
    async def handler(request):
        r = answer()
        if isinstance(r, Exception):
            raise r
        return r

    runner, url = await serve_evidence(handler)
    asker = PeerAsker(StaticPeers([("10.77.2.0/24", Peer(url, b"t", None, 2.0))]))
    try:
        (got,) = await asker.ask(result(ok=False), sample_clock_offset())
    finally:
        await asker.close()
        await runner.cleanup()
    assert not got.available and got.reason.startswith(why), got.reason
    assert "\n" not in got.reason and len(got.reason) < 300
    json.dumps(got.reason)


async def test_a_peer_that_never_answers_ends_by_the_deadline():
    hold = asyncio.Event()

    async def handler(request):
        await hold.wait()
        return web.json_response(GOOD)

    runner, url = await serve_evidence(handler)
    asker = PeerAsker(StaticPeers([("10.77.2.0/24", Peer(url, b"t", None, 0.2))]))
    try:
        (got,) = await asker.ask(result(ok=False), sample_clock_offset())
    finally:
        hold.set()
        await asker.close()
        await runner.cleanup()
    assert got.reason == "no answer within 200 ms" and asker.failed == 1


async def test_no_peer_for_the_address_asks_nobody():
    asker = PeerAsker(StaticPeers([("192.0.2.0/24", Peer("http://127.0.0.1:9", None, None, 0.2))]))
    assert await asker.ask(result(ok=False), sample_clock_offset()) == ()
    assert asker.asked == 0


async def test_a_service_ip_is_asked_about_at_the_endpoint_it_was_dnated_to():
    runner, url, seen = await _recording_peer()

    async def dnat(flow, source):  # what the conntrack table of the probe's namespace says
        return ("10.77.2.11", 8080) if flow.remote_addr == "10.96.0.10" else None

    r = dataclasses.replace(result(ok=False), flows=(dataclasses.replace(TCP_FLOW, remote_addr="10.96.0.10",
                                                                         remote_port=80),))
    asker = PeerAsker(StaticPeers([("10.77.2.0/24", Peer(url, b"t", None, 2.0))]), dnat=dnat)
    try:
        (got,) = await asker.ask(r, sample_clock_offset())
        assert got.available and seen[0]["daddr"] == "10.77.2.11" and seen[0]["dport"] == "8080"

        async def no_nat(flow, source):
            return None

        asker.dnat = no_nat
        assert await asker.ask(r, sample_clock_offset()) == ()  # nobody answers for that address: nobody asked
    finally:
        await asker.close()
        await runner.cleanup()


async def test_a_link_local_scope_is_not_sent_to_the_peer():
    """The scope (%veth0) is an interface of this node; the peer refuses an address with one (a 400)."""
    runner, url, seen = await _recording_peer()
    flow = dataclasses.replace(TCP_FLOW, local_addr="fe80::1%veth0", remote_addr="fe80::2%veth0")
    asker = PeerAsker(StaticPeers([("fe80::/64", Peer(url, b"t", None, 2.0))]))
    try:
        (got,) = await asker.ask(dataclasses.replace(result(ok=False), flows=(flow,)), sample_clock_offset())
    finally:
        await asker.close()
        await runner.cleanup()
    assert got.available, got.reason
    assert (seen[0]["saddr"], seen[0]["daddr"]) == ("fe80::1", "fe80::2")
