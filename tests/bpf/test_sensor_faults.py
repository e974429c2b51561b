"""Each fault of the fault matrix leaves its kernel signature on the watched flow, with the exact tuple and
network-namespace inode, in IPv4 and IPv6; an unwatched flow under the same fault sends nothing to user
space but moves the counters. Real tracepoints on the running kernel, traffic only inside the lab."""

from __future__ import annotations

import errno
import time

import pytest

from bpf.types import EventKind
from tests.bpf.sensorlab import client_request, events_of, http_get, kinds, lab_netns

pytestmark = pytest.mark.kernel

FAMILIES = [4, 6]


def srv_addr(lab, family: int, role: str = "srv1") -> str:
    s = lab.server(role)
    return s.addr4 if family == 4 else s.addr6


def client_addr(family: int) -> str:
    return "10.77.1.2" if family == 4 else "fd77:1::2"


@pytest.mark.parametrize("family", FAMILIES)
def test_syn_dropped_by_nftables_in_server_ns(lab, sensor, family):
    srv = srv_addr(lab, family)
    port = lab.server("srv1").port
    with lab.policy_drop("srv1", direction="in", proto="tcp", port=port):
        run = client_request(lab, sensor, srv, port, timeout=2.5)
    try:
        evs = events_of(sensor, run.local_port, lab)
    finally:
        sensor.unwatch("tcp", run.local_port)
    assert run.error == errno.ETIMEDOUT
    client = (client_addr(family), run.local_port, srv, port)
    drops = [e for e in evs if e.kind == EventKind.DROP]
    assert drops, f"no drop event: {evs}"
    for d in drops:  # the SYN and each of its retransmissions, dropped in the server's namespace
        assert d.reason == "NETFILTER_DROP"
        assert d.netns == lab.ns("srv1").inode
        assert (d.proto, d.saddr, d.sport, d.daddr, d.dport) == ("tcp", *client)
        assert d.tcp_flags == "S"
        assert d.location  # symbolised through /proc/kallsyms
    retrans = [e for e in evs if e.kind == EventKind.RETRANSMIT]
    assert len(retrans) >= 1
    for r in retrans:
        assert (r.tcp_state, r.netns) == ("SYN_SENT", lab.ns("client").inode)
        assert (r.saddr, r.sport, r.daddr, r.dport) == client
    assert len(drops) == len(retrans) + 1  # a policy drops every copy of the SYN
    assert not [e for e in evs if e.kind == EventKind.STATE and e.tcp_state == "ESTABLISHED"], evs


@pytest.mark.parametrize("family", FAMILIES)
def test_random_loss_shows_established_retransmits_and_tc_drops(lab, sensor, family):
    srv = srv_addr(lab, family)
    port = lab.server("srv1").port
    evs, runs = [], []
    with lab.packet_loss(0.1, link="client", direction="both"):
        for _ in range(6):  # random: a few transfers until both signs showed (nearly always the first)
            run = client_request(lab, sensor, srv, port, request=http_get("/bytes/1000000"), timeout=5)
            runs.append(run)
            try:
                evs += events_of(sensor, run.local_port, lab)
            finally:
                sensor.unwatch("tcp", run.local_port)
            if any(e.kind == EventKind.RETRANSMIT and e.tcp_state == "ESTABLISHED" for e in evs) and any(
                    e.kind == EventKind.DROP and e.reason.startswith("TC_") for e in evs):
                break
    assert all(r.error == 0 and r.received > 1_000_000 for r in runs)  # loss slows, the transfer completes
    ports = {r.local_port for r in runs}
    established = [e for e in evs if e.kind == EventKind.RETRANSMIT and e.tcp_state == "ESTABLISHED"]
    assert established, f"no ESTABLISHED retransmit in {len(evs)} events"
    for r in established:
        if r.netns == lab.ns("srv1").inode:  # the server resends data: the reversed tuple
            assert (r.saddr, r.sport, r.daddr) == (srv, port, client_addr(family)) and r.dport in ports
        else:
            assert r.netns == lab.ns("client").inode and r.sport in ports
    drops = [e for e in evs if e.kind == EventKind.DROP]
    lost = [d for d in drops if d.reason in ("TC_EGRESS", "TC_INGRESS")]
    assert lost, f"no TC_* drop among {[d.reason for d in drops]}"
    assert {d.netns for d in lost} == {lab.ns("router").inode}  # lost on the router's link
    # Anything else dropped is a duplicate a retransmission created (TCP_OLD_DATA, TCP_OLD_SEQUENCE, ...)
    assert all(d.reason.startswith("TCP_") for d in drops if d not in lost)
    assert not kinds(evs) & {EventKind.RESET_TX, EventKind.RESET_RX}


@pytest.mark.parametrize("family", FAMILIES)
def test_no_listener_gives_reset_no_socket(lab, sensor, family):
    srv = srv_addr(lab, family)
    port = lab.server("srv1").port
    with lab.no_listener("srv1"):
        run = client_request(lab, sensor, srv, port)
    try:
        evs = events_of(sensor, run.local_port, lab)
    finally:
        sensor.unwatch("tcp", run.local_port)
    assert run.error == errno.ECONNREFUSED
    caddr = client_addr(family)
    (rst,) = [e for e in evs if e.kind == EventKind.RESET_TX]
    assert (rst.reason, rst.netns, rst.sock) == ("NO_SOCKET", lab.ns("srv1").inode, None)
    assert (rst.saddr, rst.sport, rst.daddr, rst.dport) == (srv, port, caddr, run.local_port)
    (drop,) = [e for e in evs if e.kind == EventKind.DROP]
    assert (drop.reason, drop.netns, drop.tcp_flags) == ("NO_SOCKET", lab.ns("srv1").inode, "S")
    assert (drop.saddr, drop.sport, drop.daddr, drop.dport) == (caddr, run.local_port, srv, port)
    (rx,) = [e for e in evs if e.kind == EventKind.RESET_RX]
    assert rx.netns == lab.ns("client").inode and (rx.sport, rx.dport) == (run.local_port, port)
    assert EventKind.RETRANSMIT not in kinds(evs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("delay", [0.0, 0.4])
def test_healthy_and_slow_upstream_show_no_fault_signature(lab, sensor, family, delay):
    srv = srv_addr(lab, family)
    port = lab.server("srv1").port
    before = sensor.counters()
    with lab.slow_upstream("srv1", delay):
        t0 = time.monotonic()
        run = client_request(lab, sensor, srv, port, request=http_get("/ok"))
        took = time.monotonic() - t0
    try:
        evs = events_of(sensor, run.local_port, lab)
    finally:
        sensor.unwatch("tcp", run.local_port)
    assert run.error == 0 and run.received > 0 and took >= delay
    assert kinds(evs) == {EventKind.STATE}, evs
    # The noise a normal close makes on the watched flow (QUEUE_PURGE, ...) was counted, never sent.
    quiet = sum(sensor.counters().total(EventKind.DROP, r, watched=True) - before.total(EventKind.DROP, r, watched=True)
                for r in ("QUEUE_PURGE", "NOT_SPECIFIED", "SOCKET_CLOSE"))
    assert quiet >= 1
    states = [(e.netns, e.tcp_state) for e in evs]
    assert (lab.ns("client").inode, "ESTABLISHED") in states
    assert (lab.ns("srv1").inode, "ESTABLISHED") in states  # the server's side of the same flow


@pytest.mark.parametrize("family", FAMILIES)
def test_unwatched_flow_sends_nothing_but_counters_move(lab, sensor, family):
    srv = srv_addr(lab, family)
    port = lab.server("srv1").port
    before = sensor.counters()
    with lab.policy_drop("srv1", direction="in", proto="tcp", port=port):
        run = client_request(lab, sensor, srv, port, timeout=2.5, watch=False)
    with lab.no_listener("srv1"):
        run2 = client_request(lab, sensor, srv, port, watch=False)
    time.sleep(0.3)
    all_events = sensor.drain()
    after = sensor.counters()
    assert (run.error, run2.error) == (errno.ETIMEDOUT, errno.ECONNREFUSED)
    mine = {run.local_port, run2.local_port}
    assert not [e for e in all_events if mine & {e.sport, e.dport} and e.netns in lab_netns(lab)]
    grew = {
        key: after.events.get(key, 0) - before.events.get(key, 0)
        for key in ((EventKind.DROP, "NETFILTER_DROP"), (EventKind.RETRANSMIT, "SYN_SENT"),
                    (EventKind.RESET_TX, "NO_SOCKET"), (EventKind.DROP, "NO_SOCKET"))
    }
    assert all(n >= 1 for n in grew.values()), grew
    assert after.total(EventKind.DROP, "NETFILTER_DROP", watched=True) == \
        before.total(EventKind.DROP, "NETFILTER_DROP", watched=True)

    # Random loss on the path, unwatched: TC drops and retransmits are counted, nothing is sent.
    before = sensor.counters()
    ports = set()
    with lab.packet_loss(0.1, link="client", direction="both"):
        for _ in range(4):
            run = client_request(lab, sensor, srv, port, request=http_get("/bytes/500000"), timeout=5, watch=False)
            assert run.error == 0 and run.received > 500_000
            ports.add(run.local_port)
            now = sensor.counters()
            tc = sum(now.total(EventKind.DROP, r) - before.total(EventKind.DROP, r)
                     for r in ("TC_EGRESS", "TC_INGRESS"))
            retrans = now.total(EventKind.RETRANSMIT) - before.total(EventKind.RETRANSMIT)
            if tc and retrans:
                break
    assert tc >= 1 and retrans >= 1, (tc, retrans)
    time.sleep(0.3)
    assert not [e for e in sensor.drain() if ports & {e.sport, e.dport} and e.netns in lab_netns(lab)]


@pytest.mark.parametrize("family", FAMILIES)
def test_flow_to_a_dnat_vip_is_caught_after_the_rewrite(lab, sensor, family):
    """The lab's Service VIP is DNAT'ed to srv1:8080 in the client namespace: the drop in the server
    namespace carries the real destination and is still matched through the client's watched port, while
    the client's own socket events keep the VIP."""
    vip = lab.vip4 if family == 4 else lab.vip6
    port = lab.server("srv1").port
    with lab.policy_drop("srv1", direction="in", proto="tcp", port=port):
        run = client_request(lab, sensor, vip, lab.vip_port, timeout=2.5)
    try:
        evs = events_of(sensor, run.local_port, lab)
    finally:
        sensor.unwatch("tcp", run.local_port)
    assert run.error == errno.ETIMEDOUT
    drops = [e for e in evs if e.kind == EventKind.DROP]
    assert drops and {(d.netns, d.reason) for d in drops} == {(lab.ns("srv1").inode, "NETFILTER_DROP")}
    assert {(d.saddr, d.sport, d.daddr, d.dport) for d in drops} == {
        (client_addr(family), run.local_port, srv_addr(lab, family), port)}
    retrans = [e for e in evs if e.kind == EventKind.RETRANSMIT]
    assert retrans and {(r.daddr, r.dport) for r in retrans} == {(vip, lab.vip_port)}


# An IPv6 Destination Options header holding one PadN option (RFC 8200 4.6): 8 bytes, the kernel fills in
# the next-header byte. Sent as a sticky socket option, it sits between the IPv6 and the UDP header.
DSTOPTS_PADN = bytes([0, 0, 1, 4, 0, 0, 0, 0])


def dns_query(lab, sensor, server: str, timeout: float = 1.0, dstopts: bytes = b"") -> tuple[int, int, int, bytes]:
    """One DNS query from a connected UDP socket in the client ns, its local port watched before sending.
    Returns (local port, query length, errno, answer)."""
    import socket

    import dns.message

    wire = dns.message.make_query(f"srv1.{lab.zone}", "A").to_wire()
    family = socket.AF_INET6 if ":" in server else socket.AF_INET

    def run():
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            lport = s.getsockname()[1]
            sensor.watch("udp", lport)
            if dstopts:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, dstopts)
            s.connect((server, 53))
            s.send(wire)
            s.settimeout(timeout)
            try:
                return lport, len(wire), 0, s.recv(4096)
            except TimeoutError:
                return lport, len(wire), errno.ETIMEDOUT, b""

    return lab.executor("client").call(run)


def dropped_dns_query(lab, sensor, server: str, client: str, dstopts: bytes = b"") -> list:
    """A query that the DNS namespace's nftables drops: it times out, and the sensor reports exactly one
    drop, with its full tuple, the netfilter reason and the DNS namespace. Returns the flow's events."""
    with lab.policy_drop("dns", direction="in", proto="udp", port=53):
        lport, _qlen, err, _answer = dns_query(lab, sensor, server, timeout=0.5, dstopts=dstopts)
    try:
        evs = events_of(sensor, lport, lab)
    finally:
        sensor.unwatch("udp", lport)
    assert err == errno.ETIMEDOUT
    (drop,) = [e for e in evs if e.kind == EventKind.DROP]
    assert drop.five_tuple == ("udp", client, lport, server, 53)
    assert (drop.reason, drop.netns) == ("NETFILTER_DROP", lab.ns("dns").inode)
    return evs


@pytest.mark.parametrize("family", FAMILIES)
def test_dns_query_and_its_answer_and_a_dropped_query(lab, sensor, family):
    server = lab.dns_addr4 if family == 4 else lab.dns_addr6
    lport, qlen, err, answer = dns_query(lab, sensor, server)
    try:
        evs = events_of(sensor, lport, lab)
    finally:
        sensor.unwatch("udp", lport)
    assert err == 0 and answer
    (sent,) = [e for e in evs if e.kind == EventKind.UDP_SEND]
    (got,) = [e for e in evs if e.kind == EventKind.UDP_RECV]
    for e in (sent, got):
        assert (e.proto, e.saddr, e.sport, e.daddr, e.dport) == ("udp", client_addr(family), lport, server, 53)
        assert e.netns == lab.ns("client").inode
    assert sent.length == qlen and got.length == len(answer) and got.ts_ns > sent.ts_ns

    evs = dropped_dns_query(lab, sensor, server, client_addr(family))
    assert EventKind.UDP_SEND in kinds(evs) and EventKind.UDP_RECV not in kinds(evs)


def test_a_dropped_ipv6_packet_with_an_extension_header_keeps_its_ports(lab, sensor):
    """The drop parser steps over IPv6 extension headers to the UDP header (here Destination Options)."""
    server = lab.dns_addr6
    lport, _qlen, err, answer = dns_query(lab, sensor, server, dstopts=DSTOPTS_PADN)
    sensor.unwatch("udp", lport)
    assert err == 0 and answer  # the server answers a query that carries the option

    dropped_dns_query(lab, sensor, server, client_addr(6), dstopts=DSTOPTS_PADN)


@pytest.mark.parametrize("family", FAMILIES)
def test_egress_dropped_by_nftables_in_client_ns(lab, sensor, family):
    srv = srv_addr(lab, family)
    port = lab.server("srv1").port
    with lab.policy_drop("client", direction="out", proto="tcp", port=port):
        run = client_request(lab, sensor, srv, port, timeout=2.5)
    try:
        evs = events_of(sensor, run.local_port, lab)
    finally:
        sensor.unwatch("tcp", run.local_port)
    assert run.error == errno.ETIMEDOUT
    drops = [e for e in evs if e.kind == EventKind.DROP]
    retrans = [e for e in evs if e.kind == EventKind.RETRANSMIT]
    assert drops and len(drops) == len(retrans) + 1
    assert {(d.reason, d.netns, d.tcp_flags) for d in drops} == {("NETFILTER_DROP", lab.ns("client").inode, "S")}
    assert {d.five_tuple for d in drops} == {("tcp", client_addr(family), run.local_port, srv, port)}


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_reject_is_a_netfilter_drop_and_a_reset_the_server_never_sent(lab, sensor, family):
    """nft `reject with tcp reset`: the SYN is freed with NETFILTER_DROP in the server namespace and the
    client receives a reset, but no tcp_send_reset fires (nftables builds its own), unlike a closed port."""
    srv = srv_addr(lab, family)
    port = lab.server("srv1").port
    with lab.policy_drop("srv1", direction="in", proto="tcp", port=port, action="reject"):
        run = client_request(lab, sensor, srv, port)
    try:
        evs = events_of(sensor, run.local_port, lab)
    finally:
        sensor.unwatch("tcp", run.local_port)
    assert run.error == errno.ECONNREFUSED
    (drop,) = [e for e in evs if e.kind == EventKind.DROP]
    assert (drop.reason, drop.netns) == ("NETFILTER_DROP", lab.ns("srv1").inode)
    (rx,) = [e for e in evs if e.kind == EventKind.RESET_RX]
    assert rx.netns == lab.ns("client").inode
    assert EventKind.RESET_TX not in kinds(evs)
    errs = [e for e in evs if e.kind == EventKind.SOCK_ERROR]
    assert errs and errs[0].reason == "ECONNREFUSED" and errs[0].netns == lab.ns("client").inode
    assert (errs[0].saddr, errs[0].sport, errs[0].daddr, errs[0].dport) == (client_addr(family), run.local_port,
                                                                             srv, port)


@pytest.mark.parametrize("family", FAMILIES)
def test_dropped_segments_and_retransmissions_carry_sequence_numbers(lab, sensor, family):
    """Under random loss (wire-sized segments), every watched drop of a data segment and every
    retransmission carries its sequence range, retransmissions the sender's snd_una too, and the server's
    retransmissions resend sequence ranges that were seen dropped."""
    srv = srv_addr(lab, family)
    port = lab.server("srv1").port
    with lab.packet_loss(0.1, link="client", direction="egress"):
        run = client_request(lab, sensor, srv, port, request=http_get("/bytes/2000000"), timeout=10)
        try:
            evs = events_of(sensor, run.local_port, lab)
        finally:
            sensor.unwatch("tcp", run.local_port)
    assert run.error == 0
    data_drops = [e for e in evs if e.kind == EventKind.DROP and e.sport == port]
    rtx = [e for e in evs if e.kind == EventKind.RETRANSMIT and e.netns == lab.ns("srv1").inode]
    assert data_drops and rtx, evs
    for d in data_drops:
        assert d.seq is not None and d.seq_len is not None
        assert d.seq_len <= 1500  # one wire-sized segment, not a GSO super-packet
    for r in rtx:
        assert r.seq is not None and r.seq_len and r.snd_una is not None
        assert r.segs_out and 1 <= r.total_retrans <= r.segs_out
        assert (r.seq - r.snd_una) % 2**32 < 2**31  # the retransmitted data is at or after snd_una
    dropped = {(d.seq, d.seq_len) for d in data_drops if d.seq_len}
    assert dropped & {(r.seq, r.seq_len) for r in rtx}, "no retransmission resent a dropped segment"
