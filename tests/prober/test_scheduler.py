"""Scheduler: no overlap, global cap, jitter spreads starts, suspect on a starved loop, clean shutdown."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import pytest

from prober import ProbeEnv, ProbeResult, Scheduler, run_probe
from prober.types import ProbeKind
from tests.prober.helpers import spec


def _result(s, start: int) -> ProbeResult:
    return ProbeResult(s.name, ProbeKind.TCP, s.target, "host", start, time.monotonic_ns(), True)


class Recorder:
    """A run function that records concurrency per probe and globally."""

    def __init__(self, duration: float, block: float = 0.0):
        self.duration = duration
        self.block = block
        self.running: dict[str, int] = {}
        self.max_per_probe = 0
        self.total = 0
        self.max_total = 0
        self.starts: dict[str, list[float]] = {}

    async def __call__(self, s, env):
        start = time.monotonic_ns()
        self.starts.setdefault(s.name, []).append(time.monotonic())
        self.running[s.name] = self.running.get(s.name, 0) + 1
        self.total += 1
        self.max_per_probe = max(self.max_per_probe, self.running[s.name])
        self.max_total = max(self.max_total, self.total)
        try:
            if self.block:
                time.sleep(self.block)  # starve the loop, as a CPU-bound neighbour would
            await asyncio.sleep(self.duration)
        finally:
            self.running[s.name] -= 1
            self.total -= 1
        return (_result(s, start),)


def _probes(n: int, interval: float, jitter: float = 0.0):
    return [spec(f"127.0.0.1:{1000 + i}", prober="tcp", name=f"p{i}", timeout=interval).model_copy(
        update={"interval": interval, "jitter": jitter}) for i in range(n)]


async def test_no_overlap_when_a_run_outlasts_its_interval():
    rec = Recorder(duration=0.25)
    sched = Scheduler(_probes(1, 0.1), run=rec, rng=random.Random(1))
    async with sched:
        await asyncio.sleep(0.9)
    assert rec.max_per_probe == 1
    assert sched.stats.skipped_ticks >= 2
    starts = rec.starts["p0"]
    assert all(b - a >= 0.25 for a, b in itertools.pairwise(starts))


async def test_global_cap_is_respected():
    rec = Recorder(duration=0.1)
    sched = Scheduler(_probes(20, 0.1), run=rec, concurrency=3)
    async with sched:
        await asyncio.sleep(0.6)
    assert rec.max_total == 3
    assert sched.stats.runs >= 10


async def test_jitter_and_start_offset_spread_starts():
    rec = Recorder(duration=0.0)
    sched = Scheduler(_probes(30, 0.5, jitter=0.2), run=rec, rng=random.Random(7))
    async with sched:
        await asyncio.sleep(0.52)
    firsts = sorted(s[0] for s in rec.starts.values())
    assert len(firsts) == 30
    assert firsts[-1] - firsts[0] > 0.3  # spread over the interval, not a thundering herd
    gaps = [b - a for a, b in itertools.pairwise(firsts)]
    assert max(gaps) < 0.2


def _groups(times: list[float], gap: float = 0.02) -> int:
    """How many bursts the start times form (starts closer than `gap` are one burst)."""
    times = sorted(times)
    return 1 + sum(1 for a, b in itertools.pairwise(times) if b - a > gap)


async def test_starts_due_within_a_slot_share_one_wakeup():
    rec = Recorder(duration=0.0)
    async with Scheduler(_probes(40, 1.0), run=rec, slot=0.25, rng=random.Random(5)):
        await asyncio.sleep(1.05)
    firsts = [s[0] for s in rec.starts.values()]
    assert len(firsts) == 40
    assert _groups(firsts) <= 5  # ~1 s of offsets / 0.25 s slots (+1 for the slot boundary)
    # the next run is planned from the nominal due time: a probe's period stays its interval
    seconds = [s[1] - s[0] for s in rec.starts.values() if len(s) > 1]
    assert seconds and all(0.7 < d < 1.3 for d in seconds)

    rec = Recorder(duration=0.0)
    async with Scheduler(_probes(40, 1.0), run=rec, slot=0.0, rng=random.Random(5)):
        await asyncio.sleep(1.0)
    assert _groups([s[0] for s in rec.starts.values()], gap=0.001) > 20  # without a slot: one wake-up each


def test_negative_slot_rejected():
    with pytest.raises(ValueError, match="slot must not be negative"):
        Scheduler([], slot=-0.1)


async def test_results_flow_through_the_queue_and_starved_runs_are_suspect():
    rec = Recorder(duration=0.01, block=0.5)
    sched = Scheduler(_probes(1, 1.0), run=rec, lag_interval=0.02, lag_threshold=0.25, rng=random.Random(3))
    async with sched:
        r = await asyncio.wait_for(sched.results.get(), 2)
    assert r.name == "p0" and r.suspect
    assert sched.stats.max_lag_s >= 0.4 and sched.stats.suspect_results >= 1

    calm = Recorder(duration=0.01)
    sched = Scheduler(_probes(1, 0.3), run=calm, lag_interval=0.02, lag_threshold=0.25)
    async with sched:
        r = await asyncio.wait_for(sched.results.get(), 2)
    assert not r.suspect


async def test_shutdown_waits_for_running_probes_and_leaves_no_task():
    rec = Recorder(duration=0.2)
    before = asyncio.all_tasks()
    sched = Scheduler(_probes(5, 0.05), run=rec)
    await sched.start()
    await asyncio.sleep(0.1)
    assert rec.total > 0
    await sched.stop(grace=1.0)
    assert rec.total == 0
    assert asyncio.all_tasks() == before
    delivered = sched.results.qsize()
    assert delivered >= 1  # the runs in flight at stop() still delivered their results


async def test_shutdown_cancels_runs_past_the_grace():
    rec = Recorder(duration=5.0)
    before = asyncio.all_tasks()
    sched = Scheduler(_probes(2, 0.05), run=rec)
    await sched.start()
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    await sched.stop(grace=0.1)
    assert time.monotonic() - t0 < 0.5
    assert asyncio.all_tasks() == before


async def test_real_probes_counted_by_validator(http_server, resolv):
    from prober import HTTPSpec

    s = spec(http_server.url("/status/500"), section=HTTPSpec(), timeout=1.0).model_copy(update={"interval": 0.1})
    env = ProbeEnv(resolv_conf=resolv)
    sched = Scheduler([s], env=env)
    async with sched:
        results = [await asyncio.wait_for(sched.results.get(), 2) for _ in range(2)]
    await env.aclose()
    assert all(r.http_status == 500 for r in results)
    assert sched.stats.validator_failures[("t", "status_code")] >= 2


def test_duplicate_names_rejected():
    with pytest.raises(ValueError, match="duplicate probe names: p0"):
        Scheduler(_probes(1, 1.0) * 2)


async def test_run_probe_is_the_default():
    assert Scheduler([]).__dict__["_run"] is run_probe


async def test_add_and_retire_one_probe():
    rec = Recorder(duration=0.2)
    sched = Scheduler(_probes(1, 0.05), run=rec)
    before = asyncio.all_tasks()
    with pytest.raises(RuntimeError, match="not started"):
        sched.add(_probes(2, 0.05)[1])
    async with sched:
        sched.add(_probes(2, 0.05)[1])
        with pytest.raises(ValueError, match="already scheduled"):
            sched.add(_probes(2, 0.05)[1])
        assert sched.scheduled() == {"p0", "p1"}
        while "p1" not in sched._busy:
            await asyncio.sleep(0.01)
        assert await sched.retire("p1", grace=1.0) is True  # the run in flight finished
        names = [sched.results.get_nowait().name for _ in range(sched.results.qsize())]
        assert "p1" in names  # ... and its result was published
        assert sched.scheduled() == {"p0"}
        assert await sched.retire("nope") is True
    assert asyncio.all_tasks() == before


async def test_retire_cuts_a_long_run_short_after_the_grace():
    rec = Recorder(duration=5.0)
    before = asyncio.all_tasks()
    async with Scheduler(_probes(1, 0.05), run=rec) as sched:
        while "p0" not in sched._busy:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        assert await sched.retire("p0", grace=0.05) is False
        assert time.monotonic() - t0 < 0.5 and rec.total == 0 and sched.scheduled() == set()
    assert asyncio.all_tasks() == before
