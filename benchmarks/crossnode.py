"""Cross-node evidence: what asking a peer adds to a verdict, and what answering costs the peer.

    .venv/bin/python benchmarks/crossnode.py [--trials 10] [--asks 10] [--rate 100] [--seconds 10]

In the lab: node B's agent runs as its own process (`connprobe agent`, sensor restricted to the servers'
namespaces, watching tcp/8080, a bearer token); node A's agent runs here (client namespace only, peers: B).

1. Added latency of a verdict that asked a peer: `--trials` probes whose SYNs a policy on srv1 drops (node A
   alone: unknown/connect_timeout; asking B: policy_drop/syn); for each, node A's question and the second
   correlation are timed `--asks` times (p50, p99), next to the local verdict's correlation.
2. Load on the answering agent at `--rate` questions/s for `--seconds`: node B's CPU time (utime + stime from
   /proc) while idle and while answering, side by side in one run, and the answers' latency p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from connprobe.lab import Lab  # noqa: E402


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def main(args: argparse.Namespace) -> None:
    from connprobe.agent import Agent
    from connprobe.config import parse_config
    from correlator import correlate
    from prober.runner import run_probe

    with Lab() as lab, tempfile.TemporaryDirectory() as d:
        work = Path(d)
        token = secrets.token_urlsafe(24)
        (work / "token").write_text(token + "\n")
        port = _free_port()
        (work / "b.yml").write_text(yaml.safe_dump({"node": {
            "name": "node-b", "netns": [lab.ns(r).name for r in ("srv1", "srv2", "dns")], "watch": ["tcp/8080"],
            "peer_token_file": str(work / "token")}}))
        b_log = open(work / "b.log", "w")  # noqa: SIM115
        b = subprocess.Popen([sys.executable, "-m", "connprobe.cli", "agent", "--config", str(work / "b.yml"),
                              "--listen", f"127.0.0.1:{port}", "--no-config-watch", "--log-level", "warning"],
                             stdout=b_log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    with urllib.request.urlopen(url + "/-/ready", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                time.sleep(0.1)
            else:
                raise SystemExit(f"node B never became ready: {(work / 'b.log').read_text()[-2000:]}")
            (work / "a.yml").write_text(yaml.safe_dump({
                "node": {"name": "node-a", "netns": [lab.ns("client").name]},
                "peers": [{"cidr": "10.77.2.0/24", "url": url, "token_file": str(work / "token"),
                           "timeout": "1s"}]}))
            a = Agent(work / "a.yml")
            cfg = parse_config(yaml.safe_dump({
                "modules": {"m": {"prober": "tcp", "timeout": "1200ms"}},
                "probes": [{"name": "x", "module": "m", "target": "10.77.2.11:8080",
                            "source": f"netns {lab.ns('client').name}"}]}))
            local_us, ask_ms, subs = [], [], set()
            try:
                await a.start()  # inside the try: stopped also when it never gets ready
                await a.wait_ready(60)
                with lab.policy_drop("srv1", direction="in", port=8080):
                    for _ in range(args.trials):
                        result = (await run_probe(cfg.probes[0], a.env))[0]
                        events, cov = await a.kernel_watch.collect(result)
                        t0 = time.perf_counter()
                        alone = correlate(result, events, coverage=cov)
                        local_us.append((time.perf_counter() - t0) * 1e6)
                        for _ in range(args.asks):
                            t0 = time.perf_counter()
                            remote = await a.asker.ask(result, a.clock_offset())
                            asked = correlate(result, events, coverage=cov, remote=remote)
                            ask_ms.append((time.perf_counter() - t0) * 1e3)
                            subs.add((alone.sub_cause, asked.sub_cause))
            finally:
                await a.stop()
            print(f"verdicts: {sorted(subs)}")
            print(f"local verdict (correlation only): p50 {_pct(local_us, 0.5):.0f} µs over {len(local_us)} probes")
            print(f"added by asking node B (question + answer + second correlation), {len(ask_ms)} asks: "
                  f"p50 {_pct(ask_ms, 0.5):.2f} ms, p99 {_pct(ask_ms, 0.99):.2f} ms, max {max(ask_ms):.2f} ms")

            # 2. load on B
            import aiohttp

            params = {"proto": "tcp", "saddr": "10.77.1.2", "sport": "40000", "daddr": "10.77.2.11", "dport": "8080"}
            headers = {"Authorization": f"Bearer {token}"}
            c0, w0 = _cpu_s(b.pid), time.monotonic()
            await asyncio.sleep(args.seconds)
            idle = (_cpu_s(b.pid) - c0) / (time.monotonic() - w0)
            lat: list[float] = []
            async with aiohttp.ClientSession() as s:
                async def one() -> None:
                    now = time.time_ns()
                    q = {**params, "from": str(now - 2_000_000_000), "to": str(now), "sent": str(now)}
                    t0 = time.perf_counter()
                    async with s.get(url + "/api/evidence", params=q, headers=headers) as r:
                        await r.read()
                        assert r.status == 200, r.status
                    lat.append((time.perf_counter() - t0) * 1e3)

                tasks = []
                c0, w0 = _cpu_s(b.pid), time.monotonic()
                n = int(args.rate * args.seconds)
                for i in range(n):
                    delay = w0 + i / args.rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(one()))
                await asyncio.gather(*tasks)
                busy = (_cpu_s(b.pid) - c0) / (time.monotonic() - w0)
            print(f"node B idle: {idle * 100:.1f} % of a CPU; answering {args.rate:g} questions/s for "
                  f"{args.seconds:g} s: {busy * 100:.1f} % of a CPU (+{(busy - idle) * 100:.1f} points, "
                  f"{(busy - idle) / args.rate * 1e6:.0f} µs CPU per question); answer latency "
                  f"p50 {_pct(lat, 0.5):.2f} ms, p99 {_pct(lat, 0.99):.2f} ms ({len(lat)} answers)")
        finally:
            b.terminate()
            try:
                b.wait(10)
            except subprocess.TimeoutExpired:
                b.kill()
                b.wait()
            b_log.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--asks", type=int, default=10)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--seconds", type=float, default=10.0)
    asyncio.run(main(p.parse_args()))
