"""Every exception a probe can meet, mapped to the closed `ErrorKind` enum where it enters.

    BaseException
     ├── asyncio.TimeoutError / TimeoutError ....... by phase: resolve→dns_timeout, connect→connect_timeout,
     │                                               tls→tls_error, processing/transfer→read_timeout
     ├── OSError (errno) ........................... ECONNREFUSED→connect_refused, EPERM/EACCES→connect_eperm,
     │    ├── ssl.SSLError / CertificateError ...... tls_error       EHOSTUNREACH/ENETUNREACH→connect_unreachable,
     │    └── aiohttp.ClientOSError & co ........... errno of the   ECONNRESET/EPIPE→connect_reset,
     │                                               wrapped OSError ETIMEDOUT→connect_timeout
     ├── aiohttp.ClientError tree .................. `_TABLE` below, one entry per class
     ├── httpx.HTTPError tree ...................... `_TABLE` below, one entry per class
     ├── dns.exception.DNSException ................ protocol_error (malformed answer); Timeout→dns_timeout
     └── grpc.RpcError / grpc.aio.BaseError ........ the gRPC prober maps an RPC's status code itself
                                                     (prober/grpc.py); what escapes it: `_TABLE`

`classify(exc, phase)` walks the exception's MRO to the nearest entry. A class with no entry at all
becomes `internal` — a bug: tests/prober/test_errors.py enumerates every exception class of aiohttp, httpx,
grpcio and dnspython and fails when one has no explicit entry.
"""

from __future__ import annotations

import errno
import ssl
import sys

import aiohttp
import aiohttp.client_exceptions as ace
import aiohttp.http_exceptions as ahe
import dns.exception

from prober.sockets import SourceError
from prober.types import ErrorKind

# Rules other than a fixed kind.
BY_PHASE = "by_phase"  # a timeout: the phase that was running decides
BY_ERRNO = "by_errno"  # an OSError (or a wrapper of one): the errno decides, else the phase
NOT_RAISED = "not_raised"  # classes the probes never let escape (warnings, server-side, websocket)

E = ErrorKind

_TABLE: dict[type[BaseException], object] = {
    # --- Python / asyncio / ssl ---
    TimeoutError: BY_PHASE,
    ssl.SSLError: E.TLS_ERROR,
    ssl.CertificateError: E.TLS_ERROR,
    OSError: BY_ERRNO,
    EOFError: E.CONNECT_RESET,
    UnicodeError: E.PROTOCOL_ERROR,
    # --- aiohttp ---
    ace.ClientError: E.PROTOCOL_ERROR,
    ace.ClientConnectionError: BY_ERRNO,
    ace.ClientConnectionResetError: E.CONNECT_RESET,
    ace.ClientOSError: BY_ERRNO,
    ace.ClientConnectorError: BY_ERRNO,
    ace.ClientConnectorDNSError: E.DNS_UNREACHABLE,  # only if aiohttp resolved itself (we pre-resolve)
    ace.ClientProxyConnectionError: BY_ERRNO,
    ace.UnixClientConnectorError: BY_ERRNO,
    ace.ClientSSLError: E.TLS_ERROR,
    ace.ClientConnectorSSLError: E.TLS_ERROR,
    ace.ClientConnectorCertificateError: E.TLS_ERROR,
    ace.ServerConnectionError: E.CONNECT_RESET,
    ace.ServerDisconnectedError: E.CONNECT_RESET,
    ace.ServerFingerprintMismatch: E.TLS_ERROR,
    ace.ServerTimeoutError: BY_PHASE,
    ace.ConnectionTimeoutError: E.CONNECT_TIMEOUT,
    ace.SocketTimeoutError: E.READ_TIMEOUT,
    ace.ClientPayloadError: E.PROTOCOL_ERROR,
    ace.ClientResponseError: E.PROTOCOL_ERROR,
    ace.ClientHttpProxyError: E.PROTOCOL_ERROR,
    ace.ContentTypeError: E.PROTOCOL_ERROR,
    ace.TooManyRedirects: E.VALIDATION,
    ace.WSServerHandshakeError: E.HTTP_STATUS,  # the websocket prober's upgrade refused
    ace.InvalidURL: E.VALIDATION,
    ace.InvalidUrlClientError: E.VALIDATION,
    ace.InvalidUrlRedirectClientError: E.PROTOCOL_ERROR,
    ace.NonHttpUrlClientError: E.VALIDATION,
    ace.NonHttpUrlRedirectClientError: E.PROTOCOL_ERROR,
    ace.RedirectClientError: E.PROTOCOL_ERROR,
    ace.UploadAbortedError: E.CONNECT_RESET,
    ace.WSMessageTypeError: NOT_RAISED,
    ahe.HttpProcessingError: E.PROTOCOL_ERROR,
    ahe.BadHttpMessage: E.PROTOCOL_ERROR,
    ahe.BadHttpMethod: E.PROTOCOL_ERROR,
    ahe.BadStatusLine: E.PROTOCOL_ERROR,
    ahe.HttpBadRequest: E.PROTOCOL_ERROR,
    ahe.InvalidHeader: E.PROTOCOL_ERROR,
    ahe.InvalidURLError: E.PROTOCOL_ERROR,
    ahe.LineTooLong: E.PROTOCOL_ERROR,
    ahe.PayloadEncodingError: E.PROTOCOL_ERROR,
    ahe.ContentEncodingError: E.PROTOCOL_ERROR,
    ahe.ContentLengthError: E.PROTOCOL_ERROR,
    ahe.TransferEncodingError: E.PROTOCOL_ERROR,
    ahe.DecompressSizeError: E.VALIDATION,
    aiohttp.EofStream: E.CONNECT_RESET,
    aiohttp.WebSocketError: E.PROTOCOL_ERROR,  # a malformed frame (websocket prober)
    aiohttp.BadContentDispositionHeader: NOT_RAISED,
    aiohttp.BadContentDispositionParam: NOT_RAISED,
    # --- dnspython (only message parsing is used: the transport is ours) ---
    dns.exception.DNSException: E.PROTOCOL_ERROR,
    dns.exception.Timeout: E.DNS_TIMEOUT,
}


def _grpc_entries() -> dict[type[BaseException], object]:
    """grpcio's classes: added to the table once grpc is imported (by the gRPC prober, on its first probe).
    Importing it here would cost every agent ~9 MiB of RSS for a C core most configs never use; an exception
    of grpc's cannot exist before grpc is imported."""
    import grpc
    import grpc.aio

    return {
        grpc.RpcError: E.PROTOCOL_ERROR,
        grpc.aio.AioRpcError: E.PROTOCOL_ERROR,  # prober/grpc.py reads its status code first
        grpc.FutureTimeoutError: BY_PHASE,
        grpc.FutureCancelledError: E.INTERNAL,
        grpc.aio.BaseError: E.INTERNAL,
        grpc.aio.AbortError: E.PROTOCOL_ERROR,
        grpc.aio.InternalError: E.INTERNAL,
        grpc.aio.UsageError: E.INTERNAL,
    }


def _httpx_entries() -> dict[type[BaseException], object]:
    """httpx's classes: added once httpx is imported (by prober/http_httpx.py, on the first `client: httpx`
    probe); the default HTTP client does not use it, and importing it costs an agent ~5 MiB of RSS."""
    import httpx

    return {
        httpx.HTTPError: E.PROTOCOL_ERROR,
        httpx.RequestError: E.PROTOCOL_ERROR,
        httpx.TransportError: BY_ERRNO,
        httpx.TimeoutException: BY_PHASE,
        httpx.ConnectTimeout: E.CONNECT_TIMEOUT,
        httpx.ReadTimeout: E.READ_TIMEOUT,
        httpx.WriteTimeout: E.READ_TIMEOUT,
        httpx.PoolTimeout: E.CONNECT_TIMEOUT,
        httpx.NetworkError: BY_ERRNO,
        httpx.ConnectError: BY_ERRNO,
        httpx.ReadError: BY_ERRNO,
        httpx.WriteError: BY_ERRNO,
        httpx.CloseError: E.CONNECT_RESET,
        httpx.ProtocolError: E.PROTOCOL_ERROR,
        httpx.LocalProtocolError: E.PROTOCOL_ERROR,
        httpx.RemoteProtocolError: E.PROTOCOL_ERROR,
        httpx.ProxyError: E.PROTOCOL_ERROR,
        httpx.UnsupportedProtocol: E.VALIDATION,
        httpx.DecodingError: E.PROTOCOL_ERROR,
        httpx.TooManyRedirects: E.VALIDATION,
        httpx.HTTPStatusError: E.HTTP_STATUS,
        httpx.InvalidURL: E.VALIDATION,
        httpx.CookieConflict: E.PROTOCOL_ERROR,
        httpx.StreamError: E.INTERNAL,
        httpx.StreamConsumed: E.INTERNAL,
        httpx.StreamClosed: E.CONNECT_RESET,
        httpx.ResponseNotRead: E.INTERNAL,
        httpx.RequestNotRead: E.INTERNAL,
    }


# module name -> its entries, merged into _TABLE by table() once the module is imported
_LATER: dict[str, object] = {"grpc": _grpc_entries, "httpx": _httpx_entries}


def table() -> dict[type[BaseException], object]:
    """The whole table: `_TABLE` plus the entries of the libraries imported since (grpcio, httpx)."""
    if _LATER:
        for name in [n for n in _LATER if n in sys.modules]:
            entries = _LATER.pop(name, None)
            if entries is not None:
                _TABLE.update(entries())  # type: ignore[operator]
    return _TABLE


_ERRNO: dict[int, ErrorKind] = {
    errno.ECONNREFUSED: E.CONNECT_REFUSED,
    errno.EPERM: E.CONNECT_EPERM,
    errno.EACCES: E.CONNECT_EPERM,
    errno.EHOSTUNREACH: E.CONNECT_UNREACHABLE,
    errno.ENETUNREACH: E.CONNECT_UNREACHABLE,
    errno.EHOSTDOWN: E.CONNECT_UNREACHABLE,
    errno.ENETDOWN: E.CONNECT_UNREACHABLE,
    errno.EADDRNOTAVAIL: E.CONNECT_UNREACHABLE,
    errno.ENONET: E.CONNECT_UNREACHABLE,
    errno.ECONNRESET: E.CONNECT_RESET,
    errno.ECONNABORTED: E.CONNECT_RESET,
    errno.EPIPE: E.CONNECT_RESET,
    errno.ETIMEDOUT: E.CONNECT_TIMEOUT,
}

_PHASE_TIMEOUT = {
    "resolve": E.DNS_TIMEOUT,
    "connect": E.CONNECT_TIMEOUT,
    "tls": E.TLS_ERROR,
    "processing": E.READ_TIMEOUT,
    "transfer": E.READ_TIMEOUT,
}


def errno_kind(num: int | None) -> ErrorKind | None:
    return _ERRNO.get(num) if num is not None else None


def rule_for(cls: type[BaseException]) -> object | None:
    """The table entry that applies to `cls` (nearest in its MRO), None when nothing applies."""
    entries = table()
    for base in cls.__mro__:
        rule = entries.get(base)
        if rule is not None:
            return rule
    return None


def _errno_of(exc: BaseException) -> int | None:
    seen = 0
    while exc is not None and seen < 6:
        num = getattr(exc, "errno", None)
        if isinstance(num, int) and num in _ERRNO:
            return num
        os_error = getattr(exc, "os_error", None)
        if isinstance(os_error, OSError) and os_error.errno in _ERRNO:
            return os_error.errno
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def find_in_chain(exc: BaseException | None, kinds: type | tuple[type, ...]) -> BaseException | None:
    """The first exception of `kinds` in exc's cause/context chain (at most six deep), else None."""
    seen = 0
    while exc is not None and seen < 6:
        if isinstance(exc, kinds):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _has_in_chain(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    return find_in_chain(exc, kinds) is not None


def classify(exc: BaseException, phase: str | None) -> tuple[ErrorKind, str]:
    """(kind, one-line detail) for an exception raised while `phase` was running."""
    detail = describe(exc)
    if _has_in_chain(exc, (SourceError,)):
        return E.SOURCE_ERROR, detail
    rule = rule_for(type(exc))
    if rule is None or rule is NOT_RAISED:
        return E.INTERNAL, f"unmapped {type(exc).__module__}.{type(exc).__qualname__}: {detail}"
    if isinstance(rule, ErrorKind):
        return rule, detail
    if rule == BY_ERRNO:
        if _has_in_chain(exc, (ssl.SSLError, ssl.CertificateError)):
            return E.TLS_ERROR, detail
        kind = errno_kind(_errno_of(exc))
        if kind is E.CONNECT_TIMEOUT and phase in ("processing", "transfer"):
            kind = E.READ_TIMEOUT
        if kind is E.CONNECT_RESET and phase == "tls":
            kind = E.TLS_ERROR
        if kind is not None:
            return kind, detail
        if _has_in_chain(exc, (TimeoutError,)):
            return _PHASE_TIMEOUT.get(phase or "", E.CONNECT_TIMEOUT), detail
        if phase == "connect":
            return E.CONNECT_UNREACHABLE, detail
        return E.CONNECT_RESET, detail
    # BY_PHASE
    return _PHASE_TIMEOUT.get(phase or "", E.CONNECT_TIMEOUT), detail


def describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    text = " ".join(text.split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}"
