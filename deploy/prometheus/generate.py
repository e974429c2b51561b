"""Generate connprobe's Prometheus alert rules, with the scrape job's selector and the runbooks' location as
parameters.

    python -m deploy.prometheus.generate                      # from the repository root: rewrites the rules
    python deploy/prometheus/generate.py --job-selector 'job="connprobe-agents",namespace="monitoring"' \\
        --runbook-base https://git.example.org/connprobe/blob/main/docs/runbooks -o my-connprobe-alerts.yml
    python deploy/prometheus/generate.py --check              # exit 1 when the committed file is stale

The committed deploy/prometheus/connprobe-alerts.yml is this script's output with the defaults
(`job="connprobe"`, runbooks at `docs/runbooks`); tests/deploy checks that they agree.

Fleet semantics (a DaemonSet runs the same probes on every node):
  - a probe alert is evaluated per node, then counted by (probe, target, source): one broken target raises one
    alert whose value is the number of affected nodes, and whose description lists them (a `query` in the
    annotation template: PromQL alone cannot put several label values into one label);
  - ConnprobeSingleNodeUnreachable fires, per node, when exactly one node fails a target that at least one
    other node reaches; ConnprobeProbeFailing then stays quiet for that target (one page, the right one);
  - the agent alerts about a shared cause (the agent down, a rejected config) are counted by `job`; those about
    a node's own kernel or process (BPF hooks, lost events, loop lag, sink queue, node retransmits) stay per node.
A node is named by its `node` label when the scrape adds one (deploy/prometheus/scrape-kubernetes.yml does),
else by `instance`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent.parent
RULES = ROOT / "connprobe-alerts.yml"
RUNBOOKS = REPO / "docs" / "runbooks"
DEFAULT_JOB_SELECTOR = 'job="connprobe"'
DEFAULT_RUNBOOK_BASE = "docs/runbooks"
PROBE = "probe, target, source"
PER_NODE = "instance, node, probe, target, source"
MAX_LISTED = 10  # nodes named in a description; the alert's value counts them all
_EXTRA = "\x00"  # where the description's query adds the alert's own labels
FAILURES = 'connprobe_probes_total{result="failure"}'


class Rules:
    """The alert rules for one job selector; expressions are built from small per-node pieces."""

    def __init__(self, job_selector: str = DEFAULT_JOB_SELECTOR, runbook_base: str = DEFAULT_RUNBOOK_BASE) -> None:
        self.job = job_selector.strip().strip("{}").strip()
        self.runbook_base = runbook_base.rstrip("/")

    # -- PromQL pieces -------------------------------------------------------------------------------------

    def sel(self, metric: str, *matchers: str) -> str:
        parts = [m for m in (self.job, *matchers) if m]
        return f"{metric}{{{','.join(parts)}}}" if parts else metric

    def ratio(self, numerator: str, window: str, extra: str = "") -> str:
        """Per node: the share of a probe's runs over `window` counted by the `numerator` selector."""
        metric, _, matcher = numerator.partition("{")
        num = self.sel(metric, matcher.rstrip("}"), extra)
        den = self.sel("connprobe_probes_total", extra)
        return (f"sum by ({PER_NODE}) (increase({num}[{window}]))\n/\n"
                f"sum by ({PER_NODE}) (increase({den}[{window}]))")

    def above(self, numerator: str, window: str, threshold: str, extra: str = "") -> str:
        return f"(\n{_indent(self.ratio(numerator, window, extra))}\n) {threshold}"

    def failing(self, extra: str = "") -> str:
        return self.above(FAILURES, "5m", "> 0.5", extra)

    def reaching(self) -> str:
        return self.above(FAILURES, "5m", "<= 0.5")

    def stale(self, extra: str = "") -> str:
        last = self.sel("connprobe_probe_last_timestamp_seconds", extra)
        interval = self.sel("connprobe_probe_interval_seconds", extra)
        return (f"(time() - {last} > 3 * {interval})\nor\n"
                f"(time() - {last} > 300 unless {interval})")

    # -- annotations ---------------------------------------------------------------------------------------

    @staticmethod
    def node_name(var: str) -> str:
        return f"{{{{ with {var}.node }}}}{{{{ . }}}}{{{{ else }}}}{{{{ {var}.instance }}}}{{{{ end }}}}"

    def node_list(self, per_node_query: str, labels: tuple[str, ...], *, with_cause: bool = False) -> str:
        """A template listing the nodes the per-node query returns for this alert's labels (up to MAX_LISTED).
        `per_node_query` holds _EXTRA where the alert's own label matchers go."""
        text = " ".join(per_node_query.split()).replace("%", "%%")
        text = text.replace(_EXTRA, ",".join(f"{label}=%[{i}]q" for i, label in enumerate(labels, 1)))
        go = text.replace("\\", "\\\\").replace('"', '\\"')
        args = " ".join(f"$labels.{label}" for label in labels)
        name = self.node_name("$s.Labels")
        cause = "{{ with $s.Labels.cause }} (last verdict: {{ . }}){{ end }}" if with_cause else ""
        ordered = 'query | sortByLabel "instance" | sortByLabel "node"'  # a stable sort: by node, else instance
        return (f'Nodes: {{{{ range $i, $s := printf "{go}" {args} | {ordered} }}}}'
                f"{{{{ if lt $i {MAX_LISTED} }}}}{{{{ if $i }}}}, {{{{ end }}}}{name}{cause}"
                f"{{{{ else if eq $i {MAX_LISTED} }}}}, ...{{{{ end }}}}{{{{ end }}}}.")

    def runbook(self, name: str) -> str:
        return f"{self.runbook_base}/{name}.md"

    def alert(self, name: str, expr: str, for_: str, labels: dict[str, str], summary: str,
              description: str) -> dict[str, Any]:
        return {"alert": name, "expr": expr, "for": for_, "labels": labels,
                "annotations": {"summary": summary, "description": description, "runbook_url": self.runbook(name)}}

    # -- the rules -----------------------------------------------------------------------------------------

    def probe_alerts(self) -> list[dict[str, Any]]:
        by = f"on ({PROBE})"
        single = f"{_count(self.failing())} == 1\nand {by}\n{_count(self.reaching())}"
        # the failing nodes, each with its last verdict's cause where the agent exports one
        causes_failing = (f"({self.sel('connprobe_probe_cause', _EXTRA)} == 1 "
                          f"and on (instance, {PROBE}) ({self.failing(_EXTRA)}))\n"
                          f"or on (instance, {PROBE}) ({self.failing(_EXTRA)})")
        target = "{{ $labels.target }}"
        from_ = "(probe {{ $labels.probe }}, from {{ $labels.source }})"
        rules = [
            self.alert(
                "ConnprobeProbeFailing",
                f"{_count(self.failing())}\nunless {by} (\n{_indent(single)}\n)", "5m",
                {"severity": "critical"},
                f"Probe {{{{ $labels.probe }}}} to {target} from {{{{ $labels.source }}}} is failing on "
                "{{ $value }} node(s)",
                "More than half of the probes failed over the last 5 minutes on {{ $value }} node(s) (a single node "
                "failing while others reach the target is ConnprobeSingleNodeUnreachable instead). "
                + self.node_list(causes_failing, ("probe", "target", "source"), with_cause=True),
            ),
            self.alert(
                "ConnprobeSingleNodeUnreachable",
                f"{self.failing()}\nand {by} (\n{_indent(single)}\n)", "5m",
                {"severity": "warning"},
                f"Only {self.node_name('$labels')} cannot reach {target} {from_}",
                "{{ $value | humanizePercentage }} of this node's probes failed over the last 5 minutes while "
                "the other nodes reach the target: the problem is on this node's path (its routes, firewall, "
                "network policy, DNS or interface), not the target.",
            ),
        ]
        for name, cause, window, for_, severity, summary, what in (
            ("ConnprobeDNSFailures", "dns", "10m", "5m", "warning", f"DNS failures for {target} {from_}",
             "attributed to DNS (resolution failed or was slow; the verdict's sub-cause says nxdomain, servfail, "
             "timeout, ...)"),
            ("ConnprobePolicyDrop", "policy_drop", "5m", "2m", "critical",
             f"Policy drop on the path to {target} {from_}",
             "dropped or rejected by a firewall or network policy; the kernel named the drop (see "
             "connprobe_probe_packet_drops_total by reason)"),
            ("ConnprobeRetransmitStorm", "tcp_retransmit", "10m", "5m", "warning", f"Packet loss to {target} {from_}",
             "slowed or failed by TCP retransmissions: packets are lost on the path but traffic gets through "
             "again"),
            ("ConnprobeUpstreamLatency", "upstream_latency", "10m", "10m", "warning", f"{target} is slow {from_}",
             "over their latency budget while the network delivered promptly: the server takes the time"),
        ):
            numerator = f'connprobe_verdicts_total{{cause="{cause}"}}'
            rules.append(self.alert(
                name, _count(self.above(numerator, window, "> 0.2")), for_,
                {"severity": severity, "cause": cause}, summary,
                f"On {{{{ $value }}}} node(s), more than 20% of the probes over {window[:-1]} minutes were {what}. "
                + self.node_list(self.above(numerator, window, "> 0.2", _EXTRA), ("probe", "target", "source")),
            ))
        rules.append(self.alert(
            "ConnprobeProbeStale", _count(self.stale()), "2m", {"severity": "warning"},
            f"Probe {{{{ $labels.probe }}}} to {target} from {{{{ $labels.source }}}} has not run on "
            "{{ $value }} node(s)",
            "No result for more than three intervals (five minutes when the interval is unknown): the "
            "scheduler is stuck, overloaded or the probe cannot start. "
            + self.node_list(self.stale(_EXTRA), ("probe", "target", "source")),
        ))
        return rules

    def node_alerts(self) -> list[dict[str, Any]]:
        rate = f"sum by (instance, node) (rate({self.sel('connprobe_node_tcp_retransmits_total')}[5m]))"
        return [self.alert(
            "ConnprobeNodeRetransmitStorm", f"{rate} > 100", "10m",
            {"severity": "warning", "cause": "tcp_retransmit"},
            f"TCP retransmit storm on {self.node_name('$labels')}",
            "The node retransmits {{ $value | humanize }} TCP segments per second (all traffic, counted in the "
            "kernel by connprobe's sensor).",
        )]

    def agent_alerts(self) -> list[dict[str, Any]]:
        node = self.node_name("$labels")
        up, reload = "up", "connprobe_config_last_reload_successful"
        down = f"{self.sel(up, _EXTRA)} == 0"
        rejected = f"{self.sel(reload, _EXTRA)} == 0"
        return [
            self.alert(
                "ConnprobeAgentDown", f"count by (job) ({self.sel(up)} == 0)", "5m", {"severity": "critical"},
                "{{ $value }} connprobe agent(s) of job {{ $labels.job }} are down",
                "Prometheus cannot scrape these agents: none of their probes run and their alerts cannot fire. "
                + self.node_list(down, ("job",)),
            ),
            self.alert(
                "ConnprobeBPFDetached",
                f"{self.sel('connprobe_bpf_attached')} == 0 or {self.sel('connprobe_kernel_sensor_up')} == 0", "5m",
                {"severity": "warning"},
                f"connprobe on {node} runs without kernel evidence",
                "{{ if $labels.hook }}The BPF program on {{ $labels.hook }} is not attached{{ else }}The kernel "
                'sensor is down{{ end }}: verdicts say "no kernel evidence" instead of naming drops and '
                "retransmits. Run `connprobe doctor` on the node.",
            ),
            self.alert(
                "ConnprobeKernelEventsLost", f"increase({self.sel('connprobe_kernel_events_lost_total')}[5m]) > 0",
                "5m", {"severity": "warning"},
                f"connprobe on {node} is losing kernel events",
                "{{ $value | humanize }} events on watched flows were lost over 5 minutes (ring buffer or queue "
                "full); verdicts are less confident and may say unknown.",
            ),
            self.alert(
                "ConnprobeEventLoopLag", f"{self.sel('connprobe_event_loop_lag_seconds')} > 0.5", "5m",
                {"severity": "warning"},
                f"connprobe on {node} is overloaded",
                "The agent's event loop lags by {{ $value | humanizeDuration }}; probe timings are suspect "
                "(connprobe_suspect_probes_total).",
            ),
            self.alert(
                "ConnprobeConfigReloadFailed", f"count by (job) ({self.sel(reload)} == 0)", "1m",
                {"severity": "warning"},
                "{{ $value }} connprobe agent(s) of job {{ $labels.job }} rejected their new configuration",
                "The last config reload failed, so these agents still run their previous probes. `connprobe "
                "check-config FILE` names the bad field; the agents' log has the same line. "
                + self.node_list(rejected, ("job",)),
            ),
            self.alert(
                "ConnprobeSinkDropping", f"increase({self.sel('connprobe_sink_dropped_total')}[10m]) > 0", "5m",
                {"severity": "warning"},
                f"connprobe on {node} drops verdicts for sink {{{{ $labels.sink }}}}",
                "{{ $value | humanize }} verdicts were dropped over 10 minutes because the {{ $labels.sink }} "
                "sink's queue was full (the sink is too slow); probing and the other sinks carry on.",
            ),
        ]

    def document(self) -> dict[str, Any]:
        return {"groups": [
            {"name": "connprobe-probes", "rules": self.probe_alerts()},
            {"name": "connprobe-node", "rules": self.node_alerts()},
            {"name": "connprobe-agent", "rules": self.agent_alerts()},
        ]}

    def render(self) -> str:
        return HEADER.format(job=self.job or "(none)", runbooks=self.runbook_base) + yaml.dump(
            self.document(), Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


HEADER = """\
# connprobe alert rules for Prometheus (rule_files: [connprobe-alerts.yml]).
# Generated by deploy/prometheus/generate.py (job selector: {job}; runbooks: {runbooks}): do not edit,
# run `python -m deploy.prometheus.generate --job-selector '...' --runbook-base URL -o FILE` for your own.
# Unit tests: promtool test rules deploy/prometheus/tests/connprobe-alerts.test.yml
#
# Probe alerts fire once per (probe, target, source) with the number of affected nodes as value and the nodes
# named in the description; ConnprobeSingleNodeUnreachable is the one node that cannot reach what the others
# reach. Ratios are taken from the counters (connprobe_probes_total, connprobe_verdicts_total) so they survive
# scrape gaps and restarts. The same alerts exist as Grafana-managed rules in deploy/grafana/provisioning/alerting/.
"""


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _count(per_node: str) -> str:
    """Per-node series → one per (probe, target, source), valued with the number of nodes."""
    return f"count by ({PROBE}) (\n{_indent(per_node)}\n)"


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job-selector", default=DEFAULT_JOB_SELECTOR,
                        help=f"label matchers that select the agents' scrape job (default: {DEFAULT_JOB_SELECTOR})")
    parser.add_argument("--runbook-base", default=DEFAULT_RUNBOOK_BASE,
                        help=f"where the runbooks are; runbook_url is BASE/ALERT.md (default: {DEFAULT_RUNBOOK_BASE})")
    parser.add_argument("-o", "--output", type=Path, default=RULES, help="file to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the output file is out of date")
    args = parser.parse_args(argv)
    if "\n" in args.job_selector or args.job_selector.count('"') % 2:
        parser.error(f"--job-selector: not a list of label matchers: {args.job_selector!r}")
    text = Rules(args.job_selector, args.runbook_base).render()
    if args.output.exists() and args.output.read_text() == text:
        return 0
    if args.check:
        print(f"out of date: {args.output}")
        return 1
    args.output.write_text(text)
    print(f"wrote: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
