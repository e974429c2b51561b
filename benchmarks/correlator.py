"""Correlator speed: verdicts per second of the pure correlator on the recorded lab fixtures, and the latency
from a probe's end to its verdict in the lab (the grace period for late kernel events plus the work).

    .venv/bin/python benchmarks/correlator.py [--seconds 3] [--lab-trials 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from correlator import EventIndex, correlate  # noqa: E402
from correlator.record import load  # noqa: E402

RECORDINGS = ROOT / "tests" / "correlator" / "recordings"


def pure_rate(seconds: float) -> None:
    recs = [load(p) for p in sorted(RECORDINGS.glob("*.json"))]
    if not recs:
        print(f"no recordings in {RECORDINGS}")
        return
    events = sum(len(r.events) for r in recs)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for r in recs:
            correlate(r.result, r.events, budget_ns=r.budget_ns, coverage=r.coverage)
        n += len(recs)
    dt = time.perf_counter() - t0
    print(f"pure correlator: {len(recs)} recordings ({events} events, {events / len(recs):.1f} per probe), "
          f"{n / dt:,.0f} verdicts/s, {dt / n * 1e6:.1f} µs per verdict")
    # Same probes drowned in unrelated node traffic: 10,000 foreign events in each window. Scanned as a list,
    # then through an EventIndex built once per window (as the agent builds it: each event added once, on
    # arrival; the build's cost is printed per event).
    from dataclasses import replace

    noise: list = []
    for r in recs:
        if r.events:
            base = r.events[0]
            noise = [replace(base, sport=20000 + i % 40000, saddr="10.99.0.1", ts_ns=r.result.start_ns + i)
                     for i in range(10_000)]
            break
    windows = [[*r.events, *noise] for r in recs]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for r, w in zip(recs, windows, strict=True):
            correlate(r.result, w, budget_ns=r.budget_ns, coverage=r.coverage)
        n += len(recs)
    dt = time.perf_counter() - t0
    print(f"with 10,000 unrelated events per window, list scan: {n / dt:,.0f} verdicts/s, "
          f"{dt / n * 1e3:.2f} ms per verdict")
    t0 = time.perf_counter()
    indexes = [EventIndex(w) for w in windows]
    build = (time.perf_counter() - t0) / sum(len(w) for w in windows)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for r, ix in zip(recs, indexes, strict=True):
            correlate(r.result, ix, budget_ns=r.budget_ns, coverage=r.coverage)
        n += len(recs)
    dt = time.perf_counter() - t0
    print(f"with 10,000 unrelated events per window, EventIndex: {n / dt:,.0f} verdicts/s, "
          f"{dt / n * 1e6:.1f} µs per verdict (index built once per window: {build * 1e6:.2f} µs per event added)")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def lab_latency(trials: int) -> None:
    """From a probe's end to its verdict, for healthy probes and for failed ones (HTTP 503, a refused
    connect, a connect whose SYNs a policy drops, a transfer a policy stops in the middle)."""
    from connprobe.lab import Lab
    from connprobe.sensorload import close_watch, open_watch
    from correlator.join import GRACE_NS
    from prober import ProbeEnv, run_probe
    from prober.spec import ModuleSpec, ProbeSpec

    with Lab() as lab:
        ev = await open_watch()
        if not ev.available:
            print(f"lab latency skipped: {ev.unavailable_reason}")
            return
        src = f"netns {lab.ns('client').name}"
        url = lab.server("srv1").url

        def spec(path: str, timeout: float) -> ProbeSpec:
            return ProbeSpec(name="bench", module=ModuleSpec(prober="http", timeout=timeout), target=url(path),
                             source=src, interval=5)

        kinds = [
            ("healthy", spec("/ok", 3), lambda: contextlib.nullcontext()),
            ("http 503", spec("/ok", 3), lambda: lab.http_status("srv1", 503)),
            ("refused", spec("/ok", 3), lambda: lab.no_listener("srv1")),
            ("syn dropped", spec("/ok", 1), lambda: lab.policy_drop("srv1", direction="in", port=8080)),
            ("wall mid-transfer", spec("/bytes/40000000", 1),
             lambda: lab.policy_drop("srv1", direction="out", port=8080, port_side="src",
                                     expr="quota over 4 mbytes")),
        ]
        async with ProbeEnv(on_local_port=ev.on_local_port) as env:
            for name, sp, fault in kinds:
                total, work = [], []
                for _ in range(trials):
                    with fault():
                        (result,) = await run_probe(sp, env)
                        events, status = await ev.collect(result)
                        t_collected = time.monotonic_ns()
                        correlate(result, events, coverage=status)
                        t_done = time.monotonic_ns()
                    # (stamped before the fault is taken away: removing an nftables table takes tens of ms)
                    total.append((t_done - result.end_ns) / 1e6)
                    work.append((t_done - t_collected) / 1e6)
                print(f"lab, {trials} probes, {name:<18}: verdict p50 {_pct(total, 0.5):6.1f} ms, p99 "
                      f"{_pct(total, 0.99):6.1f} ms after the probe ended; correlation itself "
                      f"{statistics.median(work) * 1000:.0f} µs")
        await close_watch(ev)
    print(f"(grace period for late kernel events when a probe's window is not seen complete: {GRACE_NS / 1e6:.0f} ms)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--lab-trials", type=int, default=20)
    args = p.parse_args()
    pure_rate(args.seconds)
    if args.lab_trials:
        asyncio.run(lab_latency(args.lab_trials))


if __name__ == "__main__":
    main()
