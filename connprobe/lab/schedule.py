"""The lab's fault schedule: every fault the fault matrix (`connprobe/lab/scenarios.py`) and the demo
(`connprobe demo`) switch on, each once, by name, with one line saying what it does; and the order in which the
demo walks them (`DEMO`), with the cause each demo probe should get in each phase.

A fault is a function of a lab returning a context manager (on at `with`, undone on exit: `connprobe/lab/faults.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from connprobe.lab.topology import Lab

Switch = Callable[[Lab], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class Fault:
    """A named fault: `fault(lab)` switches it on for the length of a `with` block."""

    name: str
    what: str  # one line, as the demo prints it
    switch: Switch = field(repr=False)

    def __call__(self, lab: Lab) -> contextlib.AbstractContextManager:
        return self.switch(lab)


class _Faults(contextlib.ExitStack):
    """Several faults at once; bites() adds up what each could count."""

    def __init__(self) -> None:
        super().__init__()
        self.faults: list = []

    def bites(self) -> int | None:
        counts = [n for n in (getattr(f, "bites", lambda: None)() for f in self.faults) if n is not None]
        return sum(counts) if counts else None


def both(name: str, what: str, *faults: Fault) -> Fault:
    """Several faults on at once, as one."""

    def enter(lab: Lab) -> _Faults:
        stack = _Faults()
        try:
            for f in faults:
                stack.faults.append(stack.enter_context(f(lab)))
        except BaseException:
            stack.close()
            raise
        return stack

    return Fault(name, what, enter)


def _loss(percent: int, direction: str, name: str, note: str = "") -> Fault:
    """Random loss of `percent` % on the client's link (cls_bpf)."""
    return Fault(name, f"{percent}% random loss on the client's link{note}",
                 lambda lab: lab.packet_loss(percent / 100, link="client", direction=direction))


NO_FAULT = Fault("none", "no fault", lambda lab: contextlib.nullcontext())

_FAULTS = (
    NO_FAULT,
    Fault("dns_nxdomain", "the lab DNS answers NXDOMAIN for srv1.lab.test",
          lambda lab: lab.dns_fault("srv1.lab.test", "nxdomain")),
    Fault("dns_servfail", "the lab DNS answers SERVFAIL for srv1.lab.test",
          lambda lab: lab.dns_fault("srv1.lab.test", "servfail")),
    Fault("dns_no_answer", "the lab DNS does not answer for srv1.lab.test",
          lambda lab: lab.dns_fault("srv1.lab.test", "timeout")),
    Fault("dns_slow", "the lab DNS answers for srv1.lab.test after 0.5 s",
          lambda lab: lab.dns_fault("srv1.lab.test", "slow", 0.5)),
    Fault("srv1_drops_tcp_8080", "nftables in srv1 drops tcp/8080",
          lambda lab: lab.policy_drop("srv1", direction="in", port=8080)),
    Fault("srv1_rejects_tcp_8080", "nftables in srv1 rejects tcp/8080",
          lambda lab: lab.policy_drop("srv1", direction="in", port=8080, action="reject")),
    Fault("client_drops_out_tcp_8080", "nftables in the client drops its outgoing tcp/8080",
          lambda lab: lab.policy_drop("client", direction="out", port=8080)),
    Fault("srv1_drops_established", "nftables in srv1 drops its answers that carry only an ACK",
          lambda lab: lab.policy_drop("srv1", direction="out", port=8080, port_side="src",
                                      expr="tcp flags & (syn | ack) == ack")),
    # A policy that starts in the middle of a transfer: srv1's answers pass until 4 MB went, then every packet
    # of them is dropped (an nftables quota, so the moment is set by bytes, not by a timer racing the probe).
    Fault("srv1_drops_after_4mb", "nftables in srv1 drops its answers once 4 MB went",
          lambda lab: lab.policy_drop("srv1", direction="out", port=8080, port_side="src",
                                      expr="quota over 4 mbytes")),
    Fault("dns_drops_udp_53", "nftables in the DNS server drops udp/53",
          lambda lab: lab.policy_drop("dns", direction="in", proto="udp", port=53)),
    _loss(1, "both", "loss_1", ", both ways"),
    _loss(5, "egress", "loss_5"),
    _loss(10, "egress", "loss_10"),
    _loss(20, "egress", "loss_20"),
    _loss(20, "both", "loss_20_both", ", both ways (cls_bpf)"),
    Fault("nft_loss_15_both", "15% random loss on the client's link, both ways (nftables)",
          lambda lab: lab.random_drop(0.15, link="client", direction="both")),
    Fault("srv1_slow", "srv1 answers after 0.6 s", lambda lab: lab.slow_upstream("srv1", 0.6)),
    Fault("srv1_slower", "srv1 answers after 1.5 s", lambda lab: lab.slow_upstream("srv1", 1.5)),
    Fault("srv1_no_listener", "srv1 closes port 8080", lambda lab: lab.no_listener("srv1")),
    Fault("srv2_no_listener", "srv2 closes port 8080", lambda lab: lab.no_listener("srv2")),
    Fault("srv1_503", "srv1 answers 503", lambda lab: lab.http_status("srv1", 503)),
    Fault("srv2_503", "srv2 answers 503", lambda lab: lab.http_status("srv2", 503)),
)
FAULTS: dict[str, Fault] = {f.name: f for f in _FAULTS}
FAULTS["loss_5_and_srv1_slower"] = both("loss_5_and_srv1_slower", "5% loss on the client's link and srv1 "
                                        "answers after 1.5 s", FAULTS["loss_5"], FAULTS["srv1_slower"])


@dataclass(frozen=True)
class Phase:
    """One phase of the demo: a fault on for a while, and the cause each probe should get meanwhile."""

    name: str
    fault: Fault
    expect: dict[str, str] = field(default_factory=dict)  # probe → the cause it should get in this phase


DEMO: tuple[Phase, ...] = (
    Phase("healthy", NO_FAULT, {"web": "ok", "svc": "ok", "bulk": "ok", "tcp": "ok", "dns": "ok"}),
    Phase("dns nxdomain", FAULTS["dns_nxdomain"], {"web": "dns", "dns": "dns"}),
    Phase("policy drop", FAULTS["srv1_drops_tcp_8080"], {"web": "policy_drop", "svc": "policy_drop"}),
    Phase("packet loss", FAULTS["loss_20"], {"bulk": "tcp_retransmit"}),
    Phase("slow upstream", FAULTS["srv1_slow"], {"web": "upstream_latency", "svc": "upstream_latency"}),
    Phase("no listener", FAULTS["srv2_no_listener"], {"bulk": "connection_refused", "tcp": "connection_refused"}),
    Phase("http 503", FAULTS["srv2_503"], {"bulk": "http_error"}),
)
