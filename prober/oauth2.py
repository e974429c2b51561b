"""OAuth 2.0 client credentials for the HTTP probe (`http.oauth2`, blackbox's key of the same name): the one home
of fetching, caching and sending the token.

How a probe gets its `Authorization` header:

- The token comes from `token_url` by `POST` with the form `grant_type=client_credentials` (plus `scope`, the
  scopes space-joined, and `endpoint_params`, which may override either), the client id and secret as HTTP Basic
  credentials (each form-encoded first, as RFC 6749 2.3.1 and Go's oauth2 package do). When the endpoint answers
  400 or 401 to that, the request is sent once more with `client_id` and `client_secret` in the form instead (what
  Go's client does when no auth style is configured); the style that worked is kept for the token URL.
- The answer is read up to `MAX_ANSWER_BYTES` (decoded): a JSON object (or a form-encoded body) with
  `access_token`, optional `token_type` (default Bearer) and `expires_in` (read by `_expiry`). The token is kept
  until `EXPIRY_MARGIN_S` before it expires (no `expires_in`: until the config is reloaded, as Go keeps it), per
  module settings and probe source; probes that need it while it is fetched wait for that one fetch.
- The fetch runs inside the probe: its time counts in the probe's duration and deadline (not in any of the
  target's phases: those time the target's own connection, as blackbox's do); its sockets come from the probe's
  source and are the probe's flows (kernel evidence covers them); its name is resolved by the prober's own DNS;
  on the agent's `/probe` each of its connects passes the same policy check as the target's
  (`prober.sockets.connect_guard`).
- A fetch that fails ends the probe with one line: `oauth2 token endpoint URL: ...` and the kind of what went
  wrong (connect_refused, tls_error, dns_*, http_status for an error status, protocol_error for an answer that is
  not a token, a timeout by the phase it was in). The target is not contacted then.
- The client secret (and the Basic credentials made of it) are secrets of the spec (`prober.redact.secrets_of`);
  each fetched token is taught to the probe's redactor and to the log redactor before it is used
  (`prober.redact.learn`), so no output shows it.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import urllib.parse
from dataclasses import dataclass

import yarl

from prober import http1_client
from prober.attempt import Attempt, Timeline
from prober.errors import classify
from prober.redact import learn
from prober.resolve import resolve
from prober.sockets import PortCallback
from prober.spec import OAuth2Spec, TLSSpec
from prober.spec import oauth2_basic_credentials as basic_credentials
from prober.types import ErrorKind

__all__ = ["EXPIRY_MARGIN_S", "MAX_ANSWER_BYTES", "TokenFailure", "authorization", "basic_credentials",
           "forget_tokens"]

monotonic_ns = time.monotonic_ns
MAX_ANSWER_BYTES = 64 << 10  # a token answer is a few hundred bytes; more is a wrong endpoint or a hostile one
MAX_TOKEN_CHARS = 16 << 10
EXPIRY_MARGIN_S = 10.0  # a token is fetched anew this long before it expires (Go's oauth2 uses the same 10 s)
_MAX_CACHED = 4096


class TokenFailure(OSError):
    """The token could not be had: the probe fails with `kind` and the one-line `detail`."""

    def __init__(self, kind: ErrorKind, detail: str):
        super().__init__(0, detail)
        self.kind = kind
        self.detail = detail


@dataclass(slots=True)
class _Token:
    header: str  # "Bearer abc"
    token: str
    expires_ns: int | None


class _Fetch:
    """One fetch in flight, shared by the probes that wait for it; `phase` says where it is (for a timeout)."""

    __slots__ = ("phase", "task", "timeline")

    def __init__(self) -> None:
        self.phase = "resolve"
        self.timeline = Timeline()
        self.task: asyncio.Task | None = None

    def current_phase(self) -> str:
        return self.timeline.phase() if self.timeline.hops else self.phase


_tokens: dict[tuple, _Token] = {}
_inflight: dict[tuple, _Fetch] = {}
_params_style: set[str] = set()  # token URLs that want the client's credentials in the form


def forget_tokens() -> None:
    """Drop every cached token (tests; a reload keeps them: same settings, same token)."""
    _tokens.clear()
    _params_style.clear()


def _shown_url(oauth: OAuth2Spec) -> str:
    return oauth.token_url


async def authorization(attempt: Attempt, oauth: OAuth2Spec, on_local_port: PortCallback, ssl_context,
                        deadline_ns: int) -> str:
    """The `Authorization` header value for this probe: a cached token, or one fetched now (see the module's
    docstring). Raises `TokenFailure`; a timeout of the probe while waiting is `TimeoutError` as for any step
    (`timeout_failure` names it)."""
    key = (oauth.client_id, oauth.client_secret.get_secret_value(), oauth.token_url, oauth.scopes,
           tuple(sorted(oauth.endpoint_params.items())), oauth.tls, attempt.source.label)
    cached = _tokens.get(key)
    if cached is not None and (cached.expires_ns is None or monotonic_ns() < cached.expires_ns):
        learn(attempt.prep.redactor, cached.token)
        return cached.header
    loop = asyncio.get_running_loop()
    fetch = _inflight.get(key)
    mine = fetch is None or fetch.task is None or fetch.task.get_loop() is not loop or fetch.task.done()
    if mine:
        fetch = _Fetch()
        fetch.task = loop.create_task(_fetch(attempt, oauth, on_local_port, ssl_context, deadline_ns, fetch))
        fetch.task.add_done_callback(_settled(key, fetch))
        _inflight[key] = fetch
    assert fetch is not None and fetch.task is not None
    attempt.oauth2_fetch = fetch  # for `timeout_failure`
    try:
        token = await asyncio.shield(fetch.task)
    except TokenFailure as exc:
        if mine:
            raise
        raise TokenFailure(exc.kind, f"{exc.detail} (the fetch of a probe of the same module)") from None
    learn(attempt.prep.redactor, token.token)
    return token.header


def _settled(key: tuple, fetch: _Fetch):
    def done(task: asyncio.Task) -> None:
        if _inflight.get(key) is fetch:
            del _inflight[key]
        if task.cancelled():
            return
        exc = task.exception()  # retrieved: nobody may be waiting any more
        if exc is None:
            if len(_tokens) >= _MAX_CACHED:
                _tokens.clear()
            _tokens[key] = task.result()

    return done


def timeout_failure(attempt: Attempt) -> tuple[ErrorKind, str] | None:
    """(kind, detail) when the probe's deadline came while it waited for its token, else None."""
    fetch = getattr(attempt, "oauth2_fetch", None)
    if fetch is None or fetch.task is None:
        return None
    task = fetch.task
    if task.done() and not task.cancelled() and task.exception() is None:
        return None  # the token was had: the deadline came later, in the target's own phases
    oauth = attempt.spec.module.http.oauth2
    phase = fetch.current_phase()
    kind, _ = classify(TimeoutError(), phase)
    return kind, f"oauth2 token endpoint {_shown_url(oauth)}: no token within the probe's timeout (in {phase})"


async def _fetch(attempt: Attempt, oauth: OAuth2Spec, on_local_port: PortCallback, ssl_context, deadline_ns: int,
                 fetch: _Fetch) -> _Token:
    """Fetch a token within the probe's deadline (the task outlives a waiter only up to it)."""
    where = f"oauth2 token endpoint {_shown_url(oauth)}"
    try:
        async with asyncio.timeout(max(0.0, (deadline_ns - monotonic_ns()) / 1e9)):
            styles = ("params",) if oauth.token_url in _params_style else ("header", "params")
            for i, style in enumerate(styles):
                status, headers, body = await _request(attempt, oauth, on_local_port, ssl_context, deadline_ns,
                                                       fetch, style)
                if status in (400, 401) and i + 1 < len(styles):
                    continue  # Go's client then tries the credentials in the form
                if 200 <= status <= 299 and style == "params":
                    _params_style.add(oauth.token_url)
                return _token(where, status, headers, body)
    except TokenFailure:
        raise
    except TimeoutError:
        kind, _ = classify(TimeoutError(), fetch.current_phase())
        raise TokenFailure(kind, f"{where}: no token within the probe's timeout (in {fetch.current_phase()})") \
            from None
    except Exception as exc:
        kind, detail = classify(exc, fetch.current_phase())
        raise TokenFailure(kind, f"{where}: {detail}") from None
    raise AssertionError("unreachable")


class _TLSOf:
    """What `http1_client.send` reads of a spec: its TLS settings (the token endpoint's)."""

    __slots__ = ("tls",)

    def __init__(self, tls: TLSSpec) -> None:
        self.tls = tls


async def _request(attempt: Attempt, oauth: OAuth2Spec, on_local_port: PortCallback, ssl_context,
                   deadline_ns: int, fetch: _Fetch, style: str) -> tuple[int, object, bytes]:
    secret = oauth.client_secret.get_secret_value()
    form = {"grant_type": "client_credentials"}
    if oauth.scopes:
        form["scope"] = " ".join(oauth.scopes)
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    if style == "header":
        headers["Authorization"] = "Basic " + basic_credentials(oauth.client_id, secret)
    else:
        form["client_id"] = oauth.client_id
        form["client_secret"] = secret
    form.update(oauth.endpoint_params)
    body = urllib.parse.urlencode(form).encode()
    url = yarl.URL(oauth.token_url, encoded=False)

    async def lookup(_attempt: Attempt, host: str) -> str:
        fetch.phase = "resolve"
        res = await resolve(attempt.source, host, attempt.spec.module.ip_policy, deadline_ns, on_local_port,
                            attempt.resolv_conf())
        attempt.dns.extend(res.transactions)
        if res.error is not None or not res.addresses:
            raise TokenFailure(res.error or ErrorKind.DNS_NO_ANSWER,
                               f"oauth2 token endpoint {_shown_url(oauth)}: {res.detail or 'no address'}")
        fetch.phase = "connect"
        return res.addresses[0]

    async def open_connected(_attempt: Attempt, family: int, addr: tuple, _timeline: Timeline):
        hop = fetch.timeline.hop()
        return await attempt.connect_tcp(on_local_port, family, addr, hop), hop

    resp = await http1_client.send(attempt, _TLSOf(oauth.tls), "POST", url, headers, body, None, lookup=lookup,
                                   open_connected=open_connected, ssl_context=ssl_context)
    try:
        data = bytearray()
        async for chunk in resp.chunks():
            data += chunk
            if len(data) > MAX_ANSWER_BYTES:
                raise TokenFailure(ErrorKind.PROTOCOL_ERROR, f"oauth2 token endpoint {_shown_url(oauth)}: answer "
                                                             f"larger than {MAX_ANSWER_BYTES} bytes")
        return resp.status, resp.headers, bytes(data)
    finally:
        fetch.timeline.reset_on_close()  # a token answer read (or given up on): nothing more is wanted
        await resp.aclose()
        if fetch.timeline.hops and not fetch.timeline.hops[-1].end:
            fetch.timeline.hops[-1].end = monotonic_ns()


def _fields(headers, body: bytes) -> dict | None:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not _is_json(headers):  # a form answer (application/x-www-form-urlencoded, text/plain): Go reads these too
        try:
            return dict(urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=False,
                                               max_num_fields=64))
        except ValueError:
            return None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _printable(value: object, limit: int = 80) -> str:
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _token(where: str, status: int, headers, body: bytes) -> _Token:
    doc = _fields(headers, body)
    if not 200 <= status <= 299:
        why = ""
        if doc is not None and isinstance(doc.get("error"), str):
            why = f" (error: {_printable(doc['error'])})"
        raise TokenFailure(ErrorKind.HTTP_STATUS, f"{where}: status {status}{why}")
    if doc is None:
        raise TokenFailure(ErrorKind.PROTOCOL_ERROR, f"{where}: the answer is not a JSON object")
    token = doc.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenFailure(ErrorKind.PROTOCOL_ERROR, f"{where}: the answer has no access_token")
    if len(token) > MAX_TOKEN_CHARS or not all(" " <= c <= "~" for c in token):
        raise TokenFailure(ErrorKind.PROTOCOL_ERROR, f"{where}: the access_token is not a token (longer than "
                                                     f"{MAX_TOKEN_CHARS} characters, or not printable ASCII)")
    kind = doc.get("token_type") or "Bearer"
    if not isinstance(kind, str) or not kind.isascii() or not kind.replace("-", "").replace("_", "").replace(
            ".", "").isalnum():
        raise TokenFailure(ErrorKind.PROTOCOL_ERROR, f"{where}: token_type {_printable(kind, 40)!r} is not an "
                                                     "authorization scheme")
    kind = {"bearer": "Bearer", "mac": "MAC", "basic": "Basic"}.get(kind.lower(), kind)  # as Go's Token.Type()
    return _Token(f"{kind} {token}", token, _expiry(where, doc.get("expires_in"), _is_json(headers)))


def _is_json(headers) -> bool:
    """Whether the answer was read as JSON (`_fields`): else a form, whose values are all text."""
    ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    return ctype not in ("application/x-www-form-urlencoded", "text/plain")


_SECONDS = re.compile(r"\s*-?[0-9]{1,12}\s*")


def _expiry(where: str, expires: object, from_json: bool) -> int | None:
    """When a token with this `expires_in` is fetched anew (monotonic ns; None: kept until the config is reloaded),
    as Go's client reads it: absent, null or 0: kept; negative: expired already (the next probe fetches again);
    a number of seconds (or a JSON string holding one) is capped at 2^31-1 s. In a JSON answer anything else
    (text, an object, an infinite number) is not a token answer; a form's unreadable value is 0 (Go
    ignores it there)."""
    if expires is None:
        return None
    secs: float | None = None
    if (isinstance(expires, int) and not isinstance(expires, bool)) or (
            isinstance(expires, float) and math.isfinite(expires)):
        secs = expires
    elif isinstance(expires, str) and _SECONDS.fullmatch(expires):
        secs = int(expires)
    if secs is None:
        if not from_json:
            return None
        raise TokenFailure(ErrorKind.PROTOCOL_ERROR, f"{where}: expires_in {_printable(expires, 40)!r} is not a "
                                                     "number of seconds")
    if secs == 0:
        return None
    now = monotonic_ns()
    if secs < 0:
        return now
    return now + int(max(0.0, min(secs, 2 ** 31 - 1) - EXPIRY_MARGIN_S) * 1e9)
