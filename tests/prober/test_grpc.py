"""gRPC health probes against a real grpc.aio server with the standard health servicer on 127.0.0.1: serving, not
serving, an unknown service, no health service, no listener, plain and TLS (a CA made in the test)."""

from __future__ import annotations

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from correlator import correlate
from prober import ErrorKind, GRPCSpec, ProbeEnv, TLSSpec, run_probe
from tests.agent.pki import CA
from tests.prober.helpers import spec


async def _one(s):
    async with ProbeEnv() as env:
        (r,) = await run_probe(s, env)
    return r


def _grpc(target, timeout=3.0, **grpc_):
    return spec(target, prober="grpc", timeout=timeout, section=GRPCSpec(**grpc_))


async def _server(creds=None, with_health=True):
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    if with_health:
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", creds) if creds else server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await servicer.set("orders", health_pb2.HealthCheckResponse.SERVING)
    await servicer.set("billing", health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, port


@pytest.fixture
async def plain():
    server, port = await _server()
    yield port
    await server.stop(None)


@pytest.fixture
def pki(tmp_path):
    ca = CA(tmp_path, "grpc-ca")
    return ca, ca.issue("localhost", server=True)


async def test_serving_not_serving_and_unknown(plain):
    r = await _one(_grpc(f"127.0.0.1:{plain}"))
    assert r.ok, r.error_detail
    assert r.value("grpc_status_code") == 0 and r.value("grpc_serving_status") == 1
    assert [p.name for p in r.phases] == ["connect", "check"]
    assert r.flows[0].proto == "tcp" and r.flows[0].remote_port == plain  # the prober's own connection
    r = await _one(_grpc(f"127.0.0.1:{plain}", service="orders"))
    assert r.ok
    r = await _one(_grpc(f"127.0.0.1:{plain}", service="billing"))
    assert r.error is ErrorKind.VALIDATION and "NOT_SERVING" in r.error_detail
    assert r.value("grpc_serving_status") == 2 and r.failed_validators == ("serving_status",)
    assert correlate(r, ()).sub_cause == "http_error/validation"
    r = await _one(_grpc(f"127.0.0.1:{plain}", service="nobody"))
    assert r.error is ErrorKind.VALIDATION and r.value("grpc_status_code") == 5  # NOT_FOUND
    assert r.value("grpc_serving_status") == 3  # SERVICE_UNKNOWN


async def test_no_health_service_and_no_listener():
    server, port = await _server(with_health=False)
    try:
        r = await _one(_grpc(f"127.0.0.1:{port}"))
    finally:
        await server.stop(None)
    assert r.error is ErrorKind.PROTOCOL_ERROR and r.value("grpc_status_code") == 12  # UNIMPLEMENTED
    r = await _one(_grpc(f"127.0.0.1:{port}", timeout=2.0))  # nobody listens there now
    assert r.error is ErrorKind.CONNECT_REFUSED, r.error_detail
    assert r.value("grpc_status_code") == 14  # UNAVAILABLE


async def test_tls(pki, tmp_path):
    ca, pair = pki
    creds = grpc.ssl_server_credentials([(pair.key.read_bytes(), pair.cert.read_bytes())])
    server, port = await _server(creds)
    try:
        tls = TLSSpec(ca_file=str(ca.path), server_name="localhost")
        r = await _one(_grpc(f"127.0.0.1:{port}", tls=True, tls_config=tls))
        assert r.ok, r.error_detail
        stranger = CA(tmp_path, "stranger")
        r = await _one(_grpc(f"127.0.0.1:{port}", tls=True, tls_config=TLSSpec(ca_file=str(stranger.path),
                                                                              server_name="localhost")))
        assert r.error is ErrorKind.TLS_ERROR, (r.error, r.error_detail)
        r = await _one(_grpc(f"127.0.0.1:{port}"))  # plain text to a TLS server
        assert not r.ok and r.error in (ErrorKind.CONNECT_RESET, ErrorKind.CONNECT_UNREACHABLE,
                                        ErrorKind.PROTOCOL_ERROR), (r.error, r.error_detail)
    finally:
        await server.stop(None)


async def test_tls_min_cert_days(pki):
    """`grpc.tls_config.min_cert_days` as http's, on the leaf the second handshake reads (valid 1 day here)."""
    ca, pair = pki
    creds = grpc.ssl_server_credentials([(pair.key.read_bytes(), pair.cert.read_bytes())])
    server, port = await _server(creds)
    try:
        tls = TLSSpec(ca_file=str(ca.path), server_name="localhost", min_cert_days=2)
        r = await _one(_grpc(f"127.0.0.1:{port}", tls=True, tls_config=tls))
        assert r.error is ErrorKind.VALIDATION and r.failed_validators == ("min_cert_days",), r
        assert r.value("grpc_serving_status") == 1  # the service answered SERVING: only the certificate fails
        tls = TLSSpec(ca_file=str(ca.path), server_name="localhost", min_cert_days=0.5)
        r = await _one(_grpc(f"127.0.0.1:{port}", tls=True, tls_config=tls))
        assert r.ok, r.error_detail
    finally:
        await server.stop(None)
    with pytest.raises(ValueError, match=r"tls_config.min_cert_days: needs tls: true \(a plain connection has no "
                                         r"certificate\)"):
        GRPCSpec(tls_config=TLSSpec(min_cert_days=2))


async def test_tls_inline_pem_with_a_client_certificate(pki, tmp_path):
    """blackbox's inline `ca`, `cert`, `key` on a grpc probe, against a server that wants a client certificate."""
    ca, pair = pki
    client = ca.issue("prober", server=False)
    creds = grpc.ssl_server_credentials([(pair.key.read_bytes(), pair.cert.read_bytes())],
                                        root_certificates=ca.path.read_bytes(), require_client_auth=True)
    server, port = await _server(creds)
    try:
        tls = TLSSpec(ca=ca.path.read_text(), cert=client.cert.read_text(), key=client.key.read_text(),
                      server_name="localhost")
        r = await _one(_grpc(f"127.0.0.1:{port}", tls=True, tls_config=tls))
        assert r.ok, r.error_detail
        assert r.value("tls_version") in (1.2, 1.3)  # the second handshake speaks with the inline PEM too
        r = await _one(_grpc(f"127.0.0.1:{port}", tls=True,
                             tls_config=TLSSpec(ca=ca.path.read_text(), server_name="localhost")))
        assert not r.ok, "no client certificate: the server must refuse"
    finally:
        await server.stop(None)


def _leaf_facts(pair):
    import hashlib

    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest(), cert.not_valid_after_utc.timestamp()


async def test_tls_certificate_values_from_a_second_handshake(pki, tmp_path):
    """grpcio does not show the peer's chain: after an answer over TLS the prober reads it with a handshake of its
    own to the same address (a second, announced connection) — blackbox's probe_ssl_earliest_cert_expiry,
    probe_tls_version_info and probe_ssl_last_chain_info; no values without an answer."""
    ca, pair = pki
    client = ca.issue("prober", server=False)
    creds = grpc.ssl_server_credentials([(pair.key.read_bytes(), pair.cert.read_bytes())],
                                        root_certificates=ca.path.read_bytes(), require_client_auth=True)
    server, port = await _server(creds)
    fingerprint, not_after = _leaf_facts(pair)
    tls = TLSSpec(ca_file=str(ca.path), server_name="localhost", cert_file=str(client.cert),
                  key_file=str(client.key))
    ports = []
    try:
        async with ProbeEnv(on_local_port=lambda proto, p: ports.append((str(proto), p))) as env:
            for service in ("", "billing"):  # SERVING, NOT_SERVING: both answered
                (r,) = await run_probe(_grpc(f"127.0.0.1:{port}", tls=True, tls_config=tls, service=service), env)
                assert r.value("grpc_status_code") == 0, r.error_detail
                assert r.value("grpc_ssl") == 1 and r.value("tls_version") in (1.2, 1.3)
                assert r.value("ssl_earliest_cert_expiry") == pytest.approx(not_after, abs=1)
                assert r.value("ssl_last_chain_expiry") is None  # not a metric of blackbox's grpc prober
                leaf = dict(r.tls_leaf)
                assert leaf["fingerprint_sha256"] == fingerprint and leaf["subject"] == "CN=localhost"
                assert leaf["issuer"] == "CN=grpc-ca" and leaf["subjectalternative"] == "localhost"
                rpc, second = r.flows  # the RPC's connection, then the handshake's: both the prober's own
                assert second.remote_port == rpc.remote_port == port and second.local_port != rpc.local_port
                assert {("tcp", rpc.local_port), ("tcp", second.local_port)} <= set(ports)
            (r,) = await run_probe(_grpc(f"127.0.0.1:{port}", tls=True, tls_config=tls, service="nobody"), env)
            assert r.value("grpc_status_code") == 5 and r.value("grpc_ssl") == 0  # no answer: no TLS values
            assert r.value("tls_version") is None and not r.tls_leaf and len(r.flows) == 1
            stranger = CA(tmp_path, "stranger")
            (r,) = await run_probe(_grpc(f"127.0.0.1:{port}", tls=True, tls_config=TLSSpec(
                ca_file=str(stranger.path), server_name="localhost")), env)
            assert r.error is ErrorKind.TLS_ERROR and r.value("ssl_earliest_cert_expiry") is None
    finally:
        await server.stop(None)
    from connprobe.metrics import kind_series

    assert kind_series(r)["probe_ssl_earliest_cert_expiry"] == [(None, 0.0)]  # blackbox: 0 without an answer


@pytest.mark.kernel
async def test_from_a_lab_namespace_over_the_probers_own_socket(lab):
    """The connection is the prober's: made in the source namespace, announced, its flow recorded; a policy
    drop of its SYN is a connect_timeout like a TCP probe's."""
    srv = lab.server("srv1")
    ports = []
    s = spec(f"{srv.addr4}:{srv.port}", prober="grpc", source=f"netns {lab.ns('client').name}", timeout=1.5,
             section=GRPCSpec())
    async with ProbeEnv(on_local_port=lambda proto, port: ports.append((str(proto), port))) as env:
        (r,) = await run_probe(s, env)  # an HTTP/1.1 server: not a gRPC one
        assert not r.ok and r.error is not ErrorKind.SOURCE_ERROR, r.error_detail
        (flow,) = r.flows
        assert (flow.netns, flow.local_addr) == (lab.ns("client").inode, "10.77.1.2")
        assert ports == [("tcp", flow.local_port)]
        with lab.policy_drop("srv1", direction="in", proto="tcp", port=srv.port):
            (r,) = await run_probe(s, env)
    assert r.error is ErrorKind.CONNECT_TIMEOUT and [p.name for p in r.phases] == ["connect"]
    assert r.value("grpc_status_code") == 4  # DEADLINE_EXCEEDED, as grpc would have said


async def test_refused_target_sends_nothing(plain):
    from prober.sockets import connect_guard

    def refuse(addr):
        raise PermissionError(1, f"{addr} is not allowed")

    token = connect_guard.set(refuse)
    try:
        r = await _one(_grpc(f"127.0.0.1:{plain}"))
    finally:
        connect_guard.reset(token)
    assert r.error is ErrorKind.CONNECT_EPERM and "127.0.0.1 is not allowed" in r.error_detail
    assert "check" not in r.phase_durations_ns()  # refused at the prober's connect: grpc never started


async def test_blackbox_metrics_of_a_grpc_probe(plain):
    from prometheus_client import CollectorRegistry, generate_latest

    from connprobe.metrics import Metrics, probe_registry

    r = await _one(_grpc(f"127.0.0.1:{plain}", service="billing"))
    text = generate_latest(probe_registry(correlate(r, ()))).decode()
    assert 'probe_grpc_healthcheck_response{serving_status="NOT_SERVING"} 1.0' in text
    assert 'probe_grpc_healthcheck_response{serving_status="SERVING"} 0.0' in text
    assert "probe_grpc_status_code 0.0" in text and "probe_grpc_ssl 0.0" in text
    assert 'probe_grpc_duration_seconds{phase="check"}' in text and "probe_success 0.0" in text
    m = Metrics(registry=CollectorRegistry())
    m.observe(correlate(r, ()))
    agent = generate_latest(m.registry).decode()
    assert ('probe_grpc_healthcheck_response{probe="t",serving_status="NOT_SERVING",source="host",'
            f'target="127.0.0.1:{plain}"}} 1.0') in agent


async def test_relay_splices_only_the_agents_own_connection():
    """Another process connecting to the relay's abstract socket is turned away (SO_PEERCRED), the channel is not."""
    import asyncio
    import socket
    import subprocess
    import sys

    from prober.grpc import _Relay

    ours, theirs = socket.socketpair()
    up_reader, up_writer = await asyncio.open_connection(sock=ours)
    relay = _Relay(up_reader, up_writer)
    await relay.start()
    try:
        code = ("import socket; s = socket.socket(socket.AF_UNIX); s.connect('\\0' + " + repr(relay.name) + "); "
                "print(s.recv(1) == b'')")
        out = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code], capture_output=True,
                                      text=True, timeout=20)
        assert out.stdout.strip() == "True", out.stderr  # closed at once
        assert relay.local is None  # still waiting for the channel
        _, writer = await asyncio.open_unix_connection(path="\0" + relay.name)
        writer.write(b"ping")
        await writer.drain()
        assert await asyncio.to_thread(theirs.recv, 4) == b"ping"  # spliced to the upstream connection
        writer.close()
    finally:
        await relay.aclose()
        theirs.close()
