"""`connprobe diagnose TARGET`: probe a target N times with the kernel sensor attached, show each attempt's
timeline (phases and kernel events on one time axis) and a one-line verdict.

TARGET is a URL (http:// or https://), `host:port` (TCP) or `dns:NAME` (a DNS query through the source's
resolv.conf); also `icmp:HOST` (an echo), `grpc:HOST:PORT` (a health check), `ws://` / `wss://` URLs (a
WebSocket upgrade) and `unix:/PATH` (a Unix socket connect).
Exit status: 0 every attempt healthy, 1 a problem was found, 2 usage or environment error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from bpf.types import KernelEvent
from connprobe import timeline
from connprobe.causes import colour
from connprobe.kernelwatch import KernelWatch
from connprobe.netnames import netns_names
from connprobe.timeline import name_namespaces
from correlator import Cause, Verdict, correlate
from correlator.record import Recording, save, to_jsonable
from correlator.types import KernelCoverage
from prober import DNSSpec, HTTPSpec, ModuleSpec, ProbeEnv, ProbeSpec, run_probe
from prober.redact import install_log_redaction, redact_url
from prober.source import parse_source
from prober.spec import parse_duration

JSON_SCHEMA_VERSION = 1
EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """Bad arguments: the message names the argument and the value."""


@dataclass(frozen=True)
class Attempt:
    index: int
    verdict: Verdict
    events: tuple[KernelEvent, ...]
    coverage: KernelCoverage


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="http(s)://URL, host:port (TCP), dns:NAME, icmp:HOST, grpc:HOST:PORT, "
                                  "ws(s)://URL or unix:/PATH")
    p.add_argument("--count", "-n", type=int, default=1, help="attempts (default 1)")
    p.add_argument("--from", dest="source", default="host", metavar="NETNS",
                   help="probe from this network namespace: a name in /run/netns, or /proc/PID/ns/net")
    p.add_argument("--budget", default=None, help="latency budget, e.g. 300ms or 1s: slower counts as a problem")
    p.add_argument("--timeout", default="5s", help="per-attempt timeout (default 5s)")
    p.add_argument("--interval", default="0s", help="pause between attempts (default 0s)")
    p.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp", help="HTTP client")
    p.add_argument("--ip", dest="ip_policy", choices=["first", "all", "ipv4", "ipv6"], default="first",
                   help="which resolved addresses to probe (default first)")
    p.add_argument("--qtype", default="A", help="DNS query type for dns:NAME (default A)")
    p.add_argument("--no-kernel", action="store_true", help="do not load the kernel sensor")
    p.add_argument("--json", action="store_true", help="print the documented JSON document instead")
    p.add_argument("--record", type=Path, metavar="DIR",
                   help="also write each attempt (result + kernel events) as a recording into DIR")


def _duration(name: str, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except (ValueError, TypeError):
        raise UsageError(f"--{name}: {value!r} is not a duration (e.g. 300ms, 2s)") from None


def build_spec(args: argparse.Namespace) -> ProbeSpec:
    timeout = _duration("timeout", args.timeout) or 5.0
    target = args.target
    try:
        if target.startswith("dns:"):
            name = target[4:]
            if not name:
                raise UsageError("TARGET: dns: needs a name, e.g. dns:api.example.com")
            module = ModuleSpec(prober="dns", timeout=timeout,
                                dns=DNSSpec(query_name=name, query_type=args.qtype))
            target = "resolv.conf"
        elif target.startswith(("icmp:", "grpc:", "unix:")):  # the new kinds: KIND:TARGET
            kind, target = target.split(":", 1)
            module = ModuleSpec(prober=kind, timeout=timeout, ip_policy=args.ip_policy)
        elif target.startswith(("ws://", "wss://")):
            module = ModuleSpec(prober="websocket", timeout=timeout, ip_policy=args.ip_policy)
        elif "://" in target:
            module = ModuleSpec(prober="http", timeout=timeout, ip_policy=args.ip_policy,
                                http=HTTPSpec(client=args.client))
        else:
            module = ModuleSpec(prober="tcp", timeout=timeout, ip_policy=args.ip_policy)
        try:
            source = parse_source(args.source, bare_name=True)
        except ValueError as exc:
            raise UsageError(f"--from: {exc}") from None
        return ProbeSpec(name="diagnose", module=module, target=target, source=source.text,
                         interval=max(timeout, 1.0))
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        raise UsageError(f"TARGET {redact_url(args.target)!r}: {msg}") from None


async def open_sensor(disabled: bool) -> KernelWatch:
    if disabled:
        return KernelWatch(None, "disabled with --no-kernel")
    try:
        from bpf.errors import SensorError
        from bpf.sensor import KernelSensor
    except ImportError as exc:  # bcc missing
        return KernelWatch(None, f"kernel sensor unavailable: {exc}")
    sensor = KernelSensor()
    try:
        await sensor.__aenter__()
    except SensorError as exc:
        return KernelWatch(None, str(exc))
    except Exception as exc:  # e.g. bcc not importable: name the cause rather than die
        return KernelWatch(None, f"{type(exc).__name__}: {exc}")
    ev = KernelWatch(sensor)
    await ev.start()
    return ev


async def diagnose(args: argparse.Namespace, spec: ProbeSpec, watch: KernelWatch | None = None) -> list[Attempt]:
    """Run the attempts. `watch` (a running KernelWatch) is opened and closed here when not given."""
    budget = _duration("budget", args.budget)
    interval = _duration("interval", args.interval) or 0.0
    owned = watch is None
    if watch is None:
        watch = await open_sensor(args.no_kernel)
    attempts: list[Attempt] = []
    try:
        async with ProbeEnv(on_local_port=watch.on_local_port) as env:
            for i in range(args.count):
                if i and interval:
                    await asyncio.sleep(interval)
                for result in await run_probe(spec, env):
                    events, status = await watch.collect(result)
                    verdict = correlate(result, events, budget_ns=int(budget * 1e9) if budget else None,
                                        coverage=status)
                    attempts.append(Attempt(i + 1, verdict, tuple(verdict.evidence), status))
                    if args.record:
                        _record(args.record, spec, attempts[-1], events, budget)
    finally:
        if owned:
            await watch.stop()
            if watch.sensor is not None:
                watch.sensor.close()
    return attempts


def _record(directory: Path, spec: ProbeSpec, a: Attempt, events: list[KernelEvent], budget: float | None) -> None:
    """One attempt as a recording, readable by its owner only (0600): it names the target and its errors."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--record: cannot create {directory}: {exc.strerror or exc}") from None
    rec = Recording(f"diagnose {redact_url(spec.target)}", a.verdict.result, tuple(events), a.coverage,
                    int(budget * 1e9) if budget else None, str(a.verdict.cause))
    path = directory / f"attempt-{a.index:03d}-{a.verdict.result.address or 'x'}.json"
    try:
        save(path, rec)
    except OSError as exc:
        raise UsageError(f"--record: cannot write {path}: {exc.strerror or exc}") from None


# --- output ---------------------------------------------------------------------------------------------
def to_document(args: argparse.Namespace, attempts: list[Attempt], code: int) -> dict:
    """The `--json` document (schema in docs/diagnose.schema.json)."""
    names = netns_names()
    out = []
    for a in attempts:
        v, r = a.verdict, a.verdict.result
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
            "events": [_event_doc(e, r.start_ns, names) for e in v.evidence],
            "kernel_evidence": {"available": a.coverage.available, "lost_events": a.coverage.lost_events,
                                "reason": a.coverage.reason},
            "verdict": {"cause": v.cause.value, "sub_cause": v.sub_cause, "confidence": v.confidence,
                        "rule": v.rule, "facts": list(v.facts), "summary": v.summary},
            "result": to_jsonable(r),
        })
    return {"schema": JSON_SCHEMA_VERSION, "target": redact_url(args.target), "source": args.source,
            "budget_ms": round(_duration("budget", args.budget) * 1000, 3) if args.budget else None,
            "exit_code": code, "attempts": out}


def _event_doc(e: KernelEvent, origin: int, names: dict[int, str]) -> dict:
    return {"at_ms": round((e.ts_ns - origin) / 1e6, 3), "kind": str(e.kind), "proto": e.proto,
            "src": f"{e.saddr}:{e.sport}", "dst": f"{e.daddr}:{e.dport}", "netns": e.netns,
            "netns_name": names.get(e.netns), "tcp_state": e.tcp_state, "reason": e.reason,
            "location": e.location, "tcp_flags": e.tcp_flags}


def print_attempt(out: Console, a: Attempt, total: int, names: dict[int, str]) -> None:
    r, v = a.verdict.result, a.verdict
    head = f"attempt {a.index}/{total}  {r.target}"
    if r.address:
        head += f" → {r.address}"
    head += f"  from {r.source}"
    out.print(f"[bold]{escape(head)}[/bold]")
    for row in timeline.rows(v, names):
        text = escape(row.text)
        if row.kind == "phase":
            text = f"[cyan]{text}[/cyan]"
        elif row.kind == "kernel":
            text = f"  [magenta]▲ kernel[/magenta] {text}"
        elif row.kind == "dns":
            text = f"  {text}"
        out.print(f"  {row.offset_ms:+9.1f} ms  {text}")
    for f in v.facts[1:]:
        out.print(f"      · {escape(name_namespaces(f, names))}")
    style = f"bold {colour(v.cause)}"
    line = name_namespaces(v.summary.removeprefix(f"{r.name}: "), names)
    out.print(f"  [{style}]verdict: {escape(line)}[/{style}]  [dim](rule {v.rule})[/dim]")


def exit_code(attempts: list[Attempt]) -> int:
    return EXIT_OK if attempts and all(a.verdict.cause == Cause.OK for a in attempts) else EXIT_PROBLEM


def run(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    install_log_redaction()
    try:
        if args.count < 1:
            raise UsageError(f"--count: {args.count} must be at least 1")
        spec = build_spec(args)
        _duration("budget", args.budget)
        _duration("interval", args.interval)
        attempts = asyncio.run(diagnose(args, spec))
    except UsageError as exc:
        err.print(f"connprobe diagnose: {exc}", markup=False, highlight=False)
        return EXIT_USAGE
    code = exit_code(attempts)
    if any(a.verdict.result.error and a.verdict.result.error.value == "source_error" for a in attempts):
        err.print(f"connprobe diagnose: {attempts[0].verdict.result.error_detail} "
                  "(list namespaces with `ip netns list`)", markup=False, highlight=False)
        return EXIT_USAGE
    if args.json:
        sys.stdout.write(json.dumps(to_document(args, attempts, code), indent=1) + "\n")
        return code
    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(width=160, highlight=False)
    first = attempts[0].coverage if attempts else None
    if first is not None and not first.available:
        out.print(f"[yellow]kernel evidence is off: {escape(first.reason)}; verdicts say so[/yellow]")
    names = netns_names()
    for a in attempts:
        print_attempt(out, a, args.count, names)
    bad = sum(a.verdict.cause != Cause.OK for a in attempts)
    out.print(f"{len(attempts)} attempt(s), {bad} with a problem")
    return code
