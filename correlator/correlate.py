"""From a probe result and the kernel's events to a `Verdict`: join, then the first rule that fits."""

from __future__ import annotations

from collections.abc import Iterable

from bpf.types import KernelEvent, RemoteEvidence
from correlator.crossnode import answer_drop_agreement, remote_facts, unavailable_facts
from correlator.join import GRACE_NS, EventIndex, join
from correlator.rules import RULES, Context, Finding
from correlator.types import Cause, KernelCoverage, Verdict
from prober.types import ProbeResult

LOST_EVENTS_FACTOR = 0.5
NO_KERNEL_CAP = 0.5


def correlate(
    result: ProbeResult,
    events: Iterable[KernelEvent] | EventIndex,
    *,
    budget_ns: int | None = None,
    coverage: KernelCoverage | None = None,
    grace_ns: int = GRACE_NS,
    remote: Iterable[RemoteEvidence] = (),
) -> Verdict:
    """`remote`: what peer agents answered about this probe's flows (the app asks them when `wants_remote` says
    this node's own evidence does not decide), or why they could not."""
    coverage = coverage or KernelCoverage()
    ctx = Context(result, tuple(join(result, events, grace_ns)), budget_ns, coverage, tuple(remote))
    for rule in RULES:
        finding = rule(ctx)
        if finding is not None:
            return _verdict(ctx, rule.__name__, finding)
    facts = [f"failed with {result.error or 'no error'}: {result.error_detail}".rstrip(": ")]
    if not coverage.available:
        facts.append(f"no kernel evidence ({coverage.reason or 'sensor off'})")
    elif not ctx.matched:
        facts.append("the kernel reported nothing unusual for this probe's packets")
    return _verdict(ctx, "fallback", Finding(Cause.UNKNOWN, None, 0.2, (), tuple(facts), needs_kernel=False))


def _verdict(ctx: Context, rule: str, f: Finding) -> Verdict:
    confidence = f.confidence
    facts = list(f.facts)
    if f.needs_kernel and not ctx.coverage.available:
        confidence = min(confidence, NO_KERNEL_CAP)
        facts.append(f"no kernel evidence ({ctx.coverage.reason or 'sensor off'}): this is a guess")
    if ctx.coverage.lost_events:
        confidence *= LOST_EVENTS_FACTOR
        facts.append(f"{ctx.coverage.lost_events} kernel event(s) were lost while this probe ran: "
                     "the evidence may be incomplete")
    if ctx.remote:
        facts += unavailable_facts(ctx.remote)
        facts += remote_facts(ctx).unplaced_facts()
        if rule == "policy_drop_connect":  # local evidence decided; does the destination's node agree?
            check = answer_drop_agreement(ctx)
            if check is not None:
                facts.append(check[0])
                confidence *= check[1]
    evidence = tuple(sorted({m.event for m in f.evidence}, key=lambda e: e.ts_ns))
    return Verdict(
        result=ctx.result,
        cause=f.cause,
        sub_cause=f.sub_cause,
        confidence=round(confidence, 2),
        rule=rule,
        evidence=evidence,
        facts=tuple(facts),
        summary=summary(ctx.result, f.cause, f.sub_cause, confidence, facts),
        remote=ctx.remote,
    )


def summary(result: ProbeResult, cause: Cause, sub: str | None, confidence: float, facts: list[str]) -> str:
    label = sub or str(cause)
    if cause == Cause.OK:
        return f"{result.name}: ok — {facts[0]}"
    lead = facts[0] if facts else ""
    return f"{result.name}: {label} ({confidence:.0%}) — {lead}"
