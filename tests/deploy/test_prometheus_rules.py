"""deploy/prometheus: the alert rules pass `promtool check rules` and their `promtool test rules` unit tests,
every alert is proven to fire by a test, and the rules only use metrics connprobe exports."""

from __future__ import annotations

import shutil

import yaml

from correlator.types import Cause
from tests.deploy.helpers import DEPLOY, METRIC_NAME, RULE_TESTS, RULES, exported_metric_names, run

CAUSE_ALERTS = {
    "ConnprobeDNSFailures": "dns",
    "ConnprobePolicyDrop": "policy_drop",
    "ConnprobeRetransmitStorm": "tcp_retransmit",
    "ConnprobeUpstreamLatency": "upstream_latency",
}


def alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_check_rules(promtool):
    out = run(promtool, "check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in out.stdout


def test_promtool_unit_tests_pass(promtool):
    out = run(promtool, "test", "rules", str(RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_unit_tests_can_fail(promtool, tmp_path):
    """The unit tests are not vacuous: with the failing-probe threshold raised, they fail."""
    (tmp_path / "tests").mkdir()
    rules = RULES.read_text().replace(") > 0.5\n        for: 5m", ") > 1.5\n        for: 5m", 1)
    assert rules != RULES.read_text()
    (tmp_path / RULES.name).write_text(rules)
    shutil.copy(RULE_TESTS, tmp_path / "tests" / RULE_TESTS.name)
    out = run(promtool, "test", "rules", str(tmp_path / "tests" / RULE_TESTS.name))
    assert out.returncode != 0
    assert "ConnprobeProbeFailing" in out.stdout + out.stderr


def test_every_alert_is_proven_to_fire_by_a_unit_test():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {t["alertname"] for group in tests for t in group.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert {a["alert"] for a in alerts()} <= fired


def test_alert_shape():
    by_name = {a["alert"]: a for a in alerts()}
    assert {"ConnprobeProbeFailing", "ConnprobeProbeStale", "ConnprobeBPFDetached", "ConnprobeKernelEventsLost",
            *CAUSE_ALERTS} <= set(by_name)
    for a in by_name.values():
        assert a.get("for"), f"{a['alert']} has no `for:`"
        assert a["labels"]["severity"] in {"critical", "warning"}
        assert a["annotations"]["summary"] and a["annotations"]["description"]
        assert a["labels"].get("cause") is None or a["labels"]["cause"] in {str(c) for c in Cause}
    for name, cause in CAUSE_ALERTS.items():
        assert by_name[name]["labels"]["cause"] == cause
        assert f'cause="{cause}"' in by_name[name]["expr"]


def test_rules_use_only_exported_metrics():
    exported = exported_metric_names()
    used = set()
    for a in alerts():
        used |= set(METRIC_NAME.findall(a["expr"]))
        for text in a["annotations"].values():
            used |= set(METRIC_NAME.findall(text))
    assert used, "no metric names found"
    assert used <= exported, used - exported


def test_example_prometheus_config_is_valid_and_names_the_job(promtool):
    config = RULES.parent / "prometheus.yml"
    out = run(promtool, "check", "config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = {j["job_name"]: j for j in yaml.safe_load(config.read_text())["scrape_configs"]}
    assert "connprobe" in jobs  # ConnprobeAgentDown watches up{job="connprobe"}
    probe = jobs["connprobe-probe"]
    assert probe["metrics_path"] == "/probe" and probe["params"]["module"]


def test_kubernetes_scrape_job_keeps_the_agents_metrics_port():
    k8s = DEPLOY / "kubernetes"
    (job,) = yaml.safe_load((RULES.parent / "scrape-kubernetes.yml").read_text())["scrape_configs"]
    assert job["job_name"] == "connprobe"
    namespace = yaml.safe_load((k8s / "namespace.yaml").read_text())["metadata"]["name"]
    assert job["kubernetes_sd_configs"] == [{"role": "endpoints", "namespaces": {"names": [namespace]}}]
    service = yaml.safe_load((k8s / "service.yaml").read_text())
    keep = next(r for r in job["relabel_configs"] if r.get("action") == "keep")
    assert keep["regex"] == f"{service['metadata']['name']};{service['spec']['ports'][0]['name']}"
