"""DNS over TLS (`dns.transport: tls`, blackbox's `dns_over_tls`) and `dns.source_ip_address`, against real
servers on loopback: the in-process DNS server speaking RFC 7858 with a test CA's certificate, a server that
accepts and never starts TLS, and TLS servers that answer with hostile bytes; source addresses on loopback (lo's
127/8, no address added) and in the lab's client namespace."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct

import dns.message
import pytest

from connprobe.metrics import kind_series
from prober import DNSSpec, ErrorKind, ProbeEnv, Proto, run_probe
from prober.attempt import Prepared
from prober.spec import TLSSpec
from tests.agent.pki import CA
from tests.prober.helpers import spec
from tests.prober.servers import DnsServer


@pytest.fixture
def pki(tmp_path):
    ca = CA(tmp_path, "dot-ca")
    pair = ca.issue("localhost", server=True)  # SANs: localhost, 127.0.0.1
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pair.cert, pair.key)
    stranger = CA(tmp_path, "stranger-ca")
    return ca, ctx, stranger


@pytest.fixture
async def dot_server(pki):
    srv = DnsServer(tls=pki[1])
    srv.add("srv1.lab.test", "A", "127.0.0.1")
    srv.add("lab.test", "SOA", "ns1.lab.test. hostmaster.lab.test. 2026120101 3600 600 86400 60")
    await srv.start()
    yield srv
    await srv.stop()


def _dot(target: str, timeout: float = 3.0, **kw):
    return spec(target, prober="dns", timeout=timeout, section=DNSSpec(transport="tls", **kw))


async def test_dot_answer_phases_and_announced_flow(dot_server, pki, env):
    ca = pki[0]
    (r,) = await run_probe(_dot(f"127.0.0.1:{dot_server.port}", query_name="srv1.lab.test",
                                tls_config=TLSSpec(ca_file=str(ca.path))), env)
    assert r.ok, r.error_detail
    (tx,) = r.dns
    assert tx.transport is Proto.TCP and tx.answers == ("srv1.lab.test. A 127.0.0.1",)
    assert tx.flow.remote_port == dot_server.port
    # the query's socket was announced before its SYN, and it is the one the server saw the question on
    assert (Proto.TCP, tx.flow.local_port) in env.ports
    assert dot_server.queries[-1] == ("tls", "srv1.lab.test.", "A", tx.flow.local_port)
    connect, tls = r.phase("connect"), r.phase("tls")
    assert connect is not None and tls is not None
    assert connect.end_ns <= tls.start_ns and tls.end_ns <= tx.end_ns
    # blackbox's probe_dns_duration_seconds: connect = TCP connect + TLS handshake, request = the rest
    phases = dict(kind_series(r)["probe_dns_duration_seconds"])
    assert phases["connect"] == pytest.approx((connect.duration_ns + tls.duration_ns) / 1e9)
    assert phases["request"] == pytest.approx((tx.end_ns - tx.start_ns) / 1e9 - phases["connect"])
    assert phases["request"] >= 0
    # no probe_ssl_* / probe_tls_version_info: blackbox 0.23's DNS prober exports none for DoT
    assert not {"probe_ssl_earliest_cert_expiry", "probe_tls_version_info"} & set(kind_series(r))
    # the certificate is checked for the name given as server_name too
    (r,) = await run_probe(_dot(f"127.0.0.1:{dot_server.port}", query_name="lab.test", query_type="SOA",
                                tls_config=TLSSpec(ca_file=str(ca.path), server_name="localhost")), env)
    assert r.ok and r.value("dns_serial") == 2026120101, r.error_detail


async def test_dot_over_plain_tcp_keeps_its_connect_phase(pki, env):
    srv = DnsServer()
    srv.add("srv1.lab.test", "A", "127.0.0.1")
    await srv.start()
    try:
        s = spec(f"127.0.0.1:{srv.port}", prober="dns", section=DNSSpec(query_name="srv1.lab.test", transport="tcp"))
        (r,) = await run_probe(s, env)
    finally:
        await srv.stop()
    assert r.ok, r.error_detail
    assert r.phase("connect") is not None and r.phase("tls") is None
    phases = dict(kind_series(r)["probe_dns_duration_seconds"])
    assert phases["connect"] == pytest.approx(r.phase("connect").duration_ns / 1e9)
    # UDP: nothing to set up
    srv = DnsServer()
    srv.add("srv1.lab.test", "A", "127.0.0.1")
    await srv.start()
    try:
        (r,) = await run_probe(spec(f"127.0.0.1:{srv.port}", prober="dns", section=DNSSpec(query_name="srv1.lab.test")),
                               env)
    finally:
        await srv.stop()
    assert r.ok and dict(kind_series(r)["probe_dns_duration_seconds"])["connect"] == 0.0


@pytest.mark.parametrize("case", ["stranger_ca", "wrong_name", "skip_verify"])
async def test_dot_certificate_is_checked(dot_server, pki, env, case):
    ca, _, stranger = pki
    tls = {"stranger_ca": TLSSpec(ca_file=str(stranger.path)),
           "wrong_name": TLSSpec(ca_file=str(ca.path), server_name="dns.elsewhere.test"),
           "skip_verify": TLSSpec(insecure_skip_verify=True)}[case]
    (r,) = await run_probe(_dot(f"127.0.0.1:{dot_server.port}", query_name="srv1.lab.test", tls_config=tls), env)
    if case == "skip_verify":
        assert r.ok, r.error_detail
        return
    assert r.error is ErrorKind.TLS_ERROR, (r.error, r.error_detail)
    assert r.error_detail.startswith("SSLCertVerificationError: ") and "\n" not in r.error_detail
    assert ("unable to get local issuer" in r.error_detail if case == "stranger_ca"
            else "mismatch" in r.error_detail), r.error_detail
    assert r.phase("tls") is not None and r.values and r.value("dns_query_succeeded") == 0.0
    assert not any(q[0] == "tls" for q in dot_server.queries)  # no question left before the check


async def test_dot_server_that_never_starts_tls_ends_by_the_deadline(env):
    accepted = []

    async def silent(reader, writer):  # takes the connection, says nothing, reads nothing
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        (r,) = await run_probe(_dot(f"127.0.0.1:{port}", timeout=0.5, query_name="srv1.lab.test",
                                    tls_config=TLSSpec(insecure_skip_verify=True)), env)
    finally:
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()
    assert r.error is ErrorKind.DNS_TIMEOUT and r.error_detail == "timeout in the TLS handshake", r.error_detail
    tls = r.phase("tls")
    assert tls is not None and tls.end_ns <= r.end_ns
    assert r.duration_ns < 0.5e9 + 1e9  # the probe's deadline held (a generous margin for a loaded machine)
    assert r.value("dns_query_succeeded") == 0.0


async def test_dot_server_that_hangs_up_in_the_handshake_is_a_tls_error(env):
    async def rude(reader, writer):  # reads the ClientHello, then resets the connection
        await reader.read(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    server = await asyncio.start_server(rude, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        (r,) = await run_probe(_dot(f"127.0.0.1:{port}", query_name="srv1.lab.test",
                                    tls_config=TLSSpec(insecure_skip_verify=True)), env)
    finally:
        server.close()
        await server.wait_closed()
    assert r.error is ErrorKind.TLS_ERROR and "\n" not in r.error_detail, (r.error, r.error_detail)
    assert r.phase("tls") is not None


def _answer_of(query: bytes) -> bytes:
    q = dns.message.from_wire(query)
    return dns.message.make_response(q).to_wire()


# what a hostile DoT server sends after the handshake, given the question: bytes, then close (or stall)
HOSTILE = {
    "wrong_id": (lambda q: _frame(b"\xbe\xef" + _answer_of(q)[2:]), ErrorKind.PROTOCOL_ERROR,
                 "TLS answer does not match the question"),
    "garbage": (lambda q: _frame(b"\x00" * 5), ErrorKind.PROTOCOL_ERROR, "malformed answer"),
    "huge_garbage": (lambda q: _frame(bytes(range(256)) * 255), ErrorKind.PROTOCOL_ERROR, "malformed answer"),
    "short": (lambda q: struct.pack("!H", 1000) + b"abc", ErrorKind.DNS_UNREACHABLE,
              "closed the TLS connection early"),
    "half_length": (lambda q: b"\x03", ErrorKind.DNS_UNREACHABLE, "closed the TLS connection early"),
    "stall": (None, ErrorKind.DNS_TIMEOUT, "timeout"),
}


def _frame(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_dot_answers(pki, env, case):
    reply, kind, words = HOSTILE[case]
    held = []

    async def handle(reader, writer):
        try:
            head = await reader.readexactly(2)
            query = await reader.readexactly(struct.unpack("!H", head)[0])
            if reply is None:
                held.append(writer)
                return
            writer.write(reply(query))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=pki[1])
    port = server.sockets[0].getsockname()[1]
    try:
        (r,) = await run_probe(_dot(f"127.0.0.1:{port}", timeout=1.0, query_name="srv1.lab.test",
                                    tls_config=TLSSpec(ca_file=str(pki[0].path))), env)
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()
    assert r.error is kind and words in r.error_detail, (r.error, r.error_detail)
    assert "\n" not in r.error_detail and len(r.error_detail) < 400
    assert r.phase("tls") is not None and r.phase("tls").end_ns < r.end_ns  # the handshake itself was fine


async def test_dot_ca_file_gone_is_one_line_tls_error(env, tmp_path):
    (r,) = await run_probe(_dot("127.0.0.1:9", query_name="srv1.lab.test",
                                tls_config=TLSSpec(ca_file=str(tmp_path / "gone.pem"))), env)
    assert r.error is ErrorKind.TLS_ERROR and r.error_detail.startswith("tls_config: "), r.error_detail
    assert "No such file or directory" in r.error_detail and "\n" not in r.error_detail
    assert not r.dns and not r.flows  # nothing was sent


def test_dot_target_without_port_is_853_and_config_checks():
    s = _dot("127.0.0.1", query_name="srv1.lab.test")
    assert Prepared(s).target.port == 853
    assert Prepared(_dot("127.0.0.1:8853", query_name="srv1.lab.test")).target.port == 8853
    assert Prepared(spec("127.0.0.1", prober="dns", section=DNSSpec(query_name="x.test"))).target.port == 53
    with pytest.raises(ValueError, match="tls_config: only used with transport: tls"):
        DNSSpec(query_name="x.test", transport="tcp", tls_config=TLSSpec(insecure_skip_verify=True))
    with pytest.raises(ValueError, match="min_cert_days: not supported for dns probes"):
        DNSSpec(query_name="x.test", transport="tls", tls_config=TLSSpec(min_cert_days=3))
    with pytest.raises(ValueError, match="is not an IP address"):
        DNSSpec(query_name="x.test", source_ip_address="10.0.0.300")


# ---------------------------------------------------------------- source_ip_address (127.0.0.0/8 is lo's already)


@pytest.mark.parametrize("transport", ["udp", "tcp", "tls"])
async def test_dns_source_ip_address(pki, env, transport):
    srv = DnsServer(tls=pki[1] if transport == "tls" else None)
    srv.add("srv1.lab.test", "A", "127.0.0.1")
    seen = []
    await srv.start()
    tls = {"tls_config": TLSSpec(ca_file=str(pki[0].path))} if transport == "tls" else {}
    try:
        s = spec(f"127.0.0.1:{srv.port}", prober="dns",
                 section=DNSSpec(query_name="srv1.lab.test", transport=transport, source_ip_address="127.0.0.2",
                                 **tls))
        (r,) = await run_probe(s, env)
        seen.extend(srv.queries)
        assert r.ok, r.error_detail
        assert r.dns[-1].flow.local_addr == "127.0.0.2"
        assert (Proto.UDP if transport == "udp" else Proto.TCP, r.dns[-1].flow.local_port) in env.ports
        # the other family: refused before any socket is made
        s = spec(f"127.0.0.1:{srv.port}", prober="dns",
                 section=DNSSpec(query_name="srv1.lab.test", transport=transport, source_ip_address="::1", **tls))
        (r,) = await run_probe(s, env)
        assert r.error is ErrorKind.DNS_UNREACHABLE and "is not of 127.0.0.1's family" in r.error_detail
        assert not r.dns
        # an address this host does not have: bind fails, no packet leaves
        s = spec(f"127.0.0.1:{srv.port}", prober="dns",
                 section=DNSSpec(query_name="srv1.lab.test", transport=transport, source_ip_address="192.0.2.77",
                                 **tls))
        (r,) = await run_probe(s, env)
        assert not r.ok and "Cannot assign requested address" in r.error_detail, (r.error, r.error_detail)
    finally:
        await srv.stop()
    assert len(seen) == 1


@pytest.mark.kernel
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_dns_source_ip_address_in_a_lab_namespace(lab, transport):
    """From the lab's client namespace to the lab's DNS server: bound to the client's own address, and refused
    (bind fails, nothing sent) with an address the client does not have."""
    src = f"netns {lab.ns('client').name}"
    ports = []
    async with ProbeEnv(on_local_port=lambda proto, port: ports.append((proto, port))) as env:
        s = spec(lab.dns_addr4, prober="dns", source=src,
                 section=DNSSpec(query_name="srv1.lab.test", transport=transport, source_ip_address="10.77.1.2"))
        (r,) = await run_probe(s, env)
        assert r.ok, r.error_detail
        flow = r.dns[-1].flow
        assert (flow.local_addr, flow.netns) == ("10.77.1.2", lab.ns("client").inode)
        assert (flow.proto, flow.local_port) in ports
        s = spec(lab.dns_addr4, prober="dns", source=src,
                 section=DNSSpec(query_name="srv1.lab.test", transport=transport, source_ip_address="10.77.1.99"))
        (r,) = await run_probe(s, env)
    assert r.error is ErrorKind.DNS_UNREACHABLE and "Cannot assign requested address" in r.error_detail, r
