"""Each fault injector proves its effect from inside the lab, with a real client or the kernel's counters."""

from __future__ import annotations

import errno
import socket
import time

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

pytestmark = pytest.mark.kernel

FAMILIES = [4, 6]


def curl(lab, url: str, *extra: str, timeout: float = 3.0) -> tuple[int, str, str]:
    """(exit code, http code, time_starttransfer) of curl run in the client namespace."""
    out = lab.exec("client", "curl", "-sS", "-o", "/dev/null", "-m", str(timeout),
                   "-w", "%{http_code} %{time_starttransfer} %{size_download}", *extra, url, check=False)
    code, ttfb, size = out.split()
    return code, float(ttfb), int(size)


def connect_errno(lab, addr: str, port: int, timeout: float = 1.5) -> int:
    """errno of a plain TCP connect from the client namespace (0 = connected)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    def attempt() -> int:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect((addr, port))
            except TimeoutError:
                return errno.ETIMEDOUT
            except OSError as exc:
                return exc.errno
            return 0

    return lab.executor("client").call(attempt)


def nstat(lab, role: str, counter: str) -> int:
    out = lab.exec(role, "nstat", "-az", counter)
    for line in out.splitlines():
        if line.startswith(counter):
            return int(line.split()[1])
    raise AssertionError(f"{counter} not in nstat output: {out}")


def addr(lab, role: str, family: int) -> str:
    s = lab.server(role)
    return s.addr4 if family == 4 else s.addr6


@pytest.mark.parametrize("family", FAMILIES)
def test_healthy_path_serves_every_endpoint(lab, family):
    s = lab.server("srv1")
    assert curl(lab, s.url("/ok", family))[0] == "200"
    assert curl(lab, s.url("/bytes/100000", family))[2] == 100000
    assert curl(lab, lab.server("srv2").url("/status/204", family))[0] == "204"
    assert connect_errno(lab, addr(lab, "srv2", family), s.port) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_tls_listener_presents_the_lab_certificate(lab, family):
    s = lab.server("srv1")
    resolve = f"{s.hostname}:{s.tls_port}:{addr(lab, 'srv1', family)}"
    code, _, _ = curl(lab, f"https://{s.hostname}:{s.tls_port}/ok", "--cacert", str(lab.ca_file), "--resolve", resolve)
    assert code == "200"
    # Without the lab's CA the handshake fails: a real TLS error for the probers to classify.
    code, _, _ = curl(lab, f"https://{s.hostname}:{s.tls_port}/ok", "--resolve", resolve)
    assert code == "000"


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_drop_in_server_namespace_times_out_connect(lab, family):
    target = addr(lab, "srv1", family)
    with lab.policy_drop("srv1", direction="in", proto="tcp", port=8080) as rule:
        assert connect_errno(lab, target, 8080, timeout=1.5) == errno.ETIMEDOUT
        assert rule.matched() >= 2  # the SYN and its retransmission, each dropped
    assert connect_errno(lab, target, 8080) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_reject_resets_the_connection(lab, family):
    target = addr(lab, "srv2", family)
    with lab.policy_drop("srv2", direction="in", port=8080, action="reject") as rule:
        t0 = time.monotonic()
        assert connect_errno(lab, target, 8080) == errno.ECONNREFUSED
        assert time.monotonic() - t0 < 0.5
        assert rule.matched() == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_drop_client_egress(lab, family):
    target = addr(lab, "srv1", family)
    with lab.policy_drop("client", direction="out", port=8080, family=f"ipv{family}"):
        assert connect_errno(lab, target, 8080, timeout=1.0) == errno.ETIMEDOUT
        # Only the chosen family is matched.
        other = addr(lab, "srv1", 6 if family == 4 else 4)
        assert connect_errno(lab, other, 8080) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_drop_on_the_router_forward_path(lab, family):
    with lab.policy_drop("router", direction="forward", port=8080):
        assert connect_errno(lab, addr(lab, "srv2", family), 8080, timeout=1.0) == errno.ETIMEDOUT


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_on_the_path_costs_retransmits_but_the_upload_completes(lab, family):
    s = lab.server("srv1")
    before = nstat(lab, "client", "TcpRetransSegs")
    payload = 8 * 1024 * 1024
    with lab.packet_loss(0.05, link="client", direction="both") as loss:
        out = lab.exec("client", "sh", "-c",
                       f"head -c {payload} /dev/zero | curl -sS -m 30 --data-binary @- {s.url('/upload', family)}")
        considered, dropped = loss.stats()
    assert int(out) == payload
    assert dropped > 0 and considered > dropped
    assert nstat(lab, "client", "TcpRetransSegs") > before


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_on_a_download_makes_the_server_retransmit(lab, family):
    s = lab.server("srv2")
    before = nstat(lab, "srv2", "TcpRetransSegs")
    with lab.packet_loss(0.05, link="srv2", direction="ingress"):
        code, _, size = curl(lab, s.url("/bytes/8000000", family), timeout=30)
    assert (code, size) == ("200", 8000000)
    assert nstat(lab, "srv2", "TcpRetransSegs") > before


def gso_max_segs(lab) -> dict[str, int]:
    import json

    return {role: json.loads(lab.exec(role, "ip", "-d", "-j", "link", "show", "dev", "eth0"))[0]["gso_max_segs"]
            for role in ("client", "srv1", "srv2", "dns")}


@pytest.mark.parametrize("injector", ["packet_loss", "random_drop"])
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_injectors_drop_wire_sized_segments_and_restore_gso(lab, family, injector):
    """While a loss fault is on, an 8 MB download crosses the link as ~MSS-sized packets (not 64 KB
    super-packets that SACK repairs in one go), so random loss costs the transfer time."""
    before = gso_max_segs(lab)
    payload = 8_000_000
    with getattr(lab, injector)(0.0, link="client", direction="egress") as f:
        assert set(gso_max_segs(lab).values()) == {1}
        code, _, size = curl(lab, lab.server("srv1").url(f"/bytes/{payload}", family), timeout=30)
        if injector == "packet_loss":
            considered, dropped = f.stats()
            assert considered >= payload / 1500 and dropped == 0  # one packet per segment, nothing lost
    assert (code, size) == ("200", payload)
    assert gso_max_segs(lab) == before


def test_a_failed_loss_fault_still_restores_gso(lab):
    from connprobe.lab import LabError

    before = gso_max_segs(lab)
    with pytest.raises(ValueError), lab.random_drop(0.1, link="client"):
        assert set(gso_max_segs(lab).values()) == {1}
        raise ValueError("the body failed")
    assert gso_max_segs(lab) == before
    fault = lab.random_drop(0.1, link="client")
    fault.table = "bad name!"  # nft refuses it: apply fails after gso was lowered
    with pytest.raises(LabError), fault:
        pass
    assert gso_max_segs(lab) == before


@pytest.mark.parametrize("direction", ["egress", "ingress", "both"])
def test_random_drop_loses_a_fraction_with_netfilter(lab, direction):
    """The nftables `numgen random` dropper: roughly its fraction of TCP packets, freed as NETFILTER_DROP
    (the reason a policy has); the transfer still completes."""
    s = lab.server("srv1")
    payload = 2_000_000
    with lab.random_drop(0.05, link="client", direction=direction) as f:
        out = lab.exec("client", "sh", "-c",
                       f"head -c {payload} /dev/zero | curl -sS -m 30 --data-binary @- {s.url('/upload', 4)}")
        dropped = f.bites()
    assert int(out) == payload
    assert dropped > 0


def test_loss_fraction_is_roughly_honoured(lab):
    with lab.packet_loss(0.3, link="client", direction="egress", proto="udp") as loss:
        sent = 400

        def blast() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                for _ in range(sent):
                    u.sendto(b"x", (lab.dns_addr4, 9))  # a port nobody answers; ICMP errors are ignored

        lab.executor("client").call(blast)
        # Requests go through the router's ingress, which has no program here: nothing lost that way.
        considered, dropped = loss.stats()
    assert considered == 0 and dropped == 0
    with lab.packet_loss(0.3, link="client", direction="ingress", proto="udp") as loss:
        lab.executor("client").call(blast)
        considered, dropped = loss.stats()
    assert considered == sent
    assert 0.2 * sent < dropped < 0.4 * sent


def dns_query(lab, name: str, qtype: str = "A", server: str | None = None, timeout: float = 2.0,
              tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, qtype)
    server = server or lab.dns_addr4
    fn = dns.query.tcp if tcp else dns.query.udp
    return lab.executor("client").call(fn, q, server, timeout=timeout)


@pytest.mark.parametrize("family", FAMILIES)
def test_dns_answers_the_lab_zone_in_both_families(lab, family):
    server = lab.dns_addr4 if family == 4 else lab.dns_addr6
    a = dns_query(lab, "srv1.lab.test", "A", server)
    aaaa = dns_query(lab, "both.lab.test", "AAAA", server)
    assert [r.address for r in a.answer[0]] == [lab.server("srv1").addr4]
    assert sorted(r.address for r in aaaa.answer[0]) == sorted([lab.server("srv1").addr6, lab.server("srv2").addr6])
    assert dns_query(lab, "nothere.lab.test", server=server).rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize("mode,rcode", [("nxdomain", dns.rcode.NXDOMAIN), ("servfail", dns.rcode.SERVFAIL),
                                        ("refused", dns.rcode.REFUSED)])
def test_dns_fault_modes_give_their_rcode(lab, mode, rcode):
    with lab.dns_fault("srv2.lab.test", mode):
        assert dns_query(lab, "srv2.lab.test").rcode() == rcode
    assert dns_query(lab, "srv2.lab.test").rcode() == dns.rcode.NOERROR


def test_dns_timeout_mode_never_answers(lab):
    with lab.dns_fault("srv2.lab.test", "timeout"), pytest.raises(dns.exception.Timeout):
        dns_query(lab, "srv2.lab.test", timeout=0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_dns_slow_mode_delays_the_answer(lab, family):
    server = lab.dns_addr4 if family == 4 else lab.dns_addr6
    with lab.dns_fault("srv1.lab.test", "slow", delay=0.3):
        t0 = time.monotonic()
        assert dns_query(lab, "srv1.lab.test", server=server).rcode() == dns.rcode.NOERROR
        assert time.monotonic() - t0 >= 0.3


def test_dns_large_answer_is_truncated_over_udp_and_complete_over_tcp(lab):
    udp = dns_query(lab, "large.lab.test")
    assert udp.flags & dns.flags.TC and not udp.answer
    tcp = dns_query(lab, "large.lab.test", tcp=True)
    assert len(tcp.answer[0]) == 60


def test_dns_policy_drop_of_queries(lab):
    with lab.policy_drop("dns", direction="in", proto="udp", port=53), pytest.raises(dns.exception.Timeout):
        dns_query(lab, "srv1.lab.test", timeout=0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_slow_upstream_delays_first_byte(lab, family):
    with lab.slow_upstream("srv1", 0.3):
        code, ttfb, _ = curl(lab, lab.server("srv1").url("/ok", family))
    assert code == "200" and ttfb >= 0.3
    code, ttfb, _ = curl(lab, lab.server("srv1").url("/ok", family))
    assert ttfb < 0.3


@pytest.mark.parametrize("family", FAMILIES)
def test_no_listener_refuses(lab, family):
    target = addr(lab, "srv2", family)
    with lab.no_listener("srv2"):
        assert connect_errno(lab, target, 8080) == errno.ECONNREFUSED
    assert connect_errno(lab, target, 8080) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_http_5xx(lab, family):
    with lab.http_status("srv1", 503):
        assert curl(lab, lab.server("srv1").url("/ok", family))[0] == "503"
    assert curl(lab, lab.server("srv1").url("/ok", family))[0] == "200"


def test_bad_fault_arguments_name_the_field(lab):
    from connprobe.lab import LabError

    with pytest.raises(LabError, match="policy_drop: direction 'sideways' must be one of in, out, forward"):
        lab.policy_drop("srv1", direction="sideways")
    with pytest.raises(LabError, match=r"packet_loss: fraction 1\.5 must be between 0 and 1"):
        lab.packet_loss(1.5)
    with pytest.raises(LabError, match=r"random_drop: link 'wan' must be client, srv1, srv2 or dns"):
        lab.random_drop(0.1, link="wan")
    with pytest.raises(LabError, match=r"lab \w+ has no namespace 'srv9'"):
        lab.policy_drop("srv9")


@pytest.mark.parametrize("family", FAMILIES)
def test_service_vip_is_dnated_to_srv1_and_a_policy_behind_it_drops(lab, family):
    vip = lab.vip4 if family == 4 else f"[{lab.vip6}]"
    code, _, _ = curl(lab, f"http://{vip}:{lab.vip_port}/ok")
    assert code == "200"
    assert curl(lab, f"http://svc.lab.test:{lab.vip_port}/ok")[0] == "200"
    with lab.policy_drop("srv1", direction="in", port=8080) as rule:
        vip_addr = lab.vip4 if family == 4 else lab.vip6
        assert connect_errno(lab, vip_addr, lab.vip_port, timeout=1.0) == errno.ETIMEDOUT
        assert rule.matched() >= 1  # the SYN reached srv1 rewritten to its real address and port
