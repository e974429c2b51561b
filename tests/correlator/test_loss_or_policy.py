"""Loss or policy, on a small TCP model: a sender streams wire-sized segments while random loss takes some
(at many rates) or a policy starts dropping every packet at a random moment (on a path with a little loss
before), until the probe runs out of time; some events are missing (hooks that missed, drops beyond this
node). Every verdict at 70 % confidence or more must name the cause that generated the pattern."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from builders import MS, ROUTER_NS, SERVER_NS, T0, established, ev, result
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bpf.types import EventKind, KernelEvent
from correlator import Cause, correlate
from prober.progress import Arrivals
from prober.types import Arrival, ErrorKind

MSS = 1448
RTO_MS = 200.0
SEND_GAP_MS = 0.15  # one segment every 0.15 ms while the window is open
CONFIDENT = 0.7


@dataclass(frozen=True)
class Pattern:
    cause: Cause
    events: tuple[KernelEvent, ...]
    end_ms: float
    progress: tuple[Arrival, ...] = ()  # what the prober got of the answer, in order, as Arrivals keeps it


def simulate(seed: int, loss: float, wall_at: float | None, end_ms: float, missing: float, reason: str,
             sender_on_node: bool) -> Pattern:
    """The answer (target → probe) of one probe: drops seen on the router, retransmissions in the target."""
    rng = random.Random(seed)
    events: list[KernelEvent] = [established(1.5)]
    t, seq, sent, retrans = 4.0, 1_000_000, 0, 0
    got = Arrivals(T0, T0 + int(end_ms * MS))

    def delivered(at: float) -> None:  # one segment got through; everything before it had (the model is serial)
        if at < end_ms:
            got.add(MSS, T0 + int((at + 0.1) * MS))

    def lost(at: float) -> bool:
        return (wall_at is not None and at >= wall_at) or rng.random() < loss

    def drop(at: float, s: int) -> None:
        events.append(ev(at + 0.05, EventKind.DROP, reverse=True, netns=ROUTER_NS, reason=reason, tcp_flags="A",
                         seq=s % 2**32, seq_len=MSS))

    while t < end_ms:
        sent += 1
        if not lost(t):
            delivered(t)
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
                delivered(at)
                break
            drop(at, seq)
            at += wait
            wait *= 2
        t = at + SEND_GAP_MS
        seq += MSS
    kept = [e for e in events if e.kind == EventKind.STATE or rng.random() >= missing]
    if not sender_on_node:
        kept = [e for e in kept if e.kind != EventKind.RETRANSMIT]
    return Pattern(Cause.POLICY_DROP if wall_at is not None else Cause.TCP_RETRANSMIT, tuple(kept), end_ms,
                   got.freeze())


@settings(max_examples=400, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(["loss", "wall"]), rate=st.floats(0.01, 0.25),
       bg=st.sampled_from([0.0, 0.001, 0.005, 0.01, 0.02]), wall_frac=st.floats(0.02, 0.98),
       end_ms=st.floats(1500, 4000), missing=st.sampled_from([0.0, 0.0, 0.05, 0.2, 0.4]),
       reason=st.sampled_from(["NETFILTER_DROP", "TC_EGRESS"]), on_node=st.sampled_from([True, True, False]),
       progress=st.sampled_from([True, False]))
def test_every_confident_verdict_names_the_generating_cause(seed, kind, rate, bg, wall_frac, end_ms, missing,
                                                            reason, on_node, progress):
    wall_at = 4 + wall_frac * (end_ms - 4) if kind == "wall" else None
    p = simulate(seed, rate if kind == "loss" else bg, wall_at, end_ms, missing, reason, on_node)
    assume(any(e.kind in (EventKind.DROP, EventKind.RETRANSMIT) for e in p.events))
    r = result(ok=False, error=ErrorKind.READ_TIMEOUT,
               phases={"resolve": (0, 1), "connect": (1, 2), "processing": (2, 4), "transfer": (4, p.end_ms)})
    if progress:  # the prober's own points (a kind that reads no answer has none)
        r = dataclasses.replace(r, progress=p.progress)
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


def test_the_probers_progress_points_turn_unsure_loss_into_a_verdict_and_never_a_wall_into_loss():
    """The prober's own points (what it got of the answer, by when) decide stalls the kernel's evidence leaves
    open: loss that kept delivering is named more often with them, and a wall never becomes loss."""
    r = result(ok=False, error=ErrorKind.READ_TIMEOUT,
               phases={"resolve": (0, 1), "connect": (1, 2), "processing": (2, 4), "transfer": (4, 3000)})
    named = {False: 0, True: 0}  # loss named tcp_retransmit (sender on this node: at 70 % or more)
    for seed in range(60):
        on_node = seed % 2 == 0
        loss = simulate(seed, 0.05 + seed % 4 * 0.05, None, 3000, 0.2, "NETFILTER_DROP", on_node)
        wall = simulate(seed, 0.005, 600 + 30 * seed, 3000, 0.2, "NETFILTER_DROP", on_node)
        assert loss.progress and wall.progress and len(loss.progress) <= 34
        for with_points in (False, True):
            v = correlate(dataclasses.replace(r, progress=loss.progress if with_points else ()), loss.events)
            if v.confidence >= CONFIDENT:
                assert v.cause == Cause.TCP_RETRANSMIT, v.facts
            if v.cause == Cause.TCP_RETRANSMIT and (v.confidence >= CONFIDENT or not on_node):
                named[with_points] += 1
            w = correlate(dataclasses.replace(r, progress=wall.progress if with_points else ()), wall.events)
            assert not (w.cause == Cause.TCP_RETRANSMIT and w.confidence >= CONFIDENT), w.facts
    assert named[True] > named[False] + 10, named


def _recording(name: str):
    from pathlib import Path

    from correlator.record import load

    return load(Path(__file__).parent / "recordings" / f"{name}.json")


def test_on_the_wall_recording_the_probers_points_confirm_it_and_late_bytes_would_undo_it():
    """The lab's wall-mid-transfer recording: its progress points end where the wall began (the verdict says
    when the last byte came); had bytes of the answer still come a second later, it would not be a wall."""
    rec = _recording("policy_mid_transfer")
    r = rec.result
    assert r.progress and r.progress[-1].bytes >= 4_000_000
    v = correlate(r, rec.events, budget_ns=rec.budget_ns, coverage=rec.coverage)
    assert v.sub_cause == "policy_drop/established"
    assert any("the prober got" in f and "after that segment went missing" in f for f in v.facts), v.facts
    late = Arrival(r.progress[-1].ts_ns + 1_000_000_000, r.progress[-1].bytes + 65536)
    assert late.ts_ns < r.end_ns
    v2 = correlate(dataclasses.replace(r, progress=(*r.progress, late)), rec.events, budget_ns=rec.budget_ns,
                   coverage=rec.coverage)
    assert v2.cause != Cause.POLICY_DROP, v2.facts


def test_on_the_heavy_loss_recordings_the_points_never_make_a_policy():
    for name in ("heavy_loss_timeout_tc", "heavy_loss_timeout_nft"):
        rec = _recording(name)
        assert rec.result.progress, name
        for progress in (rec.result.progress, ()):
            r = dataclasses.replace(rec.result, progress=progress)
            v = correlate(r, rec.events, budget_ns=rec.budget_ns, coverage=rec.coverage)
            assert v.cause == Cause.TCP_RETRANSMIT, (name, v.facts)
