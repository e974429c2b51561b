"""Every probe ends by its deadline: the runner's guard (a cancellation swallowed once cannot keep a run
alive), the scheduler's watchdog (a run that ignores every cancellation is reported as `internal` and
abandoned), and a `stop()` that does not wait forever on such a run."""

from __future__ import annotations

import asyncio
import time

import pytest

from prober import ErrorKind, ProbeEnv, Scheduler, run_probe
from prober.runner import OVERRUN_MARGIN_S, PROBERS, RECANCEL_S, DeadlineGuard
from tests.prober.helpers import spec


class Stubborn:
    """A prober with the bug the guard exists for: it swallows `swallow` cancellations (all of them while
    `swallow` is None) and goes on waiting, until `release` is set."""

    def __init__(self, swallow: int | None):
        self.swallow = swallow
        self.swallowed = 0
        self.release = asyncio.Event()
        self.ended = asyncio.Event()

    async def __call__(self, attempt, env, deadline_ns):
        try:
            while not self.release.is_set():
                try:
                    await self.release.wait()
                except asyncio.CancelledError:
                    if self.swallow is not None and self.swallowed >= self.swallow:
                        raise
                    self.swallowed += 1
            return attempt.result()
        finally:
            self.ended.set()


def _tcp(name="t", timeout=0.3):
    return spec("127.0.0.1:9", prober="tcp", name=name, timeout=timeout)


async def test_a_swallowed_cancellation_does_not_outlive_the_guard(monkeypatch):
    stubborn = Stubborn(swallow=2)
    monkeypatch.setitem(PROBERS, "tcp", stubborn)
    env = ProbeEnv()
    s = _tcp()
    t0 = time.monotonic()
    (r,) = await run_probe(s, env)
    took = time.monotonic() - t0
    assert r.error is ErrorKind.INTERNAL and "overran its deadline" in r.error_detail, r
    assert stubborn.swallowed == 2 and stubborn.ended.is_set()
    assert env.overruns == 1
    # a correctness bound (not a speed check): the guard's margin plus one re-cancel per swallowed one
    assert took < s.effective_timeout + OVERRUN_MARGIN_S + 3 * RECANCEL_S + 1.0
    assert asyncio.current_task().cancelling() == 0  # every cancellation it made was taken back


async def test_the_guard_leaves_a_normal_run_and_an_outside_cancel_alone(monkeypatch):
    async def quick(attempt, env, deadline_ns):
        await asyncio.sleep(0.01)
        return attempt.result()

    monkeypatch.setitem(PROBERS, "tcp", quick)
    env = ProbeEnv()
    (r,) = await run_probe(_tcp(), env)
    assert r.ok and env.overruns == 0
    assert asyncio.current_task().cancelling() == 0

    async def slow(attempt, env, deadline_ns):
        await asyncio.sleep(10)

    monkeypatch.setitem(PROBERS, "tcp", slow)
    task = asyncio.create_task(run_probe(_tcp(timeout=5), env))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task  # the caller's cancellation is not turned into a result


async def test_guard_converts_only_its_own_expiry():
    loop = asyncio.get_running_loop()
    guard = DeadlineGuard(loop.time() + 0.05, every=0.02)
    with pytest.raises(TimeoutError):
        async with guard:
            await asyncio.sleep(1)
    assert guard.fired and asyncio.current_task().cancelling() == 0
    async with DeadlineGuard(loop.time() + 5) as g2:
        await asyncio.sleep(0)
    assert not g2.fired


async def test_the_watchdog_reports_and_abandons_a_run_that_ignores_cancellation(monkeypatch):
    stubborn = Stubborn(swallow=None)  # ignores every cancellation: the runner's guard cannot end it
    monkeypatch.setitem(PROBERS, "tcp", stubborn)
    s = _tcp(timeout=0.2).model_copy(update={"interval": 0.5})
    results: asyncio.Queue = asyncio.Queue()
    env = ProbeEnv()
    sched = Scheduler([s], env, queue=results, overrun_margin=OVERRUN_MARGIN_S + 0.3, lag_interval=0.02)
    await sched.start()
    try:
        r = await asyncio.wait_for(results.get(), 5)
        assert r.error is ErrorKind.INTERNAL and "scheduler's watchdog" in r.error_detail, r
        assert sched.stats.overruns == 1 and env.overruns == 1
        before = stubborn.swallowed
        assert before >= 2  # the runner's guard cancelled it, then again
        await asyncio.sleep(0.2)
        assert stubborn.swallowed > before  # and it is still cancelled again and again while it lives
        # the slot was freed: the probe keeps its schedule (its next run is stubborn too)
        r2 = await asyncio.wait_for(results.get(), 5)
        assert r2.error is ErrorKind.INTERNAL and sched.stats.overruns == 2 and r2.start_ns > r.start_ns
        t0 = time.monotonic()
        await sched.stop(grace=0.1)  # does not wait forever on the run that ignores cancellation
        assert time.monotonic() - t0 < 5
    finally:
        stubborn.release.set()
        await asyncio.sleep(0.05)
    assert stubborn.ended.is_set()


async def test_a_dropped_result_is_handed_to_on_dropped(monkeypatch):
    async def quick(attempt, env, deadline_ns):
        return attempt.result()

    monkeypatch.setitem(PROBERS, "tcp", quick)
    dropped = []
    sched = Scheduler([_tcp().model_copy(update={"interval": 0.05})], queue=asyncio.Queue(1),
                      on_dropped=dropped.append)
    async with sched:
        await asyncio.sleep(0.4)
    assert sched.stats.dropped_results >= 1 and len(dropped) == sched.stats.dropped_results
