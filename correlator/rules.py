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
                        Beats connect timeout. Loss-class drops of every SYN are tcp_retransmit.
 5. policy_drop_established  the handshake passed, then every retransmission of our data (or of the
                        answer) was dropped until the probe gave up: a policy on the established flow.
 6. local_policy        connect()/sendto() got EPERM: a firewall in the probe's own namespace.
 7. connect_unexplained connect timed out, SYNs went unanswered, no drop seen on this node.
 8. tls, 9. http_error  the handshake or the HTTP answer failed, on a network that delivered.
10. slow_or_stalled     the probe succeeded over its budget, or timed out reading: the phase where the
                        time went decides — resolve → dns/slow; connect with SYN retransmits →
                        tcp_retransmit; transfer with retransmissions → tcp_retransmit; processing →
                        tcp_retransmit when recovering from loss explains at least half the wait for the
                        first byte (see loss_cost_ns), upstream_latency when the network was clean or
                        loss explains less than that.
11. healthy             ok and within budget.
12. (fallback)          unknown, saying what is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from correlator.evidence import TcpFacts, reason_class, where
from correlator.join import Matched
from correlator.types import Cause
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
class EvidenceStatus:
    """Whether kernel evidence could be had for this probe's window."""

    available: bool = True
    lost_events: int = 0  # ring-buffer events lost while the probe ran
    reason: str = ""  # why it is unavailable, when it is not


@dataclass(frozen=True)
class Context:
    result: ProbeResult
    matched: tuple[Matched, ...]
    budget_ns: int | None
    evidence: EvidenceStatus
    tcp: TcpFacts = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tcp", TcpFacts.of(self.matched))

    @property
    def over_budget(self) -> bool:
        return self.budget_ns is not None and self.result.duration_ns > self.budget_ns

    def dns_matched(self) -> tuple[Matched, ...]:
        ports = {(tx.flow.local_addr, tx.flow.local_port) for tx in self.result.dns if tx.flow is not None}
        return tuple(m for m in self.matched if (m.flow.local_addr, m.flow.local_port) in ports)


@dataclass(frozen=True)
class Finding:
    cause: Cause
    sub_cause: str | None
    confidence: float
    evidence: tuple[Matched, ...]
    facts: tuple[str, ...]
    needs_kernel: bool = True  # without kernel evidence this finding is a guess: confidence is capped


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
    if ctx.evidence.available:
        return Finding(Cause.CONNECTION_REFUSED, "connection_refused", 0.7, t.resets_received,
                       ("a reset answered the SYN; it came from beyond this node, so a remote firewall "
                        "cannot be ruled out",))
    return Finding(Cause.CONNECTION_REFUSED, "connection_refused", 0.5, (),
                   ("a reset answered the SYN (it may also be a firewall's reject)",))


# --- 4, 5, 6 -------------------------------------------------------------------------------------------
def policy_drop_connect(ctx: Context) -> Finding | None:
    r, t = ctx.result, ctx.tcp
    if r.error not in (ErrorKind.CONNECT_TIMEOUT, ErrorKind.CONNECT_UNREACHABLE) or t.established:
        return None
    decisive = tuple(m for m in t.syn_drops if reason_class(m.event.reason) in ("policy", "program", "loss"))
    if not decisive:
        return None
    attempts = max(1 + len(t.syn_retransmits), len(decisive))
    first = decisive[0]
    facts = [f"{len(decisive)} of {attempts} SYN(s) dropped by {first.event.reason} {where(first)}",
             "the connection was never established"]
    if reason_class(first.event.reason) == "loss":
        return Finding(Cause.TCP_RETRANSMIT, "tcp_retransmit/syn_lost", 0.6, decisive + t.syn_retransmits,
                       (*facts, "a queue dropped them: congestion rather than intent"))
    conf = 0.95 if reason_class(first.event.reason) == "policy" else 0.8
    if len(decisive) < attempts:
        conf -= 0.15  # some SYNs were not seen dropped (lost events, or dropped elsewhere)
    return Finding(Cause.POLICY_DROP, "policy_drop/syn", conf, decisive + t.syn_retransmits, tuple(facts))


def policy_drop_established(ctx: Context) -> Finding | None:
    r, t = ctx.result, ctx.tcp
    if r.ok or r.error not in (ErrorKind.READ_TIMEOUT, ErrorKind.CONNECT_RESET, ErrorKind.CONNECT_TIMEOUT):
        return None
    if not t.established:
        return None
    blocked = tuple(m for m in t.decisive_drops() if not m.event.tcp_flags or "S" not in m.event.tcp_flags)
    if len(blocked) < 2 or len(t.data_retransmits) < 1:
        return None
    cls = reason_class(blocked[0].event.reason)
    facts = (f"after the handshake, {len(blocked)} packets of this connection were dropped by "
             f"{blocked[0].event.reason} {where(blocked[0])}, retransmissions included",
             f"{len(t.data_retransmits)} retransmission(s), none got through before the probe gave up")
    if cls == "loss":
        return Finding(Cause.TCP_RETRANSMIT, "tcp_retransmit/stalled", 0.6, blocked + t.data_retransmits, facts)
    return Finding(Cause.POLICY_DROP, "policy_drop/established", 0.9 if cls == "policy" else 0.75,
                   blocked + t.data_retransmits, facts)


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
    if not ctx.evidence.available:
        return Finding(Cause.UNKNOWN, "unknown/connect_timeout", 0.3, (),
                       ("connect timed out; without kernel evidence a policy drop, loss and a dead host look "
                        "the same",), needs_kernel=False)
    return Finding(Cause.UNKNOWN, "unknown/connect_timeout", 0.4, ctx.tcp.syn_retransmits,
                   (f"SYN sent {n + 1} time(s), never answered; no drop seen on this node: dropped beyond it, "
                    "or the host is down",), needs_kernel=False)


# --- 7, 8 ----------------------------------------------------------------------------------------------
def tls(ctx: Context) -> Finding | None:
    if ctx.result.error != ErrorKind.TLS_ERROR:
        return None
    return Finding(Cause.TLS, "tls/handshake", 0.9, (), (f"TLS failed: {ctx.result.error_detail}",),
                   needs_kernel=False)


def http_error(ctx: Context) -> Finding | None:
    r = ctx.result
    if r.error == ErrorKind.HTTP_STATUS:
        return Finding(Cause.HTTP_ERROR, f"http_error/{r.http_status}", 0.95, (),
                       (f"the server answered HTTP {r.http_status}",), needs_kernel=False)
    if r.error == ErrorKind.VALIDATION:
        return Finding(Cause.HTTP_ERROR, "http_error/validation", 0.9, (),
                       (f"the answer failed validation: {', '.join(r.failed_validators) or r.error_detail}",),
                       needs_kernel=False)
    return None


# --- 9, 10 ---------------------------------------------------------------------------------------------
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
    if not rtx:
        return Finding(Cause.UPSTREAM_LATENCY, f"upstream_latency/{phase.name}", 0.85, (),
                       (head, "no retransmission or drop on the connection: the network delivered, the server "
                        "took the time"))
    drops = _in(phase, t.drops)
    if phase.name != "processing":
        # Throughput phases (transfer, tls): loss shrinks the window for the rest of the phase, so the
        # retransmissions themselves understate what the loss cost. The network is to blame.
        return Finding(Cause.TCP_RETRANSMIT, f"tcp_retransmit/{phase.name}", 0.85, rtx + drops,
                       (head, f"{len(rtx)} retransmission(s) and {len(drops)} drop(s) seen in {phase.name}"))
    cost = loss_cost_ns(rtx, t.drops)
    if cost < phase.duration_ns // 2:
        return Finding(Cause.UPSTREAM_LATENCY, "upstream_latency/processing", 0.7, rtx + drops,
                       (head, f"{len(rtx)} retransmission(s), but recovering from loss explains at most "
                        f"{ms(cost)} of the wait for the first byte: the server took the rest"))
    return Finding(Cause.TCP_RETRANSMIT, "tcp_retransmit/processing", 0.85, rtx + drops,
                   (head, f"{len(rtx)} retransmission(s): recovering from loss explains up to {ms(cost)} of the "
                    "wait for the first byte"))


RTO_MIN_NS = 200_000_000  # Linux TCP_RTO_MIN: the least a timeout-driven retransmission costs
BURST_GAP_NS = 50_000_000


def loss_cost_ns(rtx: tuple[Matched, ...], drops: tuple[Matched, ...]) -> int:
    """How much of a wait retransmissions can explain, burst by burst.

    A burst whose lost packet was seen dropped (same direction, before it) cost the time from that drop
    to the retransmission. A burst after which only packets of the other direction were seen dropped is
    spurious — an acknowledgement was lost, the data had arrived — and cost the waiter nothing. A burst
    with no drop seen (lost beyond this node) is charged one minimum RTO, so loss is never under-blamed.
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
            total += RTO_MIN_NS
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


# --- ICMP echo: the sensor watches an echo by its identifier (icmp/ID) ------------------------------------
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
                if ctx.evidence.available else "a policy drop, loss and a dead host look the same from here")
        return Finding(Cause.UNKNOWN, "unknown/icmp_no_reply", 0.4 if ctx.evidence.available else 0.3, (),
                       (r.error_detail, seen), needs_kernel=False)
    return Finding(Cause.UNKNOWN, "unknown/icmp_unreachable", 0.6, (), (r.error_detail,), needs_kernel=False)


RULES: tuple[Rule, ...] = (
    dns_failure,
    icmp_echo,
    policy_reject,
    connection_refused,
    policy_drop_connect,
    policy_drop_established,
    local_policy,
    connect_unexplained,
    tls,
    http_error,
    slow_or_stalled,
    healthy,
)
