"""check-config for the icmp, grpc, websocket and unix modules: blackbox's keys load; each bad value is one line
naming the field (fixtures in bad_kinds/, one per rule, with the exact text)."""

from __future__ import annotations

from pathlib import Path

import pytest

from connprobe.cli import main
from connprobe.config import ConfigError, load_config

HERE = Path(__file__).parent

EXPECTED = {
    "grpc_insecure_skip_verify": 'module "health": grpc.tls_config: insecure_skip_verify is not possible with '
    "grpc (grpcio always verifies)",
    "grpc_target_without_port": "probe \"api\": target: grpc target must be host:port (IPv6 as [addr]:port), "
    "got 'api.example.com'",
    "icmp_bad_protocol": "module \"ping\": icmp.preferred_ip_protocol: must be 'ip4' or 'ip6'",
    "icmp_bad_source_ip": "module \"ping\": icmp.source_ip_address: '10.0.0.300' is not an IP address",
    "icmp_payload_too_large": 'module "ping": icmp.payload_size: must be less than or equal to 65000',
    "icmp_section_for_tcp": "module \"db\": icmp: section given but prober is 'tcp'",
    "icmp_target_with_port": "probe \"gw\": target: icmp target must be a host name or address (no port), "
    "got '10.0.0.1:80'",
    "icmp_ttl_zero": 'module "ping": icmp.ttl: must be greater than or equal to 1',
    "icmp_unknown_key": 'module "ping": icmp.dont_fragmnt: unknown key',
    "query_bad_regexp": "module \"sock\": unix.query_response[0].expect: invalid regular expression 'ok(': "
    "missing ), unterminated subpattern at position 2",
    "query_step_empty": 'module "sock": unix.query_response[0]: a query_response step needs send, expect or starttls',
    "unix_relative_target": "probe \"redis\": target: unix target must be an absolute socket path "
    "(at most 107 bytes), got 'redis.sock'",
    "websocket_http_target": "probe \"chat\": target: websocket target must be a ws:// or wss:// URL, "
    "got 'http://chat.example.com/'",
    "websocket_starttls": 'module "ws": websocket.query_response: starttls is not possible in a WebSocket '
    "conversation (use a wss:// target)",
}


def test_every_fixture_has_an_expectation():
    assert {p.stem for p in (HERE / "bad_kinds").glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("rule", sorted(EXPECTED))
def test_bad_config_message(rule, capsys):
    path = HERE / "bad_kinds" / f"{rule}.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [EXPECTED[rule]]
    assert main(["check-config", str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [EXPECTED[rule], f"{path}: 1 error"]


GOOD = """
modules:
  ping:
    prober: icmp
    timeout: 2s
    icmp: {preferred_ip_protocol: ip4, ip_protocol_fallback: false, source_ip_address: 10.0.0.2,
           payload_size: 56, dont_fragment: true, ttl: 32}
  grpc_health:
    prober: grpc
    grpc:
      service: orders
      preferred_ip_protocol: ip4
      tls: true
      tls_config: {server_name: api.example.com}
  ws_echo:
    prober: websocket
    websocket:
      headers: {Authorization: Bearer x}
      query_response: [{expect: "^hello (\\\\w+)"}, {send: "ping ${1}"}, {expect: "^pong"}]
  unix_smtp:
    prober: unix
    unix:
      query_response: [{expect: "^220"}, {send: STARTTLS}, {expect: "^220"}, {starttls: true}]
      tls_config: {server_name: mail.example.com}
probes:
  - {name: gw, module: ping, target: 10.0.0.1}
  - {name: gw6, module: ping, target: "[fd00::1]"}
  - {name: api, module: grpc_health, target: "api.example.com:443"}
  - {name: chat, module: ws_echo, target: "wss://chat.example.com/socket"}
  - {name: mail, module: unix_smtp, target: /run/mail.sock}
"""


def test_good_config_loads(tmp_path, capsys):
    path = tmp_path / "kinds.yaml"
    path.write_text(GOOD)
    cfg = load_config(path)
    icmp = cfg.modules["ping"].icmp
    assert (icmp.ttl, icmp.dont_fragment, icmp.payload_size, icmp.preferred_ip_protocol) == (32, True, 56, "ip4")
    assert cfg.modules["grpc_health"].grpc.service == "orders"
    assert [s.send for s in cfg.modules["ws_echo"].websocket.query_response] == [None, "ping ${1}", None]
    assert cfg.modules["unix_smtp"].unix.query_response[3].starttls
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "4 modules, 5 probes (1 grpc, 2 icmp, 1 unix, 1 websocket)" in out
    assert "gw: icmp 10.0.0.1 from host" in out and "Bearer x" not in out
