"""End to end with a real Prometheus and Alertmanager (Debian packages `prometheus`, `prometheus-alertmanager`).

The agent probes lab targets; Prometheus (started here on loopback, temporary config and data) scrapes it every
second, also through the blackbox-style /probe job; the alert rules of deploy/prometheus are loaded unchanged
except for a shorter `for:` (the same expressions, labels and annotations); a policy drop is injected on srv2;
ConnprobePolicyDrop fires and Alertmanager delivers it to a webhook receiver in this test with the cause in its
labels. Then every PromQL expression of the dashboards and of the alert rules is run against that Prometheus.
"""

from __future__ import annotations

import json
import shutil
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.agent.helpers import REPO, AgentProcess, Daemon, free_port, http_get, lab_config, wait_for
from tests.deploy.helpers import METRIC_NAME, dashboard_queries

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(300)]

RULES = REPO / "deploy" / "prometheus" / "connprobe-alerts.yml"
SHIPPED_PHASES = yaml.safe_load(yaml.safe_load((REPO / "deploy" / "kubernetes" / "configmap.yaml").read_text())
                                ["data"]["config.yaml"])["modules"]["http_2xx"]["phase_histograms"]
FOR = "3s"  # instead of the rules' minutes

# Alert expressions that select series in this run (the policy drop on api); every other rule is a valid query
# whose result is expected to be empty here, for the reason given. A new rule must be put in one of the two.
FIRING = {"ConnprobePolicyDrop", "ConnprobeProbeFailing"}
EXPECTED_EMPTY = {
    "ConnprobeDNSFailures": "DNS answers promptly in this run",
    "ConnprobeRetransmitStorm": "no packet loss is injected",
    "ConnprobeUpstreamLatency": "the lab servers answer within the 300 ms budget",
    "ConnprobeProbeStale": "every probe runs every 3 s",
    "ConnprobeSingleNodeUnreachable": "one agent: there is no other node that reaches the target",
    "ConnprobeNodeRetransmitStorm": "the node retransmits far less than 100 segments/s",
    "ConnprobeAgentDown": "the agent is up",
    "ConnprobeBPFDetached": "the sensor and its hooks are attached",
    "ConnprobeKernelEventsLost": "no events are lost at this volume",
    "ConnprobeConfigReloadFailed": "the agent's config is never reloaded here",
    "ConnprobeSinkDropping": "the sinks keep up with three probes",
    "ConnprobeEventLoopLag": "the agent's loop is idle",
}


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} not found: install the Debian packages prometheus and prometheus-alertmanager",
                    pytrace=False)
    return path


class Webhook:
    """Alertmanager's webhook receiver: collects every alert it is sent."""

    def __init__(self) -> None:
        self.alerts: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.alerts.extend(json.loads(body).get("alerts", []))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Webhook:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def query(prom: str, promql: str) -> list[dict]:
    code, text = http_get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    doc = json.loads(text)
    assert code == 200 and doc["status"] == "success", f"{promql}: {text[:500]}"
    return doc["data"]["result"]


def write_rules(path: Path) -> dict[str, str]:
    rules = yaml.safe_load(RULES.read_text())
    exprs = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = FOR
            exprs[rule["alert"]] = rule["expr"]
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return exprs


def test_policy_drop_alert_reaches_alertmanager_and_every_query_has_data(lab, tmp_path):
    prometheus, alertmanager = _need("prometheus"), _need("prometheus-alertmanager")
    # the phase histograms on, as the shipped ConfigMap has them for http_2xx: the target dashboard plots them
    agent = AgentProcess(lab_config(tmp_path / "agent.yml", lab, phase_histograms=SHIPPED_PHASES), tmp_path)
    am_port, prom_port = free_port(), free_port()
    prom = f"http://127.0.0.1:{prom_port}"
    exprs = write_rules(tmp_path / "rules.yml")
    assert set(exprs) == FIRING | set(EXPECTED_EMPTY)
    with Webhook() as hook:
        (tmp_path / "am.yml").write_text(yaml.safe_dump({
            "route": {"receiver": "test", "group_by": ["alertname", "probe"], "group_wait": "1s",
                      "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "test", "webhook_configs": [
                {"url": f"http://127.0.0.1:{hook.port}/hook", "send_resolved": False}]}],
        }))
        client = lab.ns("client").name
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "rules.yml")],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
            "scrape_configs": [
                {"job_name": "connprobe", "static_configs": [{"targets": [f"127.0.0.1:{agent.port}"]}]},
                # blackbox_exporter's multi-target pattern, unchanged but for the address and a source
                {"job_name": "connprobe-probe", "metrics_path": "/probe", "scrape_interval": "2s",
                 "scrape_timeout": "2s", "params": {"module": ["http_2xx"], "source": [f"netns {client}"]},
                 "static_configs": [{"targets": ["http://srv1.lab.test:8080/ok"]}],
                 "relabel_configs": [
                     {"source_labels": ["__address__"], "target_label": "__param_target"},
                     {"source_labels": ["__param_target"], "target_label": "target"},
                     {"target_label": "__address__", "replacement": f"127.0.0.1:{agent.port}"}]},
            ],
        }))
        am = Daemon("alertmanager", [alertmanager, f"--config.file={tmp_path / 'am.yml'}",
                                     f"--storage.path={tmp_path / 'am-data'}",
                                     f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
                    tmp_path)
        pr = Daemon("prometheus", [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                                   f"--web.listen-address=127.0.0.1:{prom_port}"], tmp_path)
        try:
            agent.start()
            am.start()
            pr.start()

            def scraping() -> bool:
                am.check_alive()
                pr.check_alive()
                up = query(prom, "up")
                return len(up) == 2 and all(r["value"][1] == "1" for r in up)

            wait_for(scraping, 60, "Prometheus to scrape both jobs")
            wait_for(lambda: query(prom, 'connprobe_probes_total{probe="api",result="success"} > 1'), 30,
                     "healthy baseline of api in Prometheus")
            # /probe through Prometheus: the verdict metrics, labelled by the relabelling
            got = query(prom, 'connprobe_probe_cause{job="connprobe-probe",cause="ok"}')
            assert got and got[0]["metric"]["target"] == "http://srv1.lab.test:8080/ok" and got[0]["value"][1] == "1"
            assert query(prom, 'probe_success{job="connprobe-probe"} == 1')

            with lab.policy_drop("srv2", direction="in", port=8080):
                def delivered() -> list[dict]:
                    pr.check_alive()
                    return [a for a in hook.alerts if a["labels"].get("alertname") == "ConnprobePolicyDrop"]

                alerts = wait_for(delivered, 120, "Alertmanager to deliver ConnprobePolicyDrop", interval=1)
                labels = alerts[0]["labels"]
                assert labels["cause"] == "policy_drop" and labels["probe"] == "api"
                assert labels["target"] == "http://srv2.lab.test:8080/ok" and labels["source"] == client
                # one alert per target across the fleet: the node is named in the description, not a label
                assert labels["severity"] == "critical" and "instance" not in labels
                assert alerts[0]["annotations"]["description"].endswith(f"Nodes: 127.0.0.1:{agent.port}.")
                assert alerts[0]["annotations"]["runbook_url"] == "docs/runbooks/ConnprobePolicyDrop.md"
                assert alerts[0]["status"] == "firing"
                assert "Policy drop on the path to http://srv2.lab.test:8080/ok" in alerts[0]["annotations"]["summary"]
                assert all(a["labels"].get("probe") != "web" for a in hook.alerts)

                wait_for(lambda: query(prom, exprs["ConnprobeProbeFailing"]), 60, "api failing over half its probes")
                panels = dashboard_queries("30s", "5m", "5s")  # durations that fit this short run
                empty_panels = [title for title, promql in panels if not query(prom, promql)]
                assert not empty_panels, f"dashboard queries without data: {empty_panels}"
                for name, expr in exprs.items():
                    result = query(prom, expr)
                    if name in FIRING:
                        assert result, f"{name}: no data"
                        assert all(r["metric"].get("probe") == "api" for r in result), (name, result)
                # an expected-empty alert is still a query over series that exist
                for name in EXPECTED_EMPTY:
                    for metric in set(METRIC_NAME.findall(exprs[name])):
                        assert query(prom, f"count({metric})"), f"{name}: {metric} has no series"
                assert query(prom, 'up{job="connprobe"} == 1')
        finally:
            for d in (pr, am):
                d.stop()
            agent.stop()
