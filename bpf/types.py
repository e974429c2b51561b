"""Records produced by the kernel sensor: `KernelEvent` (bpf/ owns it; the correlator reads it).

bpf/ never imports prober/, so an event carries its own 5-tuple plus netns inode; the correlator
matches it against a prober `Flow` in either direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class EventKind(StrEnum):
    RETRANSMIT = "retransmit"
    SYNACK_RETRANSMIT = "synack_retransmit"
    STATE = "state"
    RESET_RX = "reset_rx"
    RESET_TX = "reset_tx"
    DROP = "drop"
    ICMP_SEND = "icmp_send"
    SOCK_ERROR = "sock_error"
    UDP_SEND = "udp_send"
    UDP_RECV = "udp_recv"


@dataclass(frozen=True, slots=True)
class KernelEvent:
    ts_ns: int  # CLOCK_MONOTONIC (bpf_ktime_get_ns)
    kind: EventKind
    proto: str  # "tcp" | "udp" | "icmp" | ...
    saddr: str
    sport: int
    daddr: str
    dport: int
    netns: int
    tcp_state: str | None = None  # e.g. "SYN_SENT"; for STATE events the new state
    old_state: str | None = None
    reason: str | None = None  # drop / reset reason by name, from the running kernel
    location: str | None = None  # kernel symbol where a packet was dropped
    tcp_flags: str | None = None  # e.g. "S", "SA", "PA" for dropped TCP packets
    error: int | None = None  # errno for SOCK_ERROR, tracepoint err for retransmits
    sock: int | None = None  # kernel socket address: links CLOSE->SYN_SENT (sport 0) to later events
    length: int | None = None  # bytes of a UDP_SEND / UDP_RECV datagram (None when it failed: see error)
    seq: int | None = None  # TCP sequence number of a dropped segment or a retransmission (None: not read)
    seq_len: int | None = None  # sequence space it covers: payload bytes, +1 for SYN and for FIN
    snd_una: int | None = None  # retransmission: the sender's oldest unacknowledged sequence number then
    segs_out: int | None = None  # retransmission: data segments its socket had sent by then
    total_retrans: int | None = None  # retransmission: segments its socket had retransmitted by then

    @property
    def five_tuple(self) -> tuple[str, str, int, str, int]:
        """(proto, saddr, sport, daddr, dport)."""
        return (self.proto, self.saddr, self.sport, self.daddr, self.dport)


@dataclass(frozen=True, slots=True)
class ClockOffset:
    """CLOCK_REALTIME minus CLOCK_MONOTONIC of one node, sampled by its agent: a kernel timestamp (`ts_ns`) plus
    `offset_ns` is wall-clock time, give or take `uncertainty_ns`."""

    offset_ns: int
    uncertainty_ns: int

    def wall(self, ts_ns: int) -> int:
        return ts_ns + self.offset_ns


@dataclass(frozen=True, slots=True)
class RemoteEvent:
    """A kernel event another node's agent saw, placed on this node's timeline: `event.ts_ns` is this node's
    CLOCK_MONOTONIC (the peer's wall-clock time converted through both nodes' clocks), right to within
    ± `uncertainty_ns`. `node` is the node that saw it; `netns_name` the namespace there, when it has a name."""

    event: KernelEvent
    node: str
    uncertainty_ns: int
    netns_name: str | None = None


@dataclass(frozen=True, slots=True)
class RemoteEvidence:
    """What one peer agent answered about a probe's flow (or why it did not). `available` False: `reason` says
    why (unreachable, too slow for the deadline, refused, an answer that made no sense). `watching` False: the
    peer answered but was not watching the flow's ports, so its silence means nothing."""

    node: str  # the peer's node name; its URL when it did not answer
    available: bool
    reason: str = ""
    events: tuple[RemoteEvent, ...] = ()
    watching: bool = True
    uncertainty_ns: int = 0  # how far its events' placement on this node's timeline may be off
