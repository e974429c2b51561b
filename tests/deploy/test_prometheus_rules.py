"""deploy/prometheus: the alert rules are the generator's default output, pass `promtool check rules` and their
`promtool test rules` unit tests, every alert is proven to fire by a test, has a summary, a description and a
runbook in docs/runbooks/ whose `connprobe diagnose` lines parse, the job selector is a parameter that works,
and the rules only use metrics connprobe exports."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import shutil
import sys
from types import ModuleType

import pytest
import yaml

from correlator.types import Cause
from tests.deploy.helpers import DEPLOY, METRIC_NAME, REPO, RULE_TESTS, RULES, exported_metric_names, run

RUNBOOKS = REPO / "docs" / "runbooks"

CAUSE_ALERTS = {
    "ConnprobeDNSFailures": "dns",
    "ConnprobePolicyDrop": "policy_drop",
    "ConnprobeRetransmitStorm": "tcp_retransmit",
    "ConnprobeUpstreamLatency": "upstream_latency",
}


def alerts(text: str | None = None) -> list[dict]:
    doc = yaml.safe_load(RULES.read_text() if text is None else text)
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def load_rules_generator() -> ModuleType:
    """deploy/prometheus/generate.py as a module (deploy/ is not an installed package)."""
    name = "connprobe_deploy_prometheus_generate"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DEPLOY / "prometheus" / "generate.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def test_committed_rules_are_the_generators_default_output(tmp_path):
    gen = load_rules_generator()
    assert RULES.read_text() == gen.Rules().render(), "stale: run python -m deploy.prometheus.generate"
    out = run(sys.executable, "-m", "deploy.prometheus.generate", "--check", cwd=REPO)
    assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr
    # --check does notice a difference
    stale = tmp_path / "rules.yml"
    stale.write_text(RULES.read_text().replace("> 0.5", "> 0.6"))
    out = run(sys.executable, "-m", "deploy.prometheus.generate", "--check", "-o", str(stale), cwd=REPO)
    assert out.returncode == 1 and "out of date" in out.stdout


def test_generator_rejects_a_broken_job_selector(tmp_path):
    out = run(sys.executable, "-m", "deploy.prometheus.generate", "--job-selector", 'job="connprobe',
              "-o", str(tmp_path / "r.yml"), cwd=REPO)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == \
        """generate.py: error: --job-selector: not a list of label matchers: 'job="connprobe'"""
    assert not (tmp_path / "r.yml").exists()


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
    rules = RULES.read_text().replace(") > 0.5", ") > 1.5")
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
        assert a["annotations"]["runbook_url"] == f"docs/runbooks/{a['alert']}.md"
        assert '{job="connprobe"' in a["expr"] or 'job="connprobe",' in a["expr"], a["alert"]
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
    assert "connprobe" in jobs  # the committed rules select job="connprobe" (the generator's default)
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


def test_probe_alerts_aggregate_across_nodes():
    """A probe alert's labels never hold the node: one broken target pages once (but the single-node alert)."""
    for a in alerts():
        text = a["expr"]
        if "connprobe_probes_total" in text and a["alert"] != "ConnprobeSingleNodeUnreachable":
            assert text.startswith("count by (probe, target, source) ("), a["alert"]
            assert "Nodes: {{ range" in a["annotations"]["description"], a["alert"]


@pytest.mark.parametrize("name", [a["alert"] for a in alerts()])
def test_every_alert_has_a_runbook_that_says_what_it_means_and_how_to_diagnose(name):
    page = RUNBOOKS / f"{name}.md"
    assert page.is_file(), f"{page.relative_to(REPO)} is missing"
    text = page.read_text()
    assert text.startswith(f"# {name}\n")
    for section in ("## What it means", "## Diagnose", "## What to do"):
        assert section in text, (name, section)
    assert "connprobe diagnose" in text or "connprobe doctor" in text, name


def test_the_runbook_index_lists_every_alert_and_only_those():
    index = (RUNBOOKS / "README.md").read_text()
    linked = set(re.findall(r"\]\((Connprobe\w+)\.md\)", index))
    assert linked == {a["alert"] for a in alerts()}
    assert {p.stem for p in RUNBOOKS.glob("Connprobe*.md")} == linked


def test_readme_alert_table_links_every_runbook():
    readme = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(Connprobe\w+)` \|.*\[runbook\]\((docs/runbooks/\w+\.md)\) \|$", readme, re.M))
    assert rows == {a["alert"]: a["annotations"]["runbook_url"] for a in alerts()}


def _diagnose_parser() -> argparse.ArgumentParser:
    from connprobe.commands.diagnose import add_arguments

    class Strict(argparse.ArgumentParser):
        def error(self, message: str):  # raise instead of exiting
            raise ValueError(message)

    parser = Strict(prog="connprobe diagnose")
    add_arguments(parser)
    return parser


def test_runbook_command_lines_use_real_diagnose_options():
    parser = _diagnose_parser()
    lines = []
    for page in sorted(RUNBOOKS.glob("*.md")):
        for block in re.findall(r"```\n(.*?)```", page.read_text(), re.S):
            for line in block.splitlines():
                if "connprobe diagnose " in line:
                    words = shlex.split(line.split("connprobe diagnose ", 1)[1], comments=True)
                    words = words[:words.index(">")] if ">" in words else words
                    lines.append((page.name, words))
    assert len(lines) >= 14
    for page, words in lines:
        try:
            parser.parse_args(words)
        except ValueError as exc:
            raise AssertionError(f"{page}: connprobe diagnose {' '.join(words)}: {exc}") from None
    with pytest.raises(ValueError):  # and the parser does reject an option connprobe lacks
        parser.parse_args(["http://x/", "--node", "n1"])


def _fleet_series(job: str, target: str, nodes: int, failing: int) -> list[dict[str, str]]:
    out = []
    for i in range(1, nodes + 1):
        base = f'job="{job}",instance="10.0.0.{i}:9516",node="node{i:02d}",probe="p",target="{target}",source="host"'
        bad = i <= failing
        out += [{"series": f'connprobe_probes_total{{{base},result="failure"}}', "values": "0+1x30" if bad else "0x30"},
                {"series": f'connprobe_probes_total{{{base},result="success"}}', "values": "0x30" if bad else "0+1x30"},
                {"series": f'connprobe_probe_cause{{{base},cause="{"policy_drop" if bad else "ok"}"}}',
                 "values": "1x30"}]
    return out


def test_job_selector_is_a_parameter_and_a_big_fleet_is_one_alert(promtool, tmp_path):
    """Rules generated for job="agents",env="prod": only that job's series alert; 12 failing nodes of 12 are one
    alert with 12 as value and ten nodes named; the default job's series are ignored."""
    gen = load_rules_generator()
    rules = tmp_path / "rules.yml"
    out = run(sys.executable, "-m", "deploy.prometheus.generate", "--job-selector", 'job="agents",env="prod"',
              "--runbook-base", "https://runbooks.example/connprobe/", "-o", str(rules), cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert rules.read_text() == gen.Rules('job="agents",env="prod"', "https://runbooks.example/connprobe").render()
    assert 'job="connprobe"' not in rules.read_text().split("groups:", 1)[1]
    series = (_fleet_series("agents", "http://big/", 12, 12) + _fleet_series("connprobe", "http://other/", 3, 3)
              + [{"series": 'up{job="agents",instance="10.0.0.1:9516"}', "values": "0x30"},
                 {"series": 'up{job="connprobe",instance="10.0.0.9:9516"}', "values": "0x30"}])
    for s in series:  # the extra label of the selector, on the selected job only
        if 'job="agents"' in s["series"]:
            s["series"] = s["series"].replace('job="agents"', 'job="agents",env="prod"')
    listed = ", ".join(f"node{i:02d} (last verdict: policy_drop)" for i in range(1, 11))
    test = {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series, "alert_rule_test": [
            {"eval_time": "20m", "alertname": "ConnprobeProbeFailing", "exp_alerts": [{
                "exp_labels": {"severity": "critical", "probe": "p", "target": "http://big/", "source": "host"},
                "exp_annotations": {
                    "summary": "Probe p to http://big/ from host is failing on 12 node(s)",
                    "description": "More than half of the probes failed over the last 5 minutes on 12 node(s) (a "
                                   "single node failing while others reach the target is "
                                   f"ConnprobeSingleNodeUnreachable instead). Nodes: {listed}, ....",
                    "runbook_url": "https://runbooks.example/connprobe/ConnprobeProbeFailing.md"}}]},
            {"eval_time": "20m", "alertname": "ConnprobeSingleNodeUnreachable", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "ConnprobeAgentDown", "exp_alerts": [
                {"exp_labels": {"severity": "critical", "job": "agents"}, "exp_annotations": {
                    "summary": "1 connprobe agent(s) of job agents are down",
                    "description": "Prometheus cannot scrape these agents: none of their probes run and their alerts "
                                   "cannot fire. Nodes: 10.0.0.1:9516.",
                    "runbook_url": "https://runbooks.example/connprobe/ConnprobeAgentDown.md"}}]},
        ]}]}
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    out = run(promtool, "test", "rules", str(path))
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
