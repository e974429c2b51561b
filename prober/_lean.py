"""The default HTTP client: aiohttp's C HTTP/1.1 response parser over a connection the prober owns.

Why not `aiohttp.ClientSession`: a probe is one request on a fresh connection, and the session's
generality (pooling, cookies, proxies, trace signals, per-request timers) cost ~45% of a probe's CPU
(benchmarks/prober_vs_blackbox.py: ~2,000 vs ~3,700 probes per CPU-second on the same machine). This
path keeps aiohttp's parser, payload StreamReader (chunked, gzip/deflate, limits) and exception classes,
and does the rest itself: write the request, stamp each phase, follow redirects (a new connection per
hop, names resolved by the prober's own DNS). The full session stays available as
`client: aiohttp-session`, httpx as `client: httpx`.
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

REDIRECTS = {301, 302, 303, 307, 308}
USER_AGENT = "connprobe/0.1"


class _Conn(BaseProtocol):
    __slots__ = ("hop", "parser", "payload", "response")

    def __init__(self, loop: asyncio.AbstractEventLoop, hop, head: bool):
        super().__init__(loop)
        self.hop = hop
        self.parser = HttpResponseParser(
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
            messages, _, _ = self.parser.feed_data(data)
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
            self.parser.feed_eof()  # completes a read-until-close body
        except Exception as underlying:
            self._fail(ClientPayloadError(f"response payload is not completed: {underlying!r}"))
        if not self.response.done():
            self._reject(ServerDisconnectedError())
        elif self.payload is not None and not self.payload.is_eof():
            self.payload.set_exception(ClientPayloadError("response payload is not completed"))


def _request_bytes(method: str, url: URL, headers: dict[str, str], body: bytes | None) -> bytes:
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


async def exchange(attempt, spec, env, facts: dict, *, lookup, open_connected, ssl_context, read_body, failure):
    """One probe: request (and redirects) on fresh connections; fills `facts` like the other clients."""
    loop = asyncio.get_running_loop()
    prep = attempt.prep
    if prep is not None:
        if prep.url is None:
            prep.url = URL(attempt.target.raw)
        url = prep.url
    else:
        url = URL(attempt.target.raw)
    headers = prep.headers if prep is not None else {k: v.get_secret_value() for k, v in spec.headers.items()}
    method = spec.method
    body = spec.body.encode() if spec.body is not None else None
    redirects = 0
    while True:
        if url.scheme not in ("http", "https"):
            raise failure("protocol_error", f"redirect to a non-HTTP URL: {url.scheme}:")
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
            if redirects == 0 and prep is not None:  # the same bytes every run: built once per spec
                request = prep.request
                if request is None:
                    request = prep.request = _request_bytes(method, url, headers, body)
            else:
                request = _request_bytes(method, url, headers, body)
            # Stamped just before the write: it hands the bytes to the kernel, which sends them within
            # the syscall; a stamp after it would be late by however long the process is preempted.
            hop.sent = monotonic_ns()
            transport.write(request)
            msg = await conn.response
            status = msg.code
            location = msg.headers.get("Location")
            if spec.follow_redirects and status in REDIRECTS and location:
                if redirects >= spec.max_redirects:
                    attempt.http_status = status
                    raise failure("max_redirects", f"more than {spec.max_redirects} redirects")
                redirects += 1
                hop.end = monotonic_ns()
                url = url.join(URL(location))
                if status == 303 or (status in (301, 302) and method == "POST"):
                    method, body = ("GET" if method != "HEAD" else "HEAD"), None
                continue
            facts["status"] = status
            attempt.http_status = status
            facts["headers"] = msg.headers
            facts["redirects"] = redirects
            facts["ssl"] = url.scheme == "https"
            facts["body"] = await read_body(conn.payload, spec, facts, attempt)
            return
        finally:
            transport.close()


__all__ = ["exchange"]
