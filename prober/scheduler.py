"""Runs probes on their intervals and hands results out through an asyncio.Queue.

- One loop task per probe: a probe never overlaps itself (a run that outlasts its interval makes the
  next tick late; missed ticks are skipped and counted, never queued up).
- A random start offset in [0, interval) and +/- `jitter` x interval on every wait spread the starts.
- A global semaphore caps how many probes run at once.
- A lag monitor ticks every `lag_interval` s; when a tick is late by more than `lag_threshold` s the
  loop was starved for that window, and every result whose run overlaps a starved window is `suspect`
  (its timings include the stall, not only the network).
- `stop()` stops new runs at once, lets running probes finish within `grace` seconds (their results are
  still delivered), cancels the rest and leaves no task behind.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence

from prober.core import ProbeEnv
from prober.runner import run_probe
from prober.spec import ProbeSpec
from prober.types import ProbeResult

log = logging.getLogger(__name__)
monotonic_ns = time.monotonic_ns

RunFn = Callable[[ProbeSpec, ProbeEnv], Awaitable[tuple[ProbeResult, ...]]]


@dataclasses.dataclass
class SchedulerStats:
    runs: int = 0
    skipped_ticks: int = 0  # ticks missed because the previous run of that probe was still going
    dropped_results: int = 0  # the queue was full
    suspect_results: int = 0
    max_lag_s: float = 0.0
    validator_failures: collections.Counter = dataclasses.field(default_factory=collections.Counter)


class Scheduler:
    def __init__(
        self,
        probes: Sequence[ProbeSpec],
        env: ProbeEnv | None = None,
        *,
        concurrency: int = 64,
        queue: asyncio.Queue | None = None,
        lag_interval: float = 0.05,
        lag_threshold: float = 0.05,
        rng: random.Random | None = None,
        run: RunFn = run_probe,
    ):
        names = [p.name for p in probes]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"duplicate probe names: {', '.join(sorted(dupes))}")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.probes = tuple(probes)
        self._own_env = env is None
        self.env = env or ProbeEnv()
        self.concurrency = concurrency
        self.results: asyncio.Queue[ProbeResult] = queue if queue is not None else asyncio.Queue()
        self.lag_interval = lag_interval
        self.lag_threshold = lag_threshold
        self.rng = rng or random.Random()
        self._run = run
        self.stats = SchedulerStats()
        self._sem: asyncio.Semaphore | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._busy: set[str] = set()
        self._monitor: asyncio.Task | None = None
        self._starved: collections.deque[tuple[int, int]] = collections.deque(maxlen=4096)
        self._last_tick_ns = 0
        self._stopping = False
        self._retiring: set[str] = set()  # probes whose loop ends after the run in flight

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._tasks:
            raise RuntimeError("scheduler already started")
        self._sem = asyncio.Semaphore(self.concurrency)
        self._last_tick_ns = monotonic_ns()
        self._monitor = asyncio.create_task(self._watch_lag(), name="connprobe-lag-monitor")
        for spec in self.probes:
            self._tasks[spec.name] = asyncio.create_task(self._loop(spec), name=f"connprobe-probe-{spec.name}")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop scheduling; running probes get `grace` seconds to finish; no task is left behind."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for name, task in self._tasks.items():
            if name not in self._busy:
                task.cancel()
        busy = [t for n, t in self._tasks.items() if n in self._busy]
        if busy:
            _, pending = await asyncio.wait(busy, timeout=grace)
            for task in pending:
                task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        self._tasks.clear()
        if self._own_env:
            await self.env.aclose()

    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # ------------------------------------------------------------ reload: one probe at a time

    def add(self, spec: ProbeSpec) -> None:
        """Start scheduling one more probe (a started scheduler only)."""
        if self._sem is None:
            raise RuntimeError("scheduler not started")
        if spec.name in self._tasks:
            raise ValueError(f"probe {spec.name!r} is already scheduled")
        self._tasks[spec.name] = asyncio.create_task(self._loop(spec), name=f"connprobe-probe-{spec.name}")

    async def retire(self, name: str, grace: float = 5.0) -> bool:
        """Stop one probe; a run in flight may finish within `grace` s and its result is published.

        True when nothing was cut short.
        """
        task = self._tasks.get(name)
        if task is None:
            return True
        clean = True
        if name in self._busy and not task.done():
            self._retiring.add(name)
            try:
                await asyncio.wait_for(asyncio.shield(task), grace)
            except TimeoutError:
                clean = False
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise
            finally:
                self._retiring.discard(name)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if self._tasks.get(name) is task:
            del self._tasks[name]
        return clean

    def scheduled(self) -> set[str]:
        return set(self._tasks)

    # ------------------------------------------------------------ probing

    def _wait(self, spec: ProbeSpec) -> float:
        j = spec.jitter
        return spec.interval * (1.0 + (self.rng.uniform(-j, j) if j else 0.0))

    async def _loop(self, spec: ProbeSpec) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.rng.uniform(0, spec.interval)
        while not self._stopping:
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._stopping:
                return
            assert self._sem is not None
            async with self._sem:
                if self._stopping:
                    return
                self._busy.add(spec.name)
                try:
                    results = await self._run(spec, self.env)
                finally:
                    self._busy.discard(spec.name)
            self.stats.runs += 1
            self._publish(results)
            if spec.name in self._retiring:
                return
            next_at += self._wait(spec)
            now = loop.time()
            if next_at < now:  # the run outlasted its interval: skip the missed ticks, don't pile up
                missed = int((now - next_at) // spec.interval) + 1
                self.stats.skipped_ticks += missed
                next_at += missed * spec.interval

    def _publish(self, results: tuple[ProbeResult, ...]) -> None:
        self._note_lag_now()
        for r in results:
            if not r.suspect and self._overlaps_starved(r.start_ns, r.end_ns):
                r = dataclasses.replace(r, suspect=True)
            if r.suspect:
                self.stats.suspect_results += 1
            for v in r.failed_validators:
                self.stats.validator_failures[(r.name, v)] += 1
            try:
                self.results.put_nowait(r)
            except asyncio.QueueFull:
                self.stats.dropped_results += 1

    # ------------------------------------------------------------ event-loop lag

    def _record_starved(self, start_ns: int, end_ns: int) -> None:
        lag = (end_ns - start_ns) / 1e9
        self.stats.max_lag_s = max(self.stats.max_lag_s, lag)
        if self._starved and self._starved[-1][1] >= start_ns:
            s, _ = self._starved.pop()
            start_ns = min(s, start_ns)
        self._starved.append((start_ns, end_ns))

    def _note_lag_now(self) -> None:
        """Catch a stall that has just ended but the monitor has not woken up for yet."""
        now = monotonic_ns()
        expected = self._last_tick_ns + int(self.lag_interval * 1e9)
        if now - expected > self.lag_threshold * 1e9:
            self._record_starved(expected, now)

    def _overlaps_starved(self, start_ns: int, end_ns: int) -> bool:
        for s, e in reversed(self._starved):
            if e < start_ns:
                return False
            if s <= end_ns:
                return True
        return False

    async def _watch_lag(self) -> None:
        interval_ns = int(self.lag_interval * 1e9)
        threshold_ns = int(self.lag_threshold * 1e9)
        while True:
            self._last_tick_ns = monotonic_ns()
            await asyncio.sleep(self.lag_interval)
            now = monotonic_ns()
            late = now - (self._last_tick_ns + interval_ns)
            if late > threshold_ns:
                self._record_starved(self._last_tick_ns + interval_ns, now)
