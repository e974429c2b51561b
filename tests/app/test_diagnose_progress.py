"""`connprobe diagnose` says on a terminal what it waits for while the kernel sensor loads (stderr), and writes
nothing of it when stderr is not a terminal: stdout (the timeline, --json) is the same either way."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]
ARGS = [sys.executable, "-m", "connprobe.cli", "diagnose", "127.0.0.1:1", "--count", "1"]  # refused, loopback


def _run(stderr_tty: bool) -> tuple[str, str]:
    if not stderr_tty:
        out = subprocess.run(ARGS, capture_output=True, text=True, timeout=90)
        return out.stdout, out.stderr
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(ARGS, stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        slave = -1
        err = b""
        while True:
            ready, _, _ = select.select([master], [], [], 90)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            err += chunk
        out, _ = proc.communicate(timeout=90)
        return out, err.decode(errors="replace")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_progress_on_a_terminal_only_and_the_same_stdout():
    out_tty, err_tty = _run(True)
    out_pipe, err_pipe = _run(False)
    assert "kernel sensor attached in" in err_tty, err_tty[-2000:]
    assert "loading the kernel sensor" not in err_pipe and "kernel sensor attached" not in err_pipe
    assert "loading the kernel sensor" not in out_tty
    # the same lines apart from the numbers (times, ports)
    def shape(text: str) -> list[str]:
        return [re.sub(r"\d+", "#", line) for line in text.splitlines()]

    assert shape(out_tty) == shape(out_pipe)
    assert "connection_refused" in out_tty
