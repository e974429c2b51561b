"""Rules that use both ends of a flow: this node's kernel events and what the agent on the destination's node
saw (`RemoteEvidence`, asked by the app when this node's own evidence does not decide: `wants_remote`).

Each rule is a named pure function from a `Context` to a `Finding` or None, placed in `correlator.rules.RULES`
after the rules that decide on local evidence alone (local evidence wins):

  remote_reset         refused, no reset of unseen origin explained here: node B's stack answered the SYN with
                       a reset (NO_SOCKET) → connection_refused/no_listener on node B; node B's policy dropped the
                       SYN and its stack sent no reset → policy_drop/reject (a firewall answered for it).
  remote_connect       connect timed out, nothing dropped here: node B dropped our SYN (policy, by reason and
                       location, in which namespace) → policy_drop/syn naming node B; node B answered and dropped
                       its own answer on the way out → policy_drop/syn (return path, node B); node B answered
                       and nothing dropped the answer on either node → unknown/return_path (in between); node B
                       watched and saw none of our SYNs → unknown/between_nodes (the network in between).
  remote_stall         an established flow stalled, nothing dropped here: node B's policy dropped its packets
                       → policy_drop/established naming node B.

And one check that never changes the verdict's cause (local evidence wins; the remote must agree):

  answer_drop_agreement  this node dropped the answers (SYN-ACKs) to our SYN on its way in, so local evidence
                       decided (`policy_drop_connect`); node B agrees when it saw our SYN arrive and its answer
                       leave (it resent the SYN-ACK), contradicts when it dropped our SYN itself or answered it
                       with a reset: a fact either way, and a contradiction lowers the confidence
                       (`CONTRADICTED_FACTOR`). Silence is not a contradiction (a node's kernel reports an
                       answer only when it resends it).

Clock honesty: a remote event is on this node's timeline only to within its `uncertainty_ns` (both nodes'
clocks and the question's round trip). It decides only when that whole interval lies inside the probe's
window and the uncertainty is at most `MAX_UNCERTAINTY_NS`; otherwise it is named in the facts as seen but
not placeable, and the verdict stays what local evidence says.
"""

from __future__ import annotations

from collections.abc import Iterable

from bpf.types import RemoteEvent, RemoteEvidence
from correlator.finding import Finding
from correlator.join import GRACE_NS, SLACK_NS, Matched
from correlator.reasons import CLASS_WORDS, TcpFacts, reason_class
from correlator.types import Cause, Verdict
from prober.types import ErrorKind, ProbeResult

__all__ = ["CONTRADICTED_FACTOR", "MAX_UNCERTAINTY_NS", "RemoteFacts", "answer_drop_agreement", "remote_connect",
           "remote_facts", "remote_reset", "remote_stall", "unavailable_facts", "wants_remote"]

MAX_UNCERTAINTY_NS = 200_000_000  # a remote event placed less precisely than this does not decide
CONTRADICTED_FACTOR = 0.6  # the confidence of a local verdict the destination's node contradicts


# -- when to ask ---------------------------------------------------------------------------------------------


def wants_remote(verdict: Verdict) -> bool:
    """Whether a verdict made on this node's evidence alone leaves the question open that the destination's
    node could answer: a connect timeout with no drop seen here, an established flow that stalled with no drop
    seen here, a reset whose origin was not seen."""
    r = verdict.result
    if r.kind not in ("http", "tcp", "grpc", "websocket") or not any(str(f.proto) == "tcp" for f in r.flows):
        return False
    if verdict.rule == "connect_unexplained":
        return True
    if verdict.rule == "policy_drop_connect" and _answers_dropped_here(verdict.evidence):
        return True  # decided here; the destination's node is asked whether it agrees
    if verdict.rule == "connection_refused" and verdict.sub_cause != "connection_refused/no_listener":
        return True
    if r.error == ErrorKind.READ_TIMEOUT and verdict.rule in ("slow_or_stalled", "fallback") \
            and verdict.cause != Cause.POLICY_DROP:
        return True
    return verdict.rule == "fallback" and r.error in (ErrorKind.CONNECT_TIMEOUT, ErrorKind.CONNECT_RESET)


def _is_answer(e) -> bool:
    flags = e.tcp_flags or ""
    return "S" in flags and "A" in flags


def _answers_dropped_here(evidence) -> bool:
    return any(e.kind == "drop" and _is_answer(e) for e in evidence)


# -- the remote events of a probe ------------------------------------------------------------------------------


class RemoteFacts:
    """The remote events of one probe's TCP flows, joined like local ones (`Matched`, never `local_ns`), split
    into those placed safely inside the probe's window and those that are not."""

    def __init__(self, result: ProbeResult, remote: Iterable[RemoteEvidence], grace_ns: int = GRACE_NS):
        self.answered: list[RemoteEvidence] = []
        self.unavailable: list[RemoteEvidence] = []
        placed: list[tuple[Matched, RemoteEvent]] = []
        unplaced: list[tuple[Matched, RemoteEvent]] = []
        by_local = result.local_endpoints()
        lo, hi = result.start_ns - SLACK_NS, result.end_ns + grace_ns
        for rem in remote:
            (self.answered if rem.available else self.unavailable).append(rem)
            if not rem.available:
                continue
            for re_ in rem.events:
                ev = re_.event
                flow, outbound = by_local.get((ev.proto, ev.saddr, ev.sport)), True
                if flow is None:
                    flow, outbound = by_local.get((ev.proto, ev.daddr, ev.dport)), False
                if flow is None:
                    continue
                m = Matched(ev, flow, outbound, local_ns=False)
                safe = (re_.uncertainty_ns <= MAX_UNCERTAINTY_NS
                        and lo <= ev.ts_ns - re_.uncertainty_ns and ev.ts_ns + re_.uncertainty_ns <= hi)
                (placed if safe else unplaced).append((m, re_))
        placed.sort(key=lambda p: p[0].event.ts_ns)
        self._placed = placed
        self.unplaced = unplaced
        self.tcp = TcpFacts.of(m for m, _ in placed)
        self._by_event = {id(m.event): r for m, r in placed + unplaced}

    @property
    def matched(self) -> tuple[Matched, ...]:
        return tuple(m for m, _ in self._placed)

    def remote_of(self, m: Matched) -> RemoteEvent:
        return self._by_event[id(m.event)]

    def where(self, m: Matched) -> str:
        r = self.remote_of(m)
        ns = r.netns_name or f"netns {m.event.netns}"
        loc = f" at {m.event.location}" if m.event.location else ""
        return f"{loc} in {ns} on node {r.node}".lstrip()

    def watching(self) -> list[RemoteEvidence]:
        return [r for r in self.answered if r.watching]

    def nodes(self) -> str:
        return ", ".join(sorted({r.node for r in self.answered})) or "the peer"

    def unplaced_facts(self) -> list[str]:
        out = []
        for m, r in self.unplaced[:3]:
            out.append(f"node {r.node} saw {m.event.kind}{' (' + m.event.reason + ')' if m.event.reason else ''} of "
                       f"this flow, but its time is known only to ±{r.uncertainty_ns / 1e6:.0f} ms and cannot be "
                       "placed safely on this probe's timeline: not used to decide")
        return out


def remote_facts(ctx) -> RemoteFacts:
    """The context's remote facts (computed once per context)."""
    cached = ctx.__dict__.get("_remote_facts")
    if cached is None:
        cached = RemoteFacts(ctx.result, ctx.remote)
        object.__setattr__(ctx, "_remote_facts", cached)
    return cached


def unavailable_facts(remote: Iterable[RemoteEvidence]) -> list[str]:
    """One fact per peer that could not be asked: 'remote evidence unavailable (why)'."""
    return [f"remote evidence unavailable from {r.node} ({r.reason})" if r.node else
            f"remote evidence unavailable ({r.reason})" for r in remote if not r.available]


# -- the rules -----------------------------------------------------------------------------------------------


def remote_reset(ctx):
    """Refused, and this node did not see who sent the reset: node B's stack (no listener) or its firewall."""
    r = ctx.result
    if r.error not in (ErrorKind.CONNECT_REFUSED, ErrorKind.CONNECT_RESET) or ctx.tcp.resets_sent_no_socket:
        return None
    if not ctx.remote:
        return None
    rf = remote_facts(ctx)
    t = rf.tcp
    if t.resets_sent_no_socket:
        m = t.resets_sent_no_socket[0]
        return Finding(Cause.CONNECTION_REFUSED, "connection_refused/no_listener", 0.95,
                        t.resets_sent_no_socket + ctx.tcp.resets_received,
                        (f"node {rf.remote_of(m).node}'s TCP stack answered our SYN with a reset (NO_SOCKET) "
                         f"{rf.where(m)}: nothing listens on that port",
                         "the reset this node received came from the target's own stack, not a firewall"))
    blocked = tuple(m for m in t.syn_drops if reason_class(m.event.reason) in ("policy", "program"))
    if blocked and rf.watching():
        m = blocked[0]
        return Finding(Cause.POLICY_DROP, "policy_drop/reject", 0.9, blocked + ctx.tcp.resets_received,
                        (f"our SYN was dropped by {m.event.reason} {rf.where(m)}",
                         f"node {rf.remote_of(m).node}'s TCP stack sent no reset: a firewall rejected the connection"))
    return None


def remote_connect(ctx):
    """Connect timed out and nothing was dropped on this node: what the destination's node saw decides."""
    r, local = ctx.result, ctx.tcp
    if r.error not in (ErrorKind.CONNECT_TIMEOUT, ErrorKind.CONNECT_UNREACHABLE) or local.established:
        return None
    if local.syn_drops or local.synack_drops or not ctx.remote:
        return None
    rf = remote_facts(ctx)
    t = rf.tcp
    sent = 1 + len(local.syn_retransmits)
    decisive = tuple(m for m in t.syn_drops if reason_class(m.event.reason) in ("policy", "program", "loss"))
    if decisive:
        first = decisive[0]
        node = rf.remote_of(first).node
        facts = (f"{len(decisive)} of {sent} SYN(s) dropped by {first.event.reason} {rf.where(first)}",
                 f"this node saw our SYN(s) leave and no drop: the packet died on node {node}",
                 "the connection was never established")
        if reason_class(first.event.reason) == "loss":
            return Finding(Cause.TCP_RETRANSMIT, "tcp_retransmit/syn_lost", 0.6, decisive + local.syn_retransmits,
                            (*facts, "a queue dropped them: congestion rather than intent"))
        conf = 0.9 if reason_class(first.event.reason) == "policy" else 0.8
        if len(decisive) < sent:
            conf -= 0.15
        return Finding(Cause.POLICY_DROP, "policy_drop/syn", conf, decisive + local.syn_retransmits, facts)
    answers = tuple(m for m in t.drops if not m.outbound and "S" in (m.event.tcp_flags or "")
                    and reason_class(m.event.reason) in ("policy", "program", "loss"))
    if answers:
        first = answers[0]
        node = rf.remote_of(first).node
        facts = (f"our SYN arrived at node {node}; {len(answers)} SYN-ACK(s) answering it dropped by "
                 f"{first.event.reason} {rf.where(first)}: the answer died on node {node}'s way out",
                 "the connection was never established")
        if reason_class(first.event.reason) == "loss":
            return Finding(Cause.TCP_RETRANSMIT, "tcp_retransmit/syn_lost", 0.6, answers, facts)
        return Finding(Cause.POLICY_DROP, "policy_drop/syn", 0.85 if reason_class(first.event.reason) == "policy"
                        else 0.75, answers + local.syn_retransmits, facts)
    answered = tuple(m for m in rf.matched if m.event.kind == "synack_retransmit")
    if answered:
        node = rf.remote_of(answered[0]).node
        return Finding(Cause.UNKNOWN, "unknown/return_path", 0.6, answered + local.syn_retransmits,
                        (f"our SYN arrived at node {node}, which answered and resent its answer "
                         f"{len(answered)} time(s); neither node saw the answer dropped",
                         "the answer was lost between the nodes on its way back (the network in between)"))
    watching = rf.watching()
    if watching and not rf.matched and not rf.unplaced:
        nodes = ", ".join(sorted({w.node for w in watching}))
        return Finding(Cause.UNKNOWN, "unknown/between_nodes", 0.6, local.syn_retransmits,
                        (f"SYN sent {sent} time(s); this node saw none dropped, and node {nodes}, which "
                         "watches that port, saw none of them arrive",
                         "they were lost between the nodes (the network in between: a router, a cloud "
                         "firewall), or the destination is not on that node"))
    return None


def remote_stall(ctx):
    """An established flow ran out of time, nothing was dropped here: the destination's node dropped it."""
    r, local = ctx.result, ctx.tcp
    if r.error not in (ErrorKind.READ_TIMEOUT, ErrorKind.CONNECT_RESET) or not local.established:
        return None
    if local.decisive_drops() or not ctx.remote:
        return None
    rf = remote_facts(ctx)
    drops = tuple(m for m in rf.tcp.drops if reason_class(m.event.reason) in ("policy", "program"))
    if len(drops) < 2:
        return None
    first = drops[0]
    side = "our data" if first.outbound else "the answer"
    return Finding(Cause.POLICY_DROP, "policy_drop/established", 0.8 if reason_class(first.event.reason) == "policy"
                    else 0.7, drops + local.data_retransmits,
                    (f"after the handshake, {len(drops)} packet(s) of {side} were dropped by {first.event.reason} "
                     f"{rf.where(first)} ({CLASS_WORDS[reason_class(first.event.reason)]})",
                     "this node saw no drop: the flow died on the destination's node"))


def answer_drop_agreement(ctx) -> tuple[str, float] | None:
    """Local evidence decided that this node dropped the answers (SYN-ACKs) to our SYN on their way in. Whether
    the destination's node agrees — (the fact, the factor the confidence is multiplied by) — or None when it was
    not asked or its answer cannot be placed safely (then the facts already say why)."""
    answers = [m for m in ctx.tcp.synack_drops if reason_class(m.event.reason) in ("policy", "program", "loss")]
    if not answers or not ctx.remote:
        return None
    rf = remote_facts(ctx)
    if not rf.answered:
        return None
    t = rf.tcp
    if t.syn_drops:
        m = t.syn_drops[0]
        node = rf.remote_of(m).node
        return (f"node {node} contradicts this: it dropped our SYN ({m.event.reason} {rf.where(m)}), so no answer "
                "should have come back; the two nodes' evidence disagrees", CONTRADICTED_FACTOR)
    resent = [m for m in rf.matched if m.event.kind == "synack_retransmit"]
    if resent:
        node = rf.remote_of(resent[0]).node
        return (f"node {node} agrees: our SYN arrived there and its answer left (resent {len(resent)} time(s), "
                "never acknowledged)", 1.0)
    if t.resets_sent_no_socket:
        m = t.resets_sent_no_socket[0]
        return (f"node {rf.remote_of(m).node} contradicts this: its stack answered our SYN with a reset (NO_SOCKET) "
                f"{rf.where(m)}, not the SYN-ACK this node dropped; the two nodes' evidence disagrees",
                CONTRADICTED_FACTOR)
    watching = rf.watching()
    if watching and not rf.matched and not rf.unplaced:
        nodes = ", ".join(sorted({w.node for w in watching}))
        return (f"node {nodes} saw nothing unusual of this flow (its kernel reports an answer only when it resends "
                "it): it neither confirms nor contradicts", 1.0)
    return None  # node B saw something of the flow, but not its answer leaving: it neither agrees nor contradicts
