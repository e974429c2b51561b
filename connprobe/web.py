"""The agent's HTTP server (aiohttp): what Prometheus, a browser and an operator talk to.

    GET  /metrics        every probe's metrics, the kernel sensor's and the agent's own health
    GET  /probe          blackbox_exporter-style multi-target probe: ?target=...&module=...[&source=...]
                         [&budget=300ms][&debug=true]; the probe timeout follows the
                         X-Prometheus-Scrape-Timeout-Seconds header (minus 0.5 s and the evidence grace period)
    POST /-/reload       re-read the config file: 200 and a summary, or 400 and the errors (the old config runs on)
    GET  /-/healthy      200 while the process serves
    GET  /-/ready        200 once the kernel sensor is attached or has definitively failed; 503 before
    GET  /               the status page (server-rendered HTML, no external assets)
    GET  /api/recent     the status page's data as JSON
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString
from pydantic import ValidationError

from connprobe.agent import Agent
from connprobe.metrics import format_labels, probe_registry
from connprobe.sinks import verdict_document
from connprobe.statuspage import render_status_page
from correlator.join import GRACE_NS
from correlator.types import Cause
from prober.runner import run_probe
from prober.spec import ProbeSpec, parse_duration

__all__ = ["PROBE_TIMEOUT_OFFSET", "build_app", "exposition", "start_server"]

log = logging.getLogger(__name__)

PROBE_TIMEOUT_OFFSET = 0.5  # as blackbox_exporter: leave the scrape this much time to spare
DEFAULT_SCRAPE_TIMEOUT = 10.0
AGENT_KEY = web.AppKey("agent", Agent)


_LABELS: dict[tuple, str] = {}


def exposition(registry) -> bytes:
    """The text exposition format, byte for byte what `prometheus_client.generate_latest` writes, several
    times faster: the formatted label set of a series is cached (1,000 probes are ~100,000 series that keep
    their labels from scrape to scrape), and `LabelledHistogram` families (most of those series) write their
    own lines. Assumes legacy metric and label names (connprobe's are)."""
    out: list[str] = []
    append = out.append
    cache = _LABELS
    if len(cache) > 1_000_000:  # removed probes' label sets: start over now and then
        cache.clear()
    for metric in registry.collect():
        mname, mtype = metric.name, metric.type
        if mtype == "counter":
            mname += "_total"
        elif mtype == "info":
            mname, mtype = mname + "_info", "gauge"
        elif mtype == "stateset":
            mtype = "gauge"
        elif mtype == "gaugehistogram":
            mtype = "histogram"
        elif mtype == "unknown":
            mtype = "untyped"
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        append(f"# HELP {mname} {doc}\n# TYPE {mname} {mtype}\n")
        rendered = getattr(metric, "exposition_text", None)
        if rendered is not None:  # connprobe.metrics.LabelledHistogram: its lines, without Sample objects
            append(rendered())
            continue
        om: dict[str, list[str]] = {}
        specials = {metric.name + sfx: sfx for sfx in ("_created", "_gsum", "_gcount")}
        for sample in metric.samples:
            labels = sample.labels
            if labels:
                key = tuple(labels.items())
                text = cache.get(key)
                if text is None:
                    text = cache[key] = format_labels(labels.items())
            else:
                text = ""
            line = f"{sample.name}{text} {floatToGoString(sample.value)}"
            if sample.timestamp is not None:
                line += f" {int(float(sample.timestamp) * 1000):d}"
            sfx = specials.get(sample.name)
            if sfx is None:
                append(line + "\n")
            else:
                om.setdefault(sfx, []).append(line + "\n")
        for sfx, lines in sorted(om.items()):
            append(f"# HELP {metric.name}{sfx} {doc}\n# TYPE {metric.name}{sfx} gauge\n")
            out.extend(lines)
    return "".join(out).encode("utf-8")


def _agent(request: web.Request) -> Agent:
    return request.app[AGENT_KEY]


async def metrics(request: web.Request) -> web.Response:
    agent = _agent(request)
    agent.refresh_health()
    # ~100 lines per probe: rendering 1,000 probes takes a while, and must not stall the probes' event loop
    body = await asyncio.to_thread(exposition, agent.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text if text.endswith("\n") else text + "\n")


def probe_timeout(header: str | None, module_timeout: float) -> float:
    """The probe's timeout: the module's, shortened to fit the scrape (blackbox_exporter's rule) and the
    grace period in which late kernel events are collected."""
    scrape = DEFAULT_SCRAPE_TIMEOUT
    if header:
        try:
            scrape = float(header)
        except ValueError:
            raise ValueError(f"X-Prometheus-Scrape-Timeout-Seconds: {header!r} is not a number") from None
    fit = scrape - PROBE_TIMEOUT_OFFSET - GRACE_NS / 1e9
    if fit <= 0:
        raise ValueError(f"scrape timeout {scrape:g}s leaves no time to probe")
    return min(module_timeout, fit)


async def probe(request: web.Request) -> web.Response:
    agent = _agent(request)
    q = request.query
    target = q.get("target")
    if not target:
        return _text(400, "Target parameter is missing")
    module_name = q.get("module", "http_2xx")
    modules = agent.active.config.modules if agent.active else {}
    module = modules.get(module_name)
    if module is None:
        return _text(400, f"Unknown module {module_name!r}")
    try:
        timeout = probe_timeout(request.headers.get("X-Prometheus-Scrape-Timeout-Seconds"), module.timeout)
        budget = parse_duration(q["budget"]) if "budget" in q else None
        spec = ProbeSpec(name=q.get("probe", "probe"), module=module.model_copy(update={"timeout": timeout}),
                         target=target, source=q.get("source", "host"), interval=max(timeout, 1.0))
    except ValidationError as exc:
        err = exc.errors()[0]
        return _text(400, f"{err['msg'].removeprefix('Value error, ')}")
    except ValueError as exc:
        return _text(400, str(exc))
    assert agent.env is not None
    results = await run_probe(spec, agent.env)
    verdicts = await asyncio.gather(*[agent.verdict_for(r, int(budget * 1e9) if budget else None) for r in results])
    # blackbox answers for one probe: with several addresses (ip_policy: all) the first that went wrong speaks
    verdict = next((v for v in verdicts if v.cause != Cause.OK), verdicts[0])
    if q.get("debug") == "true":
        lines = [f"{v.summary} (rule {v.rule}, confidence {v.confidence:.2f})" for v in verdicts]
        for v in verdicts:
            lines += [f"  {f}" for f in v.facts]
        lines += ["", "Metrics that would have been returned:", generate_latest(probe_registry(verdict)).decode()]
        return _text(200, "\n".join(lines))
    return web.Response(body=generate_latest(probe_registry(verdict)), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def reload(request: web.Request) -> web.Response:
    outcome = await _agent(request).reload()
    if not outcome.ok:
        return _text(400, f"failed to reload config: {outcome.message}")
    return _text(200, outcome.message)


async def healthy(request: web.Request) -> web.Response:
    return _text(200, "connprobe agent is Healthy.")


async def ready(request: web.Request) -> web.Response:
    agent = _agent(request)
    if agent.ready:
        return _text(200, f"connprobe agent is Ready (kernel sensor {agent.sensor_state}).")
    return _text(503, f"connprobe agent is not ready: kernel sensor {agent.sensor_state}.")


async def status_page(request: web.Request) -> web.Response:
    html = render_status_page(_agent(request))
    return web.Response(text=html, content_type="text/html", charset="utf-8")


async def recent(request: web.Request) -> web.Response:
    agent = _agent(request)
    probes = {name: [verdict_document(e.verdict, e.wall_time) for e in entries]
              for name, entries in agent.board.probes().items()}
    return web.json_response({"ready": agent.ready, "sensor": agent.sensor_state, "probes": probes,
                              "failing": agent.board.failing()})


def build_app(agent: Agent) -> web.Application:
    app = web.Application()
    app[AGENT_KEY] = agent
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/probe", probe)
    app.router.add_post("/-/reload", reload)
    app.router.add_put("/-/reload", reload)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    app.router.add_get("/", status_page)
    app.router.add_get("/api/recent", recent)
    return app


async def start_server(agent: Agent, host: str = "127.0.0.1", port: int = 9516) -> web.AppRunner:
    """Serve the agent on host:port (port 0: any free port; `runner.addresses` says which)."""
    runner = web.AppRunner(build_app(agent), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
