"""A per-test time limit that holds for asyncio tests: a hang fails one test and the session goes on.

Why pytest-timeout's `signal` method let tests/prober/test_lab.py::test_connect_kinds hang for more than
8 minutes: its SIGALRM handler raises `Failed` wherever the main thread happens to be. Inside a running
event loop that is either

- the selector (an idle loop): the test is failed, and then the loop's teardown — `asyncio.Runner.close()`
  cancels every task and waits for them all — waits forever on a task that does not end when cancelled.
  The alarm has fired once and is spent, so nothing ends the teardown; or
- a callback: asyncio's `Handle._run` catches `BaseException` and only logs it; nothing is failed at all.

Here an expiry never raises into the loop. From the loop itself (`call_soon_threadsafe`), it cancels every
task of the running loop; if they have not ended `GRACE_S` later it stops the loop, so `run_until_complete`
fails the test. The limit then re-arms itself every `REARM_S` for the rest of the test's protocol: a fixture
teardown that waits on a hung task is stopped the same way. Synchronous code gets pytest-timeout's own
behaviour (`Failed` raised where it runs). Should the test still not have ended after `HARD_AFTER` expiries,
the stacks are dumped and the process exits: a hang may end the run, it never eats CI's whole budget.

The alarm is a timer thread that signals the main thread (`pthread_kill`): a process-wide SIGALRM could be
taken by another thread while the main thread sleeps in `epoll_wait` with nothing to wake it.

Installed through pytest-timeout's own hooks (`pytest_timeout_set_timer` / `pytest_timeout_cancel_timer`), so
its settings (`timeout`, the `timeout` marker, `--timeout`) apply unchanged; `timeout_method = thread` still
means pytest-timeout's process-ending thread.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import traceback

import pytest

GRACE_S = 2.0  # after cancelling the loop's tasks: how long they get before the loop is stopped
REARM_S = 3.0  # after an expiry, the next one (for a teardown that hangs too)
HARD_AFTER = 4  # expiries without the test ending: dump stacks and end the process

_KEY = pytest.StashKey["_Limit"]()


class _Limit:
    def __init__(self, item: pytest.Item, seconds: float):
        self.item = item
        self.seconds = seconds
        self.expiries = 0
        self._main = threading.main_thread().ident
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._done = False
        self._previous = signal.signal(signal.SIGALRM, self._on_signal)
        self._arm(seconds)

    def _arm(self, seconds: float) -> None:
        with self._lock:
            if self._done:
                return
            self._timer = threading.Timer(seconds, self._expire)
            self._timer.daemon = True
            self._timer.name = f"test time limit {self.item.nodeid}"
            self._timer.start()

    def _expire(self) -> None:  # on the timer thread
        with self._lock:
            if self._done:
                return
            self.expiries += 1
        if self.expiries > HARD_AFTER:
            self._hard_exit()
        signal.pthread_kill(self._main, signal.SIGALRM)
        self._arm(REARM_S)

    def _on_signal(self, signum, frame) -> None:  # on the main thread
        __tracebackhide__ = True
        if self.expiries == 1:
            _dump_stacks(self.item, f"Timeout (>{self.seconds:g}s): stacks of every thread")
        loop = asyncio._get_running_loop()
        if loop is None or not _in_loop_machinery(frame):
            # Synchronous code (a sync test, or a coroutine that blocks its loop): fail it where it runs, as
            # pytest-timeout does; inside a coroutine that fails its task, and so the test.
            pytest.fail(f"Timeout (>{self.seconds:g}s) from the test time limit", pytrace=False)
        loop.call_soon_threadsafe(self._end_loop_tasks, loop)

    def _end_loop_tasks(self, loop: asyncio.AbstractEventLoop) -> None:
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in tasks:
            t.cancel(f"test time limit ({self.seconds:g}s)")
        loop.call_later(GRACE_S, self._stop_if_stuck, loop, tasks)

    @staticmethod
    def _stop_if_stuck(loop: asyncio.AbstractEventLoop, tasks: list[asyncio.Task]) -> None:
        stuck = [t for t in tasks if not t.done()]
        if stuck:
            names = ", ".join(t.get_name() for t in stuck)
            sys.stderr.write(f"test time limit: {len(stuck)} task(s) ignored cancellation ({names}); loop stopped\n")
            loop.stop()

    def _hard_exit(self) -> None:
        # pytest captures fd 2 during a test: what is written now would die with the process unless the capture
        # is suspended first. Then the stacks, and what failed before (the session's summary never comes).
        capture = self.item.config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            try:
                capture.suspend_global_capture(in_=True)
            except Exception:  # best effort on the way out
                pass
        _dump_stacks(self.item, f"Timeout: {self.item.nodeid} did not end after {self.expiries - 1} expiries; exiting")
        for nodeid, when, text in _FAILED:
            sys.stderr.write(f"\n{'_' * 20} failed before the exit: {nodeid} ({when}) {'_' * 20}\n{text}\n")
        sys.stderr.write(f"\nexiting: {self.item.nodeid} hung; {len(_FAILED)} failure(s) before it\n")
        sys.stderr.flush()
        os._exit(1)

    def cancel(self) -> None:
        with self._lock:
            self._done = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
            if timer is not threading.current_thread():
                timer.join()  # no thread left behind by a test
        signal.signal(signal.SIGALRM, self._previous)


_LOOP_FILES = (os.path.dirname(asyncio.__file__) + os.sep, os.path.join(os.path.dirname(os.__file__), "selectors.py"))


def _in_loop_machinery(frame) -> bool:
    """The main thread was in the event loop's own code (waiting in the selector, between callbacks)."""
    return frame is None or frame.f_code.co_filename.startswith(_LOOP_FILES)


def _dump_stacks(item: pytest.Item, title: str) -> None:
    out = [f"\n{'+' * 20} {title} {'+' * 20}\n"]
    frames = sys._current_frames()
    for thread in threading.enumerate():
        frame = frames.get(thread.ident)
        if frame is not None and thread.ident != threading.get_ident():
            out.append(f"--- thread {thread.name} ---\n")
            out.extend(traceback.format_stack(frame))
    out.append(f"--- main thread ({item.nodeid}) ---\n")
    out.extend(traceback.format_stack(sys._getframe(2)))
    sys.stderr.write("".join(out))


_REPORTING = pytest.StashKey[bool]()
_FAILED: list[tuple[str, str, str]] = []  # (nodeid, phase, report text) of each failure, for a hard exit's output


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _FAILED.append((report.nodeid, report.when, report.longreprtext[-6000:]))


@pytest.hookimpl(wrapper=True)
def pytest_exception_interact(node, call, report):
    """pytest-timeout cancels the limit when a test fails (so it does not fire in a debugger): that left the
    failed test's teardown without one. Keep it, unless a debugger is in use."""
    keep = not node.config.getvalue("usepdb")
    if keep:
        node.stash[_REPORTING] = True
    try:
        return (yield)
    finally:
        if keep:
            node.stash[_REPORTING] = False


def pytest_timeout_set_timer(item: pytest.Item, settings) -> bool | None:
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None  # pytest-timeout's own (thread) method
    item.stash[_KEY] = _Limit(item, settings.timeout)
    return True


def pytest_timeout_cancel_timer(item: pytest.Item) -> bool | None:
    limit = item.stash.get(_KEY, None)
    if limit is None:
        return None
    if item.stash.get(_REPORTING, False):
        return True  # the test failed: its teardown keeps the limit
    del item.stash[_KEY]
    limit.cancel()
    return True
