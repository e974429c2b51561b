"""Progress of an answer as it arrives: how many bytes by when, kept bounded (`Arrivals`).

A probe that reads a body (HTTP, all three clients) or a stream (TCP `expect`) adds each piece as it gets it.
Points are kept at least 1/PROGRESS_POINTS of the probe's time budget apart, and the last arrival is always
kept, so a result holds at most about PROGRESS_POINTS + 2 of them whatever the answer's size. The correlator
reads them (`ProbeResult.progress`) to tell a transfer that kept delivering from one that stopped.
"""

from __future__ import annotations

import time

from prober.types import Arrival

PROGRESS_POINTS = 32
_HARD_CAP = 2 * PROGRESS_POINTS  # also when the clock or the budget is odd

monotonic_ns = time.monotonic_ns


class Arrivals:
    __slots__ = ("_next_ns", "_points", "_step_ns", "last_ns", "total")

    def __init__(self, start_ns: int, deadline_ns: int, points: int = PROGRESS_POINTS) -> None:
        self._step_ns = max((deadline_ns - start_ns) // max(points, 1), 1)
        self._next_ns = 0
        self._points: list[tuple[int, int]] = []
        self.total = 0
        self.last_ns = 0

    def add(self, n: int, now: int | None = None) -> None:
        """`n` more bytes arrived now (or at `now`, monotonic ns: recordings and models)."""
        if n <= 0:
            return
        if now is None:
            now = monotonic_ns()
        self.total += n
        self.last_ns = now
        if now >= self._next_ns and len(self._points) < _HARD_CAP:
            self._points.append((now, self.total))
            self._next_ns = now + self._step_ns

    def freeze(self) -> tuple[Arrival, ...]:
        pts = self._points
        out = [Arrival(t, b) for t, b in pts]
        if self.last_ns and (not pts or pts[-1][0] != self.last_ns):
            out.append(Arrival(self.last_ns, self.total))
        return tuple(out)
