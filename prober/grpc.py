"""gRPC health probe: grpc.health.v1 `Health/Check` for a service ("" = the server), plain or TLS (grpc.aio).

Success is SERVING, as in blackbox_exporter. The result carries `grpc_status_code` (the RPC's status code) and
`grpc_serving_status` (the health enum: 0 UNKNOWN, 1 SERVING, 2 NOT_SERVING, 3 SERVICE_UNKNOWN) for the metrics.

grpc's C core makes its own connections on its own threads, so the prober does not let it reach the target:
the TCP connection is the prober's own (`Source.open()`: made in the probe's source namespace, bound and
announced before the SYN, so the kernel sensor watches it and the correlator judges it like a TCP probe), and
grpc is pointed at a private relay: an abstract Unix socket with a random name (in this process's namespace,
where grpc's threads are) whose first connection from this process (SO_PEERCRED) is spliced to that TCP
connection; the relay then stops listening. TLS runs end to end through it (the target's host name is the
authority and the TLS name). Phases: resolve, connect (ours), check (the RPC, TLS included).

grpcio does not show the TLS peer's certificates. With `tls: true`, once the health check has answered (as
blackbox reports them: only with an answer), the prober makes a second connection of its own (announced like
the first) to the same address and does a TLS handshake with the same server name, client certificate and ALPN
h2, reads what the server presents (`prober.tlsinfo.tls_facts`: version, certificates' expiry, leaf) and closes
without a request. That handshake does not verify again (grpc verified the RPC's connection moments before); it
costs one TCP and TLS handshake per probe, inside the probe's deadline; when it fails, the run has no
certificate values (the probe's outcome is the health check's) — except with `tls_config.min_cert_days`, checked on
the leaf that handshake read: an unknown expiry fails that validator, as http's does.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import ssl
import struct
import time
from pathlib import Path

from prober.attempt import Attempt
from prober.env import ProbeEnv
from prober.http import _ssl_context
from prober.sockets import connect
from prober.spec import TLSSpec
from prober.tlsinfo import expires_within, leaf_info, tls_facts
from prober.types import ErrorKind, PhaseSpan, Proto

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

    roots = Path(tls.ca_file).read_bytes() if tls.ca_file else tls.ca.encode() if tls.ca else None
    chain = Path(tls.cert_file).read_bytes() if tls.cert_file else tls.cert.encode() if tls.cert else None
    key = None
    if tls.key is not None:
        key = tls.key.get_secret_value().encode()
    elif tls.key_file:
        key = Path(tls.key_file).read_bytes()
    elif chain is not None:
        key = chain  # the key in the certificate's PEM
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        if writer.can_write_eof():
            try:
                writer.write_eof()
            except OSError:
                pass


def _peer_pid(writer: asyncio.StreamWriter) -> int:
    """The process at the other end of a Unix connection (SO_PEERCRED), 0 when unknown."""
    sock = writer.get_extra_info("socket")
    try:
        return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
    except (OSError, AttributeError):
        return 0


class _Relay:
    """An abstract Unix socket whose first connection is spliced to the prober's TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.name = f"connprobe-grpc-{os.getpid()}-{secrets.token_hex(16)}"
        self.upstream = (reader, writer)
        self.server: asyncio.AbstractServer | None = None
        self.tasks: list[asyncio.Task] = []
        self.local: asyncio.StreamWriter | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_unix_server(self._accept, path="\0" + self.name)
        return f"unix-abstract:{self.name}"

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.local is not None or _peer_pid(writer) != os.getpid():  # one connection only: our channel's
            writer.close()
            return
        self.local = writer
        self.server.close()  # nobody else gets in
        up_reader, up_writer = self.upstream
        self.tasks = [asyncio.ensure_future(_pipe(reader, up_writer)), asyncio.ensure_future(_pipe(up_reader, writer))]

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in self.tasks:
            t.cancel()
        for w in (self.local, self.upstream[1]):
            if w is not None:
                w.close()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


async def probe_grpc(attempt: Attempt, env: ProbeEnv, deadline_ns: int):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    spec = attempt.spec.module.grpc
    addr = attempt.target.address
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sockaddr = (addr, attempt.target.port, 0, 0) if family == socket.AF_INET6 else (addr, attempt.target.port)
    host = attempt.target.host
    authority = f"[{host}]:{attempt.target.port}" if ":" in host else f"{host}:{attempt.target.port}"
    options = [("grpc.default_authority", authority), ("grpc.enable_retries", 0),
               ("grpc.max_receive_message_length", 1 << 16)]
    creds = None
    if spec.tls:
        options.append(("grpc.ssl_target_name_override", spec.tls_config.server_name or host))
        try:
            creds = _credentials(spec.tls_config)
        except OSError as exc:
            return attempt.result(ErrorKind.TLS_ERROR, f"tls_config: {exc.filename}: {exc.strerror or exc}")
    attempt.values["grpc_ssl"] = 0  # 1 once the health check has answered over TLS (blackbox's probe_grpc_ssl)
    hop = attempt.timeline.hop()
    sock = None
    relay = None
    channel = None
    try:
        async with asyncio.timeout(max(0.0, (deadline_ns - monotonic_ns()) / 1e9)):
            sock = await attempt.connect_tcp(env, family, sockaddr, hop)
            reader, writer = await asyncio.open_connection(sock=sock)
            sock = None  # the transport's now
            relay = _Relay(reader, writer)
            dial = await relay.start()
        if creds is not None:
            channel = grpc.aio.secure_channel(dial, creds, options=options)
        else:
            channel = grpc.aio.insecure_channel(dial, options=options)
        async def certificates() -> None:
            leaf = await _peer_certificates(attempt, env, family, sockaddr, spec.tls_config,
                                            spec.tls_config.server_name or host, deadline_ns)
            days = spec.tls_config.min_cert_days  # as http's: the leaf's expiry; unknown (no handshake) fails
            if days is not None and expires_within(leaf, days):
                attempt.failed.append("min_cert_days")

        return await _check(attempt, channel, spec, deadline_ns, health_pb2, health_pb2_grpc,
                            certificates if spec.tls else None)
    except Exception as exc:
        from prober.errors import classify

        kind, detail = classify(exc, attempt.timeline.phase())
        # the RPC never started: what grpc would have said (blackbox's probe_grpc_status_code)
        attempt.values.setdefault("grpc_status_code", 4 if kind is ErrorKind.CONNECT_TIMEOUT else 14)
        return attempt.result(kind, detail)
    finally:
        hop.end = hop.end or monotonic_ns()
        if channel is not None:
            await asyncio.shield(channel.close(grace=None))
        if relay is not None:
            await asyncio.shield(relay.aclose())
        if sock is not None:
            sock.close()


async def _check(attempt: Attempt, channel, spec, deadline_ns: int, health_pb2, health_pb2_grpc, certificates=None):
    import grpc

    start = monotonic_ns()
    left = max(0.001, (deadline_ns - start) / 1e9)
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=spec.service), timeout=left,
                                 wait_for_ready=False)
    except grpc.aio.AioRpcError as exc:
        attempt.timeline.marks.append(PhaseSpan("check", start, monotonic_ns()))
        attempt.values["grpc_status_code"] = exc.code().value[0]
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            attempt.values["grpc_serving_status"] = 3  # SERVICE_UNKNOWN
        return attempt.result(_kind_of(exc.code(), exc.details() or "", True),
                              f"{exc.code().name}: {' '.join((exc.details() or '').split())[:240]}")
    attempt.timeline.marks.append(PhaseSpan("check", start, monotonic_ns()))
    attempt.values["grpc_status_code"] = 0
    attempt.values["grpc_serving_status"] = reply.status
    if certificates is not None:
        attempt.values["grpc_ssl"] = 1
        await certificates()
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        attempt.failed.append("serving_status")
        name = SERVING_STATUS[reply.status] if 0 <= reply.status < len(SERVING_STATUS) else str(reply.status)
        return attempt.result(ErrorKind.VALIDATION, f"service {spec.service!r} is {name}")
    return attempt.result()


_cert_contexts: dict[TLSSpec, ssl.SSLContext] = {}


def _cert_context(tls: TLSSpec) -> ssl.SSLContext:
    """The module's TLS settings (`prober.http`'s one home for them: CA, client certificate, ...) offering h2 by
    ALPN, as grpc does, without verification: the handshake only reads what the server presents."""
    ctx = _cert_contexts.get(tls)
    if ctx is None:
        ctx = _ssl_context(tls)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        _cert_contexts[tls] = ctx
    return ctx


async def _peer_certificates(attempt: Attempt, env: ProbeEnv, family: int, sockaddr: tuple, tls: TLSSpec,
                             server_name: str, deadline_ns: int) -> dict | None:
    """A second connection of the prober's own to the same address: a TLS handshake (same server name, client
    certificate, ALPN h2), its facts recorded, closed without a request; the leaf certificate it read returned.
    Bounded by the probe's deadline; a failure leaves the run without certificate values (None)."""
    left = (deadline_ns - monotonic_ns()) / 1e9
    if left <= 0:
        return None
    leaf = None
    loop = asyncio.get_running_loop()
    sock = None
    writer = None
    try:
        async with asyncio.timeout(left):
            sock = await attempt.source.open(family, socket.SOCK_STREAM, env.on_local_port)
            try:
                await connect(loop, sock, sockaddr)
            finally:  # announced before its SYN and recorded: the kernel's events on it belong to this probe
                attempt.flows.append(attempt.source.flow(sock, sockaddr, Proto.TCP))
            _, writer = await asyncio.open_connection(sock=sock, ssl=_cert_context(tls), server_hostname=server_name)
            sock = None  # the transport's now
            attempt.tls(tls_facts(writer.get_extra_info("ssl_object")))
            leaf = leaf_info(writer.get_extra_info("ssl_object"))
            # not verified here, so no "verified chain" expiry (nor does blackbox's grpc prober have one)
            attempt.values.pop("ssl_last_chain_expiry", None)
    except (OSError, TimeoutError, ValueError):  # ssl.SSLError is an OSError
        pass
    finally:
        if writer is not None:
            writer.transport.abort()
        if sock is not None:
            sock.close()
    return leaf
