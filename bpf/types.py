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
