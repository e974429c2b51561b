"""A probe's `labels:` reach `/metrics` (as `connprobe_probe_labels{probe, ...} 1`, joinable on `probe`) and
the JSON log's verdict documents; bad label names, clashes with connprobe's own labels, too many labels and
too long values are one-line config errors."""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest
import yaml

from connprobe.agent import Agent
from connprobe.config import MAX_LABEL_VALUE, MAX_LABELS, RESERVED_LABELS, ConfigError, parse_config
from connprobe.metrics import PROBE_LABELS
from tests.agent.helpers import Upstream, exposition, parse_samples, samples_named, write_config

MODULES = "modules: {t: {prober: tcp, timeout: 1s}}\n"


def _probe_with(labels) -> str:
    return MODULES + yaml.safe_dump({"probes": [{"name": "p", "module": "t", "target": "127.0.0.1:9",
                                                 "labels": labels}]})


def test_valid_labels_are_kept():
    cfg = parse_config(_probe_with({"team": "payments", "tier": "1", "_x9": "", "Region": "eu-west/1 a"}))
    assert cfg.probes[0].labels == {"team": "payments", "tier": "1", "_x9": "", "Region": "eu-west/1 a"}


@pytest.mark.parametrize(("labels", "error"), [
    ({"9team": "a"}, "probe \"p\": labels: '9team': not a label name (letters, digits and _, not starting with "
                     "a digit, at most 64 characters)"),
    ({"team-name": "a"}, "probe \"p\": labels: 'team-name': not a label name"),
    ({"x" * 65: "a"}, "probe \"p\": labels: 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx…: not a label name"),
    ({"__meta": "a"}, "probe \"p\": labels: '__meta': names starting with __ are reserved for Prometheus"),
    ({"target": "a"}, "probe \"p\": labels: 'target': connprobe's own label (reserved: arch, capability, cause,"),
    ({"instance": "a"}, "probe \"p\": labels: 'instance': connprobe's own label"),
    ({"team": "v" * (MAX_LABEL_VALUE + 1)}, f"probe \"p\": labels: team: value longer than {MAX_LABEL_VALUE} "
                                            "characters"),
    ({"team": "a\nb"}, "probe \"p\": labels: team: value 'a\\nb' has a control character"),
    ({f"l{i}": "v" for i in range(MAX_LABELS + 1)}, f"probe \"p\": labels: {MAX_LABELS + 1} labels, at most "
                                                    f"{MAX_LABELS}"),
    ({"team": 3}, "probe \"p\": labels.team: must be a valid string"),
    (["team"], "probe \"p\": labels: must be a valid dictionary"),
])
def test_bad_labels_are_one_line_errors(labels, error):
    with pytest.raises(ConfigError) as exc:
        parse_config(_probe_with(labels))
    assert len(exc.value.errors) == 1 and "\n" not in exc.value.errors[0]
    assert exc.value.errors[0].startswith(error), exc.value.errors[0]


def test_every_label_connprobe_uses_is_reserved():
    """A probe label must never collide with a label on one of connprobe's own series."""
    from prometheus_client import CollectorRegistry

    from connprobe.metrics import Metrics

    reg = CollectorRegistry()
    Metrics(reg)
    used = set(PROBE_LABELS)
    for family in reg.collect():
        for sample in family.samples:
            used |= set(sample.labels)
    for metric in reg._collector_to_names:  # the label names of every labelled metric, even without samples
        used |= set(getattr(metric, "_labelnames", ()) or getattr(metric, "labelnames", ()))
    assert used, "no label names found"
    assert used <= RESERVED_LABELS, used - RESERVED_LABELS


async def test_labels_reach_metrics_and_the_log_and_follow_a_reload(tmp_path):
    up = await Upstream().start()
    log = io.StringIO()
    cfg = write_config(tmp_path / "c.yml", [
        {"name": "pay", "module": "http_2xx", "target": up.url("/ok"), "interval": "0.2s", "timeout": "150ms",
         "jitter": 0, "labels": {"team": "payments", "tier": "1"}},
        {"name": "plain", "module": "http_2xx", "target": up.url("/ok"), "interval": "0.2s", "timeout": "150ms",
         "jitter": 0}])
    a = Agent(cfg, kernel=False, log_stream=log)
    await a.start()
    try:
        await a.wait_ready(10)
        samples = parse_samples(exposition(a.registry).decode())
        assert samples_named(samples, "connprobe_probe_labels") == {
            frozenset({("probe", "pay"), ("team", "payments"), ("tier", "1")}): 1.0,
            frozenset({("probe", "plain")}): 1.0}
        assert "# TYPE connprobe_probe_labels gauge" in exposition(a.registry).decode()

        deadline = time.monotonic() + 20
        while not {"pay", "plain"} <= set(a.board.names()):
            assert time.monotonic() < deadline, "no verdicts"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # the log sink runs in a thread
        docs = [json.loads(line) for line in log.getvalue().splitlines()]
        by_probe = {d["probe"]: d["labels"] for d in docs}
        assert by_probe == {"pay": {"team": "payments", "tier": "1"}, "plain": {}}

        # a reload that changes only the labels changes the labels series (and nothing else of the probe)
        write_config(cfg, [
            {"name": "pay", "module": "http_2xx", "target": up.url("/ok"), "interval": "0.2s", "timeout": "150ms",
             "jitter": 0, "labels": {"team": "billing"}}])
        outcome = await a.reload()
        assert outcome.ok and outcome.changed == ("pay",) and outcome.removed == ("plain",), outcome
        deadline = time.monotonic() + 20
        while True:
            samples = parse_samples(exposition(a.registry).decode())
            got = samples_named(samples, "connprobe_probe_labels")
            if got == {frozenset({("probe", "pay"), ("team", "billing")}): 1.0}:
                break
            assert time.monotonic() < deadline, got
            await asyncio.sleep(0.05)
        assert samples_named(samples, "probe_success", probe="pay")
    finally:
        await a.stop()
        await up.stop()


def test_the_documented_join_puts_the_labels_on_probe_success(tmp_path):
    """README's query, evaluated by promtool on what two agents (two nodes) export: each probe_success series
    gains its probe's labels; a probe without labels keeps its series."""
    import shutil
    import subprocess

    from prometheus_client import CollectorRegistry

    from connprobe.metrics import Metrics
    from connprobe.metrics import format_labels as fmt
    from correlator.types import Cause, Verdict
    from prober.types import ProbeKind, ProbeResult

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install the Debian package `prometheus` (scripts/setup does)")
    series: dict[str, str] = {}
    for node in ("node1:9516", "node2:9516"):
        m = Metrics(CollectorRegistry())
        for name, labels in (("pay", {"team": "payments", "tier": "1"}), ("plain", {})):
            m.declare(name, "127.0.0.1:9", "host", kind=ProbeKind.TCP, labels=labels.items())
            r = ProbeResult(name, ProbeKind.TCP, "127.0.0.1:9", "host", 0, 1_000_000, True)
            m.observe(Verdict(r, Cause.OK, None, 0.9, "healthy", (), (), "ok"))
        for (sample, lbls), value in parse_samples(exposition(m.registry).decode()).items():
            if sample in ("probe_success", "connprobe_probe_labels"):
                series[sample + fmt([*lbls, ("instance", node), ("job", "connprobe")])] = f"{value:g}x5"
    query = "probe_success * on(instance, probe) group_left(team, tier) connprobe_probe_labels"
    base = {"instance": "node1:9516", "job": "connprobe", "source": "host", "target": "127.0.0.1:9"}
    expected = [{"labels": "{" + ",".join(f'{k}="{v}"' for k, v in sorted(lbl.items())) + "}", "value": 1}
                for lbl in ({**base, "probe": "pay", "team": "payments", "tier": "1"}, {**base, "probe": "plain"})]
    test = {"tests": [{"interval": "1m",
                       "input_series": [{"series": k, "values": v} for k, v in series.items()],
                       "promql_expr_test": [{"expr": query + ' and on(instance) probe_success{instance="node1:9516"}',
                                             "eval_time": "2m", "exp_samples": expected}]}]}
    path = tmp_path / "join.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    out = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
