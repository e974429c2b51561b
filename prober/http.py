"""HTTP probe with three clients, all timed the same way and all on the prober's own sockets.

- `aiohttp` (default, `prober/http1_client.py`): aiohttp's C HTTP/1.1 parser on a connection the prober opens
  itself; stamps are taken where the bytes move (connect, TLS, request written, first byte received).
- `aiohttp-session`: a full `aiohttp.ClientSession`; a `TCPConnector` subclass whose
  `_wrap_create_connection` creates, connects and TLS-wraps the socket itself (stamps around each step),
  a `ResponseHandler` subclass stamps the first byte, a `TraceConfig` stamps "request sent".
- `httpx` (`prober/http_httpx.py`, imported on first use): an httpcore network backend whose stream stamps
  connect, start_tls, the last write before the first read (request sent) and the first byte (in the
  transport's protocol for plain HTTP).

Every client gets its sockets from `Source.open()` (bound, announced, right namespace) and resolves
other hosts (redirects) through the prober's own DNS. A client only sends one request and hands back
its answer (`_SENDERS`); `_exchange` does the rest the same way for all three: redirects (a new
connection per hop, each hop its own stamps, durations summed per phase; `redirected` decides what the
next hop carries) and the body (`_read_body`: read in pieces, kept only for a body regexp, capped).
`aiohttp-session` relies on a private aiohttp hook; tests/prober/test_http.py fails if it stops being
called (no connect phase).
"""

from __future__ import annotations

import asyncio
import contextvars
import email.utils
import functools
import re
import socket
import ssl
import time
import warnings
from typing import Any

import aiohttp
import aiohttp.client_proto
import aiohttp.connector
import yarl
from aiohttp.abc import AbstractResolver

from prober import http1_client, oauth2
from prober.attempt import Attempt, Timeline
from prober.env import ProbeEnv
from prober.errors import find_in_chain
from prober.resolve import resolve
from prober.sockets import family_mismatch
from prober.spec import HTTPSpec, TLSSpec
from prober.tlsinfo import expires_within, load_client_chain, tls_facts
from prober.types import ErrorKind

monotonic_ns = time.monotonic_ns

_CURRENT: contextvars.ContextVar[Attempt] = contextvars.ContextVar("connprobe_http_attempt")


class ProbeFailure(OSError):
    """Raised inside a client's hooks with a decided kind (e.g. a redirect's name did not resolve)."""

    def __init__(self, kind: ErrorKind, detail: str):
        super().__init__(0, detail)
        self.kind = kind
        self.detail = detail


async def _open_connected(attempt: Attempt, family: int, addr: tuple, timeline: Timeline):
    """Socket from the source, announced, connected; stamps the connect phase on a new hop."""
    hop = timeline.hop()
    http = attempt.spec.module.http  # the websocket prober opens its connection here too
    local = http.source_ip_address if http is not None else None
    if (err := family_mismatch(local, addr[0])) is not None:
        raise ProbeFailure(ErrorKind.CONNECT_UNREACHABLE, err)
    return await attempt.connect_tcp(_CTX_CB.get(), family, addr, hop, local), hop


_CTX_CB: contextvars.ContextVar = contextvars.ContextVar("connprobe_port_cb")


async def _lookup(attempt: Attempt, host: str) -> str:
    """The address for `host`: the probed one for the target host, else our own DNS (redirects)."""
    if host == attempt.target.host and attempt.target.address:
        return attempt.target.address
    t0 = monotonic_ns()
    deadline = _CTX_DEADLINE.get()
    res = await resolve(
        attempt.source, host, attempt.spec.module.ip_policy, deadline, _CTX_CB.get(), attempt.resolv_conf()
    )
    attempt.dns.extend(res.transactions)
    if res.transactions:
        attempt.timeline.resolves.append((t0, res.end_ns))
    if res.error is not None or not res.addresses:
        raise ProbeFailure(res.error or ErrorKind.DNS_NO_ANSWER, res.detail)
    return res.addresses[0]


_CTX_DEADLINE: contextvars.ContextVar[int] = contextvars.ContextVar("connprobe_deadline")


# ---------------------------------------------------------------- one exchange, every client

REDIRECTS = frozenset({301, 302, 303, 307, 308})
BODY_CAP_WITH_REGEXP = 10 * 2**20  # the body kept for a body regexp when max_body_bytes is not set


class _Request:
    """What one hop sends. `headers` are the module's configured headers still allowed on this hop."""

    __slots__ = ("body", "headers", "method", "url")

    def __init__(self, method: str, url: yarl.URL, headers: dict[str, str], body: str | None) -> None:
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body


def origin(url: yarl.URL) -> tuple[str, str, int | None]:
    return url.scheme, (url.host or "").lower(), url.port


def redirected(req: _Request, status: int, location: str) -> _Request:
    """The next hop's request. Once the origin (scheme, host, port) differs from the hop before, the
    request carries none of the module's configured headers (every one is treated as a credential, like
    Authorization, Cookie and Proxy-Authorization in aiohttp and httpx), and never again in this probe;
    Basic credentials come only from the new URL's own userinfo. An http→https upgrade changes the
    scheme, so it drops them too (as aiohttp does)."""
    try:
        url = req.url.join(yarl.URL(location))
        new_origin = origin(url)
    except (ValueError, TypeError) as exc:
        raise ProbeFailure(ErrorKind.PROTOCOL_ERROR, f"invalid redirect location: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ProbeFailure(ErrorKind.PROTOCOL_ERROR, f"redirect to a non-HTTP URL: {url.scheme or '(none)'}:")
    method, body = req.method, req.body
    if status == 303 or (status in (301, 302) and method == "POST"):
        method, body = ("GET" if method != "HEAD" else "HEAD"), None
    headers = req.headers if new_origin == origin(req.url) else {}
    return _Request(method, url, headers, body)


def _first_request(attempt: Attempt, spec: HTTPSpec) -> _Request:
    prep = attempt.prep
    if prep.url is None:
        prep.url = yarl.URL(attempt.target.raw)
    headers = prep.headers
    asked = spec.compression or spec.accept_encoding
    if asked is not None and not any(k.lower() == "accept-encoding" for k in headers):
        headers = {**headers, "Accept-Encoding": asked}  # not a secret: not in the module's headers
    return _Request(spec.method, prep.url, headers, spec.body)


def _sendable(req: _Request) -> _Request:
    """A configured Authorization header wins over the URL's userinfo, in every client (aiohttp's session
    refuses the pair, httpx would let the userinfo win)."""
    if req.url.raw_user is None or not any(k.lower() == "authorization" for k in req.headers):
        return req
    return _Request(req.method, req.url.with_user(None), req.headers, req.body)


async def _exchange(attempt: Attempt, spec: HTTPSpec, env: ProbeEnv, facts: dict) -> None:
    """Request, redirects (a fresh connection per hop, sent by the module's client), then the body."""
    try:
        await _hops(attempt, spec, env, facts)
    except BaseException:
        attempt.timeline.reset_on_close()  # failed before an answer: a socket still open resets as it closes
        raise


async def _hops(attempt: Attempt, spec: HTTPSpec, env: ProbeEnv, facts: dict) -> None:
    send = _SENDERS[spec.client]
    req = _first_request(attempt, spec)
    if spec.oauth2 is not None:  # a token first (cached, or fetched within this probe's deadline)
        token = await oauth2.authorization(attempt, spec.oauth2, _CTX_CB.get(), ssl_context, _CTX_DEADLINE.get())
        req = _Request(req.method, req.url, {**req.headers, "Authorization": token}, req.body)
    redirects = 0
    while True:
        resp = await send(attempt, spec, env, _sendable(req), redirects == 0)
        try:
            location = resp.headers.get("Location")
            if spec.follow_redirects and resp.status in REDIRECTS and location:
                if redirects >= spec.max_redirects:
                    attempt.http_status = resp.status
                    attempt.failed.append("max_redirects")
                    raise ProbeFailure(ErrorKind.VALIDATION, f"more than {spec.max_redirects} redirects")
                req = redirected(req, resp.status, location)
                redirects += 1
                hop = attempt.timeline.hops[-1] if attempt.timeline.hops else None
                if hop is not None and not hop.end:
                    hop.end = monotonic_ns()
                continue
            facts["status"] = resp.status
            attempt.http_status = resp.status
            facts["headers"] = resp.headers
            facts["redirects"] = redirects
            facts["ssl"] = req.url.scheme == "https"
            facts["version"] = resp.version
            facts["content_length"] = _content_length(resp.headers)
            coding = resp.headers.get("Content-Encoding", "").strip().lower()
            facts["body"] = await _read_body(resp.chunks(), spec, facts, attempt, coding not in ("", "identity"))
            return
        except BaseException:
            attempt.timeline.reset_on_close()  # before the client closes the connection (it may yield first)
            raise
        finally:
            await resp.aclose()


def _content_length(headers) -> int:
    """The Content-Length header as blackbox reports it: -1 when absent or not a number."""
    value = headers.get("Content-Length")
    if value is None or not value.strip().isdigit() or len(value.strip()) > 18:
        return -1
    return int(value.strip())


async def _read_body(chunks, spec: HTTPSpec, facts: dict, attempt: Attempt, encoded: bool) -> bytes:
    """Read the decoded body piece by piece: kept only for a body regexp (then capped), else counted and
    dropped. A compressed body is also capped at max_decompressed_bytes, kept or not."""
    keep = bool(spec.fail_if_body_matches_regexp or spec.fail_if_body_not_matches_regexp)
    cap = spec.max_body_bytes
    if cap is None and keep:
        cap = BODY_CAP_WITH_REGEXP
    inflated_cap = spec.max_decompressed_bytes if encoded else None
    size = 0
    buf = bytearray()
    arrivals = attempt.arrivals
    async for chunk in chunks:
        size += len(chunk)
        if arrivals is not None:
            arrivals.add(len(chunk))
        if cap is not None and size > cap:
            facts["size"] = size
            attempt.failed.append("max_body_bytes")
            why = "max_body_bytes" if spec.max_body_bytes is not None else "default cap with a body regexp"
            raise ProbeFailure(ErrorKind.VALIDATION, f"body larger than {cap} bytes ({why})")
        if inflated_cap is not None and size > inflated_cap:
            facts["size"] = size
            attempt.failed.append("max_decompressed_bytes")
            raise ProbeFailure(
                ErrorKind.VALIDATION, f"compressed body inflates past {inflated_cap} bytes (max_decompressed_bytes)"
            )
        if keep:
            buf += chunk
    facts["size"] = size
    return bytes(buf)


# ---------------------------------------------------------------- aiohttp


class _TimedHandler(aiohttp.client_proto.ResponseHandler):
    first_byte_ns = 0

    def data_received(self, data: bytes) -> None:
        if not self.first_byte_ns:
            self.first_byte_ns = monotonic_ns()
        super().data_received(data)


class _Resolver(AbstractResolver):
    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        addr = await _lookup(_CURRENT.get(), host)
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        return [{"hostname": host, "host": addr, "port": port, "family": fam, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        return None


class _Connector(aiohttp.TCPConnector):
    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._factory = functools.partial(_TimedHandler, loop=self._loop)

    async def _wrap_create_connection(
        self,
        *args: Any,
        addr_infos: list,
        req: Any,
        timeout: Any,
        client_error: type[Exception] = aiohttp.ClientConnectorError,
        **kwargs: Any,
    ):
        attempt = _CURRENT.get()
        family, _, _, _, addr = addr_infos[0]
        try:
            sock, hop = await _open_connected(attempt, family, addr, attempt.timeline)
        except OSError as exc:
            raise client_error(req.connection_key, exc) from exc
        try:
            if kwargs.get("ssl"):
                hop.tls_start = monotonic_ns()
            transport, proto = await self._loop.create_connection(*args, **kwargs, sock=sock)
            if hop.tls_start:
                hop.tls_end = monotonic_ns()
                hop.peercert = transport.get_extra_info("peercert")
                hop.tls = tls_facts(transport.get_extra_info("ssl_object"))
        except aiohttp.connector.cert_errors as exc:
            sock.close()
            raise aiohttp.ClientConnectorCertificateError(req.connection_key, exc) from exc
        except aiohttp.connector.ssl_errors as exc:
            sock.close()
            raise aiohttp.ClientConnectorSSLError(req.connection_key, exc) from exc
        except OSError as exc:
            sock.close()
            raise client_error(req.connection_key, exc) from exc
        hop.conn = proto
        return transport, proto


async def _on_headers_sent(session, ctx, params) -> None:
    attempt = _CURRENT.get(None)
    if attempt is not None and attempt.timeline.hops:
        attempt.timeline.hops[-1].sent = monotonic_ns()


def _trace_config() -> aiohttp.TraceConfig:
    tc = aiohttp.TraceConfig()
    tc.on_request_headers_sent.append(_on_headers_sent)
    tc.freeze()
    return tc


_TLS_VERSION = {"TLS10": "TLSv1", "TLS11": "TLSv1_1", "TLS12": "TLSv1_2", "TLS13": "TLSv1_3"}


def _set_versions(ctx: ssl.SSLContext, tls: TLSSpec) -> None:
    with warnings.catch_warnings():  # TLSv1 and TLSv1_1 are deprecated in Python 3.10+ (a warning): still settable
        warnings.simplefilter("ignore", DeprecationWarning)
        if tls.min_version is not None:
            # OpenSSL's own floor (Debian: TLS 1.2 at security level 2) still refuses lower versions; blackbox's Go
            # client has no such floor
            ctx.minimum_version = getattr(ssl.TLSVersion, _TLS_VERSION[tls.min_version])
        if tls.max_version is not None:
            ctx.maximum_version = getattr(ssl.TLSVersion, _TLS_VERSION[tls.max_version])


def _ssl_context(tls: TLSSpec) -> ssl.SSLContext:
    """The client context of a module's TLS settings: every TLS the probers speak (http, tcp, STARTTLS, websocket,
    an OAuth2 token endpoint) is made here; grpc's is grpcio's own (`prober/grpc.py`)."""
    ctx = ssl.create_default_context(cafile=tls.ca_file, cadata=tls.ca)
    if tls.min_version is not None or tls.max_version is not None:
        _set_versions(ctx, tls)
    load_client_chain(ctx, tls)  # the client certificate, sent when the server asks for one
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


_ssl_cache: dict[TLSSpec, ssl.SSLContext] = {}
_h2_cache: dict[TLSSpec, ssl.SSLContext] = {}


def _h2_context(tls: TLSSpec) -> ssl.SSLContext:
    """The module's TLS context offering h2 and http/1.1 by ALPN (a context of its own: ALPN is per context)."""
    ctx = _h2_cache.get(tls)
    if ctx is None:
        ctx = _h2_cache[tls] = _ssl_context(tls)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def ssl_context(tls: TLSSpec) -> ssl.SSLContext:
    ctx = _ssl_cache.get(tls)
    if ctx is None:
        ctx = _ssl_cache[tls] = _ssl_context(tls)
    return ctx


def _aiohttp_session(env: ProbeEnv) -> aiohttp.ClientSession:
    key = ("aiohttp", asyncio.get_running_loop())
    session = env.clients.get(key)
    if session is None or session.closed:
        connector = _Connector(
            force_close=True, use_dns_cache=False, resolver=_Resolver(), limit=0, enable_cleanup_closed=False
        )
        session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_read=None, sock_connect=None),
            trace_configs=[_trace_config()],
            auto_decompress=True,
        )
        env.clients[key] = session
    return session


class _SessionResponse:
    __slots__ = ("_resp", "headers", "status", "version")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers
        self.version = f"HTTP/{resp.version.major}.{resp.version.minor}" if resp.version else "HTTP/1.1"

    async def chunks(self):
        """The decoded body in pieces of at most ~128 KiB (the payload's flow control bounds them)."""
        content = self._resp.content
        while True:
            chunk = await content.readany()
            if not chunk:
                return
            yield chunk

    async def aclose(self) -> None:
        self._resp.close()


async def _session_send(attempt: Attempt, spec: HTTPSpec, env: ProbeEnv, req: _Request, first: bool):
    kwargs: dict[str, Any] = {}
    if req.url.scheme == "https":
        kwargs["ssl"] = ssl_context(spec.tls)
        if spec.tls.server_name:
            kwargs["server_hostname"] = spec.tls.server_name
    resp = await _aiohttp_session(env).request(
        req.method, req.url, headers=req.headers, data=req.body, allow_redirects=False, **kwargs
    )
    return _SessionResponse(resp)


# ---------------------------------------------------------------- httpx


async def _httpx_send(attempt: Attempt, spec: HTTPSpec, env: ProbeEnv, req: _Request, first: bool):
    """`client: httpx` lives in prober/http_httpx.py, imported here on its first use (not by the agent's start)."""
    from prober import http_httpx

    hooks = http_httpx.Hooks(_CURRENT, _lookup, _open_connected, ssl_context, _h2_context, ProbeFailure)
    return await http_httpx.send(spec, env, req.method, str(req.url), req.headers, req.body, hooks)


# ---------------------------------------------------------------- validators


def _header_value(headers, name: str) -> str | None:
    values = headers.getall(name, None) if hasattr(headers, "getall") else headers.get_list(name) or None
    return ", ".join(values) if values else None


def validate(spec: HTTPSpec, facts: dict, attempt: Attempt) -> None:
    """Append the names of failed validators to `attempt.failed` (status is checked by the caller)."""
    body = facts.get("body", b"")
    text = body.decode("utf-8", "replace") if body else ""
    for pattern in spec.fail_if_body_matches_regexp:
        if re.search(pattern, text):
            attempt.failed.append("fail_if_body_matches_regexp")
            break
    for pattern in spec.fail_if_body_not_matches_regexp:
        if not re.search(pattern, text):
            attempt.failed.append("fail_if_body_not_matches_regexp")
            break
    headers = facts.get("headers")
    for m in spec.fail_if_header_matches:
        value = _header_value(headers, m.header) if headers is not None else None
        if value is not None and re.search(m.regexp, value):
            attempt.failed.append("fail_if_header_matches")
            break
    for m in spec.fail_if_header_not_matches:
        value = _header_value(headers, m.header) if headers is not None else None
        if (value is None and not m.allow_missing) or (value is not None and not re.search(m.regexp, value)):
            attempt.failed.append("fail_if_header_not_matches")
            break
    if spec.valid_http_versions and facts.get("version") not in spec.valid_http_versions:
        attempt.failed.append("valid_http_versions")
    if spec.compression is not None and "headers" in facts:
        coding = (facts["headers"].get("Content-Encoding") or "identity").strip().lower()
        if coding != spec.compression:
            attempt.failed.append("compression")
    if spec.fail_if_ssl and facts.get("ssl"):
        attempt.failed.append("fail_if_ssl")
    if spec.fail_if_not_ssl and not facts.get("ssl"):
        attempt.failed.append("fail_if_not_ssl")
    if spec.tls.min_cert_days is not None and facts.get("ssl"):
        hops = attempt.timeline.hops
        if expires_within(hops[-1].peercert if hops else None, spec.tls.min_cert_days):
            attempt.failed.append("min_cert_days")


def record_values(facts: dict, attempt: Attempt) -> None:
    """What blackbox's HTTP metrics report, into the result's values (the app names the metrics)."""
    values = attempt.values
    version = facts.get("version")
    if version:
        try:
            values["http_version"] = float(version.removeprefix("HTTP/"))
        except ValueError:
            pass
    if "content_length" in facts:
        values["http_content_length"] = float(facts["content_length"])
    if "size" in facts:
        values["http_uncompressed_body_length"] = float(facts["size"])
    values["http_redirects"] = float(facts.get("redirects", 0))
    values["http_ssl"] = 1.0 if facts.get("ssl") else 0.0
    headers = facts.get("headers")
    modified = headers.get("Last-Modified") if headers is not None else None
    if modified:
        try:
            values["http_last_modified"] = email.utils.parsedate_to_datetime(modified).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            pass
    hops = attempt.timeline.hops
    if facts.get("ssl") and hops and hops[-1].tls:
        attempt.tls(hops[-1].tls)


def status_ok(spec: HTTPSpec, status: int) -> bool:
    if spec.valid_status_codes:
        return status in spec.valid_status_codes
    return 200 <= status <= 299


async def probe_http(attempt: Attempt, env: ProbeEnv, deadline_ns: int):
    """Run one HTTP exchange against `attempt.target.address`; returns the frozen result."""
    spec = attempt.spec.module.http
    facts: dict[str, Any] = {}
    t1 = _CURRENT.set(attempt)
    t2 = _CTX_CB.set(env.on_local_port)
    t3 = _CTX_DEADLINE.set(deadline_ns)
    attempt.track_arrivals(deadline_ns)
    try:
        async with asyncio.timeout(max(0.0, (deadline_ns - monotonic_ns()) / 1e9)):
            await _exchange(attempt, spec, env, facts)
    except ProbeFailure as exc:
        return attempt.result(exc.kind, exc.detail)
    except Exception as exc:
        if isinstance(exc, oauth2.TokenFailure):
            return attempt.result(exc.kind, exc.detail)
        if isinstance(exc, TimeoutError) and attempt.oauth2_fetch is not None:
            named = oauth2.timeout_failure(attempt)  # the deadline came while the token was fetched
            if named is not None:
                return attempt.result(*named)
        failure = _find_failure(exc)
        if failure is not None:
            return attempt.result(failure.kind, failure.detail)
        return attempt.result_of(exc)
    finally:
        _CURRENT.reset(t1)
        _CTX_CB.reset(t2)
        _CTX_DEADLINE.reset(t3)
    if attempt.timeline.hops:
        attempt.timeline.hops[-1].end = monotonic_ns()
    status = facts.get("status")
    if spec.capture_headers and facts.get("headers") is not None:
        attempt.captured = tuple(
            (h, v) for h in spec.capture_headers if (v := _header_value(facts["headers"], h)) is not None
        )
    record_values(facts, attempt)
    validate(spec, facts, attempt)
    if status is not None and not status_ok(spec, status):
        attempt.failed.insert(0, "status_code")
        return attempt.result(ErrorKind.HTTP_STATUS, f"status {status}")
    return attempt.result()


async def _http1_send(attempt: Attempt, spec: HTTPSpec, env: ProbeEnv, req: _Request, first: bool):
    body = req.body.encode() if req.body is not None else None
    request = None
    prep = attempt.prep
    if first and spec.oauth2 is None:  # the same bytes every run: built once per spec (not with a token)
        request = prep.request
        if request is None:
            request = prep.request = http1_client.request_bytes(req.method, req.url, req.headers, body)
    return await http1_client.send(
        attempt,
        spec,
        req.method,
        req.url,
        req.headers,
        body,
        request,
        lookup=_lookup,
        open_connected=_open_connected,
        ssl_context=ssl_context,
    )


_SENDERS = {"aiohttp": _http1_send, "aiohttp-session": _session_send, "httpx": _httpx_send}


def _find_failure(exc: BaseException) -> ProbeFailure | None:
    found = find_in_chain(exc, ProbeFailure)
    return found if isinstance(found, ProbeFailure) else None
