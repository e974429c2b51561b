"""blackbox's `tls_config.min_version` / `max_version` on http (every client), tcp and an OAuth2 token endpoint,
against loopback TLS servers that speak only TLS 1.2 or only TLS 1.3; grpc refuses them at load."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from prober import ErrorKind, HTTPSpec, TCPSpec, TLSSpec, run_probe
from prober.spec import GRPCSpec
from tests.agent.pki import CA
from tests.prober.helpers import spec


@pytest.fixture
async def tls_servers(tmp_path):
    """{"TLS12": port, "TLS13": port}: HTTPS on 127.0.0.1 that accepts exactly that version (200 "ok")."""
    ca = CA(tmp_path, "versions-ca")
    pair = ca.issue("localhost", server=True)
    ports: dict[str, int] = {}
    servers = []

    async def handle(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    for name, version in (("TLS12", ssl.TLSVersion.TLSv1_2), ("TLS13", ssl.TLSVersion.TLSv1_3)):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(pair.cert, pair.key)
        ctx.minimum_version = ctx.maximum_version = version
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        servers.append(server)
        ports[name] = server.sockets[0].getsockname()[1]
    ports["ca"] = str(ca.path)
    yield ports
    for server in servers:
        server.close()
        await server.wait_closed()


def _tls(s: dict, **kw) -> TLSSpec:
    return TLSSpec(ca_file=s["ca"], **kw)


CLIENTS = ("aiohttp", "aiohttp-session", "httpx")


def refused_in_tls(r) -> None:
    """No common version: the handshake fails (an alert, or the server's close read as a reset) in the tls
    phase, and no TLS version is reported."""
    assert r.error in (ErrorKind.TLS_ERROR, ErrorKind.CONNECT_RESET), (r.error, r.error_detail)
    assert r.phases[-1].name == "tls" and r.value("tls_version") is None, r.phases


@pytest.mark.parametrize("client", CLIENTS)
async def test_http_tls_versions(tls_servers, env, client):
    s = tls_servers

    async def probe(server: str, **kw):
        (r,) = await run_probe(spec(f"https://127.0.0.1:{s[server]}/", prober="http",
                                    section=HTTPSpec(client=client, tls=_tls(s, **kw))), env)
        return r

    r = await probe("TLS12", min_version="TLS12", max_version="TLS12")
    assert r.ok and r.value("tls_version") == 1.2, (r.error, r.error_detail)
    r = await probe("TLS13", min_version="TLS13")
    assert r.ok and r.value("tls_version") == 1.3, (r.error, r.error_detail)
    refused_in_tls(await probe("TLS13", max_version="TLS12"))  # the server wants 1.3, the probe offers 1.2
    refused_in_tls(await probe("TLS12", min_version="TLS13"))  # the server offers 1.2 only
    r = await probe("TLS12", min_version="TLS10")  # allowed down to 1.0: the server's 1.2 is fine
    assert r.ok and r.value("tls_version") == 1.2, (r.error, r.error_detail)


async def test_tcp_tls_versions(tls_servers, env):
    s = tls_servers

    async def probe(server: str, **kw):
        (r,) = await run_probe(spec(f"127.0.0.1:{s[server]}", prober="tcp",
                                    section=TCPSpec(tls=True, tls_config=_tls(s, server_name="localhost", **kw))),
                               env)
        return r

    r = await probe("TLS13", min_version="TLS13", max_version="TLS13")
    assert r.ok and r.value("tls_version") == 1.3, (r.error, r.error_detail)
    refused_in_tls(await probe("TLS13", max_version="TLS12"))
    refused_in_tls(await probe("TLS12", min_version="TLS13"))
    r = await probe("TLS12", max_version="TLS12")
    assert r.ok and r.value("tls_version") == 1.2


def test_version_settings_errors():
    with pytest.raises(ValueError, match="min_version TLS13 is above max_version TLS12"):
        TLSSpec(min_version="TLS13", max_version="TLS12")
    with pytest.raises(ValueError, match="min_version"):
        TLSSpec(min_version="TLS14")
    with pytest.raises(ValueError, match="min_version/max_version are not possible with grpc"):
        GRPCSpec(tls=True, tls_config=TLSSpec(max_version="TLS12"))
