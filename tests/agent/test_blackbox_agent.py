"""`connprobe agent --blackbox-config blackbox.yml`: blackbox_exporter's modules serve /probe unchanged."""

from __future__ import annotations

import asyncio
import urllib.parse

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agent.helpers import AgentProcess, Upstream, http_get

BLACKBOX_YML = """\
modules:
  http_2xx:
    prober: http
    timeout: 3s
    http:
      preferred_ip_protocol: ip4
      valid_status_codes: [200]
  http_token:
    prober: http
    allowed_targets: [127.0.0.1]
    http:
      bearer_token_file: token
      fail_if_body_not_matches_regexp: ["ok"]
  http_token_anywhere:
    prober: http
    http:
      bearer_token: abc
"""


@pytest.fixture
async def upstream():
    up = await Upstream().start()
    yield up
    await up.stop()


async def _probe(agent: AgentProcess, module: str, target: str) -> tuple[int, str]:
    q = urllib.parse.urlencode({"module": module, "target": target})
    return await asyncio.to_thread(http_get, f"{agent.url}/probe?{q}")


def _value(text: str, name: str) -> float:
    return next(s.value for f in text_string_to_metric_families(text) if f.name == name for s in f.samples)


async def test_agent_serves_blackbox_modules(tmp_path, upstream):
    cfg = tmp_path / "blackbox.yml"
    cfg.write_text(BLACKBOX_YML)
    (tmp_path / "token").write_text("tok\n")
    agent = AgentProcess(cfg, tmp_path, "--no-kernel")
    agent.argv[agent.argv.index("--config")] = "--blackbox-config"
    await asyncio.to_thread(agent.start)
    try:
        status, text = await _probe(agent, "http_2xx", upstream.url("/ok"))
        assert status == 200 and _value(text, "probe_success") == 1.0, text
        status, text = await _probe(agent, "http_2xx", upstream.url("/status/500"))
        assert status == 200 and _value(text, "probe_success") == 0.0
        status, text = await _probe(agent, "http_token", upstream.url("/ok"))
        assert status == 200 and _value(text, "probe_success") == 1.0, text
        # credentials go only where the module's allowed_targets says (connprobe's /probe policy)
        status, text = await _probe(agent, "http_token_anywhere", upstream.url("/ok"))
        assert status == 400 and "no allowed_targets" in text, (status, text)
        assert "tok" not in agent.stderr()
    finally:
        await asyncio.to_thread(agent.stop)


def test_agent_refuses_an_invalid_blackbox_file(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "blackbox.yml"
    cfg.write_text("modules:\n  m:\n    prober: http\n    http: {use_proxy_dns: true}\n")
    out = subprocess.run([sys.executable, "-m", "connprobe.cli", "agent", "--blackbox-config", str(cfg),
                          "--no-kernel", "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert 'module "m": http.use_proxy_dns: blackbox_exporter key not supported by connprobe' in out.stderr
    assert "Traceback" not in out.stderr


async def test_agent_config_recognises_a_blackbox_file(tmp_path, upstream):
    """`agent --config blackbox.yml` (not --blackbox-config): recognised, read as one, and said in one log line."""
    cfg = tmp_path / "blackbox.yml"
    cfg.write_text("modules:\n  http_2xx:\n    prober: http\n    timeout: 3s\n"
                   "    http:\n      valid_status_codes: [200]\n")
    agent = AgentProcess(cfg, tmp_path, "--no-kernel")
    await asyncio.to_thread(agent.start)
    try:
        status, text = await _probe(agent, "http_2xx", upstream.url("/ok"))
        assert status == 200 and _value(text, "probe_success") == 1.0, text
        lines = [ln for ln in agent.stderr().splitlines() if "a blackbox_exporter blackbox.yml" in ln]
        assert len(lines) == 1 and "read as with --blackbox-config" in lines[0], agent.stderr()
    finally:
        await asyncio.to_thread(agent.stop)
