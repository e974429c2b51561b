"""The prober's own DNS against an in-process dnspython server: resolution, faults, DNS probes."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from prober import DNSSpec, ErrorKind, HTTPSpec, ProbeEnv, ProbeKind, Proto, run_probe
from prober.resolve import ResolvConf, candidates, load_resolv_conf, resolve
from prober.sockets import get_source
from tests.prober.helpers import ms, spec
from tests.prober.servers import HttpServer, make_app


@pytest.fixture
async def dual_server():
    """One app on 127.0.0.1 and ::1, same port: srv1.lab.test's two addresses."""
    state = HttpServer("127.0.0.1", 0)
    runner = web.AppRunner(make_app(state), access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site4 = web.TCPSite(runner, "127.0.0.1", 0)
    await site4.start()
    state.port = site4._server.sockets[0].getsockname()[1]
    site6 = web.TCPSite(runner, "::1", state.port)
    await site6.start()
    yield state
    await runner.cleanup()


def test_candidates_follow_ndots_and_search():
    conf = ResolvConf(nameservers=("1.1.1.1",), search=("a.test", "b.test"), ndots=2)
    assert candidates("srv1", conf) == ["srv1.a.test.", "srv1.b.test.", "srv1."]
    assert candidates("x.y.z", conf) == ["x.y.z.", "x.y.z.a.test.", "x.y.z.b.test."]
    assert candidates("abs.name.", conf) == ["abs.name."]


def test_resolv_conf_parsing(tmp_path):
    p = tmp_path / "resolv.conf"
    p.write_text("nameserver 10.77.2.53\nnameserver fd77:2::53\nsearch lab.test other.test\n"
                 "options ndots:3 timeout:2 attempts:4\n")
    conf = load_resolv_conf(p)
    assert conf.nameservers == ("10.77.2.53", "fd77:2::53")
    assert conf.search == ("lab.test", "other.test")
    assert (conf.ndots, conf.timeout, conf.attempts) == (3, 2.0, 4)
    assert load_resolv_conf(tmp_path / "missing").nameservers == ()


async def test_a_and_aaaa_every_transaction_recorded(dns_server, resolv, env):
    res = await resolve(get_source("host"), "srv1", "all", time.monotonic_ns() + 2 * 10**9, env.on_local_port, resolv)
    assert res.error is None and sorted(res.addresses) == ["127.0.0.1", "::1"]
    assert sorted(t.qtype for t in res.transactions) == ["A", "AAAA"]
    for t in res.transactions:
        assert t.name == "srv1.lab.test." and t.rcode == "NOERROR" and t.transport is Proto.UDP
        assert t.flow is not None and t.flow.remote_port == dns_server.port
        assert t.end_ns > t.start_ns
    # the UDP ports the server saw are exactly the announced ones
    seen = sorted(p for proto, _, _, p in dns_server.queries if proto == "udp")
    assert seen == sorted(p for proto, p in env.ports if proto is Proto.UDP)
    assert seen == sorted(t.flow.local_port for t in res.transactions)


async def test_truncated_answer_falls_back_to_tcp(dns_server, resolv, env):
    res = await resolve(get_source("host"), "big.lab.test", "ipv4", time.monotonic_ns() + 2 * 10**9,
                        env.on_local_port, resolv)
    assert res.error is None and len(res.addresses) == 59
    assert [t.transport for t in res.transactions] == [Proto.UDP, Proto.TCP]
    assert res.transactions[1].flow.proto is Proto.TCP
    assert (Proto.TCP, res.transactions[1].flow.local_port) in env.ports


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
async def test_every_address_gets_its_own_result(dual_server, dns_server, env, client):
    s = spec(f"http://srv1.lab.test:{dual_server.port}/ok", ip_policy="all", section=HTTPSpec(client=client))
    results = await run_probe(s, env)
    assert sorted(r.address for r in results) == ["127.0.0.1", "::1"]
    for r in results:
        assert r.ok, r.error_detail
        assert r.phases[0].name == "resolve" and len(r.dns) == 2
        assert r.flows[-1].remote_addr == r.address
        assert {f.proto for f in r.flows} == {Proto.UDP, Proto.TCP}
    assert len(set(dual_server.peer_ports[-2:])) == 2


@pytest.mark.parametrize(("policy", "expect"), [("ipv4", ["127.0.0.1"]), ("ipv6", ["::1"]), ("first", ["::1"])])
async def test_ip_policy(dual_server, dns_server, env, policy, expect):
    results = await run_probe(spec(f"http://srv1.lab.test:{dual_server.port}/ok", ip_policy=policy), env)
    assert [r.address for r in results] == expect and all(r.ok for r in results)


async def test_ipv6_policy_without_aaaa_is_no_answer(dns_server, env):
    (r,) = await run_probe(spec("http://v4only.lab.test:1/", ip_policy="ipv6"), env)
    assert r.error is ErrorKind.DNS_NO_ANSWER and r.phases[0].name == "resolve"


@pytest.mark.parametrize(
    ("mode", "kind"),
    [("nxdomain", ErrorKind.DNS_NXDOMAIN), ("servfail", ErrorKind.DNS_SERVFAIL),
     ("refused", ErrorKind.DNS_REFUSED), ("timeout", ErrorKind.DNS_TIMEOUT)],
)
async def test_dns_faults_become_their_kind(dns_server, env, mode, kind):
    dns_server.fault("srv1.lab.test", mode)
    (r,) = await run_probe(spec("http://srv1.lab.test:1/ok", ip_policy="ipv4", timeout=2.0), env)
    assert not r.ok and r.error is kind, r
    assert r.phase("resolve") is not None and r.dns
    assert r.dns[0].flow is not None
    if mode == "timeout":
        assert r.dns[0].rcode is None and r.dns[0].end_ns is None


async def test_unknown_name_is_nxdomain_after_the_search_list(dns_server, env):
    (r,) = await run_probe(spec("http://nosuch:1/", ip_policy="ipv4"), env)
    assert r.error is ErrorKind.DNS_NXDOMAIN
    assert [t.name for t in r.dns] == ["nosuch.lab.test.", "nosuch."]


async def test_slow_dns_is_the_resolve_phase(dual_server, dns_server, env):
    dns_server.fault("srv1.lab.test", "slow", 0.12)
    (r,) = await run_probe(spec(f"http://srv1.lab.test:{dual_server.port}/ok", ip_policy="ipv4"), env)
    assert r.ok
    span = r.phase("resolve")
    assert ms(r, "resolve") >= 120
    # the phase spans exactly the prober's own queries (precision vs the injected delay: test_lab.py)
    assert span.start_ns <= min(t.start_ns for t in r.dns) and max(t.end_ns for t in r.dns) <= span.end_ns
    assert all((t.end_ns - t.start_ns) / 1e6 >= 120 for t in r.dns)
    assert ms(r, "resolve") < 200


async def test_dns_server_down_is_unreachable(resolv):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # bound, so the port is not in use by others
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = ResolvConf(nameservers=("127.0.0.1",), search=(), ndots=1, timeout=1.0, attempts=1, port=port)
    async with ProbeEnv(resolv_conf=conf) as env:
        (r,) = await run_probe(spec("http://srv1.lab.test:1/", ip_policy="ipv4"), env)
    assert r.error is ErrorKind.DNS_UNREACHABLE, r  # ICMP port unreachable on the connected UDP socket


# ---------------------------------------------------------------- dns probe kind


def _dns_spec(server: str, **kw):
    return spec(server, prober="dns", section=DNSSpec(**kw))


async def test_dns_probe_ok_and_answer_regex(dns_server, env):
    (r,) = await run_probe(_dns_spec(f"127.0.0.1:{dns_server.port}", query_name="srv1.lab.test",
                                     fail_if_answer_not_matches_regexp=(r"A 127\.0\.0\.1$",)), env)
    assert r.ok and r.kind is ProbeKind.DNS, r
    assert r.dns[0].answers == ("srv1.lab.test. A 127.0.0.1",)
    assert r.phase("resolve") is not None
    (r,) = await run_probe(_dns_spec(f"127.0.0.1:{dns_server.port}", query_name="srv1.lab.test",
                                     fail_if_answer_not_matches_regexp=("10.0.0.1",)), env)
    assert r.error is ErrorKind.DNS_UNEXPECTED and r.failed_validators == ("fail_if_answer_not_matches_regexp",)


async def test_dns_probe_rcode_and_tcp(dns_server, env):
    (r,) = await run_probe(_dns_spec(f"127.0.0.1:{dns_server.port}", query_name="nope.lab.test"), env)
    assert r.error is ErrorKind.DNS_NXDOMAIN and r.failed_validators == ("valid_rcodes",)
    (r,) = await run_probe(_dns_spec(f"127.0.0.1:{dns_server.port}", query_name="nope.lab.test",
                                     valid_rcodes=("NXDOMAIN",)), env)
    assert r.ok
    (r,) = await run_probe(_dns_spec(f"127.0.0.1:{dns_server.port}", query_name="txt.lab.test",
                                     query_type="TXT", transport="tcp"), env)
    assert r.ok and r.dns[0].transport is Proto.TCP and '"hello world"' in r.dns[0].answers[0]
    (r,) = await run_probe(_dns_spec(f"127.0.0.1:{dns_server.port}", query_name="txt.lab.test",
                                     fail_if_no_answer=True), env)
    assert r.error is ErrorKind.DNS_NO_ANSWER


async def test_dns_probe_uses_resolv_conf_server_when_no_target(dns_server, env):
    (r,) = await run_probe(_dns_spec("resolv.conf", query_name="srv1.lab.test"), env)
    assert r.ok and r.address == "127.0.0.1"


async def test_dns_probe_timeout(dns_server, env):
    dns_server.fault("srv1.lab.test", "timeout")
    t0 = asyncio.get_running_loop().time()
    (r,) = await run_probe(spec(f"127.0.0.1:{dns_server.port}", prober="dns", timeout=0.3,
                                section=DNSSpec(query_name="srv1.lab.test")), env)
    assert r.error is ErrorKind.DNS_TIMEOUT
    assert asyncio.get_running_loop().time() - t0 < 0.5
