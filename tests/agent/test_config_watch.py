"""The agent reloads its config when the file changes: a Kubernetes ConfigMap update (an atomic swap of the
`..data` symlink), an in-place edit, an editor's write-and-rename; inotify or, without it, a stat poll. A bad
version keeps the running config with one log line, as SIGHUP does (the same `Agent.reload`)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from connprobe.agent import Agent
from connprobe.cli import build_parser
from tests.agent.helpers import AgentProcess, Upstream, http_get, parse_samples, samples_named, wait_for


@pytest.fixture
async def upstream():
    up = await Upstream().start()
    yield up
    await up.stop()


def _config(upstream: Upstream, names: list[str]) -> str:
    probes = [{"name": n, "module": "http_2xx", "target": upstream.url(f"/ok?{n}"), "interval": "0.2s",
               "timeout": "150ms", "jitter": 0} for n in names]
    return yaml.safe_dump({"limits": {"min_interval": "100ms"}, "modules": {"http_2xx": {"prober": "http",
                                                                                         "timeout": "1s"}},
                           "probes": probes}, sort_keys=False)


class ConfigMapDir:
    """A directory laid out as the kubelet lays out a ConfigMap volume, updated as the kubelet updates it."""

    def __init__(self, root: Path, text: str):
        self.root = root
        self.n = 0
        root.mkdir()
        self.current = self._write(text)
        os.symlink(self.current, root / "..data")
        os.symlink("..data/config.yaml", root / "config.yaml")

    @property
    def path(self) -> Path:
        return self.root / "config.yaml"

    def _write(self, text: str) -> str:
        self.n += 1
        name = f"..2026_11_30_18_00_{self.n:02d}.{self.n:09d}"
        (self.root / name).mkdir()
        (self.root / name / "config.yaml").write_text(text)
        return name

    def swap(self, text: str) -> None:
        new = self._write(text)
        os.symlink(new, self.root / "..data_tmp")
        os.rename(self.root / "..data_tmp", self.root / "..data")  # the atomic step
        shutil.rmtree(self.root / self.current)
        self.current = new


async def _until(pred, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _running(path: Path, **options) -> Agent:
    opts = {"debounce": 0.1, "safety_interval": 3600.0, **options}  # no safety poll: inotify must see it
    a = Agent(path, kernel=False, watch_config=True, watch_options=opts)
    await a.start()
    await a.wait_ready(10)
    return a


async def _stop(a: Agent) -> None:
    watcher = a.targets.watcher
    ino = watcher._inotify if watcher is not None else None
    await a.stop()
    assert watcher is None or watcher._inotify is None
    if ino is not None:
        with pytest.raises(OSError):
            os.fstat(ino.fd)  # the inotify descriptor is closed


async def test_a_configmap_swap_is_picked_up_and_a_bad_one_keeps_the_old_config(tmp_path, upstream, caplog):
    cm = ConfigMapDir(tmp_path / "cm", _config(upstream, ["a"]))
    a = await _running(cm.path)
    try:
        assert a.targets.watcher is not None and a.targets.watcher.mode == "inotify"
        assert a.scheduler.scheduled() == {"a"}
        cm.swap(_config(upstream, ["a", "b"]))
        await _until(lambda: a.scheduler.scheduled() == {"a", "b"}, "the swapped config's probes")
        await _until(lambda: "b" in a.board.names(), "a verdict of probe b")
        assert a.reloads_by_trigger[("watch", "success")] == 1

        good = a.active
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="connprobe.agent"):
            cm.swap("probes: [\n")
            await _until(lambda: a.reloads_by_trigger[("watch", "failure")] == 1, "the bad swap to be rejected")
            assert a.active is good and a.scheduler.scheduled() == {"a", "b"}
            cm.swap("probes: [\n")  # the same bad content again (new inode): not tried again
            cm.swap(_config(upstream, ["b"]))
            await _until(lambda: a.reloads_by_trigger[("watch", "success")] == 2, "the fixed config")
        await _until(lambda: a.scheduler.scheduled() == {"b"}, "probe a to retire")
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(errors) == 1, errors
        assert "rejected, the running configuration stays" in errors[0] and "invalid YAML" in errors[0]
        assert "\n" not in errors[0]
        assert a.reloads_by_trigger[("watch", "failure")] == 1
        samples = parse_samples(generate_latest(a.metrics.registry).decode())
        assert samples_named(samples, "connprobe_config_reloads_by_trigger_total", trigger="watch") == {
            frozenset({("trigger", "watch"), ("result", "success")}): 2.0,
            frozenset({("trigger", "watch"), ("result", "failure")}): 1.0}
        assert samples_named(samples, "connprobe_config_reloads_by_trigger_total", trigger="signal",
                             result="success") == {frozenset({("trigger", "signal"), ("result", "success")}): 0.0}
    finally:
        await _stop(a)


@pytest.mark.parametrize("edit", ["in_place", "editor_rename"])
async def test_a_plain_file_edited_in_place_or_renamed_over_is_picked_up(tmp_path, upstream, edit):
    path = tmp_path / "probes.yml"
    path.write_text(_config(upstream, ["a"]))
    a = await _running(path)
    try:
        assert a.targets.watcher.mode == "inotify"
        text = _config(upstream, ["a", "c"])
        if edit == "in_place":
            with open(path, "r+") as f:  # same inode, truncated and rewritten
                f.truncate(0)
                f.write(text)
        else:
            tmp = tmp_path / ".probes.yml.swp"
            tmp.write_text(text)
            os.rename(tmp, path)
        await _until(lambda: a.scheduler.scheduled() == {"a", "c"}, "the edited config's probes")
        assert a.reloads_by_trigger[("watch", "success")] == 1 and a.last_reload_ok
    finally:
        await _stop(a)


async def test_without_inotify_a_stat_poll_picks_up_the_swap(tmp_path, upstream):
    cm = ConfigMapDir(tmp_path / "cm", _config(upstream, ["a"]))
    a = await _running(cm.path, use_inotify=False, poll_interval=0.1)
    try:
        assert a.targets.watcher.mode == "poll"
        cm.swap(_config(upstream, ["d"]))
        await _until(lambda: a.scheduler.scheduled() == {"d"}, "the swapped config's probes")
        os.utime(cm.path)  # touched, same content: no reload
        cm.swap(_config(upstream, ["d"]))  # same content, new inode: no reload
        cm.swap(_config(upstream, ["d", "e"]))
        await _until(lambda: a.scheduler.scheduled() == {"d", "e"}, "the second swap")
        assert a.reloads_by_trigger[("watch", "success")] == 2
    finally:
        await _stop(a)


async def test_a_missing_file_is_waited_for_not_a_failed_reload(tmp_path, upstream, caplog):
    path = tmp_path / "probes.yml"
    path.write_text(_config(upstream, ["a"]))
    a = await _running(path)
    try:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="connprobe.agent"):
            path.unlink()
            await _until(lambda: any("is not there" in r.getMessage() for r in caplog.records), "the warning")
            assert a.reloads["failure"] == 0 and a.scheduler.scheduled() == {"a"}
            path.write_text(_config(upstream, ["f"]))
            await _until(lambda: a.scheduler.scheduled() == {"f"}, "the file to come back")
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    finally:
        await _stop(a)


async def test_the_directory_replaced_whole_is_followed(tmp_path, upstream):
    """The watched directory itself is moved away and a new one put in its place: the watch follows the path."""
    d = tmp_path / "etc"
    d.mkdir()
    (d / "probes.yml").write_text(_config(upstream, ["a"]))
    a = await _running(d / "probes.yml")
    try:
        new = tmp_path / "etc.new"
        new.mkdir()
        (new / "probes.yml").write_text(_config(upstream, ["g"]))
        os.rename(d, tmp_path / "etc.old")
        os.rename(new, d)
        await _until(lambda: a.scheduler.scheduled() == {"g"}, "the new directory's config")
        assert a.targets.watcher.mode == "inotify"
        (d / "probes.yml").write_text(_config(upstream, ["g", "h"]))  # and the new directory is watched
        await _until(lambda: a.scheduler.scheduled() == {"g", "h"}, "an edit in the new directory")
    finally:
        await _stop(a)


def test_the_watch_is_on_by_default_and_can_be_turned_off():
    p = build_parser()
    assert p.parse_args(["agent", "--config", "c.yml"]).config_watch is True
    assert p.parse_args(["agent", "--config", "c.yml", "--no-config-watch"]).config_watch is False
    assert p.parse_args(["agent", "--config", "c.yml", "--config.watch"]).config_watch is True


def test_the_agent_process_watches_by_default_and_counts_reloads_by_trigger(tmp_path):
    """`connprobe agent` as deployed: no flag, a ConfigMap-style directory; SIGHUP and POST /-/reload still work
    and each trigger is counted on its own."""
    def config(names: list[str]) -> str:
        probes = [{"name": n, "module": "tcp", "target": "127.0.0.1:9", "interval": "1s", "timeout": "200ms"}
                  for n in names]
        return yaml.safe_dump({"modules": {"tcp": {"prober": "tcp", "timeout": "1s"}}, "probes": probes})

    cm = ConfigMapDir(tmp_path / "cm", config(["a"]))
    agent = AgentProcess(cm.path, tmp_path, "--no-kernel").start()

    def reloads(trigger: str) -> float:
        return samples_named(agent.metrics(), "connprobe_config_reloads_by_trigger_total", trigger=trigger,
                             result="success").get(frozenset({("trigger", trigger), ("result", "success")}), 0.0)

    def configured() -> float:
        return samples_named(agent.metrics(), "connprobe_probes_configured")[frozenset()]

    try:
        assert "config watch: reloading" in agent.stderr() and "(inotify)" in agent.stderr()
        cm.swap(config(["a", "b"]))
        wait_for(lambda: configured() == 2, 30, "the swapped config")
        assert reloads("watch") == 1
        agent.signal(signal.SIGHUP)
        wait_for(lambda: reloads("signal") == 1, 30, "the SIGHUP reload")
        req = urllib_post(agent.url + "/-/reload")
        assert req[0] == 200, req
        assert (reloads("watch"), reloads("signal"), reloads("http")) == (1, 1, 1)
        assert http_get(agent.url + "/-/ready")[0] == 200
    finally:
        assert agent.stop() == 0


def urllib_post(url: str) -> tuple[int, str]:
    req = urllib.request.Request(url, method="POST", headers={"X-Connprobe-Request": "1"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.read().decode()
