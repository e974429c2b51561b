"""The checks of `connprobe doctor` (the command: `connprobe/commands/doctor.py`): can this machine run the kernel
sensor? One line per check, with what to do on failure.

    ok    root            running as root
    FAIL  kernel headers  /lib/modules/6.18.4/build missing  -> run scripts/setup as root (links headers)
    warn  tracepoint ...  ...                                -> that event kind is off; the rest works

Exit status 0 when the sensor can run (warnings allowed), 1 when it cannot. Without the sensor the rest of
connprobe still works: probes run and verdicts say "no kernel evidence". The checks are the sensor's own
pre-load checks (`bpf/preload.py`), so this command and `KernelSensor.open()` agree.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | FAIL | skip
    detail: str
    fix: str = ""

    def line(self, width: int = 38) -> str:
        text = f"{self.status:<5} {self.name:<{width}} {self.detail}"
        if self.fix and self.status != OK:
            text += f"  -> {self.fix}"
        return text


def check_root() -> Check:
    from bpf import preload

    problem = preload.privilege_problem()
    if problem is None:
        return Check("root", OK, "running as root")
    if os.geteuid() != 0:
        return Check("root", FAIL, f"running as uid {os.geteuid()}",
                     "run as root (sudo connprobe doctor); BPF needs CAP_BPF + CAP_PERFMON")
    return Check("root", FAIL, problem, "grant CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)")


def check_bcc() -> Check:
    from bpf import preload
    from bpf.errors import SensorUnavailable

    try:
        bcc = preload.import_bcc()
    except SensorUnavailable as exc:
        return Check("bcc (python3-bpfcc)", FAIL, str(exc),
                     "apt-get install python3-bpfcc, then scripts/setup (the venv needs the bcc module)")
    return Check("bcc (python3-bpfcc)", OK, f"{Path(bcc.__file__).parent}")


def check_headers(modules: Path = Path("/lib/modules")) -> Check:
    from bpf import preload

    release = os.uname().release
    build = preload.kernel_headers_dir(modules)
    if build is not None:
        target = build.resolve()
        note = "" if release in target.name else f" (headers of another kernel: {target.name}; layouts come from BTF)"
        return Check("kernel headers", OK, f"{build} -> {target}{note}")
    return Check("kernel headers", FAIL, f"{preload.headers_path(modules)} missing (bcc compiles against it)",
                 "install linux-headers-$(uname -r), or run scripts/setup as root to link the installed ones")


def check_btf(path: Path = Path("/sys/kernel/btf/vmlinux")) -> Check:
    from bpf.btf import Btf, BtfError, sensor_offsets

    try:
        t0 = time.monotonic()
        offsets = sensor_offsets(Btf.load(path))
        took = time.monotonic() - t0
    except BtfError as exc:
        return Check("kernel BTF", FAIL, str(exc), "needs a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    return Check("kernel BTF", OK, f"{len(offsets)} struct offsets read in {took:.2f}s "
                                   f"(sk_buff.head={offsets['OFF_SKB_HEAD']}, net.ns.inum={offsets['OFF_NET_INUM']})")


def check_tracefs(root: Path | None = None) -> tuple[Check, object | None]:
    from bpf import preload
    from bpf.errors import SensorUnavailable

    try:
        tracefs = preload.open_tracefs(root)
    except SensorUnavailable as exc:
        return Check("tracefs", FAIL, str(exc), "as root: mount -t tracefs tracefs /sys/kernel/tracing"), None
    return Check("tracefs", OK, str(tracefs.root)), tracefs


def check_tracepoints(tracefs, btf_path: Path = Path("/sys/kernel/btf/vmlinux")) -> list[Check]:
    from bpf import preload
    from bpf.btf import Btf, BtfError, optional_offsets
    from bpf.hooks import HOOKS

    try:
        have = set(optional_offsets(Btf.load(btf_path)))
    except BtfError:
        have = set()
    out = []
    for hook in HOOKS:
        why = preload.hook_problem(hook, tracefs, have) if tracefs is not None else "no tracefs"
        if why is None:
            out.append(Check(f"tracepoint {hook.name}", OK, f"{hook.kind} events"))
        else:
            out.append(Check(f"tracepoint {hook.name}", WARN, why,
                             f"{hook.kind} events will be missing; everything else works"))
    return out


def check_reason_names(tracefs) -> Check:
    if tracefs is None or not tracefs.exists("skb", "kfree_skb"):
        return Check("drop reason names", WARN, "skb:kfree_skb format unavailable",
                     "drop reasons will be reported as numbers")
    names = tracefs.format("skb", "kfree_skb").symbolic("reason")
    if not names:
        return Check("drop reason names", WARN, "kfree_skb format has no reason table (kernel < 5.17?)",
                     "drop reasons will be reported as numbers")
    by_name = {v: k for k, v in names.items()}
    sample = ", ".join(f"{n}={by_name[n]}" for n in ("NETFILTER_DROP", "TC_EGRESS") if n in by_name)
    return Check("drop reason names", OK, f"{len(names)} names from the running kernel ({sample})")


def check_kallsyms(path: Path = Path("/proc/kallsyms")) -> Check:
    from bpf.kernel_compat import Kallsyms

    try:
        ks = Kallsyms(path)
    except OSError as exc:
        return Check("kallsyms", WARN, f"{path}: {exc.strerror}", "drop locations will not be symbolised")
    if not ks.usable:
        return Check("kallsyms", WARN, "addresses hidden (kptr_restrict)",
                     "run as root or sysctl kernel.kptr_restrict=0; drop locations will not be symbolised")
    return Check("kallsyms", OK, "drop locations can be symbolised")


def check_load() -> Check:
    from bpf.errors import SensorError
    from bpf.sensor import KernelSensor

    t0 = time.monotonic()
    try:
        with KernelSensor(ring_pages=1) as sensor:
            attached = [h.name for h in sensor.status() if h.attached]
            took = time.monotonic() - t0
    except SensorError as exc:
        return Check("BPF load + attach", FAIL, str(exc), "fix the failures above first")
    except Exception as exc:  # bcc raises plain Exceptions on compile errors
        return Check("BPF load + attach", FAIL, f"{type(exc).__name__}: {exc}",
                     "report this with the output of `connprobe doctor`")
    return Check("BPF load + attach", OK, f"{len(attached)} tracepoints attached and detached in {took:.2f}s")


def checks(load: bool = True, emit: Callable[[Check], None] | None = None) -> list[Check]:
    """Run every check in order; `emit` sees each as soon as it is done."""
    done: list[Check] = []

    def add(c: Check) -> None:
        done.append(c)
        if emit is not None:
            emit(c)

    add(check_root())
    add(check_bcc())
    add(check_headers())
    add(check_btf())
    tracefs_check, tracefs = check_tracefs()
    add(tracefs_check)
    for c in check_tracepoints(tracefs):
        add(c)
    add(check_reason_names(tracefs))
    add(check_kallsyms())
    if not load:
        add(Check("BPF load + attach", SKIP, "skipped (--no-load)"))
    elif any(c.status == FAIL for c in done):
        add(Check("BPF load + attach", SKIP, "skipped: fix the failures above first"))
    else:
        add(check_load())
    return done
