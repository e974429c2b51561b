"""Shared plumbing of the agent tests: a loopback upstream, config files, an agent process, scraping."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Upstream:
    """An aiohttp server on 127.0.0.1:0: /ok, /slow?delay=S, /status/CODE; counts what it saw."""

    host: str = "127.0.0.1"
    port: int = 0
    slow_started: int = 0
    slow_finished: int = 0
    requests: list[str] = field(default_factory=list)
    runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    async def start(self) -> Upstream:
        async def ok(request: web.Request) -> web.Response:
            self.requests.append(request.path)
            return web.Response(text="ok")

        async def slow(request: web.Request) -> web.Response:
            self.requests.append(request.path)
            self.slow_started += 1
            await asyncio.sleep(float(request.query.get("delay", "0.5")))
            self.slow_finished += 1
            return web.Response(text="slow")

        async def status(request: web.Request) -> web.Response:
            self.requests.append(request.path)
            return web.Response(status=int(request.match_info["code"]), text="status")

        app = web.Application()
        app.router.add_get("/ok", ok)
        app.router.add_get("/slow", slow)
        app.router.add_get("/status/{code}", status)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, probes: list[dict], modules: dict | None = None) -> Path:
    modules = modules or {
        "http_2xx": {"prober": "http", "timeout": "2s"},
        "tcp": {"prober": "tcp", "timeout": "1s"},
    }
    # the tests probe every 0.2 s, faster than the default limits.min_interval (1s)
    path.write_text(yaml.safe_dump({"limits": {"min_interval": "100ms"}, "modules": modules, "probes": probes},
                                   sort_keys=False))
    return path


def parse_samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Exposition text -> {(sample name, frozenset of label items): value}."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def samples_named(samples: dict, name: str, **labels: str) -> dict[frozenset, float]:
    want = set(labels.items())
    return {lbl: v for (n, lbl), v in samples.items() if n == name and want <= set(lbl)}


def http_get(url: str, timeout: float = 10.0, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(pred, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except (OSError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")


class AgentProcess:
    """`connprobe agent` as a child process on a loopback port; stopped by PID."""

    def __init__(self, config: Path, workdir: Path, *extra: str, port: int | None = None):
        self.port = port or free_port()
        self.config = config
        self.log_json = workdir / "verdicts.jsonl"
        self.stderr_path = workdir / "agent.stderr"
        self.argv = [sys.executable, "-m", "connprobe.cli", "agent", "--config", str(config),
                     "--listen", f"127.0.0.1:{self.port}", "--log-json", str(self.log_json), *extra]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 60.0) -> AgentProcess:
        self._stderr = open(self.stderr_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=self._stderr)
        wait_for(lambda: self._alive() and http_get(self.url + "/-/ready", 2)[0] == 200, ready_timeout,
                 "the agent to be ready")
        return self

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}: {self.stderr()[-3000:]}")
        return True

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def metrics(self) -> dict:
        code, text = http_get(self.url + "/metrics")
        assert code == 200, text
        return parse_samples(text)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(Exception):
            self._stderr.close()
        return self.proc.returncode


def last_recent(agent: AgentProcess, probe: str) -> dict | None:
    """The newest /api/recent entry of `probe`, or None before its first run."""
    code, text = http_get(agent.url + "/api/recent")
    assert code == 200
    entries = json.loads(text)["probes"].get(probe) or []
    return entries[-1] if entries else None


def lab_config(path: Path, lab, interval: str = "3s", extra: list[dict] | None = None,
               names: tuple[str, ...] = ("web", "api"), phase_histograms: list[str] | None = None) -> Path:
    """Probes from the lab's client namespace: `web` → srv1, `api` → srv2 (HTTP, 2.5 s timeout, 300 ms budget;
    `phase_histograms` as the module's opt-in, for tests that read the phase quantiles)."""
    source = f"netns {lab.ns('client').name}"
    targets = {"web": "http://srv1.lab.test:8080/ok", "api": "http://srv2.lab.test:8080/ok"}
    probes = [{"name": n, "module": "http_2xx", "target": targets[n], "source": source, "interval": interval,
               "jitter": 0} for n in names]
    modules = {"http_2xx": {"prober": "http", "timeout": "2.5s", "budget": "300ms"},
               "tcp": {"prober": "tcp", "timeout": "2s"}}
    if phase_histograms is not None:
        modules["http_2xx"]["phase_histograms"] = phase_histograms
    return write_config(path, probes + (extra or []), modules)


class Daemon:
    """A server process started by a test (Prometheus, Alertmanager, Chromium); stopped by PID."""

    def __init__(self, name: str, argv: list[str], workdir: Path):
        self.name = name
        self.argv = argv
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Daemon:
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        return self

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}: {self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(Exception):
            self._log.close()


def exposition(registry) -> bytes:
    """The agent's whole `/metrics` text (`connprobe.web.exposition_chunks`, joined)."""
    from connprobe.web import exposition_chunks

    return b"".join(exposition_chunks(registry))
