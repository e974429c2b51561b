"""The agent's HTTP server (aiohttp): what Prometheus, a browser and an operator talk to.

    GET  /metrics        every probe's metrics, the kernel sensor's and the agent's own health
    GET  /probe          blackbox_exporter-style multi-target probe: ?target=...&module=...[&source=...]
                         [&budget=300ms][&debug=true]; the probe timeout follows the
                         X-Prometheus-Scrape-Timeout-Seconds header (minus 0.5 s and the evidence grace period)
    POST /-/reload       re-read the config file and the web config: 200 and a summary, or 400 and the errors
                         (the old config runs on); needs the header `X-Connprobe-Request: 1` or Content-Type
                         application/json, and no foreign Origin (a browser form cannot trigger it)
    GET  /-/healthy      200 while the process serves
    GET  /-/ready        200 once the kernel sensor is attached or has definitively failed; 503 before
    GET  /               the status page (server-rendered HTML, no external assets)
    GET  /api/recent     the status page's data as JSON, a page of probes at a time (?limit=100&offset=0)
    GET  /api/evidence   a peer agent's question: this node's kernel events of a flow between two wall-clock times
                         (connprobe/crossnode.py); peers only (bearer token, basic auth or a verified client
                         certificate), anyone else 401

Security (`WebSecurity`, the `security` middleware; what /probe may do is `connprobe.probepolicy`):
- `--web.config.file` (exporter-toolkit's YAML, `connprobe.webconfig`): TLS, bcrypt basic auth (then every
  endpoint needs it, as exporter-toolkit), response headers; re-read on reload.
- Listening beyond loopback without authentication: a loud warning (log and status page), and /probe,
  /-/reload, /api/recent and the status page answer loopback callers only unless --web.allow-unauthenticated.
- Without authentication, a Host header that is not the listen address, the node's name or loopback is
  refused (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import ipaddress
import json
import logging
import math
import os
import socket
import ssl
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString
from pydantic import ValidationError

from connprobe import timeline
from connprobe.agent import Agent
from connprobe.crossnode import EVIDENCE_PATH, QueryError, parse_query, peer_authenticated
from connprobe.metrics import format_labels, probe_registry
from connprobe.probepolicy import (
    ProbeLimiter,
    TargetRefused,
    check_target,
    connect_guard,
    declared_source,
)
from connprobe.sinks import verdict_document
from connprobe.statuspage import AgentStatus, render_status_page
from connprobe.webconfig import BasicAuth, WebConfig, WebConfigError, load_web_config
from correlator.join import GRACE_NS
from correlator.types import Cause, Verdict
from prober import sockets
from prober.resolve import is_ip
from prober.runner import run_probe
from prober.spec import ProbeSpec, parse_duration
from prober.target import parse_target

__all__ = ["PROBE_TIMEOUT_OFFSET", "REQUEST_HEADER", "WebSecurity", "WebServer", "build_app", "exposition_chunks",
           "start_server"]

log = logging.getLogger(__name__)

PROBE_TIMEOUT_OFFSET = 0.5  # as blackbox_exporter: leave the scrape this much time to spare
DEFAULT_SCRAPE_TIMEOUT = 10.0
AGENT_KEY = web.AppKey("agent", Agent)
REQUEST_HEADER = "X-Connprobe-Request"  # a custom header: a browser sends it only after a CORS preflight


_LABELS: dict[tuple, str] = {}


def exposition_chunks(registry, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The text exposition format, byte for byte what `prometheus_client.generate_latest` writes (joined), several
    times faster: the formatted label set of a series is cached (1,000 probes are ~100,000 series that keep
    their labels from scrape to scrape), and `LabelledHistogram` families (most of those series) write their
    own lines. Assumes legacy metric and label names (connprobe's are). In pieces of about `chunk` bytes (whole
    metric families; connprobe's own large families a few thousand series at a time), so `/metrics` streams:
    at 10,000 probes the text is ~60 MB, and holding it whole (lines, joined, encoded, copied) peaked at ~850 MiB
    RSS; at 1,000 probes families written whole (the duration histogram: ~14,000 lines) left ~5 MiB more RSS
    after the first scrape than pieces do."""
    out: list[str] = []
    append = out.append
    size = 0
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
        if out and size >= chunk:
            yield "".join(out).encode("utf-8")
            out.clear()
            size = 0
        append(f"# HELP {mname} {doc}\n# TYPE {mname} {mtype}\n")
        pieces = getattr(metric, "exposition_pieces", None)
        if pieces is not None:  # connprobe.metrics' own families: their lines, without Sample objects, in pieces
            for text in pieces():
                if out and size >= chunk:
                    yield "".join(out).encode("utf-8")
                    out.clear()
                    size = 0
                append(text)
                size += len(text)
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
            size += len(line) + 1
            if sfx is None:
                append(line + "\n")
            else:
                om.setdefault(sfx, []).append(line + "\n")
        for sfx, lines in sorted(om.items()):
            append(f"# HELP {metric.name}{sfx} {doc}\n# TYPE {metric.name}{sfx} gauge\n")
            out.extend(lines)
    if out:
        yield "".join(out).encode("utf-8")


_gc_lock = threading.Lock()
_gc_holds = 0


def off_loop_render(fn, *args, **kwargs):
    """Run a big render (in a worker thread) with the cycle collector paused. A /metrics render at 10,000
    probes allocates about a million short-lived tracked objects (samples): they drove full collections of
    100-300 ms, which hold the GIL and, when the loop's thread triggers them, the event loop (measured,
    BENCHMARKS.md). The render's objects are acyclic and freed by reference counting when it returns."""
    global _gc_holds
    with _gc_lock:
        _gc_holds += 1
        if _gc_holds == 1:
            gc.disable()
    try:
        return fn(*args, **kwargs)
    finally:
        with _gc_lock:
            _gc_holds -= 1
            if _gc_holds == 0:
                gc.enable()


def _agent(request: web.Request) -> Agent:
    return request.app[AGENT_KEY]


def _text(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=text if text.endswith("\n") else text + "\n", headers=headers)


# -- who may ask what -----------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    h = host.strip("[]").split("%", 1)[0].lower()
    if h == "localhost":
        return True
    try:
        a = ipaddress.ip_address(h)
    except ValueError:
        return False
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return a.is_loopback


def _host_of(header: str) -> str:
    """The host part of a Host header (without the port; IPv6 without brackets), lower case."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def node_names() -> frozenset[str]:
    """The names a browser may legitimately use for this node: its hostname and NODE_NAME (Kubernetes)."""
    names = {socket.gethostname().lower()}
    if os.environ.get("NODE_NAME"):
        names.add(os.environ["NODE_NAME"].lower())
    return frozenset(n for n in names if n)


@dataclass
class WebSecurity:
    """The server's security settings, swapped as a whole on reload (`WebServer.reload`)."""

    listen_host: str
    config: WebConfig = field(default_factory=WebConfig)
    allow_unauthenticated: bool = False
    names: frozenset[str] = field(default_factory=node_names)
    basic: BasicAuth | None = None

    @property
    def exposed(self) -> bool:
        """Listening beyond loopback while nobody has to authenticate."""
        return not _is_loopback(self.listen_host) and not self.config.secured

    @property
    def loopback_only(self) -> bool:
        """Whether /probe, /-/reload, /api/recent and the status page answer loopback callers only."""
        return self.exposed and not self.allow_unauthenticated

    def warning(self) -> str:
        if not self.exposed:
            return ""
        what = ("/probe, /-/reload, /api/recent and the status page answer anyone who can reach it "
                "(--web.allow-unauthenticated)" if self.allow_unauthenticated else
                "/probe, /-/reload, /api/recent and the status page answer loopback callers only")
        return (f"listening on {self.listen_host}, beyond loopback, without authentication (no --web.config.file "
                f"with basic_auth_users or a required client certificate): {what}")


@dataclass
class _State:
    """What the app holds that changes after it started (aiohttp freezes the app's own mapping)."""

    security: WebSecurity
    server: WebServer | None = None


STATE_KEY = web.AppKey("state", _State)
LIMITER_KEY = web.AppKey("probe_limiter", ProbeLimiter)
RESTRICTED = ("/probe", "/-/reload", "/api/recent", "/")
STATE_CHANGING = ("/-/reload",)
# The kubelet's liveness/readiness checks cannot send credentials (short of writing the password into the
# DaemonSet): these two answer without them. They say only "Healthy" / "Ready (kernel sensor STATE)".
HEALTH_CHECKS = ("/-/healthy", "/-/ready")
DEFAULT_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"}


def _refuse(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return _text(status, reason, headers)


def _host_allowed(request: web.Request, sec: WebSecurity) -> bool:
    header = request.headers.get("Host")
    if header is None:
        return True  # HTTP/1.0 without Host: no browser sends that
    host = _host_of(header)
    if _is_loopback(host) or host in sec.names or host == sec.listen_host.lower():
        return True
    sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
    return bool(sock) and host == str(sock[0]).split("%", 1)[0].lower()  # the address the request came in on


async def _authenticated(request: web.Request, basic: BasicAuth) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return False
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return bool(sep) and await basic.check(user, password)


def _foreign_origin(request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    own = f"{request.scheme}://{request.headers.get('Host', '')}".lower()
    return None if origin.lower() == own else origin


def _verified_client_cert(request: web.Request, sec: WebSecurity) -> bool:
    tls = sec.config.tls
    if tls is None or not tls.client_ca_file or request.transport is None:
        return False
    return bool(request.transport.get_extra_info("peercert"))


@web.middleware
async def security(request: web.Request, handler):
    sec = request.app[STATE_KEY].security
    if request.path == EVIDENCE_PATH:  # peers only, whatever else the web config allows
        basic_ok = sec.basic is not None and await _authenticated(request, sec.basic)
        if not peer_authenticated(request.headers, request.app[AGENT_KEY].peer_token, basic_ok=basic_ok,
                                  client_cert=_verified_client_cert(request, sec)):
            return _refuse(401, "a peer agent's credential is required (node.peer_token_file's bearer token, "
                                "the web config's basic auth, or a verified client certificate)",
                           {"WWW-Authenticate": 'Bearer realm="connprobe"'})
        return await handler(request)
    if not sec.config.secured and not _host_allowed(request, sec):
        host = request.headers.get("Host", "")[:100]
        return _refuse(403, f"Host {host!r} is not this agent's address or name (DNS rebinding is refused)")
    if sec.basic is not None and request.path not in HEALTH_CHECKS and not await _authenticated(request, sec.basic):
        return _refuse(401, "authentication required", {"WWW-Authenticate": 'Basic realm="connprobe"'})
    path = request.path
    if sec.loopback_only and path in RESTRICTED and not _is_loopback(request.remote or ""):
        return _refuse(403, f"{path} answers loopback callers only: the agent listens beyond loopback without "
                            "authentication (configure --web.config.file, or --web.allow-unauthenticated)")
    if path in STATE_CHANGING:
        if request.method not in ("POST", "PUT"):
            return _refuse(405, f"{path} takes POST")
        origin = _foreign_origin(request)
        if origin is not None:
            return _refuse(403, f"Origin {origin[:100]!r} is not this agent: cross-site requests are refused")
        ctype = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if request.headers.get(REQUEST_HEADER) is None and ctype != "application/json":
            return _refuse(403, f"{path} needs the header '{REQUEST_HEADER}: 1' (or Content-Type: "
                                "application/json); a browser form cannot send it")
    return await handler(request)


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    for k, v in DEFAULT_HEADERS.items():
        response.headers.setdefault(k, v)
    for k, v in request.app[STATE_KEY].security.config.headers.items():
        response.headers[k] = v


# -- endpoints ------------------------------------------------------------------------------------------------


def accepts_gzip(header: str) -> bool:
    """Whether an Accept-Encoding header allows gzip (`gzip`, `x-gzip` or `*`, without `q=0`)."""
    allowed = False
    for item in header.lower().split(","):
        coding, _, params = item.strip().partition(";")
        coding = coding.strip()
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if coding in ("gzip", "x-gzip"):
            return q > 0
        if coding == "*":
            allowed = q > 0
    return allowed


class _GzipPieces:
    """The exposition pieces gzipped as one stream (each `next` compresses one piece, in the worker thread)."""

    def __init__(self, pieces: Iterator[bytes], level: int = 6):
        self.pieces = pieces
        self.z = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: the gzip container
        self.done = False

    def __iter__(self) -> _GzipPieces:
        return self

    def __next__(self) -> bytes:
        while not self.done:
            piece = next(self.pieces, None)
            if piece is None:
                self.done = True
                return self.z.flush()
            out = self.z.compress(piece)
            if out:
                return out
        raise StopIteration

    def close(self) -> None:
        self.pieces.close()


async def metrics(request: web.Request) -> web.StreamResponse:
    agent = _agent(request)
    agent.refresh_health()
    # ~100 lines per probe: rendered in a worker thread a piece at a time, streamed as the pieces come; gzipped
    # there too when the client asks (Prometheus does: ~10x less to send at 1,000 probes)
    pieces: Any = exposition_chunks(agent.registry)
    headers = {"Content-Type": CONTENT_TYPE_LATEST, "Vary": "Accept-Encoding"}
    if accepts_gzip(request.headers.get("Accept-Encoding", "")):
        pieces = _GzipPieces(pieces)
        headers["Content-Encoding"] = "gzip"
    try:
        piece = await asyncio.to_thread(off_loop_render, next, pieces, None)
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        while piece is not None:
            await response.write(piece)
            piece = await asyncio.to_thread(off_loop_render, next, pieces, None)
        await response.write_eof()
        return response
    finally:
        pieces.close()


def probe_timeout(header: str | None, module_timeout: float) -> float:
    """The probe's timeout: the module's, shortened to fit the scrape (blackbox_exporter's rule) and the
    grace period in which late kernel events are collected."""
    scrape = DEFAULT_SCRAPE_TIMEOUT
    if header:
        try:
            scrape = float(header)
        except ValueError:
            raise ValueError(f"X-Prometheus-Scrape-Timeout-Seconds: {header[:40]!r} is not a number") from None
        if not math.isfinite(scrape):
            raise ValueError(f"X-Prometheus-Scrape-Timeout-Seconds: {header[:40]!r} is not a finite number")
    fit = scrape - PROBE_TIMEOUT_OFFSET - GRACE_NS / 1e9
    if fit <= 0:
        raise ValueError(f"scrape timeout {scrape:g}s leaves no time to probe")
    return min(module_timeout, fit)


def _shown(value: str, n: int = 80) -> str:
    v = value if len(value) <= n else value[:n] + "..."
    return repr(v)


def debug_text(verdicts: list[Verdict], verdict: Verdict) -> str:
    """`/probe?debug=true`: the verdict and its timeline in connprobe's own words. Nothing the target sent is
    echoed: no error detail (a parser's message quotes the bytes it choked on, an SSH banner for one), no
    facts or summary (they embed it), no captured headers."""
    lines = []
    for v in verdicts:
        r = v.result
        label = v.sub_cause or str(v.cause)
        lines.append(f"{r.name}: {label} (rule {v.rule}, confidence {v.confidence:.2f}); "
                     f"{'ok' if r.ok else r.error or 'failed'}" + (f", HTTP {r.http_status}" if r.http_status else "")
                     + (f", address {r.address}" if r.address else ""))
        lines += [f"  {row.offset_ms:+9.1f} ms  {row.text}" for row in timeline.rows(v, {})]
        if r.error_detail:
            lines.append("  (error detail withheld: it can quote bytes the target sent)")
    lines += ["", "Metrics that would have been returned:", generate_latest(probe_registry(verdict)).decode()]
    return "\n".join(lines)


async def probe(request: web.Request) -> web.Response:
    """Validated first (a refusal costs nothing), then admitted by the limiter, then probed."""
    agent = _agent(request)
    q = request.query
    target = q.get("target")
    if not target:
        return _text(400, "Target parameter is missing")
    module_name = q.get("module", "http_2xx")
    modules = agent.active.config.modules if agent.active else {}
    module = modules.get(module_name)
    if module is None:
        return _text(400, f"Unknown module {_shown(module_name)}")
    if agent.env is None:
        return _text(503, "the agent is still starting")
    try:
        source = declared_source(q.get("source", "host"), agent.probe_specs().values())
        timeout = probe_timeout(request.headers.get("X-Prometheus-Scrape-Timeout-Seconds"), module.timeout)
        budget = parse_duration(q["budget"]) if "budget" in q else None
        if budget is not None and not 0 < budget < 86400:
            raise ValueError(f"budget: {_shown(q['budget'])} must be between 0 and 1 day")
        name = q.get("probe", "probe")
        if len(name) > 200 or not name.isprintable():
            raise ValueError("probe: must be a printable name of at most 200 characters")
        spec = ProbeSpec(name=name, module=module.model_copy(update={"timeout": timeout}),
                         target=target, source=source, interval=max(timeout, 1.0))
        host = parse_target(module.prober, target).host
    except ValidationError as exc:
        err = exc.errors()[0]
        return _text(400, f"{err['msg'].removeprefix('Value error, ')}")
    except ValueError as exc:
        return _text(400, str(exc).splitlines()[0] if str(exc) else "invalid request")
    if module.prober == "unix" and target not in module.allowed_targets:
        # a caller-chosen path would reach any local socket the agent can open (a container runtime's...)
        return _text(400, f"target: {_shown(target)}: on /probe a unix socket path must be listed in the "
                          "module's allowed_targets")
    if module.prober == "dns" and host and not is_ip(host):
        # the DNS prober hands a server name to the system's resolver, out of this policy's sight
        return _text(400, f"target: {_shown(host)}: on /probe a DNS server is given by its address")
    addresses = [host] if is_ip(host) else []
    reason = check_target(module, host, addresses) if host else None
    if reason is not None:
        return _text(400, reason)
    limiter = request.app[LIMITER_KEY]
    refused = limiter.try_acquire()
    if refused is not None:
        why, wait = refused
        return _text(429, f"{why}: retry in {wait}s", {"Retry-After": str(wait)})
    try:
        return await _run(request, agent, spec, module, host, budget)
    finally:
        limiter.release()


async def _run(request: web.Request, agent: Agent, spec: ProbeSpec, module, host: str,
               budget: float | None) -> web.Response:
    # a host name is checked where it resolves: before each connect of the probe (redirects included)
    guard = _RecordingGuard(connect_guard(module, host, _nameservers(agent.env, spec.source)))
    token = sockets.connect_guard.set(guard if host else None)
    try:
        results = await run_probe(spec, agent.env)
    finally:
        sockets.connect_guard.reset(token)
    if guard.refused:
        return _text(400, guard.refused.removeprefix("refused by /probe policy: "))
    verdicts = await asyncio.gather(*[agent.verdict_for(r, int(budget * 1e9) if budget else None) for r in results])
    # blackbox answers for one probe: with several addresses (ip_policy: all) the first that went wrong speaks
    verdict = next((v for v in verdicts if v.cause != Cause.OK), verdicts[0])
    if request.query.get("debug") == "true":
        return _text(200, debug_text(list(verdicts), verdict))
    return web.Response(body=generate_latest(probe_registry(verdict)), headers={"Content-Type": CONTENT_TYPE_LATEST})


class _RecordingGuard:
    """A connect guard that remembers why it refused (the answer is then a 400, not a failed probe)."""

    def __init__(self, inner):
        self.inner = inner
        self.refused = ""

    def __call__(self, address: str) -> None:
        try:
            self.inner(address)
        except TargetRefused as exc:
            self.refused = self.refused or exc.reason
            raise


def _nameservers(env, source: str) -> tuple[str, ...]:
    """The nameservers the probe's own resolver asks (exempt from the guard): the environment's override, else
    the resolv.conf that `ip netns exec` would give the source's namespace, else the host's."""
    from prober.resolve import load_resolv_conf

    conf = getattr(env, "resolv_conf", None)
    if conf is None:
        path = "/etc/resolv.conf"
        if source.startswith("netns "):
            candidate = os.path.join("/etc/netns", source[len("netns "):].strip(), "resolv.conf")
            if os.path.exists(candidate):
                path = candidate
        conf = load_resolv_conf(path)
    return tuple(conf.nameservers)


async def reload(request: web.Request) -> web.Response:
    server = request.app[STATE_KEY].server
    if server is None:
        outcome = await _agent(request).reload(trigger="http")
        ok, text = outcome.ok, (outcome.message if outcome.ok else f"failed to reload config: {outcome.message}")
    else:
        ok, text = await server.reload(trigger="http")
    return _text(200 if ok else 400, text)


async def healthy(request: web.Request) -> web.Response:
    return _text(200, "connprobe agent is Healthy.")


async def ready(request: web.Request) -> web.Response:
    agent = _agent(request)
    if agent.ready:
        note = f" {agent.cluster.readiness()}." if getattr(agent, "cluster", None) is not None else ""
        return _text(200, f"connprobe agent is Ready (kernel sensor {agent.sensor_state}).{note}")
    return _text(503, f"connprobe agent is not ready: kernel sensor {agent.sensor_state}.")


async def status_page(request: web.Request) -> web.Response:
    warning = request.app[STATE_KEY].security.warning()
    # off the loop: thousands of rows take a while (statuspage says why this is safe in a thread)
    agent = _agent(request)
    status = AgentStatus(agent.targets.describe, agent.sensor_state, agent.started_at, agent.last_reload_ok,
                         agent.last_reload_error, agent.probe_specs(), agent.board,
                         cluster=getattr(agent, "cluster", None), cluster_notes=getattr(agent, "cluster_notes", ()))
    html = await asyncio.to_thread(off_loop_render, render_status_page, status, warning=warning)
    return web.Response(text=html, content_type="text/html", charset="utf-8")


RECENT_LIMIT = 100
RECENT_MAX = 1000


def _int_param(q, name: str, default: int, lo: int, hi: int) -> int:
    raw = q.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not lo <= int(raw) <= hi:
        raise ValueError(f"{name}: {_shown(raw, 20)} must be a whole number from {lo} to {hi}")
    return int(raw)


def recent_document(names: list[str], snapshot: dict, ready: bool, sensor: str, failing: list[str],
                    total: int, offset: int, limit: int) -> bytes:
    probes = {name: [verdict_document(e.verdict, e.wall_time) for e in snapshot.get(name, ())] for name in names}
    nxt = offset + limit if offset + limit < total else None
    return json.dumps({"ready": ready, "sensor": sensor, "total": total, "offset": offset, "limit": limit,
                       "next_offset": nxt, "probes": probes, "failing": failing}).encode()


async def recent(request: web.Request) -> web.Response:
    """`/api/recent?limit=100&offset=0`: the recent verdicts of one page of probes (by name), at most 1,000
    probes a page; `next_offset` is the next page's offset (null on the last page)."""
    agent = _agent(request)
    try:
        limit = _int_param(request.query, "limit", RECENT_LIMIT, 1, RECENT_MAX)
        offset = _int_param(request.query, "offset", 0, 0, 10**9)
    except ValueError as exc:
        return _text(400, str(exc))
    names = agent.board.names()
    page = names[offset:offset + limit]
    snapshot = agent.board.entries(page)  # copied on the loop; documents are built in a thread
    failing = agent.board.failing()
    body = await asyncio.to_thread(off_loop_render, recent_document, page, snapshot, agent.ready, agent.sensor_state,
                                   failing, len(names), offset, limit)
    return web.Response(body=body, content_type="application/json")


async def evidence(request: web.Request) -> web.Response:
    """A peer's question: the events this node kept of one flow (connprobe/crossnode.py)."""
    received = _agent(request).wall_clock()
    try:
        query = parse_query(request.query)
    except QueryError as exc:
        return _text(400, str(exc))
    try:
        doc = _agent(request).answer_question(query, received)
    except LookupError as exc:
        return _text(503, str(exc))
    return web.json_response(doc)


def build_app(agent: Agent, security_settings: WebSecurity | None = None,
              limiter: ProbeLimiter | None = None) -> web.Application:
    app = web.Application(middlewares=[security], client_max_size=64 * 1024)
    app[AGENT_KEY] = agent
    app[STATE_KEY] = _State(security_settings or WebSecurity("127.0.0.1"))
    app[LIMITER_KEY] = limiter or ProbeLimiter()
    app.on_response_prepare.append(_add_headers)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/probe", probe)
    app.router.add_post("/-/reload", reload)
    app.router.add_put("/-/reload", reload)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    app.router.add_get("/", status_page)
    app.router.add_get("/api/recent", recent)
    app.router.add_get(EVIDENCE_PATH, evidence)
    return app


class _LimiterCollector:
    """`/probe` calls refused with 429, by reason, and the calls running."""

    def __init__(self, limiter: ProbeLimiter):
        self.limiter = limiter

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        refused = CounterMetricFamily("connprobe_probe_requests_refused", "/probe calls answered 429, by reason "
                                      "(concurrency: too many at once; rate: over the rate limit).", labels=["reason"])
        for reason, n in sorted(self.limiter.refused.items()):
            refused.add_metric([reason], n)
        yield refused
        yield GaugeMetricFamily("connprobe_probe_requests_running", "/probe calls being served.",
                                value=self.limiter.running)

    def describe(self):
        return iter(())


class WebServer:
    """The running server: the aiohttp runner, its site and the security settings that a reload swaps."""

    def __init__(self, agent: Agent, runner: web.AppRunner, site: web.TCPSite, app: web.Application,
                 web_config_path: str | None, ssl_context: ssl.SSLContext | None):
        self.agent, self.runner, self.site, self.app = agent, runner, site, app
        self.web_config_path = web_config_path
        self.ssl_context = ssl_context

    @property
    def addresses(self):
        return self.runner.addresses

    @property
    def security(self) -> WebSecurity:
        return self.app[STATE_KEY].security

    async def cleanup(self) -> None:
        await self.runner.cleanup()

    async def reload_web_config(self) -> str:
        """Re-read --web.config.file: "" when applied (or there is none), else why it was not."""
        if not self.web_config_path:
            return ""
        try:
            new = await asyncio.to_thread(load_web_config, self.web_config_path)
        except WebConfigError as exc:
            log.error("reload of the web config rejected, the running one stays: %s", exc)
            return str(exc)
        old = self.security.config
        if (old.tls is None) != (new.tls is None):
            msg = f"{self.web_config_path}: turning TLS on or off needs a restart of the agent"
            log.error("reload of the web config rejected, the running one stays: %s", msg)
            return msg
        if new.tls is not None and self.ssl_context is not None:
            assert old.tls is not None
            if (new.tls.client_auth_type, new.tls.client_ca_file, new.tls.min_version, new.tls.max_version) != (
                    old.tls.client_auth_type, old.tls.client_ca_file, old.tls.min_version, old.tls.max_version):
                msg = (f"{self.web_config_path}: a change of client_auth_type, client_ca_file or the TLS versions "
                       "needs a restart of the agent")
                log.error("reload of the web config rejected, the running one stays: %s", msg)
                return msg
            # the live context: new connections get the renewed certificate at once
            try:  # read again (renewed since the check): an unusable key leaves the running one in place
                new.tls.load_chain(self.ssl_context)
            except WebConfigError as exc:
                msg = f"{self.web_config_path}: {exc}"
                log.error("reload of the web config rejected, the running one stays: %s", msg)
                return msg
            if new.tls.client_ca_file:
                self.ssl_context.load_verify_locations(cafile=new.tls.client_ca_file)
        old_sec = self.security
        self.app[STATE_KEY].security = WebSecurity(old_sec.listen_host, new, old_sec.allow_unauthenticated,
                                             old_sec.names, new.basic_auth())
        log.info("reloaded the web config %s", self.web_config_path)
        if self.security.exposed:
            log.warning("%s", self.security.warning())
        return ""

    async def reload(self, trigger: str = "api") -> tuple[bool, str]:
        """The probe config and the web config, as SIGHUP (trigger "signal") and POST /-/reload ("http") do."""
        outcome = await self.agent.reload(trigger=trigger)
        web_error = await self.reload_web_config()
        text = outcome.message if outcome.ok else f"failed to reload config: {outcome.message}"
        if web_error:
            text += f"\nfailed to reload web config: {web_error}"
        return outcome.ok and not web_error, text


async def start_server(agent: Agent, host: str = "127.0.0.1", port: int = 9516, *,
                       web_config_path: str | None = None, allow_unauthenticated: bool = False,
                       limiter: ProbeLimiter | None = None) -> WebServer:
    """Serve the agent on host:port (port 0: any free port; `server.addresses` says which). WebConfigError
    when the web config file is invalid."""
    config = load_web_config(web_config_path) if web_config_path else WebConfig()
    ssl_context = config.tls.ssl_context() if config.tls is not None else None
    sec = WebSecurity(host, config, allow_unauthenticated, node_names(), config.basic_auth())
    app = build_app(agent, sec, limiter)
    agent.registry.register(_LimiterCollector(app[LIMITER_KEY]))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=ssl_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    server = WebServer(agent, runner, site, app, web_config_path, ssl_context)
    app[STATE_KEY].server = server
    if sec.exposed:
        log.warning("%s", sec.warning())
    return server
