"""The fault matrix (DESIGN.md) as data: each scenario is a fault, a target, a budget and the verdict it must
get. The end-to-end tests, the accuracy benchmark and the docs all run this one table through the same code
path as `connprobe diagnose --json`."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from connprobe.lab.topology import Lab

Fault = Callable[[Lab], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class Scenario:
    name: str
    expected: str  # cause
    expected_sub: str | None  # sub-cause (exact), None: not checked
    fault: Fault
    path: str = "/ok"
    host: str = "srv1.lab.test:8080"
    budget: str | None = None
    timeout: str = "3s"
    in_matrix: bool = True  # one of DESIGN.md's fault matrix rows (else an extra the issues ask for)

    def target(self) -> str:
        return f"http://{self.host}{self.path}"


def _none(lab: Lab) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def _both(*faults: Fault) -> Fault:
    def enter(lab: Lab) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        try:
            for f in faults:
                stack.enter_context(f(lab))
        except BaseException:
            stack.close()
            raise
        return stack

    return enter


LOSS: Fault = lambda lab: lab.packet_loss(0.1, link="client", direction="egress")  # noqa: E731
SLOW: Fault = lambda lab: lab.slow_upstream("srv1", 0.6)  # noqa: E731

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("healthy", "ok", None, _none, budget="300ms"),
    Scenario("dns_nxdomain", "dns", "dns/nxdomain", lambda lab: lab.dns_fault("srv1.lab.test", "nxdomain")),
    Scenario("dns_servfail", "dns", "dns/servfail", lambda lab: lab.dns_fault("srv1.lab.test", "servfail")),
    Scenario("dns_no_answer", "dns", "dns/timeout", lambda lab: lab.dns_fault("srv1.lab.test", "timeout")),
    Scenario("dns_slow", "dns", "dns/slow", lambda lab: lab.dns_fault("srv1.lab.test", "slow", 0.5),
             budget="300ms"),
    Scenario("syn_drop_server", "policy_drop", "policy_drop/syn",
             lambda lab: lab.policy_drop("srv1", direction="in", port=8080), timeout="2.5s"),
    Scenario("egress_drop_client", "policy_drop", "policy_drop/syn",
             lambda lab: lab.policy_drop("client", direction="out", port=8080), timeout="2.5s"),
    Scenario("path_loss", "tcp_retransmit", None, LOSS, path="/bytes/8000000", budget="10ms", timeout="15s"),
    Scenario("slow_upstream", "upstream_latency", "upstream_latency/processing", SLOW, budget="300ms"),
    Scenario("no_listener", "connection_refused", "connection_refused/no_listener",
             lambda lab: lab.no_listener("srv1")),
    Scenario("http_503", "http_error", "http_error/503", lambda lab: lab.http_status("srv1", 503)),
    # Extras (issue 5): told apart by the kernel evidence.
    Scenario("policy_reject", "policy_drop", "policy_drop/reject",
             lambda lab: lab.policy_drop("srv1", direction="in", port=8080, action="reject"), in_matrix=False),
    Scenario("established_drop", "policy_drop", "policy_drop/established",
             lambda lab: lab.policy_drop("srv1", direction="out", port=8080, port_side="src",
                                         expr="tcp flags & (syn | ack) == ack"), timeout="3s", in_matrix=False),
    Scenario("dns_policy_drop", "dns", "dns/policy_drop",
             lambda lab: lab.policy_drop("dns", direction="in", proto="udp", port=53), in_matrix=False),
    Scenario("loss_and_slow_upstream", "upstream_latency", "upstream_latency/processing",
             _both(lambda lab: lab.packet_loss(0.05, link="client", direction="egress"),
                   lambda lab: lab.slow_upstream("srv1", 1.5)),
             path="/bytes/200000", budget="300ms", timeout="10s", in_matrix=False),
    Scenario("vip_policy_drop", "policy_drop", "policy_drop/syn",
             lambda lab: lab.policy_drop("srv1", direction="in", port=8080), host="svc.lab.test",
             timeout="2.5s", in_matrix=False),
)


def diagnose_args(sc: Scenario, lab: Lab, family: int) -> argparse.Namespace:
    """The arguments `connprobe diagnose --json` would get for this scenario."""
    return argparse.Namespace(
        target=sc.target(), count=1, source=lab.ns("client").name, budget=sc.budget, timeout=sc.timeout,
        interval="0s", client="aiohttp", ip_policy=f"ipv{family}", qtype="A", no_kernel=False, json=True,
        record=None,
    )


async def run_scenario(lab: Lab, sc: Scenario, family: int, evidence) -> dict:
    """Run one trial and return its `diagnose --json` attempt document."""
    from connprobe.diagnose import build_spec, diagnose, exit_code, to_document

    args = diagnose_args(sc, lab, family)
    spec = build_spec(args)
    with sc.fault(lab):
        attempts = await diagnose(args, spec, evidence)
    doc = to_document(args, attempts, exit_code(attempts))
    return doc
