"""Benchmark of the kernel sensor (run as root): cost to load, cost to the node, and how fast it ingests.

    .venv/bin/python benchmarks/sensor.py [--conns 3000] [--rounds 5] [--ingest-seconds 3]

1. compile + load + attach time and process RSS (before bcc, after `import bcc`, after load);
2. new-connection rate in the lab (client ns → srv1:8080, connect + close, many short TCP connections),
   detached vs attached in interleaved rounds in one run: attached counting only (no flow watched), and
   attached with every connection watched (each port registered before connect, events decoded);
3. watched-event ingest: generator processes open loopback connections at a paced rate in the lab's client
   namespace while the sensor reads on an asyncio loop; per rate: the events the kernel saw on watched flows
   (its own per-CPU counters), the records delivered to user space, the events only counted in the kernel
   (TCP state changes the correlator does not read, quiet drop reasons), and the events lost. The sensor is
   configured as the app configures it (only the state changes `correlator.join.TCP_STATES_READ` become
   records); `--all-states` sends every change as a record, as the sensor did before.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def connect_loop(addr: str, port: int, count: int, sensor=None) -> float:
    """`count` connect+close to addr:port from the calling thread; returns connections per second."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    t0 = time.perf_counter()
    for _ in range(count):
        s = socket.socket(family, socket.SOCK_STREAM)
        if sensor is not None:
            s.bind(("0.0.0.0", 0))
            lport = s.getsockname()[1]
            sensor.watch("tcp", lport)
        s.connect((addr, port))
        s.recv(1)  # the server closes first: TIME_WAIT stays on its side, the client's ports are reusable
        s.close()
        if sensor is not None:
            sensor.unwatch("tcp", lport)
    return count / (time.perf_counter() - t0)


ACCEPTOR = r"""
import socket, sys
lst = socket.socket(socket.AF_INET6); lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
lst.bind(("::", int(sys.argv[1]))); lst.listen(4096)
print("ready", flush=True)
while True:
    c, _ = lst.accept(); c.close()
"""

GENERATOR = r"""
import socket, sys, threading, time
rate, seconds = float(sys.argv[1]), float(sys.argv[2])
lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(4096)
print(lst.getsockname()[1], flush=True)
sys.stdin.readline()  # go
def acceptor():
    while True:
        try:
            c, _ = lst.accept()
        except OSError:
            return
        c.close()
threading.Thread(target=acceptor, daemon=True).start()
n, t0 = 0, time.monotonic()
while (now := time.monotonic()) - t0 < seconds:
    due = t0 + n / rate
    if due > now:
        time.sleep(due - now)
    c = socket.create_connection(lst.getsockname()); c.close(); n += 1
print(n, flush=True)
"""


async def ingest_level(sensor, ns_name: str, rate: float, seconds: float, procs: int,
                       same_session: bool = False) -> dict:
    gens = []
    try:
        for _ in range(procs):
            p = subprocess.Popen(["ip", "netns", "exec", ns_name, sys.executable, "-c", GENERATOR,
                                  str(rate / procs), str(seconds)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 # their own session, so their own autogroup, like any workload that is not
                                 # the agent's child (same_session: in this process's, as it used to be)
                                 start_new_session=not same_session)
            gens.append(p)
        ports = [int(p.stdout.readline()) for p in gens]
        for port in ports:
            sensor.watch("tcp", port)
        sensor.drain()
        lost0, got0 = sensor.lost_events, 0
        rescued0 = getattr(sensor, "rescued_events", 0)
        c0 = sensor.counters()
        t0, cpu0 = time.monotonic(), time.process_time()
        for p in gens:
            p.stdin.write("\n")
            p.stdin.flush()
        done = asyncio.gather(*(asyncio.to_thread(p.stdout.readline) for p in gens))

        async def take(timeout: float) -> int:
            """Events as a consumer like the agent's pump takes them: wait for one, then all that are queued."""
            if await sensor.next_event(timeout=timeout) is None:
                return 0
            return 1 + len(sensor.drain())

        while not done.done():
            got0 += await take(0.2)
        conns = sum(int(x) for x in done.result())
        while n := await take(0.3):
            got0 += n
        took = time.monotonic() - t0
        cpu = time.process_time() - cpu0  # this process: ring reads, decoding, the loop (generators are apart)
        for port in ports:
            sensor.unwatch("tcp", port)
        c1 = sensor.counters()
        lost = sensor.lost_events - lost0
        observed = sum(c1.watched.values()) - sum(c0.watched.values())
        # what the kernel counts and never sends: state changes not on the sensor's list, quiet drop reasons
        records = getattr(sensor, "state_records", None)
        quiet = set(sensor.quiet_reasons)

        def counted_only(c) -> int:
            return sum(n for (k, r), n in c.watched.items()
                       if (k == "state" and records is not None and r not in records) or (k == "drop" and r in quiet))

        counted = counted_only(c1) - counted_only(c0)
        return {"target_conn_s": rate, "conns": conns, "observed": observed, "delivered": got0, "counted": counted,
                "lost": lost, "unaccounted": observed - got0 - counted - lost,
                "rescued": getattr(sensor, "rescued_events", 0) - rescued0,
                "events_s": observed / took, "records_s": got0 / took, "seconds": took,
                "cpu_us_per_event": cpu / max(observed, 1) * 1e6, "cpu_us_per_record": cpu / max(got0, 1) * 1e6,
                "load": os.getloadavg()}
    finally:
        for p in gens:
            if p.poll() is None:
                p.kill()
            p.wait()
            for f in (p.stdin, p.stdout):
                if f and not f.closed:
                    f.close()


def ingest_sensor(ring_pages: int | None, all_states: bool):
    """The sensor as the app makes it (connprobe/sensorload.py: only the state changes the correlator reads are
    records), or with every change a record; on a tree whose sensor has no such setting: as it is."""
    from bpf.sensor import KernelSensor

    kw = {} if ring_pages is None else {"ring_pages": ring_pages}
    if not all_states:
        try:
            from correlator.join import TCP_STATES_READ
        except ImportError:
            pass
        else:
            kw["state_records"] = TCP_STATES_READ
    try:
        return KernelSensor(**kw)
    except TypeError:  # an older sensor: every state change is a record
        kw.pop("state_records", None)
        return KernelSensor(**kw)


async def ingest(lab, rates: list[float], seconds: float, procs: int, ring_pages: int | None = None,
                 all_states: bool = False, same_session: bool = False) -> list[dict]:
    out = []
    async with ingest_sensor(ring_pages, all_states) as sensor:
        for rate in rates:
            out.append(await ingest_level(sensor, lab.ns("client").name, rate, seconds, procs, same_session))
    return out


def capacity(conns: int, repeats: int) -> None:
    """CPU per event of reading and decoding the ring (no event loop, no generator running meanwhile): `conns`
    loopback connections on a watched port fill the ring (without reading it), then one `drain()` reads and
    decodes them all; its CPU time per event is the sensor's ingest cost, 1/that its capacity on one core."""
    from bpf.sensor import KernelSensor

    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4096)
    port = lst.getsockname()[1]
    costs = []
    with KernelSensor() as sensor:
        sensor.watch("tcp", port)
        for _ in range(repeats):
            sensor.drain()
            for _ in range(conns):
                with socket.create_connection(("127.0.0.1", port)) as c:
                    conn, _ = lst.accept()
                    conn.close()
                    c.recv(1)
            t = time.process_time()
            n = len(sensor.drain())
            costs.append(((time.process_time() - t) / max(n, 1) * 1e6, n))
        lost = sensor.lost_events
    lst.close()
    per = sorted(c for c, _ in costs)
    med = per[len(per) // 2]
    print(f"ring read + decode: median {med:.2f} µs of CPU per event = {1e6 / med:,.0f} events/s per core "
          f"({repeats} drains of {min(n for _, n in costs)}-{max(n for _, n in costs)} events; each: "
          f"{', '.join(f'{c:.2f}' for c, _ in costs)} µs; lost {lost})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=3000, help="connections per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ingest-seconds", type=float, default=3.0)
    ap.add_argument("--rates", default="1000,2000,4000,8000,16000",
                    help="connections/s per ingest level ('' skips the ingest part)")
    ap.add_argument("--procs", type=int, default=4, help="generator processes per ingest level")
    ap.add_argument("--ingest-only", action="store_true", help="skip the load and connection-rate parts")
    ap.add_argument("--capacity", type=int, default=0, metavar="CONNS",
                    help="only: CPU per event of one drain() after CONNS loopback connections (7 repeats)")
    ap.add_argument("--ring-pages", type=int, default=None, help="ring buffer size in pages (default: the sensor's)")
    ap.add_argument("--all-states", action="store_true",
                    help="ingest: every TCP state change of a watched flow a record (default: as the app's sensor)")
    ap.add_argument("--same-session", action="store_true",
                    help="ingest: generators in this process's session (its autogroup), as before they had their own")
    ap.add_argument("--json", metavar="FILE", help="ingest: also write the levels as JSON to FILE")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (the lab and BPF need it)", file=sys.stderr)
        return 2
    if args.capacity:
        capacity(args.capacity, 7)
        return 0

    print(f"kernel {os.uname().release}, python {sys.version.split()[0]}, cpus {os.cpu_count()}")
    rss0 = rss_mb()
    t0 = time.monotonic()
    import bcc  # noqa: F401

    t_import = time.monotonic() - t0
    rss_bcc = rss_mb()
    from bpf.sensor import KernelSensor

    t0 = time.monotonic()
    sensor = KernelSensor()
    sensor.open()
    t_load = time.monotonic() - t0
    rss_load = rss_mb()
    attached = sum(h.attached for h in sensor.status())
    sensor.close()
    print("\n## load")
    print(f"import bcc                       {t_import * 1000:7.0f} ms")
    print(f"BTF + checks + compile + attach  {t_load * 1000:7.0f} ms  ({attached} tracepoints)")
    print(f"RSS before bcc / after import / after load: {rss0:.0f} / {rss_bcc:.0f} / {rss_load:.0f} MB")

    from connprobe.lab import Lab

    with Lab() as lab:
        srv = lab.server("srv1")
        port = 9099
        # A bare accept+close server (the lab's aiohttp server accepts too slowly to measure the kernel).
        acceptor = subprocess.Popen(["ip", "netns", "exec", lab.ns("srv1").name, sys.executable, "-c", ACCEPTOR,
                                     str(port)], stdout=subprocess.PIPE, text=True)
        try:
            assert acceptor.stdout is not None and acceptor.stdout.readline().strip() == "ready"
            if not args.ingest_only:
                run_rates(lab, srv.addr4, port, args)
            if not args.rates:
                return 0
            print(f"\n## watched-event ingest ({args.procs} generator processes, {args.ingest_seconds:.0f} s "
                  "per level, loopback in the lab's client namespace)")
            levels = asyncio.run(ingest(lab, [float(r) for r in args.rates.split(",")], args.ingest_seconds,
                                        args.procs, args.ring_pages, args.all_states, args.same_session))
            print("observed: watched events the kernel saw (its counters); records: delivered to user space; "
                  "counted: only counted in the kernel; unaccounted = observed - records - counted - lost")
            print(f"{'target conn/s':>13} {'conns':>8} {'observed':>9} {'events/s':>9} {'records':>9} "
                  f"{'records/s':>9} {'counted':>8} {'lost':>7} {'unacc.':>6} {'rescued':>7} {'CPU µs/ev':>9} "
                  f"{'load':>15}")
            for lv in levels:
                print(f"{lv['target_conn_s']:13.0f} {lv['conns']:8d} {lv['observed']:9d} {lv['events_s']:9.0f} "
                      f"{lv['delivered']:9d} {lv['records_s']:9.0f} {lv['counted']:8d} {lv['lost']:7d} "
                      f"{lv['unaccounted']:6d} {lv['rescued']:7d} {lv['cpu_us_per_event']:9.2f} "
                      f"{' '.join(f'{x:.2f}' for x in lv['load']):>15}")
            if args.json:
                Path(args.json).write_text(json.dumps(levels, indent=1))
        finally:
            acceptor.kill()
            acceptor.wait()
            acceptor.stdout.close()
    return 0


def run_rates(lab, addr: str, port: int, args) -> None:
    from bpf.runstats import bpf_run_time_stats

    ex = lab.executor("client")
    lab.exec("client", "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65000")
    ex.call(connect_loop, addr, port, 300)  # warm-up
    modes: dict[str, list[float]] = {"detached": [], "attached, unwatched": [], "attached, all watched": []}
    delivered = lost = 0
    bpf_ns: list[float] = []

    async def attached_round() -> None:
        nonlocal delivered, lost
        async with ingest_sensor(None, args.all_states) as s:  # the ring is read on this loop while the thread connects
            # The rate with the kernel's run-time statistics off (collecting them costs two clock reads per
            # program run, which would be charged to the sensor); the BPF time in a run of its own.
            modes["attached, unwatched"].append(await asyncio.to_thread(ex.call, connect_loop, addr, port,
                                                                        args.conns))
            with bpf_run_time_stats():
                before = sum(ns for _n, ns in s.prog_stats().values())
                n = max(args.conns // 3, 100)
                await asyncio.to_thread(ex.call, connect_loop, addr, port, n)
                bpf_ns.append((sum(ns for _n, ns in s.prog_stats().values()) - before) / n)
            s.drain()
            modes["attached, all watched"].append(await asyncio.to_thread(ex.call, connect_loop, addr, port,
                                                                          args.conns, s))
            await asyncio.sleep(0.2)
            delivered += len(s.drain())
            lost += s.lost_events

    loads = [os.getloadavg()[0]]
    for i in range(args.rounds):
        # Interleaved, the order alternating (ABBA), so a drift in the machine's load hits both alike.
        if i % 2 == 0:
            modes["detached"].append(ex.call(connect_loop, addr, port, args.conns))
            asyncio.run(attached_round())
        else:
            asyncio.run(attached_round())
            modes["detached"].append(ex.call(connect_loop, addr, port, args.conns))
        loads.append(os.getloadavg()[0])
    base = statistics.median(modes["detached"])
    print(f"\n## new-connection rate (client ns -> srv1:{port} via the router, connect+close, {args.conns} "
          f"per round, {args.rounds} interleaved rounds (order alternating), median)")
    print(f"load average (1 min) at start and after each round: {', '.join(f'{x:.1f}' for x in loads)} "
          f"on {os.cpu_count()} cpus")
    for mode, rates in modes.items():
        med = statistics.median(rates)
        print(f"{mode:<24} {med:8.0f} conn/s  {med / base:5.3f}x  (rounds: {', '.join(f'{r:.0f}' for r in rates)})")
    conn_us = 1e6 / base
    print(f"BPF run time per connection, unwatched (kernel run-time stats): median "
          f"{statistics.median(bpf_ns) / 1000:.2f} us = {statistics.median(bpf_ns) / 10 / conn_us:.2f} % of a "
          f"detached connection's {conn_us:.0f} us")
    ratios = [a / d for a, d in zip(modes["attached, unwatched"], modes["detached"], strict=True)]
    print(f"attached/detached per round (paired): median {statistics.median(ratios):.3f}x "
          f"({', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"watched rounds: {delivered} events delivered, {lost} lost")


if __name__ == "__main__":
    sys.exit(main())
