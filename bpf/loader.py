"""The sensor's loader: compile `bpf/sensor.c` with bcc, attach each hook on its own, read the kernel's names.

bcc's automatic attaching is off (a failure half-way through its constructor would leave the hooks attached
before it with no object to clean them up). If the whole program does not compile, each hook is compiled
alone to find the culprits, and the rest is compiled together; a hook that fails costs one event kind.
"""

from __future__ import annotations

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
    return bpf, failed, cflags


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
