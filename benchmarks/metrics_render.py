"""Time of one `/metrics` render at N HTTP probes, each with one verdict observed (five phases, one DNS query):
the agent's writer (`connprobe.web.exposition_chunks`), as a scrape runs it. With `--phase-histograms all`
every probe exports its five phase histograms (the exposition before they became opt-in); with `none` (the
default of a module) only the duration histogram.

    .venv/bin/python benchmarks/metrics_render.py [--probes 1000] [--renders 7] [--phase-histograms all|none]
"""

from __future__ import annotations

import argparse
import gc
import inspect
import statistics
import sys
import time
from pathlib import Path

ROOT = Path.cwd()
sys.path.insert(0, str(ROOT))

import prometheus_client  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from connprobe.metrics import HTTP_PHASES, Metrics  # noqa: E402
from connprobe.web import exposition_chunks  # noqa: E402
from correlator.types import Cause, Verdict  # noqa: E402
from prober.types import DnsTransaction, PhaseSpan, ProbeKind, ProbeResult  # noqa: E402

MS = 1_000_000


def verdict(name: str, target: str, i: int) -> Verdict:
    t0 = 10_000 * MS + i
    spans = tuple(PhaseSpan(p, t0 + k * MS + i % 7, t0 + (k + 1) * MS + i % 13) for k, p in enumerate(HTTP_PHASES))
    dns = (DnsTransaction("10.0.0.53", "srv.example.", "A", t0, t0 + MS, "NOERROR", None),)
    r = ProbeResult(name, ProbeKind.HTTP, target, "host", t0, spans[-1].end_ns, True, None, "", spans, 200,
                    "10.0.0.1", (), dns, ())
    return Verdict(r, Cause.OK, None, 1.0, "healthy", (), ("succeeded",), f"{name}: ok")


def build(n: int, phases: str) -> Metrics:
    prometheus_client.disable_created_metrics()  # as the agent does
    m = Metrics(CollectorRegistry(), clock=lambda: 1_790_000_000.0)
    opt_in = "phase_histograms" in inspect.signature(m.declare).parameters
    for i in range(n):
        name, target = f"probe-{i:05d}", f"http://srv{i}.example.internal:8080/healthz"
        kw = {"phase_histograms": HTTP_PHASES if phases == "all" else ()} if opt_in else {}
        m.declare(name, target, "host", kind=ProbeKind.HTTP, interval_s=10, labels=[("team", f"t{i % 7}")], **kw)
        m.observe(verdict(name, target, i))
    return m


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--probes", type=int, default=1000)
    p.add_argument("--renders", type=int, default=7)
    p.add_argument("--phase-histograms", choices=("all", "none"), default="all")
    args = p.parse_args()
    m = build(args.probes, args.phase_histograms)
    times, cpu = [], []
    text = b""
    for _ in range(args.renders):
        gc.disable()  # as the agent's off-loop render does
        t, c = time.perf_counter(), time.process_time()
        text = b"".join(exposition_chunks(m.registry))
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        gc.enable()
    lines = text.count(b"\n")
    print(f"{args.probes} probes, phase histograms {args.phase_histograms}: {lines:,} lines, "
          f"{len(text) / 1e6:.1f} MB; render median {statistics.median(times) * 1e3:.0f} ms wall, "
          f"{statistics.median(cpu) * 1e3:.0f} ms CPU (min {min(cpu) * 1e3:.0f} ms); "
          f"{lines / args.probes:.1f} lines per probe")


if __name__ == "__main__":
    main()
