"""Loss or policy, on a small TCP model: a sender streams wire-sized segments while random loss takes some
(at many rates) or a policy starts dropping every packet at a random moment (on a path with a little loss
before), until the probe runs out of time; some events are missing (hooks that missed, drops beyond this
node). Every verdict at 70 % confidence or more must name the cause that generated the pattern."""

from __future__ import annotations

import random
from dataclasses import dataclass

from builders import ROUTER_NS, SERVER_NS, established, ev, result
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bpf.types import EventKind, KernelEvent
from correlator import Cause, correlate
from prober.types import ErrorKind

MSS = 1448
RTO_MS = 200.0
SEND_GAP_MS = 0.15  # one segment every 0.15 ms while the window is open
CONFIDENT = 0.7


@dataclass(frozen=True)
class Pattern:
    cause: Cause
    events: tuple[KernelEvent, ...]
    end_ms: float


def simulate(seed: int, loss: float, wall_at: float | None, end_ms: float, missing: float, reason: str,
             sender_on_node: bool) -> Pattern:
    """The answer (target → probe) of one probe: drops seen on the router, retransmissions in the target."""
    rng = random.Random(seed)
    events: list[KernelEvent] = [established(1.5)]
    t, seq, sent, retrans = 4.0, 1_000_000, 0, 0

    def lost(at: float) -> bool:
        return (wall_at is not None and at >= wall_at) or rng.random() < loss

    def drop(at: float, s: int) -> None:
        events.append(ev(at + 0.05, EventKind.DROP, reverse=True, netns=ROUTER_NS, reason=reason, tcp_flags="A",
                         seq=s % 2**32, seq_len=MSS))

    while t < end_ms:
        sent += 1
        if not lost(t):
            t += SEND_GAP_MS
            seq += MSS
            continue
        drop(t, seq)
        # Recovery of this segment: a fast retransmit when the next segment got through (duplicate acks), else
        # the retransmission timer, doubling after each copy lost too.
        nxt_ok = not lost(t + SEND_GAP_MS)
        at, wait = (t + 3.0, RTO_MS) if nxt_ok else (t + RTO_MS, 2 * RTO_MS)
        while at < end_ms:
            sent += 1
            retrans += 1
            events.append(ev(at, EventKind.RETRANSMIT, reverse=True, netns=SERVER_NS, tcp_state="ESTABLISHED",
                             seq=seq % 2**32, seq_len=MSS, snd_una=seq % 2**32, segs_out=sent,
                             total_retrans=retrans))
            if not lost(at):
                break
            drop(at, seq)
            at += wait
            wait *= 2
        t = at + SEND_GAP_MS
        seq += MSS
    kept = [e for e in events if e.kind == EventKind.STATE or rng.random() >= missing]
    if not sender_on_node:
        kept = [e for e in kept if e.kind != EventKind.RETRANSMIT]
    return Pattern(Cause.POLICY_DROP if wall_at is not None else Cause.TCP_RETRANSMIT, tuple(kept), end_ms)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["loss", "wall"]), rate=st.floats(0.01, 0.25),
       bg=st.sampled_from([0.0, 0.001, 0.005, 0.01, 0.02]), wall_frac=st.floats(0.02, 0.98),
       end_ms=st.floats(1500, 4000), missing=st.sampled_from([0.0, 0.0, 0.05, 0.2, 0.4]),
       reason=st.sampled_from(["NETFILTER_DROP", "TC_EGRESS"]), on_node=st.sampled_from([True, True, False]))
def test_every_confident_verdict_names_the_generating_cause(seed, kind, rate, bg, wall_frac, end_ms, missing,
                                                            reason, on_node):
    wall_at = 4 + wall_frac * (end_ms - 4) if kind == "wall" else None
    p = simulate(seed, rate if kind == "loss" else bg, wall_at, end_ms, missing, reason, on_node)
    assume(any(e.kind in (EventKind.DROP, EventKind.RETRANSMIT) for e in p.events))
    r = result(ok=False, error=ErrorKind.READ_TIMEOUT,
               phases={"resolve": (0, 1), "connect": (1, 2), "processing": (2, 4), "transfer": (4, p.end_ms)})
    v = correlate(r, p.events)
    if v.confidence >= CONFIDENT:
        assert v.cause == p.cause, (v.cause, v.confidence, v.facts)


def test_the_model_makes_both_kinds_confidently_recognisable():
    """Not a vacuous property: with complete evidence, heavy loss that kept delivering and a wall after
    progress each get their own cause at 70 % or more."""
    r = result(ok=False, error=ErrorKind.READ_TIMEOUT,
               phases={"resolve": (0, 1), "connect": (1, 2), "processing": (2, 4), "transfer": (4, 3000)})
    confident = {Cause.TCP_RETRANSMIT: 0, Cause.POLICY_DROP: 0}
    for seed in range(40):
        for pattern in (simulate(seed, 0.15, None, 3000, 0.0, "NETFILTER_DROP", True),
                        simulate(seed, 0.001, 1200, 3000, 0.0, "NETFILTER_DROP", True)):
            v = correlate(r, pattern.events)
            if v.confidence >= CONFIDENT:
                assert v.cause == pattern.cause, (v.cause, v.facts)
                confident[pattern.cause] += 1
    assert confident[Cause.TCP_RETRANSMIT] >= 20 and confident[Cause.POLICY_DROP] >= 35, confident
