"""Run-time statistics of the sensor's BPF programs: how often each ran and how long it took (benchmarks,
`bpftool prog show id N`). Read from /proc/self/fdinfo of the loaded programs."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
_BPF_ENABLE_STATS = 32


@contextlib.contextmanager
def bpf_run_time_stats() -> Iterator[None]:
    """Turn on the kernel's per-program run-time statistics while the block runs (bpf(BPF_ENABLE_STATS):
    off again when the returned fd closes, so nothing global is left changed)."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(struct.pack("<I", 0), 8)  # BPF_STATS_RUN_TIME
    nr = _NR_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf syscall number unknown on {os.uname().machine}")
    fd = libc.syscall(nr, _BPF_ENABLE_STATS, attr, 8)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_ENABLE_STATS: {os.strerror(err)}")
    try:
        yield
    finally:
        os.close(fd)


def _fdinfo(fd: int) -> dict[str, str]:
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def program_stats(bpf: Any) -> dict[str, tuple[int, int]]:
    """Per program of a bcc object: (times run, total ns spent in it). Both stay 0 unless the kernel's BPF
    run-time statistics are on (`bpf_run_time_stats()` or kernel.bpf_stats_enabled)."""
    out = {}
    for name, fn in bpf.funcs.items():
        fields = _fdinfo(fn.fd)
        out[name.decode() if isinstance(name, bytes) else name] = (
            int(fields.get("run_cnt", 0)), int(fields.get("run_time_ns", 0)))
    return out


def program_ids(bpf: Any) -> list[int]:
    """Kernel ids of a bcc object's loaded programs, for `bpftool prog show id N`."""
    ids = []
    for fn in bpf.funcs.values():
        prog_id = _fdinfo(fn.fd).get("prog_id")
        if prog_id is not None:
            ids.append(int(prog_id.split()[0]))
    return sorted(ids)
