"""The two-node lab's recordings (`python -m connprobe.lab.twonode record tests/correlator/recordings/twonode`):
node A's events plus what node B's agent answered, with its node. Replayed: node A alone gets its single-node
verdict, with node B's answer the verdict of the fault matrix; a remote answer whose timing cannot be placed
safely, or a peer that did not answer, changes nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bpf.types import RemoteEvidence
from connprobe.lab.twonode import TWO_NODE_SCENARIOS
from correlator import correlate
from correlator.record import dumps, load, loads

RECORDINGS = sorted((Path(__file__).parent / "recordings" / "twonode").glob("*.json"))
BY_NAME = {s.name: s for s in TWO_NODE_SCENARIOS}


def test_every_two_node_scenario_has_a_recording():
    assert {p.stem for p in RECORDINGS} == set(BY_NAME)


@pytest.mark.parametrize("path", RECORDINGS, ids=[p.stem for p in RECORDINGS])
def test_recording_alone_and_with_node_b(path):
    rec = load(path)
    sc = BY_NAME[path.stem]
    assert loads(dumps(rec)) == rec
    alone = correlate(rec.result, rec.events, coverage=rec.coverage)
    assert (alone.sub_cause or str(alone.cause)) == sc.alone
    if not sc.asks:
        assert not rec.remote
        return
    assert rec.remote and all(r.node == "node-b" and r.available for r in rec.remote)
    v = correlate(rec.result, rec.events, coverage=rec.coverage, remote=rec.remote)
    assert (str(v.cause), v.sub_cause) == (sc.expected, sc.expected_sub), v.facts
    assert sc.fact in v.facts[0]
    if sc.agrees:  # decided locally; node B's answer adds whether it agrees and changes nothing else
        assert (v.sub_cause, v.confidence, v.facts[0]) == (alone.sub_cause, alone.confidence, alone.facts[0])
        assert any(f.startswith(sc.agrees) and "contradicts this" not in f for f in v.facts), v.facts


@pytest.mark.parametrize("path", [p for p in RECORDINGS if BY_NAME[p.stem].asks and load(p).remote[0].events],
                         ids=lambda p: p.stem)
def test_unsafe_ordering_or_a_silent_peer_does_not_decide(path):
    rec = load(path)
    alone = correlate(rec.result, rec.events, coverage=rec.coverage)
    blurred = tuple(dataclasses.replace(r, events=tuple(dataclasses.replace(e, uncertainty_ns=2_000_000_000)
                                                           for e in r.events), uncertainty_ns=2_000_000_000)
                    for r in rec.remote)
    v = correlate(rec.result, rec.events, coverage=rec.coverage, remote=blurred)
    assert (v.cause, v.sub_cause) == (alone.cause, alone.sub_cause)
    assert any("cannot be placed safely" in f for f in v.facts)
    down = (RemoteEvidence("http://10.0.0.12:9516", False, "no answer within 500 ms"),)
    v = correlate(rec.result, rec.events, coverage=rec.coverage, remote=down)
    assert (v.cause, v.sub_cause) == (alone.cause, alone.sub_cause)
    assert "remote evidence unavailable from http://10.0.0.12:9516 (no answer within 500 ms)" in v.facts
