"""blackbox_exporter's blackbox.yml read as connprobe modules (`connprobe.blackbox`): every documented key is
mapped or refused with one line naming it; credentials files are read; hostile files end in one line each."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from connprobe.blackbox import KEYS, REFUSED, markdown_table, metrics_table
from connprobe.commands.check_config import run as check_config_main
from connprobe.config import ConfigError, load_config, parse_config

# A blackbox.yml as a platform team writes one (our own, covering each prober and the keys connprobe maps).
BLACKBOX_YML = """\
modules:
  http_2xx:
    prober: http
    timeout: 5s
    http:
      valid_status_codes: [200, 204]
      method: GET
      headers:
        Accept: application/json
      no_follow_redirects: false
      fail_if_ssl: false
      fail_if_not_ssl: false
      fail_if_body_not_matches_regexp: ["ok"]
      fail_if_header_matches:
        - header: X-Broken
          regexp: "yes"
          allow_missing: true
      preferred_ip_protocol: ip4
      ip_protocol_fallback: false
      body_size_limit: 1MB
      enable_http2: false
  http_post_token:
    prober: http
    http:
      method: POST
      body_file: body.json
      bearer_token_file: token
      tls_config:
        ca_file: ca.pem
        server_name: api.internal
        min_version: TLS12
        max_version: TLS13
  http_basic:
    prober: http
    http:
      basic_auth:
        username: prober
        password_file: secrets/password
  http_proxy:
    prober: http
    http:
      proxy_url: http://127.0.0.1:3128
  http_oauth2:
    prober: http
    http:
      oauth2:
        client_id: prober
        client_secret_file: secrets/oauth
        token_url: https://auth.internal/oauth/token
        scopes: [health.read, probe]
        endpoint_params: {audience: api}
        tls_config:
          ca_file: ca.pem
          min_version: TLS13
  http_authz:
    prober: http
    http:
      authorization:
        type: Token
        credentials: s3cr3t
  tcp_connect:
    prober: tcp
    timeout: 2s
  smtp_starttls:
    prober: tcp
    timeout: 5s
    tcp:
      query_response:
        - expect: "^220 "
        - send: "EHLO prober"
        - expect: "^250-STARTTLS"
        - send: "STARTTLS"
        - expect: "^220"
        - starttls: true
        - send: "QUIT"
      tls_config:
        insecure_skip_verify: false
  dns_soa:
    prober: dns
    dns:
      query_name: lab.test
      query_type: SOA
      transport_protocol: tcp
      query_class: IN
      valid_rcodes: [NOERROR]
      validate_answer_rrs:
        fail_if_matches_regexp: [".*127.0.0.1"]
        fail_if_all_match_regexp: ["nope"]
        fail_if_not_matches_regexp: ["lab.test.\\t\\\\d+\\tIN\\tSOA"]
        fail_if_none_matches_regexp: ["SOA"]
      validate_authority_rrs:
        fail_if_matches_regexp: [".*bad.*"]
      validate_additional_rrs:
        fail_if_none_matches_regexp: [".*"]
  dns_any:
    prober: dns
    dns:
      query_name: www.lab.test
  dns_dot:
    prober: dns
    dns:
      query_name: www.lab.test
      query_type: A
      transport_protocol: tcp
      dns_over_tls: true
      source_ip_address: 10.0.0.2
      tls_config:
        ca_file: ca.pem
        server_name: dns.lab.test
  icmp_v4:
    prober: icmp
    icmp:
      preferred_ip_protocol: ip4
      ip_protocol_fallback: false
      dont_fragment: true
      payload_size: 56
      ttl: 32
  grpc_plain:
    prober: grpc
    grpc:
      service: shop.Cart
      tls: false
      preferred_ip_protocol: ip4
"""


@pytest.fixture
def bb_dir(tmp_path: Path) -> Path:
    (tmp_path / "blackbox.yml").write_text(BLACKBOX_YML)
    (tmp_path / "body.json").write_text('{"ping": true}')
    (tmp_path / "token").write_text("tok-123\n")
    (tmp_path / "ca.pem").write_text("not parsed at load\n")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "password").write_text("pa:ss\n")
    (tmp_path / "secrets" / "oauth").write_text("oauth-Cn-s3cret\n")
    return tmp_path


def test_realistic_blackbox_yml_loads(bb_dir: Path) -> None:
    cfg = load_config(bb_dir / "blackbox.yml", blackbox=True)
    m = cfg.modules
    assert m["http_proxy"].http.proxy_url == "http://127.0.0.1:3128" and m["http_proxy"].http.client == "httpx"
    assert sorted(m) == sorted(["http_2xx", "http_post_token", "http_basic", "http_authz", "http_proxy", "tcp_connect",
                                "smtp_starttls", "dns_soa", "dns_any", "dns_dot", "icmp_v4", "grpc_plain",
                                "http_oauth2"])
    o = m["http_oauth2"].http.oauth2
    assert (o.client_id, o.client_secret.get_secret_value(), o.scopes, o.endpoint_params) == (
        "prober", "oauth-Cn-s3cret", ("health.read", "probe"), {"audience": "api"})  # the file's newline gone
    assert o.tls.ca_file == str(bb_dir / "ca.pem") and o.tls.min_version == "TLS13"
    assert cfg.probes == ()
    h = m["http_2xx"].http
    assert h.valid_status_codes == (200, 204) and h.follow_redirects is True
    assert h.max_body_bytes == 1 << 20
    assert (h.preferred_ip_protocol, h.ip_protocol_fallback) == ("ip4", False)
    assert m["http_2xx"].preferred_family() == ("ip4", False)
    assert h.fail_if_header_matches[0].allow_missing is True
    t = m["http_post_token"].http
    assert t.body == '{"ping": true}'
    assert t.headers["Authorization"].get_secret_value() == "Bearer tok-123"  # trailing newline gone
    assert t.tls.ca_file == str(bb_dir / "ca.pem") and t.tls.server_name == "api.internal"
    assert (t.tls.min_version, t.tls.max_version) == ("TLS12", "TLS13")
    assert m["http_post_token"].preferred_family() == ("ip6", True)  # blackbox's default
    basic = m["http_basic"].http.headers["Authorization"].get_secret_value()
    assert basic == "Basic " + base64.b64encode(b"prober:pa:ss").decode()
    assert m["http_authz"].http.headers["Authorization"].get_secret_value() == "Token s3cr3t"
    steps = m["smtp_starttls"].tcp.query_response
    assert [s.starttls for s in steps].index(True) == 5 and steps[1].send == "EHLO prober"
    d = m["dns_soa"].dns
    assert (d.query_type, d.transport) == ("SOA", "tcp")
    assert d.validate_answer_rrs.fail_if_all_match_regexp == ("nope",)
    assert m["dns_any"].dns.query_type == "ANY"  # blackbox's default query_type
    dot = m["dns_dot"].dns
    assert (dot.transport, dot.source_ip_address) == ("tls", "10.0.0.2")
    assert dot.tls_config.ca_file == str(bb_dir / "ca.pem") and dot.tls_config.server_name == "dns.lab.test"
    assert h.accept_encoding == "identity" and m["tcp_connect"].tcp is not None  # blackbox asks for no coding
    i = m["icmp_v4"].icmp
    assert (i.dont_fragment, i.payload_size, i.ttl, i.preferred_ip_protocol) == (True, 56, 32, "ip4")
    assert m["grpc_plain"].grpc.service == "shop.Cart"


def test_secrets_never_in_repr(bb_dir: Path) -> None:
    cfg = load_config(bb_dir / "blackbox.yml", blackbox=True)
    text = repr(cfg.modules)
    assert "tok-123" not in text and "s3cr3t" not in text and "pa:ss" not in text and "oauth-Cn" not in text


def test_check_config_blackbox_cli(bb_dir: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "connprobe.cli", "check-config", "--blackbox",
                          str(bb_dir / "blackbox.yml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "OK (blackbox_exporter format): 13 modules, 0 probes" in out.stdout
    assert "  module smtp_starttls: tcp, timeout 5s" in out.stdout
    assert "tok-123" not in out.stdout + out.stderr


def test_blackbox_module_in_a_connprobe_config(tmp_path: Path) -> None:
    """The same keys are accepted in a connprobe config's module (connprobe's defaults kept)."""
    (tmp_path / "t").write_text("abc")
    cfg = load_config(_write(tmp_path, """\
modules:
  m:
    prober: http
    http: {bearer_token_file: t, no_follow_redirects: true, tls_config: {insecure_skip_verify: true}}
  d:
    prober: dns
    dns: {query_name: a.lab.test}
probes:
  - {name: p, module: m, target: "http://a.lab.test/"}
"""))
    h = cfg.modules["m"].http
    assert h.headers["Authorization"].get_secret_value() == "Bearer abc"
    assert h.follow_redirects is False and h.tls.insecure_skip_verify is True
    assert h.preferred_ip_protocol is None  # connprobe's default: no family preferred
    assert h.accept_encoding is None  # the client's own "gzip, deflate"
    assert cfg.modules["d"].dns.query_type == "A"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yml"
    p.write_text(text)
    return p


def _errors(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        load_config(_write(tmp_path, text), blackbox=True)
    assert all("\n" not in e for e in ei.value.errors)
    return ei.value.errors


HOSTILE = {
    "oauth2_proxy": ("http: {oauth2: {client_id: a, client_secret: b, token_url: 'http://127.0.0.1/t', "
                     "proxy_url: 'http://127.0.0.1:3128'}}",
                     'module "m": http.oauth2.proxy_url: blackbox_exporter key not supported by connprobe: not '
                     "supported (the token endpoint is reached directly)"),
    "oauth2_no_secret": ("http: {oauth2: {client_id: a, token_url: 'http://127.0.0.1/t'}}",
                         'module "m": http.oauth2.client_secret: required'),
    "oauth2_two_secrets": ("http: {oauth2: {client_id: a, client_secret: b, client_secret_file: /etc/hostname, "
                           "token_url: 'http://127.0.0.1/t'}}",
                           'module "m": http.oauth2: at most one of client_secret and client_secret_file'),
    "oauth2_no_client_id": ("http: {oauth2: {client_secret: b, token_url: 'http://127.0.0.1/t'}}",
                            'module "m": http.oauth2.client_id: required'),
    "oauth2_no_token_url": ("http: {oauth2: {client_id: a, client_secret: b}}",
                            'module "m": http.oauth2.token_url: required'),
    "oauth2_bad_token_url": ("http: {oauth2: {client_id: a, client_secret: b, token_url: 'ftp://127.0.0.1/t'}}",
                             "module \"m\": http.oauth2.token_url: token_url: 'ftp://127.0.0.1/t' is not an "
                             "http:// or https:// URL"),
    "oauth2_unknown": ("http: {oauth2: {client_id: a, client_secret: b, token_url: 'http://h/t', scope: [x]}}",
                       'module "m": http.oauth2.scope: unknown key'),
    "oauth2_and_bearer": ("http: {bearer_token: x, oauth2: {client_id: a, client_secret: b, token_url: 'http://h/'}}",
                          'module "m": http: at most one of basic_auth, bearer_token, bearer_token_file, '
                          "authorization and oauth2 (got bearer_token, oauth2)"),
    "oauth2_and_header": ("http: {headers: {Authorization: x}, oauth2: {client_id: a, client_secret: b, "
                          "token_url: 'http://h/'}}",
                          'module "m": http: oauth2: an Authorization header is also configured (the token is '
                          "sent as one)"),
    "oauth2_secret_file_missing": ("http: {oauth2: {client_id: a, client_secret_file: /nonexistent/s, "
                                   "token_url: 'http://h/'}}",
                                   "module \"m\": http.oauth2.client_secret_file: cannot read '/nonexistent/s': "
                                   "No such file or directory"),
    "oauth2_tls_inline": ("http: {oauth2: {client_id: a, client_secret: b, token_url: 'https://h/', "
                          "tls_config: {key_file_ref: x}}}",
                          'module "m": http.oauth2.tls_config.key_file_ref: blackbox_exporter key not supported by '
                          "connprobe: not supported"),
    "proxy_connect_header": ("http: {proxy_connect_header: {X: [y]}}",
                             'module "m": http: proxy_headers: needs proxy_url'),
    "two_credentials": ("http: {bearer_token: a, basic_auth: {username: u, password: p}}",
                        'module "m": http: at most one of basic_auth, bearer_token, bearer_token_file, '
                        "authorization and oauth2 (got basic_auth, bearer_token)"),
    "password_and_file": ("http: {basic_auth: {username: u, password: p, password_file: /etc/hostname}}",
                          'module "m": http.basic_auth: at most one of password and password_file'),
    "missing_token_file": ("http: {bearer_token_file: /nonexistent/token}",
                           "module \"m\": http.bearer_token_file: cannot read '/nonexistent/token': "
                           "No such file or directory"),
    "token_file_is_dir": ("http: {bearer_token_file: /tmp}",
                          "module \"m\": http.bearer_token_file: '/tmp' is not a regular file"),
    "authz_basic": ("http: {authorization: {type: Basic, credentials: x}}",
                    'module "m": http.authorization.type: Basic is set with basic_auth, not authorization'),
    "authz_no_creds": ("http: {authorization: {type: Bearer}}",
                       'module "m": http.authorization.credentials: required'),
    "header_and_creds": ("http: {bearer_token: a, headers: {authorization: b}}",
                         'module "m": http.headers: an Authorization header and credentials (basic_auth, '
                         "bearer_token, authorization) both given"),
    "http2": ("http: {enable_http2: true, client: aiohttp}",
              'module "m": http: http2: needs client: httpx (the aiohttp client speaks HTTP/1.1)'),
    "bad_size": ("http: {body_size_limit: lots}",
                 "module \"m\": http.body_size_limit: expected a size like 1MB, got 'lots'"),
    "redirect_both": ("http: {no_follow_redirects: true, follow_redirects: true}",
                      'module "m": http.no_follow_redirects: give follow_redirects or no_follow_redirects, '
                      "not both"),
    "tls_inline_ca": ("http: {tls_config: {ca: '-----BEGIN'}}", 'module "m": http.tls: ca: not PEM certificates'),
    "tls_inline_and_file": ("http: {tls_config: {cert: x, cert_file: /etc/hostname}}",
                            'module "m": http.tls: at most one of cert and cert_file'),
    "tls_inline_key_alone": ("http: {tls_config: {key: x}}", 'module "m": http.tls: key needs cert_file or cert'),
    "tls_bad_client_cert": ("http: {tls_config: {cert_file: /etc/hostname}}",
                            'module "m": http.tls_config.cert_file: cannot load the client certificate and key: '
                            "not PEM, or the key does not match the certificate"),
    "tls_unknown": ("http: {tls_config: {insecure_skip_verfy: true}}",
                    'module "m": http.tls.insecure_skip_verfy: unknown key'),
    "unknown_http_key": ("http: {valid_status_code: [200]}", 'module "m": http.valid_status_code: unknown key'),
    "proxy_other_client": ("http: {proxy_url: 'http://127.0.0.1:3128', client: aiohttp}",
                           'module "m": http: proxy_url: needs client: httpx (the aiohttp client does not use '
                           "proxies)"),
    "bad_family": ("http: {preferred_ip_protocol: ip5}", "module \"m\": http.preferred_ip_protocol: must be "
                   "'ip4' or 'ip6'"),
    "bad_timeout_unit": ("timeout: 1w", "module \"m\": timeout: expected a duration like 5s, 250ms or 1m30s, "
                         "got '1w'"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_http_modules(tmp_path: Path, case: str) -> None:
    body, expected = HOSTILE[case]
    errors = _errors(tmp_path, f"modules:\n  m:\n    prober: http\n    {body}\n")
    assert expected.format(dir=tmp_path) in errors, errors


OTHER_HOSTILE = {
    "dns_over_tls_udp": ("dns", "{query_name: a.test, dns_over_tls: true}",
                         'module "m": dns.dns_over_tls: needs transport_protocol: tcp (blackbox_exporter fails every '
                         "probe of this module)"),
    "dns_over_tls_not_bool": ("dns", "{query_name: a.test, transport_protocol: tcp, dns_over_tls: 2}",
                              'module "m": dns.dns_over_tls: must be true or false'),
    "dns_tls_config_without_dot": ("dns", "{query_name: a.test, dns_over_tls: false, tls_config: {ca_file: x}}",
                                   'module "m": dns.tls_config: only used with dns_over_tls: true (transport: tls)'),
    "dns_tls_config_inline": ("dns", "{query_name: a.test, transport_protocol: tcp, dns_over_tls: true, "
                                     "tls_config: {ca: x}}",
                              'module "m": dns.tls_config: ca: not PEM certificates'),  # inline PEM: checked
    "dns_source_ip": ("dns", "{query_name: a.test, source_ip_address: 10.0.0.300}",
                      "module \"m\": dns.source_ip_address: '10.0.0.300' is not an IP address"),
    "dns_native_tls_config_udp": ("dns", "{query_name: a.test, transport: udp, tls_config: {server_name: a.test}}",
                                  'module "m": dns.tls_config: only used with dns_over_tls: true (transport: tls)'),
    "dns_class": ("dns", "{query_name: a.test, query_class: CH}",
                  "module \"m\": dns.query_class: only IN is supported, got 'CH'"),
    "dns_transport": ("dns", "{query_name: a.test, transport_protocol: quic}",
                      "module \"m\": dns.transport_protocol: must be udp or tcp, got 'quic'"),
    "dns_bad_rr_regexp": ("dns", "{query_name: a.test, validate_answer_rrs: {fail_if_matches_regexp: ['(']}}",
                          "module \"m\": dns.validate_answer_rrs.fail_if_matches_regexp: invalid regular "
                          "expression '(': missing ), unterminated subpattern at position 0"),
    "dns_rr_unknown": ("dns", "{query_name: a.test, validate_answer_rrs: {fail_if_maches_regexp: [a]}}",
                       'module "m": dns.validate_answer_rrs.fail_if_maches_regexp: unknown key'),
    "tcp_empty_step": ("tcp", "{query_response: [{}]}",
                       'module "m": tcp.query_response[0]: a query_response step needs send, expect or starttls'),
    "tcp_both": ("tcp", "{send: a, query_response: [{send: b}]}",
                 'module "m": tcp: query_response: give either query_response or send/expect, not both'),
    "tcp_bad_expect": ("tcp", "{query_response: [{expect: '['}]}",
                       "module \"m\": tcp.query_response[0].expect: invalid regular expression '[': unterminated "
                       "character set at position 0"),
    "grpc_skip_verify": ("grpc", "{tls: true, tls_config: {insecure_skip_verify: true}}",
                         'module "m": grpc.tls_config: insecure_skip_verify is not possible with grpc (grpcio always '
                         "verifies)"),
    "icmp_ttl": ("icmp", "{ttl: 0}", 'module "m": icmp.ttl: must be greater than or equal to 1'),
    "icmp_unknown": ("icmp", "{source_ip: 1.2.3.4}", 'module "m": icmp.source_ip: unknown key'),
}


@pytest.mark.parametrize("case", sorted(OTHER_HOSTILE))
def test_hostile_other_modules(tmp_path: Path, case: str) -> None:
    prober, body, expected = OTHER_HOSTILE[case]
    errors = _errors(tmp_path, f"modules:\n  m:\n    prober: {prober}\n    {prober}: {body}\n")
    assert expected in errors, errors


def test_blackbox_file_top_level(tmp_path: Path) -> None:
    errors = _errors(tmp_path, "modules: {}\nprobes: []\n")
    assert errors == ["config: probes: unknown key (expected modules)"]


def test_secret_file_hostile(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"a" * (70 << 10))
    (tmp_path / "two").write_text("a\nb\n")
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    os.mkfifo(tmp_path / "fifo")  # never opened for a blocking read
    for name, msg in (("big", "is larger than 65536 bytes"), ("two", "holds more than one line"),
                      ("bin", "is not UTF-8"), ("fifo", "is not a regular file")):
        errors = _errors(tmp_path, f"modules:\n  m:\n    prober: http\n    http: {{bearer_token_file: {name}}}\n")
        assert errors == [f"module \"m\": http.bearer_token_file: '{tmp_path / name}' {msg}"], errors


def test_every_refused_key_is_refused(tmp_path: Path) -> None:
    """Each key the table marks refused is refused with its own line (none silently dropped)."""
    for section, key, status, _note in KEYS:
        if status != REFUSED or section == "module":
            continue
        if section == "tls_config":
            prober, body = "http", f"http: {{tls_config: {{{key}: x}}}}"
            where = f"http.tls_config.{key}"
        elif section == "oauth2":
            prober = "http"
            body = f"http: {{oauth2: {{client_id: a, client_secret: b, token_url: 'http://h/', {key}: x}}}}"
            where = f"http.oauth2.{key}"
        else:
            prober = section
            extra = "query_name: a.test, " if section == "dns" else ""
            body, where = f"{section}: {{{extra}{key}: x}}", f"{section}.{key}"
        errors = _errors(tmp_path, f"modules:\n  m:\n    prober: {prober}\n    {body}\n")
        assert any(e.startswith(f'module "m": {where}: blackbox_exporter key not supported by connprobe')
                   for e in errors), (key, errors)


def test_parse_config_never_raises_else(tmp_path: Path) -> None:
    for text in ("modules: [1, 2]", "modules: {m: 3}", "modules: {m: {prober: http, http: [1]}}",
                 "modules: {m: {prober: http, http: {basic_auth: [1]}}}",
                 "modules: {m: {prober: http, http: {basic_auth: {username: 3}}}}",
                 "modules: {m: {prober: http, http: {bearer_token_file: {a: 1}}}}",
                 "modules: {m: {prober: http, http: {bearer_token_file: \"a\\0b\"}}}",
                 "modules: {m: {prober: dns, dns: [1]}}", "modules: {m: {prober: tcp, tcp: {tls_config: 7}}}"):
        with pytest.raises(ConfigError):
            parse_config(text, blackbox=True, base_dir=tmp_path)


def test_readme_table_is_the_code_table() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert markdown_table() in readme
    assert metrics_table() in readme


def test_check_config_main_exit_codes(bb_dir: Path, tmp_path: Path, capsys) -> None:
    class A:
        file = str(bb_dir / "blackbox.yml")
        blackbox = True

    assert check_config_main(A()) == 0
    A.file = str(_write(tmp_path, "modules: {m: {prober: http, http: {use_proxy_dns: true}}}"))
    assert check_config_main(A()) == 1
    assert "http.use_proxy_dns: blackbox_exporter key not supported" in capsys.readouterr().err


def test_http_headers_with_values_secrets_and_files(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("k-123\n")
    cfg = load_config(_write(tmp_path, """\
modules:
  m:
    prober: http
    http:
      headers: {Accept: text/plain}
      http_headers:
        X-Api-Key: {files: [key]}
        X-Trace: {values: [a, b], secrets: [c]}
"""), blackbox=True)
    h = {k: v.get_secret_value() for k, v in cfg.modules["m"].http.headers.items()}
    assert h == {"Accept": "text/plain", "X-Api-Key": "k-123", "X-Trace": "a, b, c"}
    errors = _errors(tmp_path, "modules:\n  m:\n    prober: http\n    http:\n      headers: {accept: x}\n"
                               "      http_headers: {Accept: {values: [y]}, X: {file: [z]}, Y: {files: [nothere]}}\n")
    assert errors == ['module "m": http.http_headers.Accept: also given in headers',
                      'module "m": http.http_headers.X.file: unknown key (values, secrets, files)',
                      f"module \"m\": http.http_headers.Y.files[0]: cannot read '{tmp_path / 'nothere'}': "
                      "No such file or directory"], errors


def test_check_config_recognises_a_blackbox_file_without_the_flag(bb_dir: Path) -> None:
    f = str(bb_dir / "blackbox.yml")
    plain = subprocess.run([sys.executable, "-m", "connprobe.cli", "check-config", f],
                           capture_output=True, text=True, timeout=60)
    flagged = subprocess.run([sys.executable, "-m", "connprobe.cli", "check-config", "--blackbox", f],
                             capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and plain.stdout == flagged.stdout, plain.stderr
    assert "OK (blackbox_exporter format): 13 modules" in plain.stdout and plain.stderr == ""


@pytest.mark.parametrize("text, expected", [
    ("modules:\n  m: {prober: http, http: {method: GET}}\n", True),
    ("modules:\n  m: {prober: icmp, timeout: 2s, icmp: {}}\n  t: {prober: tcp}\n", True),
    # a connprobe config: probes:, a connprobe-only module key, no prober section, other top-level keys
    ("modules:\n  m: {prober: http, http: {}}\nprobes: []\n", False),
    ("modules:\n  m: {prober: http, allowed_targets: [127.0.0.1], http: {}}\n", False),
    ("modules:\n  m: {prober: tcp}\n", False),
    ("modules:\n  m: {prober: http, http: {}}\nnode: {name: a}\n", False),
    ("modules: {}\n", False),
    ("modules: [1]\n", False),
    ("modules:\n  m: [http]\n", False),
    ("probes: [\n", False),
    ("- 1\n", False),
])
def test_blackbox_file_recognition(tmp_path: Path, text: str, expected: bool) -> None:
    from connprobe.config import is_blackbox_file

    f = tmp_path / "c.yml"
    f.write_text(text)
    assert is_blackbox_file(f) is expected
    assert is_blackbox_file(tmp_path / "missing.yml") is False


def test_blackbox_file_recognition_needs_blackbox_section_keys(tmp_path: Path) -> None:
    from connprobe.config import is_blackbox_file

    f = tmp_path / "c.yml"
    f.write_text("modules:\n  m: {prober: http, http: {client: httpx}}\n")  # connprobe's key: a connprobe config
    assert is_blackbox_file(f) is False
    f.write_text("modules:\n  m: {prober: http, http: {oauth2: {client_id: a}}}\n")  # blackbox's (refused later)
    assert is_blackbox_file(f) is True
