"""The default HTTP client: aiohttp's C HTTP/1.1 response parser over a connection the prober owns.

Why not `aiohttp.ClientSession`: a probe is one request on a fresh connection, and the session's
generality (pooling, cookies, proxies, trace signals, per-request timers) cost ~45% of a probe's CPU
(benchmarks/prober_vs_blackbox.py: ~2,000 vs ~3,700 probes per CPU-second on the same machine). This
path keeps aiohttp's parser, payload StreamReader (chunked, gzip/deflate, flow control) and exception
classes, and does the rest itself: write the request, stamp each phase. One call is one hop; redirects
(and which headers a hop carries) are decided by `prober/http.py` for every client alike. The full
session stays available as `client: aiohttp-session`, httpx as `client: httpx`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import socket
import time

from aiohttp.base_protocol import BaseProtocol
from aiohttp.client_exceptions import ClientPayloadError, ServerDisconnectedError
from aiohttp.http_parser import HttpResponseParser
from yarl import URL

monotonic_ns = time.monotonic_ns

USER_AGENT = "connprobe/0.1"


class _Conn(BaseProtocol):
    """One connection's protocol. The parser is BaseProtocol's `_parser`: the payload's flow control
    (pause_reading when more than 128 KiB wait, or a compressed chunk still has output) goes through it."""

    __slots__ = ("hop", "payload", "response")

    def __init__(self, loop: asyncio.AbstractEventLoop, hop, head: bool):
        super().__init__(loop)
        self.hop = hop
        self._parser = HttpResponseParser(
            self,
            loop,
            2**16,
            payload_exception=ClientPayloadError,
            response_with_body=not head,
            read_until_eof=True,
            auto_decompress=True,
        )
        self.response: asyncio.Future = loop.create_future()
        self.payload = None

    def connection_made(self, transport) -> None:
        self.transport = transport  # TCP_NODELAY is set already (Source.open)

    def data_received(self, data: bytes) -> None:
        if not self.hop.first_byte:
            self.hop.first_byte = monotonic_ns()
        try:
            messages, _, _ = self._parser.feed_data(data)
        except Exception as exc:
            if self.transport is not None:
                self.transport.close()
            self._fail(exc)
            return
        for msg, payload in messages:
            if 100 <= msg.code < 200:  # interim answers (100 Continue, 103 Early Hints)
                continue
            if not self.response.done():
                self.payload = payload
                self.response.set_result(msg)

    def _reject(self, exc: BaseException) -> None:
        """Fail the response future. Nobody awaits it when the probe already gave up (timeout, failed write):
        mark the exception as seen so asyncio does not log 'Future exception was never retrieved'."""
        self.response.set_exception(exc)
        self.response.exception()

    def _fail(self, exc: BaseException) -> None:
        if not self.response.done():
            self._reject(exc)
        elif self.payload is not None and not self.payload.is_eof():
            self.payload.set_exception(exc)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        try:
            self._parser.feed_eof()  # completes a read-until-close body
        except Exception as underlying:
            self._fail(ClientPayloadError(f"response payload is not completed: {underlying!r}"))
        if not self.response.done():
            self._reject(ServerDisconnectedError())
        elif self.payload is not None and not self.payload.is_eof():
            self.payload.set_exception(ClientPayloadError("response payload is not completed"))


def request_bytes(method: str, url: URL, headers: dict[str, str], body: bytes | None) -> bytes:
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    if not url.is_default_port():
        host = f"{host}:{url.port}"
    fields = {
        "host": ("Host", host),
        "user-agent": ("User-Agent", USER_AGENT),
        "accept": ("Accept", "*/*"),
        "accept-encoding": ("Accept-Encoding", "gzip, deflate"),
    }
    if url.raw_user is not None:
        cred = f"{url.user or ''}:{url.password or ''}".encode()
        fields["authorization"] = ("Authorization", "Basic " + base64.b64encode(cred).decode())
    for name, value in headers.items():
        fields[name.lower()] = (name, value)
    fields["connection"] = ("Connection", "close")
    if body is not None:
        fields["content-length"] = ("Content-Length", str(len(body)))
    head = f"{method} {url.raw_path_qs or '/'} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields.values())
    data = (head + "\r\n").encode("latin-1")
    return data + body if body else data


class Response:
    """One hop's answer: status line and headers parsed, the body still on the wire."""

    __slots__ = ("conn", "headers", "status", "transport")

    def __init__(self, msg, conn: _Conn, transport) -> None:
        self.status = msg.code
        self.headers = msg.headers
        self.conn = conn
        self.transport = transport

    async def chunks(self):
        """The decoded body in pieces of at most ~128 KiB (the payload's flow control bounds them)."""
        payload = self.conn.payload
        while True:
            chunk = await payload.readany()
            if not chunk:
                return
            yield chunk

    async def aclose(self) -> None:
        self.transport.close()


async def send(
    attempt,
    spec,
    method: str,
    url: URL,
    headers: dict[str, str],
    body: bytes | None,
    request: bytes | None,
    *,
    lookup,
    open_connected,
    ssl_context,
) -> Response:
    """One request on a fresh connection; `request` is its bytes when prebuilt (the first hop)."""
    loop = asyncio.get_running_loop()
    host = url.raw_host or ""
    addr = await lookup(attempt, host)
    v6 = ":" in addr
    sockaddr = (addr, url.port, 0, 0) if v6 else (addr, url.port)
    sock, hop = await open_connected(attempt, socket.AF_INET6 if v6 else socket.AF_INET, sockaddr, attempt.timeline)
    factory = functools.partial(_Conn, loop, hop, method == "HEAD")
    try:
        if url.scheme == "https":
            hop.tls_start = monotonic_ns()
            transport, conn = await loop.create_connection(
                factory,
                sock=sock,
                ssl=ssl_context(spec.tls),
                server_hostname=spec.tls.server_name or host.rstrip("."),
            )
            hop.tls_end = monotonic_ns()
            hop.peercert = transport.get_extra_info("peercert")
        else:
            transport, conn = await loop.create_connection(factory, sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        if request is None:
            request = request_bytes(method, url, headers, body)
        # Stamped just before the write: it hands the bytes to the kernel, which sends them within
        # the syscall; a stamp after it would be late by however long the process is preempted.
        hop.sent = monotonic_ns()
        transport.write(request)
        msg = await conn.response
    except BaseException:
        transport.close()
        raise
    return Response(msg, conn, transport)


__all__ = ["Response", "request_bytes", "send"]
