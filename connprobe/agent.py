"""The agent: the scheduled health checks, running continuously (`connprobe agent`, whose command line is
`connprobe/commands/agent.py`; the demo runs one too).

    Scheduler ──ProbeResult──► pipeline: KernelWatch.collect() ─► correlate() ─► Verdict
                                                                                     │ offer() (never blocks)
                                           ┌──────────────┬──────────────┬──────────┘
                                      QueuedSink      QueuedSink     QueuedSink
                                      metrics         json log       status board      (web.py serves them)

- Start-up: the web server listens first (`/-/healthy` answers at once); the kernel sensor loads in the
  background; the scheduler starts once the sensor is attached or has definitively failed, and from then
  on `/-/ready` says ready. Without the sensor (`--no-kernel`, no privileges, no BPF) probes still run and
  their verdicts say "no kernel evidence".
- Every sink has a bounded queue; a slow sink drops (and counts, `connprobe_sink_dropped_total{sink}`)
  its own verdicts and never holds up the probes or the other sinks.
- Reload (SIGHUP or `POST /-/reload`): everything the new file needs is built first (parsed in full, its
  kernel-side retention worked out, its source namespaces opened); if any of it fails, the error is logged
  as one line and returned, and the running configuration stays — all of it. Otherwise the swap is made
  (a step that fails there is undone, so a reload applies all of the new config or none), probes that are
  gone or changed are retired once their run in flight has finished (its result is still delivered), new
  and changed ones start, and the series of removed probes (or of a probe's old target) disappear from `/metrics`.

Latency budgets: a probe's `budget:` (or its module's `budget:`) is a duration; a probe slower than its
budget gets a verdict even when it succeeded (`ProbeSpec.effective_budget`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from bpf.clock import sample_clock_offset
from bpf.types import ClockOffset, KernelEvent
from connprobe import sensorload
from connprobe.config import Config, ConfigError, NodeSettings
from connprobe.crossnode import (
    FirstOf,
    PeerAsker,
    PeerConfigError,
    Query,
    Resolver,
    StaticPeers,
    answer_document,
    local_window,
    read_token,
)
from connprobe.kernelwatch import KEEP_NS, KernelWatch
from connprobe.metrics import Metrics, clean_target
from connprobe.privileges import Privileges
from connprobe.sinks import JsonLinesWriter, QueuedSink, StatusBoard
from connprobe.targets import ConfigFile, TargetSource
from correlator import correlate
from correlator.crossnode import wants_remote
from correlator.join import GRACE_NS
from correlator.types import Verdict
from prober.env import ProbeEnv
from prober.scheduler import Scheduler
from prober.sockets import SourceError, open_source
from prober.source import parse_source
from prober.spec import ProbeSpec
from prober.types import ProbeKind, ProbeResult, Proto

__all__ = ["Agent", "AgentConfig", "agent_config"]

log = logging.getLogger("connprobe.agent")

ORDER_SLACK_NS = 1_000_000_000  # kernel events arrive in timestamp order up to this much reordering


# -- configuration -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentConfig:
    config: Config
    budgets: dict[str, float] = field(default_factory=dict)  # probe name -> latency budget, seconds
    path: str = "<config>"

    @functools.cached_property
    def probes(self) -> dict[str, ProbeSpec]:
        return {p.name: p for p in self.config.probes}

    def budget_ns(self, probe: str) -> int | None:
        b = self.budgets.get(probe)
        return int(b * 1e9) if b is not None else None


def agent_config(config: Config, filename: str = "<config>") -> AgentConfig:
    """A config as the agent runs it: with each probe's latency budget."""
    budgets = {p.name: p.effective_budget for p in config.probes if p.effective_budget is not None}
    return AgentConfig(config, budgets, filename)


# -- kernel evidence indexed by port -------------------------------------------------------------------------


class IndexedKernelWatch(KernelWatch):
    """`KernelWatch` for many probes at once: events are kept per (protocol, port) of either endpoint, so a
    probe's collection looks only at the events of its own ports, not at every event of its time window
    (at 100 probes/s that window holds thousands of other probes' events). What `collect` returns is a
    superset of what `correlator.join` keeps (it matches the probe's local endpoints on either side), so the
    verdicts are the same as with `KernelWatch`."""

    def __init__(self, sensor=None, unavailable_reason: str = "", keep_ns: int = KEEP_NS,
                 retention_ns: Callable[[str], int | None] | None = None):
        super().__init__(sensor, unavailable_reason, lease_ns=keep_ns)
        self.keep_ns = keep_ns  # until a port's probe has been collected (then: that probe's own retention)
        self.retention_ns = retention_ns or (lambda name: None)
        self._by_port: dict[tuple[str, int], collections.deque[KernelEvent]] = {}
        self._keep: dict[tuple[str, int], int] = {}  # port -> retention of the probe that used it last
        self._next_prune_ns = 0

    def _add(self, ev: KernelEvent) -> None:
        self.events_seen += 1
        for key in {(ev.proto, ev.sport), (ev.proto, ev.dport)}:
            dq = self._by_port.get(key)
            if dq is None:
                dq = self._by_port[key] = collections.deque()
            dq.append(ev)
        if ev.ts_ns >= self._next_prune_ns:
            self._prune(ev.ts_ns - self.keep_ns)
            self._next_prune_ns = ev.ts_ns + 1_000_000_000

    def _prune(self, horizon: int) -> None:
        """Drop events older than their port's retention: the retention of the probe that used the port (its
        timeout and grace periods), once that probe was collected; `keep_ns` before."""
        now = horizon + self.keep_ns
        keep = self._keep
        for key in list(self._by_port):
            dq = self._by_port[key]
            h = now - keep[key] if key in keep else horizon
            while dq and dq[0].ts_ns < h:
                dq.popleft()
            if not dq:
                del self._by_port[key]
                keep.pop(key, None)

    def events_of_port(self, proto: str, port: int, lo: int, hi: int) -> list[KernelEvent]:
        """The kept events with this port on either side between lo and hi (CLOCK_MONOTONIC): a peer's question."""
        if self.sensor is not None:
            for ev in self.sensor.drain():
                self._add(ev)
        return [e for e in self._by_port.get((proto, port), ()) if lo <= e.ts_ns <= hi]

    def _window(self, result: ProbeResult, lo: int, hi: int) -> list[KernelEvent]:
        """Only the events of the result's own ports (a full scan of the window cost ms per probe)."""
        ports = result.local_ports()
        seen: dict[int, KernelEvent] = {}
        for key in ports:
            for e in reversed(self._by_port.get(key, ())):
                if e.ts_ns < lo - ORDER_SLACK_NS:
                    break
                if lo <= e.ts_ns <= hi:
                    seen[id(e)] = e
        keep = self.retention_ns(result.name)
        if keep is not None:
            for key in ports:
                if key in self._by_port:
                    self._keep[key] = keep
        return sorted(seen.values(), key=lambda e: e.ts_ns)


# -- the agent -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReloadOutcome:
    ok: bool
    message: str
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()


@dataclass
class _ReloadPlan:
    """What a reload changes, worked out before anything running is touched."""

    old: AgentConfig
    new: AgentConfig
    removed: tuple[str, ...]
    added: tuple[str, ...]
    changed: tuple[str, ...]
    keep_ns: int = 0
    resolver: StaticPeers | None = None

    @property
    def before(self) -> dict[str, ProbeSpec]:
        return self.old.probes

    @property
    def after(self) -> dict[str, ProbeSpec]:
        return self.new.probes

    @classmethod
    def between(cls, old: AgentConfig | None, new: AgentConfig) -> _ReloadPlan:
        assert old is not None
        before, after = old.probes, new.probes
        return cls(old, new,
                   removed=tuple(n for n in before if n not in after),
                   added=tuple(n for n in after if n not in before),
                   changed=tuple(n for n in after if n in before and after[n] != before[n]))


def source_label(source: str) -> str:
    """The `source` a probe's results (and so its metrics) carry: "host", the namespace's name, or the
    /proc/PID/ns/net path (`prober.source.SourceSpec.label`)."""
    return parse_source(source).label


def _labels_of(spec: ProbeSpec) -> tuple[str, str]:
    return clean_target(spec.target), source_label(spec.source)


class _AgentCollector:
    """The agent's own counters: sinks, scheduler, reloads."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def collect(self) -> Iterator[Any]:
        a = self.agent
        dropped = CounterMetricFamily("connprobe_sink_dropped", "Verdicts a sink dropped because its queue was "
                                      "full (the sink was too slow; the probes were not held up).", labels=["sink"])
        errors = CounterMetricFamily("connprobe_sink_errors", "Verdicts a sink failed to write.", labels=["sink"])
        depth = GaugeMetricFamily("connprobe_sink_queue_length", "Verdicts waiting in a sink's queue.",
                                  labels=["sink"])
        for s in a.sinks:
            dropped.add_metric([s.name], s.dropped)
            errors.add_metric([s.name], s.errors)
            depth.add_metric([s.name], s.queue.qsize())
        yield dropped
        yield errors
        yield depth
        stats = a.scheduler.stats if a.scheduler is not None else None
        yield CounterMetricFamily("connprobe_scheduler_skipped_ticks", "Ticks skipped because the previous run "
                                  "of the probe was still going.", value=stats.skipped_ticks if stats else 0)
        yield CounterMetricFamily("connprobe_results_dropped", "Probe results dropped because the pipeline's "
                                  "queue was full.", value=(stats.dropped_results if stats else 0) + a.results_dropped)
        yield CounterMetricFamily("connprobe_probe_overruns", "Probe runs still going past their deadline (plus a "
                                  "margin): ended by a guard and reported as error kind internal.",
                                  value=a.env.overruns if a.env is not None else 0)
        ev = a.kernel_watch
        yield CounterMetricFamily("connprobe_watch_list_full", "Probe ports the kernel watch list had no room for: "
                                  "those probes ran without kernel evidence (\"watch list full\").",
                                  value=ev.watch_full if ev is not None else 0)
        yield CounterMetricFamily("connprobe_watch_list_expired", "Watched ports released by their lease because no "
                                  "result of theirs was collected (cancelled or overrun probes).",
                                  value=ev.expired if ev is not None else 0)
        yield GaugeMetricFamily("connprobe_probes_configured", "Probes in the running configuration.",
                                value=len(a.active.probes) if a.active else 0)
        reloads = CounterMetricFamily("connprobe_config_reloads", "Configuration reloads by result.",
                                      labels=["result"])
        reloads.add_metric(["success"], a.reloads["success"])
        reloads.add_metric(["failure"], a.reloads["failure"])
        yield reloads
        by_trigger = CounterMetricFamily("connprobe_config_reloads_by_trigger", "Configuration reloads by what "
                                         "asked for them (signal: SIGHUP, http: POST /-/reload, watch: the file "
                                         "changed) and result.", labels=["trigger", "result"])
        for key in sorted({*RELOAD_SERIES, *a.reloads_by_trigger}):
            by_trigger.add_metric(list(key), a.reloads_by_trigger[key])
        yield by_trigger
        yield GaugeMetricFamily("connprobe_config_last_reload_successful", "1 when the last reload succeeded "
                                "(or none was attempted).", value=1.0 if a.last_reload_ok else 0.0)
        blocked = HistogramMetricFamily("connprobe_event_loop_blocked_seconds", "How late the event loop woke up "
                                        "because its own callbacks held it (sampled every 20 ms; time the OS did "
                                        "not run the process is not counted).")
        blocked.add_metric([], a.loop_blocked.buckets(), a.loop_blocked.sum)
        yield blocked
        errors = CounterMetricFamily("connprobe_internal_errors", "Unexpected exceptions while running or "
                                     "correlating a probe (a bug); each probe's traceback is logged once per "
                                     "window, the rest only counted.", labels=["where"])
        for where in ("runner", "scheduler", "agent"):
            errors.add_metric([where], a.tracebacks.counts[where])
        yield errors
        asked = CounterMetricFamily("connprobe_peer_questions", "Questions this agent asked peer agents about a flow "
                                    "(cross-node evidence), by result: answered, or unavailable (unreachable, too "
                                    "slow for the deadline, refused, an invalid answer).", labels=["result"])
        ask = a.asker
        asked.add_metric(["answered"], (ask.asked - ask.failed) if ask else 0)
        asked.add_metric(["unavailable"], ask.failed if ask else 0)
        yield asked
        yield CounterMetricFamily("connprobe_peer_questions_answered", "Questions of peer agents this agent "
                                  "answered (GET /api/evidence).", value=a.questions_answered)
        w = a.kernel_watch
        sensor = w.sensor if w is not None else None
        yield CounterMetricFamily("connprobe_kernel_events_foreign", "Watched events the kernel sensor left out "
                                  "because they happened in a namespace that is not this node's (node.netns).",
                                  value=sensor.foreign_events if sensor is not None and not sensor.closed else 0)
        yield GaugeMetricFamily("connprobe_agent_ready", "1 once the kernel sensor is attached or has "
                                "definitively failed and the probes run.", value=1.0 if a.ready else 0.0)

    def describe(self) -> Iterator[Any]:
        return iter(())


RELOAD_SERIES = tuple((t, r) for t in ("signal", "http", "watch") for r in ("success", "failure"))
LOOP_BLOCKED_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _Histogram:
    """Cumulative bucket counts of observations (for a custom collector)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        for i, b in enumerate(self.bounds):
            if value <= b:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for b, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += n
            out.append((b, total))
        return out


class TracebackThrottle(logging.Filter):
    """Lets a failing probe's traceback through once per probe and `window` seconds; the others are counted
    (`connprobe_internal_errors_total{where}`) and dropped. Installed on the loggers that log a probe's
    unexpected exception (the prober's runner and scheduler, the agent's correlation step); every such
    message names the probe as its first argument."""

    LOGGERS = ("prober.runner", "prober.scheduler", "connprobe.agent")

    def __init__(self, window: float = 600.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.window = window
        self.clock = clock
        self.counts: collections.Counter[str] = collections.Counter()  # where -> errors seen
        self.suppressed = 0
        self._last: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or not isinstance(record.args, tuple) or not record.args:
            return True
        where = record.name.rsplit(".", 1)[-1]
        self.counts[where] += 1
        key = (record.name, str(record.args[0]))
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.window:
            self.suppressed += 1
            return False
        if len(self._last) > 100_000:
            self._last.clear()
        self._last[key] = now
        record.msg = f"{record.msg} (traceback shown once per probe every {self.window:g}s; later ones counted)"
        return True

    def install(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)

    def remove(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


class Agent:
    """The running agent. `await start()`, then `await stop()`; `await reload()` reads its target source again
    (the config file at `config_path`, or `targets=`: a `connprobe.targets.TargetSource`)."""

    def __init__(
        self,
        config_path: str | Path | None = None,
        *,
        kernel: bool = True,
        log_stream: IO[str] | None = None,
        registry: CollectorRegistry | None = None,
        sink_queue: int = 1000,
        board_size: int = 20,
        concurrency: int = 256,
        stop_grace: float = 5.0,
        drop_capabilities: bool = False,
        watch_config: bool = False,
        watch_options: dict[str, Any] | None = None,
        targets: TargetSource | None = None,
        cluster: Any = None,
        wall_clock: Callable[[], int] = time.time_ns,
    ):
        self.config_path = Path(config_path) if config_path is not None else None
        self.wall_clock = wall_clock  # CLOCK_REALTIME in ns (a test gives a skewed one)
        self.node = NodeSettings()
        self.node_name = ""
        self.node_netns: frozenset[int] | None = None
        self.peer_token: bytes | None = None
        self.asker: PeerAsker | None = None  # asks peer agents when local evidence does not decide
        self.static_peers = StaticPeers(())  # `peers:` of the config
        self.cluster_peers: Resolver | None = None  # --kubernetes: the cluster's agents (after `peers:`)
        self.questions_answered = 0
        self.kernel = kernel
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.board = StatusBoard(board_size)
        self.sinks: list[QueuedSink] = [
            QueuedSink("metrics", self._observe_metrics, sink_queue),
            QueuedSink("status", self.board, sink_queue),
        ]
        if log_stream is not None:
            self.sinks.append(QueuedSink("log", JsonLinesWriter(log_stream), sink_queue, threaded=True))
        self.concurrency = concurrency
        self.stop_grace = stop_grace
        self.active: AgentConfig | None = None
        self.kernel_watch: KernelWatch | None = None
        self.env: ProbeEnv | None = None
        self.scheduler: Scheduler | None = None
        self.results: asyncio.Queue[ProbeResult] = asyncio.Queue(10_000)
        self.results_dropped = 0
        self.sensor_state = "loading"
        self.ready = False
        self.started_at = time.time()
        self.reloads = {"success": 0, "failure": 0}
        # (trigger, result) -> reloads: signal (SIGHUP), http (POST /-/reload), watch (the file changed), api
        self.reloads_by_trigger: collections.Counter[tuple[str, str]] = collections.Counter()
        # where the probes come from (connprobe/targets/): the config file unless another source is given
        if targets is None:
            if self.config_path is None:
                raise ValueError("an agent needs a config file or a target source")
            targets = ConfigFile(self.config_path, watch=watch_config, watch_options=watch_options)
        self.targets: TargetSource = targets
        self.last_reload_ok = True
        self.last_reload_error = ""
        self.last_reload_time: float | None = None
        self.verdicts_total = 0
        self._ready_event = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._handling: set[asyncio.Task] = set()
        self._main: list[asyncio.Task] = []
        self._lag = 0.0
        self.tracebacks = TracebackThrottle()
        self.loop_blocked = _Histogram(LOOP_BLOCKED_BUCKETS)
        self.registry.register(_AgentCollector(self))
        self.privileges = Privileges(drop_capabilities)  # on: only what the probes need, from start-up
        self.registry.register(self.privileges)
        # connprobe.cluster.view.ClusterView (--kubernetes): names pods/services/nodes in verdicts; None: off
        self.cluster = cluster
        if cluster is not None:
            self.registry.register(cluster)

    def add_sink(self, name: str, handler: Callable[[Verdict], Any], *, queue: int = 1000,
                 threaded: bool = False) -> QueuedSink:
        """Offer every verdict to `handler` too, through its own bounded queue (before `start`)."""
        if self._main:
            raise RuntimeError("sinks are added before the agent starts")
        sink = QueuedSink(name, handler, queue, threaded=threaded)
        self.sinks.append(sink)
        return sink

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the configuration (ConfigError if invalid), start the sinks and begin loading the sensor."""
        await self.targets.start()  # before the load: a change in between is seen by its watch
        self.active = self._load_targets()
        self._setup_node(self.active.config)
        # before the agent listens; the sensor loads on one thread. What a target source may add later (pods'
        # namespaces of a cluster source) keeps its capability from the start.
        self.privileges.begin((*self.active.config.probes, *self._privilege_standins()))
        self.tracebacks.install()
        self._declare(self.active.config.probes)
        for s in self.sinks:
            s.start()
        self.env = ProbeEnv(on_local_port=self._on_local_port)
        self._main.append(asyncio.create_task(self._bring_up(), name="connprobe-agent-bring-up"))
        self._main.append(asyncio.create_task(self._pipeline(), name="connprobe-agent-pipeline"))
        self._main.append(asyncio.create_task(self._watch_loop(), name="connprobe-agent-loop-lag"))
        self._main.append(asyncio.create_task(self.targets.watch(functools.partial(self.reload, trigger="watch")),
                                              name="connprobe-agent-config-watch"))

    def _setup_node(self, config: Config) -> None:
        """This node's name, namespaces, peer token and peers (`node:`, `peers:`); ConfigError naming the field."""
        import os
        import socket

        node = config.node
        self.node = node
        self.node_name = node.name or os.environ.get("NODE_NAME") or socket.gethostname() or "node"
        try:
            token_file = node.peer_token_file
            self.peer_token = read_token(token_file, "node: peer_token_file") if token_file else None
            self.node_netns = None if node.netns is None else frozenset(netns_inode(n) for n in node.netns)
            resolver = StaticPeers.from_settings(config.peers)
        except PeerConfigError as exc:
            raise ConfigError([str(exc)]) from None
        self.static_peers = resolver
        resolver = self._resolver(resolver)
        self.asker = PeerAsker(resolver, wall=self.wall_clock, grace_ns=GRACE_NS) if resolver else None

    def _resolver(self, static: StaticPeers) -> Any:
        """`peers:` first, then the cluster's resolver when there is one (--kubernetes)."""
        return FirstOf(static, self.cluster_peers) if self.cluster_peers is not None else static

    def set_cluster_resolver(self, resolver: Resolver) -> None:
        """Also ask the peers `resolver` finds (--kubernetes: dest IP → pod → node → that node's agent), after the
        `peers:` of the config, which win where they cover an address (also after a reload)."""
        self.cluster_peers = resolver
        self.set_resolver(self._resolver(self.static_peers))

    def set_resolver(self, resolver: Resolver) -> None:
        """Ask peers found by `resolver` (e.g. a Kubernetes lookup: dest IP → pod → node → agent)."""
        if self.asker is None:
            self.asker = PeerAsker(resolver, wall=self.wall_clock, grace_ns=GRACE_NS)
        else:
            self.asker.resolver = resolver

    def clock_offset(self) -> ClockOffset:
        """CLOCK_MONOTONIC → this agent's wall clock, sampled now."""
        return sample_clock_offset(realtime=self.wall_clock)

    def answer_question(self, query: Query, received_ns: int) -> dict[str, Any]:
        """A peer's question about a flow (GET /api/evidence); LookupError when this agent has no kernel evidence."""
        from connprobe.netnames import netns_names

        watch = self.kernel_watch
        if not isinstance(watch, IndexedKernelWatch) or watch.sensor is None:
            raise LookupError(f"no kernel evidence on this node ({self.sensor_state})")
        offset = self.clock_offset()
        lo, hi = local_window(query, offset, received_ns)
        events = watch.events_of_port(query.proto, query.sport, lo, hi)
        watched = watch.sensor.watched()
        watching = (query.proto, query.dport) in watched or (query.proto, query.sport) in watched
        self.questions_answered += 1
        return answer_document(query, events, node=self.node_name, offset=offset, received_ns=received_ns,
                               watching=watching, netns_names=netns_names(), wall=self.wall_clock)

    async def wait_ready(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._ready_event.wait(), timeout)

    async def _bring_up(self) -> None:
        sensor, reason = await sensorload.load_sensor(disabled=not self.kernel, netns=self.node_netns)
        watch = IndexedKernelWatch(sensor, reason, keep_ns=self._keep_ns(self.active), retention_ns=self._retention_ns)
        await watch.start()  # its pump, stopped by `stop`
        for item in self.node.watch if sensor is not None else ():  # ports peers ask about, watched at all times
            proto, _, port = item.partition("/")
            try:
                sensor.watch(proto, int(port))
            except Exception as exc:
                log.warning("node: watch: %s not watched: %s", item, exc)
        self.kernel_watch = watch
        if watch.available:
            self.sensor_state = "attached"
            log.info("kernel sensor attached")
        else:
            self.sensor_state = f"off: {watch.unavailable_reason}"
            log.warning("kernel evidence is off: %s; verdicts will say so", watch.unavailable_reason)
        assert self.active is not None and self.env is not None
        await self.privileges.end()  # the sensor is attached: its loading thread drops and ends
        self.scheduler = Scheduler(self.active.config.probes, self.env, concurrency=self.concurrency,
                                   queue=self.results, on_dropped=watch.release)
        await self.scheduler.start()
        self.ready = True
        self._ready_event.set()
        log.info("running %d probes from %s", len(self.active.config.probes), self.targets.describe)

    async def stop(self) -> None:
        for t in self._main:
            if t.get_name() != "connprobe-agent-pipeline":
                t.cancel()
        await asyncio.gather(*[t for t in self._main if t.get_name() != "connprobe-agent-pipeline"],
                             return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.scheduler is not None:
            await self.scheduler.stop(grace=self.stop_grace)
        # let the results already queued become verdicts
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain_results(), 3.0)
        for t in self._main:
            t.cancel()
        await asyncio.gather(*self._main, return_exceptions=True)
        for t in list(self._handling):
            t.cancel()
        await asyncio.gather(*self._handling, return_exceptions=True)
        for s in self.sinks:
            await s.stop()
        if self.env is not None:
            await self.env.aclose()
        if self.asker is not None:
            await self.asker.close()
        if self.kernel_watch is not None:
            await self.kernel_watch.stop()
            if self.kernel_watch.sensor is not None:
                self.kernel_watch.sensor.close()
        self.tracebacks.remove()

    async def _drain_results(self) -> None:
        while not self.results.empty() or self._handling:
            await asyncio.sleep(0.02)

    # -- the pipeline ---------------------------------------------------------------------------------------

    def _on_local_port(self, proto: Proto, port: int) -> None:
        if self.kernel_watch is not None:
            self.kernel_watch.on_local_port(proto, port)

    async def _pipeline(self) -> None:
        while True:
            result = await self.results.get()
            t = asyncio.create_task(self._handle(result), name=f"connprobe-verdict-{result.name}")
            self._handling.add(t)
            t.add_done_callback(self._handling.discard)

    async def verdict_for(self, result: ProbeResult, budget_ns: int | None) -> Verdict:
        """Collect the probe window's kernel events (after the grace period) and correlate; when this node's
        evidence does not decide, ask the destination's agent (`peers:`) and correlate again with its answer."""
        return (await self.verdicts_for(result, budget_ns))[1]

    async def verdicts_for(self, result: ProbeResult, budget_ns: int | None,
                           seen: dict[str, Any] | None = None) -> tuple[Verdict, Verdict]:
        """(the verdict on this node's evidence alone, the verdict after asking peers — the same when none was
        asked). A peer's question ends by its deadline, whatever the peer does. `seen` (the lab's recordings)
        gets the window's events and coverage."""
        ev = self.kernel_watch
        if ev is None:
            ev = KernelWatch(None, "kernel sensor still loading")
        events, status = await ev.collect(result)
        if seen is not None:
            seen.update(events=events, coverage=status)
        alone = correlate(result, events, budget_ns=budget_ns, coverage=status)
        if self.asker is None or not wants_remote(alone):
            return alone, alone
        remote = await self.asker.ask(result, self.clock_offset())
        if not remote:
            return alone, alone
        return alone, correlate(result, events, budget_ns=budget_ns, coverage=status, remote=remote)

    async def _handle(self, result: ProbeResult) -> None:
        try:
            budget = self.active.budget_ns(result.name) if self.active else None
            verdict = await self.verdict_for(result, budget)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("correlating %s failed", result.name)
            return
        if self.cluster is not None:
            try:
                verdict = self.cluster.name_verdict(verdict)
                self.cluster.observe(verdict)
            except Exception:  # naming is a bonus: the verdict goes out with bare addresses
                log.exception("naming pods in the verdict of %s failed", result.name)
        self.verdicts_total += 1
        for s in self.sinks:
            s.offer(verdict)

    def _current(self, result: ProbeResult) -> bool:
        """Whether a result belongs to a probe of the running configuration (same target and source)."""
        spec = self.active.probes.get(result.name) if self.active else None
        return spec is not None and (clean_target(result.target), result.source) == _labels_of(spec)

    def _observe_metrics(self, v: Verdict) -> None:
        if self._current(v.result):  # a late result of a removed or re-targeted probe must not revive its series
            self.metrics.observe(v)

    async def _watch_loop(self) -> None:
        """Every 20 ms: how late the loop woke up (`connprobe_event_loop_lag_seconds`), and how much of that the
        loop itself caused (`connprobe_event_loop_blocked_seconds`): the lateness, but no more than the CPU time
        the loop's thread used meanwhile, so a process the OS did not schedule is not mistaken for a callback
        that held the loop."""
        interval = 0.02
        loop = asyncio.get_running_loop()
        while True:
            t0, c0 = loop.time(), time.thread_time()
            await asyncio.sleep(interval)
            self._lag = max(0.0, loop.time() - t0 - interval)
            self.loop_blocked.observe(min(self._lag, time.thread_time() - c0))
            self.metrics.observe_loop_lag(self._lag)

    def refresh_health(self) -> None:
        """Mirror the sensor's counters and hook status into the metrics (called on each scrape)."""
        ev = self.kernel_watch
        sensor = ev.sensor if ev is not None else None
        if sensor is None or sensor.closed:
            self.metrics.observe_sensor(None)
            return
        try:
            self.metrics.observe_sensor(sensor.counters(), sensor.lost_events, sensor.status())
        except Exception as exc:  # a closed or broken sensor must not break /metrics
            log.warning("reading the sensor's counters failed: %s", exc)
            self.metrics.observe_sensor(None)

    # -- reload ---------------------------------------------------------------------------------------------

    @staticmethod
    def _keep_ns(cfg: AgentConfig | None) -> int:
        """How long kernel events are kept: the longest probe plus room for its grace period and a late collection."""
        longest = max((p.effective_timeout for p in cfg.config.probes), default=5.0) if cfg else 5.0
        return int((longest + 15.0) * 1e9)

    def _retention_ns(self, probe: str) -> int | None:
        """How long the kernel events of a probe's ports are kept once it was collected: its own timeout, two
        grace periods and the reordering slack (the other addresses of an `ip_policy: all` run are collected
        up to a timeout later); None for a probe outside the configuration (/probe): the longest."""
        spec = self.active.probes.get(probe) if self.active else None
        if spec is None:
            return None
        return int(spec.effective_timeout * 1e9) + 2 * GRACE_NS + ORDER_SLACK_NS

    def _declare(self, probes: Iterable[ProbeSpec]) -> None:
        for p in probes:
            self.metrics.declare(p.name, p.target, source_label(p.source), kind=ProbeKind(p.module.prober),
                                 interval_s=p.interval, labels=p.labels.items(),
                                 phase_histograms=p.module.phase_histograms)

    def spawn(self, coro: Any, name: str) -> None:
        """Run a task that lives as long as the agent (cancelled by `stop`)."""
        t = asyncio.create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def reload(self, trigger: str = "api") -> ReloadOutcome:
        """Re-read the config file and apply all of it or none of it. `trigger` says who asked (signal, http,
        watch, api), for `connprobe_config_reloads_by_trigger_total`.

        Everything the new config needs is built first, while the running configuration is untouched: the
        parsed config (off the loop), the kernel-side retention it needs, its source namespaces opened (off
        the loop). Only when all of that succeeded is it swapped in; a step that fails during the swap is
        undone, so a failed reload leaves the old configuration fully in place. Never raises: every failure
        is one logged line and a `ReloadOutcome(False, ...)` (POST /-/reload answers 400 with it).
        """
        async with self._reload_lock:
            outcome = await self._reload()
            self.reloads_by_trigger[(trigger, "success" if outcome.ok else "failure")] += 1
            return outcome

    async def _reload(self) -> ReloadOutcome:
        self.last_reload_time = time.time()
        try:
            new = await asyncio.to_thread(self._load_targets)
            self.privileges.check(new.config.probes)  # a capability dropped at start-up is not coming back
            try:
                resolver = StaticPeers.from_settings(new.config.peers)
            except PeerConfigError as exc:
                raise ConfigError([str(exc)]) from None
            if new.config.node != self.node:
                log.warning("reload: node: changes need a restart of the agent; the running node settings stay")
            plan = _ReloadPlan.between(self.active, new)
            plan.resolver = resolver
            plan.keep_ns = max(self._keep_ns(plan.old), self._keep_ns(new))  # old probes may be in flight
            await self._open_sources(plan)
        except ConfigError as exc:
            return self._reload_failed(str(exc))
        except Exception as exc:  # one line, never a traceback and never half a config
            return self._reload_failed(f"{type(exc).__name__}: {exc}")
        undo: list[Callable[[], object]] = []
        try:
            self._swap(plan, undo)
        except Exception as exc:
            for step in reversed(undo):
                with contextlib.suppress(Exception):
                    step()
            return self._reload_failed(f"{type(exc).__name__}: {exc}")
        self._start_changes(plan)
        self.reloads["success"] += 1
        self.last_reload_ok = True
        self.last_reload_error = ""
        msg = (f"reloaded {self.targets.describe}: {len(plan.after)} probes "
               f"({len(plan.added)} added, {len(plan.removed)} removed, {len(plan.changed)} changed)")
        log.info("%s", msg)
        return ReloadOutcome(True, msg, plan.added, plan.removed, plan.changed)

    def _load_targets(self) -> AgentConfig:
        config = self.targets.load()
        if config.templates:  # cluster names left unexpanded: only a cluster target source expands them
            raise ConfigError([f'probe "{t.name}": source/target name cluster objects: run the agent with '
                               "--kubernetes" for t in config.templates])
        return agent_config(config, self.targets.describe)

    def _privilege_standins(self) -> list[ProbeSpec]:
        standins = getattr(self.targets, "privilege_standins", None)
        return list(standins()) if standins is not None else []

    @property
    def cluster_notes(self) -> tuple[str, ...]:
        """Why (part of) a probe written with cluster names is not running now (the status page lists them)."""
        return tuple(getattr(self.targets, "notes", ()))

    def _reload_failed(self, message: str) -> ReloadOutcome:
        self.reloads["failure"] += 1
        self.last_reload_ok = False
        self.last_reload_error = message
        lines = message.splitlines() or [message]
        more = f" (and {len(lines) - 1} more errors)" if len(lines) > 1 else ""
        log.error("reload of %s rejected, the running configuration stays: %s%s", self.targets.describe, lines[0], more)
        return ReloadOutcome(False, message)

    async def _open_sources(self, plan: _ReloadPlan) -> None:
        """Open the namespaces of new and changed probes ahead of the swap, off the loop. A namespace that
        cannot be opened does not fail the reload: its probe reports `source_error`, as at start-up."""
        sources = {plan.after[n].source for n in (*plan.added, *plan.changed)} - {"host"}
        for source in sorted(sources):
            with contextlib.suppress(SourceError):
                await open_source(source, timeout=5.0)

    def _set_retention(self, keep_ns: int) -> None:
        """The sensor side of a config: how long kernel events are kept for its probes."""
        if isinstance(self.kernel_watch, IndexedKernelWatch):
            self.kernel_watch.keep_ns = keep_ns
            self.kernel_watch.lease_ns = keep_ns  # a watched port no result released is let go after as long

    def _swap(self, plan: _ReloadPlan, undo: list[Callable[[], object]]) -> None:
        """Put the new config in place; each step pushes its own undo before the next one runs."""
        old_active = self.active
        undo.append(lambda: setattr(self, "active", old_active))
        self.active = plan.new
        if plan.resolver is not None:
            old_asker = self.asker
            undo.append(lambda: setattr(self, "asker", old_asker))
            old_static = self.static_peers
            undo.append(lambda: setattr(self, "static_peers", old_static))
            self.static_peers = plan.resolver
            resolver = self._resolver(plan.resolver)
            if resolver:
                self.set_resolver(resolver)
            elif self.asker is not None:
                self.asker.resolver = resolver  # no peers any more: nobody is asked
        for n in plan.added:
            undo.append(functools.partial(self.metrics.forget, n))
            self._declare([plan.after[n]])
        for n in plan.changed:
            if _labels_of(plan.before[n]) == _labels_of(plan.after[n]):
                undo.append(functools.partial(self._declare, [plan.before[n]]))
                self._declare([plan.after[n]])
        ev = self.kernel_watch
        if isinstance(ev, IndexedKernelWatch):
            old_keep = ev.keep_ns
            undo.append(lambda: self._set_retention(old_keep))
        self._set_retention(plan.keep_ns)

    def _start_changes(self, plan: _ReloadPlan) -> None:
        """After the swap: start new probes, retire removed and changed ones once their run in flight ends."""
        before, after = plan.before, plan.after
        sched = self.scheduler
        if sched is not None:
            for n in plan.added:
                if n not in sched.scheduled():  # else a retirement still pending re-adds it (`_retire`)
                    sched.add(after[n])
            for n in plan.removed:
                self.spawn(self._retire(n, before[n], None), f"connprobe-retire-{n}")
            for n in plan.changed:
                self.spawn(self._retire(n, before[n], after[n]), f"connprobe-retire-{n}")
        else:
            for n in plan.removed:
                self.metrics.forget(n)
            for n in plan.changed:
                self._forget_old_labels(before[n], after[n])
        for n in plan.removed:
            self.board.forget(n)

    def _forget_old_labels(self, old: ProbeSpec, new: ProbeSpec | None) -> None:
        if new is None:
            self.metrics.forget(old.name)
        elif _labels_of(old) != _labels_of(new):
            self.metrics.forget(old.name, target=old.target, source=source_label(old.source))
            self._declare([new])

    async def _retire(self, name: str, old: ProbeSpec, new: ProbeSpec | None) -> None:
        sched = self.scheduler
        assert sched is not None
        grace = old.effective_timeout + 1.0
        if not await sched.retire(name, grace):
            log.warning("probe %s did not finish within %.1fs of the reload and was cancelled", name, grace)
        if self.active is None:
            return
        current = self.active.probes.get(name)
        if current is not None and name not in sched.scheduled():  # changed, or added back by a later reload
            sched.add(current)
        if current is None:
            self.metrics.forget(name)
        elif current != old:
            self._forget_old_labels(old, current)

    # -- views for the web server ---------------------------------------------------------------------------

    def probe_specs(self) -> dict[str, ProbeSpec]:
        return self.active.probes if self.active else {}


def netns_inode(name: str) -> int:
    """The inode of a namespace given by name (/run/netns/NAME) or path (/proc/PID/ns/net); PeerConfigError."""
    import os

    path = name if name.startswith("/") else f"/run/netns/{name}"
    if not name.startswith("/") and ("/" in name or name in (".", "..")):
        raise PeerConfigError(f"node: netns: {name[:60]!r} is not a namespace name")
    try:
        return os.stat(path).st_ino
    except OSError as exc:
        raise PeerConfigError(f"node: netns: {name[:60]}: {exc.strerror or exc}") from None
