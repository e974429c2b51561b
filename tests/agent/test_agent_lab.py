"""`connprobe agent` as a process in the lab with the kernel sensor: a policy drop becomes a policy_drop verdict
with kernel evidence on /metrics, in the JSON log and on the status page; SIGHUP reloads; a malformed reload is
rejected and the old configuration keeps running; SIGTERM stops it cleanly."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.agent.helpers import AgentProcess, http_get, lab_config, last_recent, samples_named, wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(240)]


def test_agent_in_the_lab_names_a_policy_drop_and_reloads_on_sighup(lab, tmp_path):
    cfg = lab_config(tmp_path / "agent.yml", lab)
    agent = AgentProcess(cfg, tmp_path)
    try:
        agent.start()
        code, text = http_get(agent.url + "/-/ready")
        assert code == 200 and "kernel sensor attached" in text
        for name in ("web", "api"):
            wait_for(lambda n=name: (last_recent(agent, n) or {}).get("cause") == "ok", 20, f"{name} healthy")

        with lab.policy_drop("srv2", direction="in", port=8080):
            last = wait_for(lambda: (d := last_recent(agent, "api")) and d["cause"] == "policy_drop" and d, 30,
                            "a policy_drop verdict for api")
            assert last["sub_cause"] == "policy_drop/syn" and last["kernel_events"] > 0
            assert (last_recent(agent, "web") or {}).get("cause") == "ok"
            m = agent.metrics()
            source = lab.ns("client").name
            assert samples_named(m, "connprobe_probe_cause", probe="api", cause="policy_drop", source=source)
            # declared series and observed ones carry the same labels: one series per probe, not two
            assert len(samples_named(m, "connprobe_probes_total", probe="api", result="success")) == 1
            drops = samples_named(m, "connprobe_probe_packet_drops_total", probe="api")
            assert drops and sum(drops.values()) > 0, drops
            assert samples_named(m, "connprobe_kernel_sensor_up") == {frozenset(): 1.0}
            code, page = http_get(agent.url + "/")
            assert code == 200 and '<section class="timeline" data-probe="api">' in page
            assert "▲ kernel drop" in page and "policy_drop/syn" in page
        wait_for(lambda: (last_recent(agent, "api") or {}).get("cause") == "ok", 30, "api healthy again")

        lines = [json.loads(x) for x in agent.log_json.read_text().splitlines()]
        assert {x["cause"] for x in lines if x["probe"] == "api"} >= {"ok", "policy_drop"}

        # SIGHUP: api leaves the configuration, its series go
        lab_config(cfg, lab, names=("web",))
        agent.signal(signal.SIGHUP)
        wait_for(lambda: not samples_named(agent.metrics(), "probe_success", probe="api"), 15,
                 "api's series to disappear")
        assert samples_named(agent.metrics(), "probe_success", probe="web")

        # a malformed file on SIGHUP: rejected, logged, web keeps running
        cfg.write_text("probes:\n  - name: web\n    modul: http_2xx\n")
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "reload of" in agent.stderr() and "rejected" in agent.stderr(), 10, "the rejection")
        assert 'probe "web": module: required' in agent.stderr()
        before = sum(samples_named(agent.metrics(), "connprobe_probes_total", probe="web").values())
        time.sleep(7)
        after = sum(samples_named(agent.metrics(), "connprobe_probes_total", probe="web").values())
        assert after >= before + 2
        assert samples_named(agent.metrics(), "connprobe_config_last_reload_successful") == {frozenset(): 0.0}
    finally:
        rc = agent.stop()
    assert rc == 0, agent.stderr()[-3000:]
    assert "stopping" in agent.stderr()


def test_agent_refuses_to_start_on_a_bad_config_or_address(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yml"
    bad.write_text("probes:\n  - {name: x, module: nope, target: 'http://x/'}\n")
    out = subprocess.run([sys.executable, "-m", "connprobe.cli", "agent", "--config", str(bad), "--no-kernel",
                          "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert 'probe "x": module: unknown module "nope" (known: none defined)' in out.stderr
    out = subprocess.run([sys.executable, "-m", "connprobe.cli", "agent", "--config", str(bad), "--listen", "nope"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--listen: 'nope' must be HOST:PORT" in out.stderr
