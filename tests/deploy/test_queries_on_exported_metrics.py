"""The dashboards' and alerts' PromQL, evaluated by promtool on what connprobe.metrics really exports.

A simulated half hour: six probes (healthy, policy drop, DNS failure, slow upstream, packet loss, one that
stops running), the kernel sensor with a detached hook and lost events, a lagging event loop, and the
agent's own pipeline collector (a sink that starts dropping, a config reload that is rejected). Every minute
the exposition text of `Metrics` is parsed into samples; those become promtool input series (with the
`instance` and `job` labels a scrape adds). Then:
  - every alert of deploy/prometheus fires for exactly the probe or agent it is about;
  - every dashboard panel's query returns data.
The hand-written promtool unit tests prove the thresholds; this proves the names and labels line up.
"""

from __future__ import annotations

import functools
import json

import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bpf.hooks import HookStatus
from bpf.sensor import SensorCounters
from bpf.types import EventKind, KernelEvent
from connprobe.agent import Agent, _AgentCollector
from connprobe.metrics import Metrics
from correlator.types import Cause, Verdict
from prober.types import DnsTransaction, ErrorKind, PhaseSpan, ProbeKind, ProbeResult
from tests.deploy.helpers import RULES, dashboard_queries, run

MINUTES = 30
SCRAPE = {"instance": "node1:9516", "job": "connprobe"}
MS = 1_000_000
WEB = "http://srv1.lab.test:8080/ok"


def _result(name: str, target: str, ok: bool, error: ErrorKind | None = None, slow_ms: int = 5,
            kind: ProbeKind = ProbeKind.HTTP, rcode: str = "NOERROR") -> ProbeResult:
    t0 = 1_000 * MS
    phases = (PhaseSpan("resolve", t0, t0 + MS), PhaseSpan("connect", t0 + MS, t0 + 2 * MS),
              PhaseSpan("processing", t0 + 2 * MS, t0 + (2 + slow_ms) * MS))
    dns = (DnsTransaction("10.0.0.53", "srv1.lab.test.", "A", t0, t0 + MS, rcode, None),)
    return ProbeResult(name, kind, target, "client", t0, t0 + (3 + slow_ms) * MS, ok, error, phases=phases,
                       http_status=200 if ok else None, dns=dns)


def _event(kind: EventKind, **kw) -> KernelEvent:
    return KernelEvent(1, kind, "tcp", "10.0.0.2", 40000, "10.0.0.11", 8080, 1, **kw)


def _verdicts(minute: int, healthy: bool = False) -> list[Verdict]:
    drop = (_event(EventKind.DROP, reason="NETFILTER_DROP"), _event(EventKind.RETRANSMIT))
    out = [
        Verdict(_result("web", WEB, True), Cause.OK, None, 0.9, "healthy", (), (), "ok"),
        Verdict(_result("drop", "http://srv2.lab.test:8080/", False, ErrorKind.CONNECT_TIMEOUT), Cause.POLICY_DROP,
                None, 0.9, "policy_drop_connect", drop, (), "dropped"),
        Verdict(_result("dns", "http://missing.lab.test/", False, ErrorKind.DNS_NXDOMAIN, rcode="NXDOMAIN"),
                Cause.DNS, "dns/nxdomain", 0.95, "dns_failure", (), (), "nxdomain"),
        Verdict(_result("slow", "http://srv1.lab.test:8080/slow", True, slow_ms=2500), Cause.UPSTREAM_LATENCY, None,
                0.8, "slow_or_stalled", (), (), "slow"),
        Verdict(_result("lossy", "http://srv1.lab.test:8080/big", True, slow_ms=900), Cause.TCP_RETRANSMIT, None,
                0.7, "slow_or_stalled", (_event(EventKind.RETRANSMIT),) * 3, (), "loss"),
    ]
    if minute < 5:  # then its scheduler stops: stale
        out.append(Verdict(_result("gone", "http://srv3.lab.test/", True), Cause.OK, None, 0.9, "healthy", (), (),
                           "ok"))
    if healthy:  # a node that reaches every target promptly
        return [Verdict(_result(v.result.name, v.result.target, True), Cause.OK, None, 0.9, "healthy", (), (), "ok")
                for v in out]
    return out


@functools.cache
def simulate(instance: str = SCRAPE["instance"], healthy: bool = False) -> dict[str, list[float | None]]:
    """Series text -> value at each minute (None: absent), as scraped from the agent at `instance`."""
    scrape = {**SCRAPE, "instance": instance}
    now = [0.0]
    m = Metrics(CollectorRegistry(), clock=lambda: now[0])
    for name, target in (("web", WEB), ("gone", "http://srv3.lab.test/")):
        m.declare(name, target, "client", kind=ProbeKind.HTTP, interval_s=60)
    agent = Agent("never-read.yaml", registry=CollectorRegistry())  # never started: its counters are set below
    m.registry.register(_AgentCollector(agent))
    status_sink = next(s for s in agent.sinks if s.name == "status")
    series: dict[str, list[float | None]] = {}
    for minute in range(MINUTES):
        now[0] = minute * 60.0
        status_sink.dropped = 20 * max(0, minute - 10)
        agent.last_reload_ok = minute < 20
        for v in _verdicts(minute, healthy):
            m.observe(v)
        counters = SensorCounters(
            events={(EventKind.RETRANSMIT, ""): 50 * minute, (EventKind.DROP, "NETFILTER_DROP"): 7 * minute},
            watched={}, lost=3 * minute, ring_lost=3 * minute, queue_lost=0, delivered=100 * minute)
        m.observe_sensor(counters, 3 * minute, [HookStatus("tcp:tcp_retransmit_skb", EventKind.RETRANSMIT, True, ""),
                                                HookStatus("skb:kfree_skb", EventKind.DROP, False, "not found")])
        m.observe_loop_lag(0.75)
        for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                labels = {**s.labels, **scrape}
                key = s.name + "{" + ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items())) + "}"
                series.setdefault(key, [None] * MINUTES)[minute] = s.value
        up = "up{" + ",".join(f"{k}={json.dumps(v)}" for k, v in scrape.items()) + "}"
        series.setdefault(up, [None] * MINUTES)[minute] = 1.0
    return series


def input_series(series: dict[str, list[float | None]]) -> list[dict[str, str]]:
    return [{"series": k, "values": " ".join("_" if v is None else repr(float(v)) for v in values)}
            for k, values in series.items()]


def _promtool_test(promtool, tmp_path, rule_file, alert_tests, series=None) -> None:
    series = simulate() if series is None else series
    test = {"rule_files": [str(rule_file)], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": input_series(series), "alert_rule_test": alert_tests}]}
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    out = run(promtool, "test", "rules", str(path))
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def _alert(name: str, **labels: str) -> dict:
    return {"alertname": name, "labels": labels}


def test_every_alert_fires_for_what_it_is_about_on_exported_metrics(promtool, tmp_path):
    probe = {"source": "client"}  # probe alerts aggregate across nodes: no `instance`
    expected = {
        "ConnprobeProbeFailing": [
            {"probe": "dns", "target": "http://missing.lab.test/", **probe, "severity": "critical"},
            {"probe": "drop", "target": "http://srv2.lab.test:8080/", **probe, "severity": "critical"}],
        "ConnprobePolicyDrop": [
            {"probe": "drop", "target": "http://srv2.lab.test:8080/", **probe, "severity": "critical",
             "cause": "policy_drop"}],
        "ConnprobeDNSFailures": [
            {"probe": "dns", "target": "http://missing.lab.test/", **probe, "severity": "warning", "cause": "dns"}],
        "ConnprobeUpstreamLatency": [
            {"probe": "slow", "target": "http://srv1.lab.test:8080/slow", **probe, "severity": "warning",
             "cause": "upstream_latency"}],
        "ConnprobeRetransmitStorm": [
            {"probe": "lossy", "target": "http://srv1.lab.test:8080/big", **probe, "severity": "warning",
             "cause": "tcp_retransmit"}],
        "ConnprobeProbeStale": [
            {"probe": "gone", "target": "http://srv3.lab.test/", **probe, "severity": "warning"}],
        "ConnprobeSingleNodeUnreachable": [],  # one agent: no other node reaches what it fails
        "ConnprobeBPFDetached": [{"hook": "skb:kfree_skb", **SCRAPE, "severity": "warning"}],
        "ConnprobeKernelEventsLost": [{**SCRAPE, "severity": "warning"}],
        "ConnprobeEventLoopLag": [{**SCRAPE, "severity": "warning"}],
        "ConnprobeConfigReloadFailed": [{"job": SCRAPE["job"], "severity": "warning"}],
        "ConnprobeSinkDropping": [{**SCRAPE, "sink": "status", "severity": "warning"}],
        "ConnprobeNodeRetransmitStorm": [],  # 50 retransmits a minute is no storm
        "ConnprobeAgentDown": [],
    }
    defined = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert set(expected) == defined
    tests = [{"eval_time": "25m", "alertname": name,
              "exp_alerts": [{"exp_labels": labels} for labels in alerts]}
             for name, alerts in expected.items()]
    # annotations are checked by the hand-written unit tests; here only which alerts fire with which labels
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rule_file = tmp_path / "rules.yml"
    rule_file.write_text(yaml.safe_dump(rules))
    _promtool_test(promtool, tmp_path, rule_file, tests)


def _rules_without_annotations(tmp_path):
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rule_file = tmp_path / "rules.yml"
    rule_file.write_text(yaml.safe_dump(rules))
    return rule_file


def test_a_second_node_that_reaches_the_targets_turns_failures_into_single_node_alerts(promtool, tmp_path):
    """Two agents, node2 healthy: the targets node1 fails are node1's problem (ConnprobeSingleNodeUnreachable with
    its instance), ConnprobeProbeFailing stays quiet, and a cause alert still fires once per target."""
    node2 = "node2:9516"
    series = {**simulate(), **simulate(node2, healthy=True)}
    one = {"source": "client", "instance": SCRAPE["instance"], "severity": "warning"}
    tests = [
        {"eval_time": "25m", "alertname": "ConnprobeProbeFailing", "exp_alerts": []},
        {"eval_time": "25m", "alertname": "ConnprobeSingleNodeUnreachable", "exp_alerts": [
            {"exp_labels": {"probe": "dns", "target": "http://missing.lab.test/", **one}},
            {"exp_labels": {"probe": "drop", "target": "http://srv2.lab.test:8080/", **one}}]},
        {"eval_time": "25m", "alertname": "ConnprobePolicyDrop", "exp_alerts": [
            {"exp_labels": {"probe": "drop", "target": "http://srv2.lab.test:8080/", "source": "client",
                            "severity": "critical", "cause": "policy_drop"}}]},
    ]
    _promtool_test(promtool, tmp_path, _rules_without_annotations(tmp_path), tests, series)


def test_every_dashboard_query_returns_data_on_exported_metrics(promtool, tmp_path):
    queries = dashboard_queries("2m", "10m", "1m")
    rules = [{"alert": f"Panel{i}", "expr": f"count({promql}) > 0"} for i, (_, promql) in enumerate(queries)]
    rule_file = tmp_path / "panels.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    tests = [{"eval_time": "25m", "alertname": f"Panel{i}", "exp_alerts": [{"exp_labels": {}}]}
             for i in range(len(queries))]
    try:
        _promtool_test(promtool, tmp_path, rule_file, tests)
    except AssertionError as exc:
        names = "\n".join(f"Panel{i}: {title}" for i, (title, _) in enumerate(queries))
        raise AssertionError(f"{exc}\n{names}") from None
