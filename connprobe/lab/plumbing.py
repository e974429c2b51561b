"""Thin wrappers over the tools that build the lab: `ip`, `nft`, `tc`, processes inside a namespace.

Every command runs against a named lab namespace (`ip -n NAME`, `ip netns exec NAME`); nothing here ever
addresses the root namespace's interfaces, routes or ruleset.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from prober.netns import CLONE_NEWNET, netns_path


class LabError(RuntimeError):
    """A lab operation failed; the message names the command and what it said."""


def run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def ip(ns: str, *args: str, check: bool = True) -> str:
    return run(["ip", "-n", ns, *args], check=check)


def in_ns(ns: str, *argv: str, input: str | None = None, check: bool = True) -> str:
    return run(["ip", "netns", "exec", ns, *argv], input=input, check=check)


def nft(ns: str, script: str) -> str:
    return in_ns(ns, "nft", "-f", "-", input=script)


def named_netns() -> list[str]:
    """The names `ip netns list` shows (/run/netns); for inode -> name see `connprobe/netnames.py`."""
    out = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(ns: str) -> list[int]:
    out = run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in out.split()]


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def spawn_in_ns(
    ns: str, argv: Sequence[str], *, log: Path, die_with_parent: bool, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start a process whose network namespace is `ns` (setns between fork and exec).

    With `die_with_parent`, the kernel sends it SIGTERM when the process that started it dies, so a
    crashed test run cannot leave servers behind.
    """
    fd = os.open(netns_path(ns), os.O_RDONLY | os.O_CLOEXEC)
    sig = 15 if die_with_parent else 0

    def enter() -> None:  # runs in the child, before exec
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            os._exit(120)
        if sig:
            _libc.prctl(PR_SET_PDEATHSIG, sig)

    try:
        with open(log, "ab") as logf:
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=logf,
                preexec_fn=enter,
                start_new_session=not die_with_parent,
                env=env,
            )
    finally:
        os.close(fd)
