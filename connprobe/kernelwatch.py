"""The app's side of the kernel sensor: watch each probe's ports, keep recent events, hand a finished probe
the events of its window together with an honest account of how much of it the sensor saw (`KernelCoverage`).

prober/ and bpf/ never meet: the prober calls `on_local_port` (given to its ProbeEnv) before each
connect()/sendto(); this class forwards it to the sensor's watch list and remembers it, so the port can
be unwatched once the probe's events are collected.

Every watched port is released on every path: `collect` releases the result's ports in a `finally`; a
result nobody collects (dropped by a full queue) is handed to `release`; and a port whose probe never
produced a result (cancelled, ended by a deadline guard) expires `lease_ns` after it was announced
(`expired` counts those). A port that does not fit in a full watch list is not an error: the probe runs,
and its verdict says "no kernel evidence (watch list full)" (`watch_full` counts them).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import Counter, deque

from bpf.errors import WatchListFull
from bpf.types import KernelEvent
from correlator.join import GRACE_NS, SLACK_NS, window_complete
from correlator.types import KernelCoverage
from prober.types import ProbeResult, Proto

log = logging.getLogger(__name__)

KEEP_NS = 120 * 1_000_000_000  # events older than this are dropped from memory
COMPLETE_POLL_S = 0.005  # how soon a finished probe's window is first checked again for completeness
COMPLETE_POLL_MAX_S = 0.05


WATCH_FULL = "watch list full"
SWEEP_EVERY_NS = 1_000_000_000


class KernelWatch:
    def __init__(self, sensor=None, unavailable_reason: str = "", grace_ns: int = GRACE_NS,
                 lease_ns: int = KEEP_NS):
        self.sensor = sensor
        self.unavailable_reason = unavailable_reason if sensor is None else ""
        self.grace_ns = grace_ns
        self.lease_ns = lease_ns  # a port still watched this long after it was announced is released
        self._events: deque[KernelEvent] = deque()
        self._lost_samples: list[tuple[int, int]] = [(time.monotonic_ns(), 0)]
        self._pump: asyncio.Task | None = None
        self.events_seen = 0
        self.watch_full = 0  # ports not watched because the watch list was full
        self.expired = 0  # ports released by their lease (their probe's result never came to collect)
        self._held: Counter[tuple[str, int]] = Counter()  # watches made and not released yet
        self._leases: deque[tuple[int, tuple[str, int]]] = deque()  # (announced at, port), oldest first
        self._released: Counter[tuple[str, int]] = Counter()  # releases whose lease entry is still queued
        self._not_watched: dict[tuple[str, int], tuple[int, str]] = {}  # port -> (when, why) it is not watched
        self._next_sweep_ns = 0

    @property
    def available(self) -> bool:
        return self.sensor is not None

    # -- wiring -------------------------------------------------------------------------------------------
    def on_local_port(self, proto: Proto, port: int) -> None:
        """Watch a probe's port (called before its first packet). Never fails the probe."""
        if self.sensor is None:
            return
        now = time.monotonic_ns()
        if now >= self._next_sweep_ns:
            self.sweep(now)
        key = (str(proto), port)
        try:
            self.sensor.watch(*key)
        except WatchListFull:
            self.watch_full += 1
            self._not_watched[key] = (now, WATCH_FULL)
            if self.watch_full == 1 or self.watch_full % 1000 == 0:
                log.warning("kernel watch list full: %d probe ports not watched so far (their verdicts say so)",
                            self.watch_full)
            return
        except Exception as exc:  # a closed or broken sensor: this probe goes without evidence
            self._not_watched[key] = (now, f"watching its port failed: {exc}")
            log.warning("watching %s/%d failed: %s", key[0], port, exc)
            return
        self._held[key] += 1
        self._leases.append((now, key))

    def release(self, result: ProbeResult) -> None:
        """Unwatch every port the probe used (once its events are collected, or it was dropped)."""
        if self.sensor is None:
            return
        for key in result.local_ports():
            self._not_watched.pop(key, None)
            if self._held[key] <= 0:
                continue
            self._unwatch(key)
            self._released[key] += 1

    def _unwatch(self, key: tuple[str, int]) -> None:
        self._held[key] -= 1
        if self._held[key] <= 0:
            del self._held[key]
        with contextlib.suppress(Exception):
            self.sensor.unwatch(*key)

    def sweep(self, now_ns: int | None = None) -> None:
        """Release the ports announced more than `lease_ns` ago that no result has released."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        self._next_sweep_ns = now + SWEEP_EVERY_NS
        horizon = now - self.lease_ns
        leases = self._leases
        while leases and leases[0][0] < horizon:
            _, key = leases.popleft()
            if self._released[key] > 0:  # released by its result (in order, per port)
                self._released[key] -= 1
                if not self._released[key]:
                    del self._released[key]
            elif self._held[key] > 0:
                self._unwatch(key)
                self.expired += 1
        for key in [k for k, (t, _) in self._not_watched.items() if t < horizon]:
            del self._not_watched[key]

    @property
    def watching(self) -> int:
        """Watches this holds now (what a leak would make grow)."""
        return sum(self._held.values())

    async def start(self) -> None:
        if self.sensor is not None and self._pump is None:
            self._lost_samples = [(time.monotonic_ns(), self.sensor.lost_events)]
            self._pump = asyncio.create_task(self._run_pump(), name="kernel-evidence-pump")

    async def stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None

    async def _run_pump(self) -> None:
        async for ev in self.sensor:
            self._add(ev)

    def _add(self, ev: KernelEvent) -> None:
        self._events.append(ev)
        self.events_seen += 1
        horizon = ev.ts_ns - KEEP_NS
        while self._events and self._events[0].ts_ns < horizon:
            self._events.popleft()

    def _sample_lost(self) -> None:
        if self.sensor is not None:
            self._lost_samples.append((time.monotonic_ns(), self.sensor.lost_events))
            if len(self._lost_samples) > 10_000:
                del self._lost_samples[: len(self._lost_samples) // 2]

    def _lost_between(self, lo: int, hi: int) -> int:
        i = max(bisect.bisect_right(self._lost_samples, lo, key=lambda s: s[0]) - 1, 0)
        return self._lost_samples[-1][1] - self._lost_samples[i][1]

    # -- collection ---------------------------------------------------------------------------------------
    async def collect(self, result: ProbeResult) -> tuple[list[KernelEvent], KernelCoverage]:
        """Wait out the grace period after the probe ended, then return its window's events."""
        if self.sensor is None:
            return [], KernelCoverage(available=False, reason=self.unavailable_reason or "sensor off")
        try:
            missing = [self._not_watched[k][1] for k in result.local_ports() if k in self._not_watched]
            if missing:
                return [], KernelCoverage(available=False, reason=missing[0])
            # Until every flow of the probe was seen closed (then no late event can come), or the grace period.
            deadline = result.end_ns + self.grace_ns
            poll = COMPLETE_POLL_S
            while True:
                for ev in self.sensor.drain():  # whatever the pump has not picked up yet
                    self._add(ev)
                now = time.monotonic_ns()
                if now >= deadline or window_complete(result, self._window(result, result.start_ns - SLACK_NS, now)):
                    break
                await asyncio.sleep(min(poll, (deadline - now) / 1e9))
                poll = min(poll * 2, COMPLETE_POLL_MAX_S)  # most windows close within a few ms; back off after
            self._sample_lost()
            lo, hi = result.start_ns - self.grace_ns, result.end_ns + self.grace_ns
            events = self._window(result, lo, hi)
            lost = self._lost_between(result.start_ns, hi)
            return events, KernelCoverage(available=True, lost_events=lost)
        finally:  # cancelled in the grace period, or failing: the ports are released all the same
            self.release(result)

    def _window(self, result: ProbeResult, lo: int, hi: int) -> list[KernelEvent]:
        """The kept events between lo and hi (a subclass may look them up by the result's ports)."""
        return [e for e in self._events if lo <= e.ts_ns <= hi]
