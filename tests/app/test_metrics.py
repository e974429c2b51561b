"""The exporter's metric set, driven by hand-built verdicts and read back from the text exposition."""

from __future__ import annotations

import dataclasses

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bpf.hooks import HookStatus
from bpf.sensor import SensorCounters
from bpf.types import EventKind, KernelEvent
from connprobe.metrics import HTTP_PHASES, Metrics, clean_target, probe_registry
from correlator.types import Cause, Verdict
from prober.types import DnsTransaction, ErrorKind, Flow, PhaseSpan, ProbeKind, ProbeResult, Proto

MS = 1_000_000
T0 = 5_000 * MS
CLIENT, SERVER = "10.77.1.2", "10.77.2.11"
CLIENT_PORT = 43117
FLOW = Flow(Proto.TCP, CLIENT, CLIENT_PORT, SERVER, 8080, 4026531001)
URL = "http://srv1.lab.test:8080/ok"
ALLOWED_LABELS = {"probe", "target", "source", "cause", "reason", "phase", "hook", "result", "kind", "le",
                  "version", "python", "implementation", "arch"}  # the last four: connprobe_build_info, constants


def result(*, name: str = "web", ok: bool = True, error: ErrorKind | None = None, target: str = URL,
           phases: dict[str, tuple[float, float]] | None = None, status: int | None = 200,
           kind: ProbeKind = ProbeKind.HTTP, validators: tuple[str, ...] = (), suspect: bool = False,
           dns: tuple[DnsTransaction, ...] = (), source: str = "cp-client") -> ProbeResult:
    if phases is None:
        phases = {"resolve": (0, 2), "connect": (2, 5), "processing": (5, 45), "transfer": (45, 50)}
    spans = tuple(PhaseSpan(n, T0 + int(a * MS), T0 + int(b * MS)) for n, (a, b) in phases.items())
    end = max((s.end_ns for s in spans), default=T0 + 10 * MS)
    return ProbeResult(name, kind, target, source, T0, end, ok, error, "", spans, status, SERVER, (FLOW,),
                       dns, validators, suspect)


def event(kind: EventKind, **kw) -> KernelEvent:
    return KernelEvent(T0 + MS, kind, "tcp", CLIENT, CLIENT_PORT, SERVER, 8080, FLOW.netns, **kw)


def verdict(r: ProbeResult, cause: Cause = Cause.OK, evidence: tuple[KernelEvent, ...] = (),
            confidence: float = 0.9) -> Verdict:
    return Verdict(r, cause, None, confidence, "test", evidence, (), "by hand")


def samples(text: bytes | str) -> dict[tuple[str, frozenset], float]:
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def val(text: bytes, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def lab(probe: str = "web", target: str = URL, source: str = "cp-client", **more: str) -> dict[str, str]:
    return {"probe": probe, "target": target, "source": source, **more}


def fresh() -> Metrics:
    return Metrics(CollectorRegistry(), clock=lambda: 1_700_000_000.0)


def test_uses_the_registry_passed_in_never_the_global_one():
    before = {m.name for m in REGISTRY.collect()}
    reg = CollectorRegistry()
    m = Metrics(reg)
    m.observe(verdict(result()))
    assert m.registry is reg
    assert {m.name for m in REGISTRY.collect()} == before
    assert b'probe_success{probe="web"' in generate_latest(reg)
    # a default-constructed set gets its own registry too, so two sets never collide
    assert Metrics().registry is not Metrics().registry


def test_declared_probe_has_every_phase_and_zero_counters_before_its_first_result():
    m = fresh()
    m.declare("web", URL, "cp-client", kind=ProbeKind.HTTP, interval_s=15)
    text = generate_latest(m.registry)
    for phase in HTTP_PHASES:
        assert val(text, "probe_http_duration_seconds", **lab(phase=phase)) == 0.0
        # histograms of phases appear once a phase is reached (they would otherwise dominate the exposition)
        assert val(text, "connprobe_probe_phase_duration_seconds_count", **lab(phase=phase)) is None
    for res in ("success", "failure"):
        assert val(text, "connprobe_probes_total", **lab(result=res)) == 0.0
    for cause in Cause:
        assert val(text, "connprobe_verdicts_total", **lab(cause=str(cause))) == 0.0
    assert val(text, "connprobe_probe_interval_seconds", **lab()) == 15.0
    assert val(text, "probe_success", **lab()) is None  # no result yet: no last-probe gauge


def test_healthy_http_probe_sets_blackbox_gauges_and_counts():
    m = fresh()
    m.observe(verdict(result()))
    text = generate_latest(m.registry)
    assert val(text, "probe_success", **lab()) == 1.0
    assert val(text, "probe_duration_seconds", **lab()) == 0.05
    assert val(text, "probe_http_status_code", **lab()) == 200.0
    assert val(text, "probe_dns_lookup_time_seconds", **lab()) == 0.002
    assert val(text, "probe_failed_due_to_regex", **lab()) == 0.0
    assert val(text, "probe_http_duration_seconds", **lab(phase="processing")) == 0.04
    assert val(text, "probe_http_duration_seconds", **lab(phase="tls")) == 0.0  # never reached, still present
    assert val(text, "connprobe_probes_total", **lab(result="success")) == 1.0
    assert val(text, "connprobe_probes_total", **lab(result="failure")) == 0.0
    assert val(text, "connprobe_verdicts_total", **lab(cause="ok")) == 1.0
    assert val(text, "connprobe_probe_cause", **lab(cause="ok")) == 1.0
    assert val(text, "connprobe_probe_last_timestamp_seconds", **lab()) == 1_700_000_000.0
    assert val(text, "connprobe_probe_duration_seconds_count", **lab()) == 1.0
    assert val(text, "connprobe_probe_duration_seconds_bucket", **lab(le="0.05")) == 1.0
    assert val(text, "connprobe_probe_duration_seconds_bucket", **lab(le="0.025")) == 0.0
    assert val(text, "connprobe_probe_phase_duration_seconds_sum", **lab(phase="connect")) == 0.003
    # exposition lines as a scraper sees them
    assert (f'probe_http_duration_seconds{{phase="connect",probe="web",source="cp-client",target="{URL}"}} 0.003'
            in text.decode())


def test_policy_drop_counts_cause_and_kernel_evidence_per_probe():
    m = fresh()
    m.observe(verdict(result()))
    evidence = (
        event(EventKind.DROP, reason="NETFILTER_DROP", tcp_flags="S"),
        event(EventKind.DROP, reason="NETFILTER_DROP", tcp_flags="S"),
        event(EventKind.DROP, reason=None),
        event(EventKind.RETRANSMIT, tcp_state="SYN_SENT"),
        event(EventKind.RETRANSMIT, tcp_state="SYN_SENT"),
        event(EventKind.STATE, tcp_state="CLOSE"),
    )
    failed = result(ok=False, error=ErrorKind.CONNECT_TIMEOUT, status=None,
                    phases={"resolve": (0, 1), "connect": (1, 3001)})
    m.observe(verdict(failed, Cause.POLICY_DROP, evidence, confidence=0.85))
    text = generate_latest(m.registry)
    assert val(text, "probe_success", **lab()) == 0.0
    assert val(text, "probe_http_status_code", **lab()) == 0.0
    assert val(text, "probe_http_duration_seconds", **lab(phase="processing")) == 0.0  # not reached this time
    assert val(text, "connprobe_probes_total", **lab(result="failure")) == 1.0
    assert val(text, "connprobe_probes_total", **lab(result="success")) == 1.0
    assert val(text, "connprobe_verdicts_total", **lab(cause="policy_drop")) == 1.0
    assert val(text, "connprobe_verdicts_total", **lab(cause="ok")) == 1.0
    assert val(text, "connprobe_probe_packet_drops_total", **lab(reason="NETFILTER_DROP")) == 2.0
    assert val(text, "connprobe_probe_packet_drops_total", **lab(reason="unknown")) == 1.0
    assert val(text, "connprobe_probe_tcp_retransmits_total", **lab()) == 2.0
    assert val(text, "connprobe_probe_verdict_confidence", **lab()) == 0.85
    # the last-cause gauge moved: one series per probe, never a stale "ok" beside the new cause
    assert val(text, "connprobe_probe_cause", **lab(cause="policy_drop")) == 1.0
    assert val(text, "connprobe_probe_cause", **lab(cause="ok")) is None
    assert val(text, "connprobe_probe_phase_duration_seconds_count", **lab(phase="connect")) == 2.0
    assert val(text, "connprobe_probe_phase_duration_seconds_bucket", **lab(phase="connect", le="1.0")) == 1.0


def test_labels_are_bounded_no_ports_addresses_or_query_strings():
    m = fresh()
    secret = "https://alice:s3cret@api.example.com:8443/v1/health?token=abc123&x=1#frag"
    r = result(target=secret, ok=False, error=ErrorKind.CONNECT_RESET, status=None)
    m.observe(verdict(r, Cause.POLICY_DROP, (event(EventKind.RESET_RX), event(EventKind.DROP, reason="TCP_RESET"))))
    m.observe_sensor(SensorCounters({(EventKind.DROP, "NETFILTER_DROP"): 3}, {}, 0, 0, 0, 5), 0,
                     [HookStatus("skb:kfree_skb", EventKind.DROP, True, "")])
    text = generate_latest(m.registry).decode()
    for leak in ("s3cret", "alice", "token", "abc123", "frag", str(CLIENT_PORT), CLIENT):
        assert leak not in text, leak
    assert 'target="https://api.example.com:8443/v1/health"' in text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            assert set(s.labels) <= ALLOWED_LABELS, (s.name, s.labels)


def test_clean_target():
    assert clean_target("http://u:p@h.test/x?q=1#f") == "http://h.test/x"
    assert clean_target("https://[fd96::10]:443/p?x") == "https://[fd96::10]:443/p"
    assert clean_target("srv1.lab.test:8080") == "srv1.lab.test:8080"
    assert clean_target("srv1.lab.test") == "srv1.lab.test"
    assert clean_target("http://h.test") == "http://h.test"


def test_forget_removes_every_series_of_a_removed_probe_only():
    m = fresh()
    m.declare("web", URL, "cp-client", kind=ProbeKind.HTTP, interval_s=10)
    m.observe(verdict(result(), Cause.OK))
    m.observe(verdict(result(source="host", target="http://u:p@srv1.lab.test:8080/ok?x=1"), Cause.OK))
    assert val(generate_latest(m.registry), "probe_success", **lab(source="host")) == 1.0
    fail = result(ok=False, error=ErrorKind.CONNECT_TIMEOUT, status=None)
    m.observe(verdict(fail, Cause.POLICY_DROP, (event(EventKind.DROP, reason="NETFILTER_DROP"),)))
    m.observe(verdict(result(name="api", target="http://api.lab.test/", suspect=True), Cause.OK))
    m.forget("web")
    text = generate_latest(m.registry).decode()
    assert 'probe="web"' not in text
    assert 'probe="api"' in text
    assert m.probes_known() == {"api"}
    assert val(text.encode(), "connprobe_suspect_probes_total", **lab("api", "http://api.lab.test/")) == 1.0
    # a probe that comes back starts from scratch
    m.observe(verdict(result()))
    assert val(generate_latest(m.registry), "connprobe_probes_total", **lab(result="success")) == 1.0
    m.forget("nonexistent")  # harmless


def test_forget_one_target_or_source_keeps_the_rest_of_the_probe():
    m = fresh()
    m.observe(verdict(result()))
    m.observe(verdict(result(target="http://srv2.lab.test/")))
    m.observe(verdict(result(source="host")))
    m.forget("web", target="http://srv2.lab.test/?ignored=1")
    text = generate_latest(m.registry).decode()
    assert "srv2.lab.test" not in text
    assert val(text.encode(), "probe_success", **lab()) == 1.0
    assert val(text.encode(), "probe_success", **lab(source="host")) == 1.0
    m.forget("web", source="host")
    assert val(generate_latest(m.registry), "probe_success", **lab(source="host")) is None
    assert val(generate_latest(m.registry), "probe_success", **lab()) == 1.0
    assert m.probes_known() == {"web"}
    m.forget("web", target=URL, source="cp-client")
    assert m.probes_known() == set()
    assert 'probe="web"' not in generate_latest(m.registry).decode()


def test_dns_probe_and_regex_failure():
    m = fresh()
    tx = DnsTransaction("10.77.2.53", "srv1.lab.test.", "A", T0, T0 + 7 * MS, "NXDOMAIN", None)
    lost = DnsTransaction("10.77.2.53", "srv1.lab.test.", "A", T0, None, None, None)
    r = result(name="dns", kind=ProbeKind.DNS, target="srv1.lab.test", phases={}, status=None, ok=False,
               error=ErrorKind.DNS_NXDOMAIN, dns=(tx, tx, lost))
    m.observe(verdict(r, Cause.DNS))
    # blackbox's meaning: the lookup of the server's name (none here); the questions are the request phase
    assert val(generate_latest(m.registry), "probe_dns_lookup_time_seconds", **lab("dns", "srv1.lab.test")) == 0.0
    exposition = generate_latest(m.registry)
    assert val(exposition, "probe_dns_duration_seconds", **lab("dns", "srv1.lab.test"), phase="request") == 0.01
    m.observe(verdict(dataclasses.replace(r, dns=(tx,)), Cause.DNS))
    regex = result(ok=False, error=ErrorKind.VALIDATION, validators=("fail_if_body_not_matches_regexp",))
    m.observe(verdict(regex, Cause.HTTP_ERROR))
    text = generate_latest(m.registry)
    dns = lab("dns", "srv1.lab.test")
    assert val(text, "probe_dns_duration_seconds", **dns, phase="request") == 0.007
    assert val(text, "connprobe_dns_queries_total", **dns, result="nxdomain") == 3.0
    assert val(text, "connprobe_dns_queries_total", **dns, result="no_answer") == 1.0
    assert val(text, "probe_http_duration_seconds", **dns, phase="connect") is None  # not an HTTP probe
    assert val(text, "connprobe_verdicts_total", **dns, cause="dns") == 2.0
    assert val(text, "probe_failed_due_to_regex", **lab()) == 1.0


def test_sensor_counters_node_level_and_agent_health():
    m = fresh()
    m.observe_sensor(None, 0, [HookStatus("tcp:tcp_retransmit_skb", EventKind.RETRANSMIT, False, "no BTF")])
    text = generate_latest(m.registry)
    assert val(text, "connprobe_kernel_sensor_up") == 0.0
    assert val(text, "connprobe_bpf_attached", hook="tcp:tcp_retransmit_skb") == 0.0
    counters = SensorCounters(
        events={(EventKind.RETRANSMIT, ""): 7, (EventKind.SYNACK_RETRANSMIT, ""): 2,
                (EventKind.DROP, "NETFILTER_DROP"): 4, (EventKind.DROP, "TCP_INVALID_SEQUENCE"): 1,
                (EventKind.STATE, ""): 50},
        watched={(EventKind.RETRANSMIT, ""): 3}, lost=5, ring_lost=4, queue_lost=1, delivered=120)
    status = [HookStatus("tcp:tcp_retransmit_skb", EventKind.RETRANSMIT, True, ""),
              HookStatus("skb:kfree_skb", EventKind.DROP, False, "tracepoint missing")]
    m.observe_sensor(counters, 5, status)
    m.observe_loop_lag(0.25)
    text = generate_latest(m.registry)
    assert val(text, "connprobe_kernel_sensor_up") == 1.0
    assert val(text, "connprobe_bpf_attached", hook="tcp:tcp_retransmit_skb") == 1.0
    assert val(text, "connprobe_bpf_attached", hook="skb:kfree_skb") == 0.0
    assert val(text, "connprobe_kernel_events_lost_total") == 5.0
    assert val(text, "connprobe_kernel_events_seen_total") == 120.0
    assert val(text, "connprobe_node_tcp_retransmits_total") == 9.0
    assert val(text, "connprobe_node_packet_drops_total", reason="NETFILTER_DROP") == 4.0
    assert val(text, "connprobe_node_packet_drops_total", reason="TCP_INVALID_SEQUENCE") == 1.0
    assert val(text, "connprobe_node_kernel_events_total", kind="state", reason="") == 50.0
    assert val(text, "connprobe_event_loop_lag_seconds") == 0.25
    lines = "# TYPE connprobe_kernel_events_lost_total counter\nconnprobe_kernel_events_lost_total 5.0\n"
    assert lines in text.decode()
    m.observe_sensor(None, 6, [])  # the sensor went away: down, the loss count kept
    text = generate_latest(m.registry)
    assert val(text, "connprobe_kernel_sensor_up") == 0.0
    assert val(text, "connprobe_kernel_events_lost_total") == 6.0
    assert val(text, "connprobe_bpf_attached", hook="skb:kfree_skb") is None


def test_histogram_buckets_are_configurable():
    m = Metrics(CollectorRegistry(), duration_buckets=(0.1, 1.0), phase_buckets=(0.01,))
    m.observe(verdict(result()))
    text = generate_latest(m.registry)
    les = {dict(k[1])["le"] for k in samples(text) if k[0] == "connprobe_probe_duration_seconds_bucket"}
    assert les == {"0.1", "1.0", "+Inf"}
    assert val(text, "connprobe_probe_phase_duration_seconds_bucket", **lab(phase="resolve", le="0.01")) == 1.0
    assert val(text, "connprobe_probe_phase_duration_seconds_bucket", **lab(phase="processing", le="0.01")) == 0.0


def test_labelled_histogram_counts_like_prometheus_client_and_writes_the_same_bytes():
    from prometheus_client import Histogram, generate_latest

    from connprobe.metrics import LabelledHistogram
    from tests.agent.helpers import exposition

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h = LabelledHistogram("h_seconds", "help with a \\ and\na newline", ["probe", "target"], (0.1, 1.0, 2.5),
                          registry=ours)
    ref = Histogram("h_seconds", "help with a \\ and\na newline", ["probe", "target"], buckets=(0.1, 1.0, 2.5),
                    registry=theirs)
    label_sets = [("web", 'http://x/"quoted"\\back\nslash'), ("api", "http://api/")]
    amounts = [0.0, 0.1, 0.1000001, 1.0, 2.5, 7.0, 1e9, 0.05]  # bounds themselves count as "less or equal"
    for labels in label_sets:
        for x in amounts:
            h.labels(*labels).observe(x)
            ref.labels(*labels).observe(x)
    h.labels("idle", "http://idle/")  # declared, never observed: zeros
    ref.labels("idle", "http://idle/")
    created = [line for line in generate_latest(theirs).decode().splitlines() if "_created" not in line]
    expected = "\n".join(created) + "\n"
    assert generate_latest(ours).decode() == expected  # the Sample path
    assert exposition(ours).decode() == expected  # the text path, without Samples
    h.remove("web", 'http://x/"quoted"\\back\nslash')
    assert 'probe="web"' not in exposition(ours).decode()
    assert exposition(ours) == generate_latest(ours)


def test_probe_registry_answers_like_blackbox_with_the_verdict():
    failed = result(ok=False, error=ErrorKind.CONNECT_TIMEOUT, status=None, phases={"resolve": (0, 1),
                                                                                     "connect": (1, 1001)})
    v = verdict(failed, Cause.POLICY_DROP, (event(EventKind.DROP, reason="NETFILTER_DROP"),
                                            event(EventKind.RETRANSMIT)), confidence=0.8)
    text = generate_latest(probe_registry(v))
    assert val(text, "probe_success") == 0.0
    assert val(text, "probe_duration_seconds") == 1.001
    for phase in HTTP_PHASES:
        assert val(text, "probe_http_duration_seconds", phase=phase) is not None
    assert val(text, "probe_http_duration_seconds", phase="connect") == 1.0
    assert val(text, "probe_http_status_code") == 0.0
    assert val(text, "probe_dns_lookup_time_seconds") == 0.001
    assert val(text, "connprobe_probe_cause", cause="policy_drop") == 1.0
    assert sum(val(text, "connprobe_probe_cause", cause=str(c)) for c in Cause) == 1.0
    assert val(text, "connprobe_probe_packet_drops", reason="NETFILTER_DROP") == 1.0
    assert val(text, "connprobe_probe_tcp_retransmits") == 1.0
    assert val(text, "connprobe_probe_verdict_confidence") == 0.8
    assert "probe=" not in text.decode() and "target=" not in text.decode()
