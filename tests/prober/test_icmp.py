"""ICMP echo probes: loopback and through the lab router (v4 and v6), TTL, don't-fragment, payload size, the
errors that come back (time exceeded, admin-prohibited), a silent policy drop, and the verdicts they get without
the kernel sensor (with it: tests/bpf/test_icmp_evidence.py)."""

from __future__ import annotations

import socket
import struct

import pytest

from correlator import correlate
from correlator.types import KernelCoverage
from prober import ErrorKind, ICMPSpec, ProbeEnv, run_probe
from prober.icmp import checksum, echo_request, match
from tests.prober.helpers import spec

pytestmark = pytest.mark.kernel


def _icmp(target, src="host", timeout=2.0, **icmp):
    return spec(target, prober="icmp", source=src, timeout=timeout, section=ICMPSpec(**icmp))


async def _one(s):
    async with ProbeEnv() as env:
        (r,) = await run_probe(s, env)
    return r


def test_echo_request_checksum_is_valid():
    pkt = echo_request(socket.AF_INET, 0x1234, 7, b"abc")
    assert checksum(pkt) == 0 and pkt[0] == 8 and struct.unpack("!HH", pkt[4:8]) == (0x1234, 7)
    reply = bytes([0x45]) + bytes(7) + bytes([61]) + bytes(11) + bytes([0, 0, 0, 0]) + pkt[4:]
    assert match(socket.AF_INET, reply, "10.0.0.1", "10.0.0.1", 0x1234, 7) == (0, 0, 61)
    assert match(socket.AF_INET, reply, "10.0.0.1", "10.0.0.1", 0x1234, 8) is None  # another sequence
    assert match(socket.AF_INET, reply, "10.0.0.2", "10.0.0.1", 0x1234, 7) is None  # another peer


@pytest.mark.parametrize("target", ["127.0.0.1", "::1", "[::1]"])
async def test_loopback_echo(target):
    r = await _one(_icmp(target, payload_size=100))
    assert r.ok, r.error_detail
    assert [p.name for p in r.phases] == ["setup", "rtt"] and r.value("icmp_reply_hop_limit") == 64


@pytest.fixture
def src(lab) -> str:
    return f"netns {lab.ns('client').name}"


@pytest.mark.parametrize("family", [4, 6])
async def test_through_the_router_ttl_is_honoured(lab, src, family):
    srv = lab.server("srv1")
    addr = srv.addr4 if family == 4 else srv.addr6
    r = await _one(_icmp(addr, src))
    assert r.ok, r.error_detail
    assert r.value("icmp_reply_hop_limit") == 63  # srv1 answers with 64, the router takes one
    r = await _one(_icmp(addr, src, ttl=1))  # expires at the router, which says so
    assert r.error is ErrorKind.CONNECT_UNREACHABLE and "time exceeded (ttl 1)" in r.error_detail, r.error_detail
    router = "10.77.1.1" if family == 4 else "fd77:1::1"
    assert router in r.error_detail
    assert (await _one(_icmp(addr, src, ttl=2))).ok


async def test_by_name_prefers_the_asked_family(lab, src):
    srv = lab.server("srv1")
    r4 = await _one(_icmp("srv1.lab.test", src, preferred_ip_protocol="ip4"))
    r6 = await _one(_icmp("srv1.lab.test", src))  # blackbox's default: ip6
    assert r4.ok and r4.address == srv.addr4 and r6.ok and r6.address == srv.addr6
    assert r4.phases[0].name == "resolve"
    r = await _one(_icmp("v4only.lab.test", src))  # no AAAA: falls back to IPv4
    assert r.ok and ":" not in r.address
    r = await _one(_icmp("v4only.lab.test", src, ip_protocol_fallback=False))
    assert r.error is ErrorKind.DNS_NO_ANSWER and r.error_detail == (
        "v4only.lab.test: no ip6 address (ip_protocol_fallback is false)")


async def test_payload_size_and_dont_fragment(lab, src):
    srv = lab.server("srv1")
    r = await _one(_icmp(srv.addr4, src, payload_size=3000))  # fragmented on the 1500-byte links, reassembled
    assert r.ok, r.error_detail
    r = await _one(_icmp(srv.addr4, src, payload_size=3000, dont_fragment=True))
    assert r.error is ErrorKind.CONNECT_UNREACHABLE and "dont_fragment" in r.error_detail, r.error_detail
    assert (await _one(_icmp(srv.addr4, src, payload_size=1400, dont_fragment=True))).ok
    r = await _one(_icmp(srv.addr6, src, payload_size=3000, dont_fragment=True))
    assert r.error is ErrorKind.CONNECT_UNREACHABLE, r.error_detail


async def test_payload_size_is_what_the_server_gets(lab, src):
    """The router counts the echo requests by length with an nftables rule that matches only the asked size."""
    srv = lab.server("srv1")
    size = 333
    counter = lab.policy_drop("srv1", direction="in", family="ipv4")
    counter.rule = f"meta l4proto icmp ip length {20 + 8 + size} counter accept"  # counts, lets it pass
    with counter as probe_rule:
        assert (await _one(_icmp(srv.addr4, src, payload_size=size))).ok
        assert probe_rule.matched() == 1
        assert (await _one(_icmp(srv.addr4, src, payload_size=size + 1))).ok
        assert probe_rule.matched() == 1


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
async def test_policy_drop_and_reject_of_echo_requests(lab, src, family):
    srv = lab.server("srv1")
    addr = srv.addr4 if family == "ipv4" else srv.addr6
    with lab.icmp_echo_drop("srv1", direction="in", family=family) as drop:
        r = await _one(_icmp(addr, src, timeout=1.0))
        assert drop.matched() == 1
    assert r.error is ErrorKind.CONNECT_TIMEOUT and "no echo reply" in r.error_detail
    v = correlate(r, (), coverage=KernelCoverage(available=False, reason="sensor off"))
    assert v.sub_cause == "unknown/icmp_no_reply" and v.confidence == 0.3  # tests/bpf/test_icmp_evidence.py: with
    assert "a policy drop, loss and a dead host look the same from here" in v.facts  # the sensor, policy_drop/echo
    with lab.icmp_echo_drop("srv1", direction="in", family=family, action="reject"):
        r = await _one(_icmp(addr, src))
    assert r.error is ErrorKind.CONNECT_REFUSED and "prohibited" in r.error_detail, r.error_detail
    v = correlate(r, (), coverage=KernelCoverage())
    assert v.cause == "policy_drop" and v.sub_cause == "policy_drop/reject" and v.confidence == 0.9
    with lab.icmp_echo_drop("client", direction="out", family=family):
        r = await _one(_icmp(addr, src))
    assert r.error is ErrorKind.CONNECT_EPERM, r.error_detail
    assert correlate(r, ()).sub_cause == "policy_drop/local"


async def test_refused_target_sends_nothing():
    from prober.sockets import connect_guard

    def refuse(addr):
        raise PermissionError(1, f"{addr} is not allowed")

    token = connect_guard.set(refuse)
    try:
        r = await _one(_icmp("169.254.169.254"))
    finally:
        connect_guard.reset(token)
    assert r.error is ErrorKind.CONNECT_EPERM and not r.phases


def test_the_agent_keeps_cap_net_raw_for_icmp_probes():
    from connprobe.privileges import needed_for

    assert needed_for([_icmp("127.0.0.1"), spec("127.0.0.1:1", prober="tcp")]) == {"CAP_NET_RAW": ["t"]}


async def test_raw_socket_needs_cap_net_raw_and_says_so():
    """A thread without CAP_NET_RAW (the agent, had it dropped it) gets a one-line result naming it, not a firewall."""
    import asyncio
    import threading

    from connprobe.privileges import CAP_BITS, drop_to

    out = {}

    def run():
        # this thread only: capabilities are per thread
        drop_to(sum(1 << bit for name, bit in CAP_BITS.items() if name != "CAP_NET_RAW"))
        out["r"] = asyncio.run(_one(_icmp("127.0.0.1")))

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    r = out["r"]
    assert r.error is ErrorKind.INTERNAL and "needs CAP_NET_RAW" in r.error_detail, r.error_detail


async def test_source_ip_address(lab, src):
    srv = lab.server("srv1")
    assert (await _one(_icmp(srv.addr4, src, source_ip_address="10.77.1.2"))).ok
    r = await _one(_icmp(srv.addr4, src, source_ip_address="10.77.1.99"))  # not an address of the client
    assert r.error is ErrorKind.CONNECT_UNREACHABLE and "Cannot assign requested address" in r.error_detail
    r = await _one(_icmp(srv.addr4, src, source_ip_address="fd77:1::2"))
    assert r.error is ErrorKind.CONNECT_UNREACHABLE and "not of" in r.error_detail


async def test_blackbox_metrics_of_an_icmp_probe(lab, src):
    from prometheus_client import CollectorRegistry, generate_latest

    from connprobe.metrics import Metrics, probe_registry

    r = await _one(_icmp(lab.server("srv1").addr6, src))
    text = generate_latest(probe_registry(correlate(r, ()))).decode()
    assert "probe_icmp_reply_hop_limit 63.0" in text and "probe_success 1.0" in text
    for phase in ("resolve", "setup", "rtt"):
        assert f'probe_icmp_duration_seconds{{phase="{phase}"}}' in text
    assert 'probe_icmp_duration_seconds{phase="resolve"} 0.0' in text  # a literal address: nothing resolved
    m = Metrics(registry=CollectorRegistry())
    m.observe(correlate(r, ()))
    assert "probe_icmp_reply_hop_limit{probe=\"t\"" in generate_latest(m.registry).decode()
