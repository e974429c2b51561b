"""Probes in the lab (real namespaces): every ErrorKind from its real cause, phase accuracy, IPv6,
per-address results, the source namespace, and the local-port callback firing before the SYN."""

from __future__ import annotations

import asyncio
import select
import socket
import time

import dns.message
import dns.query
import pytest

from prober import DNSSpec, ErrorKind, HTTPSpec, ProbeEnv, Proto, TCPSpec, TLSSpec, run_probe
from tests.prober.helpers import ms, spec

pytestmark = pytest.mark.kernel


@pytest.fixture
def src(lab) -> str:
    return f"netns {lab.ns('client').name}"


@pytest.fixture
async def penv():
    ports: list = []
    async with ProbeEnv(on_local_port=lambda proto, port: ports.append((proto, port))) as e:
        e.ports = ports
        yield e


def _http(url, src, timeout=3.0, client="aiohttp", **http):
    return spec(url, source=src, timeout=timeout, section=HTTPSpec(client=client, **http))


@pytest.mark.parametrize("client", ["aiohttp", "aiohttp-session", "httpx"])
async def test_healthy_by_name_uses_the_client_namespace_and_its_resolver(lab, src, penv, client):
    srv = lab.server("srv1")
    (r,) = await run_probe(_http(f"http://srv1.lab.test:{srv.port}/ok", src, client=client), penv)
    assert r.ok, r.error_detail
    assert r.address in (srv.addr4, srv.addr6) and r.source == lab.ns("client").name
    assert [p.name for p in r.phases] == ["resolve", "connect", "processing", "transfer"]
    client_inode = lab.ns("client").inode
    assert r.flows and all(f.netns == client_inode for f in r.flows)
    assert {t.server for t in r.dns} <= {lab.dns_addr4, lab.dns_addr6}
    assert {(f.proto, f.local_port) for f in r.flows} == set(penv.ports)  # every flow announced


async def test_source_namespace_is_honoured(lab, src, penv):
    """srv1's address exists only inside the lab: only the client namespace reaches it."""
    srv = lab.server("srv1")
    (r,) = await run_probe(spec(f"{srv.addr4}:{srv.port}", prober="tcp", source=src), penv)
    assert r.ok and r.flows[0].netns == lab.ns("client").inode and r.flows[0].local_addr == "10.77.1.2"
    path = f"/run/netns/{lab.ns('client').name}"  # the same source as netns NAME
    (r,) = await run_probe(spec(f"{srv.addr4}:{srv.port}", prober="tcp", source=path), penv)
    assert r.ok and r.source == lab.ns("client").name and r.flows[0].netns == lab.ns("client").inode


@pytest.mark.parametrize("client", ["aiohttp", "aiohttp-session", "httpx"])
async def test_ipv6(lab, src, penv, client):
    srv = lab.server("srv1")
    (r,) = await run_probe(_http(srv.url("/ok", family=6), src, client=client), penv)
    assert r.ok, r.error_detail
    assert r.address == srv.addr6 and r.flows[0].remote_addr == srv.addr6
    assert r.flows[0].local_addr.startswith("fd77:1::")


async def test_every_address_of_a_name(lab, src, penv):
    s = spec(f"http://both.lab.test:{lab.server('srv1').port}/ok", source=src, ip_policy="all")
    results = await run_probe(s, penv)
    expected = {lab.server(s).addr4 for s in ("srv1", "srv2")} | {lab.server(s).addr6 for s in ("srv1", "srv2")}
    assert {r.address for r in results} == expected
    assert all(r.ok for r in results), [r.error_detail for r in results]
    assert len({r.flows[-1].local_port for r in results}) == 4


async def test_callback_fires_before_the_syn(lab, src):
    """A listener inside srv1 must not have seen the connection when the callback runs, and the peer
    port it then accepts is the port the callback announced."""
    listener = lab.executor("srv1").socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((lab.server("srv1").addr4, 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    seen: list[tuple[Proto, int, bool]] = []

    def on_local_port(proto, p):
        readable, _, _ = select.select([listener], [], [], 0)
        seen.append((proto, p, bool(readable)))

    try:
        async with ProbeEnv(on_local_port=on_local_port) as env:
            (r,) = await run_probe(spec(f"{lab.server('srv1').addr4}:{port}", prober="tcp", source=src), env)
        assert r.ok
        conn, peer = listener.accept()
        conn.close()
        assert seen == [(Proto.TCP, peer[1], False)]
        assert r.flows[0].local_port == peer[1]
    finally:
        listener.close()


# ---------------------------------------------------------------- phase accuracy


@pytest.mark.parametrize("client", ["aiohttp", "aiohttp-session", "httpx"])
async def test_server_delay_is_processing_within_2ms(lab, src, penv, client):
    """The server measures its own sleep D (X-Slept); processing - D stays under 2 ms. Minimum of 9: a
    systematic error (a stamp in the wrong place) shows in every sample, a busy machine's scheduling
    noise only in some; the benchmark reports the median (BENCH)."""
    srv = lab.server("srv1")
    over = []
    for _ in range(9):
        (r,) = await run_probe(_http(srv.url("/slow?delay=0.2"), src, client=client,
                                     capture_headers=("X-Slept",)), penv)
        assert r.ok
        slept_ms = float(dict(r.captured_headers)["X-Slept"]) * 1e3
        assert ms(r, "processing") > slept_ms, (ms(r, "processing"), slept_ms)  # never less than the sleep
        over.append(ms(r, "processing") - slept_ms)
    assert min(over) < 2.0, over


async def test_dns_delay_is_resolve_within_2ms(lab, src, penv):
    """With a DNS delay E injected, the resolve phase is E plus what a bare dnspython query from the same
    namespace measures for the same answer, within 2 ms (minimum of 7 each: a busy machine's scheduling
    noise stays out; the lab DNS server is a Python process too)."""
    url = f"http://srv1.lab.test:{lab.server('srv1').port}/ok"

    def raw_ms() -> float:
        q = dns.message.make_query("srv1.lab.test.", "A")
        t0 = time.monotonic_ns()
        dns.query.udp(q, lab.dns_addr4, timeout=2)
        return (time.monotonic_ns() - t0) / 1e6

    with lab.dns_fault("srv1.lab.test", "slow", delay=0.15):
        raw = min(lab.executor("client").call(raw_ms) for _ in range(7))
        got = []
        for _ in range(7):
            (r,) = await run_probe(spec(url, source=src, ip_policy="ipv4"), penv)
            assert r.ok and len(r.dns) == 1
            got.append(ms(r, "resolve"))
    assert raw >= 150 and all(x >= 150 for x in got)
    assert abs(min(got) - raw) < 2.0, (got, raw)


# ---------------------------------------------------------------- every error kind, real causes


async def _one(penv, s):
    (r,) = await run_probe(s, penv)
    return r


async def test_dns_kinds(lab, src, penv):
    port = lab.server("srv1").port
    with lab.dns_fault("srv1.lab.test", "nxdomain"):
        r = await _one(penv, _http(f"http://srv1.lab.test:{port}/ok", src))
    assert r.error is ErrorKind.DNS_NXDOMAIN and r.dns[0].rcode == "NXDOMAIN"
    assert (await _one(penv, _http(f"http://fail.lab.test:{port}/", src))).error is ErrorKind.DNS_SERVFAIL
    assert (await _one(penv, _http(f"http://refused.lab.test:{port}/", src))).error is ErrorKind.DNS_REFUSED
    r = await _one(penv, _http(f"http://void.lab.test:{port}/", src))
    assert r.error is ErrorKind.DNS_TIMEOUT and all(t.rcode is None for t in r.dns)
    s = spec(f"http://v4only.lab.test:{port}/", source=src, ip_policy="ipv6")
    assert (await _one(penv, s)).error is ErrorKind.DNS_NO_ANSWER
    with lab.policy_drop(ns="dns", direction="in", proto="udp", port=53, action="reject"):
        r = await _one(penv, _http(f"http://srv1.lab.test:{port}/ok", src))
    assert r.error is ErrorKind.DNS_UNREACHABLE, r
    s = spec(f"http://large.lab.test:{port}/", source=src, ip_policy="ipv4")  # 60 A records: TC, then TCP
    r = await _one(penv, s)
    assert r.dns[0].transport is Proto.UDP and r.dns[1].transport is Proto.TCP and r.address.startswith("10.77.3.")
    s = spec(lab.dns_addr4, prober="dns", source=src,
             section=DNSSpec(query_name="srv1.lab.test", fail_if_answer_not_matches_regexp=("10\\.0\\.0\\.99",)))
    assert (await _one(penv, s)).error is ErrorKind.DNS_UNEXPECTED


async def test_connect_kinds(lab, src, penv):
    srv = lab.server("srv1")
    with lab.policy_drop(ns="srv1", direction="in", proto="tcp", port=srv.port, action="drop"):
        r = await _one(penv, _http(srv.url("/ok"), src, timeout=1.5))
    assert r.error is ErrorKind.CONNECT_TIMEOUT and ms(r, "connect") > 1400
    with lab.no_listener("srv1"):
        r = await _one(penv, _http(srv.url("/ok"), src))
    assert r.error is ErrorKind.CONNECT_REFUSED
    # Local firewall: the kernel ignores EPERM on a SYN (it retransmits, then times out), but sendmsg
    # of the probe's own DNS query gets EPERM straight away.
    with lab.policy_drop(ns="client", direction="out", proto="tcp", port=srv.port, action="drop"):
        r = await _one(penv, _http(srv.url("/ok"), src, timeout=1.0))
    assert r.error is ErrorKind.CONNECT_TIMEOUT, r
    with lab.policy_drop(ns="client", direction="out", proto="udp", port=53, action="drop"):
        r = await _one(penv, _http(f"http://srv1.lab.test:{srv.port}/ok", src))
    assert r.error is ErrorKind.CONNECT_EPERM, r
    assert r.phases[0].name == "resolve" and r.dns and all(t.flow is not None for t in r.dns)
    r = await _one(penv, spec("10.77.9.9:80", prober="tcp", source=src))  # no route beyond the lab router
    assert r.error is ErrorKind.CONNECT_UNREACHABLE, r
    with lab.policy_drop(ns="srv1", direction="in", proto="tcp", port=srv.port, action="reject",
                         expr="tcp flags & (syn | ack) == ack"):
        r = await _one(penv, _http(srv.url("/ok"), src))
    assert r.error is ErrorKind.CONNECT_RESET, r


@pytest.mark.parametrize("client", ["aiohttp", "aiohttp-session", "httpx"])
async def test_http_kinds(lab, src, penv, client):
    srv = lab.server("srv1")
    r = await _one(penv, _http(srv.url("/ok", tls=True), src, client=client))  # lab CA not trusted
    assert r.error is ErrorKind.TLS_ERROR
    r = await _one(penv, _http(srv.url("/ok", tls=True), src, client=client, tls=TLSSpec(ca_file=str(lab.ca_file))))
    assert r.ok and r.phase("tls") is not None
    with lab.slow_upstream("srv1", 3.0):
        r = await _one(penv, _http(srv.url("/ok"), src, timeout=1.0, client=client))
    assert r.error is ErrorKind.READ_TIMEOUT and ms(r, "processing") > 900
    with lab.http_status("srv1", 503):
        r = await _one(penv, _http(srv.url("/ok"), src, client=client))
    assert r.error is ErrorKind.HTTP_STATUS and r.http_status == 503
    r = await _one(penv, _http(srv.url("/ok"), src, client=client, fail_if_body_not_matches_regexp=("nope",)))
    assert r.error is ErrorKind.VALIDATION
    plain_to_tls = f"http://{srv.addr4}:{srv.tls_port}/ok"  # HTTP spoken to a TLS port
    r = await _one(penv, _http(plain_to_tls, src, client=client))
    assert r.error in (ErrorKind.PROTOCOL_ERROR, ErrorKind.CONNECT_RESET), r


async def test_missing_source_namespace(lab, penv):
    r = await _one(penv, spec(f"{lab.server('srv1').addr4}:80", prober="tcp", source="netns cp-nosuch-client"))
    assert r.error is ErrorKind.SOURCE_ERROR


async def test_tcp_send_expect_in_lab(lab, src, penv):
    srv = lab.server("srv1")
    s = spec(f"{srv.addr4}:{srv.port}", prober="tcp", source=src,
             section=TCPSpec(send="GET /ok HTTP/1.0\\r\\n\\r\\n", expect="srv1 ok"))
    r = await _one(penv, s)
    assert r.ok, r
    await asyncio.sleep(0)
