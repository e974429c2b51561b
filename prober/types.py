"""Result types produced by the prober: `Flow` and `ProbeResult` (prober/ owns them; the correlator reads them).

All timestamps are CLOCK_MONOTONIC nanoseconds (`time.monotonic_ns()`), the clock of the kernel's
`bpf_ktime_get_ns()`, so probe phases and kernel events share one time axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Proto(StrEnum):
    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"  # an echo: local_port and remote_port are its identifier (the kernel sensor watches icmp/ID)


class ProbeKind(StrEnum):
    HTTP = "http"
    TCP = "tcp"
    DNS = "dns"
    ICMP = "icmp"
    GRPC = "grpc"
    WEBSOCKET = "websocket"
    UNIX = "unix"


class ErrorKind(StrEnum):
    """Closed set of reasons a probe failed. Every client exception maps to exactly one of these."""

    DNS_NXDOMAIN = "dns_nxdomain"
    DNS_SERVFAIL = "dns_servfail"
    DNS_REFUSED = "dns_refused"
    DNS_NO_ANSWER = "dns_no_answer"  # NOERROR but no record of the asked type
    DNS_TIMEOUT = "dns_timeout"
    DNS_UNREACHABLE = "dns_unreachable"  # ICMP port/host unreachable from the resolver
    DNS_UNEXPECTED = "dns_unexpected"  # answer did not match the probe's expectations
    CONNECT_TIMEOUT = "connect_timeout"
    CONNECT_REFUSED = "connect_refused"
    CONNECT_EPERM = "connect_eperm"  # local firewall (EPERM on connect/sendmsg)
    CONNECT_UNREACHABLE = "connect_unreachable"  # EHOSTUNREACH / ENETUNREACH
    CONNECT_RESET = "connect_reset"  # reset after the handshake, before an answer
    TLS_ERROR = "tls_error"
    READ_TIMEOUT = "read_timeout"
    HTTP_STATUS = "http_status"
    VALIDATION = "validation"  # body regex, header or other expectation failed
    PROTOCOL_ERROR = "protocol_error"  # malformed answer from the peer
    SOURCE_ERROR = "source_error"  # could not enter the source namespace
    INTERNAL = "internal"  # a bug in connprobe; never silently swallowed


# The DNS response codes by their text (dnspython's `dns.rcode.to_text`): what `valid_rcodes` accepts and
# what the metrics name; an answer with any other code counts as no answer there.
DNS_RCODES = frozenset({"NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
                        "NXRRSET", "NOTAUTH", "NOTZONE", "BADVERS"})
# The rcodes that are an error of their own; any other unwanted rcode is DNS_UNEXPECTED.
RCODE_ERROR = {
    "NXDOMAIN": ErrorKind.DNS_NXDOMAIN,
    "SERVFAIL": ErrorKind.DNS_SERVFAIL,
    "REFUSED": ErrorKind.DNS_REFUSED,
}


@dataclass(frozen=True, slots=True)
class Flow:
    """One transport-level conversation as seen from the prober's side."""

    proto: Proto
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    netns: int  # network-namespace inode (stat -L -c %i /run/netns/NAME)

    def reversed(self) -> Flow:
        """The peer's view: events seen on the server side of a lab carry this tuple."""
        return Flow(self.proto, self.remote_addr, self.remote_port, self.local_addr, self.local_port, self.netns)


@dataclass(frozen=True, slots=True)
class PhaseSpan:
    """A phase of a probe (resolve, connect, tls, processing, transfer) on the monotonic clock."""

    name: str
    start_ns: int
    end_ns: int

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


@dataclass(frozen=True, slots=True)
class Arrival:
    """How much of the answer had arrived by when: `bytes` received in all (an HTTP body's decoded bytes, a
    TCP probe's bytes read) at `ts_ns`. A result keeps a few dozen of these at most (`prober/progress.py`)."""

    ts_ns: int
    bytes: int


@dataclass(frozen=True, slots=True)
class DnsTransaction:
    server: str
    name: str
    qtype: str
    start_ns: int
    end_ns: int | None  # None: no answer arrived
    rcode: str | None  # "NOERROR", "NXDOMAIN", ... ; None when no answer
    flow: Flow | None
    answers: tuple[str, ...] = ()
    transport: Proto = Proto.UDP


@dataclass(frozen=True, slots=True)
class ProbeResult:
    name: str
    kind: ProbeKind
    target: str
    source: str  # "host" or the network namespace's name/path
    start_ns: int
    end_ns: int
    ok: bool
    error: ErrorKind | None = None
    error_detail: str = ""
    phases: tuple[PhaseSpan, ...] = ()
    http_status: int | None = None
    address: str | None = None  # the resolved address this result probed
    flows: tuple[Flow, ...] = ()
    dns: tuple[DnsTransaction, ...] = ()
    failed_validators: tuple[str, ...] = ()
    suspect: bool = False  # the event loop was starved while this probe ran
    captured_headers: tuple[tuple[str, str], ...] = ()  # response headers asked for (e.g. X-Request-Id)
    labels: tuple[tuple[str, str], ...] = field(default=())
    # kind-specific measurements, sorted by name: icmp_reply_hop_limit, grpc_status_code,
    # grpc_serving_status (grpc.health.v1 enum number), ...
    values: tuple[tuple[str, float], ...] = ()
    # How the answer arrived: a point at least every 1/PROGRESS_POINTS of the probe's time budget while bytes
    # came in, and the last arrival always (empty: nothing was read, or the kind does not record it).
    progress: tuple[Arrival, ...] = ()

    @property
    def last_arrival_ns(self) -> int | None:
        """When the last byte of the answer arrived (None: none recorded)."""
        return self.progress[-1].ts_ns if self.progress else None

    def bytes_by(self, ts_ns: int) -> int:
        """Bytes of the answer that had arrived by `ts_ns` (as far as the points tell: the last point not after
        it)."""
        got = 0
        for p in self.progress:
            if p.ts_ns > ts_ns:
                break
            got = p.bytes
        return got

    def local_endpoints(self, dns_only: bool = False) -> dict[tuple[str, str, int], Flow]:
        """The local end of each flow of this result and of its DNS queries: (proto, address, port) -> the flow
        (on the same end, a DNS query's flow wins). The kernel sensor watches these ports and the correlator
        joins kernel events on them. `dns_only`: the ends of the DNS queries alone."""
        ends: dict[tuple[str, str, int], Flow] = {}
        if not dns_only:
            for f in self.flows:
                ends[(str(f.proto), f.local_addr, f.local_port)] = f
        for tx in self.dns:
            if tx.flow is not None:
                ends[(str(tx.flow.proto), tx.flow.local_addr, tx.flow.local_port)] = tx.flow
        return ends

    def local_ports(self) -> set[tuple[str, int]]:
        """(proto, local port) of each of `local_endpoints()`: the keys the kernel sensor watches."""
        return {(proto, port) for proto, _, port in self.local_endpoints()}

    def value(self, name: str) -> float | None:
        for key, v in self.values:
            if key == name:
                return v
        return None

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    def phase(self, name: str) -> PhaseSpan | None:
        for span in self.phases:
            if span.name == name:
                return span
        return None

    def phase_durations_ns(self) -> dict[str, int]:
        """Durations summed per phase name (redirect hops add up, as blackbox_exporter does)."""
        out: dict[str, int] = {}
        for span in self.phases:
            out[span.name] = out.get(span.name, 0) + span.duration_ns
        return out
