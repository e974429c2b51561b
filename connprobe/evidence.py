"""The app's side of the kernel sensor: watch each probe's ports, keep recent events, hand a finished probe
the events of its window together with an honest evidence status.

prober/ and bpf/ never meet: the prober calls `on_local_port` (given to its ProbeEnv) before each
connect()/sendto(); this class forwards it to the sensor's watch list and remembers it, so the port can
be unwatched once the probe's events are collected.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import deque

from bpf.types import KernelEvent
from correlator.join import GRACE_NS, SLACK_NS, window_complete
from correlator.rules import EvidenceStatus
from prober.types import ProbeResult, Proto

log = logging.getLogger(__name__)

KEEP_NS = 120 * 1_000_000_000  # events older than this are dropped from memory
COMPLETE_POLL_S = 0.005  # how soon a finished probe's window is first checked again for completeness
COMPLETE_POLL_MAX_S = 0.05


class KernelEvidence:
    def __init__(self, sensor=None, unavailable_reason: str = "", grace_ns: int = GRACE_NS):
        self.sensor = sensor
        self.unavailable_reason = unavailable_reason if sensor is None else ""
        self.grace_ns = grace_ns
        self._events: deque[KernelEvent] = deque()
        self._lost_samples: list[tuple[int, int]] = [(time.monotonic_ns(), 0)]
        self._pump: asyncio.Task | None = None
        self.events_seen = 0

    @property
    def available(self) -> bool:
        return self.sensor is not None

    # -- wiring -------------------------------------------------------------------------------------------
    def on_local_port(self, proto: Proto, port: int) -> None:
        if self.sensor is not None:
            self.sensor.watch(str(proto), port)

    def release(self, result: ProbeResult) -> None:
        """Unwatch every port the probe used (once its events are collected)."""
        if self.sensor is None:
            return
        ports = {(str(f.proto), f.local_port) for f in result.flows}
        ports |= {(str(tx.flow.proto), tx.flow.local_port) for tx in result.dns if tx.flow is not None}
        for proto, port in ports:
            with contextlib.suppress(Exception):
                self.sensor.unwatch(proto, port)

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
    async def collect(self, result: ProbeResult) -> tuple[list[KernelEvent], EvidenceStatus]:
        """Wait out the grace period after the probe ended, then return its window's events."""
        if self.sensor is None:
            return [], EvidenceStatus(available=False, reason=self.unavailable_reason or "sensor off")
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
        self.release(result)
        return events, EvidenceStatus(available=True, lost_events=lost)

    def _window(self, result: ProbeResult, lo: int, hi: int) -> list[KernelEvent]:
        """The kept events between lo and hi (a subclass may look them up by the result's ports)."""
        return [e for e in self._events if lo <= e.ts_ns <= hi]
