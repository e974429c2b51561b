"""Where verdicts go: every sink consumes `Verdict`s and none of them can block the agent's pipeline.

    pipeline ──offer(verdict)──► QueuedSink(name, handler, maxsize) ──worker task──► handler(verdict)

`offer()` never waits: it puts the verdict on the sink's bounded queue, and when the queue is full the
verdict is dropped for that sink and counted (`dropped`). A slow handler (a full disk, a stuck stdout
pipe) only makes its own queue overflow; the other sinks and the probes keep going. A handler that raises
is counted in `errors` and logged once per kind of error; the worker keeps running. A handler that does
blocking I/O (`threaded=True`) runs in a worker thread, so a stuck write cannot stall the event loop either.

The handlers themselves live here too: `JsonLinesWriter` (one JSON object per verdict) and `StatusBoard` (the
recent verdicts per probe that the status page shows). The metrics handler is `connprobe.metrics.Metrics.observe`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import json
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

from correlator.types import Cause, Verdict
from prober.redact import redact_text, redact_url
from prober.types import PhaseSpan, ProbeResult

__all__ = ["BoardEntry", "JsonLinesWriter", "QueuedSink", "StatusBoard", "verdict_document"]

log = logging.getLogger(__name__)

Handler = Callable[[Verdict], Any | Awaitable[Any]]


class QueuedSink:
    """A bounded queue in front of one handler, drained by its own task."""

    def __init__(self, name: str, handler: Handler, maxsize: int = 1000, *, threaded: bool = False):
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.name = name
        self.handler = handler
        self.queue: asyncio.Queue[Verdict] = asyncio.Queue(maxsize)
        self.dropped = 0
        self.errors = 0
        self.written = 0
        self._task: asyncio.Task | None = None
        self._is_async = inspect.iscoroutinefunction(handler)
        self.threaded = threaded  # a blocking handler (file, pipe) runs in a thread: a stuck write stalls only it
        self._logged: set[str] = set()

    def offer(self, verdict: Verdict) -> bool:
        """Queue a verdict for the handler; False (and counted) when the queue is full. Never blocks."""
        try:
            self.queue.put_nowait(verdict)
        except asyncio.QueueFull:
            self.dropped += 1
            return False
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._work(), name=f"connprobe-sink-{self.name}")

    async def stop(self, flush_timeout: float = 2.0) -> None:
        """Give the handler `flush_timeout` seconds to write what is queued, then stop the worker."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.join(), flush_timeout)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _work(self) -> None:
        while True:
            verdict = await self.queue.get()
            try:
                if self.threaded and not self._is_async:
                    await asyncio.to_thread(self.handler, verdict)
                else:
                    out = self.handler(verdict)
                    if self._is_async or inspect.isawaitable(out):
                        await out
                self.written += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                kind = type(exc).__name__
                if kind not in self._logged:
                    self._logged.add(kind)
                    log.error("sink %s: %s: %s (further errors of this kind are only counted)", self.name, kind, exc)
            finally:
                self.queue.task_done()


# -- JSON lines ---------------------------------------------------------------------------------------------


def verdict_document(v: Verdict, wall_time: float | None = None) -> dict[str, Any]:
    """A verdict as one JSON-able object (the JSON-lines log and the status page's data).

    The result's target and texts were redacted where the result was built (`prober.redact`); they go
    through the redactor's structural rules once more here, so a result built elsewhere can't leak a URL's
    userinfo, query values or fragment into `/api/recent` or the log."""
    r = v.result
    return {
        "time": round(wall_time if wall_time is not None else time.time(), 3),
        "probe": r.name,
        "kind": str(r.kind),
        "target": redact_url(r.target),
        "source": r.source,
        "address": r.address,
        "ok": r.ok,
        "error": str(r.error) if r.error else None,
        "error_detail": redact_text(r.error_detail) or None,
        "http_status": r.http_status,
        "duration_ms": round(r.duration_ns / 1e6, 3),
        "phases_ms": {k: round(ns / 1e6, 3) for k, ns in r.phase_durations_ns().items()},
        "suspect": r.suspect,
        "cause": str(v.cause),
        "sub_cause": v.sub_cause,
        "confidence": v.confidence,
        "rule": v.rule,
        "summary": redact_text(v.summary),
        "facts": [redact_text(f) for f in v.facts],
        "kernel_events": len(v.evidence),
        "remote": [{"node": x.node, "available": x.available, "reason": x.reason, "events": len(x.events)}
                   for x in v.remote],  # peer agents asked (cross-node evidence)
        "labels": dict(r.labels),  # the probe's `labels:` from the config
    }


class JsonLinesWriter:
    """Writes one JSON object per verdict to a text stream, flushed per line (tail -f works)."""

    def __init__(self, stream: IO[str], clock: Callable[[], float] = time.time):
        self.stream = stream
        self.clock = clock

    def __call__(self, v: Verdict) -> None:
        self.stream.write(json.dumps(verdict_document(v, self.clock()), separators=(",", ":")) + "\n")
        self.stream.flush()


# -- the status page's ring ---------------------------------------------------------------------------------


class BoardEntry:
    """One kept verdict of a probe and the wall time it was recorded."""

    __slots__ = ("verdict", "wall_time")

    def __init__(self, wall_time: float, verdict: Verdict):
        self.wall_time = wall_time
        self.verdict = verdict

    @property
    def cause(self) -> Cause:
        return self.verdict.cause

    def __repr__(self) -> str:
        return f"BoardEntry(wall_time={self.wall_time!r}, verdict={self.verdict!r})"


# What a healthy verdict has in common with the probe's previous ones (shared by the entries while it stays the
# same): the result's and the verdict's fields that do not change from run to run, and the phases' names.
_Shape = tuple
_TIMES = struct.Struct("<dqq")  # wall time, the result's start and end (CLOCK_MONOTONIC ns); then each phase's ns


def _shape_of(v: Verdict) -> _Shape:
    r = v.result
    names: list[str] = []
    for span in r.phases:
        if span.name not in names:
            names.append(span.name)
    return (r.name, r.kind, r.target, r.source, r.ok, r.error, r.error_detail, r.http_status, r.address, r.suspect,
            r.labels, v.cause, v.sub_cause, v.confidence, v.rule, tuple(names))


class _KeptEntry(BoardEntry):
    """An older healthy verdict of a probe, kept as what the status page and `/api/recent` show of it: a shape
    shared with the probe's other entries, its times packed in one bytes object, its facts. `verdict` rebuilds
    a `Verdict` that renders the same (`verdict_document`, the page's strip); what neither shows is not kept
    (flows, DNS transactions, arrival points, kind-specific values, where each phase began within the probe).
    ~300 bytes instead of ~2.8 KB for a healthy HTTP verdict: 20 per probe at 1,000 probes is ~6 MiB, not ~55."""

    __slots__ = ("_facts", "_shape", "_summary", "_times")

    def __init__(self, entry: BoardEntry, shape: _Shape):  # the base's two slots stay unset: properties here
        v, r = entry.verdict, entry.verdict.result
        self._shape = shape
        self._facts = v.facts
        self._summary = None if v.summary == _ok_summary(r.name, v.facts) else v.summary
        durations = r.phase_durations_ns()
        self._times = _TIMES.pack(entry.wall_time, r.start_ns, r.end_ns) + struct.pack(
            f"<{len(durations)}q", *durations.values())

    @property
    def wall_time(self) -> float:
        return _TIMES.unpack_from(self._times)[0]

    @property
    def cause(self) -> Cause:
        return self._shape[11]

    @property
    def verdict(self) -> Verdict:
        (name, kind, target, source, ok, error, error_detail, http_status, address, suspect, labels, cause,
         sub_cause, confidence, rule, phase_names) = self._shape
        _, start, end = _TIMES.unpack_from(self._times)
        durations = struct.unpack_from(f"<{len(phase_names)}q", self._times, _TIMES.size)
        # one span per phase name, laid end to end from the start: their sums per name are the original's
        phases, at = [], start
        for pname, ns in zip(phase_names, durations, strict=True):
            phases.append(PhaseSpan(pname, at, at + ns))
            at += ns
        result = ProbeResult(name=name, kind=kind, target=target, source=source, start_ns=start, end_ns=end, ok=ok,
                             error=error, error_detail=error_detail, phases=tuple(phases), http_status=http_status,
                             address=address, suspect=suspect, labels=labels)
        summary = self._summary if self._summary is not None else _ok_summary(name, self._facts)
        return Verdict(result, cause, sub_cause, confidence, rule, (), self._facts, summary)


def _ok_summary(name: str, facts: tuple[str, ...]) -> str:
    return f"{name}: ok — {facts[0]}" if facts else ""


def _keepable(v: Verdict) -> bool:
    """A verdict `_KeptEntry` renders exactly: healthy, without kernel evidence or peers' answers (a failing one
    stays whole: its timeline is on the page); a float confidence, as the correlator makes it (shapes compare
    equal across 1 and 1.0, which JSON writes differently)."""
    return v.cause == Cause.OK and not v.evidence and not v.remote and type(v.confidence) is float


@dataclass
class _ProbeRing:
    entries: collections.deque[BoardEntry]
    counts: collections.Counter = field(default_factory=collections.Counter)  # cause -> verdicts seen
    shape: _Shape | None = None  # the shape of the last entry made compact (its successors share it when equal)


class StatusBoard:
    """The recent verdicts of each probe (a ring of `per_probe` entries), for the status page."""

    def __init__(self, per_probe: int = 20, clock: Callable[[], float] = time.time):
        self.per_probe = per_probe
        self.clock = clock
        self._rings: dict[str, _ProbeRing] = {}

    def __call__(self, v: Verdict) -> None:
        ring = self._rings.get(v.result.name)
        if ring is None:
            ring = self._rings[v.result.name] = _ProbeRing(collections.deque(maxlen=self.per_probe))
        entries = ring.entries
        if entries:  # the newest entry stays whole (the page shows it in full); the one before becomes compact
            last = entries[-1]
            if type(last) is BoardEntry and _keepable(last.verdict):
                shape = _shape_of(last.verdict)
                if shape != ring.shape:
                    ring.shape = shape
                entries[-1] = _KeptEntry(last, ring.shape)
        entries.append(BoardEntry(self.clock(), v))
        ring.counts[str(v.cause)] += 1

    def forget(self, name: str) -> None:
        self._rings.pop(name, None)

    # Readers may run in a thread (the status page, /api/recent) while the loop appends: every copy below is
    # one C-level operation on a dict or a deque (`list(...)`), which the GIL keeps whole.

    def probes(self) -> dict[str, list[BoardEntry]]:
        """Probe name -> its recent entries, oldest first."""
        return {name: list(ring.entries) for name, ring in list(self._rings.items())}

    def names(self) -> list[str]:
        """The probes that have verdicts, sorted."""
        return sorted(list(self._rings))

    def entries(self, names: Iterable[str]) -> dict[str, list[BoardEntry]]:
        """The recent entries of some probes (a page of `/api/recent`)."""
        rings = self._rings
        return {n: list(r.entries) for n in names if (r := rings.get(n)) is not None}

    def failing(self) -> list[str]:
        """Probes whose last verdict is not ok."""
        return [n for n, ring in list(self._rings.items())
                if ring.entries and ring.entries[-1].cause != Cause.OK]
