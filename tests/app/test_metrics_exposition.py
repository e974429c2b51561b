"""The fast exposition of the per-probe series changes no byte: `exposition.golden.prom` is what commit 372be14
(prometheus_client's Gauge/Counter, before `LabelledValues`) wrote for 12 HTTP probes with one or two verdicts
each, plus the blackbox_exporter families added since (their HELP/TYPE lines, and probe_ip_protocol /
probe_ip_addr_hash of the probed address: only added lines); the same verdicts now give the same text with
every phase histogram on, and without the phase histograms
(the module default, `phase_histograms: []`) exactly that text minus the phase histograms' lines."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from connprobe.config import parse_config
from connprobe.metrics import HTTP_PHASES, LabelledValues, Metrics
from correlator.types import Cause, Verdict
from prober.types import DnsTransaction, PhaseSpan, ProbeKind, ProbeResult
from tests.agent.helpers import exposition

GOLDEN = (Path(__file__).parent / "exposition.golden.prom").read_text()
MS = 1_000_000
PHASE_LINE = "connprobe_probe_phase_duration_seconds_"


def _verdict(name: str, target: str, i: int) -> Verdict:
    t0 = 10_000 * MS + i
    spans = tuple(PhaseSpan(p, t0 + k * MS + i % 7, t0 + (k + 1) * MS + i % 13) for k, p in enumerate(HTTP_PHASES))
    dns = (DnsTransaction("10.0.0.53", "srv.example.", "A", t0, t0 + MS, "NOERROR", None),)
    r = ProbeResult(name, ProbeKind.HTTP, target, "host", t0, spans[-1].end_ns, True, None, "", spans, 200,
                    "10.0.0.1", (), dns, ())
    return Verdict(r, Cause.OK, None, 1.0, "healthy", (), ("succeeded",), f"{name}: ok")


def _exposition(**declare) -> tuple[Metrics, str]:
    m = Metrics(CollectorRegistry(), clock=lambda: 1_790_000_000.0)
    for i in range(12):
        name, target = f"probe-{i:05d}", f"http://srv{i}.example.internal:8080/healthz"
        m.declare(name, target, "host", kind=ProbeKind.HTTP, interval_s=10, labels=[("team", f"t{i % 7}")],
                  **declare)
        m.observe(_verdict(name, target, i))
    for i in range(0, 12, 3):  # a second verdict for some: counters to 2, the cause series replaced
        v = _verdict(f"probe-{i:05d}", f"http://srv{i}.example.internal:8080/healthz", i + 100)
        m.observe(dataclasses.replace(v, cause=Cause.UPSTREAM_LATENCY if i % 2 else v.cause))
    text = exposition(m.registry).decode()
    return m, "".join(line + "\n" for line in text.splitlines() if not line.startswith("connprobe_build_info{"))


@pytest.fixture(autouse=True)
def _no_created():
    prometheus_client.disable_created_metrics()  # as the agent does (and as the golden was written)
    yield
    prometheus_client.enable_created_metrics()


@pytest.mark.parametrize("declare", [{}, {"phase_histograms": HTTP_PHASES}], ids=["undeclared", "all_phases"])
def test_byte_identical_to_before_with_every_phase_histogram(declare):
    m, text = _exposition(**declare)
    assert text == GOLDEN
    assert exposition(m.registry) == generate_latest(m.registry)  # the Sample path agrees with the text path


def test_the_same_bytes_written_a_few_series_at_a_time(monkeypatch):
    """A scrape writes connprobe's large families in pieces (`PIECE_SERIES`) and sends pieces of about `chunk`
    bytes: written two series at a time and sent in small pieces, the text is still the golden one."""
    from connprobe import metrics
    from connprobe.web import exposition_chunks

    monkeypatch.setattr(metrics, "PIECE_SERIES", 2)  # histograms: max(2 // 16, 1) = one series a piece
    m, text = _exposition(phase_histograms=HTTP_PHASES)
    assert text == GOLDEN
    pieces = list(exposition_chunks(m.registry, chunk=300))
    assert len(pieces) > 100
    lines = b"".join(pieces).decode().splitlines()
    assert "".join(line + "\n" for line in lines if not line.startswith("connprobe_build_info{")) == GOLDEN
    assert len(list(m.duration_hist.text_pieces())) == 12 and len(list(m.success.text_pieces())) == 6


def test_default_module_drops_only_the_phase_histograms():
    m, text = _exposition(phase_histograms=())
    assert text == "".join(line + "\n" for line in GOLDEN.splitlines() if not line.startswith(PHASE_LINE))
    assert exposition(m.registry) == generate_latest(m.registry)


def test_some_phases_and_a_reload_that_takes_one_out():
    m, text = _exposition(phase_histograms=("connect", "processing"))
    phases = {line.split('phase="')[1].split('"')[0] for line in text.splitlines() if line.startswith(PHASE_LINE)}
    assert phases == {"connect", "processing"}
    m.declare("probe-00000", "http://srv0.example.internal:8080/healthz", "host", kind=ProbeKind.HTTP,
              phase_histograms=("processing",))
    hist = [line for line in exposition(m.registry).decode().splitlines() if line.startswith(PHASE_LINE)]
    assert not any('phase="connect",probe="probe-00000"' in line for line in hist)
    assert any('phase="connect",probe="probe-00001"' in line for line in hist)
    assert any('phase="processing",probe="probe-00000"' in line for line in hist)


def test_labelled_values_match_prometheus_client():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    g, c = LabelledValues("g", "a gauge", ["a"], "gauge", ours), LabelledValues("c_total", "a counter", ["a"],
                                                                                  "counter", ours)
    pg = prometheus_client.Gauge("g", "a gauge", ["a"], registry=theirs)
    pc = prometheus_client.Counter("c_total", "a counter", ["a"], registry=theirs)
    for v in ["x", 'q"uo\\te\n', "z"]:
        g.labels(v).set(1e-7)
        pg.labels(v).set(1e-7)
        c.labels(v).inc(3)
        pc.labels(v).inc(3)
    g.remove("x")
    pg.remove("x")
    g.labels("x").set(float("inf"))
    pg.labels("x").set(float("inf"))
    assert exposition(ours) == generate_latest(ours) == generate_latest(theirs)
    with pytest.raises(ValueError):
        c.labels("x").inc(-1)
    with pytest.raises(ValueError):
        g.labels("x", "y")


def test_module_setting_reaches_the_metrics():
    cfg = parse_config("""
modules:
  lean: {prober: http}
  phased: {prober: http, phase_histograms: [connect, transfer]}
probes:
  - {name: a, module: lean, target: "http://srv1.lab.test/"}
  - {name: b, module: phased, target: "http://srv1.lab.test/"}
""")
    by_name = {p.name: p.module.phase_histograms for p in cfg.probes}
    assert by_name == {"a": (), "b": ("connect", "transfer")}
