"""blackbox_exporter's TCP `query_response` (with STARTTLS) and DNS section matchers, against real loopback servers."""

from __future__ import annotations

import asyncio
import calendar
import re
import socket
import ssl

import dns.message
import dns.rdataclass
import dns.rrset
import pytest

from prober import DNSSpec, ErrorKind, QueryStep, TCPSpec, TLSSpec, run_probe
from prober.spec import RRValidator
from tests.agent.pki import CA, server_context
from tests.prober.helpers import spec


@pytest.fixture
def pki(tmp_path):
    ca = CA(tmp_path, "smtp-ca")
    return ca, ca.issue("localhost", server=True)


@pytest.fixture
async def smtp_server(pki):
    """An SMTP-like line protocol on loopback: greeting, EHLO listing STARTTLS, STARTTLS upgrading to TLS."""
    ca, pair = pki
    ctx = server_context(pair)
    tls_seen: list[bool] = []

    async def handle(reader, writer):
        writer.write(b"220 mail.lab.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                cmd = line.strip().upper()
                if cmd.startswith(b"EHLO"):
                    writer.write(b"250-mail.lab.test\r\n250-STARTTLS\r\n250 SIZE 1000\r\n")
                elif cmd == b"STARTTLS":
                    writer.write(b"220 2.0.0 Ready to start TLS\r\n")
                    await writer.drain()
                    await writer.start_tls(ctx)
                    tls_seen.append(True)
                elif cmd == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"500 what\r\n")
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    server.port = server.sockets[0].getsockname()[1]
    server.ca = ca
    server.tls_seen = tls_seen
    yield server
    server.close()
    await server.wait_closed()


SMTP_STEPS = [{"expect": "^220 "}, {"send": "EHLO prober"}, {"expect": "^250-STARTTLS"}, {"send": "STARTTLS"},
              {"expect": "^220"}, {"starttls": True}, {"send": "EHLO prober"}, {"expect": "^250 SIZE"},
              {"send": "QUIT"}, {"expect": "^221"}]


def _tcp(port: int, steps, timeout: float = 3.0, **kw):
    return spec(f"127.0.0.1:{port}", prober="tcp", timeout=timeout,
                section=TCPSpec(query_response=tuple(QueryStep(**s) for s in steps), **kw))


async def test_tcp_query_response_starttls(smtp_server, env, tmp_path):
    tls = TLSSpec(ca_file=str(smtp_server.ca.path), server_name="localhost")
    (r,) = await run_probe(_tcp(smtp_server.port, SMTP_STEPS, tls_config=tls), env)
    assert r.ok, r.error_detail
    assert smtp_server.tls_seen == [True]
    assert r.phases[0].name == "connect"
    # a certificate from a CA the module does not trust: a TLS error at the STARTTLS step
    stranger = CA(tmp_path, "stranger")
    bad = TLSSpec(ca_file=str(stranger.path), server_name="localhost")
    (r,) = await run_probe(_tcp(smtp_server.port, SMTP_STEPS, tls_config=bad), env)
    assert r.error is ErrorKind.TLS_ERROR, (r.error, r.error_detail)
    # an expectation the server does not meet names its step
    (r,) = await run_probe(_tcp(smtp_server.port, [{"expect": "^220 "}, {"send": "QUIT"}, {"expect": "^250"}]), env)
    assert r.error is ErrorKind.VALIDATION and r.failed_validators == ("query_response[2].expect",)
    # ${1}-style groups of the last expect are substituted in the next send
    steps = [{"expect": "^220 (?P<host>[a-z.]+) ESMTP"}, {"send": "EHLO ${host}"}, {"expect": "^250 SIZE"}]
    (r,) = await run_probe(_tcp(smtp_server.port, steps), env)
    assert r.ok, r.error_detail


async def test_tcp_starttls_min_cert_days(smtp_server, env):
    """`tls_config.min_cert_days` on the certificate the STARTTLS handshake verified (valid 1 day here)."""
    def days(n):
        return TLSSpec(ca_file=str(smtp_server.ca.path), server_name="localhost", min_cert_days=n)

    (r,) = await run_probe(_tcp(smtp_server.port, SMTP_STEPS, tls_config=days(2)), env)
    assert r.error is ErrorKind.VALIDATION and r.failed_validators == ("min_cert_days",), r
    (r,) = await run_probe(_tcp(smtp_server.port, SMTP_STEPS, tls_config=days(0.5)), env)
    assert r.ok, r.error_detail


async def test_tcp_query_response_ends_by_deadline(smtp_server, env):
    (r,) = await run_probe(_tcp(smtp_server.port, [{"expect": "^never"}], timeout=1.0), env)
    assert r.error is ErrorKind.READ_TIMEOUT, (r.error, r.error_detail)
    assert r.duration_ns < 2.5e9


def _with_sections(wire: bytes, proto: str) -> bytes:
    msg = dns.message.from_wire(wire)
    if msg.answer:
        msg.authority.append(dns.rrset.from_text("lab.test.", 60, "IN", "NS", "ns1.lab.test."))
        msg.additional.append(dns.rrset.from_text("ns1.lab.test.", 60, "IN", "A", "127.0.0.53"))
    return msg.to_wire()


def _dns(server, **kw):
    return spec(f"127.0.0.1:{server.port}", prober="dns", section=DNSSpec(query_name="both.lab.test", **kw))


async def test_dns_section_matchers_and_counts(dns_server, env):
    dns_server.mutate = _with_sections
    (r,) = await run_probe(_dns(dns_server), env)
    assert r.ok, r.error_detail
    assert (r.value("dns_answer_rrs"), r.value("dns_authority_rrs"), r.value("dns_additional_rrs")) == (2, 1, 1)

    cases = [
        # (section, matcher, regexps, fails)
        ("answer", "fail_if_matches_regexp", [r"127\.0\.0\.2$"], True),
        ("answer", "fail_if_matches_regexp", [r"10\.0\.0\.1"], False),
        ("answer", "fail_if_all_match_regexp", [r"\tIN\tA\t127\.0\.0\."], True),
        ("answer", "fail_if_all_match_regexp", [r"127\.0\.0\.1$"], False),
        ("answer", "fail_if_not_matches_regexp", [r"127\.0\.0\.1$"], True),
        ("answer", "fail_if_not_matches_regexp", [r"^both\.lab\.test\.\t30\tIN\tA\t"], False),
        ("answer", "fail_if_none_matches_regexp", [r"10\.9\.9\.9"], True),
        ("answer", "fail_if_none_matches_regexp", [r"127\.0\.0\.2$"], False),
        ("authority", "fail_if_none_matches_regexp", [r"\tNS\tns1\.lab\.test\.$"], False),
        ("authority", "fail_if_matches_regexp", [r"\tNS\t"], True),
        ("additional", "fail_if_not_matches_regexp", [r"127\.0\.0\.53$"], False),
        ("additional", "fail_if_all_match_regexp", [r"ns1"], True),
    ]
    for section, matcher, patterns, fails in cases:
        s = _dns(dns_server, **{f"validate_{section}_rrs": RRValidator(**{matcher: tuple(patterns)})})
        (r,) = await run_probe(s, env)
        if fails:
            assert r.error is ErrorKind.DNS_UNEXPECTED, (section, matcher, r.error, r.error_detail)
            assert r.failed_validators == (f"validate_{section}_rrs.{matcher}",)
        else:
            assert r.ok, (section, matcher, r.error_detail)


async def test_dns_matchers_on_an_empty_section(dns_server, env):
    """blackbox: with no record, fail_if_all_match passes and fail_if_none_matches fails."""
    (r,) = await run_probe(_dns(dns_server, validate_authority_rrs=RRValidator(fail_if_all_match_regexp=(".*",))), env)
    assert r.ok and r.value("dns_authority_rrs") == 0
    (r,) = await run_probe(_dns(dns_server, validate_authority_rrs=RRValidator(fail_if_none_matches_regexp=(".*",))),
                           env)
    assert r.failed_validators == ("validate_authority_rrs.fail_if_none_matches_regexp",)
    # the counts are set even when the rcode is not a valid one
    (r,) = await run_probe(spec(f"127.0.0.1:{dns_server.port}", prober="dns",
                                section=DNSSpec(query_name="missing.lab.test")), env)
    assert r.failed_validators == ("valid_rcodes",) and r.value("dns_answer_rrs") == 0


# ---------------------------------------------------------------- HTTP: client certificates, versions, compression


@pytest.fixture
async def mtls_server(tmp_path):
    """An HTTPS server on 127.0.0.1 that asks for a client certificate from its CA (required), and a plain one;
    both record the peer address and the Accept-Encoding header they were sent."""
    from aiohttp import web

    ca = CA(tmp_path, "mtls-ca")
    server_pair = ca.issue("localhost", server=True)
    client_pair = ca.issue("prober", server=False)
    ctx = server_context(server_pair, client_ca=ca)
    seen: list[tuple[str, str | None]] = []

    async def ok(request):
        seen.append((request.transport.get_extra_info("peername")[0], request.headers.get("Accept-Encoding")))
        return web.Response(text="ok " * 10, headers={"Last-Modified": "Tue, 01 Dec 2026 00:00:00 GMT"})

    async def gz(request):
        import gzip

        seen.append((request.transport.get_extra_info("peername")[0], request.headers.get("Accept-Encoding")))
        return web.Response(body=gzip.compress(b"hello " * 100), headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/gz", gz)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    tls_site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await tls_site.start()
    plain_site = web.TCPSite(runner, "127.0.0.1", 0)
    await plain_site.start()

    class S:
        pass

    s = S()
    s.tls_port = tls_site._server.sockets[0].getsockname()[1]
    s.plain_port = plain_site._server.sockets[0].getsockname()[1]
    s.ca, s.client, s.server, s.seen = ca, client_pair, server_pair, seen
    yield s
    await runner.cleanup()


def _http(url: str, client: str, **kw):
    from prober import HTTPSpec

    return spec(url, prober="http", section=HTTPSpec(client=client, **kw))


CLIENTS = ("aiohttp", "aiohttp-session", "httpx")


@pytest.mark.parametrize("client", CLIENTS)
async def test_client_certificate(mtls_server, env, client):
    s = mtls_server
    with_cert = TLSSpec(ca_file=str(s.ca.path), cert_file=str(s.client.cert), key_file=str(s.client.key))
    (r,) = await run_probe(_http(f"https://127.0.0.1:{s.tls_port}/ok", client, tls=with_cert), env)
    assert r.ok, (r.error, r.error_detail)
    without = TLSSpec(ca_file=str(s.ca.path))
    (r,) = await run_probe(_http(f"https://127.0.0.1:{s.tls_port}/ok", client, tls=without), env)
    # TLS 1.3: the server's refusal arrives after the client's handshake finished, as an alert or a close
    assert r.error in (ErrorKind.TLS_ERROR, ErrorKind.CONNECT_RESET), (r.error, r.error_detail)


@pytest.mark.parametrize("client", CLIENTS)
async def test_http_values_blackbox_reports(mtls_server, env, client):
    """The facts behind probe_http_version, _content_length, _uncompressed_body_length, _ssl, _redirects,
    _last_modified_timestamp_seconds, probe_ssl_earliest_cert_expiry, _last_chain_expiry, probe_tls_version_info."""
    from cryptography import x509

    s = mtls_server
    tls = TLSSpec(ca_file=str(s.ca.path), cert_file=str(s.client.cert), key_file=str(s.client.key))
    (r,) = await run_probe(_http(f"https://127.0.0.1:{s.tls_port}/ok", client, tls=tls), env)
    assert r.ok, r.error_detail
    leaf = x509.load_pem_x509_certificate(s.server.cert.read_bytes())
    expiry = leaf.not_valid_after_utc.timestamp()
    assert r.value("http_version") == 1.1
    assert r.value("http_content_length") == 30 and r.value("http_uncompressed_body_length") == 30
    assert r.value("http_ssl") == 1 and r.value("http_redirects") == 0
    assert r.value("http_last_modified") == calendar.timegm((2026, 12, 1, 0, 0, 0))
    assert r.value("ssl_earliest_cert_expiry") == expiry
    assert r.value("ssl_last_chain_expiry") == expiry  # the leaf expires before the CA
    assert r.value("tls_version") in (1.2, 1.3)
    (r,) = await run_probe(_http(f"http://127.0.0.1:{s.plain_port}/gz", client), env)
    assert r.ok and r.value("http_ssl") == 0 and r.value("ssl_earliest_cert_expiry") is None
    assert r.value("http_uncompressed_body_length") == 600
    assert 0 < r.value("http_content_length") < 600  # the compressed length on the wire


@pytest.mark.parametrize("client", CLIENTS)
async def test_valid_http_versions_and_compression(mtls_server, env, client):
    s = mtls_server
    base = f"http://127.0.0.1:{s.plain_port}"
    (r,) = await run_probe(_http(f"{base}/ok", client, valid_http_versions=("HTTP/1.1",)), env)
    assert r.ok, r.error_detail
    (r,) = await run_probe(_http(f"{base}/ok", client, valid_http_versions=("HTTP/2.0", "HTTP/1.0")), env)
    assert r.error is ErrorKind.VALIDATION and r.failed_validators == ("valid_http_versions",)
    (r,) = await run_probe(_http(f"{base}/gz", client, compression="gzip"), env)
    assert r.ok, r.error_detail
    assert s.seen[-1][1] == "gzip"  # asked for exactly that coding
    (r,) = await run_probe(_http(f"{base}/ok", client, compression="gzip"), env)
    assert r.failed_validators == ("compression",)
    (r,) = await run_probe(_http(f"{base}/ok", client, compression="identity"), env)
    assert r.ok and s.seen[-1][1] == "identity"
    (r,) = await run_probe(_http(f"{base}/gz", client, compression="deflate"), env)
    assert r.failed_validators == ("compression",)


@pytest.mark.parametrize("client", CLIENTS)
async def test_http_source_ip_address(mtls_server, env, client):
    s = mtls_server
    (r,) = await run_probe(_http(f"http://127.0.0.1:{s.plain_port}/ok", client, source_ip_address="127.0.0.2"), env)
    assert r.ok, r.error_detail
    assert s.seen[-1][0] == "127.0.0.2" and r.flows[-1].local_addr == "127.0.0.2"
    (r,) = await run_probe(_http(f"http://127.0.0.1:{s.plain_port}/ok", client, source_ip_address="::1"), env)
    assert r.error is ErrorKind.CONNECT_UNREACHABLE and "is not of 127.0.0.1's family" in r.error_detail


async def test_tcp_source_ip_and_tls_values(smtp_server, env):
    tls = TLSSpec(ca_file=str(smtp_server.ca.path), server_name="localhost")
    s = spec(f"127.0.0.1:{smtp_server.port}", prober="tcp",
             section=TCPSpec(query_response=tuple(QueryStep(**st) for st in SMTP_STEPS), tls_config=tls,
                             source_ip_address="127.0.0.3"))
    (r,) = await run_probe(s, env)
    assert r.ok, r.error_detail
    assert r.flows[-1].local_addr == "127.0.0.3"
    assert r.value("tls_version") in (1.2, 1.3) and r.value("ssl_earliest_cert_expiry") > 0


# ---------------------------------------------------------------- HTTP through a proxy (on loopback)


async def test_http_and_https_through_a_proxy(mtls_server, proxy, env):
    s = mtls_server
    url = f"http://127.0.0.1:{proxy.port}"
    (r,) = await run_probe(_http(f"http://127.0.0.1:{s.plain_port}/ok", "httpx", proxy_url=url), env)
    assert r.ok, r.error_detail
    assert proxy.lines[-1] == f"GET http://127.0.0.1:{s.plain_port}/ok HTTP/1.1"
    assert r.flows[-1].remote_port == proxy.port  # the connection the kernel sensor watches is the proxy's
    tls = TLSSpec(ca_file=str(s.ca.path), cert_file=str(s.client.cert), key_file=str(s.client.key))
    (r,) = await run_probe(_http(f"https://127.0.0.1:{s.tls_port}/ok", "httpx", proxy_url=url, tls=tls), env)
    assert r.ok, r.error_detail
    assert proxy.lines[-1] == f"CONNECT 127.0.0.1:{s.tls_port} HTTP/1.1"
    assert r.value("http_ssl") == 1 and r.value("ssl_earliest_cert_expiry") is not None
    # proxy_connect_header: sent to the proxy with the CONNECT, kept out of every output like other headers
    (r,) = await run_probe(_http(f"https://127.0.0.1:{s.tls_port}/ok", "httpx", proxy_url=url, tls=tls,
                                 proxy_headers={"Proxy-Authorization": "Basic cHJveHk6czNjcjN0"}), env)
    assert r.ok, r.error_detail
    assert "Proxy-Authorization: Basic cHJveHk6czNjcjN0" in proxy.heads[-1] and proxy.lines[-1].startswith("CONNECT")
    # a proxy nobody listens on: the connect to it is refused
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
        (r,) = await run_probe(_http(f"http://127.0.0.1:{s.plain_port}/ok", "httpx", proxy_url=dead), env)
    assert r.error is ErrorKind.CONNECT_REFUSED, (r.error, r.error_detail)


def test_proxy_url_config_errors():
    from prober import HTTPSpec

    for value, message in (("socks5://127.0.0.1:1080", "only http://HOST:PORT proxies are supported"),
                           ("http://u:p@127.0.0.1:3128", "credentials in proxy_url are not supported"),
                           ("http://127.0.0.1:3128/x", "a proxy URL has no path, query or fragment"),
                           ("http://127.0.0.1:99999", "is not a URL"),
                           ("http://bad_host-.x:1", "may not start or end with '-'")):
        with pytest.raises(ValueError, match=re.escape(message)):
            HTTPSpec(client="httpx", proxy_url=value)
    with pytest.raises(ValueError, match="proxy_url: needs client: httpx"):
        HTTPSpec(proxy_url="http://127.0.0.1:3128")
    assert HTTPSpec(client="httpx", proxy_url="http://127.0.0.1").proxy_url == "http://127.0.0.1:80"


# ---------------------------------------------------------------- HTTP/2 (httpx with h2, TLS with ALPN, loopback)


@pytest.fixture
async def h2_server(tmp_path):
    """An HTTPS server on 127.0.0.1 that speaks only h2 (ALPN): 200 and a small body to every request."""
    import h2.config
    import h2.connection
    import h2.events

    ca = CA(tmp_path, "h2-ca")
    pair = ca.issue("localhost", server=True)
    ctx = server_context(pair)
    ctx.set_alpn_protocols(["h2"])
    seen: list[str] = []

    async def handle(reader, writer):
        conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        seen.append(dict(event.headers)[b":path"].decode())
                        body = b"h2 ok"
                        conn.send_headers(event.stream_id, [(":status", "200"), ("content-length", str(len(body)))])
                        conn.send_data(event.stream_id, body, end_stream=True)
                writer.write(conn.data_to_send())
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    server.port = server.sockets[0].getsockname()[1]
    server.ca, server.seen = ca, seen
    yield server
    server.close()
    await server.wait_closed()


async def test_http2(h2_server, env):
    tls = TLSSpec(ca_file=str(h2_server.ca.path))
    url = f"https://127.0.0.1:{h2_server.port}/h2"
    (r,) = await run_probe(_http(url, "httpx", tls=tls, http2=True, valid_http_versions=("HTTP/2.0",),
                                 fail_if_body_not_matches_regexp=("h2 ok",)), env)
    assert r.ok, (r.error, r.error_detail)
    assert h2_server.seen == ["/h2"]
    assert r.value("http_version") == 2.0 and r.value("http_content_length") == 5
    assert [p.name for p in r.phases][:2] == ["connect", "tls"]
    # without http2 the client offers only http/1.1 and an h2-only server refuses the handshake
    (r,) = await run_probe(_http(url, "httpx", tls=tls), env)
    assert not r.ok and r.error in (ErrorKind.TLS_ERROR, ErrorKind.PROTOCOL_ERROR, ErrorKind.CONNECT_RESET), \
        (r.error, r.error_detail)


def test_proxy_headers_are_secrets():
    from prober import HTTPSpec
    from prober.redact import Redactor

    s = spec("https://127.0.0.1:1/", prober="http",
             section=HTTPSpec(client="httpx", proxy_url="http://127.0.0.1:3128", proxy_headers={"X-P": "pr0xy-s3cret"}))
    assert "pr0xy-s3cret" not in Redactor.for_spec(s).text("proxy said: pr0xy-s3cret")
    assert "pr0xy-s3cret" not in repr(s)
