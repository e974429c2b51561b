"""ICMP echo probe: one echo request from a raw socket in the source's namespace, one reply awaited.

Raw sockets (SOCK_RAW), not ping sockets (SOCK_DGRAM IPPROTO_ICMP): a ping socket needs the process's group in
net.ipv4.ping_group_range, which is "1 0" (nobody) unless the host is configured for it; the agent runs as root
and keeps CAP_NET_RAW when a probe is an ICMP one (connprobe/privileges.py). A raw socket also receives the ICMP
errors about our request (destination unreachable, time exceeded, the admin-prohibited of a firewall's reject):
they say why no reply came, and are the probe's own packet evidence. Kernel evidence: the echo's identifier stands
for a port — it is announced as icmp/ID before the request leaves, and the kernel sensor (bpf/sensor.c) keys an
echo request or reply on it, so a drop of our echo anywhere on the node (a firewall, loss) is seen with its reason.
The flow's local address is the one the kernel would pick for the target (a connected UDP socket tells it).

The echo identifier and sequence are random per attempt; a reply matches on both and on the peer's address (an
error on the identifier and sequence quoted in it). Phases as blackbox_exporter: resolve, setup (the socket),
rtt (request sent to reply seen, stamped in the loop's I/O callback).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import time

from prober.attempt import Attempt
from prober.env import ProbeEnv
from prober.errors import describe
from prober.sockets import _forget_stale, connect_guard, no_callback
from prober.types import ErrorKind, Flow, PhaseSpan, Proto

monotonic_ns = time.monotonic_ns

ECHO_REQUEST = {socket.AF_INET: 8, socket.AF_INET6: 128}
ECHO_REPLY = {socket.AF_INET: 0, socket.AF_INET6: 129}
UNREACHABLE = {socket.AF_INET: 3, socket.AF_INET6: 1}
TIME_EXCEEDED = {socket.AF_INET: 11, socket.AF_INET6: 3}
PACKET_TOO_BIG_V6 = 2
# destination-unreachable codes that mean "a firewall said no" (RFC 1812 / RFC 4443)
ADMIN_PROHIBITED = {socket.AF_INET: {9, 10, 13}, socket.AF_INET6: {1}}
UNREACH_WORDS = {
    socket.AF_INET: {0: "network unreachable", 1: "host unreachable", 2: "protocol unreachable",
                     3: "port unreachable", 4: "fragmentation needed", 9: "network administratively prohibited",
                     10: "host administratively prohibited", 13: "communication administratively prohibited"},
    socket.AF_INET6: {0: "no route to destination", 1: "communication administratively prohibited",
                      3: "address unreachable", 4: "port unreachable", 5: "source address failed policy",
                      6: "reject route"},
}

# setsockopt numbers Python does not always export (Linux values)
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DONT, IP_PMTUDISC_DO = 0, 2
IPV6_DONTFRAG = getattr(socket, "IPV6_DONTFRAG", 62)
IPV6_RECVHOPLIMIT = getattr(socket, "IPV6_RECVHOPLIMIT", 51)
IPV6_HOPLIMIT = getattr(socket, "IPV6_HOPLIMIT", 52)


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(family: int, ident: int, seq: int, payload: bytes) -> bytes:
    """An echo request; ICMPv6's checksum is the kernel's to fill (it covers a pseudo-header)."""
    head = struct.pack("!BBHHH", ECHO_REQUEST[family], 0, 0, ident, seq)
    if family == socket.AF_INET6:
        return head + payload
    return struct.pack("!BBHHH", ECHO_REQUEST[family], 0, checksum(head + payload), ident, seq) + payload


class Answer:
    """What came back for our echo: a reply (with its hop limit) or an ICMP error (type, code, from whom)."""

    __slots__ = ("code", "hop_limit", "peer", "seen_ns", "type")

    def __init__(self, type_: int, code: int, peer: str, hop_limit: int | None, seen_ns: int):
        self.type, self.code, self.peer, self.hop_limit, self.seen_ns = type_, code, peer, hop_limit, seen_ns


def match(family: int, data: bytes, peer: str, target: str, ident: int, seq: int) -> tuple[int, int, int | None] | None:
    """(type, code, ipv4 ttl) when `data` (as a raw socket reads it) is about our echo, else None."""
    ttl = None
    if family == socket.AF_INET:
        if len(data) < 20:
            return None
        ihl = (data[0] & 0x0F) * 4
        ttl = data[8]
        data = data[ihl:]
    if len(data) < 8:
        return None
    typ, code = data[0], data[1]
    if typ == ECHO_REPLY[family]:
        rid, rseq = struct.unpack_from("!HH", data, 4)
        return (typ, code, ttl) if (rid, rseq) == (ident, seq) and peer == target else None
    if typ in (UNREACHABLE[family], TIME_EXCEEDED[family]) or (family == socket.AF_INET6 and typ == PACKET_TOO_BIG_V6):
        inner = data[8:]
        if family == socket.AF_INET:
            if len(inner) < 28:
                return None
            ihl = (inner[0] & 0x0F) * 4
            dst = socket.inet_ntop(socket.AF_INET, inner[16:20])
            echo = inner[ihl:ihl + 8]
        else:
            if len(inner) < 48:
                return None
            dst = socket.inet_ntop(socket.AF_INET6, inner[24:40])
            echo = inner[40:48]
        if len(echo) < 8 or echo[0] != ECHO_REQUEST[family]:
            return None
        rid, rseq = struct.unpack_from("!HH", echo, 4)
        if (rid, rseq) == (ident, seq) and _same(family, dst, target):
            return typ, code, ttl
    return None


def _same(family: int, a: str, b: str) -> bool:
    return socket.inet_pton(family, a) == socket.inet_pton(family, b.split("%", 1)[0])


def _readable(sock: socket.socket, family: int, target: str, ident: int, seq: int, waiter: asyncio.Future) -> None:
    seen = monotonic_ns()
    while not waiter.done():
        try:
            data, anc, _flags, addr = sock.recvmsg(65535, socket.CMSG_SPACE(4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            waiter.set_exception(exc)
            return
        got = match(family, data, addr[0], target, ident, seq)
        if got is None:
            continue
        typ, code, ttl = got
        if family == socket.AF_INET6:
            for level, kind, value in anc:
                if level == socket.IPPROTO_IPV6 and kind == IPV6_HOPLIMIT and len(value) >= 4:
                    ttl = struct.unpack("i", value[:4])[0]
        waiter.set_result(Answer(typ, code, addr[0], ttl, seen))


def _configure(sock: socket.socket, family: int, ttl: int, dont_fragment: bool) -> None:
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO if dont_fragment else IP_PMTUDISC_DONT)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_DONTFRAG, 1 if dont_fragment else 0)


def _send_error(exc: OSError, size: int) -> tuple[ErrorKind, str]:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return ErrorKind.CONNECT_EPERM, f"sending the echo request: {describe(exc)}"
    if exc.errno == errno.EMSGSIZE:
        return (ErrorKind.CONNECT_UNREACHABLE,
                f"echo request of {size} bytes does not fit the path MTU and must not be fragmented "
                f"(dont_fragment): {describe(exc)}")
    return ErrorKind.CONNECT_UNREACHABLE, f"sending the echo request: {describe(exc)}"


async def probe_icmp(attempt: Attempt, env: ProbeEnv, deadline_ns: int):
    spec = attempt.spec.module.icmp
    addr = attempt.target.address
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    loop = asyncio.get_running_loop()
    sock = None
    fd = -1
    setup_start = monotonic_ns()
    sent = 0
    payload = bytes(i % 256 for i in range(spec.payload_size))
    ident, seq = struct.unpack("!HH", os.urandom(4))
    ident = ident or 1  # 0 is no port: the watch list would refuse it
    packet = echo_request(family, ident, seq, payload)
    try:
        guard = connect_guard.get()
        if guard is not None:
            guard(addr)
        if spec.source_ip_address and (":" in spec.source_ip_address) != (family == socket.AF_INET6):
            return attempt.result(ErrorKind.CONNECT_UNREACHABLE,
                                  f"source_ip_address {spec.source_ip_address} is not of {addr}'s family")
        async with asyncio.timeout(max(0.0, (deadline_ns - monotonic_ns()) / 1e9)):
            proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
            try:
                sock = await attempt.source.open_unannounced(family, socket.SOCK_RAW, proto)
            except PermissionError as exc:  # not a firewall: this process may not open raw sockets
                return attempt.result(ErrorKind.INTERNAL, f"raw ICMP socket: {describe(exc)} (needs CAP_NET_RAW)")
            if spec.source_ip_address:
                sock.bind((spec.source_ip_address, 0))
            _configure(sock, family, spec.ttl, spec.dont_fragment)
            sockaddr = (addr, 0, 0, 0) if family == socket.AF_INET6 else (addr, 0)
            waiter = loop.create_future()
            fd = sock.fileno()
            _forget_stale(loop, fd)
            loop.add_reader(fd, _readable, sock, family, addr, ident, seq, waiter)
            local = spec.source_ip_address or await _local_address(attempt, family, sockaddr)
            env.on_local_port(Proto.ICMP, ident)
            attempt.flows.append(Flow(Proto.ICMP, local, ident, addr, ident, attempt.source.inode))
            attempt.timeline.marks.append(PhaseSpan("setup", setup_start, monotonic_ns()))
            sent = monotonic_ns()
            try:
                sock.sendto(packet, sockaddr)
            except OSError as exc:
                attempt.timeline.marks.append(PhaseSpan("rtt", sent, monotonic_ns()))
                return attempt.result(*_send_error(exc, len(packet)))
            answer: Answer = await waiter
        attempt.timeline.marks.append(PhaseSpan("rtt", sent, answer.seen_ns))
        if answer.hop_limit is not None:
            attempt.values["icmp_reply_hop_limit"] = answer.hop_limit
        if answer.type == ECHO_REPLY[family]:
            return attempt.result()
        return attempt.result(*_error_answer(family, answer, spec.ttl))
    except TimeoutError:
        if sent:
            attempt.timeline.marks.append(PhaseSpan("rtt", sent, monotonic_ns()))
            return attempt.result(ErrorKind.CONNECT_TIMEOUT,
                                  f"no echo reply from {addr} within {attempt.spec.effective_timeout:g}s")
        return attempt.result(ErrorKind.CONNECT_TIMEOUT, "the ICMP socket was not ready by the deadline")
    except OSError as exc:
        from prober.errors import classify

        return attempt.result(*classify(exc, "connect"))
    finally:
        if fd >= 0:
            loop.remove_reader(fd)
        if sock is not None:
            sock.close()


async def _local_address(attempt: Attempt, family: int, sockaddr: tuple) -> str:
    """The source address the kernel picks for `sockaddr` in the probe's namespace (a UDP connect sends nothing)."""
    probe = await attempt.source.open(family, socket.SOCK_DGRAM, no_callback)
    try:
        probe.connect((sockaddr[0], 9, *sockaddr[2:]))
        return probe.getsockname()[0]
    except OSError:
        return ""
    finally:
        probe.close()


def _error_answer(family: int, answer: Answer, ttl: int) -> tuple[ErrorKind, str]:
    if answer.type == TIME_EXCEEDED[family]:
        return ErrorKind.CONNECT_UNREACHABLE, f"time exceeded (ttl {ttl}) at {answer.peer}"
    if family == socket.AF_INET6 and answer.type == PACKET_TOO_BIG_V6:
        return ErrorKind.CONNECT_UNREACHABLE, f"packet too big at {answer.peer}"
    words = UNREACH_WORDS[family].get(answer.code, f"code {answer.code}")
    if answer.code in ADMIN_PROHIBITED[family]:
        return ErrorKind.CONNECT_REFUSED, f"destination unreachable ({words}) from {answer.peer}"
    return ErrorKind.CONNECT_UNREACHABLE, f"destination unreachable ({words}) from {answer.peer}"
