"""Least privilege for the running agent: once the kernel sensor is attached, every capability the agent no
longer needs is dropped — from the effective, permitted, inheritable, ambient and bounding sets, with
`no_new_privs` set, so neither this process nor anything it could execute gets them back.

What the running agent still needs (measured on Linux 6.18 by tests/app/test_privileges.py):

- the sensor, nothing: reading the ring buffer, updating the watch-list map, reading the counters and
  detaching at exit all go through file descriptors opened at load time, and `bpf()` checks those fds,
  not a capability, for map commands (Linux >= 5.19; before it, `kernel.unprivileged_bpf_disabled`
  also refused map updates to a process without CAP_BPF — run with `--keep-capabilities` there);
- CAP_SYS_ADMIN, for `setns()` into a network namespace: kept when a probe of the start-up configuration
  has a netns source;
- CAP_SYS_PTRACE, to open `/proc/PID/ns/net` of a process whose capabilities are not a subset of the
  agent's (a container's init, a root daemon): kept when a probe's source is such a `/proc/` path;
- CAP_NET_RAW, for the raw socket of an ICMP echo: kept when a probe is an `icmp` one.

Capabilities are per thread in Linux, and a thread inherits the sets of the thread that starts it. So the
loop thread drops before the agent listens (before the libuv workers of the bind, the default executor's
threads or any netns worker exist), and the sensor loads on one thread made just before, which drops and
ends once the sensor is attached (`Privileges`). `held_by_threads()` reads every thread's sets back: a
thread that kept more is logged and visible in `connprobe_capability_held`.

A reload that adds a probe needing a capability the agent dropped is rejected with one line per probe
(restart the agent to take the new configuration with the capabilities it needs).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from connprobe.config import ConfigError
from prober.spec import ProbeSpec

__all__ = ["CAP_NAMES", "CapSets", "Privileges", "drop_to", "held_by_threads", "needed_for", "read_caps"]

log = logging.getLogger("connprobe.privileges")

CAP_NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
CAP_BITS = {name: bit for bit, name in enumerate(CAP_NAMES)}

# linux/capability.h and linux/prctl.h
_CAP_VERSION_3 = 0x20080522
_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return len(CAP_NAMES) - 1


def cap_name(bit: int) -> str:
    return CAP_NAMES[bit] if bit < len(CAP_NAMES) else f"CAP_{bit}"


def names(mask: int) -> list[str]:
    return [cap_name(b) for b in range(64) if mask >> b & 1]


def mask_of(caps: Iterable[str]) -> int:
    m = 0
    for c in caps:
        m |= 1 << CAP_BITS[c]
    return m


def _prctl(option: int, arg: int = 0) -> int:
    rc = _libc.prctl(option, arg, 0, 0, 0)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {arg}): {os.strerror(err)}")
    return rc


def drop_to(keep: int) -> None:
    """In the calling thread only: reduce the permitted, effective, inheritable and ambient sets to `keep` (a
    bit mask), and the bounding set too when the thread holds CAP_SETPCAP (it goes first: dropping from the
    bounding set needs CAP_SETPCAP, which goes with the rest); then set no_new_privs, which alone keeps an
    execve() from regaining what is left in the bounding set (a container's, without CAP_SETPCAP).
    Raises OSError."""
    if read_caps().effective >> CAP_BITS["CAP_SETPCAP"] & 1:
        for bit in range(_last_cap() + 1):
            if not keep >> bit & 1 and _prctl(_PR_CAPBSET_READ, bit) == 1:
                _prctl(_PR_CAPBSET_DROP, bit)
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capget: {os.strerror(err)}")
    permitted = (data[0].permitted | data[1].permitted << 32) & keep
    for i in (0, 1):
        part = permitted >> (32 * i) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = part
        data[i].inheritable = 0
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


@dataclass(frozen=True)
class CapSets:
    """One thread's capability sets, as /proc/.../status shows them (bit masks)."""

    effective: int
    permitted: int
    inheritable: int
    bounding: int
    ambient: int
    no_new_privs: bool

    @property
    def held(self) -> int:
        """What the thread can use or raise. The bounding set only limits what an execve() could give, and
        with no_new_privs nothing beyond the permitted set."""
        return self.effective | self.permitted | self.inheritable | self.ambient


def read_caps(status: Path = Path("/proc/thread-self/status")) -> CapSets:
    """The capability sets in a /proc status file (`/proc/PID/status` is the main thread's)."""
    fields = {}
    for line in status.read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return CapSets(*(int(fields[k], 16) for k in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb")),
                   no_new_privs=fields.get("NoNewPrivs") == "1")


def held_by_threads(pid: int | str = "self") -> dict[int, tuple[str, CapSets]]:
    """Every thread of a process: tid -> (its name, its capability sets). Threads that end meanwhile are skipped."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = ((task / "comm").read_text().strip(), read_caps(task / "status"))
        except (OSError, KeyError, ValueError):
            continue
    return out


def needed_for(probes: Iterable[ProbeSpec]) -> dict[str, list[str]]:
    """The capabilities the running agent needs for these probes: name -> the probes that need it."""
    need: dict[str, list[str]] = {}
    for p in probes:
        if p.module.prober == "icmp":
            need.setdefault("CAP_NET_RAW", []).append(p.name)  # the echo's raw socket (prober/icmp.py)
        kind = p.source_spec.kind
        if kind == "host":
            continue
        need.setdefault("CAP_SYS_ADMIN", []).append(p.name)  # setns() into the probe's namespace
        if kind == "pid":
            need.setdefault("CAP_SYS_PTRACE", []).append(p.name)  # open another process's /proc/PID/ns/net
    return need


_WHY = {
    "CAP_NET_RAW": "an ICMP echo's raw socket, from",
    "CAP_SYS_ADMIN": "setns() into the network namespace of",
    "CAP_SYS_PTRACE": "opening another process's /proc/PID/ns/net for",
}


class Privileges:
    """The agent's capability policy. `begin(probes)` before the agent listens: the loop thread keeps only what
    the probes need, and one thread, made just before with every capability, is the loop's default executor
    while the sensor loads (the sensor's compile-and-attach runs there). `await end()` once the sensor is
    attached or has failed: that thread drops too and ends, and the loop gets a fresh default executor whose
    threads inherit the reduced sets. So the web server, the libuv workers of its bind and every thread made
    later never hold more than the probes need. `check(probes)` on reload; a Prometheus collector
    (`connprobe_capability_held{capability}`)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.dropped = False
        self.kept: dict[str, list[str]] = {}
        self.error = ""
        self._keep = 0
        self._loader: concurrent.futures.ThreadPoolExecutor | None = None

    def begin(self, probes: Iterable[ProbeSpec]) -> None:
        if not self.enabled:
            held = names(read_caps().effective)
            log.info("capabilities: dropping is off (--keep-capabilities): keeping all %d (%s)", len(held),
                     " ".join(held) or "none")
            return
        self.kept = needed_for(probes)
        self._keep = mask_of(self.kept)
        loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="connprobe-loader")
        loader.submit(int).result()  # its thread exists now, with the loop thread's capabilities
        asyncio.get_running_loop().set_default_executor(loader)
        self._loader = loader
        try:
            drop_to(self._keep)
        except OSError as exc:
            self.error = str(exc)
            log.error("capabilities: dropping failed (%s); the agent keeps %s", exc,
                      " ".join(names(read_caps().effective)) or "none")
            return
        self.dropped = True

    async def end(self) -> None:
        loader, self._loader = self._loader, None
        if loader is None:
            return
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor())
        with contextlib.suppress(OSError):  # the thread ends just after: what it holds goes with it
            await loop.run_in_executor(loader, drop_to, self._keep)
        await asyncio.to_thread(loader.shutdown)
        if not self.dropped:
            return
        own_bounding = read_caps().bounding  # the loop thread's, as far as it could be reduced
        for tid, (comm, c) in held_by_threads().items():
            extra = c.held & ~self._keep | c.bounding & ~own_bounding
            if extra or not c.no_new_privs:
                log.error("capabilities: thread %d (%s) still holds %s%s", tid, comm, " ".join(names(extra)),
                          "" if c.no_new_privs else " (no_new_privs off)")
        kept = "; ".join(f"{c} ({_WHY[c]} {', '.join(ps[:3])}{', ...' if len(ps) > 3 else ''})"
                         for c, ps in self.kept.items())
        bounding = ("bounding set too" if not own_bounding & ~self._keep else
                    "not from the bounding set: no CAP_SETPCAP, and no_new_privs keeps execve from regaining them")
        log.info("capabilities: kept %s; dropped all others (%s; no_new_privs on)", kept or "none", bounding)

    def check(self, probes: Iterable[ProbeSpec]) -> None:
        """Raise ConfigError (one line per probe) when a probe needs a capability the agent dropped at start."""
        if not self.dropped:
            return
        errors = [f"probe {name!r}: needs {cap} ({_WHY[cap]} its source), which the agent dropped at start-up "
                  "(no probe needed it then): restart the agent to use this configuration"
                  for cap, ps in needed_for(probes).items() if cap not in self.kept for name in ps]
        if errors:
            raise ConfigError(errors)

    # -- metrics ------------------------------------------------------------------------------------------

    def collect(self) -> Iterator[Any]:
        held = GaugeMetricFamily("connprobe_capability_held", "Capabilities some thread of the agent can use or "
                                 "raise (effective, permitted, inheritable or ambient set), by name: after "
                                 "start-up, only those its probes need.", labels=["capability"])
        union = 0
        try:
            for _comm, caps in held_by_threads().values():
                union |= caps.held
        except OSError:
            pass
        for name in names(union):
            held.add_metric([name], 1.0)
        yield held

    def describe(self) -> Iterator[Any]:
        return iter(())
