"""A stand-in peer agent for the cross-node tests: an aiohttp app on loopback that answers /api/evidence with
the test's own handler."""

from __future__ import annotations

from aiohttp import web


async def serve_evidence(handler) -> tuple[web.AppRunner, str]:
    """Serve `handler` at /api/evidence on a free loopback port: the runner (clean it up) and the base URL."""
    app = web.Application()
    app.router.add_get("/api/evidence", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"
