"""What blackbox_exporter 0.23 itself rejects (`--config.check`), connprobe rejects too, with one line naming the
key; where connprobe is stricter than blackbox, the case says so."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from connprobe.config import ConfigError, load_config

BLACKBOX = "prometheus-blackbox-exporter"

# (case, module body as YAML flow, what connprobe's one line names, does blackbox 0.23 reject it too)
CASES = [
    ("unknown_prober", "{prober: smtp}", "prober", False),
    ("unknown_module_key", "{prober: http, retries: 3}", "retries: unknown key", True),
    ("unknown_http_key", "{prober: http, http: {methd: GET}}", "http.methd: unknown key", True),
    ("unknown_tcp_key", "{prober: tcp, tcp: {query_respons: []}}", "tcp.query_respons: unknown key", True),
    ("unknown_step_key", "{prober: tcp, tcp: {query_response: [{expects: x}]}}", "tcp.query_response[0]", True),
    ("bad_body_regexp", "{prober: http, http: {fail_if_body_matches_regexp: ['(']}}",
     "http.fail_if_body_matches_regexp: invalid regular expression", True),
    ("bad_header_regexp", "{prober: http, http: {fail_if_header_matches: [{header: X, regexp: '['}]}}",
     "http.fail_if_header_matches[0].regexp: invalid regular expression", True),
    ("bad_expect_regexp", "{prober: tcp, tcp: {query_response: [{expect: '('}]}}",
     "tcp.query_response[0].expect: invalid regular expression", True),
    ("bad_rr_regexp", "{prober: dns, dns: {query_name: a.test, validate_answer_rrs: {fail_if_matches_regexp: ['(']}}}",
     "dns.validate_answer_rrs.fail_if_matches_regexp: invalid regular expression", False),
    ("dns_without_query_name", "{prober: dns, dns: {query_type: A}}", "dns.query_name: required", True),
    ("dns_bad_query_type", "{prober: dns, dns: {query_name: a.test, query_type: NOPE}}", "dns.query_type", True),
    ("dns_bad_rcode", "{prober: dns, dns: {query_name: a.test, valid_rcodes: [NOPE]}}", "dns.valid_rcodes", False),
    ("dns_bad_transport", "{prober: dns, dns: {query_name: a.test, transport_protocol: sctp}}",
     "dns.transport_protocol", False),
    ("dot_over_udp", "{prober: dns, dns: {query_name: a.test, dns_over_tls: true}}",
     "dns.dns_over_tls: needs transport_protocol: tcp", False),
    ("dot_not_bool", "{prober: dns, dns: {query_name: a.test, transport_protocol: tcp, dns_over_tls: maybe}}",
     "dns.dns_over_tls", True),
    ("dns_tls_config_without_dot", "{prober: dns, dns: {query_name: a.test, tls_config: {ca_file: /etc/hostname}}}",
     "dns.tls_config: only used with dns_over_tls: true", False),
    ("dns_bad_source_ip", "{prober: dns, dns: {query_name: a.test, source_ip_address: 10.0.0.300}}",
     "dns.source_ip_address: '10.0.0.300' is not an IP address", False),
    ("bad_timeout", "{prober: http, timeout: soon}", "timeout: expected a duration", True),
    ("two_bearer_tokens", "{prober: http, http: {bearer_token: a, bearer_token_file: /etc/hostname}}",
     "http: at most one of basic_auth, bearer_token, bearer_token_file, authorization and oauth2", True),
    ("password_twice", "{prober: http, http: {basic_auth: {username: u, password: p, password_file: /etc/hostname}}}",
     "http.basic_auth: at most one of password and password_file", True),
    ("basic_and_bearer", "{prober: http, http: {bearer_token: a, basic_auth: {username: u, password: p}}}",
     "http: at most one of basic_auth", True),
    ("authorization_basic", "{prober: http, http: {authorization: {type: Basic, credentials: x}}}",
     "http.authorization.type: Basic is set with basic_auth", True),
    ("compression_not_accepted", "{prober: http, http: {compression: gzip, headers: {Accept-Encoding: br}}}",
     "compression: gzip is not in the configured Accept-Encoding header", True),
    ("oauth2_without_secret", "{prober: http, http: {oauth2: {client_id: a, token_url: 'http://127.0.0.1/t'}}}",
     "http.oauth2.client_secret: required", True),
    ("oauth2_two_secrets", "{prober: http, http: {oauth2: {client_id: a, client_secret: b, client_secret_file: "
     "/etc/hostname, token_url: 'http://127.0.0.1/t'}}}", "http.oauth2: at most one of client_secret and "
     "client_secret_file", True),
    ("oauth2_without_client_id", "{prober: http, http: {oauth2: {client_secret: b, token_url: 'http://h/t'}}}",
     "http.oauth2.client_id: required", True),
    ("oauth2_without_token_url", "{prober: http, http: {oauth2: {client_id: a, client_secret: b}}}",
     "http.oauth2.token_url: required", True),
    ("oauth2_and_bearer", "{prober: http, http: {bearer_token: x, oauth2: {client_id: a, client_secret: b, "
     "token_url: 'http://h/t'}}}", "http: at most one of basic_auth, bearer_token, bearer_token_file, "
     "authorization and oauth2", True),
    ("tls_unknown_version", "{prober: http, http: {tls_config: {min_version: TLS14}}}", "http.tls.min_version: "
     "must be 'TLS10', 'TLS11', 'TLS12' or 'TLS13'", True),
    ("tls_min_above_max", "{prober: http, http: {tls_config: {min_version: TLS13, max_version: TLS12}}}",
     "http.tls: min_version TLS13 is above max_version TLS12", False),
    ("grpc_tls_version", "{prober: grpc, grpc: {tls: true, tls_config: {min_version: TLS12}}}",
     "grpc.tls_config: min_version/max_version are not possible with grpc", False),
    # rejected by 0.23 as unknown fields (inline PEM came with later prometheus/common, documented today)
    ("tls_ca_and_ca_file", "{prober: http, http: {tls_config: {ca: x, ca_file: /etc/hostname}}}",
     "http.tls: at most one of ca and ca_file", True),
    # also unknown to 0.23 (later prometheus/common): rejected there as unknown fields, here for what later ones say
    ("no_proxy_without_proxy_url", "{prober: http, http: {no_proxy: a.test}}", "http: no_proxy: needs proxy_url",
     True),
    ("proxy_env_and_url", "{prober: http, http: {proxy_from_environment: true, proxy_url: 'http://127.0.0.1:3128'}}",
     "http.proxy_from_environment: give proxy_url or proxy_from_environment, not both", True),
    ("bad_status_type", "{prober: http, http: {valid_status_codes: [ok]}}", "http.valid_status_codes", True),
    # False: stricter than blackbox 0.23, which accepts these at load (`--config.check`) and probes with a
    # default or fails at probe time (an unknown prober, a bad RR regexp, rcode or transport are such)
    ("bad_ip_protocol", "{prober: http, http: {preferred_ip_protocol: ip5}}", "http.preferred_ip_protocol", False),
    ("bad_status_code", "{prober: http, http: {valid_status_codes: [700]}}", "status code 700 is outside 100-599",
     False),
    ("missing_token_file", "{prober: http, http: {bearer_token_file: /nonexistent/t}}",
     "http.bearer_token_file: cannot read", False),
]


def _blackbox_rejects(path: Path) -> bool:
    out = subprocess.run([BLACKBOX, "--config.check", f"--config.file={path}"], capture_output=True, text=True,
                         timeout=30)
    return out.returncode != 0


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_rejected_by_both_or_stricter_here(tmp_path, case):
    if shutil.which(BLACKBOX) is None:
        pytest.fail(f"{BLACKBOX} is not installed: scripts/setup installs it")
    _name, body, names, blackbox_rejects = next(c for c in CASES if c[0] == case)
    path = tmp_path / "blackbox.yml"
    path.write_text(f"modules:\n  m: {body}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path, blackbox=True)
    assert len(ei.value.errors) == 1 and names in ei.value.errors[0], ei.value.errors
    assert ei.value.errors[0].startswith('module "m": ')
    assert _blackbox_rejects(path) == blackbox_rejects, (case, "blackbox_exporter's own verdict differs")
