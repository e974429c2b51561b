"""A reload applies all of the new config or none of it: a bad file (any loader failure) or a failing step
(the sensor side included) is one line — a 400 on POST /-/reload, one log line on SIGHUP — and the old
configuration runs on, whole."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from connprobe.agent import Agent
from connprobe.web import start_server
from tests.agent.helpers import AgentProcess, Upstream, http_get, parse_samples, samples_named, wait_for, write_config

HERE = Path(__file__).parent
BAD = ["not_utf8", "duration_inf", "duration_400_digits", "module_not_a_name", "deep_nesting", "duplicate_key",
       "target_empty_label", "too_many_probes", "interval_below_minimum", "alias_loop"]


@pytest.fixture
async def upstream():
    up = await Upstream().start()
    yield up
    await up.stop()


@pytest.fixture
async def agent(tmp_path, upstream):
    cfg = write_config(tmp_path / "c.yml", [{"name": "a", "module": "http_2xx", "target": upstream.url("/ok"),
                                             "interval": "0.2s", "timeout": "150ms", "jitter": 0}])
    a = Agent(cfg, kernel=False)
    await a.start()
    runner = await start_server(a, "127.0.0.1", 0)
    session = aiohttp.ClientSession()
    await a.wait_ready(10)
    a.test_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    a.test_session = session
    try:
        yield a
    finally:
        await session.close()
        await runner.cleanup()
        await a.stop()


async def _post_reload(a: Agent) -> tuple[int, str]:
    async with a.test_session.post(a.test_url + "/-/reload", headers={"X-Connprobe-Request": "1"}) as r:
        return r.status, await r.text()


async def _probes_run_on(a: Agent, upstream: Upstream) -> None:
    seen = len(upstream.requests)
    deadline = time.monotonic() + 10
    while len(upstream.requests) < seen + 2:
        assert time.monotonic() < deadline, "the old config stopped probing"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("rule", BAD)
async def test_bad_file_is_a_400_and_the_old_config_runs_on(agent, upstream, rule, caplog):
    old = agent.active
    agent.config_path.write_bytes((HERE / "bad" / f"{rule}.yaml").read_bytes())
    with caplog.at_level(logging.ERROR, logger="connprobe.agent"):
        status, text = await _post_reload(agent)
    assert status == 400
    assert text.startswith("failed to reload config: ") and text.count("\n") == 1, text
    assert "Traceback" not in caplog.text and len(caplog.records) == 1
    assert caplog.records[0].getMessage().count("\n") == 0
    assert agent.active is old and agent.scheduler.scheduled() == {"a"}
    assert (agent.reloads, agent.last_reload_ok) == ({"success": 0, "failure": 1}, False)
    await _probes_run_on(agent, upstream)


async def test_a_failing_sensor_side_step_leaves_the_old_config_whole(agent, upstream, monkeypatch):
    old, old_keep = agent.active, agent.kernel_watch.keep_ns
    new_cfg = [{"name": "a", "module": "http_2xx", "target": upstream.url("/ok"), "interval": "0.2s",
                "timeout": "150ms", "jitter": 0},
               {"name": "b", "module": "http_2xx", "target": upstream.url("/ok?b"), "interval": "1s",
                "timeout": "1s"},
               {"name": "slow", "module": "tcp", "target": "127.0.0.1:9", "interval": "24h", "timeout": "10m"}]
    write_config(agent.config_path, new_cfg)
    real = agent._set_retention

    def failing(keep_ns: int) -> None:
        if keep_ns != old_keep:  # applying the new config's retention fails; restoring the old one works
            raise OSError(28, "No space left on device")
        real(keep_ns)

    monkeypatch.setattr(agent, "_set_retention", failing)
    status, text = await _post_reload(agent)
    assert (status, text) == (400, "failed to reload config: OSError: [Errno 28] No space left on device\n")
    assert agent.active is old and agent.kernel_watch.keep_ns == old_keep
    assert agent.scheduler.scheduled() == {"a"}
    async with agent.test_session.get(agent.test_url + "/metrics") as r:
        samples = parse_samples(await r.text())
    assert not samples_named(samples, "connprobe_probe_interval_seconds", probe="b")  # declared, then undone
    assert samples_named(samples, "connprobe_probe_interval_seconds", probe="a")
    await _probes_run_on(agent, upstream)

    monkeypatch.setattr(agent, "_set_retention", real)
    status, text = await _post_reload(agent)
    assert status == 200, text
    assert agent.scheduler.scheduled() == {"a", "b", "slow"} and agent.kernel_watch.keep_ns > old_keep


@pytest.mark.parametrize("rule", ["not_utf8", "duration_inf"])
def test_sighup_with_a_bad_file_logs_one_line_and_runs_on(tmp_path, rule):
    """The agent as a process: SIGHUP used to kill the reload task silently on a non-UTF-8 file."""
    cfg = write_config(tmp_path / "c.yml", [{"name": "self", "module": "tcp", "target": "127.0.0.1:9",
                                             "interval": "0.2s", "timeout": "100ms", "jitter": 0}])
    agent = AgentProcess(cfg, tmp_path, "--no-kernel", "--no-config-watch").start()  # SIGHUP alone
    try:
        def runs() -> float:
            return sum(samples_named(agent.metrics(), "connprobe_probes_total", probe="self").values())

        wait_for(runs, 30, "a first run")
        cfg.write_bytes((HERE / "bad" / f"{rule}.yaml").read_bytes())
        agent.signal(signal.SIGHUP)
        wait_for(lambda: samples_named(agent.metrics(), "connprobe_config_reloads_total", result="failure"), 30,
                 "the reload to fail")
        lines = [ln for ln in agent.stderr().splitlines() if "reload" in ln]
        assert len(lines) == 1 and "rejected, the running configuration stays" in lines[0], agent.stderr()
        assert "Traceback" not in agent.stderr()
        before = runs()
        wait_for(lambda: runs() >= before + 2, 30, "the old config to keep probing")
        assert http_get(agent.url + "/-/ready")[0] == 200
    finally:
        agent.stop()
