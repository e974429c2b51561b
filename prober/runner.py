"""One entry point for every probe kind: `run_probe(spec, env)` → a tuple of `ProbeResult`s.

The dispatch table `PROBERS` maps a module's `prober:` to a function with one signature,
`async (attempt, env, deadline_ns) -> ProbeResult`; a new kind is one module and one entry. The runner
resolves the target with the prober's own DNS, applies the ip policy (`all` gives one result per
address) and guarantees that nothing raises out: an unexpected exception becomes `internal`.

Deadlines: each prober bounds its own phases by the probe's deadline (and names the phase that ran out).
`run_probe` adds one guard around all of it, source and resolution included: `OVERRUN_MARGIN_S` after the
deadline the whole run is cancelled, and cancelled again every `RECANCEL_S` while it has not ended (a
cancellation swallowed once by a library cannot keep it alive); what comes back is `internal` ("overran its
deadline"), counted in `ProbeEnv.overruns`. The scheduler's watchdog is the last line behind it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from prober.attempt import Attempt, build_result, prepared
from prober.dns import probe_dns
from prober.env import ProbeEnv
from prober.errors import describe
from prober.grpc import probe_grpc
from prober.http import probe_http
from prober.icmp import probe_icmp
from prober.resolve import Resolution, load_resolv_conf, resolve
from prober.sockets import Source, SourceError, open_source
from prober.spec import ProbeSpec
from prober.tcp import probe_tcp
from prober.types import ErrorKind, ProbeKind, ProbeResult
from prober.unix import probe_unix
from prober.websocket import probe_websocket

log = logging.getLogger(__name__)
monotonic_ns = time.monotonic_ns

OVERRUN_MARGIN_S = 0.5  # past its deadline by this much, a probe is a bug: the guard ends it
RECANCEL_S = 0.1  # a guard that fired cancels again this often until the run has ended

ProbeFn = Callable[[Attempt, ProbeEnv, int], Awaitable[ProbeResult]]

PROBERS: dict[str, ProbeFn] = {
    "http": probe_http,
    "tcp": probe_tcp,
    "dns": probe_dns,
    "icmp": probe_icmp,
    "grpc": probe_grpc,
    "websocket": probe_websocket,
    "unix": probe_unix,
}


def select_addresses(addresses: list[str], policy: str) -> list[str]:
    if policy == "all":
        return addresses
    if policy == "ipv4":
        return [a for a in addresses if ":" not in a][:1]
    if policy == "ipv6":
        return [a for a in addresses if ":" in a][:1]
    return addresses[:1]


def prefer_family(addresses: list[str], preferred: str | None, fallback: bool) -> list[str]:
    """blackbox's preferred_ip_protocol: the preferred family's addresses first; without fallback, only them."""
    if preferred is None:
        return addresses
    want_v6 = preferred == "ip6"
    first = [a for a in addresses if (":" in a) == want_v6]
    return first + ([a for a in addresses if (":" in a) != want_v6] if fallback else [])


def _failure(
    spec: ProbeSpec, source_label: str, start: int, kind: ErrorKind, detail: str, resolution: Resolution | None = None
) -> ProbeResult:
    """The result of a run that failed before it had an attempt (source, resolution, a crash)."""
    return build_result(spec, source_label, start, kind, detail, resolution)


class DeadlineGuard:
    """`asyncio.timeout_at` that does not give up: once `when` (loop time) has passed it cancels the task,
    then again every `every` seconds until the block has ended. On exit it takes back every cancellation it
    made; a block ended by it raises `TimeoutError` (as `asyncio.timeout` does)."""

    __slots__ = ("_every", "_fired", "_handle", "_loop", "_task", "when")

    def __init__(self, when: float, every: float = RECANCEL_S):
        self.when = when
        self._every = every
        self._fired = 0
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None

    @property
    def fired(self) -> bool:
        return self._fired > 0

    async def __aenter__(self) -> DeadlineGuard:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        if self._task is None:
            raise RuntimeError("DeadlineGuard must be used inside a task")
        self._handle = self._loop.call_at(self.when, self._fire)
        return self

    def _fire(self) -> None:
        self._fired += 1
        self._task.cancel()
        self._handle = self._loop.call_later(self._every, self._fire)

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if not self._fired:
            return None
        remaining = self._task.cancelling()
        for _ in range(self._fired):
            remaining = self._task.uncancel()
        if remaining == 0 and exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            raise TimeoutError
        return None


def overrun_result(spec: ProbeSpec, start_ns: int, by: str) -> ProbeResult:
    """The `internal` result of a run that did not end by its deadline (`by`: who ended it)."""
    return _failure(
        spec,
        spec.source_spec.label,
        start_ns,
        ErrorKind.INTERNAL,
        f"overran its deadline: still running {spec.effective_timeout:g}s after the start, ended by {by}",
    )


async def run_probe(spec: ProbeSpec, env: ProbeEnv) -> tuple[ProbeResult, ...]:
    """Run a probe once: one result per probed address (at least one). Never raises (but cancels).

    Returns by the probe's deadline (plus `OVERRUN_MARGIN_S` at the very most, for a prober bug).
    """
    start = monotonic_ns()
    loop = asyncio.get_running_loop()
    guard = DeadlineGuard(loop.time() + spec.effective_timeout + OVERRUN_MARGIN_S)
    try:
        async with guard:
            return await _from_source(spec, env, start)
    except TimeoutError:
        if not guard.fired:
            raise
        env.overruns += 1
        log.error("probe %s overran its deadline (%gs); ended by the runner's guard", spec.name,
                  spec.effective_timeout)
        return (overrun_result(spec, start, "the runner's guard"),)


async def _from_source(spec: ProbeSpec, env: ProbeEnv, start: int) -> tuple[ProbeResult, ...]:
    """Open the probe's source (off the loop), run the probe, and check the namespace outlived it."""
    deadline = start + int(spec.effective_timeout * 1e9)
    try:
        source = await open_source(spec.source, timeout=spec.effective_timeout)
    except SourceError as exc:
        return (_failure(spec, spec.source_spec.label, start, ErrorKind.SOURCE_ERROR, exc.strerror or str(exc)),)
    return _unless_vanished(await _run(spec, env, source, start, deadline), source)


def _unless_vanished(results: tuple[ProbeResult, ...], source: Source) -> tuple[ProbeResult, ...]:
    """A probe whose namespace was deleted while it ran measured a dying namespace: `source_error`."""
    if not source.vanished():
        return results
    detail = f"network namespace {source.label!r} vanished during the probe"
    return tuple(replace(r, ok=False, error=ErrorKind.SOURCE_ERROR, error_detail=detail) for r in results)


async def _run(spec: ProbeSpec, env: ProbeEnv, source: Source, start: int, deadline: int) -> tuple[ProbeResult, ...]:
    kind = spec.module.prober
    try:
        fn = PROBERS[kind]
        prep = prepared(spec)
        target = prep.target
        if kind == "unix":  # a path: nothing to resolve
            attempt = Attempt(spec, ProbeKind.UNIX, source, target, start, resolv=env.resolv_conf, prep=prep)
            return (await fn(attempt, env, deadline),)
        if kind == "dns":
            attempt = Attempt(spec, ProbeKind.DNS, source, target, start, resolv=env.resolv_conf, prep=prep)
            return (await fn(attempt, env, deadline),)
        if prep.ip_literal:  # nothing to resolve: straight to the one address
            attempt = Attempt(spec, prep.kind, source, prep.direct, start, resolv=env.resolv_conf, prep=prep)
            return (await fn(attempt, env, deadline),)
        conf = env.resolv_conf or load_resolv_conf(source.resolv_conf)
        res = await resolve(source, target.host, spec.module.ip_policy, deadline, env.on_local_port, conf)
        if res.error is not None:
            return (_failure(spec, source.label, start, res.error, res.detail, res),)
        preferred, fallback = spec.module.preferred_family()
        addresses = select_addresses(prefer_family(res.addresses, preferred, fallback), spec.module.ip_policy)
        if not addresses:
            return (
                _failure(
                    spec,
                    source.label,
                    start,
                    ErrorKind.DNS_NO_ANSWER,
                    f"{target.host}: no {preferred} address (ip_protocol_fallback is false)"
                    if preferred and not fallback and res.addresses
                    else f"{target.host}: no address for ip_policy {spec.module.ip_policy}",
                    res,
                ),
            )
        attempts = [
            Attempt(
                spec,
                prep.kind,
                source,
                replace(target, address=a),
                start,  # the probe's start: its duration (and latency budget) includes resolution
                resolution=res,
                resolv=conf,
                prep=prep,
            )
            for a in addresses
        ]
        if len(attempts) == 1:
            return (await fn(attempts[0], env, deadline),)
        return tuple(await asyncio.gather(*(fn(a, env, deadline) for a in attempts)))
    except asyncio.CancelledError:
        raise
    except SourceError as exc:
        return (_failure(spec, source.label, start, ErrorKind.SOURCE_ERROR, describe(exc)),)
    except Exception as exc:  # a bug: say so loudly, but still hand back a result
        log.exception("probe %s crashed", spec.name)
        return (_failure(spec, source.label, start, ErrorKind.INTERNAL, describe(exc)),)
