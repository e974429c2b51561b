"""A probe that gives up resets its connection, so the kernel shows its flows closed and the evidence window
closes without waiting the grace period — also when a policy in the middle of a transfer eats every answer
(the FIN a plain close would send would then wait for an acknowledgement that never comes)."""

from __future__ import annotations

import pytest

from correlator import correlate
from correlator.join import window_complete

pytestmark = pytest.mark.kernel


@pytest.mark.timeout(120)
@pytest.mark.parametrize("client", ["aiohttp", "aiohttp-session", "httpx"])
async def test_a_wall_mid_transfer_leaves_the_window_complete_and_the_verdict_unchanged(lab, client):
    from connprobe.lab.schedule import FAULTS
    from connprobe.sensorload import close_watch, open_watch
    from prober import HTTPSpec, ProbeEnv, run_probe
    from prober.spec import ModuleSpec, ProbeSpec

    spec = ProbeSpec(name="wall", target=lab.server("srv1").url("/bytes/40000000"),
                     source=f"netns {lab.ns('client').name}", interval=5,
                     module=ModuleSpec(prober="http", timeout=1.5, http=HTTPSpec(client=client)))
    ev = await open_watch()
    assert ev.available, ev.unavailable_reason
    try:
        async with ProbeEnv(on_local_port=ev.on_local_port) as env:
            with FAULTS["srv1_drops_after_4mb"](lab):
                (r,) = await run_probe(spec, env)
                events, status = await ev.collect(r)
    finally:
        await close_watch(ev)
    assert r.error == "read_timeout" and r.progress and r.progress[-1].bytes > 1_000_000, r
    # Both ends of the connection seen closed (ours by the reset we sent, the server's on receiving it).
    assert window_complete(r, events), [(e.kind, e.tcp_state, e.reason, e.sport, e.dport, e.ts_ns - r.end_ns)
                                        for e in events if e.ts_ns >= r.end_ns]
    ours = {(f.local_addr, f.local_port) for f in r.flows if f.proto == "tcp"}
    assert any(e.kind == "reset_tx" and (e.saddr, e.sport) in ours for e in events)
    v = correlate(r, events, coverage=status)
    assert v.sub_cause == "policy_drop/established", v.facts
