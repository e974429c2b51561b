from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from aiohttp import web

from prober import ProbeEnv
from prober.resolve import ResolvConf
from tests.prober.servers import DnsServer, HttpServer, make_app


async def _serve(host: str):
    state = HttpServer(host, 0)
    runner = web.AppRunner(make_app(state), access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    state.port = site._server.sockets[0].getsockname()[1]
    return state, runner


@pytest.fixture
async def http_server():
    state, runner = await _serve("127.0.0.1")
    yield state
    await runner.cleanup()


@pytest.fixture
async def http_server6():
    state, runner = await _serve("::1")
    yield state
    await runner.cleanup()


@pytest.fixture(scope="session")
def cert_files(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 'localhost' / 127.0.0.1, valid 30 days (made with openssl)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed for the TLS tests")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "30", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture
async def https_server(cert_files):
    cert, key = cert_files
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    state = HttpServer("127.0.0.1", 0)
    runner = web.AppRunner(make_app(state), access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    state.port = site._server.sockets[0].getsockname()[1]
    yield state
    await runner.cleanup()


@pytest.fixture
async def dns_server(http_server):
    srv = DnsServer()
    srv.add("srv1.lab.test", "A", "127.0.0.1")
    srv.add("srv1.lab.test", "AAAA", "::1")
    srv.add("v4only.lab.test", "A", "127.0.0.1")
    srv.add("both.lab.test", "A", "127.0.0.1", "127.0.0.2")
    srv.add("big.lab.test", "A", *[f"127.0.1.{i}" for i in range(1, 60)])
    srv.add("txt.lab.test", "TXT", '"hello world"')
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
def resolv(dns_server) -> ResolvConf:
    return ResolvConf(nameservers=("127.0.0.1",), search=("lab.test",), ndots=1, timeout=1.0, attempts=1,
                      port=dns_server.port)


@pytest.fixture
async def env(resolv):
    ports: list = []
    async with ProbeEnv(on_local_port=lambda proto, port: ports.append((proto, port)), resolv_conf=resolv) as e:
        e.ports = ports
        yield e


@pytest.fixture
async def proxy():
    """A forward proxy on 127.0.0.1: absolute-form requests are relayed, CONNECT is tunnelled; it records the
    request line and the head of each. Whatever host a request names, it connects upstream to 127.0.0.1 only
    (the port the request names): a test's traffic stays on loopback."""
    lines: list[str] = []
    heads: list[str] = []

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        first = head.split(b"\r\n", 1)[0].decode()
        lines.append(first)
        heads.append(head.decode("latin-1"))
        method, target, _ = first.split(" ", 2)
        if method == "CONNECT":
            up_r, up_w = await asyncio.open_connection("127.0.0.1", int(target.rsplit(":", 1)[1]))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
        else:
            from urllib.parse import urlsplit

            u = urlsplit(target)
            up_r, up_w = await asyncio.open_connection("127.0.0.1", u.port)
            path = (u.path or "/") + (f"?{u.query}" if u.query else "")
            up_w.write(f"{method} {path} HTTP/1.1\r\n".encode() + head.split(b"\r\n", 1)[1])
            await up_w.drain()
        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    server.port = server.sockets[0].getsockname()[1]
    server.lines = lines
    server.heads = heads
    yield server
    server.close()
    await server.wait_closed()
