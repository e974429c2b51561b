"""`connprobe diagnose TARGET`: probe a target N times with the kernel sensor attached, show each attempt's
timeline (phases and kernel events on one time axis) and a one-line verdict.

TARGET is a URL (http:// or https://), `host:port` (TCP) or `dns:NAME` (a DNS query through the source's
resolv.conf); also `icmp:HOST` (an echo), `grpc:HOST:PORT` (a health check), `ws://` / `wss://` URLs (a
WebSocket upgrade) and `unix:/PATH` (a Unix socket connect). The loop itself is `connprobe.diagnosis.diagnose`.
Exit status: 0 every attempt healthy, 1 a problem was found, 2 usage or environment error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from connprobe import timeline
from connprobe.causes import colour
from connprobe.diagnosis import (
    EXIT_USAGE,
    Diagnosis,
    UsageError,
    diagnose,
    exit_code,
    peer_asker,
    target_spec,
    to_document,
)
from connprobe.netnames import netns_names
from connprobe.sensorload import close_watch, open_watch
from connprobe.timeline import name_namespaces
from correlator import Cause
from prober.redact import install_log_redaction
from prober.spec import parse_duration


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="http(s)://URL, host:port (TCP), dns:NAME, icmp:HOST, grpc:HOST:PORT, "
                                  "ws(s)://URL, unix:/PATH, or svc/NS/NAME:PORT[/PATH] (a Service: TCP, HTTP "
                                  "with a path; implies --kubernetes)")
    p.add_argument("--count", "-n", type=int, default=1, help="attempts (default 1)")
    p.add_argument("--from", dest="source", default="host", metavar="NETNS",
                   help="probe from this network namespace: a name in /run/netns, or /proc/PID/ns/net; with "
                        "Kubernetes pod/NS/NAME or deploy/NS/NAME (a pod of it on this node)")
    p.add_argument("--budget", default=None, help="latency budget, e.g. 300ms or 1s: slower counts as a problem")
    p.add_argument("--timeout", default="5s", help="per-attempt timeout (default 5s)")
    p.add_argument("--interval", default="0s", help="pause between attempts (default 0s)")
    p.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp", help="HTTP client")
    p.add_argument("--ip", dest="ip_policy", choices=["first", "all", "ipv4", "ipv6"], default="first",
                   help="which resolved addresses to probe (default first)")
    p.add_argument("--qtype", default="A", help="DNS query type for dns:NAME (default A)")
    p.add_argument("--no-kernel", action="store_true", help="do not load the kernel sensor")
    p.add_argument("--json", action="store_true", help="print the documented JSON document instead")
    p.add_argument("--peers", dest="peers_config", type=Path, metavar="CONFIG",
                   help="ask the peer agents of this agent config's `node:` and `peers:` when this node's evidence "
                        "does not decide (cross-node evidence); the sensor reports only `node.netns`")
    from connprobe.cluster.options import add_arguments as add_kubernetes_arguments

    add_kubernetes_arguments(p)
    p.add_argument("--record", type=Path, metavar="DIR",
                   help="also write each attempt (result + kernel events) as a recording into DIR")


def _duration(name: str, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except (ValueError, TypeError):
        raise UsageError(f"--{name}: {value!r} is not a duration (e.g. 300ms, 2s)") from None


async def _diagnose(args: argparse.Namespace) -> list[Diagnosis]:
    spec = target_spec(args.target, source=args.source, timeout=_duration("timeout", args.timeout) or 5.0,
                       client=args.client, ip_policy=args.ip_policy, qtype=args.qtype)
    budget = _duration("budget", args.budget)
    interval = _duration("interval", args.interval) or 0.0
    asker, node_netns = peer_asker(args.peers_config) if getattr(args, "peers_config", None) else (None, None)
    watch = await _open_watch_with_progress(args.no_kernel, node_netns)
    try:
        return await diagnose(spec, watch, count=args.count, interval=interval, budget=budget, record=args.record,
                              asker=asker)
    finally:
        if asker is not None:
            await asker.close()
        await close_watch(watch)


async def _open_watch_with_progress(disabled: bool, netns: frozenset[int] | None = None):
    """`open_watch`, saying on a terminal's stderr what it is waiting for: loading the sensor (BTF, compiling
    and attaching the BPF programs) is most of a cold diagnose's first second. Nothing is written when stderr
    is not a terminal, so piped and --json output are unchanged."""
    err = Console(stderr=True)
    if disabled or not err.is_terminal:
        return await open_watch(disabled=disabled, netns=netns)
    t0 = time.monotonic()
    with err.status("loading the kernel sensor (reading BTF, compiling and attaching the BPF programs)…"):
        watch = await open_watch(disabled=disabled, netns=netns)
    state = "attached" if watch.sensor is not None else f"off: {watch.unavailable_reason}"
    err.print(f"[dim]kernel sensor {escape(state)} in {time.monotonic() - t0:.1f} s[/dim]")
    return watch


def print_attempt(out: Console, a: Diagnosis, total: int, names: dict[int, str]) -> None:
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
        elif row.kind == "kernel" and row.node:
            text = f"  [magenta]▲ kernel[/magenta] [bold]{escape(row.node)}[/bold] {text}"
        elif row.kind == "kernel":
            text = f"  [magenta]▲ kernel[/magenta] {text}"
        elif row.kind == "dns":
            text = f"  {text}"
        elif row.kind == "progress":
            text = f"  [green]↓[/green] {text}"
        out.print(f"  {row.offset_ms:+9.1f} ms  {text}")
    for f in v.facts[1:]:
        out.print(f"      · {escape(name_namespaces(f, names))}")
    style = f"bold {colour(v.cause)}"
    line = name_namespaces(v.summary.removeprefix(f"{r.name}: "), names)
    out.print(f"  [{style}]verdict: {escape(line)}[/{style}]  [dim](rule {v.rule})[/dim]")


def resolve_cluster_names(args: argparse.Namespace):
    """With cluster names in --from or TARGET (or --kubernetes): the started ClusterView (also `args._cluster`),
    and --from/TARGET rewritten to the pod's network namespace and the Service's address. UsageError: one line."""
    from connprobe.cluster.refs import parse_service_target, parse_workload_ref

    pod_ref = svc_ref = None
    try:
        if args.source.startswith(("pod/", "deploy/", "deployment/")):
            pod_ref = parse_workload_ref(args.source)
    except ValueError as exc:
        raise UsageError(f"--from: {exc}") from None
    try:
        if args.target.startswith("svc/"):
            svc_ref = parse_service_target(args.target)
    except ValueError as exc:
        raise UsageError(f"TARGET: {exc}") from None
    if pod_ref is None and svc_ref is None and not args.kubernetes:
        return None
    from connprobe.cluster.options import open_cluster_view
    from connprobe.cluster.targets import pod_sources, service_targets

    args.kubernetes = True
    try:
        view = open_cluster_view(args, "--kubernetes")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    args._cluster = view
    if not view.wait_synced(10):
        raise UsageError(f"--kubernetes: the cluster state was not read within 10s "
                         f"({view.state.last_error or 'no answer from the API server'})")
    args.cluster_names = {}
    if pod_ref is not None:
        paths = {inode: name for inode, name in netns_names().items() if name != "host"}
        found, notes = pod_sources(view, pod_ref, paths)
        if not found:
            raise UsageError(f"--from {pod_ref}: {notes[0] if notes else 'no such pod on this node'}")
        pod, source = found[0]
        args.cluster_names["source"] = f"{pod_ref} is pod {pod.namespace}/{pod.name} ({source})"
        args.source = source
    if svc_ref is not None:
        prober = "http" if svc_ref.path != "/" else "tcp"
        targets, notes = service_targets(view, svc_ref, prober, endpoints=False)
        if not targets:
            raise UsageError(f"TARGET {svc_ref}: {notes[0] if notes else 'no address'}")
        args.cluster_names["target"] = f"{svc_ref} is {targets[0][1]}"
        args.target = targets[0][1]
    return view


def run(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    try:
        return _run(args, err)
    finally:
        cluster = getattr(args, "_cluster", None)
        if cluster is not None:
            cluster.close()


def _run(args: argparse.Namespace, err: Console) -> int:
    cluster = None
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    install_log_redaction()
    try:
        if args.count < 1:
            raise UsageError(f"--count: {args.count} must be at least 1")
        cluster = resolve_cluster_names(args)
        attempts = asyncio.run(_diagnose(args))
    except UsageError as exc:
        err.print(f"connprobe diagnose: {exc}", markup=False, highlight=False, soft_wrap=True)
        return EXIT_USAGE
    if cluster is not None:
        attempts = [replace(a, verdict=cluster.name_verdict(a.verdict)) for a in attempts]
    code = exit_code(attempts)
    if any(a.verdict.result.error and a.verdict.result.error.value == "source_error" for a in attempts):
        err.print(f"connprobe diagnose: {attempts[0].verdict.result.error_detail} "
                  "(list namespaces with `ip netns list`)", markup=False, highlight=False)
        return EXIT_USAGE
    if args.json:
        doc = to_document(args.target, args.source, _duration("budget", args.budget), attempts, code)
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
        return code
    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(width=160, highlight=False)
    first = attempts[0].coverage if attempts else None
    if first is not None and not first.available:
        out.print(f"[yellow]kernel evidence is off: {escape(first.reason)}; verdicts say so[/yellow]")
    names = netns_names()
    if cluster is not None:
        names.update(cluster.netns_names())
        for line in getattr(args, "cluster_names", {}).values():
            out.print(f"[dim]{escape(line)}[/dim]")
    for a in attempts:
        print_attempt(out, a, args.count, names)
    bad = sum(a.verdict.cause != Cause.OK for a in attempts)
    out.print(f"{len(attempts)} attempt(s), {bad} with a problem")
    return code
