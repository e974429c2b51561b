"""The kernel sensor: bcc programs on stable tracepoints that report what the kernel did with a probe's packets.

    async with KernelSensor() as sensor:
        sensor.watch("tcp", local_port)          # before connect()
        ...                                     # the probe runs
        async for event in sensor: ...           # frozen KernelEvents (ts on CLOCK_MONOTONIC ns)
        sensor.counters()                        # node-level per-kind / per-reason counts, all traffic
        sensor.status()                          # which hooks are attached, and why any is not

    KernelSensor(netns={inode, ...})             # only events seen in these network namespaces (this node's);
                                                 # default None: every namespace (a single node)
    KernelSensor(state_records={"ESTABLISHED", "CLOSE"})  # a watched flow's TCP state changes to other states
                                                 # are only counted (counters().watched), not sent as events;
                                                 # default None: every change is an event

Errors (`bpf/errors.py`): `SensorUnavailable` (the sensor cannot run here; the message names the missing
piece), `SensorClosed` (used after close()), `WatchListFull`; all are `SensorError`s.

A hook whose tracepoint (or a field it needs) is missing is left out with a warning; the others run.
The parts: the hook table `bpf/hooks.py`, the pre-load checks `bpf/preload.py` (shared with `connprobe
doctor`), compiling and attaching `bpf/loader.py`, program run-time statistics `bpf/runstats.py`; this module
keeps the running sensor (its life cycle, the watch list, events and counters). Offsets of kernel struct
fields come from BTF (bpf/btf.py), reason names from tracefs (bpf/kernel_compat.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import mmap
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpf import loader, preload, runstats
from bpf.decode import (
    DEFAULT_TCP_STATES,
    NUMBER_BY_KIND,
    PROTO_NUMBERS,
    RECORD_STRUCT,
    KernelNames,
    decode_event,
    decode_records,
)
from bpf.errors import SensorClosed, SensorError, SensorUnavailable, WatchListFull
from bpf.hooks import HOOKS, HookSpec, HookStatus
from bpf.kernel_compat import Kallsyms
from bpf.ring import RingReader, wait_any
from bpf.types import EventKind, KernelEvent

RESCUE_PAGES = 16  # the second ring (sensor.c): 64 KiB, ~580 records

__all__ = ["DEFAULT_QUIET_REASONS", "KernelSensor", "SensorCounters"]

log = logging.getLogger(__name__)

# Drop reasons that fire on normal operation (QUEUE_PURGE on every close, ...): counted, never sent.
DEFAULT_QUIET_REASONS = ("NOT_SPECIFIED", "QUEUE_PURGE", "SOCKET_CLOSE", "SKB_CONSUMED", "NOT_DROPPED_YET")


@dataclass(frozen=True, slots=True)
class SensorCounters:
    """In-kernel counts since load. Keys are (kind, reason name); reason is "" for kinds without one."""

    events: dict[tuple[EventKind, str], int]  # every event, watched or not (node-level telemetry)
    watched: dict[tuple[EventKind, str], int]  # the subset on watched flows
    lost: int  # failed ring-buffer reservations (kernel) + records dropped by a full user-space queue
    ring_lost: int
    queue_lost: int
    delivered: int  # records decoded in user space

    def total(self, kind: EventKind, reason: str | None = None, *, watched: bool = False) -> int:
        table = self.watched if watched else self.events
        return sum(n for (k, r), n in table.items() if k == kind and (reason is None or r == reason))


def state_record_mask(states: frozenset[str] | None, names: KernelNames) -> int | None:
    """The STATE_RECORD_MASK of sensor.c for these state names, numbered as the running kernel numbers them (None:
    every state; a name this kernel's table lacks is looked up in the stable default numbering)."""
    if states is None:
        return None
    numbers = {name: n for n, name in DEFAULT_TCP_STATES.items()}
    numbers.update({name: n for n, name in names.tcp_states.items()})
    mask = 0
    for name in states:
        n = numbers[name]
        if not 0 <= n < 16:
            return None  # a numbering the program's 16 slots cannot hold: report every change
        mask |= 1 << n
    return mask


class KernelSensor:
    """Loads the BPF programs, keeps the watch list, and delivers decoded events.

    Use as an async context manager (events are read on the running loop), or call `open()`/`close()`
    and `poll()` from synchronous code. Parameters are passed in so tests can shrink the ring buffer or
    read recorded tracefs/BTF files.
    """

    def __init__(
        self,
        *,
        ring_pages: int = 256,
        watch_max: int = 16384,
        queue_max: int = 100_000,
        quiet_reasons: tuple[str, ...] = DEFAULT_QUIET_REASONS,
        hooks: tuple[HookSpec, ...] = HOOKS,
        btf_path: Path | None = None,
        tracefs_root: Path | None = None,
        kallsyms_path: Path = Path("/proc/kallsyms"),
        debug_source: bool | None = None,
        netns: Iterable[int] | None = None,
        lazy_kallsyms: bool = False,
        state_records: Iterable[str] | None = None,
    ):
        if ring_pages < 1 or ring_pages & (ring_pages - 1):
            raise ValueError("ring_pages must be a power of two")
        self.ring_pages = ring_pages
        self.watch_max = watch_max
        self.queue_max = queue_max
        self.quiet_reasons = quiet_reasons
        self.hooks = hooks
        # The namespaces this sensor answers for (a node's, in the two-node lab); None: all of them.
        self.netns: frozenset[int] | None = None if netns is None else frozenset(netns)
        if self.netns is not None and not self.netns:
            raise ValueError("netns: an empty set of namespaces would report nothing (None means all)")
        if self.netns is not None and any(not 0 < n < 1 << 32 for n in self.netns):
            raise ValueError("netns: inode numbers are 32-bit positive integers")
        # TCP states (names as tracefs spells them, without TCP_) whose changes on watched flows become events;
        # None: all of them. The rest are counted in the kernel (`counters().watched`) and go no further.
        if state_records is not None:
            state_records = frozenset((state_records,) if isinstance(state_records, str) else state_records)
            known = set(DEFAULT_TCP_STATES.values())
            bad = sorted(str(x) for x in state_records if x not in known)
            if bad:
                raise ValueError(f"state_records: unknown TCP state {bad[0]!r} (known: {', '.join(sorted(known))})")
        self.state_records: frozenset[str] | None = state_records
        self._btf_path = btf_path
        self._tracefs_root = tracefs_root
        self._kallsyms_path = kallsyms_path
        # CONNPROBE_BPF_SOURCE=1 prints the program text and the cflags it is compiled with to stderr.
        self._debug_source = os.environ.get("CONNPROBE_BPF_SOURCE") == "1" if debug_source is None else debug_source
        self._bpf: Any = None
        self._status: list[HookStatus] = []
        self._names = KernelNames()
        self._kallsyms: Kallsyms | None = None
        # lazy: /proc/kallsyms is read at the first drop location to name (a healthy diagnose never needs it),
        # not during the load. Not for a process that drops CAP_SYSLOG after loading (the agent): kallsyms then
        # reads as zeros.
        self._lazy_kallsyms = lazy_kallsyms
        self._kallsyms_lock = threading.Lock()
        self._watch_refs: collections.Counter[tuple[int, int]] = collections.Counter()
        self._protos_on_port: collections.Counter[int] = collections.Counter()  # port -> protocols watching it
        self._watch_lock = threading.Lock()
        self._buf: collections.deque[KernelEvent] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ring_fd: int | None = None
        self._queue_lost = 0
        self._delivered = 0
        self._closed = False
        self._reader: RingReader | None = None
        self._rescue: RingReader | None = None  # the second ring, for records the first refused (sensor.c emit())
        self._final: SensorCounters | None = None
        self._final_rescued = 0
        self.load_seconds: float | None = None
        self.cflags: list[str] = []

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def __aenter__(self) -> KernelSensor:
        # BTF parsing, compiling and kallsyms take about a second: not on the event loop.
        await asyncio.to_thread(self.open)
        try:
            self._attach_loop(asyncio.get_running_loop())
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __enter__(self) -> KernelSensor:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Check the machine, compile, load and attach. Raises SensorUnavailable naming what is missing."""
        if self._bpf is not None:
            return
        if self._closed:
            raise SensorClosed("the sensor was closed; create a new one")
        t0 = time.monotonic()
        bcc = preload.import_bcc()
        problem = preload.privilege_problem()
        if problem:
            raise SensorUnavailable(problem)
        tracefs = preload.open_tracefs(self._tracefs_root)
        offsets = preload.kernel_offsets(self._btf_path)
        if preload.kernel_headers_dir() is None:
            raise SensorUnavailable(
                f"no kernel headers at {preload.headers_path()}: bcc needs them to compile; "
                "install linux-headers and run scripts/setup as root (it links them there)"
            )
        self._names = loader.read_names(tracefs, self._symbolize)

        enabled: list[HookSpec] = []
        status: dict[str, HookStatus] = {}
        for hook in self.hooks:
            why = preload.hook_problem(hook, tracefs, offsets)
            if why is None:
                enabled.append(hook)
            else:
                log.warning("kernel sensor: %s: %s; %s events are off", hook.name, why, hook.kind)
                status[hook.name] = HookStatus(hook.name, hook.kind, False, why)
        if not enabled:
            raise SensorUnavailable(
                "no usable tracepoint on this kernel: " + "; ".join(h.detail for h in status.values())
            )
        base = loader.compile_flags(tracefs, offsets, self.ring_pages, self.watch_max)
        if self.netns is not None:
            base.append("-DNETNS_FILTER")
        base.append(f"-DRESCUE_PAGES={RESCUE_PAGES}")
        mask = state_record_mask(self.state_records, self._names)
        if mask is not None:
            base.append(f"-DSTATE_RECORD_MASK={mask:#x}")
        # kallsyms (~0.2 s of parsing) is read on a thread while bcc compiles (a C++ call that releases the GIL)
        kallsyms = threading.Thread(target=self._read_kallsyms, name="connprobe-kallsyms", daemon=True)
        if not self._lazy_kallsyms:
            kallsyms.start()
        try:
            bpf, failed, self.cflags = loader.load(bcc, base, enabled, debug_source=self._debug_source)
        finally:
            if not self._lazy_kallsyms:
                kallsyms.join()
        for hook, why in failed.items():
            log.warning("kernel sensor: %s: %s; %s events are off", hook.name, why, hook.kind)
            status[hook.name] = HookStatus(hook.name, hook.kind, False, why)
        for hook in enabled:
            if hook not in failed:
                status[hook.name] = HookStatus(hook.name, hook.kind, True, "")
        self._status = [status[h.name] for h in self.hooks]
        self._bpf = bpf
        try:
            self._fill_quiet()
            if self.netns is not None:
                self._fill_netns(self.netns)
            # read in batches through mmap (bpf/ring.py), not with a ctypes callback per record
            self._reader = RingReader(self._bpf[b"events"].map_fd, self.ring_pages * mmap.PAGESIZE)
            self._ring_fd = self._reader.fd
            self._rescue = RingReader(self._bpf[b"rescue"].map_fd, RESCUE_PAGES * mmap.PAGESIZE)
        except Exception:
            self._teardown()
            raise
        self.load_seconds = time.monotonic() - t0

    def _read_kallsyms(self) -> None:
        try:
            self._kallsyms = Kallsyms(self._kallsyms_path)
        except OSError as exc:
            log.warning("kernel sensor: %s unreadable (%s): drop locations will not be symbolised",
                        self._kallsyms_path, exc)

    def _symbolize(self, addr: int) -> str | None:
        if self._lazy_kallsyms and self._kallsyms is None:
            with self._kallsyms_lock:
                if self._lazy_kallsyms:
                    self._lazy_kallsyms = False  # read once, whether or not it can be
                    self._read_kallsyms()
        return self._kallsyms.lookup(addr) if self._kallsyms is not None else None

    def _fill_quiet(self) -> None:
        table = self._bpf[b"quiet"]
        by_name = {v: k for k, v in self._names.drop_reasons.items()}
        for name in self.quiet_reasons:
            if name in by_name:
                table[table.Key(by_name[name])] = table.Leaf(1)

    def _fill_netns(self, inodes: frozenset[int]) -> None:
        table = self._bpf[b"node_netns"]
        if len(inodes) > 1024:
            raise ValueError(f"netns: {len(inodes)} namespaces, more than the sensor's 1024")
        for key in list(table.keys()):
            if key.value not in inodes:
                del table[key]
        for inode in inodes:
            table[table.Key(inode)] = table.Leaf(1)

    def set_netns(self, inodes: Iterable[int]) -> None:
        """Change the namespaces a filtered sensor reports (a node's pods come and go). A sensor opened without a
        filter reports every namespace and cannot be narrowed later (the filter is compiled in)."""
        new = frozenset(inodes)
        if self.netns is None:
            raise SensorError("this sensor reports every namespace: open it with netns=... to filter")
        if not new:
            raise ValueError("netns: an empty set of namespaces would report nothing")
        if self._bpf is not None:
            self._fill_netns(new)
        self.netns = new

    @property
    def foreign_events(self) -> int:
        """Watched events dropped in the kernel because their namespace is not this sensor's (0 unfiltered)."""
        if self._bpf is None or self.netns is None:
            return 0
        return sum(sum(v) for v in self._bpf[b"foreign"].values())

    def _attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if self._ring_fd is not None:
            loop.add_reader(self._ring_fd, self._consume)
        if self._rescue is not None:
            loop.add_reader(self._rescue.fd, self._consume)

    def close(self) -> None:
        """Detach every program and free the maps. Idempotent; wakes any waiting iterator."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and self._ring_fd is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._ring_fd)
        if self._loop is not None and self._rescue is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._rescue.fd)
        if self._bpf is not None:
            with contextlib.suppress(Exception):
                self._consume()
            with contextlib.suppress(Exception):
                self._final = self.counters()  # what counters()/lost_events answer after close
            with contextlib.suppress(Exception):
                self._final_rescued = self.rescued_events
        self._teardown()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _teardown(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        rescue, self._rescue = self._rescue, None
        if rescue is not None:
            rescue.close()
        bpf, self._bpf = self._bpf, None
        if bpf is not None:
            bpf.cleanup()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- watch list ---------------------------------------------------------------------------------------

    def _key(self, proto: str, port: int) -> tuple[int, int]:
        if proto not in ("tcp", "udp", "icmp"):  # icmp: an echo's identifier is its port (sensor.c)
            raise ValueError(f"proto must be 'tcp', 'udp' or 'icmp', not {proto!r}")
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        return PROTO_NUMBERS[proto], port

    def _require_open(self) -> Any:
        if self._bpf is None:
            raise SensorClosed("the sensor is not open")
        return self._bpf

    def watch(self, proto: str, port: int) -> None:
        """Send events of flows with this local port (either side of the flow) to user space.

        Call before connect()/sendto(). Reference-counted: two probes in different namespaces may
        watch the same port; the port stays watched until both unwatch it.
        """
        key = self._key(proto, port)
        table = self._require_open()[b"watch"]
        with self._watch_lock:  # probes register from worker threads (one per namespace) too
            if self._watch_refs[key] == 0:
                if len(self._watch_refs) >= self.watch_max:
                    raise WatchListFull(f"the watch list is full ({self.watch_max} ports): {proto}/{port} not watched")
                self._port_protos(key[1], +1)  # the port's prefilter first: the kernel looks there first
                try:
                    table[table.Key((key[0] << 16) | key[1])] = table.Leaf(1)
                except Exception as exc:  # bcc raises a bare Exception with the errno's text
                    self._port_protos(key[1], -1)
                    raise WatchListFull(f"watching {proto}/{port} failed: {exc}") from None
            self._watch_refs[key] += 1

    def _port_protos(self, port: int, delta: int) -> None:
        """Keep `watch_ports[port]` (sensor.c: how many protocols watch the port) with the watch list."""
        n = self._protos_on_port[port] + delta
        if n > 0:
            self._protos_on_port[port] = n
        else:
            self._protos_on_port.pop(port, None)
        if self._bpf is not None:
            ports = self._bpf[b"watch_ports"]
            ports[ports.Key(port)] = ports.Leaf(min(n, 255))

    @property
    def watch_count(self) -> int:
        """Ports on the watch list now."""
        with self._watch_lock:
            return len(self._watch_refs)

    def unwatch(self, proto: str, port: int) -> None:
        key = self._key(proto, port)
        with self._watch_lock:
            if self._watch_refs[key] == 0:
                return
            self._watch_refs[key] -= 1
            if self._watch_refs[key] == 0:
                del self._watch_refs[key]
                if self._bpf is not None:
                    table = self._bpf[b"watch"]
                    with contextlib.suppress(KeyError):
                        del table[table.Key((key[0] << 16) | key[1])]
                    self._port_protos(key[1], -1)

    def watched(self) -> set[tuple[str, int]]:
        names = {v: k for k, v in PROTO_NUMBERS.items()}
        with self._watch_lock:
            return {(names[p], port) for p, port in self._watch_refs}

    # -- events -------------------------------------------------------------------------------------------

    def _consume(self) -> None:
        """Read and decode every record the ring holds now (one batch), queue the events, wake a waiter."""
        reader = self._reader
        if reader is None or self._bpf is None:
            return
        fixed, other = reader.read(RECORD_STRUCT)
        if self._rescue is not None and self._rescue.pending():  # rare: records the first ring refused
            more, more_other = self._rescue.read(RECORD_STRUCT)
            fixed += more
            other += more_other
        if not fixed:
            return
        if not other:
            try:
                events = decode_records(fixed, self._names)
            except Exception:  # one bad record: decode one by one, counting the bad ones
                events = self._decode_each(fixed, [])
        else:
            events = self._decode_each(fixed, other)
        room = self.queue_max - len(self._buf)
        if len(events) > room:
            self._queue_lost += len(events) - max(room, 0)
            events = events[:max(room, 0)]
        if events:
            self._buf.extend(events)
            self._delivered += len(events)
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    def _decode_each(self, fixed: list, other: list[bytes]) -> list[KernelEvent]:
        out: list[KernelEvent] = []
        others = iter(other)
        for fields in fixed:
            try:
                if fields is None:  # a record of another size (an older layout, or garbage)
                    out.append(decode_event(next(others), self._names))
                else:
                    out.extend(decode_records([fields], self._names))
            except Exception:
                log.exception("kernel sensor: undecodable ring-buffer record")
        return out

    def poll(self, timeout_ms: int = 0) -> None:
        """Read pending ring-buffer records (synchronous use; async users get them on the loop)."""
        self._require_open()
        rings = [r for r in (self._reader, self._rescue) if r is not None]
        if timeout_ms > 0 and rings and not any(r.pending() for r in rings):
            wait_any(rings, timeout_ms)  # both: a record the first ring refused is only in the second
        self._consume()

    def drain(self) -> list[KernelEvent]:
        """Every event read so far and not yet taken, oldest first."""
        self._consume()
        out = list(self._buf)
        self._buf.clear()
        return out

    def __aiter__(self) -> KernelSensor:
        return self

    async def __anext__(self) -> KernelEvent:
        while not self._buf:
            if self._closed:
                raise StopAsyncIteration
            self._consume()
            if self._buf:
                break
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._buf.popleft()

    async def next_event(self, timeout: float) -> KernelEvent | None:
        """The next event, or None after `timeout` seconds without one."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except (TimeoutError, StopAsyncIteration):
            return None

    # -- telemetry ----------------------------------------------------------------------------------------

    @property
    def ring_lost(self) -> int:
        if self._bpf is None and self._final is not None:
            return self._final.ring_lost
        bpf = self._require_open()
        return sum(sum(v) for v in bpf[b"lost"].values())

    @property
    def rescued_events(self) -> int:
        """Records the ring refused that the second ring took (delivered all the same)."""
        if self._bpf is None:
            return self._final_rescued
        return sum(sum(v) for v in self._bpf[b"rescued"].values())

    @property
    def lost_events(self) -> int:
        """Events that happened on watched flows but never reached the caller."""
        return self.ring_lost + self._queue_lost

    def counters(self) -> SensorCounters:
        """In-kernel counts since load (after close: the last counts, read while closing)."""
        if self._bpf is None and self._final is not None:
            return self._final
        bpf = self._require_open()
        kinds = {v: k for k, v in NUMBER_BY_KIND.items()}
        events: collections.Counter[tuple[EventKind, str]] = collections.Counter()
        watched: collections.Counter[tuple[EventKind, str]] = collections.Counter()
        for key, values in bpf[b"counts"].items():
            kind = kinds.get(key.kind)
            if kind is None:
                continue
            label = (kind, self._names.reason_name(kind, key.reason))
            n = sum(values)
            events[label] += n
            if key.watched:
                watched[label] += n
        # TCP state changes: counted in an array of their own, [watched * 16 + new state] (sensor.c)
        for key, values in bpf[b"state_counts"].items():
            n = sum(values)
            if not n:
                continue
            label = (EventKind.STATE, self._names.reason_name(EventKind.STATE, key.value & 15))
            events[label] += n
            if key.value >= 16:
                watched[label] += n
        ring_lost = self.ring_lost
        return SensorCounters(
            events=dict(events),
            watched=dict(watched),
            lost=ring_lost + self._queue_lost,
            ring_lost=ring_lost,
            queue_lost=self._queue_lost,
            delivered=self._delivered,
        )

    def status(self) -> list[HookStatus]:
        return list(self._status)

    @property
    def names(self) -> KernelNames:
        return self._names

    def prog_stats(self) -> dict[str, tuple[int, int]]:
        """Per attached program: (times run, total ns spent in it), from /proc/self/fdinfo. Both stay 0 unless
        the kernel's BPF run-time statistics are on (`bpf_run_time_stats()` or kernel.bpf_stats_enabled)."""
        return runstats.program_stats(self._require_open())

    def prog_ids(self) -> list[int]:
        """Kernel ids of the loaded BPF programs (from /proc/self/fdinfo), for `bpftool prog show id N`."""
        return runstats.program_ids(self._require_open())
