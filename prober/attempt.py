"""One probe run against one address: its phase timeline (`Hop`, `Timeline`), what is derived from a spec
once (`Prepared`), the run's mutable scratch (`Attempt`) and the one place a `ProbeResult` is built.

Hooks only store `time.monotonic_ns()` stamps on a `Hop`; `Timeline.spans()` turns them into
`PhaseSpan`s afterwards. A phase never reached is absent; one that started and never ended (the probe
failed in it) ends at the failure time, so a correlator sees where the time went.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from prober.env import ProbeEnv
from prober.errors import classify
from prober.progress import Arrivals
from prober.redact import Redactor, redact_url, remember
from prober.resolve import Resolution, ResolvConf, is_ip, load_resolv_conf
from prober.sockets import PortCallback, Source, connect
from prober.spec import ProbeSpec
from prober.target import Target, parse_target
from prober.types import Arrival, DnsTransaction, ErrorKind, Flow, PhaseSpan, ProbeKind, ProbeResult, Proto

monotonic_ns = time.monotonic_ns
_LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}: close() sends a reset


class Hop:
    """Raw timestamps of one connection (one redirect hop). 0 = not reached."""

    __slots__ = (
        "conn",
        "connect_end",
        "connect_start",
        "end",
        "first_byte",
        "peercert",
        "sent",
        "sock",
        "tls",
        "tls_end",
        "tls_start",
    )

    def __init__(self) -> None:
        self.connect_start = self.connect_end = self.tls_start = self.tls_end = 0
        self.sent = self.first_byte = self.end = 0
        self.conn = None  # the protocol object that stamps first_byte (aiohttp)
        self.peercert: dict | None = None  # the verified peer certificate (TLS hops)
        self.tls = None  # `prober.tlsinfo.tls_facts` of the handshake (TLS hops): a TLSFacts
        self.sock: socket.socket | None = None  # the hop's TCP socket (to reset it when the probe gives up)

    def phase(self) -> str:
        if self.first_byte or (self.conn is not None and getattr(self.conn, "first_byte_ns", 0)):
            return "transfer"
        if self.sent:
            return "processing"
        if self.tls_start and not self.tls_end:
            return "tls"
        if self.connect_end:
            return "processing"
        return "connect"


class Timeline:
    __slots__ = ("hops", "marks", "resolves")

    def __init__(self) -> None:
        self.hops: list[Hop] = []
        self.resolves: list[tuple[int, int]] = []
        self.marks: list[PhaseSpan] = []  # phases of kinds without connection hops (icmp: setup, rtt)

    def hop(self) -> Hop:
        h = Hop()
        if self.hops:
            prev = self.hops[-1]
            if not prev.end:
                prev.end = monotonic_ns()
        self.hops.append(h)
        return h

    def phase(self) -> str:
        if self.hops:
            return self.hops[-1].phase()
        return "connect"

    def reset_on_close(self) -> None:
        """The probe gave up: make the close of each hop's socket still open a reset (SO_LINGER 0) instead of a
        FIN. The socket then leaves at once — no FIN_WAIT with a retransmission timer pending when a policy
        eats the peer's acknowledgement — and the peer's too when the reset reaches it, so the kernel shows the
        probe's flows closed and its evidence window can close (`correlator.join.window_complete`). The result
        is decided already; only how the connection ends changes (as when unread data is left, which resets it
        too). A socket already closed is left alone."""
        for h in self.hops:
            s = h.sock
            if s is not None and s.fileno() != -1:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)

    def spans(self, end_ns: int) -> tuple[PhaseSpan, ...]:
        out: list[PhaseSpan] = [PhaseSpan("resolve", a, b) for a, b in self.resolves]
        out.extend(self.marks)
        for h in self.hops:
            first = h.first_byte or (getattr(h.conn, "first_byte_ns", 0) if h.conn is not None else 0)
            stop = h.end or end_ns
            if h.connect_start:
                out.append(PhaseSpan("connect", h.connect_start, h.connect_end or stop))
            if h.tls_start:
                out.append(PhaseSpan("tls", h.tls_start, h.tls_end or stop))
            if h.sent or first:
                sent = h.sent or h.tls_end or h.connect_end or first
                out.append(PhaseSpan("processing", sent, first or stop))
            if first:
                out.append(PhaseSpan("transfer", first, max(first, stop)))
        out.sort(key=lambda s: s.start_ns)  # chronological: a redirect hop's resolve sits before its connect
        return tuple(out)


class Prepared:
    """Everything derived from a spec once (it is frozen): parsed target, shown target, secrets, labels."""

    __slots__ = (
        "direct",
        "headers",
        "ip_literal",
        "kind",
        "labels",
        "redactor",
        "request",
        "secrets",
        "shown_target",
        "spec",
        "target",
        "url",
    )

    def __init__(self, spec: ProbeSpec):
        self.spec = spec
        self.kind = ProbeKind(spec.module.prober)
        dot = spec.module.dns is not None and spec.module.dns.transport == "tls"
        self.target = parse_target(spec.module.prober, spec.target, 853 if dot else 53)
        http = spec.module.http
        self.redactor = Redactor.for_spec(spec)  # error details and captured headers go through it
        self.secrets = self.redactor.secrets
        remember(spec)  # and log lines are scrubbed of them
        self.headers = {k: v.get_secret_value() for k, v in http.headers.items()} if http is not None else {}
        self.shown_target = redact_url(spec.target)
        self.labels = tuple(sorted(spec.labels.items()))
        self.ip_literal = is_ip(self.target.host)
        # an IP target needs no resolution: its one Target with the address filled in, built once
        self.direct = replace(self.target, address=self.target.host) if self.ip_literal else None
        self.url = None  # the client's parsed URL (yarl), filled in by the http prober
        self.request: bytes | None = None  # the default client's first request, built on first use


_prepared: dict[int, Prepared] = {}


def prepared(spec: ProbeSpec) -> Prepared:
    p = _prepared.get(id(spec))
    if p is None or p.spec is not spec:
        if len(_prepared) > 10000:
            _prepared.clear()
        p = _prepared[id(spec)] = Prepared(spec)
    return p


@dataclass(slots=True)
class Attempt:
    """Mutable scratch of one probe run against one address; `result()` freezes it."""

    spec: ProbeSpec
    kind: ProbeKind
    source: Source
    target: Target
    start_ns: int
    prep: Prepared
    resolution: Resolution | None = None
    timeline: Timeline = field(default_factory=Timeline)
    flows: list[Flow] = field(default_factory=list)
    dns: list[DnsTransaction] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    http_status: int | None = None
    resolv: ResolvConf | None = None
    captured: tuple[tuple[str, str], ...] = ()
    values: dict[str, float] = field(default_factory=dict)
    tls_leaf: tuple[tuple[str, str], ...] = ()  # `prober.tlsinfo.TLSFacts.leaf` of the handshake that counted
    oauth2_fetch: object | None = None  # the OAuth2 token fetch this run waits for (`prober.oauth2`)

    def tls(self, facts) -> None:
        """Record a TLS handshake's facts (`prober.tlsinfo.tls_facts`): its values and its leaf certificate."""
        if facts is not None:
            self.values.update(facts.values)
            self.tls_leaf = facts.leaf
    arrivals: Arrivals | None = None  # how the answer arrived, for kinds that read one (http, tcp expect)

    def track_arrivals(self, deadline_ns: int) -> Arrivals:
        """Start recording how the answer arrives (points spaced by the probe's budget)."""
        self.arrivals = Arrivals(self.start_ns, deadline_ns)
        return self.arrivals

    def resolv_conf(self) -> ResolvConf:
        return self.resolv or load_resolv_conf(self.source.resolv_conf)

    async def connect_tcp(self, env: ProbeEnv | PortCallback, family: int, sockaddr: tuple, hop,
                          local: str | None = None) -> socket.socket:
        """A TCP socket of the probe's source (bound to `local` when given), announced before use (to `env`'s
        `on_local_port`, or to the callback given instead), connected to `sockaddr` with the hop's connect phase
        timed. Its flow is recorded even when the connect fails (the kernel saw its packets); the socket is closed
        then, and the caller's on any later failure. The one home of that sequence (http, tcp, grpc, oauth2)."""
        on_local_port = env.on_local_port if isinstance(env, ProbeEnv) else env
        sock = await self.source.open(family, socket.SOCK_STREAM, on_local_port, local)
        hop.sock = sock
        hop.connect_start = time.monotonic_ns()
        try:
            hop.connect_end = await connect(asyncio.get_running_loop(), sock, sockaddr)
        except BaseException:
            self.flows.append(self.source.flow(sock, sockaddr, Proto.TCP))
            sock.close()
            raise
        self.flows.append(self.source.flow(sock, sockaddr, Proto.TCP))
        return sock

    def result_of(self, exc: BaseException, context: str = "") -> ProbeResult:
        """The result of a run that `exc` ended: its `ErrorKind` for the phase the run was in (prober/errors.py).
        A connection still open is reset as it closes (`Timeline.reset_on_close`)."""
        self.timeline.reset_on_close()
        kind, detail = classify(exc, self.timeline.phase())
        return self.result(kind, f"{context}: {detail}" if context else detail)

    def result(self, error: ErrorKind | None = None, detail: str = "") -> ProbeResult:
        end = monotonic_ns()
        for h in self.timeline.hops:
            if not h.end:
                h.end = end
        if error is None and self.failed:
            error = ErrorKind.VALIDATION
            detail = detail or "failed: " + ", ".join(self.failed)
        return build_result(
            self.spec,
            self.source.label,
            self.start_ns,
            error,
            detail,
            self.resolution,
            prep=self.prep,
            kind=self.kind,
            end_ns=end,
            phases=self.timeline.spans(end),
            flows=self.flows,
            dns=self.dns,
            address=self.target.address,
            http_status=self.http_status,
            failed=tuple(self.failed),
            captured=self.captured,
            values=self.values,
            tls_leaf=self.tls_leaf,
            progress=self.arrivals.freeze() if self.arrivals is not None else (),
        )


def build_result(
    spec: ProbeSpec,
    source_label: str,
    start_ns: int,
    error: ErrorKind | None,
    detail: str = "",
    resolution: Resolution | None = None,
    *,
    prep: Prepared | None = None,
    kind: ProbeKind | None = None,
    end_ns: int | None = None,
    phases: tuple[PhaseSpan, ...] = (),
    flows: Iterable[Flow] = (),
    dns: Iterable[DnsTransaction] = (),
    address: str | None = None,
    http_status: int | None = None,
    failed: tuple[str, ...] = (),
    captured: tuple[tuple[str, str], ...] = (),
    values: dict[str, float] | None = None,
    tls_leaf: tuple[tuple[str, str], ...] = (),
    progress: tuple[Arrival, ...] = (),
) -> ProbeResult:
    """The one place a `ProbeResult` is made: by `Attempt.result()`, and by the runner for a run that failed
    before it had an attempt (no source, no address). The resolution's DNS transactions, flows and resolve
    phase come first; error details and captured header values go through the spec's redactor."""
    end = end_ns or monotonic_ns()
    redactor = prep.redactor if prep is not None else Redactor.for_spec(spec)
    txns = [*(resolution.transactions if resolution is not None else ()), *dns]
    if resolution is not None and resolution.transactions:
        phases = (PhaseSpan("resolve", resolution.start_ns, resolution.end_ns or end), *phases)
    dns_flows = [t.flow for t in txns if t.flow is not None]
    if captured:
        captured = tuple((k, redactor.text(v)) for k, v in captured)
    return ProbeResult(
        name=spec.name,
        kind=kind or ProbeKind(spec.module.prober),
        target=prep.shown_target if prep is not None else redact_url(spec.target),
        source=source_label,
        start_ns=start_ns,
        end_ns=end,
        ok=error is None,
        error=error,
        error_detail=redactor.text(detail),
        phases=phases,
        http_status=http_status,
        address=address,
        flows=(*dns_flows, *flows),
        dns=tuple(txns),
        failed_validators=failed,
        captured_headers=captured,
        values=tuple(sorted(values.items())) if values else (),
        labels=prep.labels if prep is not None else tuple(sorted(spec.labels.items())),
        tls_leaf=tls_leaf,
        progress=progress,
    )
