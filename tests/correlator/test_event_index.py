"""The correlator's speed-ups change no verdict: every recording gets exactly the verdict it got before them
(`verdicts.golden.json`: cause, confidence, rule, facts, evidence, as the correlator without the speed-ups gave
them on these recordings and rules — written from main at 6cfb81a+; a deliberate rule change rewrites it with
`python tests/correlator/test_event_index.py --write-golden` and says so in its commit).
`EventIndex` (the join over events indexed by endpoint) gives exactly what the scan of a plain list gives:
the same verdict on every recording, alone or drowned in unrelated traffic that shares its ports outside the
probe's span, in other namespaces, added out of order; and the same joined events on arbitrary event sets."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
from builders import CLIENT, CLIENT_NS, DNS_FLOW, MS, OTHER_NS, SERVER, SERVER_NS, T0, TCP_FLOW, result
from hypothesis import given, settings
from hypothesis import strategies as st

from bpf.types import KernelEvent
from correlator import EventIndex, correlate, join
from correlator.record import load

HERE = Path(__file__).parent
RECORDINGS = sorted((HERE / "recordings").glob("*.json"))
GOLDEN = json.loads((HERE / "verdicts.golden.json").read_text())


def _as_golden(v) -> dict:
    return {"cause": str(v.cause), "sub_cause": v.sub_cause, "confidence": v.confidence, "rule": v.rule,
            "facts": list(v.facts), "summary": v.summary, "evidence": [e.ts_ns for e in v.evidence]}


def test_golden_covers_every_recording():
    assert set(GOLDEN) == {p.stem for p in RECORDINGS}


@pytest.mark.parametrize("path", RECORDINGS, ids=[p.stem for p in RECORDINGS])
def test_same_verdict_as_before_the_speed_ups(path):
    rec = load(path)
    v = correlate(rec.result, rec.events, budget_ns=rec.budget_ns, coverage=rec.coverage)
    assert _as_golden(v) == GOLDEN[path.stem]


def _noise(rec, n: int = 3000, seed: int = 7) -> list[KernelEvent]:
    """Unrelated events around the probe: other hosts' connections, and events on the probe's own local
    ports that fall outside its span, in another namespace, or on the other protocol."""
    rnd = random.Random(seed)
    r = rec.result
    ends = list(r.local_endpoints())
    base = rec.events[0] if rec.events else KernelEvent(r.start_ns, "state", "tcp", CLIENT, 1, SERVER, 2, CLIENT_NS)
    out = []
    for i in range(n):
        ts = r.start_ns + rnd.randrange(-2_000 * MS, r.end_ns - r.start_ns + 2_000 * MS)
        if ends and i % 5 == 0:
            proto, addr, port = rnd.choice(ends)
            choice = i % 4
            if choice == 0:  # own endpoint, far outside the span
                ts = r.start_ns - 10_000 * MS - i
            elif choice == 1:  # own tuple, another namespace
                out.append(dataclasses.replace(base, ts_ns=ts, proto=proto, saddr=addr, sport=port, netns=OTHER_NS,
                                               kind="state"))
                continue
            elif choice == 2:  # same port, other protocol
                proto = "udp" if proto == "tcp" else "tcp"
            out.append(dataclasses.replace(base, ts_ns=ts, proto=proto, saddr=addr, sport=port))
            continue
        out.append(dataclasses.replace(base, ts_ns=ts, saddr="10.99.0.1", sport=20000 + i, daddr="10.99.0.2",
                                       dport=30000 + i % 7, netns=SERVER_NS))
    return out


@pytest.mark.parametrize("path", RECORDINGS, ids=[p.stem for p in RECORDINGS])
def test_same_verdict_through_the_index_on_every_recording(path):
    rec = load(path)
    kw = dict(budget_ns=rec.budget_ns, coverage=rec.coverage)
    plain = correlate(rec.result, rec.events, **kw)
    assert correlate(rec.result, EventIndex(rec.events), **kw) == plain
    window = [*_noise(rec), *rec.events]
    random.Random(3).shuffle(window)  # added out of timestamp order
    scanned = correlate(rec.result, window, **kw)
    assert scanned == plain  # the noise is unrelated (a check of the noise, not of the index)
    assert correlate(rec.result, EventIndex(window), **kw) == plain
    assert join(rec.result, EventIndex(window)) == join(rec.result, window)


def test_index_counts_and_grows():
    r = result()
    ix = EventIndex()
    assert len(ix) == 0 and join(r, ix) == []
    e = KernelEvent(T0 + MS, "state", "tcp", CLIENT, TCP_FLOW.local_port, SERVER, 8080, CLIENT_NS,
                    tcp_state="ESTABLISHED")
    ix.add(e)
    ix.extend([dataclasses.replace(e, ts_ns=T0)])
    assert len(ix) == 2
    assert [m.event.ts_ns for m in join(r, ix)] == [T0, T0 + MS]


_ports = st.sampled_from([TCP_FLOW.local_port, TCP_FLOW.remote_port, DNS_FLOW.local_port, 53, 41000])
_addrs = st.sampled_from([CLIENT, SERVER, DNS_FLOW.remote_addr, "10.99.0.1"])
_events = st.builds(
    KernelEvent,
    ts_ns=st.integers(T0 - 20 * MS, T0 + 600 * MS),
    kind=st.sampled_from(["state", "drop", "retransmit", "reset_rx", "icmp_send"]),
    proto=st.sampled_from(["tcp", "udp"]),
    saddr=_addrs, sport=_ports, daddr=_addrs, dport=_ports,
    netns=st.sampled_from([CLIENT_NS, SERVER_NS, OTHER_NS]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_events, max_size=60), st.integers(0, 300 * MS))
def test_index_joins_like_the_scan(events, grace):
    r = result(flows=(TCP_FLOW, DNS_FLOW))
    assert join(r, EventIndex(events), grace) == join(r, events, grace)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write-golden"]:
        golden = {}
        for p in RECORDINGS:
            rec = load(p)
            golden[p.stem] = _as_golden(correlate(rec.result, rec.events, budget_ns=rec.budget_ns,
                                                  coverage=rec.coverage))
        (HERE / "verdicts.golden.json").write_text(json.dumps(golden, indent=1, sort_keys=True, ensure_ascii=False)
                                                   + "\n")
