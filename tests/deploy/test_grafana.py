"""deploy/grafana: the generated dashboards and Grafana-managed alerts are up to date, decode into the
grafana-foundation-sdk's types without losing a key, query only metrics connprobe exports with valid PromQL,
and the Grafana alerts are the Prometheus alerts."""

from __future__ import annotations

import json
import re
import sys

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import expr as expr_models
from grafana_foundation_sdk.models import prometheus as prom_models
from grafana_foundation_sdk.models.alerting import Rule
from grafana_foundation_sdk.models.dashboard import Dashboard, RowPanel

from tests.deploy.helpers import DEPLOY, METRIC_NAME, REPO, RULES, exported_metric_names, load_generator, run

GRAFANA = DEPLOY / "grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
ALERT_FILE = GRAFANA / "provisioning" / "alerting" / "connprobe-alerts.yaml"

register_default_plugins()


def dashboards() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in DASHBOARD_FILES}


def panels(dash: dict) -> list[dict]:
    return [p for p in dash["panels"] if p["type"] != "row"]


def exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in panels(dash) for t in p.get("targets", [])]


def test_every_query_selects_the_job_and_the_nodes_of_the_variables():
    """The job is a variable, not a hard-coded name, and each panel follows the node and instance picked."""
    for uid, dash in dashboards().items():
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        for name in ("job", "node", "instance"):
            var = variables[name]
            assert var["multi"] and var["includeAll"] and var["allValue"] == ".*", (uid, name)
        assert 'job=~"$job"' in variables["node"]["query"]["query"]
        for e in exprs(dash):
            assert 'job="' not in e, (uid, e)
            for selector in re.findall(r"\b(?:probe|connprobe)_[a-z_]+(\{[^}]*\}|)", e):
                assert 'job=~"$job"' in selector and 'node=~"$node"' in selector and \
                    'instance=~"$instance"' in selector, (uid, e)


def test_grafana_alerts_point_to_the_dashboards_instead_of_listing_nodes():
    provisioning = yaml.safe_load(ALERT_FILE.read_text())
    descriptions = {r["title"]: r["annotations"]["description"] for g in provisioning["groups"] for r in g["rules"]}
    assert "see the node and instance variables of the connprobe dashboards" in descriptions["ConnprobeProbeFailing"]
    assert all("range" not in d and "printf" not in d for d in descriptions.values())


def test_regenerating_changes_nothing():
    gen = load_generator()
    outputs = gen.outputs()
    assert set(outputs) == {*DASHBOARD_FILES, ALERT_FILE}
    for path, text in outputs.items():
        assert path.read_text() == text, f"{path.relative_to(REPO)} is stale: run python -m deploy.grafana.generate"
    # the script itself, as a user runs it
    out = run(sys.executable, "-m", "deploy.grafana.generate", "--check", cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == ""


def test_the_three_dashboards_exist_with_their_panels():
    d = dashboards()
    assert set(d) == {"connprobe-overview", "connprobe-target", "connprobe-agent"}
    titles = {uid: {p["title"] for p in panels(dash)} for uid, dash in d.items()}
    assert {"Success ratio per target", "Causes over time"} <= titles["connprobe-overview"]
    assert {"HTTP phases of the last probe", "Phase duration p95", "Drops in this probe's evidence, by reason",
            "Retransmissions in this probe's evidence"} <= titles["connprobe-target"]
    assert {"BPF hooks attached", "Kernel events seen / lost", "Event-loop lag", "Suspect probes"} <= \
        titles["connprobe-agent"]
    assert {"Success ratio per node", "Failing probes per node"} <= titles["connprobe-overview"]
    assert {"Success per node", "Duration per node"} <= titles["connprobe-target"]
    for uid, dash in d.items():
        assert dash["uid"] == uid
        names = [v["name"] for v in dash["templating"]["list"]]
        assert names[:4] == ["datasource", "job", "node", "instance"], (uid, names)
        for p in panels(dash):
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (uid, p["title"])
            assert p["targets"], (uid, p["title"])


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_dashboard_json_validates_against_the_sdk_types(path):
    data = json.loads(path.read_text())
    model = Dashboard.from_json(data)
    # a round trip through the SDK's types loses every key those types do not know: nothing may be lost
    assert json.loads(json.dumps(model, cls=JSONEncoder)) == data
    for panel in model.panels:
        if isinstance(panel, RowPanel):
            continue
        assert panel.type_val in {"timeseries", "stat", "table"}
        for target in panel.targets:
            assert isinstance(target, prom_models.Dataquery), (panel.title, type(target))
        if panel.type_val != "table":
            assert type(panel.options).__module__.endswith(f"models.{panel.type_val}"), panel.title


def _concrete(promql: str) -> str:
    """A dashboard query with Grafana's variables replaced by values Prometheus parses."""
    promql = promql.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$__interval", "1m")
    return re.sub(r"\$\w+", ".*", promql)


def test_every_panel_query_is_valid_promql(promtool, tmp_path):
    rules = [{"record": f"check:panel_{i}", "expr": _concrete(e)}
             for i, e in enumerate(e for dash in dashboards().values() for e in exprs(dash))]
    assert len(rules) > 20
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    out = run(promtool, "check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    # and promtool does reject a broken query, so the check above means something
    path.write_text(yaml.safe_dump({"groups": [{"name": "p", "rules": [{"record": "x:y", "expr": "sum by (a"}]}]}))
    assert run(promtool, "check", "rules", str(path)).returncode != 0


def test_dashboards_use_only_exported_metrics():
    exported = exported_metric_names()
    used = {name for dash in dashboards().values() for e in exprs(dash) for name in METRIC_NAME.findall(e)}
    assert used <= exported, used - exported
    # blackbox_exporter's names are used as such, so its dashboards keep working
    assert {"probe_success", "probe_http_duration_seconds", "probe_dns_lookup_time_seconds"} <= used


def test_grafana_alerts_are_the_prometheus_alerts():
    prom = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    provisioning = yaml.safe_load(ALERT_FILE.read_text())
    assert provisioning["apiVersion"] == 1
    datasource_uids = {d["uid"] for d in yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "connprobe-prometheus.yaml").read_text())["datasources"]}
    seen = set()
    for group in provisioning["groups"]:
        assert group["folder"] == "connprobe" and group["interval"] == "1m" and group["orgId"] == 1
        for data in group["rules"]:
            rule = Rule.from_json(data)
            assert {k: v for k, v in json.loads(json.dumps(rule, cls=JSONEncoder)).items() if k in data} == data
            source = prom[rule.title]
            seen.add(rule.title)
            assert len(rule.uid) <= 40 and re.fullmatch(r"[a-z0-9-]+", rule.uid)
            assert rule.for_val == source["for"]
            assert rule.labels == source["labels"]
            assert set(rule.annotations) == set(source["annotations"])
            assert "query" not in rule.annotations["description"]  # Grafana's templates have no query function
            assert rule.no_data_state == "OK" and rule.condition == "C"
            a, c = rule.data
            assert a.datasource_uid in datasource_uids
            assert isinstance(a.model, prom_models.Dataquery) and a.model.instant
            assert a.model.expr == source["expr"].strip()
            assert isinstance(c.model, expr_models.TypeMath) and c.model.expression == "is_number($A)"
    assert seen == set(prom)
    assert len({r["uid"] for g in provisioning["groups"] for r in g["rules"]}) == len(prom)


def test_dashboard_provisioning_points_at_a_folder():
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "connprobe.yaml").read_text())["providers"]
    assert providers[0]["type"] == "file" and providers[0]["options"]["path"].startswith("/")
