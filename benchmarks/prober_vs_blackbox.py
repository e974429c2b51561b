"""connprobe's prober vs blackbox_exporter: probes per CPU-second of the probing process, side by side.

    sudo .venv/bin/python benchmarks/prober_vs_blackbox.py [--duration 10] [--rate 1000] [--concurrency 64]

Brings up the lab, and inside its client namespace runs, one after the other:
  - blackbox_exporter (Debian `prometheus-blackbox-exporter`) driven through its /probe endpoint by a
    separate load-driver process (its CPU is not counted): at a fixed rate, then closed-loop saturation;
  - connprobe's prober in its own process, which drives itself: the Scheduler at the fixed rate (probes
    spread over a 1 s interval), then `run_probe` in a closed loop of --concurrency; with the plain asyncio
    loop and with uvloop when installed.
Every probe is a fresh-connection HTTP GET by IP of a minimal responder in srv2 (`--server lab`: srv1's
aiohttp server), with phase timing and the local-port callback on. CPU = utime+stime of the probing
process only (/proc/PID/stat, or getrusage for the worker itself), over the measured window after a
warm-up. Fixed-rate rows also give the measured connect phase (p50/p99), which shows whether the
Scheduler's start slot (`--slot`, repeatable to compare) skews timings.
Then phase accuracy: --accuracy-n sequential probes of the responder's /slow?delay=0.2, which measures its
own delay from the request's arrival to its answer: `processing` minus that (X-Slept for connprobe; the
responder's log, matched probe by probe, for blackbox_exporter), and minus the nominal 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
BLACKBOX = "prometheus-blackbox-exporter"
BB_ADDR = "127.0.0.1:9115"


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ------------------------------------------------------------------------------------------ workers


def _spec(url: str, name: str, interval: float = 1.0, capture: tuple[str, ...] = ()):
    from prober import HTTPSpec, ModuleSpec, ProbeSpec

    return ProbeSpec(name=name, target=url, interval=interval, timeout=min(5.0, interval), jitter=0.0,
                     module=ModuleSpec(prober="http", http=HTTPSpec(capture_headers=capture)))


async def prober_fixed(url: str, rate: int, duration: float, warmup: float, slot: float | None) -> dict:
    """The Scheduler running `rate` probes with a 1 s interval: `rate` probes per second."""
    from prober import ProbeEnv, Scheduler

    ports: dict[int, int] = {}

    def on_port(proto, port):  # what the app does: hand the port to the sensor's watch list
        ports[port] = ports.get(port, 0) + 1

    env = ProbeEnv(on_local_port=on_port)
    kw = {} if slot is None else {"slot": slot}
    sched = Scheduler([_spec(url, f"p{i}") for i in range(rate)], env=env, concurrency=4096, **kw)
    counts = {"ok": 0, "fail": 0}
    window = {"on": False}
    errors: dict[str, int] = {}
    connect_us: list[float] = []

    async def consume():
        while True:
            r = await sched.results.get()
            if window["on"]:
                counts["ok" if r.ok else "fail"] += 1
                if r.ok:
                    connect_us.append(r.phase_durations_ns()["connect"] / 1e3)
                else:
                    errors[str(r.error)] = errors.get(str(r.error), 0) + 1

    consumer = asyncio.create_task(consume())
    await sched.start()
    await asyncio.sleep(warmup)
    window["on"] = True
    c0, t0 = self_cpu(), time.monotonic()
    await asyncio.sleep(duration)
    window["on"] = False
    c1, t1 = self_cpu(), time.monotonic()
    await sched.stop(grace=2.0)
    consumer.cancel()
    await asyncio.gather(consumer, return_exceptions=True)
    await env.aclose()
    n = counts["ok"] + counts["fail"]
    connect_us.sort()
    return {"probes": n, "ok": counts["ok"], "cpu_s": c1 - c0, "wall_s": t1 - t0, "errors": errors,
            "connect_p50_us": connect_us[len(connect_us) // 2] if connect_us else None,
            "connect_p99_us": connect_us[int(len(connect_us) * 0.99)] if connect_us else None,
            "suspect": sched.stats.suspect_results, "max_lag_ms": round(sched.stats.max_lag_s * 1e3, 1)}


async def prober_saturate(url: str, concurrency: int, duration: float, warmup: float) -> dict:
    from prober import ProbeEnv, run_probe

    ports: dict[int, int] = {}

    def on_port(proto, port):
        ports[port] = ports.get(port, 0) + 1

    env = ProbeEnv(on_local_port=on_port)
    spec = _spec(url, "sat")
    counts = {"ok": 0, "fail": 0}
    window = {"on": False}
    stop = asyncio.Event()

    async def worker():
        while not stop.is_set():
            for r in await run_probe(spec, env):
                if window["on"]:
                    counts["ok" if r.ok else "fail"] += 1

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    window["on"] = True
    c0, t0 = self_cpu(), time.monotonic()
    await asyncio.sleep(duration)
    window["on"] = False
    c1, t1 = self_cpu(), time.monotonic()
    stop.set()
    await asyncio.gather(*tasks)
    await env.aclose()
    n = counts["ok"] + counts["fail"]
    return {"probes": n, "ok": counts["ok"], "cpu_s": c1 - c0, "wall_s": t1 - t0}


async def prober_accuracy(url: str, n: int) -> dict:
    from prober import ProbeEnv, run_probe

    env = ProbeEnv()
    spec = _spec(url, "acc", interval=5.0, capture=("X-Slept",))
    vs_server, vs_nominal = [], []
    for _ in range(n):
        (r,) = await run_probe(spec, env)
        if not r.ok:
            continue
        proc = r.phase_durations_ns()["processing"] / 1e6
        vs_server.append(proc - float(dict(r.captured_headers)["X-Slept"]) * 1e3)
        vs_nominal.append(proc - 200.0)
    await env.aclose()
    return {"n": len(vs_server), "median_vs_server_ms": statistics.median(vs_server),
            "median_vs_nominal_ms": statistics.median(vs_nominal)}


# ------------------------------------------------------------------------------------ blackbox driver


async def bb_drive(mode: str, target: str, rate: int, concurrency: int, duration: float, warmup: float,
                   pid: int) -> dict:
    """Load driver for blackbox_exporter's /probe (its own CPU is not what is measured)."""
    import aiohttp
    from yarl import URL

    url = f"http://{BB_ADDR}/probe"
    params = {"module": "http_2xx", "target": target}
    counts = {"ok": 0, "fail": 0}
    window = {"on": False}
    processing: list[float] = []
    phase = re.compile(r'^probe_http_duration_seconds\{phase="processing"\} (\S+)$', re.M)
    connector = aiohttp.TCPConnector(limit=max(concurrency, 2048))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one():
            try:
                async with session.get(url, params=params) as resp:
                    text = await resp.text()
                ok = "\nprobe_success 1" in text
            except aiohttp.ClientError:
                ok, text = False, ""
            if window["on"]:
                counts["ok" if ok else "fail"] += 1
            if mode == "accuracy" and ok:
                m = phase.search(text)
                if m:
                    processing.append(float(m.group(1)) * 1e3)

        if mode == "accuracy":
            log_url = str(URL(target).with_path("/log").with_query(None))
            async with session.get(log_url) as resp:  # empties the server's log
                await resp.read()
            for _ in range(rate):  # rate = number of sequential probes here
                window["on"] = True
                await one()
            async with session.get(log_url) as resp:
                slept = json.loads(await resp.text())
            out = {"n": len(processing), "median_vs_nominal_ms": statistics.median(processing) - 200.0}
            if len(slept) == len(processing):  # sequential probes: the i-th request is the i-th probe's
                pairs = zip(processing, slept, strict=True)
                out["median_vs_server_ms"] = statistics.median(p - s * 1e3 for p, s in pairs)
            return out

        stop = asyncio.Event()
        pending: set[asyncio.Task] = set()

        async def closed_loop():
            while not stop.is_set():
                await one()

        loop = asyncio.get_running_loop()
        if mode == "fixed":
            async def ticker():
                start = loop.time()
                i = 0
                while not stop.is_set():
                    i += 1
                    t = asyncio.create_task(one())
                    pending.add(t)
                    t.add_done_callback(pending.discard)
                    delay = start + i / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
            drivers = [asyncio.create_task(ticker())]
        else:
            drivers = [asyncio.create_task(closed_loop()) for _ in range(concurrency)]
        await asyncio.sleep(warmup)
        window["on"] = True
        c0, t0 = proc_cpu(pid), time.monotonic()
        await asyncio.sleep(duration)
        window["on"] = False
        c1, t1 = proc_cpu(pid), time.monotonic()
        stop.set()
        await asyncio.gather(*drivers, return_exceptions=True)
        if pending:
            await asyncio.wait(pending, timeout=10)
    n = counts["ok"] + counts["fail"]
    return {"probes": n, "ok": counts["ok"], "cpu_s": c1 - c0, "wall_s": t1 - t0}


# ------------------------------------------------------------------------------------------ responder

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
SLOW = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Slept: %.6f\r\nConnection: close\r\n\r\nok\n"


async def responder(host: str, port: int) -> None:
    """A minimal HTTP/1.1 responder (asyncio protocol, uvloop) so the server is not the bottleneck.

    GET /slow?delay=S answers after S seconds and measures its own delay: from the moment the request
    head has arrived to just before the answer is written (X-Slept, and kept for GET /log, which answers
    the list so far as JSON and empties it: how blackbox_exporter's probes are checked, as it shows no
    response headers).
    """
    from urllib.parse import parse_qs, urlsplit

    loop = asyncio.get_running_loop()
    slept: list[float] = []

    class Proto(asyncio.Protocol):
        def connection_made(self, transport):
            self.t = transport
            self.buf = b""

        def data_received(self, data):
            self.buf += data
            if b"\r\n\r\n" not in self.buf:
                return
            arrived = time.monotonic_ns()
            path = self.buf.split(b" ", 2)[1].decode()
            self.buf = b""
            if path.startswith("/slow"):
                delay = float(parse_qs(urlsplit(path).query).get("delay", ["0.2"])[0])
                loop.call_later(delay, self.answer_slow, arrived)
                return
            if path == "/log":
                body = json.dumps(slept).encode()
                slept.clear()
                self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (len(body), body))
            else:
                self.t.write(RESPONSE)
            self.t.close()

        def answer_slow(self, arrived):
            took = (time.monotonic_ns() - arrived) / 1e9
            slept.append(took)
            self.t.write(SLOW % took)
            self.t.close()

    server = await loop.create_server(Proto, host, port, backlog=4096, reuse_address=True)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------------------------------- orchestration


def run_in_ns(ns: str, *args: str, timeout: float = 300) -> dict:
    argv = ["ip", "netns", "exec", ns, sys.executable, str(Path(__file__).resolve()), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def per_cpu(r: dict) -> float:
    return r["ok"] / r["cpu_s"] if r["cpu_s"] else float("nan")


def main_orchestrate(args) -> int:
    if os.geteuid() != 0:
        print("needs root (it brings up the lab's network namespaces)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from connprobe.lab import Lab

    have_bb = shutil.which(BLACKBOX) is not None
    try:
        import uvloop  # noqa: F401

        loops = ["asyncio", "uvloop"]
    except ImportError:
        loops = ["asyncio"]
    rows: list[tuple[str, str, dict]] = []
    acc: dict[str, dict] = {}
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        ns = lab.ns("client").name
        bb = None
        # A C-speed responder in srv2: the throughput target (so 1,000/s is not limited by the server) and
        # always the accuracy target (it measures its own delay, from request to answer).
        srv2 = lab.server("srv2")
        fast = subprocess.Popen(["ip", "netns", "exec", lab.ns("srv2").name, sys.executable,
                                 str(Path(__file__).resolve()), "--responder", f"{srv2.addr4}:9000"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        if fast.stdout.readline().strip() != "ready":
            raise RuntimeError(f"responder did not start: {fast.stderr.read()}")
        url = f"http://{srv2.addr4}:9000/ok" if args.server == "fast" else lab.server("srv1").url("/ok")
        slow = f"http://{srv2.addr4}:9000/slow?delay=0.2"
        if have_bb and not args.skip_blackbox:
            cfg = Path(tmp) / "blackbox.yml"
            cfg.write_text("modules:\n  http_2xx:\n    prober: http\n    timeout: 5s\n"
                           "    http:\n      preferred_ip_protocol: ip4\n")
            bb = subprocess.Popen(["ip", "netns", "exec", ns, BLACKBOX, f"--config.file={cfg}",
                                   f"--web.listen-address={BB_ADDR}", "--log.level=error"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)
            if bb.poll() is not None:
                raise RuntimeError(f"blackbox_exporter did not start: {bb.stderr.read().decode()}")
        try:
            common = ["--duration", str(args.duration), "--warmup", str(args.warmup)]
            if bb is not None:
                for mode in ("fixed", "saturate"):
                    r = run_in_ns(ns, "--bb-driver", mode, "--url", url, "--rate", str(args.rate),
                                  "--concurrency", str(args.concurrency), "--pid", str(bb.pid), *common)
                    rows.append(("blackbox_exporter", mode, r))
                acc["blackbox_exporter"] = run_in_ns(ns, "--bb-driver", "accuracy", "--url", slow,
                                                     "--rate", str(args.accuracy_n), "--pid", str(bb.pid),
                                                     *common)
            for loop in loops:
                for slot in args.slot or [None]:
                    extra = [] if slot is None else ["--slot", str(slot)]
                    r = run_in_ns(ns, "--worker", "fixed", "--loop", loop, "--url", url, "--rate", str(args.rate),
                                  *extra, *common)
                    r["slot"] = slot
                    rows.append((f"connprobe ({loop})", "fixed", r))
                r = run_in_ns(ns, "--worker", "saturate", "--loop", loop, "--url", url, "--rate", str(args.rate),
                              "--concurrency", str(args.concurrency), *common)
                rows.append((f"connprobe ({loop})", "saturate", r))
                acc[f"connprobe ({loop})"] = run_in_ns(ns, "--worker", "accuracy", "--loop", loop, "--url", slow,
                                                       "--rate", str(args.accuracy_n), *common)
        finally:
            fast.terminate()
            fast.wait(timeout=5)
            fast.stdout.close()
            fast.stderr.close()
            if bb is not None:
                bb.terminate()
                try:
                    bb.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    bb.kill()
                    bb.wait()
                if bb.stderr:
                    bb.stderr.close()

    base = {mode: per_cpu(r) for name, mode, r in rows if name == "blackbox_exporter"}
    where = "a minimal responder in srv2" if args.server == "fast" else "the lab's srv1 /ok"
    print(f"\nfresh-connection HTTP probes of {where} from the client namespace; "
          f"{args.duration:g}s per run after {args.warmup:g}s warm-up; {os.cpu_count()} CPUs")
    print(f"{'prober':<22} {'mode':<28} {'probes/s':>9} {'ok':>7} {'CPU s':>7} {'probes/CPU-s':>13} {'vs bb':>6}"
          f" {'connect p50/p99 us':>19}")
    for name, mode, r in rows:
        label = f"fixed {args.rate}/s" if mode == "fixed" else f"saturate c={args.concurrency}"
        if r.get("slot") is not None:
            label += f" slot {r['slot'] * 1e3:g}ms"
        ratio = per_cpu(r) / base[mode] if base.get(mode) else float("nan")
        conn = f"{r['connect_p50_us']:.0f}/{r['connect_p99_us']:.0f}" if r.get("connect_p50_us") else ""
        print(f"{name:<22} {label:<28} {r['probes'] / r['wall_s']:>9.0f} {r['ok']:>7} {r['cpu_s']:>7.2f} "
              f"{per_cpu(r):>13.0f} {ratio:>6.2f} {conn:>19}")
    print("\nphase accuracy, /slow?delay=0.2 (median over the probes, ms):")
    for name, a in acc.items():
        extra = f", vs the server's own measure {a['median_vs_server_ms']:+.2f}" if "median_vs_server_ms" in a else ""
        print(f"  {name:<22} processing - 200 ms: {a['median_vs_nominal_ms']:+.2f}{extra}  (n={a['n']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "accuracy": acc}, indent=1))
    for name, mode, r in rows:
        if r.get("errors"):
            print(f"  {name} {mode}: failures {r['errors']}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rate", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--accuracy-n", type=int, default=30)
    p.add_argument("--skip-blackbox", action="store_true")
    p.add_argument("--slot", type=float, action="append",
                   help="the Scheduler's start slot in seconds for the fixed-rate runs (default: its own); "
                        "give it more than once to compare")
    p.add_argument("--json", help="also write the raw figures here")
    p.add_argument("--server", choices=["fast", "lab"], default="fast",
                   help="throughput target: a minimal uvloop responder in srv2 (default) or the lab's srv1")
    p.add_argument("--responder", help=argparse.SUPPRESS)
    # internal: the processes the orchestrator starts inside the client namespace
    p.add_argument("--worker", choices=["fixed", "saturate", "accuracy"], help=argparse.SUPPRESS)
    p.add_argument("--bb-driver", choices=["fixed", "saturate", "accuracy"], help=argparse.SUPPRESS)
    p.add_argument("--loop", default="asyncio", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--pid", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.responder:
        import uvloop

        host, port = args.responder.rsplit(":", 1)
        uvloop.run(responder(host, int(port)))
        return 0
    if args.worker:
        if args.loop == "uvloop":
            import uvloop

            uvloop.install()
        if args.worker == "fixed":
            coro = prober_fixed(args.url, args.rate, args.duration, args.warmup, args.slot[0] if args.slot else None)
        elif args.worker == "saturate":
            coro = prober_saturate(args.url, args.concurrency, args.duration, args.warmup)
        else:
            coro = prober_accuracy(args.url, args.rate)
        print(json.dumps(asyncio.run(coro)))
        return 0
    if args.bb_driver:
        print(json.dumps(asyncio.run(bb_drive(args.bb_driver, args.url, args.rate, args.concurrency,
                                              args.duration, args.warmup, args.pid))))
        return 0
    return main_orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
