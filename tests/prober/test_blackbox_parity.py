"""blackbox_exporter's TCP `query_response` (with STARTTLS) and DNS section matchers, against real loopback servers."""

from __future__ import annotations

import asyncio
import ssl

import dns.message
import dns.rdataclass
import dns.rrset
import pytest

from prober import DNSSpec, ErrorKind, QueryStep, TCPSpec, TLSSpec, run_probe
from prober.spec import RRValidator
from tests.agent.pki import CA
from tests.prober.helpers import spec


@pytest.fixture
def pki(tmp_path):
    ca = CA(tmp_path, "smtp-ca")
    return ca, ca.issue("localhost", server=True)


@pytest.fixture
async def smtp_server(pki):
    """An SMTP-like line protocol on loopback: greeting, EHLO listing STARTTLS, STARTTLS upgrading to TLS."""
    ca, pair = pki
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pair.cert, pair.key)
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
    assert [p.name for p in r.phases][0] == "connect"
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
