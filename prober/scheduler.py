"""Runs probes on their intervals and hands results out through an asyncio.Queue.

- One timer for all probes: a heap of due times and a single `loop.call_at` handle. Starts that fall due
  within `slot` seconds of the first one are started together (at most `slot` early), so 1,000 probes a
  second cost ~1/slot timer wake-ups, not 1,000 (BENCHMARKS.md: a wake-up of the loop costs about as much
  CPU as a probe's own Python code on a small VM).
- A probe never overlaps itself: its next due time is set when its run ends (a run that outlasts its
  interval skips the missed ticks and counts them, never queues them up).
- A random start offset in [0, interval) and +/- `jitter` x interval on every wait spread the starts.
- A global cap on runs in flight: a start beyond it waits in a FIFO until a run ends.
- A lag monitor ticks every `lag_interval` s; when a tick is late by more than `lag_threshold` s the
  loop was starved for that window, and every result whose run overlaps a starved window is `suspect`
  (its timings include the stall, not only the network).
- A watchdog (on the lag monitor's tick) ends any run still going `overrun_margin` s past its probe's
  deadline: the run is cancelled (again on every tick while it lives), an `internal` result is published in
  its place, `stats.overruns` counts it, and the probe keeps its schedule. `run_probe` guards its own
  deadline already; this is the last line, for a run that ignores cancellation.
- `stop()` stops new runs at once, lets running probes finish within `grace` seconds (their results are
  still delivered), cancels the rest and waits a bounded time for them: a run that ignores cancellation is
  abandoned (logged), it does not hold `stop()` up.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import heapq
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence

from prober.env import ProbeEnv
from prober.runner import overrun_result, run_probe
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
    overruns: int = 0  # runs ended by the watchdog: still going past their deadline + overrun_margin
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
        slot: float = 0.01,
        lag_interval: float = 0.05,
        lag_threshold: float = 0.05,
        rng: random.Random | None = None,
        run: RunFn = run_probe,
        overrun_margin: float = 2.0,
        on_dropped: Callable[[ProbeResult], None] | None = None,
    ):
        names = [p.name for p in probes]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"duplicate probe names: {', '.join(sorted(dupes))}")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if slot < 0:
            raise ValueError("slot must not be negative")
        self.probes = tuple(probes)
        self._own_env = env is None
        self.env = env or ProbeEnv()
        self.concurrency = concurrency
        self.results: asyncio.Queue[ProbeResult] = queue if queue is not None else asyncio.Queue()
        self.slot = slot
        self.lag_interval = lag_interval
        self.lag_threshold = lag_threshold
        self.rng = rng or random.Random()
        self._run = run
        self.overrun_margin = overrun_margin
        self._on_dropped = on_dropped  # a result the full queue could not take (e.g. release its watch list)
        self.stats = SchedulerStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._specs: dict[str, ProbeSpec] = {}
        self._generation: dict[str, int] = {}  # a retired name's heap entries are stale
        self._counter = itertools.count()
        self._heap: list[tuple[float, int, str, int]] = []  # (due, tie-break, name, generation)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._waiting: collections.deque[tuple[ProbeSpec, float]] = collections.deque()  # over the cap
        self._busy: dict[str, asyncio.Task] = {}  # runs in flight, by probe name
        self._overdue: dict[str, tuple[float, int, float]] = {}  # in flight: (loop time it overruns, start ns, due)
        self._next_overdue = float("inf")
        self._abandoned: set[asyncio.Task] = set()  # overran runs, cancelled on every tick until they end
        self._monitor: asyncio.Task | None = None
        self._starved: collections.deque[tuple[int, int]] = collections.deque(maxlen=4096)
        self._last_tick_ns = 0
        self._stopping = False
        self._retiring: set[str] = set()  # probes whose run in flight is their last

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._loop is not None:
            raise RuntimeError("scheduler already started")
        self._loop = asyncio.get_running_loop()
        self._last_tick_ns = monotonic_ns()
        self._monitor = asyncio.create_task(self._watch_lag(), name="connprobe-lag-monitor")
        for spec in self.probes:
            self.add(spec)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop scheduling; running probes get `grace` seconds to finish; no task is left behind."""
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()
        self._waiting.clear()
        busy = list(self._busy.values())
        if busy:
            _, pending = await asyncio.wait(busy, timeout=grace)
            for task in pending:
                task.cancel()
            await _bounded_wait(pending)
        await _bounded_wait(self._abandoned)
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        self._specs.clear()
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
        if self._loop is None:
            raise RuntimeError("scheduler not started")
        if spec.name in self._specs:
            raise ValueError(f"probe {spec.name!r} is already scheduled")
        self._specs[spec.name] = spec
        self._generation[spec.name] = generation = next(self._counter)
        self._push(self._loop.time() + self.rng.uniform(0, spec.interval), spec.name, generation)

    async def retire(self, name: str, grace: float = 5.0) -> bool:
        """Stop one probe; a run in flight may finish within `grace` s and its result is published.

        True when nothing was cut short.
        """
        if self._specs.pop(name, None) is None:
            return True
        self._generation.pop(name, None)
        if any(s.name == name for s, _ in self._waiting):
            self._waiting = collections.deque((s, due) for s, due in self._waiting if s.name != name)
        task = self._busy.get(name)
        if task is None:
            return True
        self._retiring.add(name)
        try:
            await asyncio.wait_for(asyncio.shield(task), grace)
            return True
        except TimeoutError:
            task.cancel()
            await _bounded_wait({task})
            return False
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
            return False
        finally:
            self._retiring.discard(name)

    def scheduled(self) -> set[str]:
        return set(self._specs)

    # ------------------------------------------------------------ timing

    def _wait(self, spec: ProbeSpec) -> float:
        j = spec.jitter
        return spec.interval * (1.0 + (self.rng.uniform(-j, j) if j else 0.0))

    def _push(self, due: float, name: str, generation: int) -> None:
        heapq.heappush(self._heap, (due, next(self._counter), name, generation))
        if self._timer is None or due < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = due
            self._timer = self._loop.call_at(due, self._fire)

    def _fire(self) -> None:
        """The timer: start every probe due within the next `slot` seconds, then re-arm."""
        self._timer = None
        if self._stopping:
            return
        heap = self._heap
        horizon = self._loop.time() + self.slot
        generation = self._generation
        try:
            while heap and heap[0][0] <= horizon:
                due, _, name, gen = heapq.heappop(heap)
                if generation.get(name) == gen:  # else: retired (and maybe re-added) since
                    self._launch(self._specs[name], due)
        finally:  # whatever happened, the other probes keep their timer
            if heap and self._timer is None:
                self._timer_at = heap[0][0]
                self._timer = self._loop.call_at(self._timer_at, self._fire)

    def _launch(self, spec: ProbeSpec, due: float) -> None:
        if len(self._busy) >= self.concurrency:
            self._waiting.append((spec, due))
            return
        overdue = self._loop.time() + spec.effective_timeout + self.overrun_margin
        self._overdue[spec.name] = (overdue, monotonic_ns(), due)
        self._next_overdue = min(self._next_overdue, overdue)
        self._busy[spec.name] = asyncio.create_task(self._run_once(spec, due), name=f"connprobe-probe-{spec.name}")

    def _release_slot(self, name: str) -> None:
        del self._busy[name]
        self._overdue.pop(name, None)
        while self._waiting and len(self._busy) < self.concurrency and not self._stopping:
            self._launch(*self._waiting.popleft())

    async def _run_once(self, spec: ProbeSpec, due: float) -> None:
        name = spec.name
        me = asyncio.current_task()
        try:
            results = await self._run(spec, self.env)
        except Exception:  # run_probe never raises; another run function might: say so, keep scheduling
            log.exception("probe %s: run failed", name)
            results = ()
        finally:
            mine = self._busy.get(name) is me
            if mine:
                self._release_slot(name)
            else:  # the watchdog gave up on this run and reported it already
                self._abandoned.discard(me)
        if mine:
            self._finish(spec, due, results)

    def _check_overruns(self) -> None:
        """The watchdog: end every run past its deadline + `overrun_margin` (cheap when there is none)."""
        for task in [t for t in self._abandoned if not t.done()]:
            task.cancel()  # again: a run that swallowed one cancellation gets the next
        now = self._loop.time()
        if now < self._next_overdue:
            return
        for name, (overdue, start_ns, due) in list(self._overdue.items()):
            if overdue > now:
                continue
            task = self._busy[name]
            spec = self._specs.get(name)
            self._abandoned.add(task)
            task.cancel()
            self._release_slot(name)
            self.stats.overruns += 1
            self.env.overruns += 1
            log.error("probe %s: still running %.1fs past its deadline; ended by the scheduler's watchdog, "
                      "reported as internal", name, self.overrun_margin)
            if spec is not None:
                self._finish(spec, due, (overrun_result(spec, start_ns, "the scheduler's watchdog"),))
        self._next_overdue = min((o for o, _, _ in self._overdue.values()), default=float("inf"))

    def _finish(self, spec: ProbeSpec, due: float, results: tuple[ProbeResult, ...]) -> None:
        name = spec.name
        self.stats.runs += 1
        self._publish(results)
        if self._stopping or name in self._retiring or self._specs.get(name) is not spec:
            return
        due += self._wait(spec)
        now = self._loop.time()
        if due < now:  # the run outlasted its interval: skip the missed ticks, don't pile up
            missed = int((now - due) // spec.interval) + 1
            self.stats.skipped_ticks += missed
            due += missed * spec.interval
        self._push(due, name, self._generation[name])

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
                if self._on_dropped is not None:
                    try:
                        self._on_dropped(r)
                    except Exception:
                        log.exception("probe %s: the dropped-result callback failed", r.name)

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
            self._check_overruns()


async def _bounded_wait(tasks, timeout: float = 1.0) -> None:
    """Wait for cancelled tasks to end, but not forever: one that ignores cancellation is left (and logged)."""
    tasks = [t for t in tasks if not t.done()]
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        log.error("task %s ignored its cancellation; abandoned", t.get_name())
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved: an abandoned run's error was logged where it happened
