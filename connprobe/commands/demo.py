"""`connprobe demo`: the agent on the built-in lab, with faults switching on and off on a schedule.

The lab comes up, the agent starts with a handful of probes from the lab's client namespace (kernel sensor
attached), the status page and /metrics are served on loopback, and a schedule walks through the fault
matrix: each phase switches one fault on, the live table shows the verdicts as they arrive, and at the end
a table says which cause each probe got in each phase. Everything is torn down on exit (Ctrl-C included).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from connprobe.causes import colour
from connprobe.lab import Lab, LabError
from connprobe.lab.schedule import DEMO
from correlator.types import Verdict


def probe_config(lab: Lab, interval: float) -> dict:
    src = f"netns {lab.ns('client').name}"
    every = f"{interval:g}s"
    timeout = f"{min(2.5, interval):g}s"  # a probe's timeout may not exceed its interval
    return {
        "modules": {
            "http": {"prober": "http", "timeout": timeout, "budget": "300ms"},
            "bulk": {"prober": "http", "timeout": timeout, "budget": "100ms"},
            "tcp": {"prober": "tcp", "timeout": timeout},
            "dns": {"prober": "dns", "timeout": timeout, "dns": {"query_name": "srv1.lab.test"}},
        },
        "probes": [
            {"name": "web", "module": "http", "target": "http://srv1.lab.test:8080/ok", "source": src,
             "interval": every},
            {"name": "svc", "module": "http", "target": "http://svc.lab.test/ok", "source": src, "interval": every},
            {"name": "bulk", "module": "bulk", "target": "http://srv2.lab.test:8080/bytes/4000000", "source": src,
             "interval": every},
            {"name": "tcp", "module": "tcp", "target": "srv2.lab.test:8080", "source": src, "interval": every},
            {"name": "dns", "module": "dns", "target": "resolv.conf", "source": src, "interval": every},
        ],
    }


class Board:
    """What the terminal shows: the last verdict per probe, and the causes seen per phase."""

    def __init__(self, probes: list[str]):
        self.probes = probes
        self.last: dict[str, Verdict] = {}
        self.phase = "starting"
        self.fault = ""
        self.phase_ends = 0.0
        self.seen: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.lines: collections.deque[str] = collections.deque(maxlen=8)

        self.switches: list[tuple[int, str | None]] = []  # (monotonic ns, phase or None between phases)

    def enter(self, phase: str | None, fault: str = "") -> None:
        self.switches.append((time.monotonic_ns(), phase))
        if phase is not None:
            self.phase, self.fault = phase, fault

    def phase_at(self, ts_ns: int) -> str | None:
        """The phase a probe started in (None: it started between two phases, while a fault was going off)."""
        current = None
        for at, phase in self.switches:
            if at > ts_ns:
                break
            current = phase
        return current

    def __call__(self, v: Verdict) -> None:
        name = v.result.name
        self.last[name] = v
        phase = self.phase_at(v.result.start_ns)
        if phase is not None:
            self.seen[(phase, name)][str(v.cause)] += 1
        self.lines.append(f"[{phase or 'between phases'}] {v.summary}")

    def render(self, urls: str) -> Group:
        left = max(0.0, self.phase_ends - time.monotonic())
        head = Text.from_markup(f"[bold]phase: {escape(self.phase)}[/bold] — {escape(self.fault)} "
                                f"[dim](next in {left:.0f} s)[/dim]")
        t = Table(expand=False)
        for col in ("probe", "target", "verdict", "conf.", "why"):
            t.add_column(col, no_wrap=col != "why", overflow="ellipsis")
        for name in self.probes:
            v = self.last.get(name)
            if v is None:
                t.add_row(name, "", "[dim]waiting[/dim]", "", "")
                continue
            style = colour(v.cause)
            why = v.facts[0] if v.facts else ""
            t.add_row(name, escape(v.result.target), f"[{style}]{escape(v.sub_cause or str(v.cause))}[/{style}]",
                      f"{v.confidence:.0%}", escape(why))
        return Group(head, t, Text(urls, style="dim"))

    def summary(self) -> Table:
        t = Table(title="Causes per phase (cause and count of verdicts of the probes that started in it)",
                  title_justify="left")
        t.add_column("phase")
        for name in self.probes:
            t.add_column(name, no_wrap=True)
        for ph in DEMO:
            row = [ph.name]
            for name in self.probes:
                seen = self.seen.get((ph.name, name))
                if not seen:
                    row.append("-")
                    continue
                cells = []
                for cause, n in seen.most_common():
                    style = colour(cause)
                    mark = "*" if ph.expect.get(name) == cause else ""
                    cells.append(f"[{style}]{cause}{mark}[/{style}] {n}")
                row.append(" ".join(cells))
            t.add_row(*row)
        return t


async def run_demo(args: argparse.Namespace, out: Console) -> int:
    from connprobe.agent import Agent
    from connprobe.web import start_server

    with Lab() as lab, tempfile.TemporaryDirectory(prefix="connprobe-demo-") as tmp:
        cfg_path = Path(tmp) / "probes.yaml"
        cfg = probe_config(lab, args.interval)
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        board = Board([p["name"] for p in cfg["probes"]])
        agent = Agent(cfg_path, kernel=not args.no_kernel)
        agent.add_sink("terminal", board, queue=1000)
        await agent.start()
        runner = None
        try:
            try:
                runner = await start_server(agent, "127.0.0.1", args.port)
            except OSError:
                runner = await start_server(agent, "127.0.0.1", 0)  # the port is taken: any free one
            host, port = runner.addresses[0][:2]
            base = f"http://{host}:{port}"
            out.print(f"[bold]lab {lab.id}[/bold] is up; the agent probes it from {lab.ns('client').name}.")
            out.print(f"status page: {base}/   metrics: {base}/metrics   "
                      f"(Prometheus: scrape {host}:{port} as job 'connprobe')")
            await agent.wait_ready(timeout=60)
            out.print(f"kernel sensor: {agent.sensor_state}")
            urls = f"status page {base}/ · metrics {base}/metrics · Ctrl-C ends the demo"
            live = out.is_terminal
            view = Live(get_renderable=lambda: board.render(urls), console=out, refresh_per_second=4,
                        transient=True) if live else contextlib.nullcontext()

            def flush() -> None:
                while board.lines and not live:
                    out.print("    " + escape(board.lines.popleft()), highlight=False)

            with view:
                for _ in range(args.cycles):
                    for ph in DEMO:
                        board.enter(ph.name, ph.fault.what)
                        board.phase_ends = time.monotonic() + args.phase_seconds
                        if not live:
                            out.print(f"--- phase {ph.name}: {ph.fault.what}")
                        with ph.fault(lab):
                            while time.monotonic() < board.phase_ends:
                                await asyncio.sleep(0.25)
                                flush()
                        # probes that started under this fault are still finishing: let them land before the
                        # next fault; probes that start now belong to no phase
                        board.enter(None)
                        await asyncio.sleep(min(3.0, args.interval))
                        flush()
        finally:
            if runner is not None:
                await runner.cleanup()
            await agent.stop()
        out.print(board.summary())
        out.print("* = the cause this phase is expected to give that probe. "
                  f"Lab {lab.id} and the agent are torn down.")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--phase-seconds", type=float, default=9.0, help="how long each fault stays on (default 9)")
    p.add_argument("--interval", type=float, default=3.0, help="probe interval in seconds (default 3)")
    p.add_argument("--cycles", type=int, default=1, help="how many times to walk the schedule (default 1)")
    p.add_argument("--port", type=int, default=9516, help="status page and /metrics port on 127.0.0.1")
    p.add_argument("--no-kernel", action="store_true", help="run without the kernel sensor")


def run(args: argparse.Namespace) -> int:
    out = Console()
    if not out.is_terminal:
        out = Console(width=170)
    if args.phase_seconds < args.interval:
        Console(stderr=True).print(f"connprobe demo: --phase-seconds {args.phase_seconds:g} must be at least "
                                   f"--interval {args.interval:g}", markup=False)
        return 2
    try:
        return asyncio.run(run_demo(args, out))
    except LabError as exc:
        Console(stderr=True).print(f"connprobe demo: {exc}", markup=False)
        return 2
