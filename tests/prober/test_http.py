"""HTTP probes against real in-process aiohttp servers, with both clients."""

from __future__ import annotations

import itertools
import logging

import pytest

from prober import ErrorKind, HTTPSpec, ProbeKind, Proto, TLSSpec, run_probe
from prober.progress import PROGRESS_POINTS
from tests.prober.helpers import ms, spec

CLIENTS = ["aiohttp", "aiohttp-session", "httpx"]


@pytest.mark.parametrize("client", CLIENTS)
async def test_ok_has_every_phase_and_its_flow(http_server, env, client):
    (r,) = await run_probe(spec(http_server.url("/ok"), section=HTTPSpec(client=client)), env)
    assert r.ok, r.error_detail
    assert r.kind is ProbeKind.HTTP and r.http_status == 200 and r.address == "127.0.0.1"
    names = [p.name for p in r.phases]
    assert names == ["connect", "processing", "transfer"]  # IP literal: no resolve; http: no tls
    for p in r.phases:
        assert r.start_ns <= p.start_ns <= p.end_ns <= r.end_ns
    (flow,) = r.flows
    assert flow.proto is Proto.TCP and flow.remote_port == http_server.port
    assert flow.local_addr == "127.0.0.1"


@pytest.mark.parametrize("client", CLIENTS)
async def test_callback_port_is_the_port_the_server_saw(http_server, env, client):
    (r,) = await run_probe(spec(http_server.url("/ok"), section=HTTPSpec(client=client)), env)
    assert r.ok
    assert env.ports == [(Proto.TCP, http_server.peer_ports[-1])]
    assert r.flows[0].local_port == http_server.peer_ports[-1]


@pytest.mark.parametrize("client", CLIENTS)
async def test_processing_is_the_server_delay(http_server, env, client):
    (r,) = await run_probe(spec(http_server.url("/slow?delay=0.15"), section=HTTPSpec(client=client)), env)
    assert r.ok
    server_ms = http_server.delays[-1] * 1e3
    assert server_ms <= ms(r, "processing") < server_ms + 25  # precision: test_lab.py
    assert ms(r, "connect") < 50


@pytest.mark.parametrize("client", CLIENTS)
async def test_status_validation(http_server, env, client):
    (r,) = await run_probe(spec(http_server.url("/status/503"), section=HTTPSpec(client=client)), env)
    assert not r.ok and r.error is ErrorKind.HTTP_STATUS and r.http_status == 503
    assert r.failed_validators == ("status_code",)
    s = spec(http_server.url("/status/503"), section=HTTPSpec(client=client, valid_status_codes=(503,)))
    (r,) = await run_probe(s, env)
    assert r.ok


@pytest.mark.parametrize("client", CLIENTS)
async def test_body_and_header_validators_are_named(http_server, env, client):
    from prober.spec import HeaderMatch

    h = HTTPSpec(
        client=client,
        fail_if_body_not_matches_regexp=("nothere",),
        fail_if_body_matches_regexp=("hello",),
        fail_if_header_not_matches=(HeaderMatch(header="X-Server", regexp="^prod$"),),
        fail_if_header_matches=(HeaderMatch(header="Content-Type", regexp="text/plain"),),
        fail_if_ssl=False,
        fail_if_not_ssl=True,
    )
    (r,) = await run_probe(spec(http_server.url("/ok"), section=h), env)
    assert not r.ok and r.error is ErrorKind.VALIDATION
    assert set(r.failed_validators) == {
        "fail_if_body_matches_regexp", "fail_if_body_not_matches_regexp", "fail_if_header_matches",
        "fail_if_header_not_matches", "fail_if_not_ssl",
    }
    good = HTTPSpec(client=client, fail_if_body_not_matches_regexp=("ok h.llo",),
                    fail_if_header_not_matches=(HeaderMatch(header="X-Server", regexp="lab"),))
    (r,) = await run_probe(spec(http_server.url("/ok"), section=good), env)
    assert r.ok, r.failed_validators


@pytest.mark.parametrize("client", CLIENTS)
async def test_max_body_bytes(http_server, env, client):
    s = spec(http_server.url("/bytes/100000"), section=HTTPSpec(client=client, max_body_bytes=1000))
    (r,) = await run_probe(s, env)
    assert not r.ok and r.failed_validators == ("max_body_bytes",)
    s = spec(http_server.url("/bytes/1000"), section=HTTPSpec(client=client, max_body_bytes=1000))
    (r,) = await run_probe(s, env)
    assert r.ok


@pytest.mark.parametrize("client", CLIENTS)
async def test_redirect_phases_per_hop_summed(http_server, env, client):
    to = http_server.url("/slow?delay=0.05")
    (r,) = await run_probe(spec(http_server.url(f"/redirect?to={to}"), section=HTTPSpec(client=client)), env)
    assert r.ok, r.error_detail
    assert [p.name for p in r.phases].count("connect") == 2
    assert len(r.flows) == 2 and len(env.ports) == 2
    assert sorted(f.local_port for f in r.flows) == sorted(http_server.peer_ports[-2:])
    assert ms(r, "processing") >= 50
    s = spec(http_server.url(f"/redirect?to={to}"), section=HTTPSpec(client=client, follow_redirects=False,
                                                                     valid_status_codes=(302,)))
    (r,) = await run_probe(s, env)
    assert r.ok and r.http_status == 302 and len(r.flows) == 1


@pytest.mark.parametrize("client", CLIENTS)
async def test_connect_refused(env, client):
    import socket

    with socket.socket() as s:  # a port that certainly has no listener: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        (r,) = await run_probe(spec(f"http://127.0.0.1:{port}/", section=HTTPSpec(client=client)), env)
    assert not r.ok and r.error is ErrorKind.CONNECT_REFUSED, r
    assert [p.name for p in r.phases] == ["connect"]
    assert r.flows[0].remote_port == port and env.ports[0][1] == r.flows[0].local_port


@pytest.mark.parametrize("client", CLIENTS)
async def test_read_timeout(http_server, env, client):
    (r,) = await run_probe(spec(http_server.url("/hang"), section=HTTPSpec(client=client), timeout=0.3), env)
    assert not r.ok and r.error is ErrorKind.READ_TIMEOUT, r
    assert 290 <= r.duration_ns / 1e6 < 800
    assert ms(r, "processing") > 250  # the time went into the phase that was running


@pytest.mark.parametrize("client", CLIENTS)
async def test_ipv6(http_server6, env, client):
    (r,) = await run_probe(spec(http_server6.url("/ok"), section=HTTPSpec(client=client)), env)
    assert r.ok, r.error_detail
    assert r.address == "::1" and r.flows[0].remote_addr == "::1"
    assert r.flows[0].local_port == http_server6.peer_ports[-1]


@pytest.mark.parametrize("client", CLIENTS)
async def test_secret_headers_never_leak(http_server, env, client, caplog):
    secret = "s3cr3t-t0ken-value"
    h = HTTPSpec(client=client, headers={"Authorization": f"Bearer {secret}"},
                 fail_if_body_not_matches_regexp=("absent",))
    caplog.set_level(logging.DEBUG)
    s = spec(http_server.url("/ok"), section=h)
    (r,) = await run_probe(s, env)
    assert http_server.seen_headers[-1]["Authorization"] == f"Bearer {secret}"  # it was sent
    assert secret not in repr(r) and secret not in repr(s) and secret not in str(s.model_dump())
    assert secret not in caplog.text
    # a secret that ends up in an error message is scrubbed too
    (r,) = await run_probe(spec(f"http://user:{secret}@127.0.0.1:1/", section=h), env)
    assert secret not in repr(r)


@pytest.mark.parametrize("client", CLIENTS)
async def test_tls_verified_with_ca_file(https_server, cert_files, env, client):
    tls = TLSSpec(ca_file=str(cert_files[0]))
    url = f"https://127.0.0.1:{https_server.port}/ok"
    (r,) = await run_probe(spec(url, section=HTTPSpec(client=client, tls=tls, fail_if_not_ssl=True)), env)
    assert r.ok, r.error_detail
    assert [p.name for p in r.phases] == ["connect", "tls", "processing", "transfer"]
    # certificate valid 30 days: asking for 60 fails that validator by name
    tls60 = TLSSpec(ca_file=str(cert_files[0]), min_cert_days=60)
    (r,) = await run_probe(spec(url, section=HTTPSpec(client=client, tls=tls60)), env)
    assert not r.ok and r.failed_validators == ("min_cert_days",)
    tls10 = TLSSpec(ca_file=str(cert_files[0]), min_cert_days=10)
    (r,) = await run_probe(spec(url, section=HTTPSpec(client=client, tls=tls10)), env)
    assert r.ok


@pytest.mark.parametrize("client", CLIENTS)
async def test_tls_errors(https_server, cert_files, env, client):
    url = f"https://127.0.0.1:{https_server.port}/ok"
    (r,) = await run_probe(spec(url, section=HTTPSpec(client=client)), env)  # self-signed, not trusted
    assert not r.ok and r.error is ErrorKind.TLS_ERROR, r
    assert r.phase("tls") is not None
    wrong_name = TLSSpec(ca_file=str(cert_files[0]), server_name="other.example")
    (r,) = await run_probe(spec(url, section=HTTPSpec(client=client, tls=wrong_name)), env)
    assert not r.ok and r.error is ErrorKind.TLS_ERROR
    insecure = TLSSpec(insecure_skip_verify=True)
    (r,) = await run_probe(spec(url, section=HTTPSpec(client=client, tls=insecure)), env)
    assert r.ok, r.error_detail


async def test_tls_to_a_plain_server_is_a_tls_error(http_server, env):
    url = f"https://127.0.0.1:{http_server.port}/ok"
    (r,) = await run_probe(spec(url, section=HTTPSpec(tls=TLSSpec(insecure_skip_verify=True))), env)
    assert not r.ok and r.error is ErrorKind.TLS_ERROR


@pytest.mark.parametrize("client", CLIENTS)
async def test_post_body(http_server, env, client):
    h = HTTPSpec(client=client, method="POST", body="x" * 1234, fail_if_body_not_matches_regexp=("^1234$",))
    (r,) = await run_probe(spec(http_server.url("/upload"), section=h), env)
    assert r.ok, r.failed_validators


@pytest.mark.parametrize("client", CLIENTS)
async def test_redirect_to_a_name_is_resolved_by_the_prober(http_server, dns_server, env, client):
    to = f"http://v4only.lab.test:{http_server.port}/ok"
    (r,) = await run_probe(spec(http_server.url(f"/redirect?to={to}"), section=HTTPSpec(client=client)), env)
    assert r.ok, r.error_detail
    assert [t.name for t in r.dns] == ["v4only.lab.test.", "v4only.lab.test."]  # A and AAAA (NODATA)
    assert r.phase("resolve") is not None
    names = [p.name for p in r.phases]
    assert names.index("resolve") > names.index("connect")  # the second hop's resolution
    assert {(f.proto, f.local_port) for f in r.flows} == set(env.ports)


@pytest.mark.parametrize("client", CLIENTS)
async def test_relative_redirect_and_redirect_limit(http_server, env, client):
    (r,) = await run_probe(spec(http_server.url("/redirect?to=/ok"), section=HTTPSpec(client=client)), env)
    assert r.ok and r.http_status == 200 and len(r.flows) == 2
    loop_url = http_server.url("/redirect?to=/redirect%3Fto%3D/ok")
    (r,) = await run_probe(spec(loop_url, section=HTTPSpec(client=client, max_redirects=1)), env)
    assert not r.ok and r.error is ErrorKind.VALIDATION, r


@pytest.mark.parametrize("client", CLIENTS)
async def test_progress_points_say_how_the_body_arrived_bounded(http_server, env, client):
    """A body that keeps trickling in until the probe runs out of time: the result says how many bytes had
    arrived by when — a few dozen points at most, bytes growing, the last one the last arrival."""
    (r,) = await run_probe(spec(http_server.url("/trickle?every=0.005"), section=HTTPSpec(client=client),
                                timeout=0.6), env)
    assert r.error is ErrorKind.READ_TIMEOUT
    pts = r.progress
    assert 8 <= len(pts) <= PROGRESS_POINTS + 2, len(pts)
    assert all(a.ts_ns < b.ts_ns and a.bytes < b.bytes for a, b in itertools.pairwise(pts))
    assert r.start_ns < pts[0].ts_ns and pts[-1].ts_ns <= r.end_ns
    assert pts[-1].ts_ns == r.last_arrival_ns and r.bytes_by(pts[-1].ts_ns) == pts[-1].bytes
    assert r.end_ns - pts[-1].ts_ns < 300_000_000  # it kept arriving until close to the end
    (ok,) = await run_probe(spec(http_server.url("/bytes/5000"), section=HTTPSpec(client=client)), env)
    assert ok.ok and ok.progress and ok.progress[-1].bytes == 5000
