"""What kernel events say, in the terms the rules reason with: drop-reason classes, SYNs, retransmits.

Reason names come from the running kernel (tracefs), so classes are sets of names; a name not listed is
treated as "other" and never decides a cause on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from correlator.join import Matched

# Every drop reason of the running kernel has a class by what it means (tests/correlator/test_reasons.py checks
# the whole list read from tracefs). Only policy, program and loss decide a cause on their own; the others
# are named in the facts. A name not listed here (a newer kernel) is "other" and never decides.

# A rule said no: a firewall, a network policy, an LSM, a cgroup program, reverse-path or IPsec policy.
POLICY_REASONS = frozenset({
    "NETFILTER_DROP", "BPF_CGROUP_EGRESS", "XFRM_POLICY", "SECURITY_HOOK", "IP_RPFILTER", "TAP_FILTER",
    "TAP_TXFILTER", "ARP_PVLAN_DISABLE", "TCP_MINTTL", "PSP_INPUT", "PSP_OUTPUT",
})
# A programmable datapath discarded it: a policy (Cilium, ...) or a loss injector — the pattern decides.
PROGRAM_REASONS = frozenset({
    "TC_INGRESS", "TC_EGRESS", "XDP", "SOCKET_FILTER", "TC_CHAIN_NOTFOUND", "TC_COOKIE_ERROR",
    "TC_RECLASSIFY_LOOP",
})
# Loss on the path: a queue or a device ran out of room or time.
LOSS_REASONS = frozenset({
    "QDISC_DROP", "QDISC_OVERLIMIT", "QDISC_CONGESTED", "CAKE_FLOOD", "FQ_BAND_LIMIT", "FQ_HORIZON_LIMIT",
    "FQ_FLOW_LIMIT", "DUALPI2_STEP_DROP", "CPU_BACKLOG", "FULL_RING", "NOMEM", "PFMEMALLOC", "NEIGH_QUEUEFULL",
    "FRAG_REASM_TIMEOUT", "DEV_READY", "RECURSION_LIMIT",
})
# The application (or the socket it reads) did not keep up: buffers, backlogs, the accept queue, the window.
APP_REASONS = frozenset({
    "SOCKET_RCVBUFF", "SOCKET_BACKLOG", "PROTO_MEM", "TCP_LISTEN_OVERFLOW", "TCP_ZEROWINDOW",
    "TCP_OFO_QUEUE_PRUNE", "TCP_OFO_DROP",
})
# No route, no neighbour, an address that is not ours or not valid here.
ROUTING_REASONS = frozenset({
    "IP_OUTNOROUTES", "IP_INNOROUTES", "IP_INADDRERRORS", "NEIGH_CREATEFAIL", "NEIGH_FAILED", "NEIGH_DEAD",
    "NEIGH_HH_FILLFAIL", "OTHERHOST", "IP_LOCAL_SOURCE", "IP_INVALID_SOURCE", "IP_LOCALNET", "IP_INVALID_DEST",
    "IPV6DISABLED", "UNICAST_IN_L2_MULTICAST", "NO_TX_TARGET", "VXLAN_VNI_NOT_FOUND", "VXLAN_ENTRY_EXISTS",
    "MAC_INVALID_SOURCE", "LOCAL_MAC", "TUNNEL_TXINFO", "IP_TUNNEL_ECN", "PKT_TOO_BIG",
    "BRIDGE_INGRESS_STP_STATE",
})
# The local stack refused the packet: a bad checksum or header, a sequence or flag check, authentication,
# a duplicate that a retransmission made (TCP_OLD_DATA).
LOCAL_REASONS = frozenset({
    "PKT_TOO_SMALL", "TCP_CSUM", "UDP_CSUM", "IP_CSUM", "IP_INHDR", "IP_NOPROTO", "TCP_AUTH_HDR",
    "TCP_MD5NOTFOUND", "TCP_MD5UNEXPECTED", "TCP_MD5FAILURE", "TCP_AONOTFOUND", "TCP_AOUNEXPECTED",
    "TCP_AOKEYNOTFOUND", "TCP_AOFAILURE", "TCP_FLAGS", "TCP_ABORT_ON_DATA", "TCP_OLD_DATA", "TCP_OVERWINDOW",
    "TCP_OFOMERGE", "TCP_RFC7323_PAWS", "TCP_RFC7323_PAWS_ACK", "TCP_RFC7323_TW_PAWS", "TCP_RFC7323_TSECR",
    "TCP_OLD_SEQUENCE", "TCP_INVALID_SEQUENCE", "TCP_INVALID_END_SEQUENCE", "TCP_INVALID_ACK_SEQUENCE",
    "TCP_RESET", "TCP_INVALID_SYN", "TCP_FASTOPEN", "TCP_OLD_ACK", "TCP_TOO_OLD_ACK", "TCP_ACK_UNSENT_DATA",
    "UNHANDLED_PROTO", "SKB_CSUM", "SKB_GSO_SEG", "SKB_UCOPY_FAULT", "DEV_HDR", "HDR_TRUNC", "ICMP_CSUM",
    "INVALID_PROTO", "DUP_FRAG", "FRAG_TOO_FAR", "IPV6_BAD_EXTHDR", "IPV6_NDISC_FRAG", "IPV6_NDISC_HOP_LIMIT",
    "IPV6_NDISC_BAD_CODE", "IPV6_NDISC_BAD_OPTIONS", "IPV6_NDISC_NS_OTHERHOST", "PACKET_SOCK_ERROR",
    "VXLAN_INVALID_HDR", "MAC_IEEE_MAC_CONTROL", "CAN_RX_INVALID_FRAME", "CANFD_RX_INVALID_FRAME",
    "CANXL_RX_INVALID_FRAME", "UNIX_SKIP_OOB",
})
# Nothing listens there.
NO_LISTENER_REASONS = frozenset({"NO_SOCKET"})
# A socket's normal life: freed on close, a purge, an unspecified free (also the enum's MAX sentinel).
NORMAL_REASONS = frozenset({"NOT_SPECIFIED", "SOCKET_CLOSE", "UNIX_DISCONNECT", "QUEUE_PURGE", "TCP_CLOSE", "MAX"})

REASON_CLASSES: dict[str, frozenset[str]] = {
    "policy": POLICY_REASONS, "program": PROGRAM_REASONS, "loss": LOSS_REASONS, "app": APP_REASONS,
    "routing": ROUTING_REASONS, "local": LOCAL_REASONS, "no_listener": NO_LISTENER_REASONS,
    "normal": NORMAL_REASONS,
}
_CLASS_OF = {name: cls for cls, names in REASON_CLASSES.items() for name in names}
# What each class means, in the words a fact uses.
CLASS_WORDS = {
    "policy": "a policy", "program": "a tc/XDP program (a policy or a loss injector)", "loss": "loss on the path",
    "app": "the application not keeping up", "routing": "a routing or neighbour failure",
    "local": "the local stack refusing it", "no_listener": "nothing listening", "normal": "a normal free",
    "other": "a reason this version does not know",
}
DECISIVE = frozenset({"policy", "program", "loss"})


def reason_class(reason: str | None) -> str:
    return _CLASS_OF.get(reason or "", "other")


def is_syn(m: Matched) -> bool:
    flags = m.event.tcp_flags or ""
    return "S" in flags and "A" not in flags


def is_synack(m: Matched) -> bool:
    flags = m.event.tcp_flags or ""
    return "S" in flags and "A" in flags


@dataclass(frozen=True)
class TcpFacts:
    """What happened to one probe's TCP flows, from the joined events."""

    drops: tuple[Matched, ...]  # drops that may decide (policy, program, loss, no-listener classes)
    syn_drops: tuple[Matched, ...]
    synack_drops: tuple[Matched, ...]  # the target's answers to our SYN, dropped on their way back
    syn_retransmits: tuple[Matched, ...]
    data_retransmits: tuple[Matched, ...]
    established: bool
    resets_sent_no_socket: tuple[Matched, ...]
    resets_received: tuple[Matched, ...]

    @classmethod
    def of(cls, matched: Iterable[Matched]) -> TcpFacts:
        tcp = [m for m in matched if m.event.proto == "tcp"]
        drops = tuple(m for m in tcp if m.event.kind == "drop"
                      and reason_class(m.event.reason) in DECISIVE | {"no_listener"})
        # err -16 (EBUSY) is a deferred retransmit that was not sent; other errors (EPERM from a local
        # firewall) still mean the stack tried again.
        rtx = [m for m in tcp if m.event.kind == "retransmit" and m.event.error != -16]
        return cls(
            drops=drops,
            syn_drops=tuple(m for m in drops if is_syn(m)),
            synack_drops=tuple(m for m in drops if is_synack(m) and not m.outbound),
            syn_retransmits=tuple(m for m in rtx if m.event.tcp_state == "SYN_SENT"),
            data_retransmits=tuple(m for m in rtx if m.event.tcp_state != "SYN_SENT"),
            established=any(m.event.kind == "state" and m.event.tcp_state == "ESTABLISHED" and m.local_ns
                            for m in tcp),
            resets_sent_no_socket=tuple(
                m for m in tcp
                if (m.event.kind == "reset_tx" and m.event.reason == "NO_SOCKET")
                or (m.event.kind == "drop" and m.event.reason == "NO_SOCKET")
            ),
            resets_received=tuple(m for m in tcp if m.event.kind == "reset_rx"),
        )

    def decisive_drops(self) -> tuple[Matched, ...]:
        return tuple(m for m in self.drops if reason_class(m.event.reason) in DECISIVE)


def where(m: Matched) -> str:
    """Where an event was seen, relative to the probe."""
    return "in the probe's own namespace" if m.local_ns else f"in netns {m.event.netns}"
