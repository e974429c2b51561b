"""The sensor's loader: compile `bpf/sensor.c` with bcc, attach each hook on its own, read the kernel's names.

bcc's automatic attaching is off (a failure half-way through its constructor would leave the hooks attached
before it with no object to clean them up). If the whole program does not compile, each hook is compiled
alone to find the culprits, and the rest is compiled together; a hook that fails costs one event kind.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from bpf.decode import KernelNames
from bpf.errors import SensorUnavailable
from bpf.hooks import HookSpec
from bpf.kernel_compat import Tracefs

BPF_DIR = Path(__file__).resolve().parent
SOURCE = BPF_DIR / "sensor.c"
log = logging.getLogger("bpf.loader")
MADV_DONTNEED = 4
# Shared libraries only the compiler runs: bcc's clang front end and LLVM's back end.
COMPILER_LIBRARIES = ("libLLVM", "libclang")
# bcc's compiler (clang/LLVM in-process) aborts the process when two sensors compile at once on two threads
# (two agents in one process: the two-node lab): one compile at a time.
_COMPILE_LOCK = threading.Lock()


def compile_flags(tracefs: Tracefs, offsets: dict[str, int], ring_pages: int, watch_max: int) -> list[str]:
    """The -D/-I flags every compile gets: struct offsets, sizes, and what this kernel's formats have."""
    extra = []
    kfree = tracefs.format("skb", "kfree_skb") if tracefs.exists("skb", "kfree_skb") else None
    if kfree is not None and "rx_sk" in kfree.fields:
        extra.append("-DHAVE_KFREE_RX_SK")
    base = [f"-D{k}={v}" for k, v in sorted(offsets.items())]
    return [*base, f"-DRING_PAGES={ring_pages}", f"-DWATCH_MAX={watch_max}", f"-I{BPF_DIR}", *extra]


def load(bcc: Any, base: list[str], enabled: list[HookSpec], *,
         debug_source: bool = False) -> tuple[Any, dict[HookSpec, str], list[str]]:
    """Compile once, then load and attach each hook on its own. Returns the bcc object, the hooks that
    failed (with why) and the cflags of the program that was loaded. Raises SensorUnavailable when nothing
    could be loaded."""
    failed: dict[HookSpec, str] = {}
    text = SOURCE.read_bytes()
    if debug_source:
        hooks = " ".join(f"-D{h.macro}" for h in enabled)
        print(f"// {SOURCE}\n// cflags: {' '.join(base)} {hooks}\n{(BPF_DIR / 'events.h').read_text()}\n"
              f"{text.decode()}", file=sys.stderr)
    manual = _manual_attach_class(bcc)
    cflags: list[str] = []

    def compile_(hooks: list[HookSpec]) -> Any:
        nonlocal cflags
        cflags = base + [f"-D{h.macro}" for h in hooks]
        with _COMPILE_LOCK:
            return manual(text=text, cflags=cflags)

    try:
        bpf = compile_(enabled)
    except Exception as exc:
        first_error = _bpf_error(exc)
        good = []
        for hook in enabled:
            try:
                compile_([hook]).cleanup()
            except Exception as exc:
                failed[hook] = f"compile failed: {_bpf_error(exc)}"
                continue
            good.append(hook)
        if not good:
            raise SensorUnavailable(f"BPF compile failed: {first_error}") from None
        try:
            bpf = compile_(good)
        except Exception as exc:
            raise SensorUnavailable(f"BPF compile failed: {_bpf_error(exc)}") from None
    for hook in enabled:
        if hook in failed:
            continue
        try:
            if hook.raw:
                bpf.attach_raw_tracepoint(tp=hook.event.encode(), fn_name=f"raw_tracepoint__{hook.event}".encode())
            else:
                bpf.attach_tracepoint(tp=hook.name.encode(),
                                      fn_name=f"tracepoint__{hook.category}__{hook.event}".encode())
        except Exception as exc:
            failed[hook] = f"load/attach failed: {_bpf_error(exc)}"
    if len(failed) == len(enabled):
        bpf.cleanup()
        raise SensorUnavailable("BPF load failed for every hook: " + "; ".join(failed.values()))
    release_compiler_memory()
    return bpf, failed, cflags


def release_compiler_memory() -> int:
    """After compiling: give back what only the compile needed. ~100 MiB of the sensor's RSS is the compiler —
    the code pages of libLLVM and libclang-cpp it ran (~80 MiB) and heap LLVM freed but glibc kept (~25 MiB).
    The heap goes back with malloc_trim; the code pages are dropped from this process with
    madvise(MADV_DONTNEED) on the libraries' executable mappings only (never written: a later compile faults
    them back in from the file, as at start-up; the pages stay in the page cache, shared and reclaimable).
    Returns the bytes of code mapping released (0 where this cannot be done)."""
    released = 0
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.malloc_trim(0)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
        for line in lines:
            parts = line.split()
            if len(parts) < 6 or parts[1] != "r-xp" or not any(lib in parts[5] for lib in COMPILER_LIBRARIES):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if libc.madvise(lo, hi - lo, MADV_DONTNEED) == 0:
                released += hi - lo
    log.debug("released %d MiB of compiler code pages", released >> 20)
    return released


def read_names(tracefs: Tracefs, symbolize: Any) -> KernelNames:
    """Drop and reset reason names and TCP state names as the running kernel numbers them (tracefs)."""
    drops: dict[int, str] = {}
    rsts: dict[int, str] = {}
    states: dict[int, str] = {}
    if tracefs.exists("skb", "kfree_skb"):
        drops = tracefs.format("skb", "kfree_skb").symbolic("reason")
    if tracefs.exists("tcp", "tcp_send_reset"):
        rsts = tracefs.format("tcp", "tcp_send_reset").symbolic("reason")
    if tracefs.exists("sock", "inet_sock_set_state"):
        raw = tracefs.format("sock", "inet_sock_set_state").symbolic("newstate")
        states = {k: v.removeprefix("TCP_") for k, v in raw.items()}
    return KernelNames(
        drop_reasons=drops,
        rst_reasons=rsts,
        tcp_states=states or KernelNames().tcp_states,
        symbolize=symbolize,
    )


def _manual_attach_class(bcc: Any) -> type:
    class ManualAttachBPF(bcc.BPF):
        def _trace_autoload(self) -> None:  # load() attaches hook by hook
            return None

    return ManualAttachBPF


def _bpf_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[-1] if text else type(exc).__name__
    if isinstance(exc, PermissionError) or "Operation not permitted" in msg:
        return f"{msg} (BPF needs root with CAP_BPF/CAP_PERFMON; a container may block bpf())"
    return msg
