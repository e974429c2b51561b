"""The agent's /probe with the icmp, grpc, websocket and unix kinds: blackbox's metrics come back; a caller cannot
point them where /probe refuses (metadata addresses, an unlisted unix socket path, a websocket module's headers
to an unlisted host)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.agent.test_hostile_client import start_agent, write_yaml  # noqa: F401 - start_agent: the fixture

MODULES = {
    "ping": {"prober": "icmp", "timeout": "2s"},
    "health": {"prober": "grpc", "timeout": "2s"},
    "ws": {"prober": "websocket", "timeout": "2s", "websocket": {"headers": {"X-Token": "tok-9z"}}},
    "sock": {"prober": "unix", "timeout": "2s"},
}


async def _get(a, target: str, module: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(a.base + "/probe", params={"target": target, "module": module}) as r:
            return r.status, await r.text()


@pytest.fixture
async def unix_socket(tmp_path):
    path = tmp_path / "ok.sock"

    async def handle(reader, writer):
        writer.write(b"hello\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handle, path=str(path))
    yield path
    server.close()
    await server.wait_closed()


async def test_probe_endpoint_with_the_new_kinds(tmp_path, start_agent, unix_socket):  # noqa: F811
    modules = dict(MODULES, sock_ok={"prober": "unix", "timeout": "2s", "allowed_targets": [str(unix_socket)],
                                     "unix": {"query_response": [{"expect": "^hello"}]}})
    cfg = write_yaml(tmp_path / "c.yml", {"modules": modules, "probes": []})
    a = await start_agent(cfg)
    status, text = await _get(a, "127.0.0.1", "ping")
    assert status == 200 and "probe_success 1.0" in text and "probe_icmp_reply_hop_limit 64.0" in text
    assert 'probe_icmp_duration_seconds{phase="rtt"}' in text
    status, text = await _get(a, "169.254.169.254", "ping")
    assert status == 400 and "link-local or metadata address" in text
    status, text = await _get(a, "169.254.169.254:50051", "health")
    assert status == 400 and "link-local or metadata address" in text
    status, text = await _get(a, "127.0.0.1:1", "health")  # nobody listens: a failed probe, not a refusal
    assert status == 200 and "probe_success 0.0" in text and "probe_grpc_status_code 14.0" in text
    status, text = await _get(a, str(unix_socket), "sock")
    assert (status, text) == (400, f"target: '{unix_socket}': on /probe a unix socket path must be listed in "
                                   "the module's allowed_targets\n")
    status, text = await _get(a, str(unix_socket), "sock_ok")
    assert status == 200 and "probe_success 1.0" in text
    status, text = await _get(a, "ws://127.0.0.1:1/", "ws")
    assert status == 400 and "allowed_targets" in text and "tok-9z" not in text
