"""The per-test time limit (tests/timeouts.py) holds: a hung test fails on its own — an idle event loop, a
task that ignores cancellation (and so would hang the loop's teardown), synchronous code — and the session
goes on to the next test. Runs a small pytest session in a subprocess with a 1 s limit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HANGING = '''
import asyncio
import time


async def _ignores_cancellation():
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    while True:
        try:
            await fut
        except asyncio.CancelledError:
            fut = loop.create_future()  # a lost deadline: it goes on waiting


async def test_idle_loop_forever():
    await asyncio.get_running_loop().create_future()


async def test_task_that_ignores_cancellation():
    await asyncio.create_task(_ignores_cancellation())


def test_sync_sleep():
    time.sleep(600)


def test_next_one_still_runs():
    pass
'''


def test_a_hang_fails_one_test_and_the_session_goes_on(tmp_path):
    (tmp_path / "test_hanging.py").write_text(HANGING)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\ntimeout = 1\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.timeouts", "-p", "no:cacheprovider", "-rA", "-W", "error",
         "test_hanging.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90,
    )
    out = proc.stdout
    assert "PASSED test_hanging.py::test_next_one_still_runs" in out, out + proc.stderr
    for name in ("test_idle_loop_forever", "test_task_that_ignores_cancellation", "test_sync_sleep"):
        assert f"FAILED test_hanging.py::{name}" in out, out
    assert "3 failed, 1 passed" in out, out
    assert "Timeout (>1s)" in out + proc.stderr


UNSTOPPABLE = '''
import time


def test_fails_first():
    assert 1 == 2, "an earlier failure the exit must still show"


def test_swallows_every_limit():
    while True:
        try:
            time.sleep(600)
        except BaseException:
            pass  # nothing stops it: the limit ends the process
'''


def test_a_test_that_never_ends_exits_the_run_and_shows_what_failed(tmp_path):
    """After HARD_AFTER expiries the process exits: the stacks and every failure before it reach the real
    stderr (not pytest's capture, which dies with the process), so a CI log says what hung and what failed."""
    (tmp_path / "test_unstoppable.py").write_text(UNSTOPPABLE)
    (tmp_path / "pytest.ini").write_text("[pytest]\ntimeout = 1\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.timeouts", "-p", "no:cacheprovider", "test_unstoppable.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr
    assert "test_unstoppable.py::test_swallows_every_limit did not end" in err, err
    assert "in test_swallows_every_limit" in err  # its stack
    assert "failed before the exit: test_unstoppable.py::test_fails_first (call)" in err, err
    assert "an earlier failure the exit must still show" in err
    assert "exiting: test_unstoppable.py::test_swallows_every_limit hung; 1 failure(s) before it" in err
