"""The alert rules as a Prometheus-operator `PrometheusRule` (deploy/kubernetes/prometheus-operator/): the
`groups` of deploy/prometheus/connprobe-alerts.yml, unchanged, in the custom resource.

    python -m deploy.prometheus.operator            # from the repository root: rewrites prometheusrule.yaml
    python -m deploy.prometheus.operator --check    # exit 1 when it is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "connprobe-alerts.yml"
OUTPUT = HERE.parent / "kubernetes" / "prometheus-operator" / "prometheusrule.yaml"
HEADER = """\
# connprobe's alert rules for the Prometheus operator: spec.groups is deploy/prometheus/connprobe-alerts.yml's
# `groups` unchanged (tests/deploy/test_prometheus_operator.py checks they agree and runs promtool on them).
# Generated: python -m deploy.prometheus.operator (after changing the rules).
# The operator's Prometheus picks it up when its ruleSelector matches these labels (add the label yours selects,
# often `release: <helm release>`).
"""


def render(rules_text: str | None = None) -> str:
    rules = yaml.safe_load(rules_text if rules_text is not None else RULES.read_text())
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "connprobe", "namespace": "connprobe", "labels": {"app.kubernetes.io/name": "connprobe"}},
        "spec": {"groups": rules["groups"]},
    }
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed file is out of date")
    args = parser.parse_args(argv)
    text = render()
    if OUTPUT.exists() and OUTPUT.read_text() == text:
        return 0
    if args.check:
        print(f"out of date: {OUTPUT}")
        return 1
    OUTPUT.write_text(text)
    print(f"wrote: {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
