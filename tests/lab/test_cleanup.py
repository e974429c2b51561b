"""The lab leaves nothing behind and never touches the root namespace."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from connprobe.lab import Lab, list_labs
from connprobe.lab.topology import NETNS_CONF, STATE_ROOT

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def root_namespace_snapshot() -> dict[str, str]:
    """What the lab must never change in the namespace this test runs in."""
    def strip_volatile(js: str) -> str:
        data = json.loads(js or "[]")
        for link in data:
            for key in ("stats", "stats64", "operstate", "flags", "linkinfo"):
                link.pop(key, None)
            for a in link.get("addr_info", []):
                a.pop("valid_life_time", None)
                a.pop("preferred_life_time", None)
        return json.dumps(data, sort_keys=True)

    return {
        "links+addresses": strip_volatile(sh("ip", "-j", "addr")),
        "routes4": sh("ip", "route"),
        "routes6": sh("ip", "-6", "route"),
        "rules": sh("ip", "rule"),
        "ruleset": sh("nft", "list", "ruleset"),
        "qdiscs": sh("tc", "qdisc", "show"),
    }


def lab_namespaces(lab_id: str) -> list[str]:
    return [n.split()[0] for n in sh("ip", "netns", "list").splitlines() if n.startswith(f"cp-{lab_id}-")]


def test_a_fault_raising_inside_a_lab_leaves_nothing_behind():
    before = root_namespace_snapshot()
    pids: list[int] = []
    lab_id = None
    with pytest.raises(RuntimeError, match="boom"):
        with Lab() as lab:
            lab_id = lab.id
            pids = list(json.loads((lab.state_dir / "state.json").read_text())["pids"].values())
            assert len(lab_namespaces(lab.id)) == 5
            with lab.policy_drop("srv1", port=8080), lab.packet_loss(0.1), lab.dns_fault("srv1.lab.test", "nxdomain"):
                raise RuntimeError("boom")
    assert lab_namespaces(lab_id) == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"lab server {pid} still running"
    assert not (STATE_ROOT / lab_id).exists()
    assert not (NETNS_CONF / f"cp-{lab_id}-client").exists()
    assert root_namespace_snapshot() == before


def test_faults_are_undone_even_when_the_body_raises(lab):
    router = lab.ns("router").name
    srv1 = lab.ns("srv1").name
    with pytest.raises(ValueError), lab.policy_drop("srv1", port=8080), lab.packet_loss(0.2):
        assert "connprobe_fault" in sh("ip", "netns", "exec", srv1, "nft", "list", "tables")
        assert "clsact" in sh("ip", "netns", "exec", router, "tc", "qdisc", "show", "dev", "c0")
        raise ValueError
    assert "connprobe_fault" not in sh("ip", "netns", "exec", srv1, "nft", "list", "tables")
    assert "clsact" not in sh("ip", "netns", "exec", router, "tc", "qdisc", "show", "dev", "c0")


def test_two_labs_side_by_side_do_not_collide(lab):
    with Lab() as other:
        assert other.id != lab.id
        assert set(lab_namespaces(other.id)).isdisjoint(lab_namespaces(lab.id))
        # Same addresses, separate worlds: a fault in one lab does not reach the other.
        with other.http_status("srv1", 503):
            out = lab.exec("client", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", lab.server("srv1").url())
            assert out == "200"


def test_a_crashed_runs_lab_is_removed_by_the_next_up():
    # A lab whose owner dies without tearing down: its servers die with it (PDEATHSIG), its namespaces stay.
    code = "from connprobe.lab import Lab; lab = Lab().up(); print(lab.id, flush=True); import os; os._exit(9)"
    proc = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    crashed = proc.stdout.strip()
    assert proc.returncode == 9 and crashed
    assert len(lab_namespaces(crashed)) == 5
    assert any(st["id"] == crashed and st["stale"] for st in list_labs())
    with Lab():
        assert lab_namespaces(crashed) == []


def test_lab_cli_up_status_down(tmp_path):
    cli = [os.sys.executable, "-m", "connprobe.cli", "lab"]
    up = subprocess.run([*cli, "up"], capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    lab_id = up.stdout.split("lab ", 1)[1].split()[0]
    try:
        assert len(lab_namespaces(lab_id)) == 5
        status = subprocess.run([*cli, "status"], capture_output=True, text=True, timeout=30).stdout
        assert lab_id in status and "persistent" in status
        bad = subprocess.run([*cli, "down", "--id", "nosuch"], capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and "no lab with id 'nosuch'" in bad.stderr
    finally:
        down = subprocess.run([*cli, "down", "--id", lab_id], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0 and f"lab {lab_id} removed" in down.stdout
    assert lab_namespaces(lab_id) == []


def test_setup_is_idempotent():
    out = subprocess.run([str(ROOT / "scripts" / "setup")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "setup: nothing to change"
