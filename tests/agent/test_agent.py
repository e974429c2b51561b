"""The agent in-process without the kernel sensor, against loopback upstreams: the pipeline, the sinks, the
HTTP endpoints, blackbox-style /probe and reload. (The lab tests do the same with the sensor attached.)"""

from __future__ import annotations

import asyncio
import html
import io
import json
import threading
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from connprobe.agent import Agent, AgentConfig, agent_config
from connprobe.causes import CAUSES, colour
from connprobe.config import ConfigError, load_config, parse_config
from connprobe.sinks import QueuedSink
from connprobe.web import start_server
from correlator.types import Cause, Verdict
from prober.types import ProbeKind, ProbeResult
from tests.agent.helpers import Upstream, parse_samples, samples_named, write_config


@pytest.fixture
async def upstream():
    up = await Upstream().start()
    yield up
    await up.stop()


class Running:
    def __init__(self, agent: Agent, base: str, session: aiohttp.ClientSession):
        self.agent, self.base, self.session = agent, base, session

    async def get(self, path: str, **kw) -> tuple[int, str]:
        async with self.session.get(self.base + path, **kw) as r:
            return r.status, await r.text()

    async def post(self, path: str) -> tuple[int, str]:
        async with self.session.post(self.base + path, headers={"X-Connprobe-Request": "1"}) as r:
            return r.status, await r.text()

    async def metrics(self) -> dict:
        status, text = await self.get("/metrics")
        assert status == 200
        return parse_samples(text)

    async def until(self, pred, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = await pred()
            if got:
                return got
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
async def run_agent(tmp_path):
    started: list[tuple[Agent, object, aiohttp.ClientSession]] = []

    async def start(config, **kw) -> Running:
        agent = Agent(config, kernel=False, **kw)
        await agent.start()
        runner = await start_server(agent, "127.0.0.1", 0)
        session = aiohttp.ClientSession()
        started.append((agent, runner, session))
        await agent.wait_ready(10)
        return Running(agent, f"http://127.0.0.1:{runner.addresses[0][1]}", session)

    yield start
    for agent, runner, session in started:
        await session.close()
        await runner.cleanup()
        await agent.stop()


def probe(name: str, target: str, module: str = "http_2xx", interval: str = "0.5s", **kw) -> dict:
    return {"name": name, "module": module, "target": target, "interval": interval, "jitter": 0, "timeout": "0.2s",
            **kw}


# -- configuration -------------------------------------------------------------------------------------------


def parse_agent_config(text: str) -> AgentConfig:
    return agent_config(parse_config(text))


def test_budget_from_probe_or_module(tmp_path):
    cfg = parse_agent_config(
        "modules:\n  fast: {prober: http, timeout: 2s, budget: 300ms}\n  plain: {prober: http}\n"
        "probes:\n"
        "  - {name: a, module: fast, target: 'http://x/'}\n"
        "  - {name: b, module: fast, target: 'http://x/', budget: 1s}\n"
        "  - {name: c, module: plain, target: 'http://x/'}\n")
    assert cfg.budget_ns("a") == 300_000_000
    assert cfg.budget_ns("b") == 1_000_000_000
    assert cfg.budget_ns("c") is None
    assert [p.name for p in cfg.config.probes] == ["a", "b", "c"]


def test_bad_budget_and_other_errors_are_reported_together():
    with pytest.raises(ConfigError) as exc:
        parse_agent_config("modules:\n  m: {prober: http}\nprobes:\n"
                           "  - {name: a, module: m, target: 'http://x/', budget: soon}\n"
                           "  - {name: b, module: nope, target: 'http://x/'}\n")
    assert exc.value.errors == [
        "probe \"a\": budget: expected a duration like 5s, 250ms or 1m30s, got 'soon'",
        'probe "b": module: unknown module "nope" (known: m)',
    ]


def test_invalid_yaml_gives_the_config_loaders_error(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("probes: [\n")
    with pytest.raises(ConfigError) as exc:
        agent_config(load_config(p), str(p))
    assert exc.value.errors[0].startswith(f"{p}:") and "invalid YAML" in exc.value.errors[0]


# -- sinks -----------------------------------------------------------------------------------------------------


def _verdict(name: str = "p", cause: Cause = Cause.OK) -> Verdict:
    r = ProbeResult(name, ProbeKind.HTTP, "http://x/", "host", 0, 1_000_000, cause == Cause.OK)
    return Verdict(r, cause, None, 1.0, "test", (), (), f"{name}: {cause}")


async def test_a_stuck_sink_drops_and_counts_and_never_blocks_the_caller():
    release = asyncio.Event()
    seen = []

    async def stuck(v: Verdict) -> None:
        seen.append(v)
        await release.wait()

    sink = QueuedSink("stuck", stuck, maxsize=3)
    sink.start()
    try:
        accepted = [sink.offer(_verdict(str(i))) for i in range(10)]
        # answered without the loop running once (the handler has not started): offer never waits for it
        assert accepted == [True] * 3 + [False] * 7 and seen == []
        await asyncio.sleep(0.05)
        assert sink.dropped == 7 and len(seen) == 1
        assert sink.offer(_verdict("x")) is True  # the handler took one: room for one more
    finally:
        release.set()
        await sink.stop()
    assert [v.result.name for v in seen] == ["0", "1", "2", "x"] and sink.written == 4


async def test_a_failing_sink_counts_errors_and_keeps_going(caplog):
    calls = []

    def flaky(v: Verdict) -> None:
        calls.append(v)
        if len(calls) % 2:
            raise OSError("disk full")

    sink = QueuedSink("flaky", flaky, maxsize=10)
    sink.start()
    for i in range(4):
        sink.offer(_verdict(str(i)))
    await sink.stop()
    assert (len(calls), sink.errors, sink.written) == (4, 2, 2)
    assert sum("disk full" in r.message for r in caplog.records) == 1


class BlockingStream(io.StringIO):
    """A log destination whose writes hang (a stuck pipe) until released."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def write(self, s: str) -> int:
        self.gate.wait(30)
        return super().write(s)


async def test_a_stuck_log_does_not_hold_up_probes_or_metrics(tmp_path, upstream, run_agent):
    cfg = write_config(tmp_path / "c.yml", [probe("web", upstream.url("/ok"), interval="0.2s")])
    stream = BlockingStream()
    try:
        a = await run_agent(cfg, log_stream=stream, sink_queue=5)
        first = await a.until(lambda: _count(a, "web", "success", 1), 10, "a first probe")
        await a.until(lambda: _count(a, "web", "success", first + 15), 20, "15 more probes while the log is stuck")
        m = await a.metrics()
        assert samples_named(m, "connprobe_sink_dropped_total", sink="log")[frozenset({("sink", "log")})] > 0
        assert samples_named(m, "connprobe_sink_dropped_total", sink="metrics") == {frozenset({("sink", "metrics")}): 0}
    finally:
        stream.gate.set()
    await asyncio.sleep(0.3)
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert lines and all(x["probe"] == "web" and x["cause"] == "ok" for x in lines)


async def _count(a: Running, probe_name: str, result: str, at_least: float) -> float:
    m = await a.metrics()
    got = samples_named(m, "connprobe_probes_total", probe=probe_name, result=result)
    n = sum(got.values())
    return n if n >= at_least else 0


# -- endpoints -------------------------------------------------------------------------------------------------


async def test_endpoints_metrics_log_and_status_page(tmp_path, upstream, run_agent):
    cfg = write_config(tmp_path / "c.yml", [
        probe("web", upstream.url("/ok")),
        probe("broken", upstream.url("/status/503")),
        probe("later", upstream.url("/ok"), interval="1h", timeout="1s"),
    ])
    log = io.StringIO()
    a = await run_agent(cfg, log_stream=log)
    assert await a.get("/-/healthy") == (200, "connprobe agent is Healthy.\n")
    status, text = await a.get("/-/ready")
    assert status == 200 and "kernel sensor off: disabled with --no-kernel" in text
    await a.until(lambda: _count(a, "broken", "failure", 2), 10, "two failures of the broken probe")
    await a.until(lambda: _count(a, "web", "success", 2), 10, "two successes of web")
    m = await a.metrics()
    assert samples_named(m, "probe_success", probe="web") == {
        frozenset({("probe", "web"), ("target", upstream.url("/ok")), ("source", "host")}): 1.0}
    assert set(samples_named(m, "connprobe_probe_cause", probe="broken")) == {
        frozenset({("probe", "broken"), ("target", upstream.url("/status/503")), ("source", "host"),
                   ("cause", "http_error")})}
    assert samples_named(m, "connprobe_kernel_sensor_up") == {frozenset(): 0.0}
    assert samples_named(m, "connprobe_agent_ready") == {frozenset(): 1.0}
    # declared before its first result: the counters exist at 0 so rate() sees the first failure
    assert samples_named(m, "connprobe_probes_total", probe="later", result="failure") == {
        frozenset({("probe", "later"), ("target", upstream.url("/ok")), ("source", "host"),
                   ("result", "failure")}): 0.0}

    await asyncio.sleep(0.2)
    docs = [json.loads(x) for x in log.getvalue().splitlines()]
    broken = [d for d in docs if d["probe"] == "broken"]
    assert broken and broken[0]["cause"] == "http_error" and broken[0]["sub_cause"] == "http_error/503"
    assert broken[0]["http_status"] == 503 and broken[0]["ok"] is False

    status, page = await a.get("/")
    assert status == 200
    assert page.index('data-probe="broken"') < page.index('data-probe="web"')  # failing first
    assert 'data-cause="http_error"' in page and "http_error/503" in page
    assert '<section class="timeline" data-probe="broken">' in page
    assert "<title>connprobe: 1 failing</title>" in page
    assert f'class="cause" style="background:{colour(Cause.HTTP_ERROR)}">http_error/503<' in page
    for cause, look in CAUSES.items():  # the legend: every cause, in the cause table's colour, with its meaning
        assert (f'<span title="{html.escape(look.meaning)}"><span class="cause" style="background:{look.colour}">'
                f"{cause}</span></span>") in page
    assert "waiting" in page  # "later" has no result yet
    assert "src=" not in page and "<link" not in page  # no external assets
    status, recent = await a.get("/api/recent")
    doc = json.loads(recent)
    assert doc["failing"] == ["broken"] and doc["probes"]["web"][-1]["cause"] == "ok"


async def test_probe_endpoint_is_blackbox_compatible(tmp_path, upstream, run_agent):
    cfg = write_config(tmp_path / "c.yml", [], modules={"http_2xx": {"prober": "http", "timeout": "5s"}})
    a = await run_agent(cfg)
    status, text = await a.get("/probe", params={"target": upstream.url("/ok"), "module": "http_2xx"})
    assert status == 200
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["probe_success"].samples[0].value == 1.0
    assert fams["probe_success"].samples[0].labels == {}  # Prometheus adds target/instance from the scrape
    assert {s.labels["phase"] for s in fams["probe_http_duration_seconds"].samples} == {
        "resolve", "connect", "tls", "processing", "transfer"}
    assert fams["probe_http_status_code"].samples[0].value == 200
    causes = {s.labels["cause"]: s.value for s in fams["connprobe_probe_cause"].samples}
    assert causes["ok"] == 1.0 and sum(causes.values()) == 1.0

    status, text = await a.get("/probe", params={"target": upstream.url("/status/503"), "module": "http_2xx"})
    causes = {s.labels["cause"]: s.value for f in text_string_to_metric_families(text)
              if f.name == "connprobe_probe_cause" for s in f.samples}
    assert status == 200 and causes["http_error"] == 1.0

    # the scrape timeout bounds the probe: 1.5 s - 0.5 s offset - 0.5 s evidence grace = 0.5 s to probe
    t0 = time.monotonic()
    status, text = await a.get("/probe", params={"target": upstream.url("/slow?delay=3"), "module": "http_2xx"},
                               headers={"X-Prometheus-Scrape-Timeout-Seconds": "1.5"})
    took = time.monotonic() - t0
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert status == 200 and fams["probe_success"].samples[0].value == 0.0
    assert 0.5 <= fams["probe_duration_seconds"].samples[0].value < 0.8
    assert took < 1.5

    assert await a.get("/probe", params={"module": "http_2xx"}) == (400, "Target parameter is missing\n")
    assert await a.get("/probe", params={"target": "http://x/", "module": "nope"}) == (400, "Unknown module 'nope'\n")
    status, text = await a.get("/probe", params={"target": "ftp://x/", "module": "http_2xx"})
    assert status == 400 and "http target must be an http:// or https:// URL" in text
    status, text = await a.get("/probe", params={"target": upstream.url("/ok")},
                               headers={"X-Prometheus-Scrape-Timeout-Seconds": "0.8"})
    assert status == 400 and "leaves no time to probe" in text
    status, text = await a.get("/probe", params={"target": upstream.url("/ok"), "debug": "true"})
    assert status == 200 and "rule healthy" in text and "probe_success 1.0" in text


# -- reload ----------------------------------------------------------------------------------------------------


async def test_reload_adds_removes_and_forgets_series(tmp_path, upstream, run_agent):
    cfg = write_config(tmp_path / "c.yml", [probe("a", upstream.url("/ok")), probe("b", upstream.url("/ok"))])
    a = await run_agent(cfg)
    await a.until(lambda: _count(a, "b", "success", 1), 10, "b's first result")
    write_config(cfg, [probe("a", upstream.url("/ok?v=2")), probe("c", upstream.url("/status/503"))])
    status, text = await a.post("/-/reload")
    assert (status, text) == (200, f"reloaded {cfg}: 2 probes (1 added, 1 removed, 1 changed)\n")
    await a.until(lambda: _count(a, "c", "failure", 1), 10, "the new probe's first result")

    async def b_gone() -> bool:
        m = await a.metrics()
        return not any(dict(lbl).get("probe") == "b" for (_, lbl) in m)

    await a.until(b_gone, 10, "every series of the removed probe to disappear")
    # "a" restarts at a random offset within its interval after the reload: wait for its result
    await a.until(lambda: _count(a, "a", "success", 1), 10, "a's result under the new config")
    m = await a.metrics()
    targets = {dict(lbl)["target"] for lbl in samples_named(m, "probe_success", probe="a")}
    assert targets == {upstream.url("/ok")}  # /metrics labels drop the query string: same series
    assert "b" not in a.agent.board.probes()
    assert a.agent.scheduler.scheduled() == {"a", "c"}


async def test_malformed_reload_is_rejected_and_the_old_config_keeps_running(tmp_path, upstream, run_agent):
    cfg = write_config(tmp_path / "c.yml", [probe("a", upstream.url("/ok"), interval="0.2s")])
    a = await run_agent(cfg)
    await a.until(lambda: _count(a, "a", "success", 1), 10, "a first result")
    cfg.write_text("probes:\n  - {name: a, module: missing, target: 'http://x/'}\n")
    status, text = await a.post("/-/reload")
    assert (status, text) == (400, 'failed to reload config: probe "a": module: unknown module "missing" '
                                   "(known: none defined)\n")
    before = await _count(a, "a", "success", 0)
    await a.until(lambda: _count(a, "a", "success", before + 3), 10, "the old config to keep probing")
    m = await a.metrics()
    assert samples_named(m, "connprobe_config_last_reload_successful") == {frozenset(): 0.0}
    assert samples_named(m, "connprobe_config_reloads_total", result="failure") == {
        frozenset({("result", "failure")}): 1.0}
    status, page = await a.get("/")
    assert "reload rejected" in page and "unknown module" in page
    cfg.write_text("probes: [\n")
    status, text = await a.post("/-/reload")
    assert status == 400 and "invalid YAML" in text
    assert a.agent.scheduler.scheduled() == {"a"}


@pytest.mark.parametrize("change", ["removed", "changed"])
async def test_reload_lets_the_probe_in_flight_finish(tmp_path, upstream, run_agent, change):
    slow = probe("slow", upstream.url("/slow?delay=1.0"), interval="3s", timeout="2.5s")
    cfg = write_config(tmp_path / "c.yml", [slow])
    log = io.StringIO()
    a = await run_agent(cfg, log_stream=log)
    await a.until(_async(lambda: upstream.slow_started >= 1), 10, "the slow probe to be in flight")
    assert upstream.slow_finished == 0
    new = [] if change == "removed" else [{**slow, "interval": "4s"}]
    write_config(cfg, new)
    status, _ = await a.post("/-/reload")
    assert status == 200
    await a.until(_async(lambda: '"probe":"slow"' in log.getvalue()), 10, "the in-flight probe's verdict")
    doc = json.loads(log.getvalue().splitlines()[0])
    assert doc["ok"] is True and doc["duration_ms"] >= 1000 and doc["error"] is None
    if change == "changed":  # and it runs on with the new spec
        await a.until(_async(lambda: upstream.slow_started >= 2), 10, "the changed probe to run again")
        assert a.agent.scheduler.scheduled() == {"slow"}
    else:
        await asyncio.sleep(0.2)
        assert a.agent.scheduler.scheduled() == set()
        m = await a.metrics()
        assert not samples_named(m, "probe_success", probe="slow")


def _async(pred):
    async def f():
        return pred()

    return f


async def test_ready_only_once_the_sensor_is_attached_or_definitively_failed(tmp_path, upstream, monkeypatch):
    import connprobe.sensorload

    release = asyncio.Event()

    async def slow_sensor(disabled: bool, netns=None) -> tuple[None, str]:
        await release.wait()
        return None, "BPF unavailable (test)"

    monkeypatch.setattr(connprobe.sensorload, "load_sensor", slow_sensor)
    cfg = write_config(tmp_path / "c.yml", [probe("web", upstream.url("/ok"), interval="0.2s")])
    agent = Agent(cfg, kernel=True)
    await agent.start()
    runner = await start_server(agent, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/-/healthy") as r:
                assert r.status == 200
            async with s.get(base + "/-/ready") as r:
                assert (r.status, await r.text()) == (503, "connprobe agent is not ready: kernel sensor loading.\n")
            await asyncio.sleep(0.5)
            assert upstream.requests == []  # probes wait for the sensor's outcome
            release.set()
            await agent.wait_ready(5)
            async with s.get(base + "/-/ready") as r:
                assert (r.status, await r.text()) == (
                    200, "connprobe agent is Ready (kernel sensor off: BPF unavailable (test)).\n")
            for _ in range(50):
                if agent.board.probes().get("web"):
                    break
                await asyncio.sleep(0.1)
            v = agent.board.probes()["web"][-1].verdict
            assert v.cause == Cause.OK and upstream.requests
    finally:
        await runner.cleanup()
        await agent.stop()


def test_fast_exposition_is_byte_identical_to_prometheus_client():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

    from connprobe.web import exposition_chunks
    from tests.agent.helpers import exposition

    reg = CollectorRegistry()
    g = Gauge("g", "a gauge\nwith a \\ in its help", ["probe", "target"], registry=reg)
    g.labels("a", 'http://x/"quoted"\\back\nslash').set(1.5)
    g.labels("b", "plain").set(float("inf"))
    Counter("c", "a counter", ["cause"], registry=reg).labels("ok").inc(3)
    h = Histogram("h", "a histogram", ["phase"], buckets=(0.1, 1.0), registry=reg)
    h.labels("connect").observe(0.05)
    h.labels("connect").observe(5)
    Info("i", "an info", registry=reg).info({"version": "1"})
    Gauge("empty", "no series yet", ["x"], registry=reg)
    assert exposition(reg) == generate_latest(reg)
    assert exposition(reg) == generate_latest(reg)  # and again, from the label cache
    pieces = list(exposition_chunks(reg, chunk=64))  # /metrics streams it in pieces of whole families
    assert len(pieces) >= 2 and b"".join(pieces) == generate_latest(reg)
