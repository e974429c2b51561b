from __future__ import annotations

import asyncio
import socket

import pytest

from prober import ErrorKind, Proto, TCPSpec, run_probe
from tests.prober.helpers import spec


@pytest.fixture
async def echo_server():
    peers: list[int] = []

    async def handle(reader, writer):
        peers.append(writer.get_extra_info("peername")[1])
        writer.write(b"220 hello\r\n")
        try:
            data = await reader.readline()
            writer.write(b"echo " + data)
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    server.peers = peers
    server.port = server.sockets[0].getsockname()[1]
    yield server
    server.close()
    await server.wait_closed()


async def test_connect_only(echo_server, env):
    (r,) = await run_probe(spec(f"127.0.0.1:{echo_server.port}", prober="tcp"), env)
    assert r.ok and [p.name for p in r.phases] == ["connect"]
    await asyncio.sleep(0.05)
    assert env.ports == [(Proto.TCP, echo_server.peers[-1])] and r.flows[0].local_port == echo_server.peers[-1]


async def test_send_expect(echo_server, env):
    s = spec(f"127.0.0.1:{echo_server.port}", prober="tcp", section=TCPSpec(send="ping\\n", expect="echo ping"))
    (r,) = await run_probe(s, env)
    assert r.ok, r
    assert [p.name for p in r.phases] == ["connect", "processing", "transfer"]
    s = spec(f"127.0.0.1:{echo_server.port}", prober="tcp", section=TCPSpec(send="ping\\n", expect="pong"))
    (r,) = await run_probe(s, env)
    assert r.error is ErrorKind.VALIDATION and r.failed_validators == ("expect",)


async def test_refused(env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        (r,) = await run_probe(spec(f"127.0.0.1:{port}", prober="tcp"), env)
    assert r.error is ErrorKind.CONNECT_REFUSED and r.flows[0].remote_port == port


async def test_bad_source_namespace_is_source_error(env):
    (r,) = await run_probe(spec("127.0.0.1:1", prober="tcp", source="netns cp-does-not-exist"), env)
    assert r.error is ErrorKind.SOURCE_ERROR and r.source == "cp-does-not-exist"  # the label, as a success carries


async def test_tls_connect(https_server, env):
    from prober import TLSSpec

    s = spec(f"127.0.0.1:{https_server.port}", prober="tcp",
             section=TCPSpec(tls=True, tls_config=TLSSpec(insecure_skip_verify=True)))
    (r,) = await run_probe(s, env)
    assert r.ok, r
    assert [p.name for p in r.phases][:2] == ["connect", "tls"]
    s = spec(f"127.0.0.1:{https_server.port}", prober="tcp", section=TCPSpec(tls=True))
    (r,) = await run_probe(s, env)
    assert r.error is ErrorKind.TLS_ERROR  # self-signed, not trusted


async def test_tls_min_cert_days(https_server, cert_files, env):
    """`tcp.tls_config.min_cert_days` as http's: the verified leaf (valid 30 days here) must last that long."""
    from prober import TLSSpec

    def tls(days):
        return spec(f"127.0.0.1:{https_server.port}", prober="tcp", section=TCPSpec(
            tls=True, tls_config=TLSSpec(ca_file=str(cert_files[0]), min_cert_days=days)))

    (r,) = await run_probe(tls(60), env)
    assert r.error is ErrorKind.VALIDATION and r.failed_validators == ("min_cert_days",), r
    (r,) = await run_probe(tls(10), env)
    assert r.ok, r.error_detail
    with pytest.raises(ValueError, match=r"tls_config.min_cert_days: needs tls: true or a starttls step \(a plain "
                                         r"connection has no certificate\)"):
        TCPSpec(tls_config=TLSSpec(min_cert_days=10))


async def test_expect_records_how_the_answer_arrived(echo_server, env):
    s = spec(f"127.0.0.1:{echo_server.port}", prober="tcp", section=TCPSpec(send="ping\\n", expect="echo ping"))
    (r,) = await run_probe(s, env)
    assert r.ok and len(r.progress) >= 1 and r.progress[-1].bytes >= len("echo ping")
    assert r.start_ns < r.progress[0].ts_ns <= r.end_ns
