"""Small builders for probe results and kernel events shaped like the lab's (KERNEL-NOTES signatures).

Recorded lab fixtures (tests/correlator/recordings/) are the real thing; these builders make the corner
cases — lost events, no sensor, namespaces with equal tuples — that a lab run does not produce on demand.
"""

from __future__ import annotations

from bpf.types import EventKind, KernelEvent
from prober.types import DnsTransaction, ErrorKind, Flow, PhaseSpan, ProbeKind, ProbeResult, Proto

MS = 1_000_000
T0 = 10_000 * MS
CLIENT_NS, SERVER_NS, ROUTER_NS, OTHER_NS = 4026531001, 4026531002, 4026531003, 4026531999
CLIENT, SERVER, DNS = "10.77.1.2", "10.77.2.11", "10.77.2.53"
TCP_FLOW = Flow(Proto.TCP, CLIENT, 40000, SERVER, 8080, CLIENT_NS)
DNS_FLOW = Flow(Proto.UDP, CLIENT, 50000, DNS, 53, CLIENT_NS)


def result(ok: bool = True, error: ErrorKind | None = None, phases: dict[str, tuple[float, float]] | None = None,
           status: int | None = 200, dns_rcode: str | None = "NOERROR", flows=(TCP_FLOW,), detail: str = "",
           validators: tuple[str, ...] = ()) -> ProbeResult:
    phases = phases if phases is not None else {"resolve": (0, 1), "connect": (1, 2), "processing": (2, 5),
                                                 "transfer": (5, 6)}
    spans = tuple(PhaseSpan(n, T0 + int(a * MS), T0 + int(b * MS)) for n, (a, b) in phases.items())
    end = max((s.end_ns for s in spans), default=T0 + MS)
    dns_tx = (DnsTransaction(DNS, "srv1.lab.test.", "A", T0, T0 + MS if dns_rcode else None, dns_rcode, DNS_FLOW),)
    return ProbeResult("web", ProbeKind.HTTP, "http://srv1.lab.test:8080/ok", "cp-x-client", T0, end, ok, error,
                       detail, spans, status if ok or error == ErrorKind.HTTP_STATUS else None, SERVER,
                       tuple(flows), dns_tx, validators)


def ev(at_ms: float, kind: EventKind, *, reverse: bool = False, netns: int = CLIENT_NS, flow: Flow = TCP_FLOW,
       **kw) -> KernelEvent:
    f = flow.reversed() if reverse else flow
    return KernelEvent(T0 + int(at_ms * MS), kind, str(f.proto), f.local_addr, f.local_port, f.remote_addr,
                       f.remote_port, netns, **kw)


def syn_drop(at_ms: float, reason: str = "NETFILTER_DROP", netns: int = SERVER_NS) -> KernelEvent:
    return ev(at_ms, EventKind.DROP, netns=netns, reason=reason, tcp_flags="S", location="nf_hook_slow")


def syn_retransmit(at_ms: float) -> KernelEvent:
    return ev(at_ms, EventKind.RETRANSMIT, tcp_state="SYN_SENT")


def established(at_ms: float) -> KernelEvent:
    return ev(at_ms, EventKind.STATE, tcp_state="ESTABLISHED", old_state="SYN_SENT")
