"""Config: one bad-config fixture per rule, each asserting the exact one-line message; a good config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from connprobe.cli import main
from connprobe.config import ConfigError, load_config, parse_config
from prober import ProbeSpec
from prober.spec import parse_duration

HERE = Path(__file__).parent

EXPECTED = {
    "yaml_syntax": "{file}:4: invalid YAML: did not find expected key",
    "top_level_unknown_key": "config: probs: unknown key (expected modules, probes, limits, node, peers)",
    "module_unknown_key": 'module "http_2xx": http.methd: unknown key',
    "probe_unknown_key": 'probe "db": intervl: unknown key',
    "unknown_module": 'probe "api": module: unknown module "http_3xx" (known: http_2xx)',
    "duplicate_probe": 'probe "db": name: duplicate (first defined as probes[0])',
    "missing_target": 'probe "db": target: required',
    "missing_name": "probes[0]: name: required",
    "bad_duration": "probe \"db\": interval: expected a duration like 5s, 250ms or 1m30s, got 'soon'",
    "bad_budget": "module \"web\": budget: expected a duration like 5s, 250ms or 1m30s, got '-1s'",
    "timeout_longer_than_interval": 'probe "db": timeout: 10s is longer than interval 5s',
    "target_not_url": "probe \"api\": target: http target must be an http:// or https:// URL, "
    "got 'srv1.lab.test:8080'",
    "tcp_target_without_port": "probe \"db\": target: tcp target must be host:port (IPv6 as [addr]:port), "
    "got 'db.lab.test'",
    "section_mismatch": "module \"http_2xx\": tcp: section given but prober is 'http'",
    "unknown_prober": "module \"smtp\": prober: must be 'http', 'tcp', 'dns', 'icmp', 'grpc', 'websocket' or 'unix'",
    "bad_regexp": "module \"http_2xx\": http.fail_if_body_not_matches_regexp: invalid regular expression "
    "'ok(': missing ), unterminated subpattern at position 2",
    "bad_status_code": 'module "http_2xx": http.valid_status_codes: status code 700 is outside 100-599',
    "cert_days_without_verify": 'module "https": http.tls: min_cert_days needs certificate verification '
    "(insecure_skip_verify is true)",
    "bad_ip_policy": "module \"http_2xx\": ip_policy: must be 'all', 'first', 'ipv4' or 'ipv6'",
    "bad_phase_histogram": "module \"http_2xx\": phase_histograms[1]: must be 'resolve', 'connect', 'tls', "
    "'processing', 'transfer', 'setup', 'rtt' or 'check'",
    "dns_without_query": 'module "dns_a": dns: required for prober dns (at least query_name)',
    "bad_query_type": "module \"dns_a\": dns.query_type: unknown query type 'AXFRR' "
    "(one of A, AAAA, ANY, CAA, CNAME, HTTPS, MX, NS, PTR, SOA, SRV, SVCB, TXT)",
    "bad_client": "module \"http_2xx\": http.client: must be 'aiohttp', 'aiohttp-session' or 'httpx'",
    "header_injection": "module \"http_2xx\": http.headers: header 'X-Test': value contains a line break",
    "bad_source": "probe \"db\": source: must be 'host', 'netns NAME', /run/netns/NAME or /proc/PID/ns/net, "
    "got 'namespace client'",
    "source_path": "probe \"db\": source: must be 'host', 'netns NAME', /run/netns/NAME or /proc/PID/ns/net, "
    "got '/etc/hostname'",
    "jitter_out_of_range": 'probe "db": jitter: must be less than or equal to 1',
    "jitter_nan": 'probe "db": jitter: must be a finite number',
    "probes_not_a_list": "config: probes: must be a list of probes",
    "bad_method": "module \"http_post\": http.method: invalid HTTP method 'PO ST'",
    # values that used to validate and then crash the agent (issue 10, item 8)
    "duration_inf": 'module "tcp": timeout: expected a finite duration, got inf',
    "duration_400_digits": 'probe "db": interval: must be at most 24h, got a number of about 400 digits',
    "duration_400_digit_string": "probe \"db\": interval: expected a duration like 5s, 250ms or 1m30s, got "
    "'99999999999999999999999999999999999999…",
    "duration_negative": 'probe "db": interval: must not be negative, got -5',
    "duration_too_large": "probe \"db\": interval: must be at most 24h, got '25h'",
    "duration_microsecond": 'module "tcp": timeout: must be at least 1ms, got 1e-06',
    "timeout_too_large": 'module "tcp": timeout: must be at most 10m, got 11m',
    "module_not_a_name": "probe \"db\": module: must be a module name, got ['x']",
    "deep_nesting": "{file}:4: nested more than 32 levels deep",
    "alias_loop": "config: a YAML alias refers to a collection that contains it",
    "not_utf8": "{file}:4: not UTF-8: byte 0xff at offset 51",
    "target_empty_label": "probe \"api\": target: 'a..b': label 2 is empty",
    "target_label_too_long": f"probe \"db\": target: '{'a' * 64}.lab.test': label 1 is 64 characters long (at most 63)",
    "query_name_empty_label": "module \"dns_a\": dns.query_name: 'srv1..lab.test': a label is empty",
    "duplicate_key": "{file}:8: invalid YAML: duplicate key 'interval' (first at line 7)",
    "too_many_probes": "config: probes: 3 probes, more than limits.max_probes (2)",
    "interval_below_minimum": 'probe "db": interval: 100ms is shorter than limits.min_interval (1s)',
    "bad_limits": "config: limits.max_probes: must be greater than or equal to 1",
    "name_with_line_break": "module \"tcp\\nx\": prober: must be 'http', 'tcp', 'dns', 'icmp', 'grpc', "
    "'websocket' or 'unix'",
}


def test_every_fixture_has_an_expectation():
    assert {p.stem for p in (HERE / "bad").glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("rule", sorted(EXPECTED))
def test_bad_config_message(rule, capsys):
    path = HERE / "bad" / f"{rule}.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [EXPECTED[rule].format(file=path)]
    assert main(["check-config", str(path)]) == 1
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
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{path}: OK: 4 modules, 4 probes (1 dns, 2 http, 1 tcp)"
    assert "very-secret-token" not in out


def test_several_errors_are_all_reported():
    text = "modules:\n  a: {prober: http, timout: 1s}\nprobes:\n  - {name: x, module: b, target: 'http://h/'}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.errors == ['module "a": timout: unknown key',
                                 'probe "x": module: unknown module "b" (known: a)']


def test_missing_file_is_an_environment_error_exit_2(tmp_path, capsys):
    """1 means "the config is invalid"; a file that cannot be read is 2, as for diagnose's environment errors."""
    assert main(["check-config", str(tmp_path / "nope.yaml")]) == 2
    missing = tmp_path / "nope.yaml"
    assert capsys.readouterr().err == f"check-config: {missing}: cannot read: No such file or directory\n"
    assert main(["check-config", str(tmp_path)]) == 2  # a directory
    assert "cannot read: not a regular file" in capsys.readouterr().err


# -- values that must load, and loaders that must never leak an exception -----------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("1m30s", 90.0), ("1h2m3s4ms", 3723.004), ("250ms", 0.25), ("1.5m", 90.0), ("5", 5.0), (7, 7.0),
    ("1s500ms", 1.5), ("24h", 86400.0), ("1d", 86400.0), (" 2s ", 2.0),
])
def test_durations_accepted(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("value", "message"), [
    (float("inf"), "expected a finite duration, got inf"),
    (float("nan"), "expected a finite duration, got nan"),
    (10**400, "must be at most 24h, got a number of about 401 digits"),
    ("1s1m", "expected a duration like 5s, 250ms or 1m30s, got '1s1m'"),
    ("1.5m30s", "expected a duration like 5s, 250ms or 1m30s, got '1.5m30s'"),
    ("25h", "must be at most 24h, got '25h'"),
    (True, "expected a duration like 5s, 250ms or 1m30s, got True"),
    ([1], "expected a duration like 5s, 250ms or 1m30s, got [1]"),
])
def test_durations_refused(value, message):
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) == message


def test_limits_and_source_forms():
    text = """
limits: {max_probes: 3, min_interval: 100ms}
modules:
  tcp: {prober: tcp, timeout: 50ms}
probes:
  - {name: a, module: tcp, target: "db.lab.test:1", interval: 200ms}
  - {name: b, module: tcp, target: "db.lab.test:2", source: /run/netns/cp-x, interval: 1m30s}
  - {name: c, module: tcp, target: "db.lab.test:3", source: /proc/1/ns/net}
"""
    cfg = parse_config(text)
    assert cfg.limits.max_probes == 3 and cfg.limits.min_interval == 0.1
    a, b, c = cfg.probes
    assert a.interval == 0.2 and b.interval == 90.0
    assert b.source == "netns cp-x" and b.source_spec.label == "cp-x"  # the path form is written as netns NAME
    assert c.source == "/proc/1/ns/net" and c.source_spec.label == "/proc/1/ns/net"


def test_merge_key_may_be_overridden():
    text = """
modules:
  tcp: {prober: tcp, timeout: 1s}
common: &common {module: tcp, interval: 1m30s}
probes:
  - {<<: *common, name: a, target: "db.lab.test:1", interval: 20s}
"""
    with pytest.raises(ConfigError, match="common: unknown key"):
        parse_config(text)
    cfg = parse_config(text.replace("common: &common {module: tcp, interval: 1m30s}\n", "").replace(
        "<<: *common", "<<: {module: tcp, interval: 1m30s}"))
    assert cfg.probes[0].interval == 20.0  # the explicit key wins over the merged one: not a duplicate


def test_duplicate_module_name_is_refused():
    text = "modules:\n  tcp: {prober: tcp}\n  tcp: {prober: http}\nprobes: []\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yml")
    assert info.value.errors == ["c.yml:3: invalid YAML: duplicate key 'tcp' (first at line 2)"]


@pytest.mark.parametrize("text", [
    "a: " + "[" * 100_000,  # libyaml's own limit
    "a: " + "{a: " * 3000 + "1" + "}" * 3000,
    "- " * 3000 + "x",
    "probes: &p [*p]",
    "!!python/object/apply:os.system ['true']",
    "modules: {? [a, b] : x}",
    "probes: [{name: 1, module: 2}, {name: x, module: {a: b}}, {name: y, module: tcp, target: [1]}]",
    "modules: {m: {prober: http, http: {headers: [1]}}}",
    "a: " + "9" * 5000,
    "\ufeffmodules: {}\x00",
])
def test_hostile_yaml_is_one_config_error(text):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yml")
    assert info.value.errors and all("\n" not in line and len(line) <= 300 for line in info.value.errors)


def test_many_errors_are_capped():
    probes = "".join(f"  - {{name: p{i}, module: nope}}\n" for i in range(500))
    with pytest.raises(ConfigError) as info:
        parse_config("modules: {}\nprobes:\n" + probes)
    assert len(info.value.errors) == 101 and info.value.errors[-1] == "... and 400 more errors"


@pytest.mark.parametrize("rule", ["not_utf8", "deep_nesting", "duration_inf", "module_not_a_name", "duplicate_key"])
def test_check_config_command_prints_one_line_no_traceback(rule):
    path = HERE / "bad" / f"{rule}.yaml"
    proc = subprocess.run([sys.executable, "-m", "connprobe.cli", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [EXPECTED[rule].format(file=path), f"{path}: 1 error"]


def test_what_is_not_a_config_file(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # nobody writes: a blocking open would never return
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (16 << 20) + b"\n")
    for path, message in [(fifo, "cannot read: not a regular file"), (tmp_path, "cannot read: not a regular file"),
                          (big, "larger than 16 MiB")]:
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert info.value.errors == [f"{path}: {message}"]
