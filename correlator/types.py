"""Verdicts produced by the correlator: `Verdict` and `Cause` (the correlator owns them; the app's sinks read them)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from bpf.types import KernelEvent, RemoteEvidence
from prober.types import ProbeResult


class Cause(StrEnum):
    OK = "ok"
    DNS = "dns"
    TCP_RETRANSMIT = "tcp_retransmit"
    POLICY_DROP = "policy_drop"
    UPSTREAM_LATENCY = "upstream_latency"
    CONNECTION_REFUSED = "connection_refused"
    TLS = "tls"
    HTTP_ERROR = "http_error"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Verdict:
    result: ProbeResult
    cause: Cause
    sub_cause: str | None  # e.g. "dns/nxdomain"
    confidence: float  # 0..1
    rule: str  # name of the rule that decided
    evidence: tuple[KernelEvent, ...]
    facts: tuple[str, ...]  # phase facts that decided, in words
    summary: str  # one line for a human
    remote: tuple[RemoteEvidence, ...] = ()  # what peer agents said about the probe's flows (asked or not)
