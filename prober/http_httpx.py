"""The `httpx` client of the HTTP probe (`client: httpx`), in a module of its own: imported on the first probe
that uses it, so an agent whose probes use the default client never loads httpx, httpcore and anyio (~5 MiB
of RSS).

An httpcore network backend whose stream stamps connect, start_tls, the last write before the first read
(request sent) and the first byte (in the transport's protocol for plain HTTP); the body is decoded here,
layer by layer (`_HttpxResponse`). `prober/http.py` does the rest, as for the other clients.
"""

from __future__ import annotations

import asyncio
import socket
import time
import zlib
from typing import Any, NamedTuple

import httpcore
import httpx
from anyio._backends._asyncio import SocketStream as _AnyioSocketStream
from anyio._backends._asyncio import StreamProtocol as _AnyioStreamProtocol
from httpcore._backends.anyio import AnyIOStream

from prober.attempt import Attempt, Timeline
from prober.env import ProbeEnv
from prober.proxy import proxy_for
from prober.spec import HTTPSpec, TLSSpec
from prober.tlsinfo import tls_facts
from prober.types import ErrorKind

monotonic_ns = time.monotonic_ns


class Hooks(NamedTuple):
    """What this client takes from prober/http.py (passed in: prober.http imports this module, not the reverse)."""

    current: Any  # the ContextVar holding the running attempt
    lookup: Any  # async (attempt, host) -> address
    open_connected: Any  # async (attempt, family, sockaddr, timeline) -> (socket, hop)
    ssl_context: Any  # (TLSSpec) -> ssl.SSLContext
    h2_context: Any  # (TLSSpec) -> ssl.SSLContext offering h2 by ALPN
    failure: type[OSError]  # raised with (kind, detail) when the kind is decided here


class _Stream(httpcore.AsyncNetworkStream):
    """httpcore stream over our own socket; stamps request-sent, first byte and TLS."""

    def __init__(self, inner: httpcore.AsyncNetworkStream, hop, attempt: Attempt, transport=None):
        self._inner = inner
        self._hop = hop
        self._attempt = attempt
        self._transport = transport  # the plain connection's (aborted when its TLS handshake does not finish)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            data = await self._inner.read(max_bytes, timeout)
        except BaseException:
            # httpcore closes the stream on its way out, before the probe hears of it: reset from here
            self._attempt.timeline.reset_on_close()
            raise
        if not self._hop.first_byte:
            self._hop.first_byte = monotonic_ns()
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # Stamped before: the bytes reach the kernel at once, but anyio's write then waits for the
        # transport's drain event, which a busy loop can deliver milliseconds later. httpcore also
        # writes b"" at the end of a message: that is not when the request left.
        if buffer and not self._hop.first_byte:
            self._hop.sent = monotonic_ns()
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        if not self._hop.end:
            self._hop.end = monotonic_ns()
        await self._inner.aclose()

    async def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        self._hop.tls_start = monotonic_ns()
        try:
            inner = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        except BaseException:
            # httpcore does not close a stream whose handshake failed or was cancelled (the probe's deadline):
            # its socket would be left open.
            if self._transport is not None:
                self._transport.abort()
            raise
        self._hop.tls_end = monotonic_ns()
        sslobj = inner.get_extra_info("ssl_object")
        self._hop.peercert = sslobj.getpeercert() if sslobj is not None else None
        self._hop.tls = tls_facts(sslobj)
        return _Stream(inner, self._hop, self._attempt)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _StampProtocol(_AnyioStreamProtocol):
    hop = None

    def data_received(self, data: bytes) -> None:
        hop = self.hop
        # plain HTTP only: with TLS the first bytes after the request may be a session ticket
        if hop is not None and hop.sent and not hop.first_byte and not hop.tls_start:
            hop.first_byte = monotonic_ns()
        super().data_received(data)


class _Backend(httpcore.AsyncNetworkBackend):
    def __init__(self, hooks: Hooks) -> None:
        self._anyio = httpcore.AnyIOBackend()
        self._hooks = hooks

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        hooks = self._hooks
        attempt: Attempt = hooks.current.get()
        addr = await hooks.lookup(attempt, host)
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sockaddr = (addr, port, 0, 0) if family == socket.AF_INET6 else (addr, port)
        try:
            timeline: Timeline = attempt.timeline
            sock, hop = await hooks.open_connected(attempt, family, sockaddr, timeline)
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        # The transport is made here (not by anyio.from_socket) so its protocol can stamp the first
        # byte when it arrives, not when httpcore's read returns a few loop iterations later.
        loop = asyncio.get_running_loop()
        try:
            transport, proto = await loop.create_connection(_StampProtocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        proto.hop = hop
        return _Stream(AnyIOStream(_AnyioSocketStream(transport, proto)), hop, attempt, transport)

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("unix sockets are not probed")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _httpx_client(env: ProbeEnv, tls: TLSSpec, hooks: Hooks, proxy: str | None = None, http2: bool = False,
                  proxy_headers: tuple[tuple[str, str], ...] = ()) -> httpx.AsyncClient:
    key = ("httpx", asyncio.get_running_loop(), tls, proxy, http2, proxy_headers)
    client = env.clients.get(key)
    if client is None or client.is_closed:
        ctx = hooks.ssl_context(tls)
        transport = httpx.AsyncHTTPTransport(verify=ctx)
        pool_ctx = hooks.h2_context(tls) if http2 else ctx  # h2 offered by ALPN: a context of its own
        if proxy is None:
            transport._pool = httpcore.AsyncConnectionPool(
                ssl_context=pool_ctx, max_keepalive_connections=0, network_backend=_Backend(hooks), http2=http2
            )
        else:  # the proxy's connection is the prober's own socket too (stamped, announced, watched)
            transport._pool = httpcore.AsyncHTTPProxy(
                proxy_url=proxy, ssl_context=pool_ctx, max_keepalive_connections=0, network_backend=_Backend(hooks),
                http2=http2, proxy_headers=list(proxy_headers) or None,
            )
        # only the codings _HttpxResponse decodes itself (httpx would add br/zstd when their modules exist)
        client = httpx.AsyncClient(
            transport=transport, timeout=None, trust_env=False, headers={"Accept-Encoding": "gzip, deflate"}
        )
        env.clients[key] = client
    return client


class _Inflater:
    """One gzip or deflate layer, decoded in pieces of at most `_PIECE` bytes (zlib's max_length), so a
    compressed chunk never becomes one large buffer (httpx's own decoder inflates a read in one call)."""

    __slots__ = ("encoding", "failure", "obj")

    def __init__(self, encoding: str, failure: type[OSError]) -> None:
        self.encoding = encoding
        self.failure = failure
        self.obj = None

    def feed(self, data: bytes):
        if self.obj is None:
            if not data:
                return
            if self.encoding == "deflate":  # zlib-wrapped as the RFC says, or raw deflate as some servers send
                wbits = zlib.MAX_WBITS if data[0] & 0x0F == 8 else -zlib.MAX_WBITS
            else:
                wbits = 16 + zlib.MAX_WBITS
            self.obj = zlib.decompressobj(wbits)
        while True:
            try:
                out = self.obj.decompress(data, _PIECE)
            except zlib.error as exc:
                raise self.failure(
                    ErrorKind.PROTOCOL_ERROR, f"cannot decode content-encoding {self.encoding}: {exc}"
                ) from None
            data = self.obj.unconsumed_tail
            if out:
                yield out
            if not data and len(out) < _PIECE:
                return


_PIECE = 2**16
_INFLATED = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}


def _decode(layers: list[_Inflater], data: bytes, i: int = 0):
    if i == len(layers):
        if data:
            yield data
        return
    for piece in layers[i].feed(data):
        yield from _decode(layers, piece, i + 1)


class _HttpxResponse:
    __slots__ = ("_failure", "_resp", "headers", "status", "version")

    def __init__(self, resp: httpx.Response, failure: type[OSError]) -> None:
        self._resp = resp
        self._failure = failure
        self.status = resp.status_code
        self.headers = resp.headers
        self.version = "HTTP/2.0" if resp.http_version == "HTTP/2" else resp.http_version  # as Go's resp.Proto

    async def chunks(self):
        """The body decoded layer by layer (gzip, deflate; other codings pass through, as in httpx)."""
        codings = [c.strip().lower() for c in self.headers.get("Content-Encoding", "").split(",")]
        layers = [_Inflater(_INFLATED[c], self._failure) for c in reversed(codings) if c in _INFLATED]
        async for raw in self._resp.aiter_raw():
            for piece in _decode(layers, raw):
                yield piece

    async def aclose(self) -> None:
        await self._resp.aclose()


async def send(
    spec: HTTPSpec, env: ProbeEnv, method: str, url: str, headers: dict[str, str], body: str | None, hooks: Hooks
):
    """One request (no redirect followed); the response's status, headers and decoded body in pieces."""
    target = httpx.URL(url)
    proxy = proxy_for(spec, target.scheme, target.host, target.port)
    proxy_headers = tuple((k, v.get_secret_value()) for k, v in spec.proxy_headers.items()) if proxy else ()
    client = _httpx_client(env, spec.tls, hooks, proxy, spec.http2, proxy_headers)
    extensions = {}
    if spec.tls.server_name:
        extensions["sni_hostname"] = spec.tls.server_name
    request = client.build_request(method, url, headers=headers, content=body, extensions=extensions)
    return _HttpxResponse(await client.send(request, follow_redirects=False, stream=True), hooks.failure)
