"""Decoding a ring-buffer record (`struct cp_event`, bpf/events.h) into a `KernelEvent`: a pure function.

Numbers the kernel reports (drop reasons, reset reasons, TCP states) are turned into names with tables
read from the running kernel (`read_names`, bpf/loader.py), never from a header's enum.
"""

from __future__ import annotations

import errno
import functools
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from bpf.types import EventKind, KernelEvent

# struct cp_event, bpf/events.h (little-endian, 104 bytes)
EVENT_STRUCT = struct.Struct("<QQQIIiHHHHBBBB16s16sIIIIII")
SEQ_VALID, SNDUNA_VALID, COUNTERS_VALID = 1, 2, 4  # CP_SEQ_VALID, CP_SNDUNA_VALID, CP_COUNTERS_VALID
EVENT_SIZE = EVENT_STRUCT.size
# The layout before the sequence fields (80 bytes): records saved from older sensors still decode.
_NO_SEQ = (0, 0, 0, 0, 0, 0)
EVENT_V1_STRUCT = struct.Struct("<QQQIIiHHHHBBBB16s16s")

KIND_BY_NUMBER: dict[int, EventKind] = {
    1: EventKind.RETRANSMIT,
    2: EventKind.SYNACK_RETRANSMIT,
    3: EventKind.STATE,
    4: EventKind.RESET_RX,
    5: EventKind.RESET_TX,
    6: EventKind.DROP,
    7: EventKind.ICMP_SEND,
    8: EventKind.SOCK_ERROR,
    9: EventKind.UDP_SEND,
    10: EventKind.UDP_RECV,
}
NUMBER_BY_KIND = {v: k for k, v in KIND_BY_NUMBER.items()}

AF_INET, AF_INET6 = 2, 10
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
PROTO_NUMBERS = {v: k for k, v in PROTO_NAMES.items()}

# include/net/tcp_states.h: stable numbering since 2.x. Used only when tracefs has no table.
DEFAULT_TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
    7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV",
}

# ICMP (v4) type/code names for the errors a prober cares about (RFC 792 / 1812 numbering).
ICMP_NAMES = {
    (3, 0): "NET_UNREACH", (3, 1): "HOST_UNREACH", (3, 2): "PROT_UNREACH", (3, 3): "PORT_UNREACH",
    (3, 4): "FRAG_NEEDED", (3, 9): "NET_ANO", (3, 10): "HOST_ANO", (3, 13): "PKT_FILTERED",
    (11, 0): "TTL_EXCEEDED", (11, 1): "FRAG_TIME_EXCEEDED",
}

TCP_FLAG_LETTERS = (("S", 0x02), ("F", 0x01), ("R", 0x04), ("P", 0x08), ("A", 0x10), ("U", 0x20))


@dataclass(frozen=True)
class KernelNames:
    """Number → name tables of the running kernel, plus a kernel-address symboliser."""

    drop_reasons: Mapping[int, str] = field(default_factory=dict)
    rst_reasons: Mapping[int, str] = field(default_factory=dict)
    tcp_states: Mapping[int, str] = field(default_factory=lambda: dict(DEFAULT_TCP_STATES))
    symbolize: Callable[[int], str | None] | None = None

    def reason_name(self, kind: EventKind, number: int) -> str:
        """Name of a counter's reason dimension for `kind` (drop reason, reset reason, state, ...)."""
        if kind == EventKind.DROP:
            return self.drop_reasons.get(number, f"reason_{number}")
        if kind == EventKind.RESET_TX:
            return self.rst_reasons.get(number, f"reason_{number}")
        if kind in (EventKind.RETRANSMIT, EventKind.STATE):
            return self.tcp_states.get(number, f"state_{number}")
        if kind == EventKind.ICMP_SEND:
            return icmp_name(number >> 8, number & 0xFF)
        if kind in (EventKind.SOCK_ERROR, EventKind.UDP_SEND, EventKind.UDP_RECV):
            return errno.errorcode.get(number, f"errno_{number}") if number else ""
        return ""


def icmp_name(icmp_type: int, code: int) -> str:
    return ICMP_NAMES.get((icmp_type, code), f"type{icmp_type}_code{code}")


def tcp_flags_str(flags: int) -> str:
    return "".join(letter for letter, bit in TCP_FLAG_LETTERS if flags & bit)


_flags_str = functools.lru_cache(maxsize=256)(tcp_flags_str)


_V4_MAPPED = bytes(10) + b"\xff\xff"


@functools.lru_cache(maxsize=4096)
def format_addr(family: int, raw: bytes) -> str:
    """Text form of an address; an IPv4-mapped IPv6 address is shown as the IPv4 address it maps."""
    if family == AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if family == AF_INET6:
        if raw[:12] == _V4_MAPPED:
            return socket.inet_ntop(socket.AF_INET, raw[12:16])
        return socket.inet_ntop(socket.AF_INET6, raw[:16])
    return ""


class DecodeError(ValueError):
    """A ring-buffer record that is not a `struct cp_event`."""


def decode_event(raw: bytes, names: KernelNames) -> KernelEvent:
    """One ring-buffer record → a frozen KernelEvent. Pure: no kernel access except `names.symbolize`."""
    if len(raw) >= EVENT_SIZE:
        fields = EVENT_STRUCT.unpack_from(raw)
    elif len(raw) == EVENT_V1_STRUCT.size:
        fields = EVENT_V1_STRUCT.unpack_from(raw) + _NO_SEQ
    else:
        raise DecodeError(f"record of {len(raw)} bytes, expected {EVENT_SIZE}")
    return _from_fields(*fields, names)


# A ring-buffer record as it lies in the ring: the 8-byte header (length with flags, page offset), then the
# event (bpf/ring.py unpacks runs of these in one call).
RECORD_STRUCT = struct.Struct("<II" + EVENT_STRUCT.format[1:])


def decode_records(records: list[tuple], names: KernelNames) -> list[KernelEvent]:
    """`RECORD_STRUCT`-unpacked records → events, exactly as `decode_event` decodes each record's bytes. A
    record that is not an event raises DecodeError (the caller counts it and decodes the rest one by one)."""
    return [_from_fields(*r[2:], names) for r in records]


def _from_fields(ts_ns: int, location: int, skaddr: int, netns: int, reason: int, error: int, kind_no: int,
                 family: int, sport: int, dport: int, proto: int, state: int, old_state: int, tcp_flags: int,
                 saddr: bytes, daddr: bytes, seq: int, seq_len: int, snd_una: int, seq_flags: int, segs_out: int,
                 total_retrans: int, names: KernelNames) -> KernelEvent:
    kind = KIND_BY_NUMBER.get(kind_no)
    if kind is None:
        raise DecodeError(f"unknown event kind {kind_no}")
    ev_reason: str | None = None
    ev_error: int | None = None
    ev_state: str | None = None
    ev_old: str | None = None
    ev_location: str | None = None
    flags: str | None = None
    ev_length: int | None = None
    # Branch on the kind's number: cheaper than comparing enum members, and this runs for every record.
    if kind_no == 6:  # drop
        ev_reason = names.drop_reasons.get(reason) or f"reason_{reason}"
        if location and names.symbolize is not None:
            sym = names.symbolize(location)
            ev_location = sym.split("+", 1)[0] if sym else None
    elif kind_no == 5:  # reset_tx
        ev_reason = names.rst_reasons.get(reason) or f"reason_{reason}"
        ev_state = names.tcp_states.get(state) if state else None
    elif kind_no == 7:  # icmp_send
        ev_reason = icmp_name((error >> 8) & 0xFF, error & 0xFF)
    elif kind_no == 8:  # sock_error
        ev_error = error
        ev_reason = names.reason_name(kind, error)
    elif kind_no in (1, 2):  # retransmit, synack_retransmit
        ev_state = names.tcp_states.get(state) or f"state_{state}"
        ev_error = error if kind_no == 1 else None
    elif kind_no in (9, 10):  # udp_send, udp_recv: error holds the syscall's return value
        if error >= 0:
            ev_length = error
        else:
            ev_error = -error
            ev_reason = errno.errorcode.get(-error, f"errno_{-error}")
    elif kind_no == 3:  # state
        ev_state = names.tcp_states.get(state) or f"state_{state}"
        ev_old = names.tcp_states.get(old_state) or f"state_{old_state}"
    if proto == 6 and kind_no in (6, 7):
        flags = _flags_str(tcp_flags)
    seq_ok = seq_flags & SEQ_VALID
    counters_ok = seq_flags & COUNTERS_VALID
    return KernelEvent(  # positional (fields in declaration order): keywords cost ~1 µs a record
        ts_ns, kind, PROTO_NAMES.get(proto) or str(proto), format_addr(family, saddr), sport,
        format_addr(family, daddr), dport, netns, ev_state, ev_old, ev_reason, ev_location, flags, ev_error,
        skaddr or None, ev_length, seq if seq_ok else None, seq_len if seq_ok else None,
        snd_una if seq_flags & SNDUNA_VALID else None, segs_out if counters_ok else None,
        total_retrans if counters_ok else None,
    )
