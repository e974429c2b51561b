"""Kernel evidence for ICMP echo probes: the echo's identifier is watched as icmp/ID, so a policy drop of the echo
request (IPv4 and IPv6) reaches user space with its reason and namespace, and the correlator names it
policy_drop; an unwatched echo under the same rule sends nothing. Traffic only inside the lab."""

from __future__ import annotations

import time

import pytest

from bpf.types import EventKind
from correlator import correlate
from prober import ErrorKind, ICMPSpec, ProbeEnv, run_probe
from tests.bpf.sensorlab import lab_netns
from tests.prober.helpers import spec

pytestmark = pytest.mark.kernel


async def _ping(lab, addr, on_local_port, timeout=1.0):
    s = spec(addr, prober="icmp", source=f"netns {lab.ns('client').name}", timeout=timeout, section=ICMPSpec())
    async with ProbeEnv(on_local_port=on_local_port) as env:
        (r,) = await run_probe(s, env)
    return r


def _events(sensor, lab, ident):
    time.sleep(0.3)
    keep = lab_netns(lab)
    return [e for e in sensor.drain() if e.proto == "icmp" and ident in (e.sport, e.dport) and e.netns in keep]


@pytest.mark.parametrize("family", [4, 6])
async def test_policy_drop_of_echo_requests_is_seen_and_named(lab, sensor, family):
    srv = lab.server("srv1")
    addr = srv.addr4 if family == 4 else srv.addr6
    watched = []

    def watch(proto, port):
        watched.append((str(proto), port))
        sensor.watch(str(proto), port)

    sensor.drain()
    with lab.icmp_echo_drop("srv1", direction="in", family="ipv4" if family == 4 else "ipv6"):
        r = await _ping(lab, addr, watch)
    try:
        (flow,) = r.flows
        assert watched == [("icmp", flow.local_port)] and flow.proto == "icmp"
        assert flow.local_addr == ("10.77.1.2" if family == 4 else "fd77:1::2")
        evs = _events(sensor, lab, flow.local_port)
    finally:
        for proto, port in watched:
            sensor.unwatch(proto, port)
    assert r.error is ErrorKind.CONNECT_TIMEOUT
    drops = [e for e in evs if e.kind == EventKind.DROP]
    assert drops, evs
    d = drops[0]
    assert d.reason == "NETFILTER_DROP" and d.netns == lab.ns("srv1").inode
    assert (d.saddr, d.sport, d.daddr, d.dport) == (flow.local_addr, flow.local_port, addr, flow.local_port)
    v = correlate(r, evs)
    assert (v.cause, v.sub_cause) == ("policy_drop", "policy_drop/echo"), v.summary
    assert v.evidence and "NETFILTER_DROP" in v.facts[0]


async def test_an_unwatched_echo_sends_nothing(lab, sensor):
    srv = lab.server("srv1")
    sensor.drain()
    with lab.icmp_echo_drop("srv1", direction="in", family="ipv4") as rule:
        r = await _ping(lab, srv.addr4, lambda proto, port: None)
        assert rule.matched() == 1
    assert r.error is ErrorKind.CONNECT_TIMEOUT
    assert _events(sensor, lab, r.flows[0].local_port) == []
    v = correlate(r, ())
    assert v.sub_cause == "unknown/icmp_no_reply"
