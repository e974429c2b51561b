"""Generate connprobe's Grafana dashboards and Grafana-managed alert rules with grafana-foundation-sdk.

    python -m deploy.grafana.generate            # from the repository root; or
    python deploy/grafana/generate.py [--check]  # --check: fail if the committed files are out of date

Writes (committed; tests/deploy checks that regenerating changes nothing):
    deploy/grafana/dashboards/connprobe-overview.json   success ratio per target, causes over time
    deploy/grafana/dashboards/connprobe-target.json     one target: phases, DNS, verdicts, kernel evidence
    deploy/grafana/dashboards/connprobe-agent.json      agent health: BPF hooks, lost events, loop lag, node kernel
    deploy/grafana/provisioning/alerting/connprobe-alerts.yaml
        the alerts of deploy/prometheus/connprobe-alerts.yml as Grafana-managed rules: the PromQL is the same
        (so it returns only the breaching series) and a math expression fires for each series returned.

Dashboards take their Prometheus data source from a `datasource` variable, so they import into any Grafana.
The alert rules need a data source UID (Grafana-managed rules cannot use variables): PROMETHEUS_UID, provisioned
by provisioning/datasources/connprobe-prometheus.yaml.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from grafana_foundation_sdk.builders import alerting, expr, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DashboardLink,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.alerting import RelativeTimeRange
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DynamicConfigValue,
    MatcherConfig,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from connprobe.causes import CAUSES

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent.parent
DASHBOARDS = ROOT / "dashboards"
ALERTING = ROOT / "provisioning" / "alerting"
PROMETHEUS_RULES = REPO / "deploy" / "prometheus" / "connprobe-alerts.yml"
PROMETHEUS_UID = "connprobe-prometheus"
FOLDER_UID = "connprobe"
TAGS = ["connprobe", "generated"]

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
# every query selects the agents' scrape job and the nodes picked in the variables (a DaemonSet's point is the
# differences between nodes); `node` exists where the scrape adds it (scrape-kubernetes.yml), else it matches all
FLEET = 'job=~"$job",node=~"$node",instance=~"$instance"'
SEL = FLEET + ',probe=~"$probe",target=~"$target",source=~"$source"'
NODE_LEGEND = "{{node}} {{instance}}"
# what each cause means, for the descriptions of the panels that show causes (colours: `cause_colours`)
CAUSE_MEANINGS = "\n".join(f"- {cause}: {look.meaning}" for cause, look in CAUSES.items())


# -- helpers ---------------------------------------------------------------------------------------------


def q(expression: str, legend: str = "", ref: str = "A", *, instant: bool = False) -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expression).ref_id(ref).datasource(DS)
    if legend:
        query = query.legend_format(legend)
    return query.instant() if instant else query.range()


def thresholds(*steps: tuple[float | None, str]) -> ThresholdsConfig:
    return ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([Threshold(v, c) for v, c in steps])


def ts(title: str, *queries: prometheus.Dataquery, unit: str = "short", description: str = "", height: int = 8,
       span: int = 12, stacked: bool = False, bars: bool = False) -> timeseries.Panel:
    panel = (
        timeseries.Panel().title(title).description(description).datasource(DS).unit(unit)
        .height(height).span(span).fill_opacity(20 if stacked else 10).line_width(1)
        .legend(cb.VizLegendOptions().display_mode(common.LegendDisplayMode.TABLE)
                .placement(common.LegendPlacement.BOTTOM).show_legend(True).calcs(["lastNotNull", "max"]))
        .tooltip(cb.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING))
    )
    if stacked:
        panel = panel.stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL))
    if bars:
        panel = panel.draw_style(common.GraphDrawStyle.BARS).fill_opacity(80)
    for query in queries:
        panel = panel.with_target(query)
    return panel


def st(title: str, query: prometheus.Dataquery, *, unit: str = "short", description: str = "", span: int = 6,
       height: int = 4, steps: tuple[tuple[float | None, str], ...] = ((None, "green"),)) -> stat.Panel:
    return (
        stat.Panel().title(title).description(description).datasource(DS).unit(unit).height(height).span(span)
        .thresholds(thresholds(*steps)).color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.NONE)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(query)
    )


def cause_colours(panel: Any, *, suffix: str = "") -> Any:
    """Paint each series named after a cause (or ending in `suffix` + the cause) in the cause table's colour."""
    for cause, look in CAUSES.items():
        matcher = (MatcherConfig("byRegexp", f".*{suffix}{cause}$") if suffix
                   else MatcherConfig("byName", str(cause)))
        fixed = {"mode": "fixed", "fixedColor": look.colour}
        panel = panel.with_override(matcher, [DynamicConfigValue("color", fixed)])
    return panel


def cause_value_colours(panel: table.Panel, field: str = "cause") -> table.Panel:
    """Colour the cells of a table's `field` column by the cause they hold, with the cause table's colours."""
    mapping = ValueMap({str(cause): ValueMappingResult(color=look.colour, index=i)
                        for i, (cause, look) in enumerate(CAUSES.items())})
    # align and inspect are the defaults Grafana fills in; spelled out, the JSON survives a round trip through
    # the SDK's types unchanged (tests/deploy/test_grafana.py)
    return panel.mappings([mapping]).align(common.FieldTextAlignment.AUTO).inspect(False).with_override(
        MatcherConfig("byName", field),
        [DynamicConfigValue("custom.cellOptions", {"type": "color-background"})])


def fleet_variables(dash: Dashboard, metric: str) -> Dashboard:
    """datasource, then job → node → instance, each chained on the previous ones (all multi-value, default All)."""
    dash = dash.with_variable(DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
    for name, label, chained in (
        ("job", "Job", metric),
        ("node", "Node", f'{metric}{{job=~"$job"}}'),
        ("instance", "Agent", f'{metric}{{job=~"$job",node=~"$node"}}'),
    ):
        dash = dash.with_variable(
            QueryVariable(name).label(label).datasource(DS)
            .query({"query": f"label_values({chained}, {name})", "refId": f"var-{name}"})
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
        )
    return dash


def probe_variables(dash: Dashboard, *, multi: bool = True) -> Dashboard:
    dash = fleet_variables(dash, "connprobe_probes_total")
    for name, label, chained in (
        ("probe", "Probe", f"connprobe_probes_total{{{FLEET}}}"),
        ("target", "Target", f'connprobe_probes_total{{{FLEET},probe=~"$probe"}}'),
        ("source", "Source", f'connprobe_probes_total{{{FLEET},probe=~"$probe",target=~"$target"}}'),
    ):
        var = (
            QueryVariable(name).label(label).datasource(DS)
            .query({"query": f"label_values({chained}, {name})", "refId": f"var-{name}"})
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
        )
        var = var.multi(True).include_all(True).all_value(".*") if multi or name == "source" else var.multi(False)
        dash = dash.with_variable(var)
    return dash


def dashboard(uid: str, title: str, description: str) -> Dashboard:
    return (
        Dashboard(title).uid(uid).description(description).tags(TAGS).editable().refresh("30s")
        .time("now-3h", "now").timezone("browser").tooltip(DashboardCursorSync.CROSSHAIR)
        .link(DashboardLink("connprobe").type("dashboards").tags(["connprobe"]).as_dropdown(True)
              .include_vars(True).keep_time(True))
    )


# -- dashboards ------------------------------------------------------------------------------------------


def overview() -> Dashboard:
    sel = SEL
    dash = probe_variables(dashboard(
        "connprobe-overview", "connprobe / Overview",
        "Synthetic probes: which targets fail and why (the correlator's cause for every failed or slow probe).",
    ))
    ratio = (f'sum(increase(connprobe_probes_total{{{sel},result="success"}}[$__range])) / '
             f"sum(increase(connprobe_probes_total{{{sel}}}[$__range]))")
    return (
        dash.with_row(Row("Now"))
        .with_panel(st("Success ratio (time range)", q(ratio, instant=True), unit="percentunit",
                       steps=((None, "red"), (0.95, "orange"), (0.99, "green")),
                       description="Successful probes over all probes in the selected time range."))
        .with_panel(st("Probes failing now", q(f"count(probe_success{{{sel}}} == 0) or vector(0)", instant=True),
                       steps=((None, "green"), (1, "red")),
                       description="Probes whose last result failed (probe_success == 0)."))
        .with_panel(st("Failed or slow verdicts (time range)",
                       q(f'sum(increase(connprobe_verdicts_total{{{sel},cause!="ok"}}[$__range]))', instant=True),
                       steps=((None, "green"), (1, "orange")), unit="short"))
        .with_panel(st("Kernel sensor", q(f"min(connprobe_kernel_sensor_up{{{FLEET}}})", instant=True),
                       steps=((None, "red"), (1, "green")),
                       description="1 when every agent's kernel sensor is up; 0 means verdicts lack kernel evidence."))
        .with_row(Row("Success and causes"))
        .with_panel(ts(
            "Success ratio per target",
            q(f'sum by (target) (rate(connprobe_probes_total{{{sel},result="success"}}[$__rate_interval])) / '
              f"sum by (target) (rate(connprobe_probes_total{{{sel}}}[$__rate_interval]))", "{{target}}"),
            unit="percentunit", span=24,
            description="Successful probes / all probes per target (every source and probe to that target).",
        ).min(0).max(1))
        .with_panel(ts(
            "Success ratio per node",
            q(f'sum by (node, instance) (rate(connprobe_probes_total{{{sel},result="success"}}[$__rate_interval])) / '
              f"sum by (node, instance) (rate(connprobe_probes_total{{{sel}}}[$__rate_interval]))", NODE_LEGEND),
            unit="percentunit", span=12,
            description="Successful probes / all probes of the selected targets, per node: one node below the "
                        "others is a problem on that node's path (ConnprobeSingleNodeUnreachable).",
        ).min(0).max(1))
        .with_panel(ts(
            "Failing probes per node",
            q(f"sum by (node, instance) (1 - probe_success{{{sel}}})", NODE_LEGEND),
            span=12, description="Probes whose last result failed, per node.",
        ))
        .with_panel(cause_colours(ts(
            "Causes over time",
            q(f'sum by (cause) (increase(connprobe_verdicts_total{{{sel},cause!="ok"}}[$__rate_interval]))',
              "{{cause}}"),
            span=12, stacked=True, bars=True,
            description="Failed or slow probes by the cause the correlator named.\n\n" + CAUSE_MEANINGS,
        )))
        .with_panel(cause_colours(ts(
            "Causes per target",
            q(f'sum by (target, cause) (increase(connprobe_verdicts_total{{{sel},cause!="ok"}}[$__rate_interval]))',
              "{{target}}: {{cause}}"),
            span=12, stacked=True, bars=True,
        ), suffix=": "))
        .with_panel(cause_value_colours(
            table.Panel().title("Last verdict per probe").datasource(DS).span(24).height(8)
            .description("The cause of each probe's last verdict (connprobe_probe_cause) and whether it succeeded.")
            .with_target(q(f"connprobe_probe_cause{{{sel}}} == 1", ref="A", instant=True)
                         .format(PromQueryFormat.TABLE))
        ))
        .with_row(Row("Latency"))
        .with_panel(ts(
            "Probe duration p95 per target",
            q(f"histogram_quantile(0.95, sum by (target, le) "
              f"(rate(connprobe_probe_duration_seconds_bucket{{{sel}}}[$__rate_interval])))", "{{target}}"),
            unit="s", span=24,
        ))
    )


def target() -> Dashboard:
    sel = SEL
    dash = probe_variables(dashboard(
        "connprobe-target", "connprobe / Target",
        "One probe and target: where the time goes (phases), DNS, verdicts and the kernel's evidence.",
    ), multi=False)
    return (
        dash.with_row(Row("Last probe"))
        .with_panel(st("Success", q(f"min(probe_success{{{sel}}})", instant=True), span=4,
                       steps=((None, "red"), (1, "green"))))
        .with_panel(st("Duration", q(f"max(probe_duration_seconds{{{sel}}})", instant=True), unit="s", span=4))
        .with_panel(st("HTTP status", q(f"max(probe_http_status_code{{{sel}}})", instant=True), span=4,
                       steps=((None, "red"), (200, "green"), (400, "orange"), (500, "red"))))
        .with_panel(cause_colours(st("Last cause", q(f"connprobe_probe_cause{{{sel}}} == 1", "{{cause}}", instant=True),
                                     span=8, description="The cause the correlator named for the last result.\n\n"
                                     + CAUSE_MEANINGS)))
        .with_panel(st("Confidence", q(f"max(connprobe_probe_verdict_confidence{{{sel}}})", instant=True),
                       unit="percentunit", span=4, steps=((None, "orange"), (0.7, "green"))))
        .with_panel(ts("Success per node", q(f"min by (node, instance) (probe_success{{{sel}}})", NODE_LEGEND),
                       span=12, description="The last result on each node (1 success, 0 failure)."))
        .with_panel(ts("Duration per node",
                       q(f"max by (node, instance) (probe_duration_seconds{{{sel}}})", NODE_LEGEND), unit="s",
                       span=12, description="How long the last probe took on each node."))
        .with_row(Row("Phases"))
        .with_panel(ts(
            "HTTP phases of the last probe",
            q(f"sum by (phase) (probe_http_duration_seconds{{{sel}}})", "{{phase}}"),
            unit="s", stacked=True,
            description="blackbox_exporter's phases: resolve, connect, tls, processing (to first byte), transfer.",
        ))
        .with_panel(ts(
            "Phase duration p95",
            q(f"histogram_quantile(0.95, sum by (phase, le) "
              f"(rate(connprobe_probe_phase_duration_seconds_bucket{{{sel}}}[$__rate_interval])))", "{{phase}}"),
            unit="s",
        ))
        .with_panel(ts("DNS lookup time", q(f"probe_dns_lookup_time_seconds{{{sel}}}", "{{source}}"), unit="s",
                       span=6))
        .with_panel(ts(
            "DNS answers",
            q(f"sum by (result) (increase(connprobe_dns_queries_total{{{sel}}}[$__rate_interval]))", "{{result}}"),
            span=6, stacked=True, bars=True,
            description="The probes' own DNS queries by answer: rcode (noerror, nxdomain, servfail, ...) or no_answer.",
        ))
        .with_panel(cause_colours(ts(
            "Verdicts by cause",
            q(f"sum by (cause) (increase(connprobe_verdicts_total{{{sel}}}[$__rate_interval]))", "{{cause}}"),
            stacked=True, bars=True,
        )))
        .with_row(Row("Kernel evidence"))
        .with_panel(ts(
            "Retransmissions in this probe's evidence",
            q(f"sum(rate(connprobe_probe_tcp_retransmits_total{{{sel}}}[$__rate_interval]))", "retransmits/s"),
            unit="short",
            description="TCP retransmissions (data and SYN) the kernel reported on this probe's own connections.",
        ))
        .with_panel(ts(
            "Drops in this probe's evidence, by reason",
            q(f"sum by (reason) (rate(connprobe_probe_packet_drops_total{{{sel}}}[$__rate_interval]))", "{{reason}}"),
            unit="short", stacked=True,
            description="Packets of this probe the kernel dropped, by the running kernel's drop reason "
                        "(NETFILTER_DROP: a firewall or network policy).",
        ))
    )


def agent() -> Dashboard:
    inst = FLEET
    dash = fleet_variables(
        dashboard("connprobe-agent", "connprobe / Agent health",
                  "The agents themselves: BPF hooks, lost kernel events, event-loop lag, node-level kernel counters."),
        "connprobe_kernel_sensor_up",
    )
    return (
        dash.with_row(Row("Kernel sensor"))
        .with_panel(st("Sensor up", q(f"connprobe_kernel_sensor_up{{{inst}}}", "{{instance}}", instant=True),
                       steps=((None, "red"), (1, "green")), span=8))
        .with_panel(st("BPF hooks attached",
                       q(f"connprobe_bpf_attached{{{inst}}}", "{{instance}} {{hook}}", instant=True),
                       steps=((None, "red"), (1, "green")), span=16,
                       description="One box per tracepoint; red: not attached (run `connprobe doctor`)."))
        .with_panel(ts(
            "Kernel events seen / lost",
            q(f"sum by (instance) (rate(connprobe_kernel_events_seen_total{{{inst}}}[$__rate_interval]))",
              "{{instance}} seen"),
            q(f"sum by (instance) (rate(connprobe_kernel_events_lost_total{{{inst}}}[$__rate_interval]))",
              "{{instance}} lost", ref="B"),
            unit="short", description="Events on watched flows per second; any loss lowers verdict confidence.",
        ))
        .with_panel(ts(
            "Event-loop lag",
            q(f"connprobe_event_loop_lag_seconds{{{inst}}}", "{{instance}}"), unit="s",
        ))
        .with_panel(ts(
            "Suspect probes",
            q(f"sum by (instance) (rate(connprobe_suspect_probes_total{{{inst}}}[$__rate_interval]))",
              "{{instance}}"),
            description="Probes whose timing is suspect because the agent's event loop was starved.",
        ))
        .with_panel(ts(
            "Time since each probe last ran",
            q(f"time() - max by (probe) (connprobe_probe_last_timestamp_seconds{{{inst}}})", "{{probe}}"),
            unit="s",
        ))
        .with_row(Row("Node kernel (all traffic)"))
        .with_panel(ts(
            "TCP retransmits",
            q(f"sum by (instance) (rate(connprobe_node_tcp_retransmits_total{{{inst}}}[$__rate_interval]))",
              "{{instance}}"),
            unit="short",
        ))
        .with_panel(ts(
            "Packet drops by reason (top 10)",
            q(f"topk(10, sum by (reason) (rate(connprobe_node_packet_drops_total{{{inst}}}[$__rate_interval])))",
              "{{reason}}"),
            unit="short", stacked=True,
        ))
    )


DASHBOARD_BUILDERS = {"connprobe-overview": overview, "connprobe-target": target, "connprobe-agent": agent}


# -- Grafana-managed alerts ------------------------------------------------------------------------------

_NODE_LIST = re.compile(r"\s*Nodes: \{\{.*$", re.S)


def _grafana_template(text: str) -> str:
    """Prometheus annotation template → Grafana's: `$value` is `$values.A.Value`; no `query` function, so the
    list of affected nodes (the last sentence of a fleet alert's description) points to the dashboards instead."""
    text = _NODE_LIST.sub(" Grafana cannot list the nodes here: see the node and instance variables of the "
                          "connprobe dashboards.", text)
    return text.replace("$value ", "$values.A.Value ")


def _duration_seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smh])", text))


def _uid(name: str) -> str:
    return "connprobe-" + re.sub(r"(?<!^)(?=[A-Z])", "-", name.removeprefix("Connprobe")).lower()


def alert_rules() -> dict[str, Any]:
    source = yaml.safe_load(PROMETHEUS_RULES.read_text())
    groups = []
    for group in source["groups"]:
        rules = []
        for r in group["rules"]:
            window = max([_duration_seconds(w) for w in re.findall(r"\[(\w+)\]", r["expr"])] or [300])
            rule = (
                alerting.Rule(r["alert"]).uid(_uid(r["alert"])).condition("C")
                .with_query(alerting.Query("A").datasource_uid(PROMETHEUS_UID)
                            .relative_time_range(RelativeTimeRange(from_val=window, to=0))
                            .model(prometheus.Dataquery().expr(r["expr"].strip()).instant().ref_id("A")
                                   .datasource(DataSourceRef(type_val="prometheus", uid=PROMETHEUS_UID))))
                .with_query(alerting.Query("C").datasource_uid("__expr__")
                            .model(expr.TypeMath().expression("is_number($A)").ref_id("C")
                                   .datasource(DataSourceRef(type_val="__expr__", uid="__expr__"))))
                .for_val(r.get("for", "0s")).no_data_state("OK").exec_err_state("Error")
                .labels(dict(r.get("labels", {})))
                .annotations({k: _grafana_template(v) for k, v in r.get("annotations", {}).items()})
            ).build()
            data = json.loads(json.dumps(rule, cls=JSONEncoder))
            for group_level in ("folderUID", "orgID", "ruleGroup"):  # given once per group in provisioning files
                data.pop(group_level, None)
            rules.append(data)
        groups.append({"orgId": 1, "name": group["name"], "folder": "connprobe", "interval": "1m", "rules": rules})
    return {"apiVersion": 1, "groups": groups}


# -- output ----------------------------------------------------------------------------------------------


def render_dashboard(builder: Dashboard) -> str:
    return json.dumps(builder.build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


HEADER = "# Generated by deploy/grafana/generate.py from deploy/prometheus/connprobe-alerts.yml: do not edit.\n"


def outputs() -> dict[Path, str]:
    files = {DASHBOARDS / f"{uid}.json": render_dashboard(build()) for uid, build in DASHBOARD_BUILDERS.items()}
    files[ALERTING / "connprobe-alerts.yaml"] = HEADER + yaml.safe_dump(alert_rules(), sort_keys=False, width=120)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a committed file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{'out of date' if args.check else 'wrote'}: {path.relative_to(REPO)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
