"""Paths and helpers shared by the deploy/ tests."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "connprobe-alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "connprobe-alerts.test.yml"
METRIC_NAME = re.compile(r"\b(?:probe|connprobe)_[a-z_]+\b")
DASHBOARDS = DEPLOY / "grafana" / "dashboards"


def run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd, timeout=60)


def load_generator() -> ModuleType:
    """deploy/grafana/generate.py as a module (deploy/ is not an installed package)."""
    name = "connprobe_deploy_grafana_generate"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DEPLOY / "grafana" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def exported_metric_names() -> set[str]:
    """Every sample name connprobe.metrics exports once it has seen a verdict of each shape and the sensor."""
    from prometheus_client import CollectorRegistry

    from bpf.hooks import HookStatus
    from bpf.sensor import SensorCounters
    from bpf.types import EventKind, KernelEvent
    from connprobe.metrics import Metrics
    from correlator.types import Cause, Verdict
    from prober.types import DnsTransaction, PhaseSpan, ProbeKind, ProbeResult

    m = Metrics(CollectorRegistry())
    m.declare("p", "http://t/", "s", kind=ProbeKind.HTTP, interval_s=10)
    r = ProbeResult("p", ProbeKind.HTTP, "http://t/", "s", 0, 10, False, phases=(PhaseSpan("resolve", 0, 1),),
                    suspect=True, dns=(DnsTransaction("d", "t.", "A", 0, 1, "NOERROR", None),))
    drop = KernelEvent(1, EventKind.DROP, "tcp", "a", 1, "b", 2, 3, reason="NETFILTER_DROP")
    retrans = KernelEvent(1, EventKind.RETRANSMIT, "tcp", "a", 1, "b", 2, 3)
    m.observe(Verdict(r, Cause.POLICY_DROP, None, 0.5, "x", (drop, retrans), (), ""))
    m.observe_sensor(SensorCounters({(EventKind.DROP, "NETFILTER_DROP"): 1}, {}, 0, 0, 0, 0), 0,
                     [HookStatus("skb:kfree_skb", EventKind.DROP, True, "")])
    m.observe_loop_lag(0.1)
    names = {s.name for fam in m.registry.collect() for s in fam.samples}
    return names | {s.name for fam in _idle_agent().registry.collect() for s in fam.samples}


def _idle_agent():
    """An agent that is never started: what its own pipeline collector exports (sinks, reloads, scheduler)."""
    from prometheus_client import CollectorRegistry

    from connprobe.agent import Agent

    return Agent("never-read.yaml", registry=CollectorRegistry())


def dashboard_queries(rate_interval: str, range_: str, interval: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard panel, with Grafana's variables filled in for a plain query:
    the given durations for $__rate_interval, $__range and $__interval, any value for the template ones."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                promql = (target["expr"].replace("$__rate_interval", rate_interval).replace("$__range", range_)
                          .replace("$__interval", interval))
                for var in ("job", "node", "instance", "probe", "target", "source"):
                    promql = promql.replace(f'"${var}"', '".*"')
                assert "$" not in promql, promql
                out.append((f"{path.stem}: {panel['title']} ({target['refId']})", promql))
    return out
