"""Bounded work in the agent: a crashing probe's traceback is logged once per probe and window, then counted."""

from __future__ import annotations

import logging

from connprobe.agent import TracebackThrottle


def test_a_probes_traceback_is_logged_once_per_window_and_counted(caplog):
    now = [1000.0]
    throttle = TracebackThrottle(window=600, clock=lambda: now[0])
    throttle.install()
    runner = logging.getLogger("prober.runner")
    try:
        with caplog.at_level(logging.ERROR, logger="prober.runner"):
            for probe in ("a", "a", "b", "a"):
                try:
                    raise RuntimeError(f"bug in {probe}")
                except RuntimeError:
                    runner.exception("probe %s crashed", probe)
            runner.error("probe %s: a plain error is never throttled", "a")
            now[0] += 601
            try:
                raise RuntimeError("bug in a")
            except RuntimeError:
                runner.exception("probe %s crashed", "a")
    finally:
        throttle.remove()
    shown = [(r.getMessage(), r.exc_info is not None) for r in caplog.records]
    note = " (traceback shown once per probe every 600s; later ones counted)"
    assert shown == [(f"probe a crashed{note}", True), (f"probe b crashed{note}", True),
                     ("probe a: a plain error is never throttled", False), (f"probe a crashed{note}", True)]
    assert throttle.counts["runner"] == 5 and throttle.suppressed == 2
