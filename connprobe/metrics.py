"""The Prometheus exporter's metric set: what every sink-fed `Verdict` and the kernel sensor become on `/metrics`.

Names follow prometheus/blackbox_exporter where they overlap, so its dashboards keep working:

    probe_success, probe_duration_seconds, probe_http_duration_seconds{phase}, probe_http_status_code,
    probe_dns_lookup_time_seconds, probe_failed_due_to_regex

In agent mode (`Metrics`, one registry for the whole process) these last-probe gauges carry the labels
`probe`, `target` and `source`; the blackbox-style `/probe` answer (`probe_registry`) is a one-shot registry
for a single verdict without them, exactly as blackbox_exporter answers.

Everything else is `connprobe_*`: counters of probes and verdicts by cause, histograms of probe and phase
durations, per-probe kernel evidence taken from the verdict, node-level kernel counters mirrored from the
sensor's in-kernel maps, and the agent's own health.

Labels are bounded by construction: probe, target, source, cause, reason, phase, hook, plus two closed
enums (`result`, `kind`). Never a port or address of a client socket; a URL target loses its userinfo,
query string and fragment (`clean_target`). `forget(probe)` removes every series of a probe that was
taken out of the configuration.

Dependencies are passed in (the registry, the wall clock), so tests use a fresh `CollectorRegistry`.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from bpf.types import EventKind, KernelEvent
from connprobe.version import build_labels
from correlator.types import Cause, Verdict
from prober.redact import label_target
from prober.tlsinfo import TLS_VERSION_NAMES
from prober.types import DNS_RCODES, ProbeKind, ProbeResult

__all__ = [
    "DEFAULT_DURATION_BUCKETS",
    "DEFAULT_PHASE_BUCKETS",
    "HTTP_PHASES",
    "LabelledHistogram",
    "LabelledValues",
    "Metrics",
    "clean_target",
    "escape_label_value",
    "format_labels",
    "probe_registry",
]

HTTP_PHASES: tuple[str, ...] = ("resolve", "connect", "tls", "processing", "transfer")
# Bucket counts multiply by probes (and phases): about 100 exposition lines per HTTP probe with these defaults.
DEFAULT_DURATION_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DEFAULT_PHASE_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

PROBE_LABELS = ("probe", "target", "source")
RESULTS = ("success", "failure")
RETRANSMIT_KINDS = (EventKind.RETRANSMIT, EventKind.SYNACK_RETRANSMIT)
REGEX_VALIDATORS = frozenset({
    "fail_if_body_matches_regexp", "fail_if_body_not_matches_regexp",
    "fail_if_header_matches", "fail_if_header_not_matches",
})
NO_REASON = "unknown"  # drop events whose reason the kernel did not name


def clean_target(target: str) -> str:
    """A target fit for a label: a URL keeps scheme, host, port and path; userinfo, query and fragment go
    (`prober.redact.label_target`, the redactor's form for labels)."""
    return label_target(target)


def _regex_failed(r: ProbeResult) -> bool:
    """blackbox's probe_failed_due_to_regex: a body/header regexp (http) or an expect (tcp) failed."""
    return any(v in REGEX_VALIDATORS or v == "expect" or (v.startswith("query_response[") and v.endswith(".expect"))
               for v in r.failed_validators)


def _dns_lookup_seconds(r: ProbeResult) -> float | None:
    """blackbox's probe_dns_lookup_time_seconds: how long resolving the target's name took (0 for an address).
    For a DNS probe that is the name of the server asked, not the probe's own question (its `resolve` phase):
    an address or resolv.conf's nameserver, so 0."""
    if r.kind == ProbeKind.UNIX:
        return None
    if r.kind == ProbeKind.DNS:
        return 0.0
    resolve = r.phase_durations_ns().get("resolve")
    return resolve / 1e9 if resolve is not None else 0.0


# blackbox_exporter's metrics of the icmp and grpc probers: (name, help, extra label, series of a result)
ICMP_PHASES: tuple[str, ...] = ("resolve", "setup", "rtt")
GRPC_SERVING_STATUS: tuple[str, ...] = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")
KIND_GAUGES: tuple[tuple[str, str, str | None], ...] = (
    ("probe_icmp_duration_seconds", "Duration of each phase of the ICMP echo (0 for a phase not reached).", "phase"),
    ("probe_icmp_reply_hop_limit", "Hop limit (TTL) of the echo reply, when one came.", None),
    ("probe_grpc_status_code", "Status code of the health Check RPC (0 OK; 14 UNAVAILABLE...).", None),
    ("probe_grpc_healthcheck_response", "1 for the health check's serving status, 0 for the others.",
     "serving_status"),
    ("probe_grpc_duration_seconds", "Duration of each phase of the gRPC health check.", "phase"),
    ("probe_grpc_ssl", "1 when the health check answered over TLS (0 without an answer, as blackbox).", None),
    ("probe_http_version", "HTTP version of the response (1.1, 2).", None),
    ("probe_http_content_length", "Content-Length of the response (-1 when it has none).", None),
    ("probe_http_uncompressed_body_length", "Length of the response body after decoding, in bytes.", None),
    ("probe_http_redirects", "Number of redirects followed.", None),
    ("probe_http_ssl", "1 when the final request (after redirects) used TLS.", None),
    ("probe_http_last_modified_timestamp_seconds", "Last-Modified header of the response, in Unix time.", None),
    ("probe_ssl_earliest_cert_expiry", "Earliest expiry of a certificate the peer sent, in Unix time (grpc: from a "
     "second TLS handshake of connprobe's own to the same address after the check).", None),
    ("probe_ssl_last_chain_expiry_timestamp_seconds", "Earliest expiry within the verified certificate chain, "
     "in Unix time.", None),
    ("probe_tls_version_info", "1, labelled with the TLS version of the connection (grpc: of connprobe's own second "
     "handshake to the same address).", "version"),
    ("probe_dns_query_succeeded", "1 when the DNS server answered (whatever the rcode).", None),
    ("probe_dns_duration_seconds", "Duration of each phase of the DNS probe: resolve (the server's name), connect "
     "(TCP connect and, over TLS, the handshake; 0 over UDP), request (the query's exchange).", "phase"),
    ("probe_dns_serial", "Serial number of the zone, from an SOA record in the answer.", None),
    ("probe_dns_answer_rrs", "Number of records in the answer section.", None),
    ("probe_dns_authority_rrs", "Number of records in the authority section.", None),
    ("probe_dns_additional_rrs", "Number of records in the additional section.", None),
    ("probe_ip_protocol", "IP version of the probed address (4 or 6).", None),
    ("probe_ip_addr_hash", "FNV-1a hash of the probed address (changes when the address does).", None),
)
# result value -> blackbox metric, for the kinds that set them
VALUE_GAUGES: tuple[tuple[str, str], ...] = (
    ("http_version", "probe_http_version"),
    ("http_content_length", "probe_http_content_length"),
    ("http_uncompressed_body_length", "probe_http_uncompressed_body_length"),
    ("http_redirects", "probe_http_redirects"),
    ("http_ssl", "probe_http_ssl"),
    ("http_last_modified", "probe_http_last_modified_timestamp_seconds"),
    ("ssl_earliest_cert_expiry", "probe_ssl_earliest_cert_expiry"),
    ("ssl_last_chain_expiry", "probe_ssl_last_chain_expiry_timestamp_seconds"),
    ("dns_query_succeeded", "probe_dns_query_succeeded"),
    ("dns_serial", "probe_dns_serial"),
    ("dns_answer_rrs", "probe_dns_answer_rrs"),
    ("dns_authority_rrs", "probe_dns_authority_rrs"),
    ("dns_additional_rrs", "probe_dns_additional_rrs"),
)


LEAF_LABELS = ("fingerprint_sha256", "issuer", "subject", "subjectalternative")
LEAF_METRIC = ("probe_ssl_last_chain_info", "1, labelled with the peer's leaf certificate (SHA-256 fingerprint, "
               "issuer, subject, DNS names); one series per probe (grpc: from connprobe's own second handshake).")


def ip_addr_hash(address: str) -> float | None:
    """blackbox's probe_ip_addr_hash: 32-bit FNV-1a over the address's bytes (4 for IPv4, 16 for IPv6), the
    value blackbox_exporter 0.23 reports (tests/app/test_blackbox_side_by_side.py)."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    h = 0x811C9DC5
    for byte in ip.packed:
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return float(h)


def kind_series(r: ProbeResult) -> dict[str, list[tuple[str | None, float]]]:
    """The kind-specific gauges of one result: metric name -> [(extra label value or None, value)]."""
    out: dict[str, list[tuple[str | None, float]]] = {}
    phases = r.phase_durations_ns()
    for key, name in VALUE_GAUGES:
        value = r.value(key)
        if value is not None:
            out[name] = [(None, value)]
    tls = r.value("tls_version")
    if tls is not None and tls in TLS_VERSION_NAMES:
        out["probe_tls_version_info"] = [(TLS_VERSION_NAMES[tls], 1.0)]
    address = r.address
    if address is None and r.kind == ProbeKind.DNS and r.dns:  # the server asked
        address = r.dns[-1].server
    if address and r.kind != ProbeKind.UNIX:
        h = ip_addr_hash(address)
        if h is not None:
            out["probe_ip_protocol"] = [(None, 6.0 if ":" in address else 4.0)]
            out["probe_ip_addr_hash"] = [(None, h)]
    if r.kind == ProbeKind.DNS:
        request = 0.0
        # blackbox's connect: setting up a stream query's connection (TCP connect, TLS handshake); UDP has none
        connect = (phases.get("connect", 0) + phases.get("tls", 0)) / 1e9
        if r.dns:  # first query sent to last answer (or the probe's end, unanswered), less the set-up
            request = max(0.0, (max(t.end_ns or r.end_ns for t in r.dns) - min(t.start_ns for t in r.dns)) / 1e9
                          - connect)
        out["probe_dns_duration_seconds"] = [("resolve", 0.0), ("connect", connect), ("request", request)]
        for name in ("probe_dns_answer_rrs", "probe_dns_authority_rrs", "probe_dns_additional_rrs"):
            out.setdefault(name, [(None, 0.0)])  # no answer: 0 records, as blackbox reports them
    if r.kind == ProbeKind.ICMP:
        out["probe_icmp_duration_seconds"] = [(p, phases.get(p, 0) / 1e9) for p in ICMP_PHASES]
        hop = r.value("icmp_reply_hop_limit")
        if hop is not None:
            out["probe_icmp_reply_hop_limit"] = [(None, hop)]
    elif r.kind == ProbeKind.GRPC:
        out["probe_grpc_duration_seconds"] = [(p, phases.get(p, 0) / 1e9) for p in ("resolve", "check")]
        code = r.value("grpc_status_code")
        if code is not None:
            out["probe_grpc_status_code"] = [(None, code)]
        ssl_used = r.value("grpc_ssl")
        if ssl_used is not None:
            out["probe_grpc_ssl"] = [(None, ssl_used)]
        # blackbox always has it: 0 without a TLS answer; with one, the second handshake's (prober/grpc.py)
        out.setdefault("probe_ssl_earliest_cert_expiry", [(None, 0.0)])
        # the answer's status; no answer (an RPC error, NOT_FOUND included): every status 0, as blackbox
        status = r.value("grpc_serving_status") if code == 0 else None
        out["probe_grpc_healthcheck_response"] = [(s, 1.0 if status == i else 0.0)
                                                  for i, s in enumerate(GRPC_SERVING_STATUS)]
    return out


def _evidence_counts(events: Iterable[KernelEvent]) -> tuple[int, dict[str, int]]:
    retransmits = 0
    drops: dict[str, int] = {}
    for e in events:
        if e.kind in RETRANSMIT_KINDS:
            retransmits += 1
        elif e.kind == EventKind.DROP:
            reason = e.reason or NO_REASON
            drops[reason] = drops.get(reason, 0) + 1
    return retransmits, drops


def escape_label_value(v: str) -> str:
    """A label value as the text exposition format writes it."""
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_labels(labels: Iterable[tuple[str, str]]) -> str:
    """`{a="1",b="2"}`: sorted by name, as prometheus_client writes them ("" for none)."""
    items = sorted(labels)
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in items) + "}" if items else ""


PIECE_SERIES = 4096  # series of a family written per piece of a scrape (a few hundred KB)


class _HistogramSeries:
    """One label set of a `LabelledHistogram`: per-bucket counts (not cumulative) and the sum."""

    __slots__ = ("counts", "owner", "prefixes", "total")

    def __init__(self, owner: LabelledHistogram, values: tuple[str, ...]):
        self.owner = owner
        self.counts = [0] * len(owner.les)
        self.total = 0.0
        pairs = list(zip(owner.labelnames, values, strict=True))
        name = owner.name
        # every exposition line up to its value, formatted once for the life of the series
        self.prefixes = (
            *(f"{name}_bucket{format_labels([*pairs, ('le', le)])} " for le in owner.les),
            f"{name}_count{format_labels(pairs)} ",
            f"{name}_sum{format_labels(pairs)} ",
        )

    def observe(self, amount: float) -> None:
        owner = self.owner
        i = bisect.bisect_left(owner.bounds, amount)  # the first bucket whose bound is >= amount
        with owner.lock:
            self.counts[i] += 1
            self.total += amount


class _RenderedFamily(Metric):
    """What `LabelledHistogram.collect` and `LabelledValues.collect` yield: a standard family whose samples are
    built only when read (generate_latest, tests), and whose `exposition_text()` writes the same lines
    without building them."""

    def __init__(self, owner: LabelledHistogram | LabelledValues, typ: str):
        self._owner = owner
        self._built: list | None = None
        super().__init__(owner.name, owner.documentation, typ)

    @property
    def samples(self) -> list:
        if self._built is None:
            self._built = self._owner.samples()
        return self._built

    @samples.setter
    def samples(self, value: list) -> None:  # Metric.__init__ sets [] and add_sample appends
        self._built = list(value) if value else None

    def exposition_text(self) -> str:
        return self._owner.text()

    def exposition_pieces(self) -> Iterator[str]:
        """`exposition_text()` in pieces (joined: the same text)."""
        return self._owner.text_pieces()


class _ValueSeries:
    """One label set of a `LabelledValues`: its value and its exposition line up to the value."""

    __slots__ = ("owner", "prefix", "value")

    def __init__(self, owner: LabelledValues, values: tuple[str, ...]):
        self.owner = owner
        self.value = 0.0
        self.prefix = f"{owner.sample_name}{format_labels(zip(owner.labelnames, values, strict=True))} "

    def set(self, value: float) -> None:
        self.value = float(value)

    def inc(self, amount: float = 1) -> None:
        if amount < 0 and self.owner.type == "counter":
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        with self.owner.lock:
            self.value += amount


_S = TypeVar("_S")


class _SeriesByLabels(Collector, Generic[_S]):
    """What both labelled families share: one series per tuple of label values, made on first use
    (`_new_series(family, values)`), and removed by the same values."""

    name: str
    labelnames: tuple[str, ...]
    lock: threading.Lock
    _series: dict[tuple[str, ...], _S]
    _new_series: Callable[[Any, tuple[str, ...]], _S]

    def labels(self, *values: str) -> _S:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected {len(self.labelnames)} label values, got {len(values)}")
        values = tuple(str(v) for v in values)
        series = self._series.get(values)
        if series is None:
            with self.lock:
                series = self._series.setdefault(values, self._new_series(self, values))
        return series

    def remove(self, *values: str) -> None:
        with self.lock:
            del self._series[tuple(str(v) for v in values)]


class LabelledValues(_SeriesByLabels[_ValueSeries]):
    """A labelled gauge or counter kept as plain values and written straight to exposition text, like
    `LabelledHistogram`: prometheus_client builds a `Sample` with its own label dict per series on every
    `collect()`; here each series keeps its line's formatted beginning. Same bytes as prometheus_client's
    `Gauge`/`Counter` through `generate_latest` (no `_created` series: the agent turns them off).
    API as far as `Metrics` uses it: `labels(*values).set(x)` / `.inc(n)`, `remove(*values)`."""

    _new_series = _ValueSeries

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], typ: str = "gauge",
                 registry: CollectorRegistry | None = None):
        if typ not in ("gauge", "counter"):
            raise ValueError(f"{name}: type {typ!r} is neither gauge nor counter")
        if typ == "counter" and name.endswith("_total"):
            name = name[:-6]
        self.name = name
        self.sample_name = name + "_total" if typ == "counter" else name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.type = typ
        self.lock = threading.Lock()
        self._series: dict[tuple[str, ...], _ValueSeries] = {}
        if registry is not None:
            registry.register(self)

    def _snapshot(self) -> list[tuple[tuple[str, ...], _ValueSeries, float]]:
        with self.lock:
            return [(values, s, s.value) for values, s in self._series.items()]

    def samples(self) -> list:
        family = CounterMetricFamily if self.type == "counter" else GaugeMetricFamily
        fam = family(self.name, self.documentation, labels=self.labelnames)
        for values, _, value in self._snapshot():
            fam.add_metric(list(values), value)
        return fam.samples

    def text(self) -> str:
        return "".join(self.text_pieces())

    def text_pieces(self, series: int | None = None) -> Iterator[str]:
        """`text()` in pieces of `series` series (PIECE_SERIES): a scrape holds one piece's lines at a time, not
        the family's."""
        n = series or PIECE_SERIES
        fmt = floatToGoString
        snap = self._snapshot()
        for i in range(0, len(snap), n):
            yield "".join([s.prefix + fmt(value) + "\n" for _, s, value in snap[i:i + n]])

    def _family(self) -> Metric:
        return _RenderedFamily(self, self.type)

    def collect(self) -> Iterator[Metric]:
        yield self._family()

    def describe(self) -> Iterator[Metric]:
        family = CounterMetricFamily if self.type == "counter" else GaugeMetricFamily
        yield family(self.name, self.documentation, labels=self.labelnames)


class LabelledHistogram(_SeriesByLabels[_HistogramSeries]):
    """A labelled histogram kept as plain counters and written straight to exposition text.

    prometheus_client's `Histogram` builds ~15 `Sample` objects (each with its own label dict) per series on
    every `collect()`; at 1,000 HTTP probes that is ~84,000 histogram lines and most of a scrape's time.
    Here each series keeps its bucket counts and its lines' formatted beginnings, and `text()` only adds the
    numbers. `collect()` still yields a standard histogram family, so `generate_latest` writes the same
    bytes (tests/app/test_metrics.py compares them); connprobe's own writer (`connprobe.web.exposition_chunks`)
    takes the text. API as far as `Metrics` uses it: `labels(*values).observe(x)`, `remove(*values)`.
    """

    _new_series = _HistogramSeries

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry | None = None):
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(bounds)
        self.les = tuple(floatToGoString(b) for b in bounds)
        self.lock = threading.Lock()
        self._series: dict[tuple[str, ...], _HistogramSeries] = {}
        if registry is not None:
            registry.register(self)

    def _snapshot(self) -> list[tuple[tuple[str, ...], _HistogramSeries, list[int], float]]:
        with self.lock:
            return [(values, s, s.counts[:], s.total) for values, s in self._series.items()]

    def samples(self) -> list:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, _, counts, total in self._snapshot():
            cumulative, acc = [], 0
            for le, n in zip(self.les, counts, strict=True):
                acc += n
                cumulative.append((le, acc))
            fam.add_metric(list(values), cumulative, total)
        return fam.samples

    def text(self) -> str:
        return "".join(self.text_pieces())

    def text_pieces(self, series: int | None = None) -> Iterator[str]:
        """`text()` in pieces of `series` series (~16 lines each; PIECE_SERIES / 16)."""
        per_piece = series or max(PIECE_SERIES // 16, 1)
        out: list[str] = []
        append = out.append
        fmt = floatToGoString
        for k, (_, series_, counts, total) in enumerate(self._snapshot(), 1):
            prefixes = series_.prefixes
            acc = 0
            for i, n in enumerate(counts):
                acc += n
                append(prefixes[i] + fmt(acc) + "\n")
            append(prefixes[-2] + fmt(acc) + "\n")
            append(prefixes[-1] + fmt(total) + "\n")
            if k % per_piece == 0:
                yield "".join(out)
                out.clear()
        if out:
            yield "".join(out)

    def collect(self) -> Iterator[Metric]:
        yield _RenderedFamily(self, "histogram")

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)


class _SensorCollector(Collector):
    """Mirrors the sensor's cumulative in-kernel counters (since load) as Prometheus counters.

    The kernel keeps the counts, so they are exported as a snapshot rather than incremented here; when the
    sensor is reloaded they start from zero again, which Prometheus treats as a counter reset.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[tuple[str, str], int] = {}
        self._lost = 0
        self._seen = 0
        self._hooks: dict[str, bool] = {}
        self._up = False

    def update(self, events: dict[tuple[str, str], int], lost: int, seen: int, hooks: dict[str, bool],
               up: bool) -> None:
        with self._lock:
            self._events, self._lost, self._seen, self._hooks, self._up = events, lost, seen, hooks, up

    def _families(self, with_samples: bool) -> Iterator[Any]:
        with self._lock:
            events, lost, seen, hooks, up = self._events, self._lost, self._seen, self._hooks, self._up
        if not with_samples:
            events, hooks = {}, {}
        all_events = CounterMetricFamily(
            "connprobe_node_kernel_events", "Kernel events on this node, all traffic, by kind and reason "
            "(counted in the kernel since the sensor was loaded).", labels=["kind", "reason"])
        retrans = CounterMetricFamily(
            "connprobe_node_tcp_retransmits", "TCP retransmissions on this node, all traffic (data and SYN-ACK).",
            labels=[])
        drops = CounterMetricFamily(
            "connprobe_node_packet_drops", "Packets the kernel freed as dropped on this node, by drop reason.",
            labels=["reason"])
        n_retrans = 0
        by_reason: dict[str, int] = {}
        for (kind, reason), n in sorted(events.items()):
            all_events.add_metric([kind, reason], n)
            if kind in RETRANSMIT_KINDS:
                n_retrans += n
            elif kind == EventKind.DROP:
                by_reason[reason or NO_REASON] = by_reason.get(reason or NO_REASON, 0) + n
        if with_samples:
            retrans.add_metric([], n_retrans)
        for reason, n in sorted(by_reason.items()):
            drops.add_metric([reason], n)
        yield all_events
        yield retrans
        yield drops
        attached = GaugeMetricFamily(
            "connprobe_bpf_attached", "1 when the BPF program on this hook (tracepoint) is attached.",
            labels=["hook"])
        for hook, ok in sorted(hooks.items()):
            attached.add_metric([hook], 1.0 if ok else 0.0)
        yield attached
        yield GaugeMetricFamily(
            "connprobe_kernel_sensor_up", "1 when the kernel sensor is loaded and delivering events.",
            value=(1.0 if up else 0.0) if with_samples else None)
        yield CounterMetricFamily(
            "connprobe_kernel_events_lost", "Events on watched flows that never reached the correlator "
            "(ring buffer full, or user-space queue full).", value=lost if with_samples else None)
        yield CounterMetricFamily(
            "connprobe_kernel_events_seen", "Events on watched flows decoded in user space.",
            value=seen if with_samples else None)

    def collect(self) -> Iterator[Any]:
        return self._families(True)

    def describe(self) -> Iterator[Any]:
        return self._families(False)


class _ProbeLabelsCollector(Collector):
    """`connprobe_probe_labels{probe, <the probe's labels:>} 1`, one series per configured probe (a probe without
    `labels:` too, so a join keeps it). The label names differ from probe to probe, which a labelled metric
    with fixed names cannot carry; joined onto any series by `on(instance, probe) group_left(...)`."""

    NAME = "connprobe_probe_labels"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._labels: dict[str, tuple[tuple[str, str], ...]] = {}

    def set(self, probe: str, labels: Iterable[tuple[str, str]]) -> None:
        with self._lock:
            self._labels[probe] = tuple(sorted(labels))

    def forget(self, probe: str) -> None:
        with self._lock:
            self._labels.pop(probe, None)

    def _family(self, with_samples: bool) -> Metric:
        m = Metric(self.NAME, "1 for each configured probe, labelled with the probe's `labels:` from the config "
                   "(join: * on(instance, probe) group_left(LABEL, ...) connprobe_probe_labels).", "gauge")
        if with_samples:
            with self._lock:
                items = sorted(self._labels.items())
            for probe, labels in items:
                m.add_sample(self.NAME, {"probe": probe, **dict(labels)}, 1.0)
        return m

    def collect(self) -> Iterator[Metric]:
        yield self._family(True)

    def describe(self) -> Iterator[Metric]:
        yield self._family(False)


class Metrics:
    """The agent's metric set on one registry. Thread-safe; `observe` never blocks on I/O.

        metrics = Metrics(registry, duration_buckets=(...), phase_buckets=(...))
        metrics.declare("web", "http://srv1/", "client", kind=ProbeKind.HTTP, interval_s=10)
        metrics.observe(verdict)                     # once per verdict
        metrics.observe_sensor(sensor.counters(), sensor.lost_events, sensor.status())
        metrics.observe_loop_lag(0.003)
        metrics.forget("web")                        # the probe left the configuration
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        duration_buckets: Sequence[float] = DEFAULT_DURATION_BUCKETS,
        phase_buckets: Sequence[float] = DEFAULT_PHASE_BUCKETS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        self._lock = threading.Lock()
        # probe name -> every (metric, label values) it created, so forget() removes exactly those
        self._series: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}
        self._phases: dict[str, frozenset[str]] = {}  # probe -> phases with a histogram (absent: all)
        r = self.registry
        pl = PROBE_LABELS

        def _gauge(name: str, doc: str, labels: Sequence[str], registry: CollectorRegistry) -> LabelledValues:
            return LabelledValues(name, doc, labels, "gauge", registry)

        def _counter(name: str, doc: str, labels: Sequence[str], registry: CollectorRegistry) -> LabelledValues:
            return LabelledValues(name, doc, labels, "counter", registry)

        # blackbox_exporter-compatible last-probe gauges
        self.success = _gauge("probe_success", "Whether the last probe succeeded (1) or failed (0).", pl,
                             registry=r)
        self.duration = _gauge("probe_duration_seconds", "How long the last probe took, in seconds.", pl,
                              registry=r)
        self.http_phase = _gauge("probe_http_duration_seconds", "Duration of each HTTP phase of the last probe "
                                "(summed over redirects; 0 for a phase not reached).", (*pl, "phase"), registry=r)
        self.http_status = _gauge("probe_http_status_code", "HTTP status code of the last probe (0 when none).",
                                 pl, registry=r)
        self.dns_lookup = _gauge("probe_dns_lookup_time_seconds", "How long the last probe's DNS lookup took.",
                                pl, registry=r)
        self.kind_gauges = {name: _gauge(name, doc, (*pl, extra) if extra else pl, registry=r)
                            for name, doc, extra in KIND_GAUGES}
        self.leaf = _gauge(LEAF_METRIC[0], LEAF_METRIC[1], (*pl, *LEAF_LABELS), registry=r)
        self.regex_failed = _gauge("probe_failed_due_to_regex", "1 when the last probe failed a regular "
                                  "expression check on body or headers.", pl, registry=r)

        # connprobe's own
        self.last_ts = _gauge("connprobe_probe_last_timestamp_seconds", "Wall-clock time the last result of "
                             "this probe was recorded.", pl, registry=r)
        self.interval = _gauge("connprobe_probe_interval_seconds", "Configured interval of the probe.", pl,
                              registry=r)
        self.last_cause = _gauge("connprobe_probe_cause", "1 for the cause of the probe's last verdict (one "
                                "series per probe, the cause label changes).", (*pl, "cause"), registry=r)
        self.confidence = _gauge("connprobe_probe_verdict_confidence", "Confidence (0..1) of the last verdict.",
                                pl, registry=r)
        self.probes = _counter("connprobe_probes_total", "Probes run, by result (success/failure).",
                              (*pl, "result"), registry=r)
        self.verdicts = _counter("connprobe_verdicts_total", "Verdicts by cause (ok for a healthy probe).",
                                (*pl, "cause"), registry=r)
        self.duration_hist = LabelledHistogram("connprobe_probe_duration_seconds", "Probe durations.", pl,
                                               buckets=duration_buckets, registry=r)
        self.phase_hist = LabelledHistogram("connprobe_probe_phase_duration_seconds", "Durations of the phases "
                                            "probes reached (resolve, connect, tls, processing, transfer).",
                                            (*pl, "phase"), buckets=phase_buckets, registry=r)
        self.retransmits = _counter("connprobe_probe_tcp_retransmits_total", "TCP retransmissions (data and "
                                   "SYN) in the kernel evidence of this probe's verdicts.", pl, registry=r)
        self.drops = _counter("connprobe_probe_packet_drops_total", "Dropped packets in the kernel evidence of "
                             "this probe's verdicts, by drop reason.", (*pl, "reason"), registry=r)
        self.dns_queries = _counter("connprobe_dns_queries_total", "DNS queries the probes sent, by answer: the "
                                   "rcode in lower case (noerror, nxdomain, servfail, ...) or no_answer.",
                                   (*pl, "result"), registry=r)
        self.suspect = _counter("connprobe_suspect_probes_total", "Probes whose timing is suspect because the "
                               "agent's event loop was starved while they ran.", pl, registry=r)
        self.loop_lag = Gauge("connprobe_event_loop_lag_seconds", "Last measured lag of the agent's event loop.",
                              registry=r)
        self._sensor = _SensorCollector()
        r.register(self._sensor)
        self.probe_labels = _ProbeLabelsCollector()
        r.register(self.probe_labels)
        build = Gauge("connprobe_build_info", "1, labelled with connprobe's version and the Python running it.",
                      tuple(build_labels()), registry=r)
        build.labels(**build_labels()).set(1)

    # -- probes -------------------------------------------------------------------------------------------

    def _labels(self, probe: str, target: str, source: str) -> tuple[str, str, str]:
        return (probe, clean_target(target), source)

    def _touch(self, probe: str, metric: Any, values: tuple[str, ...]) -> Any:
        self._series.setdefault(probe, set()).add((metric, values))
        return metric.labels(*values)

    def declare(self, probe: str, target: str, source: str, *, kind: ProbeKind | None = None,
                interval_s: float | None = None, labels: Iterable[tuple[str, str]] = (),
                phase_histograms: Iterable[str] | None = None) -> None:
        """Create a configured probe's series before its first result: counters at 0 for every result and
        cause (so `rate()` and `increase()` see the first failure), every HTTP phase at 0, the interval, and
        its `connprobe_probe_labels` series with the config's `labels:` (validated by `connprobe.config`).
        `phase_histograms`: the phases that get a `connprobe_probe_phase_duration_seconds` histogram (the
        module's `phase_histograms:`); None, as for a probe never declared, means every phase reached."""
        pl = self._labels(probe, target, source)
        with self._lock:
            if phase_histograms is None:
                self._phases.pop(probe, None)
            else:
                wanted = self._phases[probe] = frozenset(phase_histograms)
                for m, values in [(m, v) for m, v in self._series.get(probe, ()) if m is self.phase_hist]:
                    if values[3] not in wanted:  # a reload took the phase out: its series go
                        self.phase_hist.remove(*values)
                        self._series[probe].discard((m, values))
            self._declare(pl, kind)
            if interval_s is not None:
                self._touch(probe, self.interval, pl).set(interval_s)
            self.probe_labels.set(probe, labels)

    def _declare(self, pl: tuple[str, str, str], kind: ProbeKind | None) -> None:
        probe = pl[0]
        known = self._series.get(probe, set())
        if (self.duration_hist, pl) in known and (
            kind != ProbeKind.HTTP or (self.http_phase, (*pl, HTTP_PHASES[0])) in known
        ):
            return
        for result in RESULTS:
            self._touch(probe, self.probes, (*pl, result))
        for cause in Cause:
            self._touch(probe, self.verdicts, (*pl, str(cause)))
        self._touch(probe, self.retransmits, pl)
        self._touch(probe, self.suspect, pl)
        self._touch(probe, self.duration_hist, pl)
        if kind == ProbeKind.HTTP:
            for phase in HTTP_PHASES:  # the gauges only: a phase histogram appears once the phase is reached
                self._touch(probe, self.http_phase, (*pl, phase)).set(0)

    def observe(self, verdict: Verdict) -> None:
        """Record one verdict (and the probe result inside it)."""
        r = verdict.result
        pl = self._labels(r.name, r.target, r.source)
        probe = r.name
        now = self._clock()
        phases = r.phase_durations_ns()
        retransmits, drops = _evidence_counts(verdict.evidence)
        with self._lock:
            self._declare(pl, r.kind)
            self._touch(probe, self.success, pl).set(1 if r.ok else 0)
            self._touch(probe, self.duration, pl).set(r.duration_ns / 1e9)
            self._touch(probe, self.last_ts, pl).set(now)
            self._touch(probe, self.regex_failed, pl).set(1 if _regex_failed(r) else 0)
            if r.kind == ProbeKind.HTTP:
                self._touch(probe, self.http_status, pl).set(r.http_status or 0)
                for phase in HTTP_PHASES:
                    self._touch(probe, self.http_phase, (*pl, phase)).set(phases.get(phase, 0) / 1e9)
            dns = _dns_lookup_seconds(r)
            if dns is not None:
                self._touch(probe, self.dns_lookup, pl).set(dns)
            for name, series in kind_series(r).items():
                gauge = self.kind_gauges[name]
                labelled = {(*pl, extra) for extra, _ in series if extra is not None}
                if labelled:  # a label value not in this result (another TLS version) goes
                    for values in [v for m, v in self._series[probe] if m is gauge and v[:3] == pl
                                   and v not in labelled]:
                        gauge.remove(*values)
                        self._series[probe].discard((gauge, values))
                for extra, value in series:
                    self._touch(probe, gauge, pl if extra is None else (*pl, extra)).set(value)
            if r.tls_leaf:  # one certificate at a time: the series of the one before goes
                leaf = dict(r.tls_leaf)
                now_leaf = (*pl, *(leaf.get(k, "") for k in LEAF_LABELS))
                for values in [v for m, v in self._series[probe] if m is self.leaf and v[:3] == pl and v != now_leaf]:
                    self.leaf.remove(*values)
                    self._series[probe].discard((self.leaf, values))
                self._touch(probe, self.leaf, now_leaf).set(1)
            for values in [v for m, v in self._series[probe] if m is self.last_cause and v[:3] == pl]:
                self.last_cause.remove(*values)
                self._series[probe].discard((self.last_cause, values))
            self._touch(probe, self.last_cause, (*pl, str(verdict.cause))).set(1)
            self._touch(probe, self.confidence, pl).set(verdict.confidence)
            self._touch(probe, self.probes, (*pl, "success" if r.ok else "failure")).inc()
            self._touch(probe, self.verdicts, (*pl, str(verdict.cause))).inc()
            self._touch(probe, self.duration_hist, pl).observe(r.duration_ns / 1e9)
            wanted = self._phases.get(probe)
            for phase, ns in phases.items():
                if wanted is None or phase in wanted:
                    self._touch(probe, self.phase_hist, (*pl, phase)).observe(ns / 1e9)
            if retransmits:
                self._touch(probe, self.retransmits, pl).inc(retransmits)
            for reason, n in drops.items():
                self._touch(probe, self.drops, (*pl, reason)).inc(n)
            if r.suspect:
                self._touch(probe, self.suspect, pl).inc()
            for tx in r.dns:
                answer = tx.rcode.lower() if tx.rcode and tx.rcode.upper() in DNS_RCODES else "no_answer"
                self._touch(probe, self.dns_queries, (*pl, answer)).inc()

    def forget(self, probe: str, target: str | None = None, source: str | None = None) -> None:
        """Remove the series of a probe that left the configuration: all of them, or only those of one target
        and/or source (a probe whose target changed on reload)."""
        want_target = None if target is None else clean_target(target)
        with self._lock:
            series = self._series.get(probe, set())
            gone = {(m, v) for m, v in series
                    if (want_target is None or v[1] == want_target) and (source is None or v[2] == source)}
            for metric, values in gone:
                try:
                    metric.remove(*values)
                except KeyError:
                    pass
            series -= gone
            if not series:
                self._series.pop(probe, None)
            if target is None and source is None:
                self.probe_labels.forget(probe)
                self._phases.pop(probe, None)

    def probes_known(self) -> set[str]:
        with self._lock:
            return set(self._series)

    # -- agent health -------------------------------------------------------------------------------------

    def observe_sensor(self, counters: Any | None, lost: int = 0, status: Iterable[Any] = ()) -> None:
        """Mirror the kernel sensor: `counters` is a `bpf.sensor.SensorCounters` (None when the sensor is
        off), `lost` its `lost_events`, `status` its `status()` (HookStatus: name, attached)."""
        hooks = {h.name: bool(h.attached) for h in status}
        if counters is None:
            self._sensor.update({}, lost, 0, hooks, False)
            return
        events = {(str(kind), reason or ""): int(n) for (kind, reason), n in counters.events.items()}
        up = not hooks or any(hooks.values())
        self._sensor.update(events, max(lost, int(counters.lost)), int(counters.delivered), hooks, up)

    def observe_loop_lag(self, seconds: float) -> None:
        self.loop_lag.set(seconds)

# -- blackbox-style /probe ----------------------------------------------------------------------------------


def probe_registry(verdict: Verdict, *, registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """A one-shot registry answering `/probe?target=...&module=...` for one verdict, as blackbox_exporter
    answers (no probe/target labels: Prometheus adds them from the scrape), plus the verdict itself."""
    reg = registry if registry is not None else CollectorRegistry()
    r = verdict.result

    def gauge(name: str, doc: str, value: float) -> None:
        Gauge(name, doc, registry=reg).set(value)

    gauge("probe_success", "Whether the probe succeeded.", 1 if r.ok else 0)
    gauge("probe_duration_seconds", "How long the probe took, in seconds.", r.duration_ns / 1e9)
    phases = r.phase_durations_ns()
    if r.kind == ProbeKind.HTTP:
        g = Gauge("probe_http_duration_seconds", "Duration of each HTTP phase.", ["phase"], registry=reg)
        for phase in HTTP_PHASES:
            g.labels(phase).set(phases.get(phase, 0) / 1e9)
        gauge("probe_http_status_code", "HTTP status code (0 when none).", r.http_status or 0)
    if r.kind in (ProbeKind.HTTP, ProbeKind.TCP):
        gauge("probe_failed_due_to_regex", "1 when a regular expression check failed.", 1 if _regex_failed(r) else 0)
    dns = _dns_lookup_seconds(r)
    if dns is not None:
        gauge("probe_dns_lookup_time_seconds", "How long the DNS lookup took.", dns)
    docs = {name: (doc, extra) for name, doc, extra in KIND_GAUGES}
    for name, series in kind_series(r).items():
        doc, extra = docs[name]
        g = Gauge(name, doc, [extra] if extra else [], registry=reg)
        for label, value in series:
            (g.labels(label) if extra else g).set(value)
    if r.tls_leaf:
        leaf = dict(r.tls_leaf)
        Gauge(LEAF_METRIC[0], LEAF_METRIC[1], list(LEAF_LABELS), registry=reg).labels(
            *(leaf.get(k, "") for k in LEAF_LABELS)).set(1)
    cause = Gauge("connprobe_probe_cause", "1 for the verdict's cause, 0 for the others.", ["cause"], registry=reg)
    for c in Cause:
        cause.labels(str(c)).set(1 if c == verdict.cause else 0)
    gauge("connprobe_probe_verdict_confidence", "Confidence (0..1) of the verdict.", verdict.confidence)
    retransmits, drops = _evidence_counts(verdict.evidence)
    gauge("connprobe_probe_tcp_retransmits", "TCP retransmissions in the verdict's kernel evidence.", retransmits)
    d = Gauge("connprobe_probe_packet_drops", "Dropped packets in the verdict's kernel evidence, by reason.",
              ["reason"], registry=reg)
    for reason, n in sorted(drops.items()):
        d.labels(reason).set(n)
    return reg

