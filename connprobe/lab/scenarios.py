"""The fault matrix as data: each scenario is a fault, a target, a budget and the verdict it must get. The
end-to-end tests, the accuracy benchmark and the docs all run this one table through the same code path as
`connprobe diagnose --json` (`connprobe.diagnosis`).

Each trial first checks that its fault produced its symptom — the injector acted on packets (where it can
count them) and the probe failed, timed out or went over budget as the scenario says — before its verdict
is judged: a fault that did not bite is a lab error (`Trial.lab_error`), not a wrong verdict."""

from __future__ import annotations

from dataclasses import dataclass

from connprobe.causes import CAUSES
from connprobe.diagnosis import diagnose, exit_code, target_spec, to_document
from connprobe.kernelwatch import KernelWatch
from connprobe.lab.schedule import FAULTS, NO_FAULT, Fault
from connprobe.lab.topology import Lab
from correlator.record import Recording, dumps
from prober import ProbeEnv, ProbeSpec, run_probe
from prober.spec import parse_duration


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
    in_matrix: bool = True  # one of the original fault matrix rows (else an extra scenario)
    # What the fault must visibly do to the probe before its verdict is judged: "transfer_timeout" (a
    # transfer that had run for a while ran out of time), "failed_or_slow" (not ok within budget), "none";
    # "" picks by `expected`.
    symptom: str = ""
    # The least confidence its recording must get (tests/correlator/test_recordings.py).
    min_confidence: float = 0.7

    def expected_symptom(self) -> str:
        return self.symptom or ("none" if self.expected == "ok" else "failed_or_slow")

    def target(self) -> str:
        return f"http://{self.host}{self.path}"


BIG = "/bytes/400000000"  # more than any loss scenario's timeout lets through: the transfer runs out of time

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("healthy", "ok", None, NO_FAULT, budget="300ms"),
    Scenario("dns_nxdomain", "dns", "dns/nxdomain", FAULTS["dns_nxdomain"]),
    Scenario("dns_servfail", "dns", "dns/servfail", FAULTS["dns_servfail"]),
    Scenario("dns_no_answer", "dns", "dns/timeout", FAULTS["dns_no_answer"]),
    Scenario("dns_slow", "dns", "dns/slow", FAULTS["dns_slow"], budget="300ms"),
    Scenario("syn_drop_server", "policy_drop", "policy_drop/syn", FAULTS["srv1_drops_tcp_8080"], timeout="2.5s"),
    Scenario("egress_drop_client", "policy_drop", "policy_drop/syn",
             FAULTS["client_drops_out_tcp_8080"], timeout="2.5s"),
    Scenario("path_loss", "tcp_retransmit", None, FAULTS["loss_10"], path="/bytes/8000000", budget="10ms",
             timeout="15s"),
    Scenario("slow_upstream", "upstream_latency", "upstream_latency/processing", FAULTS["srv1_slow"], budget="300ms"),
    Scenario("no_listener", "connection_refused", "connection_refused/no_listener",
             FAULTS["srv1_no_listener"]),
    Scenario("http_503", "http_error", "http_error/503", FAULTS["srv1_503"]),
    # Extras: told apart by the kernel evidence.
    Scenario("policy_reject", "policy_drop", "policy_drop/reject",
             FAULTS["srv1_rejects_tcp_8080"], in_matrix=False),
    Scenario("established_drop", "policy_drop", "policy_drop/established",
             FAULTS["srv1_drops_established"], timeout="3s", in_matrix=False,
             min_confidence=0.7),
    Scenario("dns_policy_drop", "dns", "dns/policy_drop",
             FAULTS["dns_drops_udp_53"], in_matrix=False),
    Scenario("loss_and_slow_upstream", "upstream_latency", "upstream_latency/processing",
             FAULTS["loss_5_and_srv1_slower"],
             path="/bytes/200000", budget="300ms", timeout="10s", in_matrix=False),
    Scenario("vip_policy_drop", "policy_drop", "policy_drop/syn",
             FAULTS["srv1_drops_tcp_8080"], host="svc.lab.test",
             timeout="2.5s", in_matrix=False),
    # Loss and policy told apart by what got through (correlator/progress.py). Heavy random loss on a transfer that runs
    # out of time is loss whichever dropper makes it (NETFILTER_DROP is a policy's reason too); a wall
    # after progress is a policy; light loss within budget is fine; loss on a slow answer explains little.
    # (Heavy loss sometimes takes the SYNs or the first byte until little time is left: such a trial is a
    # lab error, run again.)
    Scenario("heavy_loss_timeout_tc", "tcp_retransmit", None,
             FAULTS["loss_20_both"],
             path=BIG, budget="100ms", timeout="3s", in_matrix=False, symptom="transfer_timeout",
             # such a transfer often ends in a stall that a policy which just began would leave too
             min_confidence=0.6),
    Scenario("heavy_loss_timeout_nft", "tcp_retransmit", None,
             FAULTS["nft_loss_15_both"],
             path=BIG, budget="100ms", timeout="3s", in_matrix=False, symptom="transfer_timeout", min_confidence=0.6),
    Scenario("policy_mid_transfer", "policy_drop", "policy_drop/established", FAULTS["srv1_drops_after_4mb"],
             path="/bytes/40000000", timeout="3s", in_matrix=False, symptom="transfer_timeout", min_confidence=0.7),
    Scenario("light_loss_ok", "ok", None, FAULTS["loss_1"],
             path="/bytes/4000000", budget="5s", timeout="10s", in_matrix=False),
)


TRANSFER_MIN_MS = 1000  # heavy loss can delay the connect or the first byte until little time is left


@dataclass(frozen=True)
class Trial:
    doc: dict  # the `diagnose --json` document
    lab_error: str | None  # set when the fault did not produce its symptom: the verdict says nothing then


def symptom_missing(sc: Scenario, attempt: dict, bites: int | None, budget_ms: float | None) -> str | None:
    """Why this trial's fault did not show, or None when it did."""
    if bites is not None and bites == 0 and sc.fault is not NO_FAULT:
        return f"{sc.name}: the fault acted on no packet"
    want = sc.expected_symptom()
    ok_in_budget = attempt["ok"] and (budget_ms is None or attempt["duration_ms"] <= budget_ms)
    if want == "transfer_timeout":
        transfer = sum(p["duration_ms"] for p in attempt["phases"] if p["name"] == "transfer")
        if attempt["error"] != "read_timeout" or transfer < TRANSFER_MIN_MS:
            return (f"{sc.name}: no transfer ran for {TRANSFER_MIN_MS} ms and then out of time (error "
                    f"{attempt['error']}, transfer {transfer:.0f} ms of {attempt['duration_ms']:.0f} ms)")
    if want == "failed_or_slow" and ok_in_budget:
        return f"{sc.name}: the probe succeeded within budget ({attempt['duration_ms']:.1f} ms)"
    return None



def scenario_spec(sc: Scenario, lab: Lab, family: int) -> ProbeSpec:
    """The probe `connprobe diagnose --json` would run for this scenario (from the lab's client)."""
    return target_spec(sc.target(), source=lab.ns("client").name, timeout=parse_duration(sc.timeout),
                       ip_policy=f"ipv{family}")


def scenario_budget(sc: Scenario) -> float | None:
    return parse_duration(sc.budget) if sc.budget else None


async def run_scenario(lab: Lab, sc: Scenario, family: int, watch: KernelWatch) -> Trial:
    """Run one trial: its `diagnose --json` document, and whether the fault produced its symptom."""
    spec = scenario_spec(sc, lab, family)
    budget = scenario_budget(sc)
    with sc.fault(lab) as fault:
        attempts = await diagnose(spec, watch, budget=budget)
        bites = getattr(fault, "bites", lambda: None)()
    doc = to_document(sc.target(), lab.ns("client").name, budget, attempts, exit_code(attempts))
    return Trial(doc, symptom_missing(sc, doc["attempts"][0], bites, doc["budget_ms"]))


async def record_scenario(lab: Lab, sc: Scenario, family: int, watch: KernelWatch) -> Recording:
    """One trial as a Recording: the probe result, every kernel event of its window, the kernel coverage."""
    spec = scenario_spec(sc, lab, family)
    budget = scenario_budget(sc)
    budget_ns = int(budget * 1e9) if budget else None
    with sc.fault(lab):
        async with ProbeEnv(on_local_port=watch.on_local_port) as env:
            (result,) = await run_probe(spec, env)
    events, status = await watch.collect(result)
    return Recording(f"{sc.name} (IPv{family})", result, tuple(events), status, budget_ns, sc.expected,
                     note=f"recorded in the lab by `python -m connprobe.lab.scenarios record`; expected sub-cause "
                          f"{sc.expected_sub}")


async def _main(argv: list[str]) -> int:
    import sys
    from collections import Counter

    from connprobe.lab.runargs import parse_run_args
    from connprobe.sensorload import close_watch, open_watch

    args = parse_run_args(argv, "connprobe.lab.scenarios")
    if args is None:
        return 2
    with Lab() as lab:
        watch = await open_watch()
        if not watch.available:
            print(f"kernel sensor unavailable: {watch.unavailable_reason}", file=sys.stderr)
            return 2
        try:
            if args.mode == "record":
                out = args.record_dir()
                for sc in args.selected(SCENARIOS):
                    rec = await record_scenario(lab, sc, 4, watch)
                    (out / f"{sc.name}.json").write_text(dumps(rec) + "\n")
                    print(f"recorded {sc.name}: {len(rec.events)} events")
                return 0
            trials = int(args.arg)
            confusion: Counter[tuple[str, str]] = Counter()
            lab_errors: Counter[str] = Counter()
            scenarios = args.selected(SCENARIOS)
            for sc in scenarios:
                for family in (4, 6):
                    for _ in range(trials):
                        trial = await run_scenario(lab, sc, family, watch)
                        if trial.lab_error:
                            lab_errors[sc.name] += 1
                            print(f"lab error: {trial.lab_error}", file=sys.stderr)
                            continue
                        confusion[(sc.name, trial.doc["attempts"][0]["verdict"]["cause"])] += 1
            causes = [str(c) for c in CAUSES]
            print(f"| scenario (expected) | {' | '.join(causes)} |")
            print("|---|" + "---|" * len(causes))
            for sc in scenarios:
                cells = []
                for c in causes:
                    n = confusion[(sc.name, c)]
                    mark = c == sc.expected
                    cells.append((f"**{n}**" if mark else str(n)) if n else ("0" if mark else ""))
                print(f"| {sc.name} ({sc.expected}) | {' | '.join(cells)} |")
            right = sum(n for (name, c), n in confusion.items() if c == next(s.expected for s in SCENARIOS
                                                                              if s.name == name))
            print(f"\n{right}/{sum(confusion.values())} verdicts on the diagonal ({trials} trials x IPv4+IPv6 each)")
            if lab_errors:
                print(f"lab errors (fault did not bite, trial not judged): {dict(lab_errors)}")
            return 0
        finally:
            await close_watch(watch)


if __name__ == "__main__":
    import asyncio
    import sys

    sys.exit(asyncio.run(_main(sys.argv[1:])))
