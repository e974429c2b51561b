"""WebSocket and Unix-socket probes with blackbox's query_response, against real servers: an aiohttp WebSocket
echo server on 127.0.0.1 and a Unix stream server in tmp_path (STARTTLS with a CA made in the test)."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from aiohttp import WSMsgType, web

from prober import ErrorKind, ProbeEnv, QueryStep, TLSSpec, UnixSpec, WebSocketSpec, run_probe
from tests.agent.pki import CA
from tests.prober.helpers import spec


async def _one(s, env=None):
    if env is not None:
        (r,) = await run_probe(s, env)
        return r
    async with ProbeEnv() as env:
        (r,) = await run_probe(s, env)
    return r


@pytest.fixture
async def ws_server():
    seen_headers = []

    async def handler(request):
        seen_headers.append(request.headers.get("X-Token"))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("hello v1.2")
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                if msg.data == "close":
                    await ws.close()
                    break
                await ws.send_str(f"echo: {msg.data}")
        return ws

    async def plain(request):
        return web.Response(text="not a websocket", status=404)

    app = web.Application()
    app.router.add_get("/ws", handler)
    app.router.add_get("/nows", plain)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield port, seen_headers
    await runner.cleanup()


def _ws(url, steps=(), timeout=3.0, **kw):
    return spec(url, prober="websocket", timeout=timeout,
                section=WebSocketSpec(query_response=tuple(QueryStep(**s) for s in steps), **kw))


async def test_websocket_query_response(ws_server):
    port, seen = ws_server
    ports = []
    async with ProbeEnv(on_local_port=lambda proto, p: ports.append(p)) as env:
        steps = [{"expect": r"hello v(\d+)\.(\d+)"}, {"send": "version ${1}"}, {"expect": "^echo: version 1$"}]
        r = await _one(_ws(f"ws://127.0.0.1:{port}/ws", steps, headers={"X-Token": "s3cret"}), env)
        assert r.ok, r.error_detail
        assert seen == ["s3cret"] and r.http_status == 101
        assert ports and r.flows[-1].local_port == ports[-1]  # the prober's own socket, announced
        assert {p.name for p in r.phases} >= {"connect", "processing", "transfer"}
        r = await _one(_ws(f"ws://127.0.0.1:{port}/ws", [{"expect": "^goodbye"}], timeout=1.0), env)
        assert r.error is ErrorKind.READ_TIMEOUT, (r.error, r.error_detail)
        r = await _one(_ws(f"ws://127.0.0.1:{port}/ws", [{"send": "close"}, {"expect": "^never"}]), env)
        assert r.error is ErrorKind.VALIDATION and r.failed_validators == ("query_response[1].expect",)
        r = await _one(_ws(f"ws://127.0.0.1:{port}/nows"), env)
        assert r.error is ErrorKind.HTTP_STATUS and r.http_status == 404
        assert "s3cret" not in r.error_detail


def test_websocket_config_errors():
    with pytest.raises(ValueError, match="starttls is not possible in a WebSocket conversation"):
        _ws("ws://127.0.0.1:1/", [{"starttls": True}])
    with pytest.raises(ValueError, match="websocket target must be a ws:// or wss:// URL"):
        _ws("http://127.0.0.1:1/")
    with pytest.raises(ValueError, match="a query_response step needs send, expect or starttls"):
        _ws("ws://127.0.0.1:1/", [{}])
    with pytest.raises(ValueError, match=r"min_cert_days: not supported for websocket probes \(http, tcp and grpc "
                                         r"have it\)"):
        _ws("wss://127.0.0.1:1/", tls_config=TLSSpec(min_cert_days=10))
    with pytest.raises(ValueError, match=r"min_cert_days: not supported for unix probes \(http, tcp and grpc have "
                                         r"it\)"):
        UnixSpec(tls_config=TLSSpec(min_cert_days=10))


@pytest.fixture
def pki(tmp_path):
    ca = CA(tmp_path, "unix-ca")
    return ca, ca.issue("localhost", server=True)


@pytest.fixture
async def unix_server(tmp_path, pki):
    """A line protocol: greets, answers PING with PONG, and STARTTLS with a TLS handshake."""
    ca, pair = pki
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pair.cert, pair.key)
    path = tmp_path / "svc.sock"

    async def handle(reader, writer):
        writer.write(b"220 svc ready\r\n")
        try:
            while line := await reader.readline():
                cmd = line.strip()
                if cmd == b"PING":
                    writer.write(b"PONG\r\n")
                elif cmd == b"STARTTLS":
                    writer.write(b"220 go ahead\r\n")
                    await writer.drain()
                    await writer.start_tls(ctx)
                    writer.write(b"220 secure\r\n")
                elif cmd == b"QUIT":
                    break
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path=str(path))
    yield path, ca
    server.close()
    await server.wait_closed()


def _unix(path, steps=(), timeout=3.0, **kw):
    return spec(str(path), prober="unix", timeout=timeout,
                section=UnixSpec(query_response=tuple(QueryStep(**s) for s in steps), **kw))


async def test_unix_query_response_and_starttls(unix_server, tmp_path):
    path, ca = unix_server
    r = await _one(_unix(path))
    assert r.ok and r.phases[0].name == "connect"
    r = await _one(_unix(path, [{"expect": "^220"}, {"send": "PING"}, {"expect": "^PONG$"}]))
    assert r.ok, r.error_detail
    tls = TLSSpec(ca_file=str(ca.path), server_name="localhost")
    steps = [{"expect": "^220"}, {"send": "STARTTLS"}, {"expect": "^220 go"}, {"starttls": True},
             {"expect": "^220 secure"}, {"send": "PING"}, {"expect": "PONG"}]
    r = await _one(_unix(path, steps, tls_config=tls))
    assert r.ok, r.error_detail
    stranger = CA(tmp_path, "stranger")
    r = await _one(_unix(path, steps, tls_config=TLSSpec(ca_file=str(stranger.path), server_name="localhost")))
    assert r.error is ErrorKind.TLS_ERROR, (r.error, r.error_detail)
    r = await _one(_unix(path, [{"expect": "^220"}, {"send": "QUIT"}, {"expect": "^bye"}]))
    assert r.error is ErrorKind.VALIDATION and r.failed_validators == ("query_response[2].expect",)
    r = await _one(_unix(path, [{"expect": "^nothing like it"}], timeout=1.0))
    assert r.error is ErrorKind.READ_TIMEOUT, (r.error, r.error_detail)


async def test_unix_missing_socket(tmp_path):
    r = await _one(_unix(tmp_path / "nobody.sock"))
    assert not r.ok and r.error is ErrorKind.CONNECT_UNREACHABLE and "No such file" in r.error_detail


def test_unix_target_must_be_a_path():
    with pytest.raises(ValueError, match="unix target must be an absolute socket path"):
        spec("relative.sock", prober="unix")


async def test_websocket_over_tls(tmp_path, pki):
    ca, pair = pki
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pair.cert, pair.key)

    async def handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("secure hello")
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        tls = TLSSpec(ca_file=str(ca.path), server_name="localhost")
        r = await _one(_ws(f"wss://127.0.0.1:{port}/ws", [{"expect": "^secure"}], tls_config=tls))
        assert r.ok, r.error_detail
        assert "tls" in r.phase_durations_ns()
        stranger = CA(tmp_path, "stranger")
        r = await _one(_ws(f"wss://127.0.0.1:{port}/ws", [{"expect": "^secure"}],
                           tls_config=TLSSpec(ca_file=str(stranger.path), server_name="localhost")))
        assert r.error is ErrorKind.TLS_ERROR, (r.error, r.error_detail)
    finally:
        await runner.cleanup()
