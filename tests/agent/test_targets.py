"""A target source other than the config file (connprobe/targets/): the agent runs what its `load()` gives, and a
change it announces through `watch()` is a reload like any other (all of it or none of it)."""

from __future__ import annotations

import asyncio

import pytest
import yaml

from connprobe.agent import Agent
from connprobe.config import Config, parse_config
from connprobe.targets import TargetSource
from connprobe.targets.source import Changed
from tests.agent.helpers import Upstream


class MemoryTargets:
    """Probes held in memory, changed by the test (what a discovery source does with what it watches)."""

    def __init__(self, probes: list[dict]):
        self.text = self.render(probes)
        self.started = False
        self.loads = 0
        self.bump = asyncio.Event()

    @staticmethod
    def render(probes: list[dict]) -> str:
        return yaml.safe_dump({"limits": {"min_interval": "100ms"},
                               "modules": {"http_2xx": {"prober": "http", "timeout": "1s"}}, "probes": probes})

    @property
    def describe(self) -> str:
        return "memory (test)"

    async def start(self) -> None:
        self.started = True

    def load(self) -> Config:
        assert self.started, "load() before start()"
        self.loads += 1
        return parse_config(self.text, "memory")

    async def watch(self, changed: Changed) -> None:
        while True:
            await self.bump.wait()
            self.bump.clear()
            await changed()

    def change(self, text: str) -> None:
        self.text = text
        self.bump.set()


def _probe(name: str, url: str) -> dict:
    return {"name": name, "module": "http_2xx", "target": url, "interval": "0.2s", "jitter": 0, "timeout": "0.2s"}


async def _until(pred, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


def test_an_agent_needs_a_config_file_or_a_target_source():
    with pytest.raises(ValueError, match="config file or a target source"):
        Agent(kernel=False)


async def test_the_agent_runs_and_reloads_what_its_target_source_gives():
    up = await Upstream().start()
    src = MemoryTargets([_probe("a", up.url("/ok"))])
    targets: TargetSource = src  # a Protocol: structural, nothing to inherit
    agent = Agent(targets=targets, kernel=False)
    await agent.start()
    try:
        await agent.wait_ready(10)
        await _until(lambda: bool(agent.board.probes().get("a")))
        assert set(agent.probe_specs()) == {"a"} and src.loads == 1

        src.change(MemoryTargets.render([_probe("b", up.url("/ok"))]))
        await _until(lambda: agent.reloads_by_trigger[("watch", "success")] == 1)
        assert set(agent.probe_specs()) == {"b"}
        await _until(lambda: bool(agent.board.probes().get("b")))

        src.change("probes: [\n")  # invalid: rejected, and what ran keeps running
        await _until(lambda: agent.reloads_by_trigger[("watch", "failure")] == 1)
        assert set(agent.probe_specs()) == {"b"} and not agent.last_reload_ok
        assert agent.last_reload_error.startswith("memory:")
    finally:
        await agent.stop()
        await up.stop()
