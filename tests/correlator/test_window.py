"""When a probe's evidence window is complete: every TCP flow seen closed by the kernel (its own socket, and
the other end's when that end showed events on this node) — then no late event can come."""

from __future__ import annotations

from builders import SERVER_NS, TCP_FLOW, established, ev, result

from bpf.types import EventKind
from correlator.join import window_complete


def close(at: float, reverse: bool = False):
    return ev(at, EventKind.STATE, reverse=reverse, netns=SERVER_NS if reverse else ev(0, EventKind.STATE).netns,
              tcp_state="CLOSE", old_state="FIN_WAIT2")


def test_our_socket_closed_and_no_peer_on_this_node_is_complete():
    assert window_complete(result(), [established(1.5), close(7)])


def test_not_closed_yet_is_not_complete():
    assert not window_complete(result(), [established(1.5)])
    assert not window_complete(result(), [])


def test_a_peer_on_this_node_must_be_closed_too():
    peer_seen = [established(1.5), ev(2, EventKind.STATE, reverse=True, netns=SERVER_NS, tcp_state="ESTABLISHED"),
                 close(7)]
    assert not window_complete(result(), peer_seen)  # the server may still retransmit: its timer is pending
    assert window_complete(result(), [*peer_seen, close(7.2, reverse=True)])


def test_a_probe_without_tcp_flows_waits_the_grace_period():
    assert not window_complete(result(flows=()), [])


def test_another_connection_closing_does_not_complete_ours():
    other = ev(7, EventKind.STATE, tcp_state="CLOSE")
    other = other.__class__(**{**{f: getattr(other, f) for f in other.__slots__}, "sport": TCP_FLOW.local_port + 1})
    assert not window_complete(result(), [established(1.5), other])
