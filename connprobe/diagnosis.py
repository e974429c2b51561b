"""The diagnose loop as a library: probe one target a number of times with kernel evidence attached and give
one `Diagnosis` (verdict, kernel events, kernel coverage) per result. `connprobe diagnose`
(`connprobe/commands/diagnose.py`), the lab's fault matrix (`connprobe/lab/scenarios.py`) and the benchmarks
call it with typed arguments; the `--json` document (schema in docs/diagnose.schema.json) is built here too,
so the fault matrix judges exactly what the command prints.

A target is written as on the command line: a URL (http:// or https://), `host:port` (TCP), `dns:NAME` (a DNS
query through the source's resolv.conf), `icmp:HOST` (an echo), `grpc:HOST:PORT` (a health check), `ws://` /
`wss://` URLs (a WebSocket upgrade) or `unix:/PATH` (a Unix socket connect).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bpf.clock import sample_clock_offset
from bpf.types import KernelEvent
from connprobe.netnames import netns_names
from correlator import Cause, Verdict, correlate
from correlator.crossnode import wants_remote
from correlator.record import Recording, save, to_jsonable
from correlator.types import KernelCoverage
from prober.redact import redact_url

if TYPE_CHECKING:  # the probe machinery is imported where a probe runs: reading an agent's answers needs none
    from connprobe.kernelwatch import KernelWatch
    from prober import ProbeEnv, ProbeSpec

__all__ = ["JSON_SCHEMA_VERSION", "Diagnosis", "UsageError", "attempts", "diagnose", "duration_arg", "exit_code",
           "record_attempt", "target_spec", "to_document"]

JSON_SCHEMA_VERSION = 1
EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """Bad input: the message names the argument and the value."""


@dataclass(frozen=True)
class Diagnosis:
    """One attempt's outcome: its verdict (with the probe result), the kernel events of its window, and
    whether those events can be trusted (`KernelCoverage`)."""

    index: int
    verdict: Verdict
    events: tuple[KernelEvent, ...]
    coverage: KernelCoverage


def duration_arg(name: str, value: str | None) -> float | None:
    """A duration option's value in seconds (None when not given); UsageError names the option."""
    if value is None:
        return None
    from prober.spec import parse_duration

    try:
        return parse_duration(value)
    except (ValueError, TypeError):
        raise UsageError(f"--{name}: {value!r} is not a duration (e.g. 300ms, 2s)") from None


def target_spec(target: str, *, source: str = "host", timeout: float = 5.0, client: str = "aiohttp",
                ip_policy: str = "first", qtype: str = "A") -> ProbeSpec:
    """The probe spec of a target as written on the command line; UsageError names what is wrong."""
    from pydantic import ValidationError

    from prober import DNSSpec, HTTPSpec, ModuleSpec, ProbeSpec
    from prober.source import parse_source

    original = target
    try:
        if target.startswith("dns:"):
            name = target[4:]
            if not name:
                raise UsageError("TARGET: dns: needs a name, e.g. dns:api.example.com")
            module = ModuleSpec(prober="dns", timeout=timeout, dns=DNSSpec(query_name=name, query_type=qtype))
            target = "resolv.conf"
        elif target.startswith(("icmp:", "grpc:", "unix:")):  # the new kinds: KIND:TARGET
            kind, target = target.split(":", 1)
            module = ModuleSpec(prober=kind, timeout=timeout, ip_policy=ip_policy)
        elif target.startswith(("ws://", "wss://")):
            module = ModuleSpec(prober="websocket", timeout=timeout, ip_policy=ip_policy)
        elif "://" in target:
            module = ModuleSpec(prober="http", timeout=timeout, ip_policy=ip_policy, http=HTTPSpec(client=client))
        else:
            module = ModuleSpec(prober="tcp", timeout=timeout, ip_policy=ip_policy)
        try:
            parsed = parse_source(source, bare_name=True)
        except ValueError as exc:
            raise UsageError(f"--from: {exc}") from None
        return ProbeSpec(name="diagnose", module=module, target=target, source=parsed.text,
                         interval=max(timeout, 1.0))
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        raise UsageError(f"TARGET {redact_url(original)!r}: {msg}") from None


def peer_asker(path: Path):
    """The peer asker and this node's namespaces from an agent config's `peers:` and `node:` (`diagnose --peers`);
    UsageError naming what is wrong."""
    from connprobe.agent import netns_inode
    from connprobe.config import ConfigError, load_config
    from connprobe.crossnode import PeerAsker, PeerConfigError, StaticPeers

    try:
        cfg = load_config(path)
        resolver = StaticPeers.from_settings(cfg.peers)
        netns = None if cfg.node.netns is None else frozenset(netns_inode(n) for n in cfg.node.netns)
    except (ConfigError, PeerConfigError) as exc:
        raise UsageError(f"--peers: {str(exc).splitlines()[0]}") from None
    if not resolver:
        raise UsageError(f"--peers: {path} has no `peers:`")
    return PeerAsker(resolver), netns


async def diagnose(spec: ProbeSpec, watch: KernelWatch, *, count: int = 1, interval: float = 0.0,
                   budget: float | None = None, record: Path | None = None, asker=None,
                   env: ProbeEnv | None = None,
                   on_attempt: Callable[[Diagnosis], None] | None = None) -> list[Diagnosis]:
    """Run `count` attempts `interval` seconds apart, each correlated with the kernel events `watch` (a
    running `KernelWatch`, see `connprobe.sensorload.open_watch`) collects for it. `budget` (seconds):
    slower counts as a problem. `record`: also write each attempt as a recording into that directory.
    `asker` (a `connprobe.crossnode.PeerAsker`): ask the destination's agent when this node's evidence does
    not decide, as the agent does. `env`: a running `ProbeEnv` whose port callback feeds `watch` (the
    agent's); default: one of its own. `on_attempt(attempt)` is called as each attempt is judged."""
    out = []
    async for a, _ in attempts(spec, watch, count=count, interval=interval, budget=budget, record=record,
                               asker=asker, env=env):
        out.append(a)
        if on_attempt is not None:
            on_attempt(a)
    return out


async def attempts(spec: ProbeSpec, watch: KernelWatch, *, count: int = 1, interval: float = 0.0,
                   budget: float | None = None, record: Path | None = None, asker=None,
                   env: ProbeEnv | None = None) -> AsyncIterator[tuple[Diagnosis, list[KernelEvent]]]:
    """`diagnose`, attempt by attempt as each is judged: (the diagnosis, every kernel event of its window)."""
    from prober import ProbeEnv, run_probe

    budget_ns = int(budget * 1e9) if budget else None
    async with contextlib.AsyncExitStack() as stack:
        if env is None:
            env = await stack.enter_async_context(ProbeEnv(on_local_port=watch.on_local_port))
        for i in range(count):
            if i and interval:
                await asyncio.sleep(interval)
            for result in await run_probe(spec, env):
                events, status = await watch.collect(result)
                verdict = correlate(result, events, budget_ns=budget_ns, coverage=status)
                if asker is not None and wants_remote(verdict):
                    remote = await asker.ask(result, sample_clock_offset())
                    verdict = correlate(result, events, budget_ns=budget_ns, coverage=status, remote=remote)
                a = Diagnosis(i + 1, verdict, tuple(verdict.evidence), status)
                if record:
                    record_attempt(record, spec.target, a, events, budget_ns)
                yield a, events


def record_attempt(directory: Path, target: str, a: Diagnosis, events: list[KernelEvent],
                   budget_ns: int | None) -> None:
    """One attempt as a recording, readable by its owner only (0600): it names the target and its errors."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--record: cannot create {directory}: {exc.strerror or exc}") from None
    rec = Recording(f"diagnose {redact_url(target)}", a.verdict.result, tuple(events), a.coverage,
                    budget_ns, str(a.verdict.cause), remote=a.verdict.remote)
    path = directory / f"attempt-{a.index:03d}-{a.verdict.result.address or 'x'}.json"
    try:
        save(path, rec)
    except OSError as exc:
        raise UsageError(f"--record: cannot write {path}: {exc.strerror or exc}") from None


def exit_code(attempts: list[Diagnosis]) -> int:
    """0 when every attempt was healthy, 1 when one found a problem (or there was none)."""
    return EXIT_OK if attempts and all(a.verdict.cause == Cause.OK for a in attempts) else EXIT_PROBLEM


def to_document(target: str, source: str, budget: float | None, attempts: list[Diagnosis], code: int) -> dict:
    """The `--json` document (schema in docs/diagnose.schema.json); `budget` in seconds, None: none given."""
    names = netns_names()
    out = []
    for a in attempts:
        v, r = a.verdict, a.verdict.result
        remote = {x.event: x for rem in v.remote for x in rem.events}
        out.append({
            "attempt": a.index,
            "address": r.address,
            "ok": r.ok,
            "error": r.error.value if r.error else None,
            "error_detail": r.error_detail,
            "duration_ms": round(r.duration_ns / 1e6, 3),
            "http_status": r.http_status,
            "phases": [{"name": p.name, "start_ms": round((p.start_ns - r.start_ns) / 1e6, 3),
                        "duration_ms": round(p.duration_ns / 1e6, 3)} for p in r.phases],
            "dns": [{"server": tx.server, "name": tx.name, "type": tx.qtype, "rcode": tx.rcode,
                     "latency_ms": round((tx.end_ns - tx.start_ns) / 1e6, 3) if tx.end_ns else None}
                    for tx in r.dns],
            "events": [_event_doc(e, r.start_ns, names, remote.get(e)) for e in v.evidence],
            "progress": [{"at_ms": round((p.ts_ns - r.start_ns) / 1e6, 3), "bytes": p.bytes} for p in r.progress],
            "remote": [{"node": x.node, "available": x.available, "reason": x.reason, "watching": x.watching,
                        "uncertainty_ms": round(x.uncertainty_ns / 1e6, 3), "events": len(x.events)}
                       for x in v.remote],
            "kernel_evidence": {"available": a.coverage.available, "lost_events": a.coverage.lost_events,
                                "reason": a.coverage.reason},
            "verdict": {"cause": v.cause.value, "sub_cause": v.sub_cause, "confidence": v.confidence,
                        "rule": v.rule, "facts": list(v.facts), "summary": v.summary},
            "result": to_jsonable(r),
        })
    return {"schema": JSON_SCHEMA_VERSION, "target": redact_url(target), "source": source,
            "budget_ms": round(budget * 1000, 3) if budget is not None else None,
            "exit_code": code, "attempts": out}


def _event_doc(e: KernelEvent, origin: int, names: dict[int, str], there=None) -> dict:
    """One event of the timeline; `there` (a `RemoteEvent`): another node's agent saw it."""
    doc = {"at_ms": round((e.ts_ns - origin) / 1e6, 3), "kind": str(e.kind), "proto": e.proto,
           "src": f"{e.saddr}:{e.sport}", "dst": f"{e.daddr}:{e.dport}", "netns": e.netns,
           "netns_name": there.netns_name if there else names.get(e.netns), "tcp_state": e.tcp_state,
           "reason": e.reason, "location": e.location, "tcp_flags": e.tcp_flags, "seq": e.seq, "seq_len": e.seq_len,
           "snd_una": e.snd_una, "data_segs_out": e.segs_out, "total_retrans": e.total_retrans,
           "node": there.node if there else None}
    if there:
        doc["at_uncertainty_ms"] = round(there.uncertainty_ns / 1e6, 3)
    return doc
