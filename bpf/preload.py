"""The kernel sensor's pre-load checks: what must hold before its BPF programs can be compiled and attached.

One set of checks for the two that ask: `KernelSensor.open()` (`bpf/sensor.py`) raises `SensorUnavailable`
with the first problem, `connprobe doctor` (`connprobe/doctor.py`) prints one line per check. So the doctor
says "ready" exactly when the sensor would get as far as compiling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from bpf import btf as btf_module
from bpf.btf import (
    OPTIONAL_FIELDS,
    SENSOR_FIELDS,
    SEQ_FIELDS,
    VMLINUX_BTF,
    Btf,
    BtfError,
    optional_offsets,
    sensor_offsets,
)
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


def kernel_offsets(btf_path: Path | None = None, cache_dir: Path | None = None) -> dict[str, int]:
    """Every struct offset the programs are compiled with (`-DOFF_...`), from the running kernel's BTF.
    The required ones missing: SensorUnavailable; an optional one missing turns its hook (or the
    retransmissions' sequence numbers) off.

    The running kernel's offsets are cached (`offsets_cache_path`): they depend only on the kernel and on the
    field tables, and parsing BTF is a third of a cold start. A cache file that does not read back as
    offsets is ignored and rewritten. `btf_path` (a recorded BTF file) is never cached."""
    cache = offsets_cache_path(cache_dir) if btf_path is None else None
    offsets = _read_cached(cache) if cache is not None else None
    if offsets is None:
        try:
            btf = Btf.load(btf_path) if btf_path else Btf.load()
            offsets = sensor_offsets(btf)
            offsets.update(optional_offsets(btf, OPTIONAL_FIELDS))
            offsets.update(optional_offsets(btf, SEQ_FIELDS))
        except BtfError as exc:
            raise SensorUnavailable(f"kernel BTF unusable: {exc} (needs CONFIG_DEBUG_INFO_BTF=y)") from None
        if cache is not None:
            _write_cached(cache, offsets)
    for macro, struct_name, path in SEQ_FIELDS:
        if macro not in offsets:
            log.warning("kernel sensor: BTF lacks %s.%s: retransmissions carry no sequence numbers",
                        struct_name, path)
    return offsets


CACHE_DIR = Path("/var/cache/connprobe")
_MACRO = re.compile(r"OFF_[A-Z0-9_]{1,64}")


def offsets_cache_path(cache_dir: Path | None = None) -> Path | None:
    """Where the running kernel's offsets are cached ($CONNPROBE_CACHE_DIR or /var/cache/connprobe): one file
    per kernel build (release, version string, size of its BTF) and version of the field tables; None when
    the kernel has no BTF file."""
    try:
        size = VMLINUX_BTF.stat().st_size
    except OSError:
        return None
    uname = os.uname()
    tables = repr((SENSOR_FIELDS, OPTIONAL_FIELDS, SEQ_FIELDS)).encode()
    key = hashlib.sha256(b"\0".join([uname.release.encode(), uname.version.encode(), str(size).encode(),
                                      tables, Path(btf_module.__file__).read_bytes()])).hexdigest()[:24]
    root = cache_dir or Path(os.environ.get("CONNPROBE_CACHE_DIR") or CACHE_DIR)
    return root / f"offsets-{uname.release[:64]}-{key}.json"


def _read_cached(path: Path) -> dict[str, int] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(data, dict) or not data
            or not all(isinstance(k, str) and _MACRO.fullmatch(k) and type(v) is int and 0 <= v < 1 << 20
                       for k, v in data.items())
            or not all(m in data for m, _, _ in SENSOR_FIELDS)):
        log.warning("kernel sensor: ignoring the offsets cache %s: not a table of offsets", path)
        return None
    return data


def _write_cached(path: Path, offsets: dict[str, int]) -> None:
    """Written whole or not at all (a temporary file renamed), readable by root only."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(offsets, f, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only /var: every start parses BTF, nothing else changes
        log.debug("kernel sensor: offsets not cached at %s: %s", path, exc)


def hook_problem(hook: HookSpec, tracefs: Tracefs, offsets: dict[str, int] | set[str]) -> str | None:
    """Why this hook cannot be attached on this kernel (its tracepoint or a field missing, a BTF offset it
    needs absent), or None."""
    why = tracefs.check(hook.category, hook.event, dict(hook.fields))
    missing = [m for m in hook.offsets if m not in offsets]
    if why is None and missing:
        why = f"kernel BTF lacks {', '.join(missing)} (or has it as a bitfield)"
    return why
