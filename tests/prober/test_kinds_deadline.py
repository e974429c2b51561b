"""The new kinds end by their deadline against a peer that accepts and then says nothing, and leave no file
descriptor behind (gRPC's relay, WebSocket's connection, the Unix socket; ICMP's raw socket, on loopback)."""

from __future__ import annotations

import asyncio
import socket

from prober import ErrorKind, GRPCSpec, ICMPSpec, ProbeEnv, QueryStep, UnixSpec, WebSocketSpec, run_probe
from tests.leaks import open_fds
from tests.prober.helpers import spec


async def test_silent_peers_end_by_the_deadline_and_nothing_leaks(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the kernel completes handshakes; nobody ever reads or answers
    port = silent.getsockname()[1]
    upath = tmp_path / "silent.sock"
    usilent = socket.socket(socket.AF_UNIX)
    usilent.bind(str(upath))
    usilent.listen(64)
    specs = [
        spec(f"127.0.0.1:{port}", prober="grpc", timeout=0.5, section=GRPCSpec()),
        spec(f"ws://127.0.0.1:{port}/", prober="websocket", timeout=0.5, section=WebSocketSpec()),
        spec(str(upath), prober="unix", timeout=0.5,
             section=UnixSpec(query_response=(QueryStep(expect="^hello"),))),
    ]
    ping = spec("127.0.0.1", prober="icmp", timeout=0.5, section=ICMPSpec())
    try:
        async with ProbeEnv() as env:
            for _ in range(2):  # warm up, concurrently as below (socket pools, grpc's pollers, the loop's pipe)
                await asyncio.gather(*(run_probe(s, env) for s in (*specs, ping)))
            before = open_fds()
            for _ in range(10):
                results = await asyncio.gather(*(run_probe(s, env) for s in specs))
                for (r,) in results:  # a timeout of its own phase; the runner's guard would say internal
                    assert r.error in (ErrorKind.READ_TIMEOUT, ErrorKind.CONNECT_TIMEOUT), (r.kind, r.error_detail)
                ((r,),) = await asyncio.gather(run_probe(ping, env))
                assert r.ok
            # a leak of one descriptor per probe would show as 30 or more; socket pools and grpc's pollers open
            # and close a few on their own, so a count within a few of the start is no leak
            assert open_fds() <= before + 4, (before, open_fds())
    finally:
        silent.close()
        usilent.close()
