"""Decoding ring-buffer records: the struct layout against bpf/events.h, and records recorded on 6.18."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from bpf.decode import (
    EVENT_SIZE,
    EVENT_STRUCT,
    DecodeError,
    KernelNames,
    decode_event,
    format_addr,
    tcp_flags_str,
)
from bpf.kernel_compat import parse_format
from bpf.types import EventKind, KernelEvent
from tests.bpf.records import encode_event

DATA = Path(__file__).parent / "data"
EVENTS_H = Path(__file__).parents[2] / "bpf" / "events.h"
C_SIZES = {"u64": 8, "u32": 4, "s32": 4, "u16": 2, "u8": 1}


def _c_layout() -> list[tuple[str, int, int]]:
    """(name, offset, size) of struct cp_event's members with C alignment rules."""
    body = re.search(r"struct cp_event \{(.*?)\};", EVENTS_H.read_text(), re.S).group(1)
    out, off = [], 0
    for ctype, name, count in re.findall(r"(u64|u32|s32|u16|u8)\s+(\w+)(?:\[(\d+)\])?;", body):
        size = C_SIZES[ctype]
        off = (off + size - 1) // size * size
        total = size * int(count or 1)
        out.append((name, off, total))
        off += total
    return out


def test_python_struct_matches_events_h() -> None:
    layout = _c_layout()
    assert [n for n, _o, _s in layout][:4] == ["ts_ns", "location", "skaddr", "netns"]
    end = layout[-1][1] + layout[-1][2]
    assert (end + 7) // 8 * 8 == EVENT_SIZE == 104
    # Same offsets as Python's struct module computes for the format (no padding in either).
    py_offsets, off = [], 0
    for code in re.findall(r"\d*[A-Za-z]", EVENT_STRUCT.format.lstrip("<")):
        py_offsets.append(off)
        off += EVENT_STRUCT.__class__("<" + code).size
    assert py_offsets == [o for _n, o, _s in layout]


@pytest.fixture
def names() -> KernelNames:
    drops = parse_format((DATA / "kfree_skb.format").read_text()).symbolic("reason")
    rsts = parse_format((DATA / "tcp_send_reset.format").read_text()).symbolic("reason")
    states = parse_format((DATA / "inet_sock_set_state.format").read_text()).symbolic("newstate")
    syms = {0xFFFFFFFF82094309: "tcp_v4_rcv+0x9", 0xFFFFFFFF82181FFA: "tcp_v6_rcv+0x5ba"}
    return KernelNames(drops, rsts, {k: v.removeprefix("TCP_") for k, v in states.items()}, syms.get)


def _recorded() -> list[bytes]:
    lines = (DATA / "records_refused.hex").read_text().splitlines()
    return [bytes.fromhex(line) for line in lines if line and not line.startswith("#")]


def test_recorded_refused_connect_ipv4(names: KernelNames) -> None:
    evs = [decode_event(raw, names) for raw in _recorded()[:6]]
    assert [e.kind for e in evs] == [
        EventKind.STATE, EventKind.RESET_TX, EventKind.DROP, EventKind.RESET_RX, EventKind.STATE,
        EventKind.SOCK_ERROR,
    ]
    netns = 4026531833
    assert evs[0] == KernelEvent(
        ts_ns=515898015129, kind=EventKind.STATE, proto="tcp", saddr="127.0.0.1", sport=39599,
        daddr="127.0.0.1", dport=1, netns=netns, tcp_state="SYN_SENT", old_state="CLOSE",
        sock=0xFFFF888104625C80,
    )
    rst = evs[1]  # sent by the server side: reversed tuple, no socket
    assert (rst.saddr, rst.sport, rst.dport, rst.reason, rst.sock) == ("127.0.0.1", 1, 39599, "NO_SOCKET", None)
    assert rst.netns == netns
    drop = evs[2]
    assert drop.five_tuple == ("tcp", "127.0.0.1", 39599, "127.0.0.1", 1)
    assert (drop.reason, drop.location, drop.tcp_flags, drop.netns) == ("NO_SOCKET", "tcp_v4_rcv", "S", netns)
    assert evs[4].tcp_state == "CLOSE" and evs[4].old_state == "SYN_SENT"
    assert (evs[5].error, evs[5].reason, evs[5].netns) == (111, "ECONNREFUSED", 0)
    assert all(a.ts_ns <= b.ts_ns for a, b in itertools.pairwise(evs))


def test_recorded_refused_connect_ipv6(names: KernelNames) -> None:
    evs = [decode_event(raw, names) for raw in _recorded()[6:]]
    assert {e.saddr for e in evs} == {"::1"} and {e.daddr for e in evs} == {"::1"}
    drop = next(e for e in evs if e.kind == EventKind.DROP)
    assert drop.five_tuple == ("tcp", "::1", 42047, "::1", 1)
    assert (drop.reason, drop.location) == ("NO_SOCKET", "tcp_v6_rcv")
    assert next(e for e in evs if e.kind == EventKind.RESET_TX).sport == 1


def test_round_trip_and_unknown_numbers(names: KernelNames) -> None:
    raw = encode_event(kind=EventKind.DROP, proto=17, family=10, saddr="fd00::1", daddr="fd00::2", sport=5353,
                       dport=53, reason=999, netns=7, ts_ns=42)
    ev = decode_event(raw, names)
    assert ev.five_tuple == ("udp", "fd00::1", 5353, "fd00::2", 53)
    assert ev.reason == "reason_999" and ev.tcp_flags is None and ev.location is None
    retrans = decode_event(encode_event(kind=EventKind.RETRANSMIT, state=1, error=-16), names)
    assert (retrans.tcp_state, retrans.error) == ("ESTABLISHED", -16)
    icmp = decode_event(encode_event(kind=EventKind.ICMP_SEND, proto=17, error=(3 << 8) | 3), names)
    assert icmp.reason == "PORT_UNREACH"


def test_bad_records() -> None:
    with pytest.raises(DecodeError, match="expected 104"):
        decode_event(b"\0" * 10, KernelNames())
    raw = bytearray(encode_event(kind=EventKind.DROP))
    raw[36] = 99
    with pytest.raises(DecodeError, match="unknown event kind 99"):
        decode_event(bytes(raw), KernelNames())


def test_helpers() -> None:
    assert tcp_flags_str(0x12) == "SA" and tcp_flags_str(0x18) == "PA" and tcp_flags_str(0x04) == "R"
    assert format_addr(10, bytes.fromhex("00000000000000000000ffff0a000001")) == "10.0.0.1"  # v4-mapped
    assert format_addr(0, b"\0" * 16) == ""
    assert KernelNames().reason_name(EventKind.SOCK_ERROR, 111) == "ECONNREFUSED"
    assert KernelNames().reason_name(EventKind.STATE, 2) == "SYN_SENT"


def test_udp_send_and_recv_carry_length_or_errno(names: KernelNames) -> None:
    ok = decode_event(encode_event(kind=EventKind.UDP_RECV, proto=17, sport=5353, error=61), names)
    assert (ok.length, ok.error, ok.reason) == (61, None, None)
    refused = decode_event(encode_event(kind=EventKind.UDP_RECV, proto=17, sport=5353, error=-111), names)
    assert (refused.length, refused.error, refused.reason) == (None, 111, "ECONNREFUSED")
    assert names.reason_name(EventKind.UDP_SEND, 0) == ""


def test_sequence_fields_round_trip_and_older_records_have_none(names: KernelNames) -> None:
    raw = encode_event(kind=EventKind.RETRANSMIT, state=1, seq=4_000_000_000, seq_len=1448, snd_una=3_999_998_552,
                       segs_out=900, total_retrans=12)
    ev = decode_event(raw, names)
    assert (ev.seq, ev.seq_len, ev.snd_una, ev.segs_out, ev.total_retrans) == (
        4_000_000_000, 1448, 3_999_998_552, 900, 12)
    old = decode_event(raw[:80], names)  # the layout before the sequence fields
    assert (old.seq, old.seq_len, old.snd_una, old.segs_out, old.total_retrans) == (None,) * 5
    assert decode_event(encode_event(kind=EventKind.DROP, seq=0, seq_len=0), names).seq == 0
