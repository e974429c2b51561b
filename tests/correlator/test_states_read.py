"""The app's sensor sends a watched flow's TCP state changes only to the states the correlator reads
(`TCP_STATES_READ`; the others are counted in the kernel): on every recording — made with every change sent —
the events without the other changes give exactly the verdict of `verdicts.golden.json` (cause, confidence,
rule, facts, summary, evidence), the two-node recordings the same verdict with node B's answer filtered alike,
and the evidence window closes at the same moment as events arrive."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from correlator import correlate
from correlator.join import TCP_STATES_READ, window_complete
from correlator.record import load

HERE = Path(__file__).parent
RECORDINGS = sorted((HERE / "recordings").glob("*.json"))
TWO_NODE = sorted((HERE / "recordings" / "twonode").glob("*.json"))
GOLDEN = json.loads((HERE / "verdicts.golden.json").read_text())


def sent(events):
    """What the app's sensor sends of these events: state changes only to the states the correlator reads."""
    return tuple(e for e in events if e.kind != "state" or e.tcp_state in TCP_STATES_READ)


def _as_golden(v) -> dict:
    return {"cause": str(v.cause), "sub_cause": v.sub_cause, "confidence": v.confidence, "rule": v.rule,
            "facts": list(v.facts), "summary": v.summary, "evidence": [e.ts_ns for e in v.evidence]}


def test_the_recordings_have_state_changes_the_sensor_no_longer_sends():
    every = [e for p in RECORDINGS for e in load(p).events if e.kind == "state"]
    assert {e.tcp_state for e in every} - TCP_STATES_READ  # SYN_SENT, FIN_WAIT1, ...: the filter removes some
    assert sum(len(sent(load(p).events)) for p in RECORDINGS) < sum(len(load(p).events) for p in RECORDINGS)


@pytest.mark.parametrize("path", RECORDINGS, ids=[p.stem for p in RECORDINGS])
def test_same_verdict_without_the_unread_state_changes(path):
    rec = load(path)
    v = correlate(rec.result, sent(rec.events), budget_ns=rec.budget_ns, coverage=rec.coverage)
    assert _as_golden(v) == GOLDEN[path.stem]
    assert v == correlate(rec.result, rec.events, budget_ns=rec.budget_ns, coverage=rec.coverage)


@pytest.mark.parametrize("path", RECORDINGS + TWO_NODE, ids=[p.stem for p in RECORDINGS + TWO_NODE])
def test_the_window_closes_at_the_same_event(path):
    """As the events arrive one by one, the window is complete after the same one with or without the unread
    state changes (then no late event can come)."""
    rec = load(path)
    events = sorted(rec.events, key=lambda e: e.ts_ns)
    for i in range(len(events) + 1):
        upto = events[:i]
        assert window_complete(rec.result, sent(upto)) == window_complete(rec.result, upto), (path.stem, i)


@pytest.mark.parametrize("path", TWO_NODE, ids=[p.stem for p in TWO_NODE])
def test_same_two_node_verdict_with_both_sensors_filtered(path):
    rec = load(path)
    remote = tuple(dataclasses.replace(r, events=tuple(x for x in r.events if x.event in set(sent(
        y.event for y in r.events)))) for r in rec.remote)
    kw = dict(coverage=rec.coverage)
    filtered = correlate(rec.result, sent(rec.events), remote=remote, **kw)
    every = correlate(rec.result, rec.events, remote=rec.remote, **kw)
    assert filtered.remote == remote  # the answers it was given (fewer state events), and nothing else differs:
    assert dataclasses.replace(filtered, remote=()) == dataclasses.replace(every, remote=())
