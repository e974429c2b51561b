"""Rules that use both ends of a flow (correlator/crossnode.py), on fixtures shaped like the two-node lab's:
node A (the probe) saw its SYNs leave; node B's agent answered with what its kernel saw, placed on A's
timeline with an uncertainty."""

from __future__ import annotations

import pytest

from bpf.types import EventKind, KernelEvent, RemoteEvent, RemoteEvidence
from correlator import correlate
from correlator.crossnode import MAX_UNCERTAINTY_NS, wants_remote
from correlator.types import Cause
from prober.types import ErrorKind
from tests.correlator.builders import MS, SERVER_NS, ev, result, syn_drop, syn_retransmit

CONNECT_FAILED = {"resolve": (0, 1), "connect": (1, 3001)}
LOCAL = [syn_retransmit(1001), syn_retransmit(2001)]  # node A: the SYN resent, nothing dropped


def node_b(*events: KernelEvent, unc_ns: int = 1 * MS, watching: bool = True) -> RemoteEvidence:
    return RemoteEvidence("node-b", True, "", tuple(RemoteEvent(e, "node-b", unc_ns, "cp-x-srv1") for e in events),
                          watching, unc_ns)


def timeout_result():
    return result(ok=False, error=ErrorKind.CONNECT_TIMEOUT, phases=CONNECT_FAILED)


def test_single_node_alone_is_unknown_and_asks():
    v = correlate(timeout_result(), LOCAL)
    assert (v.cause, v.rule) == (Cause.UNKNOWN, "connect_unexplained")
    assert wants_remote(v)


def test_syn_dropped_by_policy_at_b_names_node_b_and_namespace():
    r = timeout_result()
    v = correlate(r, LOCAL, remote=[node_b(syn_drop(1.2), syn_drop(1001.2), syn_drop(2001.2))])
    assert (v.cause, v.sub_cause, v.rule) == (Cause.POLICY_DROP, "policy_drop/syn", "remote_connect")
    assert "NETFILTER_DROP at nf_hook_slow in cp-x-srv1 on node node-b" in v.facts[0]
    assert v.confidence >= 0.85
    assert v.remote and v.remote[0].node == "node-b"


def test_answer_dropped_on_b_egress():
    synack = ev(1.3, EventKind.DROP, reverse=True, netns=SERVER_NS, reason="NETFILTER_DROP", tcp_flags="SA",
                location="nf_hook_slow")
    v = correlate(timeout_result(), LOCAL, remote=[node_b(synack)])
    assert (v.cause, v.sub_cause) == (Cause.POLICY_DROP, "policy_drop/syn")
    assert "way out" in v.facts[0] and "node-b" in v.facts[0]


def test_answered_but_answer_lost_between_nodes():
    rtx = ev(1002, EventKind.SYNACK_RETRANSMIT, reverse=True, netns=SERVER_NS, tcp_state="SYN_RECV")
    v = correlate(timeout_result(), LOCAL, remote=[node_b(rtx)])
    assert v.sub_cause == "unknown/return_path" and "between the nodes" in v.facts[1]


def test_never_arrived_at_destination_node_is_the_network_in_between():
    v = correlate(timeout_result(), LOCAL, remote=[node_b()])
    assert (v.cause, v.sub_cause) == (Cause.UNKNOWN, "unknown/between_nodes")
    assert "network in between" in v.facts[1]


def test_silence_of_a_peer_that_was_not_watching_decides_nothing():
    v = correlate(timeout_result(), LOCAL, remote=[node_b(watching=False)])
    assert v.rule == "connect_unexplained"


def test_peer_unavailable_is_said_in_the_verdict():
    down = RemoteEvidence("http://127.0.0.1:9", False, "connection refused")
    v = correlate(timeout_result(), LOCAL, remote=[down])
    assert v.rule == "connect_unexplained"
    assert "remote evidence unavailable from http://127.0.0.1:9 (connection refused)" in v.facts


def test_local_evidence_wins_over_remote():
    # node A dropped the SYN itself: the local rule decides, whatever node B says
    r = timeout_result()
    v = correlate(r, [syn_drop(1, netns=4026531001), *LOCAL], remote=[node_b()])
    assert v.rule == "policy_drop_connect"


@pytest.mark.parametrize("unc_ms", [MAX_UNCERTAINTY_NS // MS + 50, 5000])
def test_a_remote_event_that_cannot_be_ordered_does_not_decide(unc_ms):
    v = correlate(timeout_result(), LOCAL, remote=[node_b(syn_drop(1.2), syn_drop(1001.2), unc_ns=unc_ms * MS)])
    assert v.rule == "connect_unexplained" and v.cause == Cause.UNKNOWN
    assert any("cannot be placed safely" in f for f in v.facts)


def test_remote_event_at_the_window_edge_is_not_placed():
    # well placed (±1 ms) but beyond the probe's window plus grace: someone else's flow on a reused port
    v = correlate(timeout_result(), LOCAL, remote=[node_b(syn_drop(3001 + 600))])
    assert v.sub_cause != "policy_drop/syn"


def test_no_listener_on_b():
    r = result(ok=False, error=ErrorKind.CONNECT_REFUSED, phases={"resolve": (0, 1), "connect": (1, 2)})
    rst = ev(1.2, EventKind.RESET_TX, reverse=True, netns=SERVER_NS, reason="NO_SOCKET")
    local = [ev(1.3, EventKind.RESET_RX)]
    assert correlate(r, local).rule == "connection_refused"
    assert wants_remote(correlate(r, local))
    v = correlate(r, local, remote=[node_b(rst)])
    assert (v.sub_cause, v.rule) == ("connection_refused/no_listener", "remote_reset")
    assert "node node-b" in v.facts[0] or "node-b" in v.facts[0]


def test_firewall_reset_at_b():
    r = result(ok=False, error=ErrorKind.CONNECT_REFUSED, phases={"resolve": (0, 1), "connect": (1, 2)})
    v = correlate(r, [ev(1.3, EventKind.RESET_RX)], remote=[node_b(syn_drop(1.2))])
    assert (v.cause, v.sub_cause) == (Cause.POLICY_DROP, "policy_drop/reject")


def test_stall_dropped_at_b():
    r = result(ok=False, error=ErrorKind.READ_TIMEOUT,
               phases={"resolve": (0, 1), "connect": (1, 2), "processing": (2, 3000)})
    local = [ev(1.5, EventKind.STATE, tcp_state="ESTABLISHED", old_state="SYN_SENT"),
             ev(300, EventKind.RETRANSMIT, tcp_state="ESTABLISHED"),
             ev(900, EventKind.RETRANSMIT, tcp_state="ESTABLISHED")]
    base = correlate(r, local, budget_ns=None)
    assert wants_remote(base)
    drops = [ev(t, EventKind.DROP, netns=SERVER_NS, reason="NETFILTER_DROP", tcp_flags="PA", location="nf_hook_slow")
             for t in (3, 300.5, 900.5)]
    v = correlate(r, local, remote=[node_b(*drops)])
    assert (v.cause, v.sub_cause, v.rule) == (Cause.POLICY_DROP, "policy_drop/established", "remote_stall")


def test_ok_verdicts_never_ask():
    assert not wants_remote(correlate(result(), []))


# -- the answer dropped on node A's ingress: local evidence decides, node B must agree -----------------------

def _answers_dropped_on_a():
    return [syn_retransmit(1001), syn_retransmit(2001)] + [
        ev(t, EventKind.DROP, reverse=True, reason="NETFILTER_DROP", tcp_flags="SA", location="nf_hook_slow")
        for t in (1.4, 1001.4, 2001.4)]


def test_answer_dropped_here_is_decided_locally_and_asks_whether_node_b_agrees():
    alone = correlate(timeout_result(), _answers_dropped_on_a())
    assert (alone.sub_cause, alone.rule) == ("policy_drop/syn", "policy_drop_connect")
    assert wants_remote(alone)
    rtx = [ev(t, EventKind.SYNACK_RETRANSMIT, reverse=True, netns=SERVER_NS, tcp_state="SYN_RECV")
           for t in (1002, 2002)]
    v = correlate(timeout_result(), _answers_dropped_on_a(), remote=[node_b(*rtx)])
    assert (v.sub_cause, v.rule, v.confidence) == (alone.sub_cause, alone.rule, alone.confidence)
    assert v.facts[0] == alone.facts[0]
    assert "node node-b agrees: our SYN arrived there and its answer left (resent 2 time(s), never acknowledged)" \
        in v.facts


def test_node_b_contradicting_lowers_confidence_but_local_evidence_wins():
    alone = correlate(timeout_result(), _answers_dropped_on_a())
    v = correlate(timeout_result(), _answers_dropped_on_a(), remote=[node_b(syn_drop(1.2))])
    assert v.sub_cause == alone.sub_cause and v.confidence < alone.confidence
    assert any(f.startswith("node node-b contradicts this: it dropped our SYN (NETFILTER_DROP") for f in v.facts)
    no_socket = ev(1.3, EventKind.RESET_TX, reverse=True, netns=SERVER_NS, reason="NO_SOCKET")
    v = correlate(timeout_result(), _answers_dropped_on_a(), remote=[node_b(no_socket)])
    assert v.sub_cause == alone.sub_cause and v.confidence < alone.confidence
    assert any("contradicts this: its stack answered our SYN with a reset (NO_SOCKET)" in f for f in v.facts), v.facts


def test_node_b_silent_neither_confirms_nor_contradicts():
    alone = correlate(timeout_result(), _answers_dropped_on_a())
    v = correlate(timeout_result(), _answers_dropped_on_a(), remote=[node_b()])
    assert (v.sub_cause, v.confidence) == (alone.sub_cause, alone.confidence)
    assert any("node node-b saw nothing unusual of this flow" in f and "neither confirms nor contradicts" in f
               for f in v.facts), v.facts


def test_node_b_unplaceable_unwatched_or_down_neither_agrees_nor_contradicts():
    alone = correlate(timeout_result(), _answers_dropped_on_a())
    rtx = ev(1002, EventKind.SYNACK_RETRANSMIT, reverse=True, netns=SERVER_NS, tcp_state="SYN_RECV")
    for remote in ([node_b(rtx, unc_ns=2 * MAX_UNCERTAINTY_NS)], [node_b(watching=False)],
                   [RemoteEvidence("http://10.0.0.12:9516", False, "no answer within 500 ms")]):
        v = correlate(timeout_result(), _answers_dropped_on_a(), remote=remote)
        assert (v.sub_cause, v.confidence) == (alone.sub_cause, alone.confidence)
        assert not any("agrees" in f or "contradicts" in f for f in v.facts), v.facts
