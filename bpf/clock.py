"""The offset between the kernel's event timestamps (CLOCK_MONOTONIC, bpf_ktime_get_ns) and wall-clock time
(CLOCK_REALTIME), so one node's events can be placed on another node's timeline."""

from __future__ import annotations

import time
from collections.abc import Callable

from bpf.types import ClockOffset

__all__ = ["sample_clock_offset"]


def sample_clock_offset(realtime: Callable[[], int] = time.time_ns, monotonic: Callable[[], int] = time.monotonic_ns,
                        rounds: int = 7) -> ClockOffset:
    """Read the monotonic clock, the wall clock, the monotonic clock again; the wall clock was read somewhere
    between the two monotonic readings, so the offset is known to half their distance. The tightest of
    `rounds` readings is kept."""
    best: ClockOffset | None = None
    for _ in range(max(1, rounds)):
        a = monotonic()
        r = realtime()
        b = monotonic()
        half = max((b - a) // 2, 1)
        cand = ClockOffset(r - (a + b) // 2, half)
        if best is None or cand.uncertainty_ns < best.uncertainty_ns:
            best = cand
    assert best is not None
    return best
