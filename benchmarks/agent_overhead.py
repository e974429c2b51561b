"""Overhead of `connprobe agent` at 1,000 probes configured at a 10 s interval (100 probes/s) against lab targets.

    sudo .venv/bin/python benchmarks/agent_overhead.py [--probes 1000] [--interval 10] [--warmup 20]
                                                       [--duration 60] [--scrapes 20] [--modes kernel,no-kernel]
                                                       [--phase-histograms none|all]

Brings up the lab; for each mode starts `connprobe agent` as its own process (kernel sensor attached, or
--no-kernel), with N HTTP probes from the client namespace to srv1/srv2 (IPv4 and IPv6, by name: every probe
resolves through the lab's DNS and opens a fresh connection). After the warm-up (the scheduler spreads the
starts over one interval) it measures over --duration seconds: CPU % of the agent process (utime+stime from
/proc/PID/stat; 100 % = one core), RSS (VmRSS, and VmHWM the peak), verdicts per second, and how long a
GET /metrics takes (--scrapes scrapes, spread over the window) and how big it is. It also reports what would
say the agent could not keep up: skipped ticks, results and sink verdicts dropped, suspect probes, loop lag.
Prints a JSON document and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024  # MiB
    return out


def rss_by_mapping(pid: int, top: int = 8) -> dict[str, float]:
    """Resident MiB by what is mapped (a library, [heap], anonymous memory), largest first."""
    sizes: dict[str, int] = {}
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            name = head[5] if len(head) > 5 else "[anon]"
        elif head and head[0] == "Rss:":
            sizes[name] = sizes.get(name, 0) + int(head[1])
    return {k: round(v / 1024, 1) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:top]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 30) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def totals(text: str) -> dict[str, float]:
    want = {"connprobe_probes_total", "connprobe_scheduler_skipped_ticks_total", "connprobe_results_dropped_total",
            "connprobe_sink_dropped_total", "connprobe_suspect_probes_total", "connprobe_event_loop_lag_seconds",
            "connprobe_kernel_events_seen_total", "connprobe_kernel_events_lost_total"}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in want:
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def write_config(path: Path, client: str, n: int, interval: float, phase_histograms: str = "none") -> None:
    import yaml

    targets = ["http://srv1.lab.test:8080/ok", "http://srv2.lab.test:8080/ok"]
    probes = [{"name": f"p{i:04d}", "module": "v6" if i % 4 >= 2 else "v4", "target": targets[i % 2],
               "source": f"netns {client}", "interval": f"{interval}s"} for i in range(n)]
    modules = {"v4": {"prober": "http", "timeout": "5s", "ip_policy": "ipv4", "budget": "1s"},
               "v6": {"prober": "http", "timeout": "5s", "ip_policy": "ipv6", "budget": "1s"}}
    if phase_histograms == "all":  # every phase a histogram per probe (before they were opt-in: always)
        for m in modules.values():
            m["phase_histograms"] = ["resolve", "connect", "tls", "processing", "transfer"]
    path.write_text(yaml.safe_dump({"modules": modules, "probes": probes}, sort_keys=False))


def start_profile(pid: int, seconds: float, out: Path) -> list[subprocess.Popen]:
    """py-spy on the agent for `seconds`: a flame graph (out/agent.svg) and collapsed stacks (out/agent.txt)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.mkdir(parents=True, exist_ok=True)
    common = ["record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100", "--nonblocking"]
    return [subprocess.Popen([spy, *common, "--format", fmt, "--output", str(out / name)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for fmt, name in (("flamegraph", "agent.svg"), ("raw", "agent.txt"))]


def run_mode(mode: str, cfg: Path, args: argparse.Namespace, workdir: Path, profile: Path | None = None) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "connprobe.cli", "agent", "--config", str(cfg), "--listen", f"127.0.0.1:{port}",
            "--log-level", "warning"] + (["--no-kernel"] if mode == "no-kernel" else [])
    err = open(workdir / f"agent-{mode}.stderr", "w")  # noqa: SIM115
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"agent exited: {(workdir / f'agent-{mode}.stderr').read_text()[-2000:]}")
            try:
                if get(url + "/-/ready", 2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("agent not ready after 60 s")
            time.sleep(0.2)
        time.sleep(args.warmup)
        spies = start_profile(proc.pid, args.duration, profile) if profile is not None else []
        s0 = time.monotonic()
        _, body = get(url + "/metrics")
        # counters are read at render time, somewhere inside the scrape: date them at its midpoint
        before, cpu0, t0, r0 = totals(body.decode()), proc_cpu(proc.pid), time.monotonic(), (s0 + time.monotonic()) / 2
        scrape_ms, sizes, lines = [], [], []
        gap = args.duration / args.scrapes
        for _ in range(args.scrapes):
            time.sleep(gap)
            s0 = time.monotonic()
            _, body = get(url + "/metrics")
            s1 = time.monotonic()
            scrape_ms.append((s1 - s0) * 1000)
            sizes.append(len(body))
            lines.append(body.count(b"\n"))
        cpu1, t1, r1 = proc_cpu(proc.pid), time.monotonic(), (s0 + s1) / 2
        for spy in spies:
            spy.wait(args.duration + 60)
        after = totals(body.decode())
        mem = proc_mem(proc.pid)
        by_mapping = rss_by_mapping(proc.pid)
        elapsed = t1 - t0
        d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        rate_window = r1 - r0
        scrape_ms.sort()
        return {
            "mode": mode,
            "probes": args.probes,
            "interval_s": args.interval,
            "window_s": round(elapsed, 1),
            "cpu_percent": round(100 * (cpu1 - cpu0) / elapsed, 1),
            "rss_mib": round(mem["VmRSS"], 1),
            "peak_rss_mib": round(mem["VmHWM"], 1),
            "verdicts_per_s": round(d.get("connprobe_probes_total", 0) / rate_window, 1),
            "scrape_ms_median": round(statistics.median(scrape_ms), 1),
            "scrape_ms_p95": round(scrape_ms[int(0.95 * (len(scrape_ms) - 1))], 1),
            "scrape_ms_max": round(scrape_ms[-1], 1),
            "scrape_bytes": sizes[-1],
            "scrape_lines": lines[-1],
            "skipped_ticks": d.get("connprobe_scheduler_skipped_ticks_total", 0),
            "results_dropped": d.get("connprobe_results_dropped_total", 0),
            "sink_dropped": d.get("connprobe_sink_dropped_total", 0),
            "suspect_probes": d.get("connprobe_suspect_probes_total", 0),
            "loop_lag_s_last": after.get("connprobe_event_loop_lag_seconds", 0),
            "kernel_events_seen": d.get("connprobe_kernel_events_seen_total", 0),
            "kernel_events_lost": d.get("connprobe_kernel_events_lost_total", 0),
            "rss_by_mapping_mib": by_mapping,
        }
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        err.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probes", type=int, default=1000)
    ap.add_argument("--interval", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--scrapes", type=int, default=20)
    ap.add_argument("--modes", default="kernel,no-kernel")
    ap.add_argument("--phase-histograms", choices=("none", "all"), default="none",
                    help="the modules' phase_histograms: none (the default of a module) or all five HTTP phases")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("agent_overhead: needs root (the lab's namespaces and the BPF sensor)", file=sys.stderr)
        return 2
    from connprobe.lab import Lab

    results = []
    with tempfile.TemporaryDirectory(prefix="connprobe-bench-agent-") as tmp, Lab() as lab:
        work = Path(tmp)
        cfg = work / "agent.yml"
        write_config(cfg, lab.ns("client").name, args.probes, args.interval, args.phase_histograms)
        for mode in args.modes.split(","):
            results.append(run_mode(mode, cfg, args, work))
            print(json.dumps(results[-1]), file=sys.stderr)
    print(json.dumps({"command": " ".join(sys.argv), "cpus": os.cpu_count(), "results": results}, indent=1))
    cols = ["mode", "cpu_percent", "rss_mib", "peak_rss_mib", "verdicts_per_s", "scrape_ms_median", "scrape_ms_p95",
            "scrape_lines", "scrape_bytes", "skipped_ticks", "sink_dropped", "suspect_probes", "kernel_events_lost"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
