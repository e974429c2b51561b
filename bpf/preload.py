"""The kernel sensor's pre-load checks: what must hold before its BPF programs can be compiled and attached.

One set of checks for the two that ask: `KernelSensor.open()` (`bpf/sensor.py`) raises `SensorUnavailable`
with the first problem, `connprobe doctor` (`connprobe/doctor.py`) prints one line per check. So the doctor
says "ready" exactly when the sensor would get as far as compiling.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from bpf.btf import OPTIONAL_FIELDS, SEQ_FIELDS, Btf, BtfError, optional_offsets, sensor_offsets
from bpf.errors import SensorUnavailable
from bpf.hooks import HookSpec
from bpf.kernel_compat import Tracefs, TracefsUnavailable

log = logging.getLogger("bpf.sensor")  # the sensor's warnings keep their logger name

MODULES_DIR = Path("/lib/modules")
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def import_bcc() -> Any:
    try:
        import bcc
    except ImportError as exc:
        raise SensorUnavailable(
            f"bcc is not importable ({exc}): install python3-bpfcc and run scripts/setup"
        ) from None
    return bcc


def missing_capabilities(status: Path = Path("/proc/thread-self/status")) -> list[str]:
    """Capabilities the calling thread lacks to load and attach tracing programs (empty: none missing).
    Capabilities are per thread: /proc/self/status shows the main thread's, not the loading thread's.

    Checked up front: without them every program fails to load one by one, slowly and with a message
    that does not say why.
    """
    try:
        line = next(ln for ln in status.read_text().splitlines() if ln.startswith("CapEff:"))
    except (OSError, StopIteration):
        return []  # cannot tell: let the load itself decide
    eff = int(line.split()[1], 16)
    if eff >> CAP_SYS_ADMIN & 1:
        return []
    return [name for bit, name in ((CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")) if not eff >> bit & 1]


def privilege_problem() -> str | None:
    """Why this process cannot load tracing programs (not root, or root without the capabilities), or None."""
    if os.geteuid() != 0:
        return "not root: the kernel sensor needs root (CAP_BPF and CAP_PERFMON)"
    missing = missing_capabilities()
    if missing:
        return (f"root without {' and '.join(missing)}: loading BPF tracing programs needs them "
                "(or CAP_SYS_ADMIN); grant them to the process (a container: securityContext.capabilities.add)")
    return None


def headers_path(modules: Path | None = None) -> Path:
    """Where bcc looks for the kernel headers it compiles against: `/lib/modules/$(uname -r)/build`."""
    return (modules or MODULES_DIR) / os.uname().release / "build"


def kernel_headers_dir(modules: Path | None = None) -> Path | None:
    """The kernel headers bcc will compile against, or None when it would find none.

    bcc opens `/lib/modules/R/build`; it adds `source` only when `build` is there too (a split Debian
    headers install), so `source` alone does not let it compile. scripts/setup and the image's entrypoint
    link both (README, "The container image").
    """
    build = headers_path(modules)
    return build if build.exists() else None


def open_tracefs(root: Path | None = None) -> Tracefs:
    try:
        return Tracefs(root)
    except TracefsUnavailable as exc:
        raise SensorUnavailable(str(exc)) from None


def kernel_offsets(btf_path: Path | None = None) -> dict[str, int]:
    """Every struct offset the programs are compiled with (`-DOFF_...`), from the running kernel's BTF.
    The required ones missing: SensorUnavailable; an optional one missing turns its hook (or the
    retransmissions' sequence numbers) off."""
    try:
        btf = Btf.load(btf_path) if btf_path else Btf.load()
        offsets = sensor_offsets(btf)
        offsets.update(optional_offsets(btf, OPTIONAL_FIELDS))
        seq = optional_offsets(btf, SEQ_FIELDS)
    except BtfError as exc:
        raise SensorUnavailable(f"kernel BTF unusable: {exc} (needs CONFIG_DEBUG_INFO_BTF=y)") from None
    for macro, struct_name, path in SEQ_FIELDS:
        if macro not in seq:
            log.warning("kernel sensor: BTF lacks %s.%s: retransmissions carry no sequence numbers",
                        struct_name, path)
    offsets.update(seq)
    return offsets


def hook_problem(hook: HookSpec, tracefs: Tracefs, offsets: dict[str, int] | set[str]) -> str | None:
    """Why this hook cannot be attached on this kernel (its tracepoint or a field missing, a BTF offset it
    needs absent), or None."""
    why = tracefs.check(hook.category, hook.event, dict(hook.fields))
    missing = [m for m in hook.offsets if m not in offsets]
    if why is None and missing:
        why = f"kernel BTF lacks {', '.join(missing)} (or has it as a bitfield)"
    return why
