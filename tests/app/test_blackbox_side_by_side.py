"""connprobe next to blackbox_exporter 0.23 (Debian's prometheus-blackbox-exporter, installed by scripts/setup):
one blackbox.yml, loaded by both; the same module against the same loopback target; the metric names and the
values that do not depend on timing compared one by one."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import urllib.parse
from pathlib import Path

import dns.message
import dns.rrset
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.agent.helpers import AgentProcess, free_port, http_get, wait_for
from tests.agent.pki import CA, server_context
from tests.prober.servers import DnsServer, serve_plain_and_tls

BLACKBOX = "prometheus-blackbox-exporter"

# metrics whose value is a duration or a wall-clock time of the run: compared by name only
TIMING = {"probe_duration_seconds", "probe_http_duration_seconds", "probe_dns_lookup_time_seconds",
          "probe_dns_duration_seconds", "probe_icmp_duration_seconds", "probe_grpc_duration_seconds"}
# blackbox_exporter 0.23 metrics connprobe does not export (README: "Side by side with blackbox_exporter 0.23")
NOT_EXPORTED: set[str] = set()


def _families(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _blackbox_view(samples: dict) -> dict:
    """Only blackbox's own metric names (connprobe adds connprobe_*)."""
    return {k: v for k, v in samples.items() if k[0].startswith("probe_")}


@pytest.fixture
async def targets(tmp_path):
    ca = CA(tmp_path, "side-ca")
    pair = ca.issue("localhost", server=True)
    ctx = server_context(pair)

    async def ok(request):
        return web.Response(text="ok from the lab", headers={"Last-Modified": "Mon, 30 Nov 2026 12:00:00 GMT"})

    async def redirect(request):
        raise web.HTTPFound("/ok")

    async def gz(request):  # gzip when the client says it takes it (Go's transport asks by itself)
        import gzip

        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=gzip.compress(b"ok from the lab " * 50), headers={"Content-Encoding": "gzip"})
        return web.Response(body=b"ok from the lab " * 50)

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/gz", gz)
    runner, http_port, https_port = await serve_plain_and_tls(app, ctx)

    async def smtp(reader, writer):
        writer.write(b"220 mail.lab.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                cmd = line.strip().upper()
                if cmd.startswith(b"EHLO"):
                    writer.write(b"250-mail.lab.test\r\n250 STARTTLS\r\n")
                elif cmd == b"STARTTLS":
                    writer.write(b"220 go ahead\r\n")
                    await writer.drain()
                    await writer.start_tls(ctx)
                elif cmd == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    break
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    smtp_server = await asyncio.start_server(smtp, "127.0.0.1", 0)

    def sections(wire: bytes, proto: str) -> bytes:
        msg = dns.message.from_wire(wire)
        if msg.answer:
            msg.authority.append(dns.rrset.from_text("lab.test.", 60, "IN", "NS", "ns1.lab.test."))
            msg.additional.append(dns.rrset.from_text("ns1.lab.test.", 60, "IN", "A", "127.0.0.53"))
        return msg.to_wire()

    from tests.prober.test_grpc import _server as grpc_health_server

    grpc_server, grpc_port = await grpc_health_server()
    import grpc

    grpc_tls_server, grpc_tls_port = await grpc_health_server(
        grpc.ssl_server_credentials([(pair.key.read_bytes(), pair.cert.read_bytes())]))
    dns_server = DnsServer()
    dns_server.add("both.lab.test", "A", "127.0.0.1", "127.0.0.2")
    dns_server.add("lab.test", "SOA", "ns1.lab.test. hostmaster.lab.test. 2026113001 3600 600 86400 60")
    dns_server.mutate = sections
    await dns_server.start()
    dot_server = DnsServer(tls=ctx)  # DNS over TLS, the test CA's certificate (SANs localhost, 127.0.0.1)
    dot_server.add("both.lab.test", "A", "127.0.0.1", "127.0.0.2")
    dot_server.mutate = sections
    await dot_server.start()
    yield {"ca": ca.path, "http": http_port, "https": https_port,
           "smtp": smtp_server.sockets[0].getsockname()[1], "dns": dns_server.port, "grpc": grpc_port,
           "dot": dot_server.port, "grpc_tls": grpc_tls_port}
    await grpc_tls_server.stop(None)
    await grpc_server.stop(None)
    await dot_server.stop()
    await dns_server.stop()
    smtp_server.close()
    await smtp_server.wait_closed()
    await runner.cleanup()


def _blackbox_yml(ca: Path) -> str:
    return f"""\
modules:
  http_2xx:
    prober: http
    timeout: 5s
    http:
      preferred_ip_protocol: ip4
      fail_if_body_not_matches_regexp: ["ok from"]
  http_regex_fails:
    prober: http
    timeout: 5s
    http:
      preferred_ip_protocol: ip4
      fail_if_body_matches_regexp: ["lab"]
  http_versions:
    prober: http
    timeout: 5s
    http:
      preferred_ip_protocol: ip4
      valid_http_versions: ["HTTP/2.0"]
  https_ca:
    prober: http
    timeout: 5s
    http:
      preferred_ip_protocol: ip4
      fail_if_not_ssl: true
      tls_config:
        ca_file: {ca}
  tcp_starttls:
    prober: tcp
    timeout: 5s
    tcp:
      preferred_ip_protocol: ip4
      query_response:
        - expect: "^220 "
        - send: "EHLO prober"
        - expect: "^250 STARTTLS"
        - send: "STARTTLS"
        - expect: "^220"
        - starttls: true
        - send: "QUIT"
        - expect: "^221"
      tls_config:
        ca_file: {ca}
        server_name: localhost
  tcp_expect_fails:
    prober: tcp
    timeout: 3s
    tcp:
      preferred_ip_protocol: ip4
      query_response:
        - expect: "^250 never"
  dns_a:
    prober: dns
    timeout: 5s
    dns:
      preferred_ip_protocol: ip4
      query_name: both.lab.test
      query_type: A
      validate_answer_rrs:
        fail_if_not_matches_regexp: ["^both\\\\.lab\\\\.test\\\\.\\\\t30\\\\tIN\\\\tA\\\\t127\\\\.0\\\\.0\\\\.[12]$"]
      validate_authority_rrs:
        fail_if_none_matches_regexp: ["\\\\tNS\\\\tns1\\\\.lab\\\\.test\\\\.$"]
  dns_dot:
    prober: dns
    timeout: 5s
    dns:
      preferred_ip_protocol: ip4
      query_name: both.lab.test
      query_type: A
      transport_protocol: tcp
      dns_over_tls: true
      source_ip_address: 127.0.0.1
      tls_config:
        ca_file: {ca}
  dns_tcp_source:
    prober: dns
    timeout: 5s
    dns:
      preferred_ip_protocol: ip4
      query_name: both.lab.test
      query_type: A
      transport_protocol: tcp
      source_ip_address: 127.0.0.1
  dns_dot_wrong_ca:
    prober: dns
    timeout: 5s
    dns:
      preferred_ip_protocol: ip4
      query_name: both.lab.test
      query_type: A
      transport_protocol: tcp
      dns_over_tls: true
  dns_soa:
    prober: dns
    timeout: 5s
    dns:
      preferred_ip_protocol: ip4
      query_name: lab.test
      query_type: SOA
  grpc_orders:
    prober: grpc
    timeout: 5s
    grpc:
      service: orders
      preferred_ip_protocol: ip4
  grpc_billing:
    prober: grpc
    timeout: 5s
    grpc:
      service: billing
      preferred_ip_protocol: ip4
  grpc_tls:
    prober: grpc
    timeout: 5s
    grpc:
      service: orders
      preferred_ip_protocol: ip4
      tls: true
      tls_config:
        ca_file: {ca}
        server_name: localhost
  grpc_tls_unknown:
    prober: grpc
    timeout: 5s
    grpc:
      service: nobody
      preferred_ip_protocol: ip4
      tls: true
      tls_config:
        ca_file: {ca}
        server_name: localhost
  icmp_v4:
    prober: icmp
    timeout: 3s
    icmp:
      preferred_ip_protocol: ip4
      ip_protocol_fallback: false
      payload_size: 32
  dns_fails:
    prober: dns
    timeout: 5s
    dns:
      preferred_ip_protocol: ip4
      query_name: both.lab.test
      query_type: A
      validate_additional_rrs:
        fail_if_matches_regexp: ["127\\\\.0\\\\.0\\\\.53"]
"""


@pytest.fixture
def exporters(tmp_path, targets):
    if shutil.which(BLACKBOX) is None:
        pytest.fail(f"{BLACKBOX} is not installed: scripts/setup installs it")
    cfg = tmp_path / "blackbox.yml"
    cfg.write_text(_blackbox_yml(targets["ca"]))
    port = free_port()
    log = open(tmp_path / "blackbox.log", "w")  # noqa: SIM115 - closed below
    bb = subprocess.Popen([BLACKBOX, f"--config.file={cfg}", f"--web.listen-address=127.0.0.1:{port}",
                           "--log.level=error"], stdout=subprocess.DEVNULL, stderr=log)
    agent = AgentProcess(cfg, tmp_path, "--no-kernel")
    agent.argv[agent.argv.index("--config")] = "--blackbox-config"
    try:
        wait_for(lambda: bb.poll() is None and http_get(f"http://127.0.0.1:{port}/-/healthy", 2)[0] == 200, 30,
                 "blackbox_exporter to be ready")
        agent.start()
        yield f"http://127.0.0.1:{port}", agent.url
    finally:
        agent.stop()
        if bb.poll() is None:
            bb.terminate()
            try:
                bb.wait(10)
            except subprocess.TimeoutExpired:
                bb.kill()
                bb.wait()
        log.close()


async def _probe(base: str, module: str, target: str) -> dict:
    q = urllib.parse.urlencode({"module": module, "target": target})
    status, text = await asyncio.to_thread(http_get, f"{base}/probe?{q}", 15)
    assert status == 200, (base, module, status, text)
    return _blackbox_view(_families(text))


CASES = [
    ("http_2xx", "http://127.0.0.1:{http}/ok"),
    ("http_2xx", "http://127.0.0.1:{http}/redirect"),
    ("http_2xx", "http://127.0.0.1:{http}/gz"),
    ("http_regex_fails", "http://127.0.0.1:{http}/ok"),
    ("http_versions", "http://127.0.0.1:{http}/ok"),
    ("https_ca", "https://127.0.0.1:{https}/ok"),
    ("tcp_starttls", "127.0.0.1:{smtp}"),
    ("tcp_expect_fails", "127.0.0.1:{smtp}"),
    ("dns_a", "127.0.0.1:{dns}"),
    ("dns_fails", "127.0.0.1:{dns}"),
    ("dns_soa", "127.0.0.1:{dns}"),
    ("dns_dot", "127.0.0.1:{dot}"),
    ("dns_dot_wrong_ca", "127.0.0.1:{dot}"),
    ("dns_tcp_source", "127.0.0.1:{dns}"),
    ("icmp_v4", "127.0.0.1"),
    ("grpc_orders", "127.0.0.1:{grpc}"),
    ("grpc_billing", "127.0.0.1:{grpc}"),
    ("grpc_tls", "127.0.0.1:{grpc_tls}"),
    ("grpc_tls_unknown", "127.0.0.1:{grpc_tls}"),
]


async def test_same_metrics_as_blackbox_exporter(targets, exporters):
    bb_url, cp_url = exporters
    report = []
    compared: set[str] = set()
    for module, target in CASES:
        target = target.format(**targets)
        theirs = await _probe(bb_url, module, target)
        ours = await _probe(cp_url, module, target)
        names_theirs = {n for n, _ in theirs}
        names_ours = {n for n, _ in ours}
        missing = names_theirs - names_ours - NOT_EXPORTED
        extra = names_ours - names_theirs
        assert not missing, (module, target, "connprobe lacks", sorted(missing),
                             {k: v for k, v in theirs.items() if k[0] in missing})
        for key, value in theirs.items():
            if key[0] in TIMING or key[0] in NOT_EXPORTED:
                continue
            assert key in ours, (module, target, "connprobe lacks the series", key, sorted(ours))
            assert ours[key] == pytest.approx(value), (module, target, key, "blackbox", value, "connprobe", ours[key])
        report.append((module, target, sorted(extra)))
        compared |= names_theirs
        if module == "dns_soa":
            assert theirs[("probe_dns_serial", frozenset())] == 2026113001
        if module == "grpc_tls":  # the certificate metrics of connprobe's second handshake: blackbox's values
            assert theirs[("probe_grpc_ssl", frozenset())] == 1
            assert {k[0] for k in theirs} >= {"probe_tls_version_info", "probe_ssl_last_chain_info"}
            assert theirs[("probe_ssl_earliest_cert_expiry", frozenset())] > 0
        if module.startswith("dns_dot"):  # DoT: answered with the CA, refused without; the handshake is connect
            assert theirs[("probe_success", frozenset())] == (module == "dns_dot")
            connect = ("probe_dns_duration_seconds", frozenset({("phase", "connect")}))
            assert theirs[connect] > 0 and ours[connect] > 0, (theirs[connect], ours[connect])
    # every metric blackbox_exporter 0.23 has for these probers was seen and compared (gRPC: see README)
    assert compared == {
        "probe_success", "probe_duration_seconds", "probe_dns_lookup_time_seconds", "probe_ip_protocol",
        "probe_ip_addr_hash", "probe_http_duration_seconds", "probe_http_status_code", "probe_http_version",
        "probe_http_content_length", "probe_http_uncompressed_body_length", "probe_http_redirects",
        "probe_http_ssl", "probe_http_last_modified_timestamp_seconds", "probe_failed_due_to_regex",
        "probe_ssl_earliest_cert_expiry", "probe_ssl_last_chain_expiry_timestamp_seconds",
        "probe_ssl_last_chain_info", "probe_tls_version_info", "probe_dns_query_succeeded",
        "probe_dns_duration_seconds", "probe_dns_answer_rrs", "probe_dns_authority_rrs", "probe_dns_additional_rrs",
        "probe_dns_serial", "probe_icmp_duration_seconds", "probe_icmp_reply_hop_limit", "probe_grpc_status_code",
        "probe_grpc_healthcheck_response", "probe_grpc_duration_seconds", "probe_grpc_ssl"}, sorted(compared)
    # what connprobe exports beyond blackbox for these probes (each listed in the README's table)
    for module, _target, extra in report:
        assert set(extra) <= {"probe_ssl_last_chain_expiry_timestamp_seconds",
                              "probe_http_last_modified_timestamp_seconds",
                              "probe_dns_lookup_time_seconds", "probe_ip_addr_hash", "probe_ip_protocol",
                              "probe_failed_due_to_regex", "probe_http_status_code", "probe_http_duration_seconds",
                              "probe_dns_answer_rrs", "probe_dns_authority_rrs", "probe_dns_additional_rrs",
                              "probe_tls_version_info", "probe_ssl_earliest_cert_expiry"}, (module, extra)
