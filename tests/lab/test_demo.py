"""The README's demo command: the agent on a fresh lab, faults switching on and off, a verdict per probe."""

from __future__ import annotations

import subprocess
import sys

import pytest

from connprobe.lab.schedule import DEMO

pytestmark = pytest.mark.kernel


@pytest.mark.timeout(300)
def test_demo_walks_the_fault_schedule_and_names_each_cause():
    proc = subprocess.run([sys.executable, "-m", "connprobe.cli", "demo", "--phase-seconds", "8", "--interval", "2",
                           "--port", "0"], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "status page: http://127.0.0.1:" in out and "kernel sensor: attached" in out
    rows = {}
    header: list[str] = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│" if "│" in line else "┃")]
        if len(cells) > 3 and cells[1] == "phase":
            header = cells
        elif len(cells) > 3 and header:
            rows[cells[1]] = dict(zip(header, cells, strict=False))
    for phase in DEMO:
        assert phase.name in rows, f"no summary row for phase {phase.name}:\n{out}"
        for probe, cause in phase.expect.items():
            assert f"{cause}*" in rows[phase.name][probe], (phase.name, probe, rows[phase.name])
    assert "torn down" in out


TRIALS = 10


@pytest.mark.timeout(240)
async def test_the_packet_loss_phase_gives_the_bulk_probe_loss_every_time(lab):
    """The demo's packet-loss phase (its own fault switch and bulk probe, 2.5 s timeout, 100 ms budget), ten
    probes through the agent's path (probe, kernel evidence window, rules): every one whose connection was
    made is `tcp_retransmit`; one whose SYN-ACKs the loss took every time is never called a policy."""
    import yaml

    from connprobe.commands.demo import probe_config
    from connprobe.config import parse_config
    from connprobe.sensorload import close_watch, open_watch
    from correlator import correlate
    from prober import ProbeEnv, run_probe

    phase = next(p for p in DEMO if p.name == "packet loss")
    bulk = next(p for p in parse_config(yaml.safe_dump(probe_config(lab, 3.0))).probes if p.name == "bulk")
    ev = await open_watch()
    assert ev.available, ev.unavailable_reason
    seen = []
    try:
        async with ProbeEnv(on_local_port=ev.on_local_port) as env:
            with phase.fault(lab):
                for _ in range(TRIALS):
                    (r,) = await run_probe(bulk, env)
                    events, status = await ev.collect(r)
                    v = correlate(r, events, budget_ns=int(bulk.effective_budget * 1e9), coverage=status)
                    seen.append((r.phase("transfer") is not None, str(v.cause), v.summary))
    finally:
        await close_watch(ev)
    assert all(cause != "policy_drop" for _, cause, _ in seen), seen
    assert all(cause == phase.expect["bulk"] for made, cause, _ in seen if made), seen
    assert sum(made for made, _, _ in seen) >= TRIALS - 2, seen  # the phase did run transfers
