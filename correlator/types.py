"""The correlator's own types: what it is told about the sensor (`KernelCoverage`) and what it produces
(`Verdict`, `Cause`; the app's sinks read them)."""

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


@dataclass(frozen=True)
class KernelCoverage:
    """Whether the kernel sensor saw this probe's window: available at all, and how many events it lost."""

    available: bool = True
    lost_events: int = 0  # ring-buffer events lost while the probe ran
    reason: str = ""  # why it is unavailable, when it is not


@dataclass(frozen=True, slots=True)
class Verdict:
    result: ProbeResult
    cause: Cause
    sub_cause: str | None  # e.g. "dns/nxdomain"
    confidence: float  # 0..1
    rule: str  # name of the rule that decided
    evidence: tuple[KernelEvent, ...]  # the kernel events the deciding rule relied on
    facts: tuple[str, ...]  # phase facts that decided, in words
    summary: str  # one line for a human
    remote: tuple[RemoteEvidence, ...] = ()  # what peer agents said about the probe's flows (asked or not)
