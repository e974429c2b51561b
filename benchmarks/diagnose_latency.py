"""Wall time of `connprobe diagnose` on a healthy loopback target, side by side in one run (run as root):

    .venv/bin/python benchmarks/diagnose_latency.py [--rounds 5] [--before main]

Modes, interleaved round by round (each a fresh `connprobe diagnose --json` process):
- before: the `--before` git ref's code (extracted with `git archive`), standalone, as it was;
- cold: standalone (`--no-agent`) with an empty kernel cache (`CONNPROBE_CACHE_DIR` a new directory);
- cached: standalone with the cache of the previous runs (the running kernel's BTF offsets);
- agent: through a running agent's diagnose channel (its sensor attached already).

Per mode, the median (and range) of the process's wall time and of the time from spawning the process to the
start of its first probe (the probe's `start_ns` in the JSON document and the spawn time are both
CLOCK_MONOTONIC). The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def serve_ok() -> tuple[http.server.ThreadingHTTPServer, int]:
    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"ok"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


# the `before` code: its directory first on the path, and the editable install's finder (which would give
# this checkout's modules) out of the way
BOOT = ("import sys; src = sys.argv.pop(1); sys.path[:] = [src] + [p for p in sys.path if p not in ('', '.')]; "
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
        "from connprobe.cli import main; sys.argv[0] = 'connprobe'; sys.exit(main(sys.argv[1:]))")


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, seconds from spawn to the first probe's start)."""
    t0 = time.monotonic_ns()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    wall = (time.monotonic_ns() - t0) / 1e9
    if proc.returncode != 0:
        raise SystemExit(f"{argv}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    doc = json.loads(proc.stdout)
    first = doc["attempts"][0]["result"]["start_ns"]
    return wall, (first - t0) / 1e9


def start_agent(tmp: Path, url: str, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    cfg = tmp / "agent.yaml"
    cfg.write_text(json.dumps({"modules": {"http": {"prober": "http", "timeout": "2s"}},
                               "probes": [{"name": "bench", "module": "http", "target": url, "interval": "10s"}]}))
    sock = tmp / "diagnose.sock"
    log = open(tmp / "agent.log", "w")  # noqa: SIM115 - the agent's, closed with it
    agent = subprocess.Popen([PY, "-m", "connprobe.cli", "agent", "--config", str(cfg), "--listen", "127.0.0.1:0",
                              "--diagnose.socket", str(sock), "--no-config-watch"], stdout=log, stderr=log,
                             env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    while "running 1 probes" not in (tmp / "agent.log").read_text():
        if agent.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the agent did not start: {(tmp / 'agent.log').read_text()[-800:]}")
        time.sleep(0.1)
    return agent, sock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--before", default="main", help="git ref of the 'before' code ('' to leave it out)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="connprobe-diag-bench-"))
    server, port = serve_ok()
    url = f"http://127.0.0.1:{port}/"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("CONNPROBE_")}
    warm = tmp / "cache-warm"
    modes: dict[str, tuple[list[str], dict[str, str] | None]] = {}
    cli = [PY, "-m", "connprobe.cli", "diagnose", url, "--json"]
    if args.before:
        src = tmp / "before"
        src.mkdir()
        archive = subprocess.run(["git", "archive", args.before], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        modes["before"] = ([PY, "-c", BOOT, str(src), *cli[3:]], base_env)
    modes["cold"] = ([*cli, "--no-agent"], None)  # env made per run: a new empty cache directory
    modes["cached"] = ([*cli, "--no-agent"], {**base_env, "CONNPROBE_CACHE_DIR": str(warm)})
    agent, sock = start_agent(tmp, url, {**base_env, "CONNPROBE_CACHE_DIR": str(warm)})
    modes["agent"] = (cli, {**base_env, "CONNPROBE_DIAGNOSE_SOCKET": str(sock)})
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    load_before = os.getloadavg()
    try:
        run_once([*cli, "--no-agent"], {**base_env, "CONNPROBE_CACHE_DIR": str(warm)})  # fills the warm cache
        for r in range(args.rounds):
            for mode, (argv, env) in modes.items():
                if env is None:
                    env = {**base_env, "CONNPROBE_CACHE_DIR": str(tmp / f"cache-cold-{r}")}
                results[mode].append(run_once(argv, env))
    finally:
        agent.terminate()
        agent.wait(30)
        server.shutdown()
        load_after = os.getloadavg()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; {os.cpu_count()} CPUs; "
          f"{args.rounds} interleaved rounds")
    ref = "before" if "before" in results else "cold"
    ref_wall = statistics.median(w for w, _ in results[ref])
    ref_first = statistics.median(f for _, f in results[ref])
    print(f"| mode | wall median (min-max) | to first probe median (min-max) | wall vs {ref} | first probe vs {ref} |")
    print("|---|---|---|---|---|")
    for mode, rows in results.items():
        walls = [w for w, _ in rows]
        firsts = [f for _, f in rows]
        wm, fm = statistics.median(walls), statistics.median(firsts)
        print(f"| {mode} | {wm:.3f} s ({min(walls):.3f}-{max(walls):.3f}) | {fm:.3f} s ({min(firsts):.3f}-"
              f"{max(firsts):.3f}) | {wm / ref_wall:.2f}x | {fm / ref_first:.2f}x |")


if __name__ == "__main__":
    main()
