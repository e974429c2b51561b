"""blackbox_exporter's metrics from a result's values: the same names and meaning on /probe and in the agent."""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, generate_latest

from connprobe.metrics import Metrics, ip_addr_hash, probe_registry
from prober.types import ProbeKind
from tests.app.test_metrics import result, samples, verdict

HTTP_VALUES = {"http_version": 1.1, "http_content_length": -1.0, "http_uncompressed_body_length": 1234.0,
               "http_redirects": 2.0, "http_ssl": 1.0, "http_last_modified": 1.7e9,
               "ssl_earliest_cert_expiry": 1.8e9, "ssl_last_chain_expiry": 1.81e9, "tls_version": 1.3}
EXPECTED = {"probe_http_version": 1.1, "probe_http_content_length": -1.0,
            "probe_http_uncompressed_body_length": 1234.0, "probe_http_redirects": 2.0, "probe_http_ssl": 1.0,
            "probe_http_last_modified_timestamp_seconds": 1.7e9, "probe_ssl_earliest_cert_expiry": 1.8e9,
            "probe_ssl_last_chain_expiry_timestamp_seconds": 1.81e9, "probe_ip_protocol": 4.0}


def _with(r, values: dict[str, float]):
    return dataclasses.replace(r, values=tuple(sorted(values.items())))


def test_probe_endpoint_and_agent_export_the_same_blackbox_metrics():
    r = _with(result(), HTTP_VALUES)
    one = samples(generate_latest(probe_registry(verdict(r))))
    for name, value in EXPECTED.items():
        assert one[(name, frozenset())] == value, name
    assert one[("probe_tls_version_info", frozenset({("version", "TLS 1.3")}))] == 1.0
    assert one[("probe_ip_addr_hash", frozenset())] == ip_addr_hash("10.77.2.11")

    m = Metrics(CollectorRegistry(), clock=lambda: 1000.0)
    m.observe(verdict(r))
    agent = samples(generate_latest(m.registry))
    pl = {("probe", "web"), ("target", "http://srv1.lab.test:8080/ok"), ("source", "cp-client")}
    for name, value in EXPECTED.items():
        assert agent[(name, frozenset(pl))] == value, name
    assert agent[("probe_tls_version_info", frozenset(pl | {("version", "TLS 1.3")}))] == 1.0
    # a later handshake with another version replaces the series (one version at a time)
    m.observe(verdict(_with(result(), {**HTTP_VALUES, "tls_version": 1.2})))
    versions = [dict(k[1])["version"] for k in samples(generate_latest(m.registry)) if k[0] == "probe_tls_version_info"]
    assert versions == ["TLS 1.2"]


def test_dns_section_counts():
    r = _with(result(kind=ProbeKind.DNS, status=None, target="10.77.2.53:53"),
              {"dns_answer_rrs": 2.0, "dns_authority_rrs": 1.0, "dns_additional_rrs": 0.0})
    one = samples(generate_latest(probe_registry(verdict(r))))
    assert (one[("probe_dns_answer_rrs", frozenset())], one[("probe_dns_authority_rrs", frozenset())],
            one[("probe_dns_additional_rrs", frozenset())]) == (2.0, 1.0, 0.0)


def test_ip_addr_hash_is_fnv1a_over_the_address_bytes():
    # FNV-1a 32 over 127.0.0.1's 4 bytes and ::1's 16, from the algorithm's definition; blackbox_exporter's own
    # value for 127.0.0.1 is checked in tests/app/test_blackbox_side_by_side.py
    def fnv(data: bytes) -> int:
        h = 2166136261
        for b in data:
            h = ((h ^ b) * 16777619) % 2**32
        return h

    assert ip_addr_hash("127.0.0.1") == fnv(b"\x7f\x00\x00\x01") == 3668918509
    assert ip_addr_hash("::1") == fnv(bytes(15) + b"\x01")
    assert ip_addr_hash("fe80::1%eth0") == fnv(b"\xfe\x80" + bytes(13) + b"\x01")
    assert ip_addr_hash("not an address") is None
