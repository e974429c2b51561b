"""HTTP probes against hostile or careless servers: what a redirect may carry, and bounded bodies.

Redirect rule (prober/http.py `redirected`): once a redirect changes the origin (scheme, host or port),
the module's configured headers (every one: Authorization, Cookie, Proxy-Authorization, X-Api-Key...)
and the target's userinfo are not sent, for the rest of the probe. Two servers on two loopback
addresses (127.0.0.1 and 127.0.0.2) record the headers they saw.
"""

from __future__ import annotations

import ssl
import tracemalloc

import pytest

from prober import ErrorKind, HTTPSpec, TLSSpec, run_probe
from tests.prober.helpers import spec
from tests.prober.servers import serve_http

CLIENTS = ["aiohttp", "aiohttp-session", "httpx"]
SECRETS = {
    "Authorization": "Bearer s3cr3t-auth",
    "Cookie": "session=s3cr3t-cookie",
    "Proxy-Authorization": "Basic s3cr3t-proxy",
    "X-Api-Key": "s3cr3t-key",
}


@pytest.fixture
async def second_host():
    """The same app on 127.0.0.2: another host for the redirects."""
    state, runner = await serve_http("127.0.0.2")
    yield state
    await runner.cleanup()


@pytest.fixture
async def other_port():
    state, runner = await serve_http("127.0.0.1")
    yield state
    await runner.cleanup()


def _secrets_seen(seen: dict[str, str]) -> dict[str, str]:
    lower = {k.lower(): v for k, v in seen.items()}
    return {k: lower[k.lower()] for k in SECRETS if k.lower() in lower}


def _sec(client: str, **kw) -> HTTPSpec:
    return HTTPSpec(client=client, headers=SECRETS, **kw)


@pytest.mark.parametrize("client", CLIENTS)
async def test_redirect_to_another_host_drops_every_configured_header(http_server, second_host, env, client):
    to = second_host.url("/ok")
    (r,) = await run_probe(spec(http_server.url(f"/redirect?to={to}"), section=_sec(client)), env)
    assert r.ok, r.error_detail
    assert _secrets_seen(http_server.seen_headers[-1]) == SECRETS  # the first host got them all
    assert len(second_host.seen_headers) == 1
    assert _secrets_seen(second_host.seen_headers[0]) == {}
    assert "s3cr3t" not in repr(second_host.seen_headers)


@pytest.mark.parametrize("client", CLIENTS)
async def test_redirect_to_another_port_drops_them(http_server, other_port, env, client):
    to = other_port.url("/ok")
    (r,) = await run_probe(spec(http_server.url(f"/redirect?to={to}"), section=_sec(client)), env)
    assert r.ok, r.error_detail
    assert _secrets_seen(other_port.seen_headers[0]) == {}


@pytest.mark.parametrize("client", CLIENTS)
async def test_same_origin_redirect_keeps_them(http_server, env, client):
    (r,) = await run_probe(spec(http_server.url("/redirect?to=/ok"), section=_sec(client)), env)
    assert r.ok, r.error_detail
    assert [_secrets_seen(h) for h in http_server.seen_headers] == [SECRETS, SECRETS]


@pytest.mark.parametrize("client", CLIENTS)
async def test_dropped_for_the_rest_of_the_probe(http_server, second_host, env, client):
    """127.0.0.1 → 127.0.0.2 → back to 127.0.0.1: the way back does not get them again."""
    back = http_server.url("/ok")
    to = second_host.url(f"/redirect?to={back}")
    (r,) = await run_probe(spec(http_server.url(f"/redirect?to={to}"), section=_sec(client)), env)
    assert r.ok, r.error_detail
    assert [_secrets_seen(h) for h in http_server.seen_headers] == [SECRETS, {}]
    assert _secrets_seen(second_host.seen_headers[0]) == {}


@pytest.mark.parametrize("client", CLIENTS)
async def test_userinfo_is_not_sent_to_another_host(http_server, second_host, env, client):
    to = second_host.url("/ok")
    target = http_server.url(f"/redirect?to={to}").replace("http://", "http://probe:pa55word@", 1)
    (r,) = await run_probe(spec(target, section=HTTPSpec(client=client)), env)
    assert r.ok, r.error_detail
    assert http_server.seen_headers[-1]["Authorization"].startswith("Basic ")
    assert "Authorization" not in second_host.seen_headers[0]


@pytest.mark.parametrize("client", CLIENTS)
async def test_configured_authorization_wins_over_userinfo(http_server, env, client):
    target = http_server.url("/ok").replace("http://", "http://probe:pa55word@", 1)
    (r,) = await run_probe(spec(target, section=_sec(client)), env)
    assert r.ok, r.error_detail
    assert http_server.seen_headers[-1]["Authorization"] == SECRETS["Authorization"]


@pytest.fixture
async def https_first(cert_files):
    cert, key = cert_files
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    state, runner = await serve_http("127.0.0.1", ctx)
    yield state
    await runner.cleanup()


@pytest.mark.parametrize("client", CLIENTS)
async def test_https_to_http_drops_them(https_first, second_host, cert_files, env, client):
    to = second_host.url("/ok")
    target = f"https://127.0.0.1:{https_first.port}/redirect?to={to}"
    section = _sec(client, tls=TLSSpec(ca_file=str(cert_files[0])))
    (r,) = await run_probe(spec(target, section=section), env)
    assert r.ok, r.error_detail
    assert _secrets_seen(https_first.seen_headers[-1]) == SECRETS
    assert _secrets_seen(second_host.seen_headers[0]) == {}


@pytest.mark.parametrize("client", CLIENTS)
async def test_redirect_to_a_non_http_scheme_is_a_protocol_error(http_server, env, client):
    (r,) = await run_probe(spec(http_server.url("/redirect?to=ftp://127.0.0.2/x"), section=_sec(client)), env)
    assert r.error is ErrorKind.PROTOCOL_ERROR and "non-HTTP" in r.error_detail, r


# ---------------------------------------------------------------- bodies

MiB = 2**20


@pytest.mark.parametrize("client", CLIENTS)
async def test_large_body_without_regexp_is_counted_not_kept(http_server, env, client):
    """20 MiB and no body regexp: read to the end (no cap), with a bounded amount of memory."""
    s = spec(http_server.url(f"/stream/{20 * MiB}"), section=HTTPSpec(client=client), timeout=20)
    await run_probe(spec(http_server.url("/ok"), section=HTTPSpec(client=client)), env)  # warm the client
    tracemalloc.start()
    try:
        (r,) = await run_probe(s, env)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.ok, r.error_detail
    assert peak < 4 * MiB, peak  # the server (same process) writes 64 KiB at a time
    # the size is still measured: one byte less than the body as max_body_bytes fails the probe
    s = spec(http_server.url(f"/stream/{20 * MiB}"), section=HTTPSpec(client=client, max_body_bytes=20 * MiB - 1))
    (r,) = await run_probe(s, env)
    assert r.error is ErrorKind.VALIDATION and r.failed_validators == ("max_body_bytes",)


@pytest.mark.parametrize("client", CLIENTS)
async def test_body_regexp_has_a_default_cap(http_server, env, client):
    section = HTTPSpec(client=client, fail_if_body_not_matches_regexp=("x",))
    (r,) = await run_probe(spec(http_server.url(f"/bytes/{9 * MiB}"), section=section, timeout=10), env)
    assert r.ok, r.error_detail
    (r,) = await run_probe(spec(http_server.url(f"/bytes/{11 * MiB}"), section=section, timeout=10), env)
    assert r.error is ErrorKind.VALIDATION and r.failed_validators == ("max_body_bytes",), r
    assert "default cap" in r.error_detail
    section = HTTPSpec(client=client, fail_if_body_not_matches_regexp=("x",), max_body_bytes=12 * MiB)
    (r,) = await run_probe(spec(http_server.url(f"/bytes/{11 * MiB}"), section=section, timeout=10), env)
    assert r.ok, r.error_detail


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("regexp", [(), ("hello",)])
async def test_gzip_bomb_is_capped_in_bounded_memory(http_server, env, client, regexp):
    """64 MiB of zeros in ~64 KiB of gzip: refused at the cap, never inflated in one piece."""
    from tests.prober.servers import compress

    url = http_server.url(f"/gzip/{64 * MiB}")
    assert len(compress("gzip", 64 * MiB)) < 100_000
    await run_probe(spec(http_server.url("/ok"), section=HTTPSpec(client=client)), env)  # warm the client
    section = HTTPSpec(client=client, fail_if_body_matches_regexp=regexp)
    tracemalloc.start()
    try:
        (r,) = await run_probe(spec(url, section=section, timeout=20), env)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.error is ErrorKind.VALIDATION, r
    if regexp:  # kept for the regexp: the 10 MiB default cap comes first
        assert r.failed_validators == ("max_body_bytes",), r
        assert peak < 10 * MiB + 8 * MiB, peak
    else:
        assert r.failed_validators == ("max_decompressed_bytes",), r
        assert "max_decompressed_bytes" in r.error_detail
        assert peak < 8 * MiB, peak


@pytest.mark.parametrize("client", CLIENTS)
async def test_max_decompressed_bytes_is_configurable(http_server, env, client):
    section = HTTPSpec(client=client, max_decompressed_bytes=1000)
    (r,) = await run_probe(spec(http_server.url("/gzip/1001"), section=section), env)
    assert r.failed_validators == ("max_decompressed_bytes",), r
    (r,) = await run_probe(spec(http_server.url("/gzip/1000"), section=section), env)
    assert r.ok, r.error_detail
    (r,) = await run_probe(spec(http_server.url("/bytes/5000"), section=section), env)  # not compressed
    assert r.ok, r.error_detail


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("coding", ["gzip", "deflate", "rawdeflate"])
async def test_compressed_bodies_are_decoded(http_server, env, client, coding):
    section = HTTPSpec(client=client, fail_if_body_not_matches_regexp=("^hello \x00{100}",))
    (r,) = await run_probe(spec(http_server.url(f"/{coding}/{300_000}"), section=section), env)
    assert r.ok, r.error_detail


@pytest.mark.parametrize("client", CLIENTS)
async def test_large_reads_with_max_body_bytes_are_not_a_protocol_error(http_server, env, client):
    """More than 128 KiB waiting at once makes aiohttp's payload pause the protocol: the default client's
    protocol asserted it had a parser (it did not give it to BaseProtocol) -> a false protocol_error."""
    s = spec(http_server.url(f"/bytes/{4 * MiB}"), section=HTTPSpec(client=client, max_body_bytes=8 * MiB))
    (r,) = await run_probe(s, env)
    assert r.ok, r.error_detail
    section = HTTPSpec(client=client, max_body_bytes=8 * MiB, fail_if_body_not_matches_regexp=("hello",))
    (r,) = await run_probe(spec(http_server.url(f"/gzip/{4 * MiB}"), section=section), env)
    assert r.ok, r.error_detail
