"""Ring-buffer records built by hand for the decoder's tests (the layout: `bpf/events.h`, `bpf/decode.py`)."""

from __future__ import annotations

import ipaddress

from bpf.decode import AF_INET, COUNTERS_VALID, EVENT_STRUCT, NUMBER_BY_KIND, SEQ_VALID, SNDUNA_VALID
from bpf.types import EventKind


def encode_event(
    *,
    kind: EventKind,
    ts_ns: int = 0,
    proto: int = 6,
    family: int = AF_INET,
    saddr: str = "0.0.0.0",
    daddr: str = "0.0.0.0",
    sport: int = 0,
    dport: int = 0,
    netns: int = 0,
    reason: int = 0,
    error: int = 0,
    state: int = 0,
    old_state: int = 0,
    tcp_flags: int = 0,
    location: int = 0,
    skaddr: int = 0,
    seq: int | None = None,
    seq_len: int = 0,
    snd_una: int | None = None,
    segs_out: int | None = None,
    total_retrans: int = 0,
) -> bytes:
    """The inverse of decode_event: the bytes the BPF side would write for such an event."""

    def raw(addr: str) -> bytes:
        return ipaddress.ip_address(addr).packed.ljust(16, b"\0")

    return EVENT_STRUCT.pack(
        ts_ns, location, skaddr, netns, reason, error, NUMBER_BY_KIND[kind], family, sport, dport, proto,
        state, old_state, tcp_flags, raw(saddr), raw(daddr), seq or 0, seq_len if seq is not None else 0,
        snd_una or 0, (SEQ_VALID if seq is not None else 0) | (SNDUNA_VALID if snd_una is not None else 0)
        | (COUNTERS_VALID if segs_out is not None else 0), segs_out or 0, total_retrans,
    )
