"""The lab's HTTP server (aiohttp), run as its own process inside a server namespace.

Endpoints:
  GET  /ok                 200 "ok"
  GET  /slow?delay=S       sleeps S seconds, then 200; the body says how long it really slept
  GET  /status/CODE        answers with that status code
  GET  /bytes/N            N bytes of body
  POST /upload             reads the whole body, answers with its length
  GET  /redirect?to=URL    302 to URL
  GET  /headers            echoes the request headers as JSON

Faults, switched through the control socket (connprobe.lab.control): `delay` (seconds added before every
answer), `status` (answer every request with this code), `listen` false/true (close or reopen the
listening sockets: no listener), `ping`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import time
from pathlib import Path

from aiohttp import web

from connprobe.lab import control
from prober.tlsinfo import no_passphrase

MAX_BYTES = 256 * 1024 * 1024


class LabHttpServer:
    def __init__(self, name: str, port: int, tls_port: int | None, cert: Path | None, key: Path | None):
        self.name = name
        self.port = port
        self.tls_port = tls_port
        self.cert, self.key = cert, key
        self.delay = 0.0
        self.status: int | None = None
        self.requests = 0
        self.runner: web.AppRunner | None = None
        self.sites: list[web.BaseSite] = []
        self._payload = b"x" * (1024 * 1024)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._faults], client_max_size=MAX_BYTES)
        app.router.add_get("/ok", self.ok)
        app.router.add_get("/", self.ok)
        app.router.add_get("/slow", self.slow)
        app.router.add_get(r"/status/{code:\d{3}}", self.status_code)
        app.router.add_get(r"/bytes/{n:\d+}", self.bytes_)
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/redirect", self.redirect)
        app.router.add_get("/headers", self.headers)
        return app

    @web.middleware
    async def _faults(self, request: web.Request, handler):
        self.requests += 1
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        if self.status is not None:
            return web.Response(status=self.status, text=f"{self.name}: injected {self.status}\n")
        return await handler(request)

    async def ok(self, request: web.Request) -> web.Response:
        return web.Response(text=f"{self.name} ok\n")

    async def slow(self, request: web.Request) -> web.Response:
        delay = float(request.query.get("delay", "1"))
        t0 = time.monotonic_ns()
        await asyncio.sleep(delay)
        slept = (time.monotonic_ns() - t0) / 1e9
        return web.Response(text=f"{self.name} slept {slept:.6f}\n", headers={"X-Slept": f"{slept:.6f}"})

    async def status_code(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        return web.Response(status=code, text=f"{self.name} status {code}\n")

    async def bytes_(self, request: web.Request) -> web.StreamResponse:
        n = min(int(request.match_info["n"]), MAX_BYTES)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = n
        await resp.prepare(request)
        while n > 0:
            chunk = self._payload[: min(n, len(self._payload))]
            await resp.write(chunk)
            n -= len(chunk)
        await resp.write_eof()
        return resp

    async def upload(self, request: web.Request) -> web.Response:
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
        return web.Response(text=f"{total}\n")

    async def redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query.get("to", "/ok"))

    async def headers(self, request: web.Request) -> web.Response:
        return web.json_response(dict(request.headers))

    async def open(self) -> None:
        assert self.runner is not None
        # host=None binds every address family (0.0.0.0 and ::) of this namespace.
        self.sites = [web.TCPSite(self.runner, host=None, port=self.port, reuse_address=True)]
        if self.tls_port and self.cert and self.key:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(self.cert, self.key, password=no_passphrase)
            self.sites.append(
                web.TCPSite(self.runner, host=None, port=self.tls_port, ssl_context=ctx, reuse_address=True)
            )
        for site in self.sites:
            await site.start()

    async def close_listeners(self) -> None:
        for site in self.sites:
            await site.stop()
        self.sites = []

    async def on_control(self, req: dict) -> dict:
        op = req.get("op")
        if op == "ping":
            pass
        elif op == "set":
            if "delay" in req:
                self.delay = float(req["delay"])
            if "status" in req:
                self.status = None if req["status"] is None else int(req["status"])
            if "listen" in req:
                if req["listen"] and not self.sites:
                    await self.open()
                elif not req["listen"] and self.sites:
                    await self.close_listeners()
        else:
            raise ValueError(f"unknown op {op!r}")
        return {
            "name": self.name,
            "pid": os.getpid(),
            "delay": self.delay,
            "status": self.status,
            "listening": bool(self.sites),
            "requests": self.requests,
        }


async def amain(args: argparse.Namespace) -> None:
    srv = LabHttpServer(args.name, args.port, args.tls_port, args.cert, args.key)
    srv.runner = web.AppRunner(srv.app(), access_log=None, handle_signals=False)
    await srv.runner.setup()
    await srv.open()
    ctl = await control.serve(args.control, srv.on_control)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"ready": srv.name, "pid": os.getpid()}), flush=True)
    await stop.wait()
    ctl.close()
    await srv.runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description="connprobe lab HTTP server")
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--tls-port", type=int)
    p.add_argument("--cert", type=Path)
    p.add_argument("--key", type=Path)
    p.add_argument("--control", type=Path, required=True)
    asyncio.run(amain(p.parse_args()))


if __name__ == "__main__":
    main()
