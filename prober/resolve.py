"""The prober's own DNS: dnspython messages over sockets the prober created (so their flows are known).

Nameservers, search list, ndots, timeout and attempts come from the *source's* resolv.conf
(`/etc/netns/NAME/resolv.conf` for a named namespace when it exists, as `ip netns exec` does). Every
query is one `DnsTransaction` (server, name, type, rcode, latency, flow); a truncated UDP answer is
retried over TCP. `resolve()` asks A and/or AAAA as the ip policy says and returns every address.
`query()` also speaks DNS over TLS (RFC 7858: the TCP framing inside a TLS session) for a DNS probe with
`transport: tls`; its outcome then carries when the TCP connection and the TLS handshake started and ended.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver

from prober.sockets import PortCallback, Source, SourceError, connect, connect_guard, recv_stamped
from prober.types import RCODE_ERROR, DnsTransaction, ErrorKind, Proto


@dataclass(frozen=True, slots=True)
class ResolvConf:
    nameservers: tuple[str, ...]
    search: tuple[str, ...] = ()
    ndots: int = 1
    timeout: float = 5.0
    attempts: int = 2
    port: int = 53


_conf_cache: dict[str, tuple[float, ResolvConf]] = {}


def load_resolv_conf(path: str | os.PathLike) -> ResolvConf:
    """Parse resolv.conf with dnspython's parser; cached until the file's mtime changes."""
    path = os.fspath(path)
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        return ResolvConf(nameservers=())
    hit = _conf_cache.get(path)
    if hit is not None and hit[0] == mtime:
        return hit[1]
    try:
        r = dns.resolver.Resolver(filename=path, configure=True)
        servers = tuple(str(ns) for ns in r.nameservers)
        conf = ResolvConf(
            nameservers=servers,
            search=tuple(str(n).rstrip(".") for n in r.search),
            ndots=r.ndots if r.ndots is not None else 1,
            timeout=float(r.timeout),
            attempts=_attempts(path),
        )
    except dns.resolver.NoResolverConfiguration:
        conf = ResolvConf(nameservers=())
    _conf_cache[path] = (mtime, conf)
    return conf


def _attempts(path: str) -> int:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.readlines()
        for line in lines:
            parts = line.split()
            if parts and parts[0] == "options":
                for opt in parts[1:]:
                    if opt.startswith("attempts:"):
                        return max(1, min(5, int(opt.split(":", 1)[1])))
    except (OSError, ValueError):
        pass
    return 2


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(slots=True)
class QueryOutcome:
    txn: DnsTransaction
    response: dns.message.Message | None
    error: ErrorKind | None
    detail: str = ""
    # a stream transport's set-up (monotonic ns; None: not reached, or UDP): the TCP connect, the TLS handshake
    connect: tuple[int, int] | None = None
    tls: tuple[int, int] | None = None


async def query(
    source: Source,
    server: str,
    qname: str,
    qtype: str,
    timeout: float,
    on_local_port: PortCallback,
    *,
    port: int = 53,
    tcp: bool = False,
    recursion_desired: bool = True,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
    local_addr: str | None = None,
) -> list[QueryOutcome]:
    """One question to one server; UDP first (TCP when the answer is truncated or `tcp` is set); with `tls`,
    over TLS alone (DNS over TLS, the certificate checked for `server_name`). `local_addr`: the address the
    query's socket is bound to (a DNS probe's `source_ip_address`).

    Returns one outcome per transaction (two when UDP was truncated and retried over TCP).
    """
    msg, wire = _question(qname, qtype, recursion_desired)
    outcomes: list[QueryOutcome] = []
    end_ns = time.monotonic_ns() + int(timeout * 1e9)  # one deadline for both transports
    if not tcp and tls is None:
        out = await _udp(source, server, port, msg, wire, qname, qtype, timeout, on_local_port, local_addr)
        outcomes.append(out)
        if out.response is None or not (out.response.flags & dns.flags.TC):
            return outcomes
        timeout = max(0.0, (end_ns - time.monotonic_ns()) / 1e9)
    outcomes.append(await _tcp(source, server, port, msg, wire, qname, qtype, timeout, on_local_port, local_addr,
                               tls, server_name))
    return outcomes


def _outcome(server, qname, qtype, start, flow, proto, resp, error, detail="", end_ns=None) -> QueryOutcome:
    if end_ns is not None:
        end = end_ns
    else:
        end = time.monotonic_ns() if resp is not None or error not in (ErrorKind.DNS_TIMEOUT,) else None
    rcode = dns.rcode.to_text(resp.rcode()) if resp is not None else None
    answers: tuple[str, ...] = ()
    if resp is not None:
        answers = tuple(
            f"{rrset.name} {dns.rdatatype.to_text(rrset.rdtype)} {rd.to_text()}"
            for rrset in resp.answer
            for rd in rrset
        )
        if error is None:
            error = RCODE_ERROR.get(rcode)
    txn = DnsTransaction(server, qname, qtype, start, end, rcode, flow, answers, proto)
    return QueryOutcome(txn, resp, error, detail or (rcode or ""))


class _Asked:
    """The one thing the transports need of a query: does this answer belong to it?"""

    __slots__ = ("id", "template")

    def __init__(self, qid: int, template: dns.message.Message):
        self.id = qid
        self.template = template

    def is_response(self, resp: dns.message.Message) -> bool:
        return resp.id == self.id and bool(resp.flags & dns.flags.QR) and resp.question == self.template.question


_templates: dict[tuple[str, str, bool], tuple[dns.message.Message, bytes]] = {}


def _question(qname: str, qtype: str, rd: bool) -> tuple[_Asked, bytes]:
    """Query wire for (name, type), built once by dnspython; each query gets a fresh random id."""
    key = (qname, qtype, rd)
    hit = _templates.get(key)
    if hit is None:
        if len(_templates) > 4096:
            _templates.clear()
        msg = dns.message.make_query(qname, qtype)
        if not rd:
            msg.flags &= ~dns.flags.RD
        hit = _templates[key] = (msg, msg.to_wire())
    qid = secrets.randbits(16)
    return _Asked(qid, hit[0]), qid.to_bytes(2, "big") + hit[1][2:]


async def _udp(source, server, port, msg, wire, qname, qtype, timeout, cb, local_addr=None) -> QueryOutcome:
    """Everything, the socket's creation in its namespace included, runs inside the query's timeout."""
    loop = asyncio.get_running_loop()
    sock = None
    flow = None
    start = time.monotonic_ns()
    try:
        async with asyncio.timeout(timeout):
            sock = await source.open(_family(server), socket.SOCK_DGRAM, cb, local_addr)
            guard = connect_guard.get()
            if guard is not None:  # the agent's /probe: a DNS target it refuses gets no packet either
                guard(server)
            try:  # UDP connect: no packet, but ICMP errors come back as ECONNREFUSED
                sock.connect((server, port))
            finally:  # the announced port is in the result even when connect fails (its watch is released)
                flow = source.flow(sock, (server, port), Proto.UDP)
            start = time.monotonic_ns()
            await loop.sock_sendall(sock, wire)
            while True:
                data, seen = await recv_stamped(loop, sock)
                try:
                    resp = dns.message.from_wire(data, ignore_trailing=True, one_rr_per_rrset=False)
                except dns.exception.DNSException:
                    continue  # garbage or another query's answer: keep waiting, as resolvers do
                if msg.is_response(resp):
                    return _outcome(server, qname, qtype, start, flow, Proto.UDP, resp, None, end_ns=seen)
    except TimeoutError:
        return _outcome(server, qname, qtype, start, flow, Proto.UDP, None, ErrorKind.DNS_TIMEOUT, "timeout")
    except SourceError:
        raise
    except OSError as exc:
        return _outcome(server, qname, qtype, start, flow, Proto.UDP, None, *_sock_error(exc))
    finally:
        if sock is not None:
            sock.close()


async def _tcp(source, server, port, msg, wire, qname, qtype, timeout, cb, local_addr=None, tls=None,
               server_name=None) -> QueryOutcome:
    """One query over TCP, or over TLS on TCP (`tls`): its socket made, bound and announced like every other,
    the TLS session run on that socket by asyncio (so the kernel sees the prober's own flow). A set-up step
    that did not end (the deadline, an error) ends when the query gave up."""
    loop = asyncio.get_running_loop()
    sock = None
    writer = None
    flow = None
    stamps = [0, 0, 0, 0]  # connect start, connect end, TLS start, TLS end (0: not reached)
    start = time.monotonic_ns()
    what = "TLS" if tls is not None else "TCP"

    def outcome(resp, error, detail="") -> QueryOutcome:
        out = _outcome(server, qname, qtype, start, flow, Proto.TCP, resp, error, detail)
        now = time.monotonic_ns()
        if stamps[0]:
            out.connect = (stamps[0], stamps[1] or now)
        if stamps[2]:
            out.tls = (stamps[2], stamps[3] or now)
        return out

    try:
        async with asyncio.timeout(timeout):
            sock = await source.open(_family(server), socket.SOCK_STREAM, cb, local_addr)
            try:
                stamps[0] = time.monotonic_ns()
                stamps[1] = await connect(loop, sock, (server, port))
            finally:
                flow = source.flow(sock, (server, port), Proto.TCP)
            framed = struct.pack("!H", len(wire)) + wire
            if tls is None:
                await loop.sock_sendall(sock, framed)
                head = await _recv_exact(loop, sock, 2)
                data = await _recv_exact(loop, sock, struct.unpack("!H", head)[0])
            else:
                stamps[2] = time.monotonic_ns()
                reader, writer = await asyncio.open_connection(sock=sock, ssl=tls,
                                                               server_hostname=server_name or server)
                sock = None  # the transport's now
                stamps[3] = time.monotonic_ns()
                writer.write(framed)
                try:
                    head = await reader.readexactly(2)
                    data = await reader.readexactly(struct.unpack("!H", head)[0])
                except asyncio.IncompleteReadError:
                    raise ConnectionResetError("DNS server closed the TLS connection early") from None
        resp = dns.message.from_wire(data, ignore_trailing=True)
        if not msg.is_response(resp):
            return outcome(None, ErrorKind.PROTOCOL_ERROR, f"{what} answer does not match the question")
        return outcome(resp, None)
    except TimeoutError:
        stuck = " in the TLS handshake" if stamps[2] and not stamps[3] else ""
        return outcome(None, ErrorKind.DNS_TIMEOUT, f"timeout{stuck}")
    except dns.exception.DNSException as exc:
        return outcome(None, ErrorKind.PROTOCOL_ERROR, f"malformed answer: {exc}")
    except SourceError:
        raise
    except OSError as exc:  # ssl.SSLError is one, and so is a reset in the middle of the handshake
        if isinstance(exc, ssl.SSLError) or (stamps[2] and not stamps[3]):
            from prober.errors import describe

            return outcome(None, ErrorKind.TLS_ERROR, describe(exc))
        return outcome(None, *_sock_error(exc))
    finally:
        if writer is not None:
            writer.transport.abort()  # no close_notify exchange to wait for: the answer is in (or never comes)
        if sock is not None:
            sock.close()


async def _recv_exact(loop, sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise ConnectionResetError("DNS server closed the TCP connection early")
        buf += chunk
    return bytes(buf)


def _sock_error(exc: OSError) -> tuple[ErrorKind, str]:
    from prober.errors import errno_kind

    kind = errno_kind(exc.errno)
    if kind in (ErrorKind.CONNECT_REFUSED, ErrorKind.CONNECT_UNREACHABLE, ErrorKind.CONNECT_RESET) or kind is None:
        kind = ErrorKind.DNS_UNREACHABLE
    return kind, f"{type(exc).__name__}: {exc.strerror or exc}"


@dataclass(slots=True)
class Resolution:
    host: str
    addresses: list[str] = field(default_factory=list)
    transactions: list[DnsTransaction] = field(default_factory=list)
    error: ErrorKind | None = None
    detail: str = ""
    start_ns: int = 0
    end_ns: int = 0


def candidates(host: str, conf: ResolvConf) -> list[str]:
    """Names to try, in the order glibc's res_search tries them."""
    if host.endswith("."):
        return [host]
    as_is = host + "."
    searched = [f"{host}.{d}." for d in conf.search if d]
    if host.count(".") >= conf.ndots:
        return [as_is, *searched]
    return [*searched, as_is]


_STOP = {
    ErrorKind.DNS_TIMEOUT,
    ErrorKind.DNS_UNREACHABLE,
    ErrorKind.DNS_SERVFAIL,
    ErrorKind.DNS_REFUSED,
    ErrorKind.CONNECT_EPERM,
    ErrorKind.PROTOCOL_ERROR,
}


async def _ask(source, conf, name, qtype, deadline_ns, cb, res: Resolution) -> tuple[list[str], ErrorKind | None, str]:
    """Ask every server in turn (resolv.conf attempts), as glibc does; first real answer wins."""
    error: ErrorKind | None = ErrorKind.DNS_UNREACHABLE
    detail = "no nameserver in resolv.conf"
    for _ in range(max(1, conf.attempts)):
        for server in conf.nameservers:
            left = (deadline_ns - time.monotonic_ns()) / 1e9
            if left <= 0:
                return [], ErrorKind.DNS_TIMEOUT, "probe deadline reached during resolution"
            outs = await query(source, server, name, qtype, min(conf.timeout, left), cb, port=conf.port)
            res.transactions.extend(o.txn for o in outs)
            last = outs[-1]
            error, detail = last.error, last.detail
            if last.response is not None and last.error not in (ErrorKind.DNS_SERVFAIL, ErrorKind.DNS_REFUSED):
                rdtype = dns.rdatatype.from_text(qtype)
                addrs = [rd.to_text() for rrset in last.response.answer if rrset.rdtype == rdtype for rd in rrset]
                if last.error is None and not addrs:
                    return [], ErrorKind.DNS_NO_ANSWER, f"no {qtype} record"
                return addrs, last.error, detail
    return [], error, detail


async def resolve(
    source: Source,
    host: str,
    policy: str,
    deadline_ns: int,
    on_local_port: PortCallback,
    conf: ResolvConf | None = None,
) -> Resolution:
    """Addresses of `host` per the ip policy (`all`/`first` ask A and AAAA; AAAA addresses come first)."""
    res = Resolution(host, start_ns=time.monotonic_ns())
    if is_ip(host):
        res.addresses = [host]
        res.end_ns = res.start_ns
        return res
    conf = conf or load_resolv_conf(source.resolv_conf)
    qtypes = {"ipv4": ("A",), "ipv6": ("AAAA",)}.get(policy, ("AAAA", "A"))
    error, detail = ErrorKind.DNS_NXDOMAIN, "NXDOMAIN"
    seen_nodata = False
    for name in candidates(host, conf):
        if len(qtypes) == 1:  # no gather: its tasks would start one loop iteration later
            answers = [await _ask(source, conf, name, qtypes[0], deadline_ns, on_local_port, res)]
        else:
            answers = await asyncio.gather(
                *(_ask(source, conf, name, qt, deadline_ns, on_local_port, res) for qt in qtypes)
            )
        addrs = [a for got, _, _ in answers for a in got]
        if addrs:
            res.addresses = list(dict.fromkeys(addrs))
            res.end_ns = time.monotonic_ns()
            return res
        errs = [(e, d) for _, e, d in answers if e is not None]
        stop = [(e, d) for e, d in errs if e in _STOP]
        if stop:
            error, detail = stop[0]
            break
        # The name exists (NODATA) on any candidate: that beats NXDOMAIN on the others, as in glibc.
        nodata = [(e, d) for e, d in errs if e is not ErrorKind.DNS_NXDOMAIN]
        if nodata:
            error, detail = nodata[0]
            seen_nodata = True
        elif errs and not seen_nodata:
            error, detail = errs[0]
    res.error, res.detail = error, f"{host}: {detail}"
    res.end_ns = time.monotonic_ns()
    return res
