"""Where the agent's CPU goes, by stage, from py-spy's collapsed stacks (benchmarks/agent_vs_blackbox.py
--profile DIR writes DIR/agent.txt).

    .venv/bin/python benchmarks/profile_stages.py DIR/agent.txt --cpu-percent 12.3 --probes-per-s 100

Each sample is given to the stage of the innermost frame of connprobe's own code on its stack (from the leaf
up: a sample inside aiohttp called by prober/http.py is the probe's); samples whose leaf is the loop's `run`
are inside uvloop's C code (socket I/O, timers, running callbacks: py-spy sees no Python frame there); others
with no frame of connprobe's are "event loop and libraries". A probe's system calls (connect, send: on
a loopback or veth path the kernel handles the whole handshake in the caller's context, the sensor's BPF
programs included) count as the probe. With the agent's CPU share and probe rate, each stage's share
becomes µs per probe.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?):(?P<line>\d+)\)$")
STAGES = ("probe", "event ingest", "correlation", "metrics", "status board", "log", "web/scrape",
          "scheduler", "agent pipeline", "event loop (uvloop's C: I/O, timers, callbacks)", "event loop and libraries")
LOOP_LEAVES = ("Runner.run", "BaseEventLoop.run_until_complete", "BaseEventLoop.run_forever", "run_until_complete")


def _ranges() -> dict[str, tuple[int, int]]:
    from connprobe import sinks

    out = {}
    for name in ("JsonLinesWriter", "StatusBoard"):
        lines, start = inspect.getsourcelines(getattr(sinks, name))
        out[name] = (start, start + len(lines))
    return out


def stage_of(frames: list[str], ranges: dict[str, tuple[int, int]]) -> str:
    leaf = FRAME.match(frames[-1]) if frames else None
    if leaf is not None and leaf["func"] in LOOP_LEAVES:  # no Python frame below: inside uvloop's C code
        return STAGES[-2]
    for frame in reversed(frames):  # leaf first
        m = FRAME.match(frame)
        if m is None:
            continue
        file, func, line = "/" + m["file"].lstrip("/"), m["func"], int(m["line"])
        if "/prober/" in file:
            return "scheduler" if file.endswith("scheduler.py") else "probe"
        if "/bpf/" in file or file.endswith("kernelwatch.py") or func in ("_add", "_prune", "_window"):
            return "event ingest"
        if "/correlator/" in file:
            return "correlation"
        if file.endswith("connprobe/metrics.py"):
            return "metrics"
        if file.endswith("connprobe/sinks.py"):
            for name, (a, b) in ranges.items():
                if a <= line < b:
                    return {"JsonLinesWriter": "log", "StatusBoard": "status board"}[name]
            if func == "verdict_document":
                return "log"
            continue
        if file.endswith("connprobe/web.py"):
            return "web/scrape"
        if file.endswith("connprobe/agent.py"):
            return "agent pipeline"
    return "event loop and libraries"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stacks", type=Path)
    ap.add_argument("--cpu-percent", type=float, required=True, help="the agent's CPU over the profiled window")
    ap.add_argument("--probes-per-s", type=float, required=True)
    args = ap.parse_args()
    ranges = _ranges()
    counts: collections.Counter[str] = collections.Counter()
    for raw in args.stacks.read_text().splitlines():
        stack, _, n = raw.rpartition(" ")
        if not stack:
            continue
        counts[stage_of(stack.split(";"), ranges)] += int(n)
    total = sum(counts.values())
    per_probe_us = args.cpu_percent / 100 / args.probes_per_s * 1e6
    print(f"{total} samples; agent CPU {args.cpu_percent} % at {args.probes_per_s} probes/s = "
          f"{per_probe_us:.0f} µs of CPU per probe\n")
    print("| stage | share of samples | µs per probe |")
    print("|---|---:|---:|")
    for stage in STAGES:
        share = counts.get(stage, 0) / max(total, 1)
        print(f"| {stage} | {share:.1%} | {share * per_probe_us:.0f} |")


if __name__ == "__main__":
    main()
