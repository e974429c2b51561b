"""The deadline stress test: the lab's fault kinds (drop, reject, loss, slow, a stalled body, a silent TLS
handshake, a redirect into a stall, dead DNS over UDP and TCP) run many times at once, with every client,
and every probe comes back within its timeout plus a small margin, with a real error kind (never
`internal`, never ended by the runner's guard).

A correctness bound, not a speed assertion: MARGIN_S is the guard's own margin plus room for a busy
machine's loop lag; a probe whose deadline is lost takes its whole fault's length (a dropped SYN: minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest

from prober import DNSSpec, ErrorKind, HTTPSpec, ProbeEnv, TCPSpec, TLSSpec, run_probe
from prober.runner import OVERRUN_MARGIN_S
from tests.prober.helpers import spec

pytestmark = pytest.mark.kernel

CLIENTS = ("aiohttp", "aiohttp-session", "httpx")
TIMEOUT_S = 1.0
MARGIN_S = OVERRUN_MARGIN_S + 0.25
COPIES = 6  # of the whole set of faulty probes, all at once


@contextlib.asynccontextmanager
async def stall_server(lab, role: str, answer: bytes | None):
    """A server in a lab namespace that reads the request head, sends `answer` (None: nothing), then holds
    the connection open without another byte. Yields its port."""
    listener = lab.executor(role).socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((lab.server(role).addr4, 0))
    listener.listen(256)
    listener.setblocking(False)
    held: set[asyncio.Task] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.add(asyncio.current_task())
        try:
            if answer is not None:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
            await asyncio.sleep(3600)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, sock=listener)
    try:
        yield listener.getsockname()[1]
    finally:
        server.close()
        for t in held:
            t.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        await server.wait_closed()


async def _timed(env, s) -> tuple[float, object]:
    t0 = time.monotonic()
    (r, *_) = await run_probe(s, env)
    return time.monotonic() - t0, r


def _http(url, src, client, name, **kw):
    tls = kw.pop("tls", None)
    section = HTTPSpec(client=client, **({"tls": tls} if tls else {}), **kw)
    return spec(url, source=src, timeout=TIMEOUT_S, name=name, section=section)


def _first_wave(lab, src, stall_url, silent) -> list:
    s1, s2 = lab.server("srv1"), lab.server("srv2")
    insecure = TLSSpec(insecure_skip_verify=True)
    specs = []
    for copy in range(COPIES):
        for c in CLIENTS:
            n = f"{copy}-{c}"
            specs += [
                _http(s1.url("/ok"), src, c, f"drop-{n}"),
                _http(s2.url("/ok", tls=True), src, c, f"reject-{n}", tls=insecure),
                _http(stall_url, src, c, f"stalled-body-{n}"),
                _http(f"https://{s2.addr4}:{silent}/", src, c, f"tls-silent-{n}", tls=insecure),
                _http(s2.url(f"/redirect?to={stall_url}"), src, c, f"redirect-stall-{n}"),
                _http(f"http://void.lab.test:{s1.port}/", src, c, f"dead-dns-{n}"),
            ]
        specs += [
            spec(f"{s1.addr4}:{s1.port}", prober="tcp", source=src, timeout=TIMEOUT_S, name=f"tcp-drop-{copy}"),
            spec(f"{s2.addr4}:{silent}", prober="tcp", source=src, timeout=TIMEOUT_S, name=f"tcp-expect-{copy}",
                 section=TCPSpec(send="hello\\n", expect="never")),
            spec(lab.dns_addr4, prober="dns", source=src, timeout=TIMEOUT_S, name=f"dns-udp-{copy}",
                 section=DNSSpec(query_name="void.lab.test")),
            spec(lab.dns_addr4, prober="dns", source=src, timeout=TIMEOUT_S, name=f"dns-tcp-{copy}",
                 section=DNSSpec(query_name="srv1.lab.test", transport="tcp")),
        ]
    return specs


async def test_every_fault_kind_ends_by_its_deadline(lab):
    src = f"netns {lab.ns('client').name}"
    s1, s2 = lab.server("srv1"), lab.server("srv2")
    body = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 10
    async with ProbeEnv() as env:
        with (lab.policy_drop(ns="srv1", direction="in", proto="tcp", port=s1.port),  # drop
              lab.policy_drop(ns="srv2", direction="in", proto="tcp", port=s2.tls_port, action="reject"),
              lab.policy_drop(ns="dns", direction="in", proto="tcp", port=53)):  # dead DNS over TCP
            async with stall_server(lab, "srv2", body) as stalled, stall_server(lab, "srv2", None) as silent:
                first_specs = _first_wave(lab, src, f"http://{s2.addr4}:{stalled}/", silent)
                first = await asyncio.gather(*(_timed(env, s) for s in first_specs))
        with lab.packet_loss(0.5, link="srv1", direction="both"), lab.slow_upstream("srv2", 3.0):
            second_specs = [_http(s2.url("/ok"), src, c, f"slow-{k}-{c}") for k in range(COPIES) for c in CLIENTS]
            second_specs += [_http(s1.url("/bytes/400000"), src, c, f"loss-{k}-{c}")
                             for k in range(COPIES) for c in CLIENTS]
            second = await asyncio.gather(*(_timed(env, s) for s in second_specs))
        overruns = env.overruns
    outcomes = list(zip(first_specs + second_specs, first + second, strict=True))
    late = [(s.name, round(took, 3), r.error) for s, (took, r) in outcomes if took > s.effective_timeout + MARGIN_S]
    assert not late, late
    internal = [(s.name, r.error_detail) for s, (_, r) in outcomes if r.error is ErrorKind.INTERNAL]
    assert not internal and overruns == 0, internal
    failed = {s.name.split("-")[0] for s, (_, r) in outcomes if not r.ok}
    assert {"drop", "reject", "stalled", "tls", "redirect", "dead", "tcp", "dns", "slow"} <= failed, failed


async def test_a_busy_namespace_worker_does_not_hold_a_probe_past_its_deadline(lab):
    """The source namespace's worker thread (which makes the probes' sockets there) is busy for longer than
    the probes' timeout, and no socket is pooled: every probe still ends by its deadline (the hand-off to
    the worker is inside each probe's deadline, DNS included)."""
    from prober.sockets import close_socket_pools

    src = f"netns {lab.ns('client').name}"
    s1 = lab.server("srv1")
    specs = [_http(s1.url("/ok"), src, c, f"http-{c}") for c in CLIENTS]
    specs += [spec(f"{s1.addr4}:{s1.port}", prober="tcp", source=src, timeout=TIMEOUT_S, name="tcp"),
              spec(lab.dns_addr4, prober="dns", source=src, timeout=TIMEOUT_S, name="dns-udp",
                   section=DNSSpec(query_name="srv1.lab.test")),
              spec(lab.dns_addr4, prober="dns", source=src, timeout=TIMEOUT_S, name="dns-tcp",
                   section=DNSSpec(query_name="srv1.lab.test", transport="tcp")),
              _http(f"http://srv1.lab.test:{s1.port}/ok", src, "aiohttp", "by-name")]
    async with ProbeEnv() as env:
        close_socket_pools(lab.ns("client").inode)
        busy = lab.executor("client").submit(time.sleep, TIMEOUT_S + 2.0)
        try:
            outcomes = await asyncio.gather(*(_timed(env, s) for s in specs))
        finally:
            await asyncio.wrap_future(busy)
        overruns = env.overruns
    late = [(s.name, round(took, 3)) for s, (took, _) in zip(specs, outcomes, strict=True)
            if took > s.effective_timeout + MARGIN_S]
    assert not late, late
    assert all(not r.ok and r.error is not ErrorKind.INTERNAL for _, r in outcomes), [r for _, r in outcomes]
    assert overruns == 0
