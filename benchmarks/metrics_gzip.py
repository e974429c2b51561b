"""How much `Accept-Encoding: gzip` saves on `/metrics`: the exposition of N declared HTTP probes (each with its
five phase histograms observed once), plain and gzipped as the agent sends it (`connprobe.web._GzipPieces`).

    python -m benchmarks.metrics_gzip [N]     (default 1000)
"""

from __future__ import annotations

import sys
import time

import prometheus_client
from prometheus_client import CollectorRegistry

from connprobe.metrics import HTTP_PHASES, Metrics
from connprobe.web import _GzipPieces, exposition_chunks
from prober.types import ProbeKind


def main(n: int) -> None:
    prometheus_client.disable_created_metrics()  # as the agent does
    m = Metrics(CollectorRegistry())
    for i in range(n):
        name, target = f"probe-{i:05d}", f"http://srv{i}.example.internal:8080/healthz"
        m.declare(name, target, "host", kind=ProbeKind.HTTP, interval_s=10, labels=[("team", f"t{i % 7}")])
        for phase in HTTP_PHASES:
            m.phase_hist.labels(name, target, "host", phase).observe(0.001 * (i % 50))
    t = time.perf_counter()
    plain = b"".join(exposition_chunks(m.registry))
    t_plain = time.perf_counter() - t
    t = time.perf_counter()
    packed = b"".join(_GzipPieces(exposition_chunks(m.registry)))
    t_gzip = time.perf_counter() - t
    print(f"{n} probes: plain {len(plain) / 1e6:.1f} MB in {t_plain:.2f}s; gzip {len(packed) / 1e6:.2f} MB in "
          f"{t_gzip:.2f}s ({len(plain) / len(packed):.0f}x smaller)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
