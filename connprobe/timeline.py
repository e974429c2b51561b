"""One probe's story on one time axis: its phases, its DNS transactions and the kernel events that decided
its verdict, in ms from the probe's start. `connprobe diagnose` prints it; the status page shows it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from correlator.types import Verdict
from prober.types import Arrival


@dataclass(frozen=True)
class Row:
    offset_ms: float
    kind: str  # "phase", "dns", "kernel", "progress" or "end"
    text: str
    node: str | None = None  # for a kernel event another node's agent reported: that node (None: this node)


def rows(v: Verdict, names: dict[int, str]) -> list[Row]:
    r = v.result
    items: list[tuple[int, str, str, str | None]] = []
    for p in r.phases:
        items.append((p.start_ns, "phase", f"{p.name:<10} {p.duration_ns / 1e6:9.1f} ms", None))
    for tx in r.dns:
        took = f"{(tx.end_ns - tx.start_ns) / 1e6:.1f} ms" if tx.end_ns else "no answer"
        items.append((tx.start_ns, "dns", f"dns {tx.qtype} {tx.name} @{tx.server}: {tx.rcode or '-'} ({took})",
                      None))
    for p in shown_progress(r.progress):
        items.append((p.ts_ns, "progress", f"received {p.bytes:,} B of the answer", None))
    remote = {re.event: re for rem in v.remote for re in rem.events}
    for e in v.evidence:
        bits = [str(e.kind)]
        bits += [x for x in (e.reason, e.tcp_state, f"flags {e.tcp_flags}" if e.tcp_flags else None) if x]
        there = remote.get(e)
        ns = (there.netns_name or f"netns {e.netns}") if there else names.get(e.netns, f"netns {e.netns}")
        bits.append(f"{e.saddr}:{e.sport} → {e.daddr}:{e.dport} in {ns}")
        if e.location:
            bits.append(f"at {e.location}")
        if e.seq is not None:
            bits.append(f"seq {e.seq}" + (f" len {e.seq_len}" if e.seq_len is not None else ""))
        if e.snd_una is not None:
            bits.append(f"snd_una {e.snd_una}")
        if there:
            bits.append(f"(±{there.uncertainty_ns / 1e6:.1f} ms)")
        items.append((e.ts_ns, "kernel", " ".join(bits), there.node if there else None))
    items.sort(key=lambda x: x[0])
    out = [Row((ts - r.start_ns) / 1e6, kind, text, node) for ts, kind, text, node in items]
    outcome = "ok" if r.ok else (str(r.error) if r.error else "failed")
    if r.http_status:
        outcome += f", HTTP {r.http_status}"
    out.append(Row(r.duration_ns / 1e6, "end", f"end ({outcome}, {r.duration_ns / 1e6:.1f} ms)"))
    return out


SHOWN_PROGRESS = 8


def shown_progress(points: tuple[Arrival, ...]) -> tuple[Arrival, ...]:
    """At most SHOWN_PROGRESS of a result's progress points for a reader, evenly chosen, the last always."""
    if len(points) <= SHOWN_PROGRESS:
        return points
    step = (len(points) - 1) / (SHOWN_PROGRESS - 1)
    return tuple(points[round(i * step)] for i in range(SHOWN_PROGRESS))


def name_namespaces(text: str, names: dict[int, str]) -> str:
    """`netns 4026532481` → `cp-1a2b3c-srv1` where the inode has a name."""
    return re.sub(r"netns (\d+)", lambda m: names.get(int(m.group(1)), m.group(0)), text)
