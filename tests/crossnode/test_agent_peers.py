"""The agent's `node:` and `peers:`: read at start (a missing token file or namespace is a one-line config
error), `peers:` swapped by a reload (a bad one is rejected and the running peers stay), a resolver can be
plugged in (a Kubernetes lookup will be)."""

from __future__ import annotations

import pytest

from connprobe.agent import Agent
from connprobe.config import ConfigError
from connprobe.crossnode import Peer

pytestmark = pytest.mark.timeout(60)


def _write(path, text):
    path.write_text(text)
    return path


async def test_start_errors_are_one_line(tmp_path):
    for text, words in [
        ("node: {peer_token_file: /nonexistent/token}\n", "node: peer_token_file: /nonexistent/token"),
        ("node: {netns: [cp-no-such-namespace-xyz]}\n", "node: netns: cp-no-such-namespace-xyz"),
        ("node: {netns: ['../etc']}\n", "is not a namespace name"),
        ("peers: [{cidr: 10.0.0.0/8, url: 'http://127.0.0.1:1', token_file: /nonexistent/t}]\n", "token_file"),
    ]:
        agent = Agent(_write(tmp_path / "a.yml", text), kernel=False)
        with pytest.raises(ConfigError) as exc:
            await agent.start()
        assert words in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
        await agent.stop()


async def test_empty_token_file_is_refused(tmp_path):
    tok = _write(tmp_path / "tok", "\n")
    agent = Agent(_write(tmp_path / "a.yml", f"node: {{peer_token_file: {tok}}}\n"), kernel=False)
    with pytest.raises(ConfigError, match="one line of printable ASCII"):
        await agent.start()
    await agent.stop()


async def test_reload_swaps_peers_and_keeps_them_on_error(tmp_path):
    cfg = _write(tmp_path / "a.yml", "node: {name: node-a}\npeers: [{cidr: 10.77.2.0/24, url: 'http://127.0.0.1:9601'}]\n")
    agent = Agent(cfg, kernel=False)
    await agent.start()
    try:
        await agent.wait_ready(10)
        assert agent.node_name == "node-a"
        assert agent.asker.resolver.peer_for("10.77.2.11").url == "http://127.0.0.1:9601"
        _write(cfg, "node: {name: node-a}\npeers: [{cidr: 10.77.2.0/24, url: 'http://127.0.0.1:9602'}]\n")
        assert (await agent.reload()).ok
        assert agent.asker.resolver.peer_for("10.77.2.11").url == "http://127.0.0.1:9602"
        _write(cfg, "node: {name: node-a}\npeers: [{cidr: 10.77.2.0/24, url: 'http://x:1', token_file: /nope}]\n")
        out = await agent.reload()
        assert not out.ok and "token_file" in out.message
        assert agent.asker.resolver.peer_for("10.77.2.11").url == "http://127.0.0.1:9602"
        _write(cfg, "node: {name: node-a}\n")
        assert (await agent.reload()).ok
        assert agent.asker.resolver.peer_for("10.77.2.11") is None  # no peers: nobody is asked

        class Lookup:  # what a Kubernetes resolver plugs in: dest IP -> pod -> node -> that node's agent
            def peer_for(self, addr):
                return Peer(f"http://127.0.0.1:9700/{addr}")

        agent.set_resolver(Lookup())
        assert agent.asker.resolver.peer_for("10.1.2.3").url.endswith("/10.1.2.3")
    finally:
        await agent.stop()
