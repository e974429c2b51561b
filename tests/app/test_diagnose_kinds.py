"""`connprobe diagnose` with the new kinds: icmp:HOST through the lab with the kernel sensor (a policy drop of the
echo request is named from its kernel event), DNS over TLS likewise, a Unix socket, and their one-line usage
errors."""

from __future__ import annotations

import socket

import pytest

from tests.app.test_diagnose import diagnose


@pytest.mark.kernel
def test_icmp_policy_drop_is_named_from_the_kernel(lab):
    srv = lab.server("srv1")
    with lab.icmp_echo_drop("srv1", direction="in"):
        proc = diagnose(f"icmp:{srv.addr6}", "--from", lab.ns("client").name, "--timeout", "1s")
    assert proc.returncode == 1, proc.stderr
    assert "▲ kernel drop NETFILTER_DROP fd77:1::2:" in proc.stdout
    assert "verdict: policy_drop/echo (90%) — our echo request was dropped by NETFILTER_DROP" in proc.stdout
    proc = diagnose(f"icmp:{srv.addr4}", "--from", lab.ns("client").name)
    assert proc.returncode == 0 and "  rtt " in proc.stdout and "verdict: ok" in proc.stdout, proc.stdout


def test_unix_socket_target(tmp_path):
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        srv.listen()
        proc = diagnose(f"unix:{path}", "--no-kernel")
    assert proc.returncode == 0 and "verdict: ok" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize(("target", "message"), [
    ("icmp:10.0.0.1:80", "target: icmp target must be a host name or address (no port), got '10.0.0.1:80'"),
    ("grpc:api.example.com", "target: grpc target must be host:port (IPv6 as [addr]:port), got 'api.example.com'"),
    ("unix:relative.sock", "target: unix target must be an absolute socket path"),
])
def test_usage_errors_are_one_line(target, message):
    proc = diagnose(target, "--no-kernel")
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.kernel
def test_dns_over_tls_drop_is_named_from_the_kernel(lab, tmp_path):
    """A DoT probe's socket is announced like every other: the SYN to port 853 (the default port of a DoT
    target without one) dropped by a policy in the DNS server's namespace is seen by the kernel sensor, on that
    flow, and named."""
    cfg = tmp_path / "dot.yml"
    cfg.write_text(f"""\
modules:
  dot:
    prober: dns
    timeout: 1s
    dns: {{query_name: srv1.lab.test, transport: tls, tls_config: {{insecure_skip_verify: true}}}}
probes:
  - {{name: dot, module: dot, target: "{lab.dns_addr4}", source: "netns {lab.ns('client').name}"}}
""")
    with lab.policy_drop(ns="dns", direction="in", proto="tcp", port=853):
        proc = diagnose("--config", str(cfg), "--probe", "dot")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"→ {lab.dns_addr4}:853 in " in proc.stdout, proc.stdout
    assert "▲ kernel drop NETFILTER_DROP flags S 10.77.1.2:" in proc.stdout, proc.stdout
    assert "verdict: dns/policy_drop (90%)" in proc.stdout and "  connect " in proc.stdout, proc.stdout
