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
