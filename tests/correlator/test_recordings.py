"""The rules on recordings made in the lab (`python -m connprobe.lab.scenarios record tests/correlator/recordings`):
the right cause for each, and — with evidence truncated or missing — lower confidence, never a confident
wrong cause."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connprobe.lab.scenarios import SCENARIOS
from correlator import KernelCoverage, correlate
from correlator.record import Recording, dumps, load, loads

RECORDINGS = sorted((Path(__file__).parent / "recordings").glob("*.json"))
BY_NAME = {s.name: s for s in SCENARIOS}
CONFIDENT = 0.5


def scenario_of(rec: Recording):
    return BY_NAME[rec.scenario.split(" ")[0]]


def test_every_scenario_has_a_recording():
    assert {p.stem for p in RECORDINGS} == set(BY_NAME)


def test_the_file_keeps_its_keys():
    """`Recording.coverage` is written and read as "evidence", the key the checked-in files have."""
    text = RECORDINGS[0].read_text()
    assert '"evidence": {' in text
    rec = loads(text)
    doc = json.loads(dumps(rec))
    assert doc["evidence"] == json.loads(text)["evidence"] and "coverage" not in doc


@pytest.mark.parametrize("path", RECORDINGS, ids=[p.stem for p in RECORDINGS])
def test_recording_gets_its_cause(path):
    rec = load(path)
    sc = scenario_of(rec)
    v = correlate(rec.result, rec.events, budget_ns=rec.budget_ns, coverage=rec.coverage)
    assert str(v.cause) == sc.expected == rec.expected_cause
    if sc.expected_sub:
        assert v.sub_cause == sc.expected_sub
    assert v.confidence >= sc.min_confidence
    assert loads(dumps(rec)) == rec


@pytest.mark.parametrize("path", RECORDINGS, ids=[p.stem for p in RECORDINGS])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_evidence_never_gives_a_confident_wrong_cause(path, data):
    rec = load(path)
    if not rec.events:
        return
    keep = data.draw(st.lists(st.booleans(), min_size=len(rec.events), max_size=len(rec.events)))
    kept = tuple(e for e, k in zip(rec.events, keep, strict=True) if k)
    lost = len(rec.events) - len(kept)
    if lost == 0:
        return
    full = correlate(rec.result, rec.events, budget_ns=rec.budget_ns, coverage=rec.coverage)
    v = correlate(rec.result, kept, budget_ns=rec.budget_ns, coverage=KernelCoverage(lost_events=lost))
    if v.cause != full.cause:
        assert v.confidence < CONFIDENT, (v.cause, v.confidence, v.facts)
    assert v.confidence < full.confidence
    assert any("were lost" in f for f in v.facts)


@pytest.mark.parametrize("path", RECORDINGS, ids=[p.stem for p in RECORDINGS])
def test_without_a_sensor_a_verdict_is_right_or_says_it_guesses(path):
    rec = load(path)
    off = KernelCoverage(available=False, reason="not root")
    v = correlate(rec.result, (), budget_ns=rec.budget_ns, coverage=off)
    if str(v.cause) != rec.expected_cause:
        assert v.confidence <= CONFIDENT, (v.cause, v.confidence)
    if v.confidence <= CONFIDENT and v.cause != "ok":
        assert any("no kernel evidence" in f or "without kernel evidence" in f for f in v.facts), v.facts


def test_a_recording_from_another_lab_run_with_shifted_clocks_still_joins():
    rec = load(next(p for p in RECORDINGS if p.stem == "syn_drop_server"))
    shift = 7_000_000_000
    r = dataclasses.replace(rec.result, start_ns=rec.result.start_ns + shift, end_ns=rec.result.end_ns + shift,
                            phases=tuple(dataclasses.replace(p, start_ns=p.start_ns + shift, end_ns=p.end_ns + shift)
                                         for p in rec.result.phases))
    events = [dataclasses.replace(e, ts_ns=e.ts_ns + shift) for e in rec.events]
    assert correlate(r, events, coverage=rec.coverage).cause == "policy_drop"
    assert correlate(r, rec.events, coverage=rec.coverage).cause != "policy_drop"  # unshifted: out of window
