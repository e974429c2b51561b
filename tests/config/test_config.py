"""Config: one bad-config fixture per rule, each asserting the exact one-line message; a good config."""

from __future__ import annotations

from pathlib import Path

import pytest

from connprobe.config import ConfigError, check_config_main, load_config, parse_config
from prober import ProbeSpec

HERE = Path(__file__).parent

EXPECTED = {
    "yaml_syntax": "{file}:4: invalid YAML: expected <block end>, but found '<block mapping start>'",
    "top_level_unknown_key": "config: probs: unknown key (expected modules, probes)",
    "module_unknown_key": 'module "http_2xx": http.methd: unknown key',
    "probe_unknown_key": 'probe "db": intervl: unknown key',
    "unknown_module": 'probe "api": module: unknown module "http_3xx" (known: http_2xx)',
    "duplicate_probe": 'probe "db": name: duplicate (first defined as probes[0])',
    "missing_target": 'probe "db": target: required',
    "missing_name": "probes[0]: name: required",
    "bad_duration": "probe \"db\": interval: expected a duration like 5s or 250ms, got 'soon'",
    "bad_budget": "module \"web\": budget: expected a duration like 5s or 250ms, got '-1s'",
    "timeout_longer_than_interval": 'probe "db": timeout: 10s is longer than interval 5s',
    "target_not_url": "probe \"api\": target: http target must be an http:// or https:// URL, "
    "got 'srv1.lab.test:8080'",
    "tcp_target_without_port": "probe \"db\": target: tcp target must be host:port (IPv6 as [addr]:port), "
    "got 'db.lab.test'",
    "section_mismatch": "module \"http_2xx\": tcp: section given but prober is 'http'",
    "unknown_prober": "module \"icmp\": prober: must be 'http', 'tcp' or 'dns'",
    "bad_regexp": "module \"http_2xx\": http.fail_if_body_not_matches_regexp: invalid regular expression "
    "'ok(': missing ), unterminated subpattern at position 2",
    "bad_status_code": 'module "http_2xx": http.valid_status_codes: status code 700 is outside 100-599',
    "cert_days_without_verify": 'module "https": http.tls: min_cert_days needs certificate verification '
    "(insecure_skip_verify is true)",
    "bad_ip_policy": "module \"http_2xx\": ip_policy: must be 'all', 'first', 'ipv4' or 'ipv6'",
    "dns_without_query": 'module "dns_a": dns: required for prober dns (at least query_name)',
    "bad_query_type": "module \"dns_a\": dns.query_type: unknown query type 'AXFRR' "
    "(one of A, AAAA, ANY, CAA, CNAME, HTTPS, MX, NS, PTR, SOA, SRV, SVCB, TXT)",
    "bad_client": "module \"http_2xx\": http.client: must be 'aiohttp', 'aiohttp-session' or 'httpx'",
    "header_injection": "module \"http_2xx\": http.headers: header 'X-Test': value contains a line break",
    "bad_source": "probe \"db\": source: must be 'host', 'netns NAME' or an absolute path to a namespace, "
    "got 'namespace client'",
    "jitter_out_of_range": 'probe "db": jitter: must be less than or equal to 1',
    "probes_not_a_list": "config: probes: must be a list of probes",
    "bad_method": "module \"http_post\": http.method: invalid HTTP method 'PO ST'",
}


def test_every_fixture_has_an_expectation():
    assert {p.stem for p in (HERE / "bad").glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("rule", sorted(EXPECTED))
def test_bad_config_message(rule, capsys):
    path = HERE / "bad" / f"{rule}.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [EXPECTED[rule].format(file=path)]
    assert check_config_main([str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [EXPECTED[rule].format(file=path), f"{path}: 1 error"]


GOOD = """
modules:
  http_2xx:
    prober: http
    timeout: 2s
    ip_policy: all
    http:
      valid_status_codes: [200, 204]
      headers: {Authorization: "Bearer very-secret-token"}
      fail_if_body_not_matches_regexp: ["ok"]
      tls: {min_cert_days: 14}
  httpx_2xx:
    prober: http
    http: {client: httpx}
  tcp_connect: {prober: tcp, timeout: 1500ms}
  dns_srv1:
    prober: dns
    dns: {query_name: srv1.lab.test, query_type: AAAA, valid_rcodes: [NOERROR]}
probes:
  - {name: api, module: http_2xx, target: "https://srv1.lab.test:8443/ok", interval: 10s,
     source: netns cp-abc-client, labels: {team: platform}}
  - {name: api-httpx, module: httpx_2xx, target: "http://[fd77:2::11]:8080/ok"}
  - {name: db, module: tcp_connect, target: "srv2.lab.test:8080", jitter: 0.2}
  - {name: resolver, module: dns_srv1, target: "10.77.2.53"}
"""


def test_good_config_is_frozen_objects(tmp_path, capsys):
    cfg = parse_config(GOOD)
    assert [p.name for p in cfg.probes] == ["api", "api-httpx", "db", "resolver"]
    api = cfg.probes[0]
    assert isinstance(api, ProbeSpec) and api.interval == 10.0 and api.effective_timeout == 2.0
    assert api.module.http.valid_status_codes == (200, 204) and api.source == "netns cp-abc-client"
    assert cfg.probes[2].effective_timeout == 1.5 and cfg.probes[2].jitter == 0.2
    with pytest.raises(Exception, match="frozen"):
        api.interval = 1.0
    assert "very-secret-token" not in repr(cfg)
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    assert check_config_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{path}: OK: 4 modules, 4 probes (1 dns, 2 http, 1 tcp)"
    assert "very-secret-token" not in out


def test_several_errors_are_all_reported():
    text = "modules:\n  a: {prober: http, timout: 1s}\nprobes:\n  - {name: x, module: b, target: 'http://h/'}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.errors == ['module "a": timout: unknown key',
                                 'probe "x": module: unknown module "b" (known: a)']


def test_missing_file(tmp_path, capsys):
    assert check_config_main([str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read: No such file or directory" in capsys.readouterr().err
