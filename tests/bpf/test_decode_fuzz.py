"""Fuzzing the ring-record decoder: arbitrary bytes, mutations of recorded records and records built from
random field values decode to a `KernelEvent` or raise `DecodeError` (a clear one-line message), never any
other exception. Derandomized: the same examples on every run (a failure is reproducible as it is)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpf.decode import EVENT_SIZE, EVENT_STRUCT, DecodeError, KernelNames, decode_event
from bpf.kernel_compat import parse_format
from bpf.types import KernelEvent

DATA = Path(__file__).parent / "data"
FUZZ = settings(max_examples=1500, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _names() -> KernelNames:
    drops = parse_format((DATA / "kfree_skb.format").read_text()).symbolic("reason")
    rsts = parse_format((DATA / "tcp_send_reset.format").read_text()).symbolic("reason")
    syms = {0xFFFFFFFF82094309: "tcp_v4_rcv+0x9"}
    return KernelNames(drops, rsts, symbolize=syms.get)


NAMES = (KernelNames(), _names())
RECORDED = [bytes.fromhex(line) for line in (DATA / "records_refused.hex").read_text().splitlines()
            if line and not line.startswith("#")]


def _decodes_or_says_why(raw: bytes) -> None:
    for names in NAMES:
        try:
            ev = decode_event(raw, names)
        except DecodeError as exc:
            msg = str(exc)
            assert msg and "\n" not in msg
            continue
        assert isinstance(ev, KernelEvent)
        assert ev.kind is not None and isinstance(ev.saddr, str) and isinstance(ev.daddr, str)
        repr(ev)  # every field renders


@FUZZ
@given(st.binary(max_size=3 * EVENT_SIZE))
def test_arbitrary_bytes(raw: bytes) -> None:
    _decodes_or_says_why(raw)


@FUZZ
@given(st.sampled_from(RECORDED), st.lists(st.tuples(st.integers(0, EVENT_SIZE - 1), st.integers(0, 255)),
                                           max_size=12), st.integers(0, EVENT_SIZE + 16))
def test_mutated_recorded_records(base: bytes, flips: list[tuple[int, int]], length: int) -> None:
    raw = bytearray(base)  # recorded by an older sensor: may be shorter than today's EVENT_SIZE
    for at, value in flips:
        raw[at % len(raw)] = value
    raw = bytes(raw[:length]) if length <= len(raw) else bytes(raw) + bytes(length - len(raw))
    _decodes_or_says_why(raw)


U = {"Q": 2**64 - 1, "I": 2**32 - 1, "H": 2**16 - 1, "B": 2**8 - 1}


@FUZZ
@given(st.data())
def test_every_field_at_any_value(data) -> None:
    """Records whose every field takes any value of its C type (kind numbers included, known or not)."""
    values = []
    for code in "QQQIIiHHHHBBBB":
        if code == "i":
            values.append(data.draw(st.integers(-(2**31), 2**31 - 1)))
        elif code == "H" and len(values) == 6:  # kind: mostly known numbers
            values.append(data.draw(st.one_of(st.integers(0, 12), st.integers(0, U["H"]))))
        elif code == "H" and len(values) == 7:  # family: mostly the real ones
            values.append(data.draw(st.one_of(st.sampled_from([2, 10]), st.integers(0, U["H"]))))
        else:
            values.append(data.draw(st.integers(0, U[code])))
    values += [data.draw(st.binary(min_size=16, max_size=16)), data.draw(st.binary(min_size=16, max_size=16))]
    values += [data.draw(st.integers(0, U["I"])) for _ in range(6)]  # seq, seq_len, snd_una, ... (u32 each)
    _decodes_or_says_why(EVENT_STRUCT.pack(*values))
