"""connprobe/causes.py: one entry per correlator `Cause`, and the outputs that show causes take their colours
from it (the status page's legend is checked in tests/agent/test_agent.py, on a running agent's page)."""

from __future__ import annotations

import io
import json
import re

from rich.console import Console

from connprobe.causes import CAUSES, FALLBACK_COLOUR, colour
from connprobe.commands.diagnose import print_attempt
from connprobe.diagnosis import Diagnosis
from correlator.types import Cause, KernelCoverage, Verdict
from prober.types import ProbeKind, ProbeResult
from tests.deploy.helpers import DEPLOY


def test_every_cause_has_one_colour_and_a_one_line_meaning():
    assert list(CAUSES) == list(Cause)  # every member, in the enum's order
    colours = [look.colour for look in CAUSES.values()]
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colours), colours
    assert len(set(colours)) == len(colours), "two causes share a colour"
    for cause, look in CAUSES.items():
        assert look.meaning and "\n" not in look.meaning and len(look.meaning) <= 80, cause


def test_colour_takes_a_cause_or_its_name_and_an_unknown_name_gets_unknowns_colour():
    assert colour(Cause.POLICY_DROP) == colour("policy_drop") == CAUSES[Cause.POLICY_DROP].colour
    assert colour("no_such_cause") == FALLBACK_COLOUR == CAUSES[Cause.UNKNOWN].colour


def _rgb(hex_colour: str) -> str:
    return ";".join(str(int(hex_colour[i:i + 2], 16)) for i in (1, 3, 5))


def test_diagnose_paints_the_verdict_in_its_causes_colour():
    for cause in (Cause.OK, Cause.POLICY_DROP, Cause.UNKNOWN):
        r = ProbeResult("p", ProbeKind.HTTP, "http://x/", "host", 0, 1_000_000, cause == Cause.OK)
        v = Verdict(r, cause, None, 0.9, "test", (), (), f"p: {cause} by hand")
        buf = io.StringIO()
        out = Console(file=buf, force_terminal=True, color_system="truecolor", width=160)
        print_attempt(out, Diagnosis(1, v, (), KernelCoverage()), 1, {})
        verdict_line = next(line for line in buf.getvalue().splitlines() if "verdict:" in line)
        assert f"38;2;{_rgb(colour(cause))}" in verdict_line, (cause, verdict_line)


def _cause_panels() -> list[dict]:
    found = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            legends = [t.get("legendFormat", "") for t in panel.get("targets", [])]
            if any("{{cause}}" in legend for legend in legends) or "connprobe_probe_cause" in json.dumps(
                    panel.get("targets", [])):
                found.append(panel)
    return found


def test_every_dashboard_panel_showing_causes_colours_each_cause_as_the_table_does():
    panels = _cause_panels()
    assert {p["title"] for p in panels} >= {"Causes over time", "Causes per target", "Last verdict per probe",
                                           "Last cause", "Verdicts by cause"}
    for panel in panels:
        if panel["type"] == "table":  # the cause column's cells, by value
            mapping = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
            assert {c: m["color"] for c, m in mapping.items()} == {str(c): look.colour for c, look in CAUSES.items()}
            continue
        fixed = {o["matcher"]["options"]: o["properties"][0]["value"]["fixedColor"]
                 for o in panel["fieldConfig"]["overrides"] if o["properties"][0]["id"] == "color"}
        for cause, look in CAUSES.items():  # series named `cause` or `target: cause`
            names = [m for m in fixed if m == cause or m.endswith(f": {cause}$")]
            assert len(names) == 1, (panel["title"], cause, list(fixed))
            assert fixed[names[0]] == look.colour, (panel["title"], cause)
