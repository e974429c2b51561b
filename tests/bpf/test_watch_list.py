"""The kernel watch list: every announced port is released on every path (collected, failing UDP connect,
cancelled probe, cancelled collection, dropped result), and a full list degrades to "no kernel evidence
(watch list full)" — the probe itself still succeeds. Real sensor, real probes in the lab."""

from __future__ import annotations

import asyncio

import pytest

from bpf.sensor import KernelSensor
from connprobe.kernelwatch import WATCH_FULL, KernelWatch
from correlator import correlate
from prober import DNSSpec, ProbeEnv, run_probe
from tests.prober.helpers import spec

pytestmark = pytest.mark.kernel


@pytest.fixture
def small_sensor():
    s = KernelSensor(watch_max=4)
    s.open()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def src(lab) -> str:
    return f"netns {lab.ns('client').name}"


async def test_every_announced_port_is_released_on_every_path(lab, src, sensor):
    start = sensor.watch_count
    ev = KernelWatch(sensor, lease_ns=300_000_000, grace_ns=50_000_000)
    srv = lab.server("srv1")
    async with ProbeEnv(on_local_port=ev.on_local_port) as env:
        # the happy path: collected, released
        (r,) = await run_probe(spec(srv.url("/ok"), source=src), env)
        assert r.ok
        await ev.collect(r)
        # a UDP connect that fails (the client subnet's broadcast address: EACCES, no packet leaves)
        s = spec("10.77.1.255", prober="dns", source=src, section=DNSSpec(query_name="srv1.lab.test"))
        (r,) = await run_probe(s, env)
        assert not r.ok and r.dns and r.dns[0].flow is not None, r
        await ev.collect(r)
        # a collection cancelled in its grace period (its flows not yet seen closed, so it waits)
        (r,) = await run_probe(spec(srv.url("/ok"), source=src), env)
        ev.grace_ns = 10_000_000_000
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("connprobe.kernelwatch.window_complete", lambda result, events: False)
            task = asyncio.create_task(ev.collect(r))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        ev.grace_ns = 50_000_000
        # a result nobody collects (a full queue dropped it): released by hand, as the agent does
        (r,) = await run_probe(spec(srv.url("/ok"), source=src), env)
        ev.release(r)
        assert sensor.watch_count == start and ev.watching == 0
        # a probe cancelled mid-connect leaves no result at all: its port's lease runs out
        with lab.policy_drop(ns="srv1", direction="in", proto="tcp", port=srv.port, action="drop"):
            task = asyncio.create_task(run_probe(spec(srv.url("/ok"), source=src, timeout=3.0), env))
            await asyncio.sleep(0.3)
            assert ev.watching == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert sensor.watch_count == start + 1
    await asyncio.sleep(0.4)
    ev.sweep()
    assert sensor.watch_count == start and ev.watching == 0 and ev.expired == 1


async def test_a_full_watch_list_degrades_to_no_evidence_not_a_failed_probe(lab, src, small_sensor):
    for port in range(1, 5):  # fill it
        small_sensor.watch("tcp", port)
    ev = KernelWatch(small_sensor, grace_ns=50_000_000)
    async with ProbeEnv(on_local_port=ev.on_local_port) as env:
        (r,) = await run_probe(spec(f"http://srv1.lab.test:{lab.server('srv1').port}/ok", source=src), env)
    assert r.ok, r  # its DNS query and its connection ran, unwatched
    assert ev.watch_full == len(r.flows) >= 2  # the UDP ports of its DNS queries and its TCP port
    events, status = await ev.collect(r)
    assert events == [] and not status.available and status.reason == WATCH_FULL
    # a probe that fails: its verdict is a guess, and says why
    srv = lab.server("srv1")
    async with ProbeEnv(on_local_port=ev.on_local_port) as env:
        with lab.no_listener("srv1"):
            (r,) = await run_probe(spec(srv.url("/ok"), source=src), env)
    assert r.error is not None and r.error.value == "connect_refused", r
    events, status = await ev.collect(r)
    verdict = correlate(r, events, coverage=status)
    assert any("no kernel evidence (watch list full)" in f for f in verdict.facts), verdict.facts
    for port in range(1, 5):
        small_sensor.unwatch("tcp", port)
    assert small_sensor.watch_count == 0
