"""IndexedKernelWatch (the agent's per-port event store) hands the correlator exactly the events that
KernelWatch's time-window scan would have led it to join, for many interleaved probes."""

from __future__ import annotations

import itertools
import random
import time

from bpf.types import EventKind, KernelEvent
from connprobe.agent import IndexedKernelWatch
from connprobe.kernelwatch import KernelWatch
from correlator.join import join
from prober.types import DnsTransaction, Flow, ProbeKind, ProbeResult, Proto


class FakeSensor:
    lost_events = 0

    def __init__(self) -> None:
        self.watched: set[tuple[str, int]] = set()

    def watch(self, proto: str, port: int) -> None:
        self.watched.add((proto, port))

    def unwatch(self, proto: str, port: int) -> None:
        self.watched.discard((proto, port))

    def drain(self) -> list:
        return []


def _probes_and_events(rng: random.Random, now: int) -> tuple[list[ProbeResult], list[KernelEvent]]:
    results, events = [], []
    for i in range(200):
        start = now - rng.randrange(1, 5_000_000_000)
        end = start + rng.randrange(1_000_000, 800_000_000)
        port, dns_port = 30000 + i, 50000 + i
        flow = Flow(Proto.TCP, "10.0.0.2", port, "10.0.1.2", 8080, 7)
        dflow = Flow(Proto.UDP, "10.0.0.2", dns_port, "10.0.2.53", 53, 7)
        dns = (DnsTransaction("10.0.2.53", "srv.", "A", start, start + 1_000_000, "NOERROR", dflow),)
        results.append(ProbeResult(f"p{i}", ProbeKind.HTTP, "http://srv/", "client", start, end, True,
                                   flows=(flow,), dns=dns))
        for _ in range(rng.randrange(3, 12)):
            ts = start + rng.randrange(-900_000_000, end - start + 900_000_000)
            kind = rng.choice([EventKind.STATE, EventKind.RETRANSMIT, EventKind.DROP])
            if rng.random() < 0.5:  # client side, or the server's view (reversed tuple) in another namespace
                events.append(KernelEvent(ts, kind, "tcp", "10.0.0.2", port, "10.0.1.2", 8080, 7))
            else:
                events.append(KernelEvent(ts, kind, "tcp", "10.0.1.2", 8080, "10.0.0.2", port, 9))
        events.append(KernelEvent(start + 500_000, EventKind.STATE, "udp", "10.0.0.2", dns_port, "10.0.2.53", 53, 7))
    # arrival order = timestamp order with a little reordering between CPUs
    events.sort(key=lambda e: e.ts_ns + rng.randrange(0, 2_000_000))
    return results, events


async def test_indexed_evidence_joins_like_the_window_scan():
    rng = random.Random(6)
    now = time.monotonic_ns() - 10_000_000_000  # every probe's grace period is over: no waiting
    results, events = _probes_and_events(rng, now)
    plain, indexed = KernelWatch(FakeSensor()), IndexedKernelWatch(FakeSensor())
    for e in events:
        plain._add(e)
        indexed._add(e)
    assert indexed.events_seen == len(events)
    matched = 0
    for r in results:
        a, sa = await plain.collect(r)
        b, sb = await indexed.collect(r)
        assert sa == sb
        assert set(b) <= set(a) and len(b) == len(set(b))
        joined = [m.event for m in join(r, b)]
        assert joined == [m.event for m in join(r, a)], r.name
        matched += len(joined)
        assert all(x.ts_ns <= y.ts_ns for x, y in itertools.pairwise(b))
    assert matched > 500  # the comparison is not between two empty lists


def test_old_events_and_empty_ports_are_pruned():
    ev = IndexedKernelWatch(FakeSensor(), keep_ns=10_000_000_000)
    t0 = 1_000_000_000_000
    for i in range(100):
        ev._add(KernelEvent(t0 + i * 100_000_000, EventKind.STATE, "tcp", "a", 1000 + i, "b", 80, 1))
    late = t0 + 30_000_000_000
    ev._add(KernelEvent(late, EventKind.STATE, "tcp", "a", 5000, "b", 80, 1))
    assert set(ev._by_port) == {("tcp", 5000), ("tcp", 80)}
    assert list(ev._by_port[("tcp", 80)]) == [e for e in ev._by_port[("tcp", 5000)]]


async def test_a_collected_probes_events_are_kept_for_its_own_retention_only():
    """Once probe "short" was collected, its port's events live for its retention (here 2 s); an uncollected
    port's events for `keep_ns` (the longest probe's window, 60 s here)."""
    retention = {"short": 2_000_000_000}
    ev = IndexedKernelWatch(FakeSensor(), keep_ns=60_000_000_000, retention_ns=retention.get)
    t0 = time.monotonic_ns() - 30_000_000_000
    short = ProbeResult("short", ProbeKind.TCP, "srv:80", "host", t0, t0 + 1_000_000, False,
                        flows=(Flow(Proto.TCP, "10.0.0.2", 40001, "10.0.1.2", 80, 7),))
    ev._add(KernelEvent(t0 + 10, EventKind.RETRANSMIT, "tcp", "10.0.0.2", 40001, "10.0.1.2", 80, 7))
    ev._add(KernelEvent(t0 + 20, EventKind.RETRANSMIT, "tcp", "10.0.0.2", 40002, "10.0.1.2", 80, 7))  # in flight
    events, _ = await ev.collect(short)
    assert [e.sport for e in events] == [40001]
    # 5 s later (the next event drives the pruning): the collected port is gone, the other one stays
    ev._add(KernelEvent(t0 + 5_000_000_000, EventKind.STATE, "tcp", "10.0.0.2", 40003, "10.0.1.2", 80, 7))
    assert ("tcp", 40001) not in ev._by_port
    assert ("tcp", 40002) in ev._by_port
    # past keep_ns, the uncollected one goes too
    ev._add(KernelEvent(t0 + 61_000_000_000, EventKind.STATE, "tcp", "10.0.0.2", 40004, "10.0.1.2", 80, 7))
    assert ("tcp", 40002) not in ev._by_port
