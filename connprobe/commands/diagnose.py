"""`connprobe diagnose TARGET`: probe a target N times with the kernel sensor attached, show each attempt's
timeline (phases and kernel events on one time axis) and a one-line verdict.

TARGET is a URL (http:// or https://), `host:port` (TCP) or `dns:NAME` (a DNS query through the source's
resolv.conf); also `icmp:HOST` (an echo), `grpc:HOST:PORT` (a health check), `ws://` / `wss://` URLs (a
WebSocket upgrade) and `unix:/PATH` (a Unix socket connect); or `--config FILE --probe NAME`: the agent's probe
exactly as configured (standalone), e.g. to re-run what an alert names; `-o text|json|yaml`.
The loop itself is `connprobe.diagnosis.attempts`;
where an agent answers on its diagnose channel (`connprobe/agentchannel.py`), the agent runs it with its attached
sensor and each attempt is printed as it arrives, the same as standalone.
Exit status: 0 every attempt healthy, 1 a problem was found, 2 usage or environment error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from bpf.types import KernelEvent
from connprobe import timeline
from connprobe.causes import colour
from connprobe.commands.output import add_output_option, write_document
from connprobe.diagnosis import (
    EXIT_USAGE,
    Diagnosis,
    UsageError,
    duration_arg,
    exit_code,
    record_attempt,
    to_document,
)
from connprobe.netnames import netns_names
from connprobe.timeline import name_namespaces
from correlator import Cause
from prober.redact import install_log_redaction


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", help="http(s)://URL, host:port (TCP), dns:NAME, icmp:HOST, grpc:HOST:PORT, "
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
    p.add_argument("--no-agent", action="store_true",
                   help="run standalone (load a sensor of its own) even when an agent runs on this node")
    p.add_argument("--agent-socket", type=Path, metavar="PATH", default=None,
                   help="the agent's diagnose channel (default $CONNPROBE_DIAGNOSE_SOCKET or "
                        "/run/connprobe/diagnose.sock); used when an agent answers there")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="the agent's config: with --probe NAME, run that probe exactly as the agent does (module, "
                        "credentials, CA, source, timeout, budget; standalone; not with TARGET)")
    p.add_argument("--probe", metavar="NAME", help="the probe of --config to run")
    add_output_option(p, "text: each attempt printed as it finishes; json: the documented document, "
                         "docs/diagnose.schema.json; yaml: the same document")
    p.add_argument("--json", action="store_true", help="the same as -o json")
    p.add_argument("--peers", dest="peers_config", type=Path, metavar="CONFIG",
                   help="ask the peer agents of this agent config's `node:` and `peers:` when this node's evidence "
                        "does not decide (cross-node evidence); the sensor reports only `node.netns`")
    from connprobe.cluster.options import add_arguments as add_kubernetes_arguments

    add_kubernetes_arguments(p)
    p.add_argument("--record", type=Path, metavar="DIR",
                   help="also write each attempt (result + kernel events) as a recording into DIR")


class _SourceError(Exception):
    """An attempt could not be made from its source (its namespace does not exist): nothing more to show."""


async def _attempts(args: argparse.Namespace) -> AsyncIterator[tuple[Diagnosis, list[KernelEvent]]]:
    """Each attempt as it is judged: by the node's agent when one answers on its channel (its sensor is
    attached already), else standalone with a sensor of our own."""
    peers = getattr(args, "peers_config", None)
    config_probe = getattr(args, "_spec", None)  # --config/--probe: that exact probe, run standalone
    if config_probe is None and not args.no_agent and not args.no_kernel and not peers:
        # the agent checks the target and durations with the same `target_spec` and `duration_arg` (a usage
        # error reads the same), so this path imports no probe machinery at all
        from connprobe.agentchannel import AgentUnavailable, DiagnoseRequest, attempts_via_agent, default_socket

        request = DiagnoseRequest(target=args.target, source=args.source, timeout=args.timeout,
                                  client=args.client, ip_policy=args.ip_policy, qtype=args.qtype,
                                  count=args.count, interval=args.interval, budget=args.budget)
        budget_ns = request_budget_ns(args.budget) if args.record else None
        try:
            async for a, events in attempts_via_agent(args.agent_socket or default_socket(), request):
                if args.record:
                    record_attempt(args.record, a.verdict.result.target, a, events, budget_ns)
                yield a, events
            return
        except AgentUnavailable as exc:  # raised before any attempt: run standalone
            logging.getLogger("connprobe.diagnose").debug("standalone: %s", exc)
    from connprobe.diagnosis import attempts, peer_asker, target_spec
    from connprobe.sensorload import close_watch

    timeout = duration_arg("timeout", args.timeout) or 5.0
    budget = duration_arg("budget", args.budget)
    interval = duration_arg("interval", args.interval) or 0.0
    spec = config_probe or target_spec(args.target, source=args.source, timeout=timeout, client=args.client,
                                       ip_policy=args.ip_policy, qtype=args.qtype)
    asker, node_netns = peer_asker(peers) if peers else (None, None)
    watch = await _open_watch_with_progress(args.no_kernel, node_netns)
    try:
        async for item in attempts(spec, watch, count=args.count, interval=interval, budget=budget,
                                   record=args.record, asker=asker):
            yield item
    finally:
        if asker is not None:
            await asker.close()
        await close_watch(watch)


def request_budget_ns(budget: str | None) -> int | None:
    seconds = duration_arg("budget", budget)
    return int(seconds * 1e9) if seconds else None


async def _open_watch_with_progress(disabled: bool, netns: frozenset[int] | None = None):
    """`open_watch`, saying on a terminal's stderr what it is waiting for: loading the sensor (BTF, compiling
    and attaching the BPF programs) is most of a cold diagnose's first second. Nothing is written when stderr
    is not a terminal, so piped and --json output are unchanged. Meanwhile this thread imports the probe code
    (the compile runs on the sensor's thread, in C, without the GIL)."""
    from connprobe.sensorload import open_watch

    err = Console(stderr=True)
    show = not disabled and err.is_terminal
    t0 = time.monotonic()
    status = (err.status("loading the kernel sensor (reading BTF, compiling and attaching the BPF programs)…")
              if show else contextlib.nullcontext())
    with status:
        # kallsyms is read only if a drop location is to be named: this process keeps its capabilities
        loading = asyncio.create_task(open_watch(disabled=disabled, netns=netns, lazy_kallsyms=True))
        await asyncio.sleep(0)  # let it reach its thread
        try:
            import prober.runner  # noqa: F401 - the HTTP clients and probe kinds, imported meanwhile
        finally:
            watch = await loading
    if show:
        state = "attached" if watch.sensor is not None else f"off: {watch.unavailable_reason}"
        err.print(f"[dim]kernel sensor {escape(state)} in {time.monotonic() - t0:.1f} s[/dim]")
    return watch


async def _run_attempts(args: argparse.Namespace, on_attempt: Callable[[Diagnosis], Diagnosis]) -> list[Diagnosis]:
    """Every attempt, each handed to `on_attempt` (which prints it) as soon as it is judged."""
    got: list[Diagnosis] = []
    stream = _attempts(args)
    async with contextlib.aclosing(stream):
        async for a, _ in stream:
            got.append(on_attempt(a))
    return got


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


# options that shape the probe: with --config the probe's own settings are used, so these must stay unset
_SHAPING = {"source": ("--from", "host"), "timeout": ("--timeout", "5s"), "client": ("--client", "aiohttp"),
            "ip_policy": ("--ip", "first"), "qtype": ("--qtype", "A")}


def probe_from_config(args: argparse.Namespace) -> bool:
    """`--config FILE --probe NAME`: that probe (as `args._spec`; target, source and budget taken from it) and
    True; False for a TARGET. UsageError (one line, exit 2) for a combination that cannot be."""
    if args.config is None:
        if args.probe:
            raise UsageError("--probe: needs --config FILE")
        if not args.target:
            raise UsageError("TARGET: required (or --config FILE --probe NAME)")
        return False
    from connprobe.diagnosis import config_spec
    from prober.redact import redact_url

    if args.target:
        raise UsageError(f"TARGET {redact_url(args.target)!r}: not with --config (the probe's target is used)")
    if not args.probe:
        raise UsageError("--config: needs --probe NAME")
    for attr, (flag, default) in _SHAPING.items():
        if getattr(args, attr, default) != default:
            raise UsageError(f"{flag}: not with --config (the probe's own setting is used)")
    spec = config_spec(args.config, args.probe)
    args._spec = spec
    args.target, args.source = spec.target, spec.source
    if args.budget is None and spec.effective_budget is not None:
        args.budget = f"{spec.effective_budget}s"
    return True


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
    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(width=160, highlight=False)
    names: dict[int, str] = {}
    shown: list[Diagnosis] = []

    def show(a: Diagnosis) -> Diagnosis:  # each attempt as soon as it is judged
        r = a.verdict.result
        if r.error and r.error.value == "source_error":
            raise _SourceError(r.error_detail)
        if cluster is not None:
            a = replace(a, verdict=cluster.name_verdict(a.verdict))
        if output != "text":
            return a
        if not shown:
            names.update(netns_names())
            if not a.coverage.available:
                out.print(f"[yellow]kernel evidence is off: {escape(a.coverage.reason)}; verdicts say so[/yellow]")
            if cluster is not None:
                names.update(cluster.netns_names())
                for line in getattr(args, "cluster_names", {}).values():
                    out.print(f"[dim]{escape(line)}[/dim]")
        shown.append(a)
        print_attempt(out, a, args.count, names)
        return a

    output = getattr(args, "output", None) or ("json" if args.json else "text")
    try:
        if args.count < 1:
            raise UsageError(f"--count: {args.count} must be at least 1")
        if args.json and output != "json":
            raise UsageError(f"--json: not with -o {output}")
        cluster = None if probe_from_config(args) else resolve_cluster_names(args)
        done = asyncio.run(_run_attempts(args, show))
    except UsageError as exc:
        err.print(f"connprobe diagnose: {exc}", markup=False, highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except _SourceError as exc:
        err.print(f"connprobe diagnose: {exc} (list namespaces with `ip netns list`)", markup=False, highlight=False)
        return EXIT_USAGE
    code = exit_code(done)
    if output in ("json", "yaml"):
        doc = to_document(args.target, args.source, duration_arg("budget", args.budget), done, code)
        write_document(doc, output)
        return code
    bad = sum(a.verdict.cause != Cause.OK for a in done)
    out.print(f"{len(done)} attempt(s), {bad} with a problem")
    return code
