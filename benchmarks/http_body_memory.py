"""Peak memory of one HTTP probe against a gzip bomb, per client: the body caps at work.

    .venv/bin/python benchmarks/http_body_memory.py [--mib 256]

A server process (the test app of tests/prober/servers.py, on 127.0.0.1) sends --mib MiB of zeros as
gzip (~1 KiB on the wire per MiB). For each client, with and without a body regexp, a fresh probing
process runs one warm-up probe of /ok, then the bomb, and reports its peak RSS growth (getrusage
ru_maxrss after minus before) with the probe's error kind and failed validators.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ("aiohttp", "aiohttp-session", "httpx")


async def _serve() -> None:
    from aiohttp import web

    from tests.prober.servers import HttpServer, make_app

    runner = web.AppRunner(make_app(HttpServer("127.0.0.1", 0)), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


async def _probe(port: int, client: str, mib: int, regexp: bool) -> None:
    from prober import HTTPSpec, ProbeEnv, run_probe
    from tests.prober.helpers import spec

    extra = {"fail_if_body_matches_regexp": ("hello",)} if regexp else {}
    async with ProbeEnv() as env:
        await run_probe(spec(f"http://127.0.0.1:{port}/ok", section=HTTPSpec(client=client)), env)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        url = f"http://127.0.0.1:{port}/gzip/{mib * 2**20}"
        (r,) = await run_probe(spec(url, timeout=60, section=HTTPSpec(client=client, **extra)), env)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"error": r.error, "failed": r.failed_validators, "rss_kib": after - before}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.serve:
        asyncio.run(_serve())
        return
    if args.probe:
        port, client, regexp = args.probe
        asyncio.run(_probe(int(port), client, args.mib, regexp == "1"))
        return
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        from tests.prober.servers import compress

        print(f"{args.mib} MiB of zeros as {len(compress('gzip', args.mib * 2**20)) / 1024:.0f} KiB of gzip")
        print(f"{'client':<16} {'body regexp':<12} {'result':<40} peak RSS growth")
        for client in CLIENTS:
            for regexp in (False, True):
                out = subprocess.run(
                    [sys.executable, __file__, "--mib", str(args.mib), "--probe", port, client, str(int(regexp))],
                    capture_output=True, text=True, check=True,
                ).stdout
                row = json.loads(out.strip().splitlines()[-1])
                result = f"{row['error'] or 'ok'} {','.join(row['failed'])}"
                print(f"{client:<16} {'yes' if regexp else 'no':<12} {result:<40} {row['rss_kib'] / 1024:.1f} MiB")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
