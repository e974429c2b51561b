"""A 10,000-probe configuration: the agent starts, how much memory it holds, how long `/metrics`, the status page
and `/api/recent` take to render, and whether a render holds the event loop (the probes' clock).

    .venv/bin/python benchmarks/agent_10k.py [--probes 10000] [--interval 120] [--warmup 30] [--renders 3]

Starts a loopback HTTP upstream (in this process) and `connprobe agent --no-kernel` as its own process with N
HTTP probes, each to its own URL (so each has its own series), at --interval seconds (the scheduler spreads
their starts over one interval). Measures: seconds until /-/ready, RSS (VmRSS; VmHWM the peak) when ready and
after the warm-up, and for each page --renders renders (median and max seconds, size). During the renders it
reads `connprobe_event_loop_blocked_seconds` (how late the loop woke up because its own callbacks held it,
sampled every 20 ms) and the raw lag gauge: the bucket the worst sample fell in. Prints JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent


def rss(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)  # MiB
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 60) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def upstream() -> int:
    """A loopback HTTP server in a thread of this process: every path answers 200 "ok"."""
    from aiohttp import web

    port = free_port()
    started = threading.Event()

    async def main():
        async def ok(request):
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/{tail:.*}", ok)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        started.set()
        await asyncio.Event().wait()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    started.wait(10)
    return port


def blocked(text: str) -> tuple[dict[str, float], float]:
    buckets, lag = {}, 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name == "connprobe_event_loop_blocked_seconds":
            buckets = {s.labels["le"]: s.value for s in fam.samples if s.name.endswith("_bucket")}
        if fam.name == "connprobe_event_loop_lag_seconds":
            lag = fam.samples[0].value
    return buckets, lag


def worst_bucket(before: dict[str, float], after: dict[str, float]) -> tuple[str, int, float]:
    """(le of the worst sample, samples over 50 ms, samples) between two readings."""
    delta = {le: after[le] - before.get(le, 0) for le in after}
    total = delta["+Inf"]
    les = sorted((le for le in delta if le != "+Inf"), key=float)
    worst = next((le for le in les if delta[le] == total), "+Inf")
    return worst, int(total - delta["0.05"]), total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=10_000)
    ap.add_argument("--interval", type=float, default=120.0)
    ap.add_argument("--warmup", type=float, default=30.0)
    ap.add_argument("--renders", type=int, default=3)
    args = ap.parse_args()

    up = upstream()
    tmp = Path(tempfile.mkdtemp(prefix="connprobe-10k-"))
    cfg = tmp / "config.yml"
    probes = [{"name": f"p{i:05d}", "module": "http_2xx", "target": f"http://127.0.0.1:{up}/ok/{i}",
               "interval": f"{args.interval:g}s"} for i in range(args.probes)]
    cfg.write_text(yaml.safe_dump({"modules": {"http_2xx": {"prober": "http", "timeout": "2s"}}, "probes": probes},
                                  sort_keys=False))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "connprobe.cli", "agent", "--config", str(cfg), "--no-kernel",
                             "--listen", f"127.0.0.1:{port}", "--log-level", "warning"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "agent.stderr", "w"))  # noqa: SIM115
    result: dict = {"probes": args.probes, "interval_s": args.interval}
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"agent exited: {(tmp / 'agent.stderr').read_text()[-2000:]}")
            try:
                if get(base + "/-/ready", 2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        result["ready_s"] = round(time.monotonic() - t0, 2)
        result["rss_ready_mib"] = rss(proc.pid)
        time.sleep(args.warmup)
        result["rss_after_warmup_mib"] = rss(proc.pid)
        pages = ("/metrics", "/", "/api/recent?limit=1000")
        for path in pages:
            times, size = [], 0
            before, _ = blocked(get(base + "/metrics")[1].decode())
            for _ in range(args.renders):
                s = time.monotonic()
                _, body = get(base + path)
                times.append(time.monotonic() - s)
                size = len(body)
                del body
                time.sleep(0.5)
            after, _ = blocked(get(base + "/metrics")[1].decode())
            # the /metrics reads around the renders count too: they are renders of /metrics themselves
            le, over, total = worst_bucket(before, after)
            result[path] = {"seconds (median, max)": (round(statistics.median(times), 3), round(max(times), 3)),
                            "bytes": size, "loop blocked: worst sample <= s": le,
                            "loop blocked: samples over 50 ms / samples": f"{over} / {int(total)}"}
        result["rss_end_mib"] = rss(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    print(json.dumps(result, indent=2))
    print("\n| measure | value |\n|---|---|")
    for k, v in result.items():
        print(f"| {k} | {v} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
