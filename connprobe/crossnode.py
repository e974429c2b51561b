"""Cross-node evidence: each agent answers for its own kernel's events of a flow, and asks the agent on the
destination's node when its own evidence does not decide (`correlator.crossnode.wants_remote`).

The answering side — `GET /api/evidence` (`evidence_endpoint`):

    ?proto=tcp&saddr=10.77.1.2&sport=40000&daddr=10.77.2.11&dport=8080&from=<ns>&to=<ns>&sent=<ns>

"the events you kept for this flow (either direction; after a DNAT too: the client's endpoint is what is
matched) between these wall-clock times (ns since the epoch, the asker's clock; `sent` is when it asked)".
It answers only an authenticated peer (`peer_authenticated`: the bearer token of `node.peer_token_file`,
the web config's basic auth, or a verified client certificate); anyone else gets 401. Hostile values → 400
with one line naming the field. The answer carries the node's name, its clock (receive and reply times,
CLOCK_MONOTONIC → CLOCK_REALTIME offset with its uncertainty) and each event's wall-clock time.

The asking side — `PeerAsker.ask(result, offset)`: the agent for each TCP flow's destination (a `Resolver`:
`StaticPeers` from the `peers:` config now; a Kubernetes lookup, dest IP → pod → node → agent, plugs in the
same way), asked concurrently under one deadline. When no peer answers for the destination (a Service's
virtual IP), the endpoint the connection was DNAT'ed to is looked up in the conntrack table of the probe's
namespace (`dnat_destination`) and its agent is asked. Whatever happens — refused, unreachable, slow, an answer
that makes no sense — the result is a `RemoteEvidence`, never an exception and never a wait beyond the
deadline. Remote times are placed on this node's timeline NTP-style from the four timestamps of the question
(sent, received, replied, answer read), so a peer's skewed wall clock is measured, not trusted; the placement's
uncertainty is half the round trip plus both nodes' clock-sampling uncertainty.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bpf.types import ClockOffset, EventKind, KernelEvent, RemoteEvent, RemoteEvidence
from connprobe.config import PeerSettings
from prober.types import Flow, ProbeResult

log = logging.getLogger(__name__)

__all__ = ["EVIDENCE_PATH", "FirstOf", "Peer", "PeerAsker", "QueryError", "Resolver", "StaticPeers", "answer_document",
           "parse_query", "peer_authenticated", "read_token"]

EVIDENCE_PATH = "/api/evidence"
MAX_WINDOW_NS = 600 * 1_000_000_000  # a question covers at most 10 minutes
MARGIN_NS = 1_000_000_000  # the answering side widens the window by this much (the asker's clock is estimated)
MAX_EVENTS = 5000  # events in one answer
MAX_ANSWER_BYTES = 4 << 20
MAX_FLOWS_ASKED = 4  # TCP flows of one result asked about (redirect hops)
MAX_SKEW_NS = 86_400 * 1_000_000_000
MAX_TOKEN_BYTES = 4096


# -- configuration -------------------------------------------------------------------------------------------


class PeerConfigError(ValueError):
    """A peer's settings cannot be used (its token or certificate file unreadable): one line naming it."""


def read_token(path: str, what: str) -> bytes:
    """A bearer token from a file (its first line, without surrounding blanks)."""
    try:
        raw = Path(path).read_bytes()[: MAX_TOKEN_BYTES + 1]
    except OSError as exc:
        raise PeerConfigError(f"{what}: {path}: {exc.strerror or exc}") from None
    token = raw.split(b"\n", 1)[0].strip()
    if token.startswith(b"REPLACE-WITH"):  # the manifests' placeholder: a token everyone knows is no credential
        raise PeerConfigError(f"{what}: {path}: still the placeholder {token[:40].decode('ascii', 'replace')!r}; "
                              "put a random token there")
    if not token or len(token) > MAX_TOKEN_BYTES or any(c < 0x21 or c > 0x7e for c in token):
        raise PeerConfigError(f"{what}: {path}: the token must be one line of printable ASCII, 1 to "
                              f"{MAX_TOKEN_BYTES} bytes")
    return token


@dataclass(frozen=True)
class Peer:
    """An agent that answers for some addresses: where it is, how to prove who we are, how long to wait."""

    url: str
    token: bytes | None = None
    ssl_context: ssl.SSLContext | None = None
    timeout: float = 0.5

    @classmethod
    def from_settings(cls, s: PeerSettings) -> Peer:
        token = read_token(s.token_file, f"peers ({s.url}): token_file") if s.token_file else None
        ctx = None
        if s.url.startswith("https://"):
            from prober.tlsinfo import EncryptedKey, no_passphrase

            try:
                ctx = ssl.create_default_context(cafile=s.ca_file) if s.ca_file else ssl.create_default_context()
                if s.cert_file:
                    ctx.load_cert_chain(s.cert_file, s.key_file, password=no_passphrase)
            except EncryptedKey as exc:
                raise PeerConfigError(f"peers ({s.url}): {'key_file' if s.key_file else 'cert_file'} "
                                      f"{s.key_file or s.cert_file}: {exc}") from None
            except (OSError, ssl.SSLError) as exc:
                raise PeerConfigError(f"peers ({s.url}): TLS files: {exc}") from None
        return cls(s.url, token, ctx, s.timeout)


class Resolver(Protocol):
    """Which peer agent answers for a destination address (None: no peer, or this node itself)."""

    def peer_for(self, addr: str) -> Peer | None: ...


class StaticPeers:
    """`peers:` of the config: CIDR → agent, the most specific range wins."""

    def __init__(self, entries: Iterable[tuple[str, Peer]]):
        self._nets = sorted(((ipaddress.ip_network(c, strict=False), p) for c, p in entries),
                            key=lambda np: -np[0].prefixlen)

    @classmethod
    def from_settings(cls, settings: Iterable[PeerSettings]) -> StaticPeers:
        return cls((s.cidr, Peer.from_settings(s)) for s in settings)

    def __bool__(self) -> bool:
        return bool(self._nets)

    def peer_for(self, addr: str) -> Peer | None:
        try:
            a = ipaddress.ip_address(addr.split("%", 1)[0])
        except ValueError:
            return None
        for net, peer in self._nets:
            if a.version == net.version and a in net:
                return peer
        return None


class FirstOf:
    """Resolvers asked in order, the first that names a peer wins (`peers:` before the cluster).
    `no_peer_reason(addr)`, when a resolver has it: why nobody is asked (None: say nothing)."""

    def __init__(self, *resolvers: Any):
        self.resolvers = tuple(r for r in resolvers if r)

    def __bool__(self) -> bool:
        return bool(self.resolvers)

    def peer_for(self, addr: str) -> Peer | None:
        for r in self.resolvers:
            peer = r.peer_for(addr)
            if peer is not None:
                return peer
        return None

    def no_peer_reason(self, addr: str) -> str | None:
        reasons = [getattr(r, "no_peer_reason", lambda a: None)(addr) for r in self.resolvers]
        if any(r is None and hasattr(res, "no_peer_reason") for r, res in zip(reasons, self.resolvers, strict=True)):
            return None  # one of them says: this node itself
        return next((r for r in reasons if r), None)


# -- the answering side -------------------------------------------------------------------------------------


class QueryError(ValueError):
    """A question that cannot be answered; the message names the field (a 400)."""


@dataclass(frozen=True)
class Query:
    proto: str
    saddr: str
    sport: int
    daddr: str
    dport: int
    from_ns: int
    to_ns: int
    sent_ns: int | None


def _addr(q, name: str) -> str:
    v = q.get(name)
    if v is None:
        raise QueryError(f"{name}: required")
    try:
        if len(v) > 64 or "%" in v:  # a packet's address has no scope (a zone id would be matched as text)
            raise ValueError
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise QueryError(f"{name}: {v[:64]!r} is not an IP address") from None


def _int(q, name: str, lo: int, hi: int, required: bool = True) -> int | None:
    v = q.get(name)
    if v is None:
        if required:
            raise QueryError(f"{name}: required")
        return None
    if not (0 < len(v) <= 20 and v.removeprefix("-").isdigit() and v.isascii()):
        raise QueryError(f"{name}: {v[:40]!r} is not an integer")
    n = int(v)
    if not lo <= n <= hi:
        raise QueryError(f"{name}: {n} is out of range ({lo}..{hi})")
    return n


def parse_query(q) -> Query:
    """The question from a query string (a mapping of str → str); QueryError naming the field otherwise."""
    for key in q:
        if key not in ("proto", "saddr", "sport", "daddr", "dport", "from", "to", "sent"):
            raise QueryError(f"{key[:40].encode('unicode_escape').decode()}: unknown parameter")
        if hasattr(q, "getall") and len(q.getall(key)) > 1:
            raise QueryError(f"{key}: given more than once")
    proto = q.get("proto", "tcp")
    if proto not in ("tcp", "udp"):
        raise QueryError(f"proto: {proto[:20]!r} must be tcp or udp")
    big = 1 << 62
    query = Query(proto, _addr(q, "saddr"), _int(q, "sport", 1, 65535), _addr(q, "daddr"),
                  _int(q, "dport", 1, 65535), _int(q, "from", 0, big), _int(q, "to", 0, big),
                  _int(q, "sent", 0, big, required=False))
    if query.to_ns < query.from_ns:
        raise QueryError("to: before from")
    if query.to_ns - query.from_ns > MAX_WINDOW_NS:
        raise QueryError(f"to: the window is longer than {MAX_WINDOW_NS // 1_000_000_000}s")
    return query


def _event_doc(e: KernelEvent, offset: ClockOffset, names: dict[int, str]) -> dict[str, Any]:
    doc: dict[str, Any] = {"wall_ns": offset.wall(e.ts_ns), "kind": str(e.kind), "proto": e.proto,
                           "saddr": e.saddr, "sport": e.sport, "daddr": e.daddr, "dport": e.dport, "netns": e.netns}
    if e.netns in names:
        doc["netns_name"] = names[e.netns]
    for k in ("tcp_state", "old_state", "reason", "location", "tcp_flags", "error", "length", "seq", "seq_len",
              "snd_una", "segs_out", "total_retrans"):
        v = getattr(e, k)
        if v is not None:
            doc[k] = v
    return doc


def answer_document(query: Query, events: Iterable[KernelEvent], *, node: str, offset: ClockOffset,
                    received_ns: int, watching: bool, netns_names: dict[int, str],
                    wall: Callable[[], int] = time.time_ns) -> dict[str, Any]:
    """The answer to a question: the matching events with their wall-clock times, this node and its clock."""
    docs = []
    for e in events:
        if e.proto != query.proto:
            continue
        if (e.saddr, e.sport) == (query.saddr, query.sport) or (e.daddr, e.dport) == (query.saddr, query.sport):
            docs.append(_event_doc(e, offset, netns_names))
            if len(docs) >= MAX_EVENTS:
                break
    return {"node": node, "watching": watching or bool(docs), "clock_uncertainty_ns": offset.uncertainty_ns,
            "received_ns": received_ns, "events": docs, "replied_ns": wall()}


def local_window(query: Query, offset: ClockOffset, received_ns: int) -> tuple[int, int]:
    """The question's window on this node's CLOCK_MONOTONIC: shifted by the asker's clock as estimated from
    `sent` (one way: at most the network delay off, hence the margin), widened by `MARGIN_NS`."""
    shift = 0
    if query.sent_ns is not None and abs(received_ns - query.sent_ns) < MAX_SKEW_NS:
        shift = received_ns - query.sent_ns
    lo = query.from_ns + shift - MARGIN_NS - offset.offset_ns
    hi = query.to_ns + shift + MARGIN_NS - offset.offset_ns
    return lo, hi


def peer_authenticated(headers, token: bytes | None, *, basic_ok: bool, client_cert: bool) -> bool:
    """Whether the asker proved it is a peer: the bearer token (compared in constant time), the web config's
    basic auth (checked by the caller: `basic_ok`), or a client certificate the TLS layer verified."""
    if client_cert or basic_ok:
        return True
    if token is None:
        return False
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value:
        return False
    return hmac.compare_digest(value.strip().encode("utf-8", "replace"), token)


# -- the asking side -----------------------------------------------------------------------------------------


_Str = Annotated[str, Field(max_length=256)]
_Port = Annotated[int, Field(ge=0, le=65535)]
_U64 = Annotated[int, Field(ge=-(1 << 63), le=(1 << 64))]


def _conntrack_reply_source(proto: int, family: int, saddr: str, sport: int, daddr: str,
                            dport: int) -> tuple[str, int] | None:
    """In the calling thread's namespace: the reply tuple's source of the conntrack entry whose original tuple
    is this one, when it differs from the original destination (a DNAT); else None."""
    from pyroute2.conntrack import Conntrack, NFCTAttrTuple

    # The kernel filters on protocol and source port (its IPv6 address filter matches nothing on 6.x); the
    # addresses are compared here.
    with Conntrack(nfgen_family=family) as ct:
        for e in ct.dump_entries(tuple_orig=NFCTAttrTuple(family=family, proto=proto, sport=sport)):
            o, r = e.tuple_orig, e.tuple_reply
            if (str(o.saddr), o.sport, str(o.daddr), o.dport) != (saddr, sport, daddr, dport):
                continue
            if (str(r.saddr), r.sport) != (daddr, dport):
                return str(r.saddr), int(r.sport)
            return None
    return None


async def dnat_destination(flow: Flow, source: str) -> tuple[str, int] | None:
    """Where a probe's TCP connection really went when a DNAT rewrote its destination (a Service's virtual IP,
    as kube-proxy does): from the conntrack table of the namespace the probe ran in (`source`: "host", a netns
    name or /proc/PID/ns/net). None when there was no NAT or it cannot be read (no conntrack, no privilege)."""
    import socket

    from prober.netns import shared_executor
    from prober.source import parse_source

    family = socket.AF_INET6 if ":" in flow.remote_addr else socket.AF_INET
    args = (socket.IPPROTO_TCP, family, flow.local_addr, flow.local_port, flow.remote_addr, flow.remote_port)
    try:
        spec = parse_source(source, bare_name=True)
        if spec.path is None:
            return await asyncio.to_thread(_conntrack_reply_source, *args)
        executor = shared_executor(str(spec.path))
        return await asyncio.wrap_future(executor.submit(_conntrack_reply_source, *args))
    except Exception as exc:  # no conntrack module, no privilege, a vanished namespace: no endpoint known
        log.debug("conntrack lookup for %s:%d failed: %s", flow.remote_addr, flow.remote_port, exc)
        return None


class _WireEvent(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    wall_ns: Annotated[int, Field(ge=0, le=1 << 62)]
    kind: Annotated[EventKind, Field(strict=False)]  # its value as a string
    proto: Literal["tcp", "udp", "icmp"]
    saddr: _Str
    sport: _Port
    daddr: _Str
    dport: _Port
    netns: Annotated[int, Field(ge=0, le=(1 << 32) - 1)]
    netns_name: _Str | None = None
    tcp_state: _Str | None = None
    old_state: _Str | None = None
    reason: _Str | None = None
    location: _Str | None = None
    tcp_flags: Annotated[str, Field(max_length=16)] | None = None
    error: _U64 | None = None
    length: _U64 | None = None
    seq: _U64 | None = None
    seq_len: _U64 | None = None
    snd_una: _U64 | None = None
    segs_out: _U64 | None = None
    total_retrans: _U64 | None = None


class _WireAnswer(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    node: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9._-]+$")]
    watching: bool
    clock_uncertainty_ns: Annotated[int, Field(ge=0, le=10 * 1_000_000_000)]
    received_ns: Annotated[int, Field(ge=0, le=1 << 62)]
    replied_ns: Annotated[int, Field(ge=0, le=1 << 62)]
    events: Annotated[list[_WireEvent], Field(max_length=MAX_EVENTS)]


def _one_line(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"]) or "answer"
    return f"{loc}: {err['msg']}"[:200]


@dataclass
class PeerAsker:
    """Asks peers about a result's flows. One HTTP session, opened on first use; `close()` at the end."""

    resolver: Resolver
    wall: Callable[[], int] = time.time_ns
    grace_ns: int = 500_000_000
    # the endpoint a DNAT'ed flow really went to (flow, the result's source) -> (addr, port) | None
    dnat: Callable[[Flow, str], Any] = dnat_destination
    _session: aiohttp.ClientSession | None = None
    asked: int = 0
    failed: int = 0

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _session_(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, force_close=False),
                timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False)
        return self._session

    async def ask(self, result: ProbeResult, offset: ClockOffset) -> tuple[RemoteEvidence, ...]:
        """What the destinations' agents saw of the result's TCP flows (or why they could not say), within the
        longest deadline of the peers asked. Never raises (cancellation aside)."""
        jobs = []
        for f in [f for f in result.flows if str(f.proto) == "tcp"][:MAX_FLOWS_ASKED]:
            peer = self.resolver.peer_for(f.remote_addr)
            if peer is None:
                jobs.append(self._ask_endpoint(result, f, offset))
            else:
                jobs.append(self._ask_one(peer, result, f, offset))
        if not jobs:
            return ()
        return tuple(r for r in await asyncio.gather(*jobs) if r is not None)

    async def _ask_endpoint(self, result: ProbeResult, flow: Flow, offset: ClockOffset) -> RemoteEvidence | None:
        """No peer answers for the flow's destination: if a DNAT sent it elsewhere, ask that endpoint's agent."""
        try:
            real = await asyncio.wait_for(self.dnat(flow, result.source), 1.0)
        except TimeoutError:
            real = None
        if real is not None:
            peer = self.resolver.peer_for(real[0])
            if peer is not None:
                import dataclasses

                return await self._ask_one(peer, result, dataclasses.replace(flow, remote_addr=real[0],
                                                                             remote_port=real[1]), offset)
        why = getattr(self.resolver, "no_peer_reason", None)
        reason = why(real[0] if real is not None else flow.remote_addr) if why is not None else None
        return RemoteEvidence("", False, reason) if reason else None

    async def _ask_one(self, peer: Peer, result: ProbeResult, flow, offset: ClockOffset) -> RemoteEvidence:
        self.asked += 1
        try:
            async with asyncio.timeout(peer.timeout):
                return await self._question(peer, result, flow, offset)
        except TimeoutError:
            why = f"no answer within {peer.timeout * 1000:.0f} ms"
        except aiohttp.ClientConnectorError as exc:
            why = f"unreachable: {exc.os_error.strerror if exc.os_error and exc.os_error.strerror else exc}"
        except aiohttp.ClientError as exc:
            why = f"{type(exc).__name__}: {str(exc)[:150]}"
        except _Refused as exc:
            why = str(exc)
        except (OSError, ValueError) as exc:
            why = f"{type(exc).__name__}: {str(exc)[:150]}"
        self.failed += 1
        return RemoteEvidence(peer.url, False, why)

    async def _question(self, peer: Peer, result: ProbeResult, flow, offset: ClockOffset) -> RemoteEvidence:
        # a link-local address's scope (%eth0) names an interface of this node, nothing the peer can match
        params = {"proto": "tcp", "saddr": flow.local_addr.partition("%")[0], "sport": str(flow.local_port),
                  "daddr": flow.remote_addr.partition("%")[0],
                  "dport": str(flow.remote_port), "from": str(offset.wall(result.start_ns) - self.grace_ns),
                  "to": str(offset.wall(result.end_ns) + self.grace_ns)}
        headers = {"Accept": "application/json"}
        if peer.token is not None:
            headers["Authorization"] = "Bearer " + peer.token.decode()
        t0 = self.wall()
        params["sent"] = str(t0)
        async with self._session_().get(peer.url + EVIDENCE_PATH, params=params, headers=headers,
                                        ssl=peer.ssl_context if peer.ssl_context is not None else True,
                                        allow_redirects=False) as resp:
            body = b""
            while len(body) <= MAX_ANSWER_BYTES:  # a stream read returns what has come so far: read to the end
                chunk = await resp.content.read(MAX_ANSWER_BYTES + 1 - len(body))
                if not chunk:
                    break
                body += chunk
            t3 = self.wall()
            if resp.status != 200:
                line = body[:200].decode("utf-8", "replace").splitlines()[0] if body else ""
                raise _Refused(f"answered HTTP {resp.status}" + (f": {line}" if line else ""))
        if len(body) > MAX_ANSWER_BYTES:
            raise _Refused(f"answer larger than {MAX_ANSWER_BYTES >> 20} MiB")
        try:
            raw = json.loads(body)
            ans = _WireAnswer.model_validate(raw)
        except RecursionError:
            raise _Refused("answer invalid: nested too deeply") from None
        except ValueError as exc:
            why = _one_line(exc) if isinstance(exc, ValidationError) else f"not JSON: {str(exc)[:100]}"
            raise _Refused(f"answer invalid: {why}") from None
        return place(ans, t0, t3, offset, peer.url)


class _Refused(Exception):
    pass


def place(ans: _WireAnswer, t0: int, t3: int, offset: ClockOffset, url: str) -> RemoteEvidence:
    """The answer's events on this node's CLOCK_MONOTONIC. The peer's clock minus ours is estimated from the
    four timestamps (sent t0, received t1, replied t2, read t3: θ = ((t1 - t0) + (t2 - t3)) / 2), to within half
    the round trip less the peer's own time (δ / 2), plus both nodes' clock-sampling uncertainty."""
    t1, t2 = ans.received_ns, ans.replied_ns
    if t2 < t1:
        raise _Refused("answer invalid: replied_ns before received_ns")
    theta = ((t1 - t0) + (t2 - t3)) // 2
    delta = max((t3 - t0) - (t2 - t1), 0)
    unc = delta // 2 + ans.clock_uncertainty_ns + offset.uncertainty_ns
    events = []
    for w in ans.events:
        ts = w.wall_ns - theta - offset.offset_ns
        ev = KernelEvent(ts, w.kind, w.proto, w.saddr, w.sport, w.daddr, w.dport, w.netns, tcp_state=w.tcp_state,
                         old_state=w.old_state, reason=w.reason, location=w.location, tcp_flags=w.tcp_flags,
                         error=w.error, length=w.length, seq=w.seq, seq_len=w.seq_len, snd_una=w.snd_una,
                         segs_out=w.segs_out, total_retrans=w.total_retrans)
        events.append(RemoteEvent(ev, ans.node, unc, w.netns_name))
    return RemoteEvidence(ans.node, True, "", tuple(events), ans.watching, unc)

