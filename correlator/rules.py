"""The correlation rules: each a named, pure function from a `Context` to a `Finding` or None.

`RULES` is the precedence: the first rule that returns a finding decides. The order encodes what wins
when several stories fit one probe:

 1. dns_failure         the name never resolved: nothing after resolution happened, so DNS decides;
                        dropped queries make it dns/policy_drop, not plain dns/timeout.
 1b. icmp_echo         a failed ICMP echo: a kernel drop of the echo (watched by its identifier) names it
                        (policy → policy_drop/echo); else the ICMP error that came back (admin-prohibited →
                        policy_drop/reject, EPERM → policy_drop/local), else unknown.
 2. policy_reject       refused/reset, but a policy dropped our SYN and the server never sent the RST:
                        a firewall answered for the target. Beats connection_refused.
 3. connection_refused  refused, and the target's own stack said nothing listens (RST, NO_SOCKET).
 4. policy_drop_connect connect failed and our SYNs were dropped, every one of them: a policy.
                        Beats connect timeout. Loss-class drops of every SYN are tcp_retransmit; a tc/XDP
                        program's drops of fewer than PROGRAM_DROPS_FOR_POLICY attempts are unknown.
 5. policy_drop_established  the handshake passed, then from some moment on every copy of one segment (of
                        our data or of the answer) was dropped, the timer backing off, nothing newer sent —
                        and the loss rate the sender had met before makes that run of drops too unlikely to
                        be chance (see correlator/progress.py): a policy on the established flow, also when
                        it began in the middle of a transfer. Drops interleaved with progress are loss; so
                        is a stall of the answer after which the prober still got bytes of it (its own
                        progress points, `ProbeResult.progress`, a timeout or more after the first drop).
 6. local_policy        connect()/sendto() got EPERM: a firewall in the probe's own namespace.
 5b. remote_reset, remote_connect, remote_stall  this node's evidence did not decide, the destination's
                        node's agent was asked (correlator/crossnode.py): a reset of unseen origin (before
                        connection_refused), a connect timeout or a stall with no drop seen here.
 7. connect_unexplained connect timed out, SYNs went unanswered, no drop seen on this node.
 8. tls, 9. http_error  the handshake or the HTTP answer failed, on a network that delivered.
10. slow_or_stalled     the probe succeeded over its budget, or timed out reading: the phase where the
                        time went decides — resolve → dns/slow; connect with SYN retransmits →
                        tcp_retransmit; transfer with retransmissions → tcp_retransmit (confident when
                        data kept getting through to the end — by the kernel's sequence numbers or by
                        the prober's own progress points — or the final stall is what the loss rate
                        met makes likely; under 70 % when the end could also be a policy that just began,
                        or sequence numbers were not recorded); processing →
                        tcp_retransmit when recovering from loss explains at least half the wait for the
                        first byte (see loss_cost_ns), upstream_latency when the network was clean or
                        loss explains less than that.
11. healthy             ok and within budget.
12. (fallback)          unknown, saying what is missing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from bpf.types import RemoteEvidence
from correlator.crossnode import remote_connect, remote_reset, remote_stall
from correlator.finding import Finding
from correlator.join import Matched
from correlator.progress import (
    PRIOR_SEGMENTS,
    Direction,
    Stall,
    directions,
    has_sequence_evidence,
    seq_before,
)
from correlator.reasons import CLASS_WORDS, TcpFacts, reason_class, where
from correlator.types import Cause, KernelCoverage
from prober.types import ErrorKind, PhaseSpan, ProbeResult

DNS_ERRORS = {
    ErrorKind.DNS_NXDOMAIN: "nxdomain",
    ErrorKind.DNS_SERVFAIL: "servfail",
    ErrorKind.DNS_REFUSED: "refused",
    ErrorKind.DNS_NO_ANSWER: "no_answer",
    ErrorKind.DNS_TIMEOUT: "timeout",
    ErrorKind.DNS_UNREACHABLE: "unreachable",
    ErrorKind.DNS_UNEXPECTED: "unexpected",
}


@dataclass(frozen=True)
class Context:
    result: ProbeResult
    matched: tuple[Matched, ...]
    budget_ns: int | None
    coverage: KernelCoverage
    remote: tuple[RemoteEvidence, ...] = ()  # what peer agents saw of this probe's flows (correlator/crossnode.py)
    tcp: TcpFacts = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tcp", TcpFacts.of(self.matched))

    @property
    def over_budget(self) -> bool:
        return self.budget_ns is not None and self.result.duration_ns > self.budget_ns

    @property
    def directions(self) -> tuple[Direction, ...]:
        """Sequence-level story of each direction of the probe's TCP data (computed once)."""
        cached = self.__dict__.get("_directions")
        if cached is None:
            cached = directions(self.matched, self.result.end_ns)
            object.__setattr__(self, "_directions", cached)
        return cached

    def dns_matched(self) -> tuple[Matched, ...]:
        ports = {(addr, port) for _, addr, port in self.result.local_endpoints(dns_only=True)}
        return tuple(m for m in self.matched if (m.flow.local_addr, m.flow.local_port) in ports)


Rule = Callable[[Context], Finding | None]


def ms(ns: int) -> str:
    return f"{ns / 1e6:.0f} ms" if ns >= 10_000_000 else f"{ns / 1e6:.1f} ms"


# --- 1 -------------------------------------------------------------------------------------------------
def dns_failure(ctx: Context) -> Finding | None:
    r = ctx.result
    if r.error not in DNS_ERRORS:
        return None
    sub = DNS_ERRORS[r.error]
    dns_events = ctx.dns_matched()
    dropped = tuple(m for m in dns_events if m.event.kind == "drop"
                    and reason_class(m.event.reason) in ("policy", "program"))
    unreachable = tuple(m for m in dns_events if m.event.kind == "icmp_send"
                        or (m.event.kind == "drop" and m.event.reason == "NO_SOCKET"))
    queries = [tx for tx in r.dns if tx.rcode is None]
    facts = [f"DNS {tx.qtype} {tx.name} @{tx.server}: " + (tx.rcode or "no answer") for tx in r.dns]
    if sub in ("timeout", "unreachable") and dropped:
        facts.append(f"{len(dropped)} DNS packet(s) dropped ({dropped[0].event.reason}) {where(dropped[0])}")
        return Finding(Cause.DNS, "dns/policy_drop", 0.9 if reason_class(dropped[0].event.reason) == "policy"
                       else 0.75, dropped, tuple(facts))
    if sub in ("timeout", "unreachable") and unreachable:
        facts.append("the resolver's host answered that nothing listens on its DNS port")
        return Finding(Cause.DNS, "dns/unreachable", 0.9, unreachable, tuple(facts))
    if sub == "timeout":
        facts.append(f"{len(queries) or 'every'} quer(ies) left and got no answer; no drop seen on this node")
        return Finding(Cause.DNS, "dns/timeout", 0.8, (), tuple(facts))
    # An answer with an rcode is its own evidence: no kernel needed.
    return Finding(Cause.DNS, f"dns/{sub}", 0.95, (), tuple(facts), needs_kernel=False)


# --- 2, 3 ----------------------------------------------------------------------------------------------
def policy_reject(ctx: Context) -> Finding | None:
    if ctx.result.error not in (ErrorKind.CONNECT_REFUSED, ErrorKind.CONNECT_RESET, ErrorKind.CONNECT_UNREACHABLE):
        return None
    t = ctx.tcp
    blocked = tuple(m for m in t.syn_drops if reason_class(m.event.reason) in ("policy", "program"))
    if not blocked or t.resets_sent_no_socket:
        return None
    facts = (f"our SYN was dropped by {blocked[0].event.reason} {where(blocked[0])}",
             "the reset did not come from the target's TCP stack: a firewall rejected the connection")
    return Finding(Cause.POLICY_DROP, "policy_drop/reject", 0.9, blocked + t.resets_received, facts)


def connection_refused(ctx: Context) -> Finding | None:
    if ctx.result.error != ErrorKind.CONNECT_REFUSED:
        return None
    t = ctx.tcp
    if t.resets_sent_no_socket:
        return Finding(Cause.CONNECTION_REFUSED, "connection_refused/no_listener", 0.95,
                       t.resets_sent_no_socket + t.resets_received,
                       ("the target's TCP stack answered the SYN with a reset: nothing listens on that port",))
    if ctx.coverage.available:
        return Finding(Cause.CONNECTION_REFUSED, "connection_refused", 0.7, t.resets_received,
                       ("a reset answered the SYN; it came from beyond this node, so a remote firewall "
                        "cannot be ruled out",))
    return Finding(Cause.CONNECTION_REFUSED, "connection_refused", 0.5, (),
                   ("a reset answered the SYN (it may also be a firewall's reject)",))


# --- 4, 5, 6, 7 ----------------------------------------------------------------------------------------
# A tc/XDP program's drop is a policy or a loss injector; random loss takes two handshake packets in a row
# often enough (4 % at 20 % loss), so it takes this many dropped attempts to call it a policy.
PROGRAM_DROPS_FOR_POLICY = 3


def _program_or_loss(evidence: tuple[Matched, ...], facts: list[str] | tuple[str, ...], n: int) -> Finding:
    return Finding(Cause.UNKNOWN, "unknown/connect_timeout", 0.5, evidence,
                   (*facts, f"a tc/XDP program dropped them (a policy or a loss injector); {n} attempt(s) are too "
                            "few to tell a policy, which drops every one, from random loss"))


def _dropped_handshake(drops: tuple[Matched, ...], retransmits: tuple[Matched, ...], facts: tuple[str, ...],
                       conf_policy: float, conf_other: float) -> Finding:
    """Handshake packets dropped on their way (`drops`, the first named in `facts`): a queue's loss, too few
    program drops to tell a policy from loss, or a policy drop (`conf_policy` for a policy reason,
    `conf_other` for a program's)."""
    klass = reason_class(drops[0].event.reason)
    evidence = drops + retransmits
    if klass == "loss":
        return Finding(Cause.TCP_RETRANSMIT, "tcp_retransmit/syn_lost", 0.6, evidence,
                       (*facts, "a queue dropped them: congestion rather than intent"))
    if klass == "program" and len(drops) < PROGRAM_DROPS_FOR_POLICY:
        return _program_or_loss(evidence, facts, len(drops))
    return Finding(Cause.POLICY_DROP, "policy_drop/syn", conf_policy if klass == "policy" else conf_other,
                   evidence, facts)


def policy_drop_connect(ctx: Context) -> Finding | None:
    r, t = ctx.result, ctx.tcp
    if r.error not in (ErrorKind.CONNECT_TIMEOUT, ErrorKind.CONNECT_UNREACHABLE) or t.established:
        return None
    decisive = tuple(m for m in t.syn_drops if reason_class(m.event.reason) in ("policy", "program", "loss"))
    answers = tuple(m for m in t.synack_drops if reason_class(m.event.reason) in ("policy", "program", "loss"))
    if not decisive and answers:
        # Our SYNs arrived; the target's answers (SYN-ACK) were dropped on their way back, every one seen.
        first = answers[0]
        facts = (f"{len(answers)} SYN-ACK(s) answering our SYN dropped by {first.event.reason} {where(first)}",
                 "the connection was never established")
        return _dropped_handshake(answers, t.syn_retransmits, facts, 0.85, 0.75)
    if not decisive:
        return None
    attempts = max(1 + len(t.syn_retransmits), len(decisive))
    first = decisive[0]
    facts = (f"{len(decisive)} of {attempts} SYN(s) dropped by {first.event.reason} {where(first)}",
             "the connection was never established")
    # Some SYNs not seen dropped (lost events, or dropped elsewhere): less sure it was this drop.
    short = 0.15 if len(decisive) < attempts else 0.0
    return _dropped_handshake(decisive, t.syn_retransmits, facts, 0.95 - short, 0.8 - short)


POLICY_CHANCE = 1e-4  # a run of drops less likely than this to be random loss is a policy
LOSS_CHANCE = 0.1  # a final stall at least this likely (`Stall.likelihood`) under the loss met is loss
LOSS_SHARE = 0.5  # or: recovering from loss before the final stall took at least this share of the probe's time
KNOWN_RATE_SEGMENTS = 50  # fewer segments sent than this: the loss rate met is too little known to be sure
HEAVY_LOSS = 0.05  # ... and the sender had met at least this much loss (a few % is what a path may always lose)


def _side(outbound: bool) -> str:
    return "the probe's data" if outbound else "the answer"


def _at(ctx: Context, m: Matched) -> str:
    return f"+{(m.event.ts_ns - ctx.result.start_ns) / 1e6:.0f} ms"


def _stall_facts(ctx: Context, s: Stall) -> list[str]:
    if not s.copies:
        facts = [f"at the end, {len(s.pending)} contiguous segment(s) of {_side(s.outbound)} were dropped from "
                 f"{_at(ctx, s.pending[0])} on by {s.pending[0].event.reason} {where(s.pending[0])}, not yet "
                 "retransmitted"]
        if s.loss_rate is not None:
            facts.append(f"the sender had met loss at up to {s.loss_rate:.1%}: that many in a row by chance "
                         f"{s.chance:.1g}")
        return facts
    first = s.dropped[0] if s.dropped else s.copies[0]
    head = (f"from {_at(ctx, s.start)} on, {len(s.dropped)} of {len(s.copies)} retransmitted cop(ies) of one segment "
            f"of {_side(s.outbound)} (seq {s.seq}) were seen dropped"
            + (", and its first transmission" if s.original is not None else ""))
    if s.dropped:
        head += f" by {first.event.reason} {where(first)}"
    if s.backoff:
        head += " at growing intervals (" + ", ".join(ms(g) for g in s.backoff_gaps_ns) + "): the retransmission " \
                "timer backing off"
    facts = [head]
    if s.copies and all(c.event.snd_una == s.seq for c in s.copies):
        facts.append("nothing newer was acknowledged or sent in that direction after it (snd_una stayed at it)")
    if s.loss_rate is not None and s.segs_before is not None:
        facts.append(f"before it the sender had sent {s.segs_before} segment(s) and retransmitted "
                     f"{s.retrans_before}: loss at up to {s.loss_rate:.1%} drops {s.drops_in_a_row} cop(ies) in a "
                     f"row with chance {s.chance:.1g}")
    return facts


def _answer_after(ctx: Context, ts_ns: int) -> int | None:
    """When the prober last got bytes of the answer, if that was well after `ts_ns` (at least one minimum
    retransmission timeout: more than the time the probe takes to read what its socket held already); else
    None. Not trusted when the probe's event loop was starved (its reads then lag the arrivals)."""
    r = ctx.result
    last = r.last_arrival_ns
    if r.suspect or last is None or last <= ts_ns + RTO_MIN_NS:
        return None
    return last


def _progress_fact(ctx: Context) -> str:
    r = ctx.result
    last = r.progress[-1]
    return (f"the prober got {last.bytes} byte(s) of the answer, the last at +{(last.ts_ns - r.start_ns) / 1e6:.0f} ms "
            f"({ms(r.end_ns - last.ts_ns)} before the probe gave up)")


def policy_drop_established(ctx: Context) -> Finding | None:
    r, t = ctx.result, ctx.tcp
    if r.ok or r.error not in (ErrorKind.READ_TIMEOUT, ErrorKind.CONNECT_RESET, ErrorKind.CONNECT_TIMEOUT):
        return None
    if not t.established:
        return None
    for d in ctx.directions:
        s = d.stall
        if s is None or not s.every_copy_dropped:
            continue
        if not s.outbound and _answer_after(ctx, s.start.event.ts_ns) is not None:
            continue  # the prober kept getting the answer after that segment first went missing: it got through
        cls = reason_class(s.dropped[0].event.reason)
        if cls not in ("policy", "program"):
            continue
        if s.chance is not None:
            if s.drops_in_a_row < 3 or s.chance >= POLICY_CHANCE:
                continue
            conf = 0.9 if cls == "policy" else 0.8
            facts = _stall_facts(ctx, s)
            if (s.segs_before or 0) < KNOWN_RATE_SEGMENTS:
                conf = 0.65
                facts.append(f"the sender had sent only {s.segs_before or 0} segment(s) before: the loss rate of "
                             "this path is hardly known")
        else:
            # No retransmission of it was traced (the sender is beyond this node, or its own stack dropped the
            # copies): only the drops are seen, not its counters. Older data lost before means loss met earlier;
            # newer segments dropped with it are the rest of the window the wall took.
            earlier = [x for x in d.drops if x.event.ts_ns < s.copies[0].event.ts_ns and x.event.seq != s.seq
                       and seq_before(x.event.seq, s.seq)]
            if len(s.copies) < 4 or not s.backoff or earlier:
                continue
            facts = [*_stall_facts(ctx, s), "no older segment of that direction was seen dropped before; no "
                     "retransmission of it was traced (the sender is beyond this node, or its own stack dropped "
                     "the copies), so the loss rate it met is not known"]
            # The first transmission, one fast retransmission and a backing-off timer send at most this many
            # copies in the time there was; more means the sender's stack resent at once too, as it does when a
            # rule on its own way out drops them.
            span = r.end_ns - s.copies[0].event.ts_ns
            timer_copies = 2 + int(math.log2(max(span, 0) / RTO_MIN_NS + 1))
            conf = 0.6
            if len(s.copies) > timer_copies:
                conf = 0.7
                facts.append(f"{len(s.copies)} copies where a retransmission timer sends at most {timer_copies} in "
                             f"{ms(span)}: the sender resent at once as well, as when its own rules drop them")
        if not s.outbound and r.progress:
            gap = r.progress[-1].ts_ns - s.start.event.ts_ns
            facts.append(_progress_fact(ctx) + (": nothing after that segment went missing" if gap <= 0 else
                                                f": none later than {ms(gap)} after that segment went missing "
                                                "(what was on its way already)"))
        return Finding(Cause.POLICY_DROP, "policy_drop/established", conf, s.copies + s.dropped, tuple(facts))
    return None


def local_policy(ctx: Context) -> Finding | None:
    """connect()/sendto() failed with EPERM: a firewall in the probe's own namespace said no."""
    if ctx.result.error != ErrorKind.CONNECT_EPERM:
        return None
    local = tuple(m for m in ctx.matched if m.event.kind == "drop" and m.local_ns
                  and reason_class(m.event.reason) == "policy")
    facts = ["the kernel refused to send: EPERM, a firewall rule in the probe's own namespace"]
    if local:
        facts.append(f"dropped by {local[0].event.reason} {where(local[0])}")
    return Finding(Cause.POLICY_DROP, "policy_drop/local", 0.95 if local else 0.85, local, tuple(facts),
                   needs_kernel=False)


def connect_unexplained(ctx: Context) -> Finding | None:
    if ctx.result.error != ErrorKind.CONNECT_TIMEOUT:
        return None
    n = len(ctx.tcp.syn_retransmits)
    other = [m for m in ctx.matched if m.event.kind == "drop" and m.event.proto == "tcp"
             and reason_class(m.event.reason) in ("app", "routing", "local")]
    if not ctx.coverage.available:
        return Finding(Cause.UNKNOWN, "unknown/connect_timeout", 0.3, (),
                       ("connect timed out; without kernel evidence a policy drop, loss and a dead host look "
                        "the same",), needs_kernel=False)
    if other:
        first = other[0]
        cls = reason_class(first.event.reason)
        return Finding(Cause.UNKNOWN, "unknown/connect_timeout", 0.5, ctx.tcp.syn_retransmits + tuple(other),
                       (f"SYN sent {n + 1} time(s), never answered; {len(other)} handshake packet(s) dropped by "
                        f"{first.event.reason} {where(first)}: {CLASS_WORDS[cls]}",), needs_kernel=False)
    return Finding(Cause.UNKNOWN, "unknown/connect_timeout", 0.4, ctx.tcp.syn_retransmits,
                   (f"SYN sent {n + 1} time(s), never answered; no drop seen on this node: dropped beyond it, "
                    "or the host is down",), needs_kernel=False)


# --- 8, 9 ----------------------------------------------------------------------------------------------
def tls(ctx: Context) -> Finding | None:
    if ctx.result.error != ErrorKind.TLS_ERROR:
        return None
    return Finding(Cause.TLS, "tls/handshake", 0.9, (), (f"TLS failed: {ctx.result.error_detail}",),
                   needs_kernel=False)


def http_error(ctx: Context) -> Finding | None:
    r = ctx.result
    if r.error == ErrorKind.HTTP_STATUS:
        if r.http_status is None:  # a server other than the target said no (an OAuth2 token endpoint)
            return Finding(Cause.HTTP_ERROR, "http_error/other_server", 0.95, (), (r.error_detail,),
                           needs_kernel=False)
        return Finding(Cause.HTTP_ERROR, f"http_error/{r.http_status}", 0.95, (),
                       (f"the server answered HTTP {r.http_status}",), needs_kernel=False)
    if r.error == ErrorKind.VALIDATION:
        return Finding(Cause.HTTP_ERROR, "http_error/validation", 0.9, (),
                       (f"the answer failed validation: {', '.join(r.failed_validators) or r.error_detail}",),
                       needs_kernel=False)
    return None


# --- 10, 11 --------------------------------------------------------------------------------------------
def _dominant_phase(r: ProbeResult) -> PhaseSpan | None:
    spans = [p for p in r.phases if p.duration_ns > 0]
    if r.error == ErrorKind.READ_TIMEOUT and spans:
        return spans[-1]  # the phase we were stuck in when the clock ran out
    return max(spans, key=lambda p: p.duration_ns, default=None)


def _in(span: PhaseSpan, ms_list: tuple[Matched, ...]) -> tuple[Matched, ...]:
    return tuple(m for m in ms_list if span.start_ns - 5_000_000 <= m.event.ts_ns <= span.end_ns)


def slow_or_stalled(ctx: Context) -> Finding | None:
    r = ctx.result
    stalled = r.error == ErrorKind.READ_TIMEOUT
    if not (stalled or (r.ok and ctx.over_budget)):
        return None
    phase = _dominant_phase(r)
    if phase is None:
        return None
    what = "timed out" if stalled else f"took {ms(r.duration_ns)} (budget {ms(ctx.budget_ns or 0)})"
    head = f"the probe {what}; most time went to {phase.name} ({ms(phase.duration_ns)})"
    t = ctx.tcp
    if phase.name == "resolve":
        return Finding(Cause.DNS, "dns/slow", 0.9, (), (head,), needs_kernel=False)
    if phase.name == "connect":
        syn = _in(phase, t.syn_retransmits)
        if syn:
            return Finding(Cause.TCP_RETRANSMIT, "tcp_retransmit/syn", 0.9, syn + _in(phase, t.drops),
                           (head, f"the SYN was retransmitted {len(syn)} time(s) before the handshake completed"))
        return Finding(Cause.UNKNOWN, "unknown/slow_connect", 0.4, (),
                       (head, "no SYN retransmission: a long round trip, or the target slow to accept"))
    rtx = _in(phase, t.data_retransmits)
    lost = _in(phase, t.decisive_drops())
    if not rtx and stalled and lost:
        first = lost[0]
        if _answer_after(ctx, first.event.ts_ns) is not None:
            return Finding(Cause.TCP_RETRANSMIT, f"tcp_retransmit/{phase.name}", 0.65, lost,
                           (head, f"{len(lost)} packet(s) of the connection dropped by {first.event.reason} "
                            f"{where(first)}", _progress_fact(ctx) + ": it kept arriving after the first drop, so "
                            "that was loss, not a wall; no retransmission was seen (the sender is beyond this "
                            "node), so a policy that began at the very end is not ruled out"))
        return Finding(Cause.UNKNOWN, "unknown/stalled", 0.5, lost,
                       (head, f"{len(lost)} packet(s) of the connection dropped by {first.event.reason} {where(first)} "
                        "and no retransmission seen: loss, or a policy that began shortly before the end"))
    if not rtx:
        return Finding(Cause.UPSTREAM_LATENCY, f"upstream_latency/{phase.name}", 0.85, (),
                       (head, "no retransmission or drop on the connection: the network delivered, the server "
                        "took the time"))
    drops = _in(phase, t.drops)
    if phase.name != "processing" or stalled:
        # Throughput phases (transfer, tls): loss shrinks the window for the rest of the phase, so the
        # retransmissions themselves understate what the loss cost. The network is to blame. A probe that
        # ran out of time with retransmissions in any phase is judged by what got through.
        facts = [head, f"{len(rtx)} retransmission(s) and {len(drops)} drop(s) seen in {phase.name}"]
        cost = loss_cost_ns(rtx, t.drops)
        facts.append(f"recovering from loss explains at least {ms(min(cost, r.duration_ns))} "
                     f"({min(cost, r.duration_ns) / max(r.duration_ns, 1):.0%} of the probe's time)")
        conf = 0.85
        if stalled:
            conf, more = _stalled_transfer(ctx)
            facts += more
        else:
            facts += _fate_facts(ctx)
        return Finding(Cause.TCP_RETRANSMIT, f"tcp_retransmit/{phase.name}", conf, rtx + drops, tuple(facts))
    cost = loss_cost_ns(rtx, t.drops)
    if cost < phase.duration_ns // 2:
        return Finding(Cause.UPSTREAM_LATENCY, "upstream_latency/processing", 0.7, rtx + drops,
                       (head, f"{len(rtx)} retransmission(s), but recovering from loss explains at most "
                        f"{ms(cost)} of the wait for the first byte: the server took the rest"))
    return Finding(Cause.TCP_RETRANSMIT, "tcp_retransmit/processing", 0.85, rtx + drops,
                   (head, f"{len(rtx)} retransmission(s): recovering from loss explains up to {ms(cost)} of the "
                    "wait for the first byte"))


def _fate_facts(ctx: Context) -> list[str]:
    out = []
    for d in ctx.directions:
        if d.fates:
            out.append(f"{len(d.fates)} segment(s) of {_side(d.outbound)} seen dropped: {d.through()} resent and "
                       f"acknowledged later, {d.dropped_again()} whose resent copy was dropped too")
    return out


def _stalled_transfer(ctx: Context) -> tuple[float, list[str]]:
    """Confidence and facts for a transfer that ran out of time with retransmissions, by what got through."""
    r = ctx.result
    if not has_sequence_evidence(ctx.matched):
        facts = ["sequence numbers were not recorded: whether the retransmissions got through was not checked"]
        last = r.last_arrival_ns
        if last is not None and not r.suspect:
            facts.append(_progress_fact(ctx))
            later = [m for m in ctx.tcp.decisive_drops() if m.event.ts_ns > last]
            if r.end_ns - last <= RTO_MIN_NS and not later:
                # Still short of sure: a wall in the last moments whose drops were not seen looks the same.
                return 0.65, [*facts, "no drop of the connection was seen after it: the answer was still arriving "
                                      "shortly before the probe gave up"]
        return 0.6, [*facts, "a policy that began during the transfer would look the same"]
    facts = _fate_facts(ctx)
    stalls = [d.stall for d in ctx.directions if d.stall is not None]
    if not stalls:
        flowing = [d for d in ctx.directions if d.flowing_at_end]
        last = r.last_arrival_ns
        if flowing and not flowing[0].outbound and last is not None and not r.suspect \
                and r.end_ns - last > 2 * RTO_MIN_NS:
            # The kernel saw newer data move, but the prober itself got nothing for the last stretch: the answer
            # stalled (an acknowledgement lost again and again, a hole not yet filled) — not "kept flowing".
            return 0.6, [*facts, _progress_fact(ctx) + ": newer data of the answer was seen on the wire after the "
                                 "last retransmission, yet none reached the prober in the last "
                                 f"{ms(r.end_ns - last)}; loss that stalled it and a policy that began then look "
                                 "alike here"]
        if flowing:
            return 0.85, [*facts, f"{_side(flowing[0].outbound)} kept getting through until the probe gave up: "
                                  "newer data followed the last retransmission, with no drop after it"]
        return 0.6, [*facts, "no copy of the last retransmitted segment was seen after it, though the timer was "
                             "due: it got through, or its copies were not seen"]
    s = max(stalls, key=lambda x: x.start.event.ts_ns)
    facts += _stall_facts(ctx, s)
    if not s.outbound and _answer_after(ctx, s.start.event.ts_ns) is not None:
        return 0.85, [*facts, _progress_fact(ctx) + ": the answer kept coming after that segment first went "
                              "missing, so it got through — loss, not a wall"]
    if (s.every_copy_dropped or s.pending) and s.likelihood is not None and s.likelihood >= LOSS_CHANCE:
        return 0.85, [*facts, f"random loss at the rate met before does this {s.likelihood:.0%} of the time: it "
                              "explains this stall"]
    if s.every_copy_dropped and s.chance is not None and s.chance < POLICY_CHANCE:
        # a loss-class reason dropped every copy (a queue that never drains)
        return 0.6, [*facts, f"every copy was dropped for {CLASS_WORDS[reason_class(s.dropped[0].event.reason)]}"]
    # Whatever the end was, loss already explains the probe's time: recovering from it before the final stall
    # took most of the time the probe had.
    before = s.start.event.ts_ns - 5_000_000
    rtx = tuple(m for m in ctx.tcp.data_retransmits if m.event.ts_ns < before)
    drops = tuple(m for m in ctx.tcp.drops if m.event.ts_ns < before)
    span = ctx.result.duration_ns
    cost = min(loss_cost_ns(rtx, drops, unseen_ns=0), span)
    heavy = (s.segs_before is not None and s.retrans_before is not None
             and s.retrans_before >= HEAVY_LOSS * (s.segs_before + PRIOR_SEGMENTS))
    plausible = s.chance is None or s.chance >= POLICY_CHANCE * 10
    if rtx and span > 0 and cost >= span * LOSS_SHARE and heavy and plausible:
        return 0.8, [*facts, f"before that, recovering from loss took {ms(cost)} of the probe's {ms(span)} "
                     f"({cost / span:.0%}): the loss explains the time, whatever the end was"]
    return 0.6, [*facts, "at the end one segment went unanswered: random loss, or a policy that began shortly "
                 "before the end — this evidence cannot tell them apart"]


RTO_MIN_NS = 200_000_000  # Linux TCP_RTO_MIN: the least a timeout-driven retransmission costs
BURST_GAP_NS = 50_000_000


def loss_cost_ns(rtx: tuple[Matched, ...], drops: tuple[Matched, ...], unseen_ns: int = RTO_MIN_NS) -> int:
    """How much of a wait retransmissions can explain, burst by burst.

    A burst whose lost packet was seen dropped (same direction, before it) cost the time from that drop
    to the retransmission. A burst after which only packets of the other direction were seen dropped is
    spurious — an acknowledgement was lost, the data had arrived — and cost the waiter nothing. A burst
    with no drop seen (lost beyond this node) is charged `unseen_ns` (one minimum RTO), so loss is never
    under-blamed; 0 when only what was measured may count.
    """
    total, last_end = 0, None
    bursts: list[list[Matched]] = []
    for m in rtx:
        if last_end is None or m.event.ts_ns - last_end > BURST_GAP_NS:
            bursts.append([])
        bursts[-1].append(m)
        last_end = m.event.ts_ns
    prev_end = 0
    for burst in bursts:
        first = burst[0]
        before = [d for d in drops if prev_end <= d.event.ts_ns <= first.event.ts_ns]
        same = [d for d in before if d.outbound == first.outbound]
        if same:
            total += first.event.ts_ns - same[-1].event.ts_ns
        elif not before:
            total += unseen_ns
        prev_end = burst[-1].event.ts_ns
    return total


def healthy(ctx: Context) -> Finding | None:
    if not ctx.result.ok or ctx.over_budget:
        return None
    facts = [f"succeeded in {ms(ctx.result.duration_ns)}"]
    if ctx.tcp.data_retransmits or ctx.tcp.syn_retransmits:
        facts.append(f"{len(ctx.tcp.data_retransmits) + len(ctx.tcp.syn_retransmits)} retransmission(s), "
                     "within budget")
    return Finding(Cause.OK, None, 1.0, (), tuple(facts), needs_kernel=False)


# --- 1b, ICMP echo: the sensor watches an echo by its identifier (icmp/ID) -----------------------------
def icmp_echo(ctx: Context) -> Finding | None:
    """A failed ICMP echo: a kernel drop of our echo (request or reply) names its cause; else what came back to
    the probe's raw socket: an admin-prohibited destination unreachable is a firewall's reject, EPERM on send a
    local rule, a time exceeded or unreachable names the router that sent it; silence cannot be told apart."""
    r = ctx.result
    if r.kind != "icmp" or r.ok:
        return None
    drops = tuple(m for m in ctx.matched if m.event.kind == "drop")
    if drops:
        first = drops[0]
        what = "echo request" if first.outbound else "echo reply"
        facts = (f"our {what} was dropped by {first.event.reason} {where(first)}",)
        if reason_class(first.event.reason) in ("policy", "program"):
            return Finding(Cause.POLICY_DROP, "policy_drop/echo", 0.9, drops, facts)
        return Finding(Cause.UNKNOWN, "unknown/icmp_dropped", 0.6, drops, facts)
    if r.error == ErrorKind.CONNECT_REFUSED and "prohibited" in r.error_detail:
        return Finding(Cause.POLICY_DROP, "policy_drop/reject", 0.9, (),
                       (f"a firewall rejected the echo request: {r.error_detail}",), needs_kernel=False)
    if r.error == ErrorKind.CONNECT_EPERM:
        return Finding(Cause.POLICY_DROP, "policy_drop/local", 0.85, (),
                       ("the kernel refused to send the echo request: EPERM, a firewall rule in the probe's own "
                        "namespace",), needs_kernel=False)
    if r.error == ErrorKind.CONNECT_TIMEOUT:
        seen = ("the kernel saw no drop of the echo on this node: dropped beyond it, or the host is down"
                if ctx.coverage.available else "a policy drop, loss and a dead host look the same from here")
        return Finding(Cause.UNKNOWN, "unknown/icmp_no_reply", 0.4 if ctx.coverage.available else 0.3, (),
                       (r.error_detail, seen), needs_kernel=False)
    return Finding(Cause.UNKNOWN, "unknown/icmp_unreachable", 0.6, (), (r.error_detail,), needs_kernel=False)


RULES: tuple[Rule, ...] = (
    dns_failure,
    icmp_echo,
    policy_reject,
    remote_reset,
    connection_refused,
    policy_drop_connect,
    policy_drop_established,
    remote_connect,
    remote_stall,
    local_policy,
    connect_unexplained,
    tls,
    http_error,
    slow_or_stalled,
    healthy,
)
