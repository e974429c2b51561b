"""The cross-node question and answer without a kernel: query parsing (hostile values → one line naming the
field), the peer map, placing a peer's events on this node's timeline (a skewed clock is measured), a hostile
peer's answer (refused with a reason, never an exception), and the config's `node:` / `peers:`."""

from __future__ import annotations

import pytest

from bpf.clock import sample_clock_offset
from bpf.types import ClockOffset, EventKind, KernelEvent
from connprobe.config import ConfigError, parse_config
from connprobe.crossnode import (
    Peer,
    QueryError,
    StaticPeers,
    _Refused,
    _WireAnswer,
    answer_document,
    local_window,
    parse_query,
    peer_authenticated,
    place,
)

Q = {"proto": "tcp", "saddr": "10.77.1.2", "sport": "40000", "daddr": "10.77.2.11", "dport": "8080",
     "from": "1000000000", "to": "2000000000", "sent": "1500000000"}


def test_query_parses_and_refuses_hostile_values_naming_the_field():
    q = parse_query(Q)
    assert (q.saddr, q.sport, q.dport, q.from_ns, q.sent_ns) == ("10.77.1.2", 40000, 8080, 10**9, 1500000000)
    for field, value in [("sport", "0"), ("sport", "x"), ("dport", "99999"), ("saddr", "a" * 10000),
                         ("daddr", "::ffff:zz"), ("from", "1" * 30), ("to", "5"), ("proto", "icmp\n"),
                         ("sent", "-5"), ("from", "--5"), ("sport", "-"), ("saddr", "fe80::1%eth0\nX"),
                         ("daddr", "fe80::1%lo"), ("saddr", "fe80::1%" + "a" * 100)]:
        with pytest.raises(QueryError) as exc:
            parse_query({**Q, field: value})
        assert str(exc.value).startswith(field) and "\n" not in str(exc.value)
    with pytest.raises(QueryError, match=r"^to: the window is longer"):
        parse_query({**Q, "to": str(10**9 + 601 * 10**9)})
    with pytest.raises(QueryError, match=r"^saddr: required"):
        parse_query({k: v for k, v in Q.items() if k != "saddr"})


def test_peer_map_most_specific_wins_and_families_stay_apart():
    a, b = Peer("http://a:1"), Peer("http://b:1")
    peers = StaticPeers([("10.0.0.0/8", a), ("10.77.2.0/24", b), ("fd77:2::/64", b)])
    assert peers.peer_for("10.77.2.11") is b and peers.peer_for("10.1.1.1") is a
    assert peers.peer_for("fd77:2::11") is b and peers.peer_for("192.168.0.1") is None
    assert peers.peer_for("not an address") is None


def test_bearer_token_is_required_and_compared():
    assert not peer_authenticated({}, b"tok", basic_ok=False, client_cert=False)
    assert not peer_authenticated({"Authorization": "Bearer tok2"}, b"tok", basic_ok=False, client_cert=False)
    assert not peer_authenticated({"Authorization": "Bearer tok"}, None, basic_ok=False, client_cert=False)
    assert peer_authenticated({"Authorization": "Bearer tok"}, b"tok", basic_ok=False, client_cert=False)
    assert peer_authenticated({}, None, basic_ok=True, client_cert=False)
    assert peer_authenticated({}, None, basic_ok=False, client_cert=True)


def _event(ts: int) -> KernelEvent:
    return KernelEvent(ts, EventKind.DROP, "tcp", "10.77.1.2", 40000, "10.77.2.11", 8080, 7, reason="NETFILTER_DROP",
                       tcp_flags="S", location="nf_hook_slow")


def test_skewed_peer_clock_is_measured_from_the_four_timestamps():
    mono_a = ClockOffset(1_000_000_000_000, 1000)  # node A: wall = mono + 1000 s
    skew = 7_000_000_000
    mono_b = ClockOffset(1_000_000_000_000 + skew + 5_000_000, 1000)  # node B: another boot, a fast clock
    # node A asks at its mono 10 s; 2 ms each way; node B holds it 1 ms
    t0 = mono_a.wall(10_000_000_000)
    t1 = t0 + skew + 2_000_000
    t2 = t1 + 1_000_000
    t3 = t0 + 5_000_000
    q = parse_query({**Q, "from": str(t0 - 10**9), "to": str(t0), "sent": str(t0)})
    # node B's event happened at node A's mono 9.5 s
    b_mono = 9_500_000_000 + mono_a.offset_ns + skew - mono_b.offset_ns
    lo, hi = local_window(q, mono_b, t1)
    assert lo <= b_mono <= hi
    doc = answer_document(q, [_event(b_mono)], node="node-b", offset=mono_b, received_ns=t1, watching=True,
                          netns_names={7: "cp-x-srv1"}, wall=lambda: t2)
    placed = place(_WireAnswer.model_validate(doc), t0, t3, mono_a, "http://b")
    (ev,) = placed.events
    assert abs(ev.event.ts_ns - 9_500_000_000) <= ev.uncertainty_ns <= 3_000_000
    assert ev.netns_name == "cp-x-srv1" and ev.node == "node-b"


@pytest.mark.parametrize("doc, why", [
    ({"node": "b", "watching": True, "clock_uncertainty_ns": 1, "received_ns": 5, "replied_ns": 4, "events": []},
     "replied_ns before received_ns"),
])
def test_hostile_answer_is_refused_with_a_reason(doc, why):
    with pytest.raises(_Refused, match=why):
        place(_WireAnswer.model_validate(doc), 0, 10, ClockOffset(0, 0), "http://b")


@pytest.mark.parametrize("bad", [
    {"node": "b\nx"}, {"events": [{"kind": "nope"}]}, {"events": [{}] * 6000}, {"clock_uncertainty_ns": -1},
    {"events": [{"wall_ns": 1, "kind": "drop", "proto": "tcp", "saddr": "x" * 300, "sport": 1, "daddr": "",
                 "dport": 1, "netns": 1}]},
])
def test_hostile_answer_fails_validation(bad):
    from pydantic import ValidationError

    base = {"node": "b", "watching": True, "clock_uncertainty_ns": 1, "received_ns": 5, "replied_ns": 6, "events": []}
    with pytest.raises(ValidationError):
        _WireAnswer.model_validate({**base, **bad})


def test_clock_offset_sampling_is_tight():
    off = sample_clock_offset()
    assert 0 < off.uncertainty_ns < 10_000_000


def test_config_node_and_peers_errors_name_the_field():
    cfg = parse_config("node: {name: node-a, watch: [tcp/8080]}\npeers:\n  - {cidr: 10.77.2.0/24, url: "
                       "'http://127.0.0.1:9602', timeout: 300ms}\n")
    assert cfg.node.name == "node-a" and cfg.peers[0].timeout == 0.3
    for text, word in [("node: {watch: [tcp/0]}", "node.watch"), ("node: {name: 'a b'}", "node.name"),
                       ("peers: [{cidr: 10.0.0.0/33, url: 'http://x:1'}]", "peers[0].cidr"),
                       ("peers: [{cidr: 10.0.0.0/8, url: 'ftp://x'}]", "peers[0].url"),
                       ("peers: [{cidr: 10.0.0.0/8, url: 'http://x:1', timeout: 1h}]", "peers[0].timeout"),
                       ("peers: [{cidr: 10.0.0.0/8, url: 'http://x:99999999'}]", "peers[0].url"),
                       ("peers: [{cidr: 10.0.0.0/8, url: 'http://[::1'}]", "peers[0].url"),
                       ("peers: {a: 1}", "peers"), ("node: [1]", "node")]:
        with pytest.raises(ConfigError) as exc:
            parse_config(text)
        assert word in str(exc.value) and len(exc.value.errors) == 1, str(exc.value)
