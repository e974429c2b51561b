"""Real in-process servers for the fast probe tests: an aiohttp app and a dnspython-based DNS server.

Both listen on 127.0.0.1 (and ::1 where it helps) on port 0 and record what they saw, so tests can
check the prober against the server's own view (peer ports, measured delays, queries received).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
import struct
import time
import zlib
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from aiohttp import web


@dataclass
class HttpServer:
    host: str
    port: int
    peer_ports: list[int] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)  # the server's own measurement of /slow
    requests: list[web.Request] = field(default_factory=list)
    seen_headers: list[dict[str, str]] = field(default_factory=list)

    def url(self, path: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"


def make_app(state: HttpServer) -> web.Application:
    @web.middleware
    async def record(request: web.Request, handler):
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            state.peer_ports.append(peer[1])
        state.seen_headers.append(dict(request.headers))
        return await handler(request)

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok hello", headers={"X-Server": "lab"})

    async def slow(request: web.Request) -> web.Response:
        delay = float(request.query.get("delay", "0.2"))
        t0 = time.monotonic()
        await asyncio.sleep(delay)
        state.delays.append(time.monotonic() - t0)
        return web.Response(text="slow")

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="status")

    async def nbytes(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * int(request.match_info["n"]))

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        return web.Response(text="never")

    async def stream(request: web.Request) -> web.StreamResponse:
        """`n` bytes of "x" written 64 KiB at a time (the server itself holds little of the body)."""
        n = int(request.match_info["n"])
        resp = web.StreamResponse(headers={"Content-Length": str(n)})
        await resp.prepare(request)
        piece = b"x" * 2**16
        while n > 0:
            await resp.write(piece[: min(n, len(piece))])
            n -= len(piece)
        await resp.write_eof()
        return resp

    async def trickle(request: web.Request) -> web.StreamResponse:
        """1 KiB of "x" every `every` seconds (default 0.01), never ending: a transfer that keeps delivering."""
        every = float(request.query.get("every", "0.01"))
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        while True:
            await resp.write(b"x" * 1024)
            await asyncio.sleep(every)

    async def compressed(request: web.Request) -> web.Response:
        """`n` bytes ("hello " then zeros) sent compressed: /gzip/N, /deflate/N (zlib), /rawdeflate/N."""
        coding = request.match_info["coding"]
        data = compress(coding, int(request.match_info["n"]))
        header = "deflate" if coding == "rawdeflate" else coding
        return web.Response(body=data, headers={"Content-Encoding": header, "Content-Type": "text/plain"})

    async def upload(request: web.Request) -> web.Response:
        data = await request.read()
        return web.Response(text=str(len(data)))

    app = web.Application(middlewares=[record])
    app.router.add_get("/ok", ok)
    app.router.add_get("/slow", slow)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/bytes/{n}", nbytes)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/hang", hang)
    app.router.add_get("/stream/{n}", stream)
    app.router.add_get("/trickle", trickle)
    app.router.add_get("/{coding:gzip|deflate|rawdeflate}/{n}", compressed)
    app.router.add_post("/upload", upload)
    return app


@functools.lru_cache(maxsize=16)
def compress(coding: str, n: int) -> bytes:
    """'hello ' and zeros up to `n` bytes, compressed (a gzip bomb for a large n: ~1,000 to 1)."""
    wbits = {"gzip": 31, "deflate": 15, "rawdeflate": -15}[coding]
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    parts = [c.compress(b"hello ")]
    zeros = bytes(2**20)
    left = n - 6
    while left > 0:
        parts.append(c.compress(zeros[: min(left, len(zeros))]))
        left -= len(zeros)
    parts.append(c.flush())
    return b"".join(parts)


async def serve_http(host: str, ssl_context: ssl.SSLContext | None = None) -> tuple[HttpServer, web.AppRunner]:
    """The test app on host:0 (plain or TLS); the caller cleans the runner up."""
    state = HttpServer(host, 0)
    runner = web.AppRunner(make_app(state), access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, host, 0, ssl_context=ssl_context)
    await site.start()
    state.port = site._server.sockets[0].getsockname()[1]
    return state, runner


async def serve_plain_and_tls(app: web.Application, ssl_context: ssl.SSLContext) -> tuple[web.AppRunner, int, int]:
    """`app` on 127.0.0.1:0 twice, plain and TLS: (runner, plain port, TLS port); the caller cleans the runner up."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    plain = web.TCPSite(runner, "127.0.0.1", 0)
    await plain.start()
    tls = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await tls.start()
    return runner, plain._server.sockets[0].getsockname()[1], tls._server.sockets[0].getsockname()[1]


# ---------------------------------------------------------------- scripted HTTP


@dataclass
class ScriptedHttpServer:
    """A raw TCP server on loopback that answers every request with the bytes of `script`:
    a list of (delay seconds, bytes) written in turn, then the connection is closed (or held open
    for `hold` seconds first). For responses no real server would send."""

    host: str = "127.0.0.1"
    port: int = 0
    script: list[tuple[float, bytes]] = field(default_factory=list)
    hold: float = 0.0
    _server: asyncio.base_events.Server | None = None
    _tasks: set = field(default_factory=set)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        try:
            try:
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                pass
            for delay, data in self.script:
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
            if self.hold:
                await asyncio.sleep(self.hold)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()
            self._tasks.discard(asyncio.current_task())

    async def start(self) -> ScriptedHttpServer:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"


# ---------------------------------------------------------------- DNS


@dataclass
class DnsServer:
    """A small authoritative+recursive-looking server for the zone it holds.

    `records[(name, type)] = [rdata text, ...]`; `faults[name] = ("nxdomain"|"servfail"|"timeout"|
    "slow", delay)`. UDP answers larger than 512 bytes come back truncated (TC), as a real server does.
    """

    host: str = "127.0.0.1"
    port: int = 0
    records: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    faults: dict[str, tuple[str, float]] = field(default_factory=dict)
    queries: list[tuple[str, str, str, int]] = field(default_factory=list)  # (proto, name, type, src port)
    _udp: asyncio.DatagramTransport | None = None
    _tcp: asyncio.base_events.Server | None = None

    def add(self, name: str, rtype: str, *values: str) -> None:
        self.records.setdefault((_abs(name), rtype), []).extend(values)

    def fault(self, name: str, mode: str, delay: float = 0.0) -> None:
        self.faults[_abs(name)] = (mode, delay)

    mutate: object = None  # a function (answer bytes, proto) -> bytes | None applied to every answer
    tls: object = None  # an ssl.SSLContext: the TCP port speaks DNS over TLS (RFC 7858) instead of plain TCP

    async def answer(self, wire: bytes, proto: str, port: int) -> bytes | None:
        out = await self._answer(wire, proto, port)
        if out is not None and self.mutate is not None:
            return self.mutate(out, proto)
        return out

    async def _answer(self, wire: bytes, proto: str, port: int) -> bytes | None:
        try:
            q = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        question = q.question[0]
        name = question.name.to_text()
        rtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((proto, name, rtype, port))
        resp = dns.message.make_response(q)
        resp.flags |= dns.flags.AA | dns.flags.RA
        mode, delay = self.faults.get(name, ("", 0.0))
        if mode == "timeout":
            return None
        if mode == "slow":
            await asyncio.sleep(delay)
        if mode == "nxdomain":
            resp.set_rcode(dns.rcode.NXDOMAIN)
        elif mode == "servfail":
            resp.set_rcode(dns.rcode.SERVFAIL)
        elif mode == "refused":
            resp.set_rcode(dns.rcode.REFUSED)
        else:
            values = self.records.get((name, rtype))
            known = any(n == name for n, _ in self.records)
            if values:
                resp.answer.append(dns.rrset.from_text_list(name, 30, dns.rdataclass.IN, rtype, values))
            elif not known:
                resp.set_rcode(dns.rcode.NXDOMAIN)
        if proto == "udp":
            try:
                return resp.to_wire(max_size=512)
            except dns.exception.TooBig:
                resp.answer.clear()
                resp.flags |= dns.flags.TC
                return resp.to_wire()
        return resp.to_wire()

    async def start(self) -> DnsServer:
        loop = asyncio.get_running_loop()
        server = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport):
                self.transport = transport

            def datagram_received(self, data, addr):
                async def reply():
                    out = await server.answer(data, "udp", addr[1])
                    if out is not None:
                        self.transport.sendto(out, addr)

                server._pending.add(t := asyncio.ensure_future(reply()))
                t.add_done_callback(server._pending.discard)

        self._pending: set[asyncio.Future] = set()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        tcp_sock = socket.socket(family, socket.SOCK_STREAM)
        tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp_sock.bind((self.host, self.port))
        self.port = tcp_sock.getsockname()[1]
        self._udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=(self.host, self.port))

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            try:
                head = await reader.readexactly(2)
                data = await reader.readexactly(struct.unpack("!H", head)[0])
                proto = "tcp" if self.tls is None else "tls"
                out = await self.answer(data, proto, writer.get_extra_info("peername")[1])
                if out is not None:
                    writer.write(struct.pack("!H", len(out)) + out)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()

        self._tcp = await asyncio.start_server(handle, sock=tcp_sock, ssl=self.tls)
        return self

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
        for t in list(self._pending):
            t.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)


def _abs(name: str) -> str:
    return name if name.endswith(".") else name + "."
