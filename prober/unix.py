"""Unix-socket probe: connect to a stream socket's path, then blackbox's `query_response` (expect, send, starttls).

The socket is made in the probe's source namespace like every other (a Unix path is a file: the namespace does
not change which socket it names, but the source's rules stay one). No kernel evidence: the sensor watches IP
ports, a Unix socket has none.
"""

from __future__ import annotations

import asyncio
import socket
import time

from prober.attempt import Attempt
from prober.env import ProbeEnv
from prober.http import ssl_context
from prober.query import converse

monotonic_ns = time.monotonic_ns


async def probe_unix(attempt: Attempt, env: ProbeEnv, deadline_ns: int):
    spec = attempt.spec.module.unix
    path = attempt.target.raw
    loop = asyncio.get_running_loop()
    hop = attempt.timeline.hop()
    sock = None
    writer = None
    try:
        async with asyncio.timeout(max(0.0, (deadline_ns - monotonic_ns()) / 1e9)):
            sock = await attempt.source.open_unannounced(socket.AF_UNIX, socket.SOCK_STREAM, 0)
            hop.connect_start = monotonic_ns()
            await loop.sock_connect(sock, path)
            hop.connect_end = monotonic_ns()
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            sock = None  # the transport's now
            if spec.query_response:
                hop.sent = monotonic_ns()

                def first(ns: int) -> None:
                    hop.first_byte = hop.first_byte or ns

                failed = await converse(reader, writer, spec.query_response, ssl_context(spec.tls_config),
                                        spec.tls_config.server_name or "localhost", first)
                if failed:
                    attempt.failed.append(failed)
            hop.end = monotonic_ns()
            return attempt.result()
    except Exception as exc:
        return attempt.result_of(exc, path)
    finally:
        if writer is not None:
            writer.close()
        if sock is not None:
            sock.close()
