"""gRPC health probe: grpc.health.v1 `Health/Check` for a service ("" = the server), plain or TLS (grpc.aio).

Success is SERVING, as in blackbox_exporter. The result carries `grpc_status_code` (the RPC's status code) and
`grpc_serving_status` (the health enum: 0 UNKNOWN, 1 SERVING, 2 NOT_SERVING, 3 SERVICE_UNKNOWN) for the metrics.

Limits, said plainly: the connection is made by grpc's C core on its own threads, not from `Source.open()`. So
a gRPC probe runs from the host's namespace only (a netns source is refused at load), its local port is not
announced (no kernel evidence: the correlator says so), and its phases are resolve and check (blackbox's).
The channel dials the already-resolved address; the target's host name is the authority and the TLS name.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from prober.core import Attempt, ProbeEnv
from prober.sockets import connect_guard
from prober.types import ErrorKind, PhaseSpan

monotonic_ns = time.monotonic_ns

SERVING_STATUS = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")


def _kind_of(code, details: str, connected: bool) -> ErrorKind:
    import grpc

    text = details.lower()
    if code == grpc.StatusCode.UNAVAILABLE:
        if "ssl" in text or "handshake" in text or "certificate" in text or "tls" in text:
            return ErrorKind.TLS_ERROR
        if "refused" in text:
            return ErrorKind.CONNECT_REFUSED
        if "unreachable" in text:
            return ErrorKind.CONNECT_UNREACHABLE
        if "reset" in text or "closed" in text or "eof" in text:
            return ErrorKind.CONNECT_RESET
        return ErrorKind.CONNECT_UNREACHABLE
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ErrorKind.READ_TIMEOUT if connected else ErrorKind.CONNECT_TIMEOUT
    if code == grpc.StatusCode.NOT_FOUND:
        return ErrorKind.VALIDATION  # the health service does not know the service asked about
    return ErrorKind.PROTOCOL_ERROR


def _credentials(tls) -> object:
    import grpc

    roots = Path(tls.ca_file).read_bytes() if tls.ca_file else None
    return grpc.ssl_channel_credentials(root_certificates=roots)


async def probe_grpc(attempt: Attempt, env: ProbeEnv, deadline_ns: int):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    spec = attempt.spec.module.grpc
    addr = attempt.target.address
    if attempt.source.netns is not None:
        return attempt.result(ErrorKind.SOURCE_ERROR, "grpc probes run from the host namespace only")
    guard = connect_guard.get()
    try:
        if guard is not None:
            guard(addr)
    except OSError as exc:
        from prober.errors import classify

        return attempt.result(*classify(exc, "connect"))
    dial = f"ipv6:[{addr}]:{attempt.target.port}" if ":" in addr else f"ipv4:{addr}:{attempt.target.port}"
    host = attempt.target.host
    authority = f"[{host}]:{attempt.target.port}" if ":" in host else f"{host}:{attempt.target.port}"
    options = [("grpc.default_authority", authority), ("grpc.enable_retries", 0),
               ("grpc.dns_enable_srv_queries", 0), ("grpc.max_receive_message_length", 1 << 16)]
    if spec.tls:
        if spec.tls_config.insecure_skip_verify:
            return attempt.result(ErrorKind.INTERNAL, "insecure_skip_verify is not possible with grpc")
        name = spec.tls_config.server_name or host
        options.append(("grpc.ssl_target_name_override", name))
        try:
            creds = _credentials(spec.tls_config)
        except OSError as exc:
            return attempt.result(ErrorKind.TLS_ERROR, f"ca_file: {exc.strerror or exc}")
        channel = grpc.aio.secure_channel(dial, creds, options=options)
    else:
        channel = grpc.aio.insecure_channel(dial, options=options)
    attempt.values["grpc_ssl"] = 1 if spec.tls else 0
    start = monotonic_ns()
    connected = False
    try:
        left = max(0.001, (deadline_ns - monotonic_ns()) / 1e9)
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            call = stub.Check(health_pb2.HealthCheckRequest(service=spec.service), timeout=left,
                              wait_for_ready=False)
            reply = await call
            connected = True
        except grpc.aio.AioRpcError as exc:
            connected = channel.get_state() == grpc.ChannelConnectivity.READY
            attempt.values["grpc_status_code"] = exc.code().value[0]
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                attempt.values["grpc_serving_status"] = 3  # SERVICE_UNKNOWN
            attempt.timeline.marks.append(PhaseSpan("check", start, monotonic_ns()))
            return attempt.result(_kind_of(exc.code(), exc.details() or "", connected),
                                  f"{exc.code().name}: {' '.join((exc.details() or '').split())[:240]}")
        attempt.timeline.marks.append(PhaseSpan("check", start, monotonic_ns()))
        attempt.values["grpc_status_code"] = 0
        attempt.values["grpc_serving_status"] = reply.status
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            attempt.failed.append("serving_status")
            name = SERVING_STATUS[reply.status] if 0 <= reply.status < len(SERVING_STATUS) else str(reply.status)
            return attempt.result(ErrorKind.VALIDATION, f"service {spec.service!r} is {name}")
        return attempt.result()
    finally:
        await asyncio.shield(channel.close(grace=None))
