"""The README's demo command runs the whole fault tour on a fresh lab and shows each fault's effect."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kernel

EXPECTED = {
    "healthy": "HTTP 200",
    "dns nxdomain": "could not resolve host",
    "dns servfail": "could not resolve host",
    "dns no answer": "could not resolve host",
    "dns slow": "HTTP 200",
    "policy drop (server)": "timed out",
    "policy drop (client)": "timed out",
    "policy reject": "connection refused",
    "packet loss": "HTTP 200, 4000000 bytes",
    "slow upstream": "HTTP 200",
    "no listener": "connection refused",
    "http 503": "HTTP 503",
}


@pytest.mark.timeout(180)
def test_demo_shows_every_fault():
    proc = subprocess.run([sys.executable, "-m", "connprobe.cli", "demo"], capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 8 and cells[1]:
            rows[cells[1]] = cells
    for scenario, seen in EXPECTED.items():
        assert scenario in rows, f"demo printed no row for {scenario}:\n{proc.stdout}"
        assert rows[scenario][3].startswith(seen), rows[scenario]
    assert int(rows["slow upstream"][6]) >= 600
    assert int(rows["dns slow"][4]) >= 800
    assert re.search(r"nft matched [1-9]", rows["policy drop (server)"][8])
    assert re.search(r"lost [1-9]", rows["packet loss"][8])
    assert "torn down" in proc.stdout
