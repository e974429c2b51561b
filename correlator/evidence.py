"""What kernel events say, in the terms the rules reason with: drop-reason classes, SYNs, retransmits.

Reason names come from the running kernel (tracefs), so classes are sets of names; a name not listed is
treated as "other" and never decides a cause on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from correlator.join import Matched

# A rule said no: a firewall, a network policy, an LSM or a cgroup program discarded the packet.
POLICY_REASONS = frozenset({"NETFILTER_DROP", "BPF_CGROUP_EGRESS", "XFRM_POLICY", "SECURITY_HOOK"})
# A programmable datapath discarded it: a policy (Cilium, ...) or a loss injector — the pattern decides.
PROGRAM_REASONS = frozenset({"TC_INGRESS", "TC_EGRESS", "XDP", "SOCKET_FILTER", "TC_CHAIN_NOTFOUND"})
# The network ran out of room or time: loss, not intent.
LOSS_REASONS = frozenset({
    "QDISC_DROP", "QDISC_OVERLIMIT", "QDISC_CONGESTED", "CPU_BACKLOG", "FULL_RING", "SOCKET_RCVBUFF",
    "SOCKET_BACKLOG", "PROTO_MEM", "NOMEM", "NEIGH_QUEUEFULL", "NEIGH_FAILED", "TCP_OFO_DROP",
    "TCP_OFO_QUEUE_PRUNE", "CAKE_FLOOD", "FQ_BAND_LIMIT", "FQ_HORIZON_LIMIT", "FQ_FLOW_LIMIT",
    "DUALPI2_STEP_DROP", "TCP_LISTEN_OVERFLOW",
})
# Nothing listens there.
NO_LISTENER_REASONS = frozenset({"NO_SOCKET"})


def reason_class(reason: str | None) -> str:
    if reason in POLICY_REASONS:
        return "policy"
    if reason in PROGRAM_REASONS:
        return "program"
    if reason in LOSS_REASONS:
        return "loss"
    if reason in NO_LISTENER_REASONS:
        return "no_listener"
    return "other"


def is_syn(m: Matched) -> bool:
    flags = m.event.tcp_flags or ""
    return "S" in flags and "A" not in flags


@dataclass(frozen=True)
class TcpFacts:
    """What happened to one probe's TCP flows, from the joined events."""

    drops: tuple[Matched, ...]  # drops that may decide (policy, program, loss, no-listener classes)
    syn_drops: tuple[Matched, ...]
    syn_retransmits: tuple[Matched, ...]
    data_retransmits: tuple[Matched, ...]
    established: bool
    resets_sent_no_socket: tuple[Matched, ...]
    resets_received: tuple[Matched, ...]

    @classmethod
    def of(cls, matched: Iterable[Matched]) -> TcpFacts:
        tcp = [m for m in matched if m.event.proto == "tcp"]
        drops = tuple(m for m in tcp if m.event.kind == "drop" and reason_class(m.event.reason) != "other")
        # err -16 (EBUSY) is a deferred retransmit that was not sent; other errors (EPERM from a local
        # firewall) still mean the stack tried again.
        rtx = [m for m in tcp if m.event.kind == "retransmit" and m.event.error != -16]
        return cls(
            drops=drops,
            syn_drops=tuple(m for m in drops if is_syn(m)),
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
        return tuple(m for m in self.drops if reason_class(m.event.reason) in ("policy", "program", "loss"))


def where(m: Matched) -> str:
    """Where an event was seen, relative to the probe."""
    return "in the probe's own namespace" if m.local_ns else f"in netns {m.event.netns}"


def describe(m: Matched, origin_ns: int) -> str:
    e = m.event
    rel = (e.ts_ns - origin_ns) / 1e6
    parts = [f"+{rel:.1f} ms {e.kind}"]
    if e.reason:
        parts.append(e.reason)
    if e.tcp_flags:
        parts.append(f"flags {e.tcp_flags}")
    if e.tcp_state:
        parts.append(e.tcp_state)
    parts.append(f"{e.saddr}:{e.sport} → {e.daddr}:{e.dport}")
    parts.append(where(m))
    if e.location:
        parts.append(f"at {e.location}")
    return " ".join(parts)
