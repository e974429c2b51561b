"""TCP probe: connect from a bound, announced socket; optionally TLS, then send/expect a regex, or blackbox's
`query_response` conversation (expect/send/starttls steps, `prober.query`)."""

from __future__ import annotations

import asyncio
import re
import socket
import time

from prober.attempt import Attempt
from prober.env import ProbeEnv
from prober.http import ssl_context
from prober.query import converse
from prober.sockets import family_mismatch
from prober.tlsinfo import expires_within, leaf_info, tls_facts
from prober.types import ErrorKind

monotonic_ns = time.monotonic_ns


async def probe_tcp(attempt: Attempt, env: ProbeEnv, deadline_ns: int):
    spec = attempt.spec.module.tcp
    addr = attempt.target.address
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sockaddr = (addr, attempt.target.port, 0, 0) if family == socket.AF_INET6 else (addr, attempt.target.port)
    hop = attempt.timeline.hop()
    sock = None
    writer = None
    try:
        async with asyncio.timeout(max(0.0, (deadline_ns - monotonic_ns()) / 1e9)):
            local = spec.source_ip_address
            if (err := family_mismatch(local, addr)) is not None:
                return attempt.result(ErrorKind.CONNECT_UNREACHABLE, err)
            sock = await attempt.connect_tcp(env, family, sockaddr, hop, local)
            if not (spec.tls or spec.send or spec.expect or spec.query_response):
                hop.end = hop.connect_end
                return attempt.result()
            kwargs = {}
            if spec.tls:
                kwargs = {
                    "ssl": ssl_context(spec.tls_config),
                    "server_hostname": spec.tls_config.server_name or attempt.target.host,
                }
                hop.tls_start = monotonic_ns()
            reader, writer = await asyncio.open_connection(sock=sock, **kwargs)
            sock = None  # owned by the transport now
            if spec.tls:
                hop.tls_end = monotonic_ns()
                attempt.tls(tls_facts(writer.get_extra_info("ssl_object")))
                _min_cert_days(attempt, spec, writer.get_extra_info("ssl_object"))
            if spec.query_response:
                def first(ns: int) -> None:
                    hop.first_byte = hop.first_byte or ns

                hop.sent = monotonic_ns()
                failed = await converse(reader, writer, spec.query_response, ssl_context(spec.tls_config),
                                        spec.tls_config.server_name or attempt.target.host, first)
                if failed:
                    attempt.failed.append(failed)
                if any(step.starttls for step in spec.query_response):
                    attempt.tls(tls_facts(writer.get_extra_info("ssl_object")))
                    if not spec.tls and writer.get_extra_info("ssl_object") is not None:  # STARTTLS happened
                        _min_cert_days(attempt, spec, writer.get_extra_info("ssl_object"))
                hop.end = monotonic_ns()
                return attempt.result()
            if spec.send:
                writer.write(spec.send.encode().decode("unicode_escape").encode("latin-1"))
                await writer.drain()
            hop.sent = monotonic_ns()
            if spec.expect:
                pattern = re.compile(spec.expect.encode())
                arrivals = attempt.track_arrivals(deadline_ns)
                buf = b""
                while not pattern.search(buf):
                    chunk = await reader.read(4096)
                    if not hop.first_byte:
                        hop.first_byte = monotonic_ns()
                    if not chunk:
                        attempt.failed.append("expect")
                        break
                    arrivals.add(len(chunk))
                    buf += chunk
                    if len(buf) > 65536:
                        attempt.failed.append("expect")
                        break
            hop.end = monotonic_ns()
            return attempt.result()
    except Exception as exc:
        return attempt.result_of(exc)  # (it resets the connection: the kernel shows it closed at once)
    finally:
        if writer is not None:
            writer.close()
        if sock is not None:
            sock.close()


def _min_cert_days(attempt: Attempt, spec, sslobj) -> None:
    """`tls_config.min_cert_days` on the handshake just made (as http's: the verified leaf's expiry)."""
    days = spec.tls_config.min_cert_days
    if days is not None and expires_within(leaf_info(sslobj), days):
        attempt.failed.append("min_cert_days")
