"""The prober's progress points: bounded whatever the answer's size, the last arrival always kept."""

from __future__ import annotations

import itertools

from prober.progress import PROGRESS_POINTS, Arrivals

MS = 1_000_000


def test_points_are_spaced_by_the_budget_and_the_last_arrival_is_kept():
    a = Arrivals(0, 1000 * MS)
    for i in range(100_000):  # a piece every 10 µs for a second
        a.add(10, i * 10_000)
    pts = a.freeze()
    assert len(pts) <= PROGRESS_POINTS + 2
    assert pts[-1].bytes == 1_000_000 and pts[-1].ts_ns == 99_999 * 10_000
    assert all(b.ts_ns - a.ts_ns >= 1000 * MS // PROGRESS_POINTS for a, b in itertools.pairwise(pts[:-1]))


def test_bounded_even_when_the_budget_is_tiny_or_the_clock_jumps():
    a = Arrivals(0, 1)
    for i in range(10_000):
        a.add(1, i)
    assert len(a.freeze()) <= 2 * PROGRESS_POINTS + 1
    assert Arrivals(0, MS).freeze() == ()
    b = Arrivals(0, MS)
    b.add(0, 5)
    assert b.freeze() == ()
