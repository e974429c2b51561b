"""The agent against blackbox_exporter for the same 1,000 HTTP targets every 10 s, side by side in one run.

    sudo .venv/bin/python benchmarks/agent_vs_blackbox.py [--probes 1000] [--interval 10] [--warmup 20]
                                                          [--duration 60] [--profile DIR] [--rounds 1]

Brings up the lab. For each round, one after the other over windows of the same length:
- `connprobe agent` with its kernel sensor (benchmarks/agent_overhead.py's config: 1,000 HTTP probes from the
  client namespace to srv1/srv2 by name, half IPv4, half IPv6, fresh connections, 10 s interval), scraped
  every 15 s;
- blackbox_exporter (Debian's `prometheus-blackbox-exporter`, installed with apt-get when missing) in the same
  namespace, driven as Prometheus drives it: each of the 1,000 targets is a `GET /probe?module=...&target=...`
  every 10 s at its own offset in the interval (a driver process in that namespace; its CPU is Prometheus's,
  not counted), the same two modules (ip4 / ip6 preferred, no fallback).
CPU of each process (utime+stime; 100 % = one core) and its RSS over the window. `--profile DIR`: py-spy
(`pip install -e .[profile]`) samples the agent during its window, writing DIR/agent.svg (flame graph) and
DIR/agent.txt (collapsed stacks, for benchmarks/profile_stages.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

BLACKBOX = "prometheus-blackbox-exporter"
BB_ADDR = "127.0.0.1:9115"

DRIVER = r"""
import asyncio, sys, time, json
import aiohttp
n, interval, seconds, addr = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
targets = ["http://srv1.lab.test:8080/ok", "http://srv2.lab.test:8080/ok"]
async def main():
    ok = fail = 0
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
        async def one(i):
            nonlocal ok, fail
            params = {"module": "v6" if i % 4 >= 2 else "v4", "target": targets[i % 2]}
            try:
                async with s.get(f"http://{addr}/probe", params=params) as r:
                    text = await r.text()
                if "\nprobe_success 1" in text:
                    ok += 1
                else:
                    fail += 1
            except Exception:
                fail += 1
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks = set()
        k = 0
        print("ready", flush=True)
        while loop.time() - t0 < seconds:
            i = k % n
            due = t0 + (k // n) * interval + i * interval / n
            d = due - loop.time()
            if d > 0:
                await asyncio.sleep(d)
            t = asyncio.create_task(one(i)); tasks.add(t); t.add_done_callback(tasks.discard)
            k += 1
        if tasks:
            await asyncio.wait(tasks, timeout=10)
    print(json.dumps({"probes": ok + fail, "ok": ok}), flush=True)
asyncio.run(main())
"""


def ensure_blackbox() -> str:
    path = shutil.which(BLACKBOX)
    if path is None:
        print(f"installing {BLACKBOX} (apt-get)", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", BLACKBOX], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        path = shutil.which(BLACKBOX)
        if path is None:
            raise SystemExit(f"{BLACKBOX} not found after installing it")
    return path


def run_blackbox(ns: str, work: Path, args: argparse.Namespace) -> dict:
    from agent_overhead import proc_cpu, proc_mem

    cfg = work / "blackbox.yml"
    cfg.write_text("modules:\n"
                   "  v4:\n    prober: http\n    timeout: 5s\n    http:\n      preferred_ip_protocol: ip4\n"
                   "      ip_protocol_fallback: false\n"
                   "  v6:\n    prober: http\n    timeout: 5s\n    http:\n      preferred_ip_protocol: ip6\n"
                   "      ip_protocol_fallback: false\n")
    bb = subprocess.Popen(["ip", "netns", "exec", ns, ensure_blackbox(), f"--config.file={cfg}",
                           f"--web.listen-address={BB_ADDR}", "--log.level=error"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    drv = None
    try:
        time.sleep(1.0)
        if bb.poll() is not None:
            raise SystemExit(f"blackbox_exporter did not start: {bb.stderr.read().decode()[-2000:]}")
        seconds = args.warmup + args.duration + 2
        drv = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", DRIVER, str(args.probes),
                                str(args.interval), str(seconds), BB_ADDR], stdout=subprocess.PIPE, text=True)
        assert drv.stdout is not None and drv.stdout.readline().strip() == "ready"
        time.sleep(args.warmup)
        c0, t0 = proc_cpu(bb.pid), time.monotonic()
        time.sleep(args.duration)
        c1, t1 = proc_cpu(bb.pid), time.monotonic()
        mem = proc_mem(bb.pid)
        done = json.loads(drv.stdout.readline())
        return {"mode": "blackbox_exporter", "cpu_percent": round(100 * (c1 - c0) / (t1 - t0), 1),
                "rss_mib": round(mem["VmRSS"], 1), "peak_rss_mib": round(mem["VmHWM"], 1),
                "probes_per_s": round(done["probes"] / seconds, 1),
                "ok_ratio": round(done["ok"] / max(done["probes"], 1), 3)}
    finally:
        for p in (drv, bb):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if drv is not None and drv.stdout is not None:
            drv.stdout.close()
        if bb.stderr is not None:
            bb.stderr.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probes", type=int, default=1000)
    ap.add_argument("--interval", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--scrapes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--profile", type=Path, default=None, help="py-spy the agent: DIR/agent.svg and DIR/agent.txt")
    ap.add_argument("--phase-histograms", choices=("none", "all"), default="none")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("agent_vs_blackbox: needs root (the lab's namespaces and the BPF sensor)", file=sys.stderr)
        return 2
    import agent_overhead

    from connprobe.lab import Lab

    ensure_blackbox()
    rows = []
    with tempfile.TemporaryDirectory(prefix="connprobe-bench-bb-") as tmp, Lab() as lab:
        work = Path(tmp)
        cfg = work / "agent.yml"
        ns = lab.ns("client").name
        agent_overhead.write_config(cfg, ns, args.probes, args.interval, args.phase_histograms)
        for rnd in range(args.rounds):
            load = Path("/proc/loadavg").read_text().split()[:3]
            r = agent_overhead.run_mode("kernel", cfg, args, work, profile=args.profile if rnd == 0 else None)
            r["round"], r["load"] = rnd + 1, " ".join(load)
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
            b = run_blackbox(ns, work, args)
            b["round"], b["load"] = rnd + 1, " ".join(Path("/proc/loadavg").read_text().split()[:3])
            rows.append(b)
            print(json.dumps(b), file=sys.stderr)
    print(json.dumps({"command": " ".join(sys.argv), "cpus": os.cpu_count(), "results": rows}, indent=1))
    print("\n| round (load) | process | CPU % | RSS MiB (peak) | probes/s | agent/blackbox CPU | agent/blackbox RSS |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for a, b in zip(rows[::2], rows[1::2], strict=True):
        cpu_ratio = a["cpu_percent"] / max(b["cpu_percent"], 0.1)
        rss_ratio = a["rss_mib"] / max(b["rss_mib"], 0.1)
        print(f"| {a['round']} ({a['load']}) | connprobe agent + sensor | {a['cpu_percent']} | {a['rss_mib']} "
              f"({a['peak_rss_mib']}) | {a['verdicts_per_s']} | {cpu_ratio:.2f}x | {rss_ratio:.2f}x |")
        print(f"| {b['round']} ({b['load']}) | blackbox_exporter | {b['cpu_percent']} | {b['rss_mib']} "
              f"({b['peak_rss_mib']}) | {b['probes_per_s']} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
