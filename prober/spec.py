"""What a probe is asked to do: frozen, validated settings objects (pydantic), built once from config.

`connprobe/config.py` reads YAML into these; probers only ever see these objects, never loose dicts.
Header values are `SecretStr`: they never show in a repr, a result, a log line or a label.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from typing import Annotated, Literal

import dns.exception
import dns.name
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from prober.source import SourceSpec, parse_source
from prober.target import parse_target
from prober.types import DNS_RCODES

# "5s", "250ms", "1.5m", "2h" (one unit, a decimal number), or Prometheus' compound form "1m30s",
# "1h2m3s4ms" (whole numbers, units in this order). Digits are bounded: a duration is never a 400-digit number.
_SIMPLE = re.compile(r"(\d{1,9}(?:\.\d{1,9})?)(ms|s|m|h|d)?")
_COMPOUND = re.compile(r"(?:(\d{1,9})d)?(?:(\d{1,9})h)?(?:(\d{1,9})m)?(?:(\d{1,9})s)?(?:(\d{1,9})ms)?")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_COMPOUND_UNITS = (86400.0, 3600.0, 60.0, 1.0, 0.001)

MIN_DURATION = 0.001  # 1ms: below it a deadline or an interval means nothing to the scheduler
MAX_DURATION = 86400.0  # 24h: the longest interval
MAX_TIMEOUT = 600.0  # 10m: the longest probe timeout (and latency budget)
_DURATION_HINT = "expected a duration like 5s, 250ms or 1m30s"


def _shown(value: object, limit: int = 40) -> str:
    """repr of a config value, cut short (an error line stays one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_duration(seconds: float) -> str:
    """Seconds as Prometheus writes a duration: 250ms, 5s, 1m30s, 2h, 1s500ms (or 0.0001s below 1ms)."""
    ms = seconds * 1000
    if abs(ms - round(ms)) > 1e-6:
        return f"{seconds:.9f}".rstrip("0") + "s"  # what parse_duration reads back (9 decimals at most)
    left, out = round(ms), ""
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        n, left = divmod(left, size)
        if n:
            out += f"{n}{unit}"
    return out or "0s"


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "250ms", "5s", "1m", "1m30s"; finite, 0 or 1ms to 24h.

    Raises ValueError with a one-line message (never OverflowError or TypeError).
    """
    if isinstance(value, bool):
        raise ValueError(f"{_DURATION_HINT}, got {value!r}")
    if isinstance(value, int):
        if abs(value) > MAX_DURATION:
            digits = int(abs(value).bit_length() * 0.30103) + 1  # str() of a huge int costs (or raises)
            shown = _shown(value) if digits < 30 else f"a number of about {digits} digits"
            raise ValueError(f"must be at most {format_duration(MAX_DURATION)}, got {shown}")
        seconds = float(value)
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite duration, got {value!r}")
        seconds = value
    elif isinstance(value, str):
        text = value.strip()
        m = _SIMPLE.fullmatch(text)
        if m:
            seconds = float(m.group(1)) * _UNIT[m.group(2)]
        else:
            m = _COMPOUND.fullmatch(text) if text else None
            if m is None or not any(m.groups()):
                raise ValueError(f"{_DURATION_HINT}, got {_shown(value)}")
            seconds = sum(int(g) * size for g, size in zip(m.groups(), _COMPOUND_UNITS, strict=True) if g)
    else:
        raise ValueError(f"{_DURATION_HINT}, got {_shown(value)}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {_shown(value)}")
    if seconds > MAX_DURATION:
        raise ValueError(f"must be at most {format_duration(MAX_DURATION)}, got {_shown(value)}")
    if 0 < seconds < MIN_DURATION:
        raise ValueError(f"must be at least {format_duration(MIN_DURATION)}, got {_shown(value)}")
    return seconds


def _at_most(limit: float):
    def check(seconds: float) -> float:
        if seconds > limit:
            raise ValueError(f"must be at most {format_duration(limit)}, got {format_duration(seconds)}")
        return seconds

    return AfterValidator(check)


Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
TimeoutDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0), _at_most(MAX_TIMEOUT)]


# -- DNS names ---------------------------------------------------------------------------------------------

_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def host_name_error(host: str) -> str | None:
    """Why `host` is neither an IP address nor a valid DNS host name (labels of letters, digits, '-', '_'),
    or None when it is one. Checked once at load, so a probe never fails at run time on its own name."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return None
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if not name:
        return f"{_shown(host, 100)} is not a host name"
    if not name.isascii():
        return f"{_shown(host, 100)}: non-ASCII name (write its xn-- form)"
    if len(name) > 253:
        return f"{_shown(host, 100)}: name longer than 253 characters"
    for i, label in enumerate(name.split("."), 1):
        if not label:
            return f"{_shown(host, 100)}: label {i} is empty"
        if len(label) > 63:
            return f"{_shown(host, 100)}: label {i} is {len(label)} characters long (at most 63)"
        if not _HOST_LABEL.fullmatch(label):
            return (f"{_shown(host, 100)}: label {i} may hold only letters, digits, '-' and '_' "
                    "and may not start or end with '-'")
    return None


def query_name_error(name: str) -> str | None:
    """Why `name` cannot be asked in a DNS question (what dnspython would raise at run time), or None."""
    if not name or any(c.isspace() or not c.isprintable() for c in name):
        return f"{_shown(name)} is not a DNS name"
    if not name.isascii():
        return f"{_shown(name)}: non-ASCII name (write its xn-- form)"
    try:
        dns.name.from_text(name)
    except dns.name.EmptyLabel:
        return f"{_shown(name)}: a label is empty"
    except dns.name.LabelTooLong:
        return f"{_shown(name)}: a label is longer than 63 characters"
    except dns.name.NameTooLong:
        return f"{_shown(name)}: name longer than 255 bytes"
    except dns.exception.DNSException as exc:
        return f"{_shown(name)}: {exc}"
    return None


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)  # no value is ever .inf or .nan


def _checked_headers(v: dict[str, SecretStr]) -> dict[str, SecretStr]:
    """Header names as RFC 9110 tokens, values without a line break or NUL (no header injection)."""
    for name, value in v.items():
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise ValueError(f"invalid header name {name!r}")
        if re.search(r"[\r\n\x00]", value.get_secret_value()):
            raise ValueError(f"header {name!r}: value contains a line break")
    return v


def _check_regexes(values: tuple[str, ...]) -> tuple[str, ...]:
    for pattern in values:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
    return values


TLS_VERSIONS = ("TLS10", "TLS11", "TLS12", "TLS13")  # blackbox's (Go's) names, oldest first
TLSVersion = Literal["TLS10", "TLS11", "TLS12", "TLS13"]


class TLSSpec(Frozen):
    insecure_skip_verify: bool = False
    server_name: str | None = None  # SNI and the name the certificate must match
    ca_file: str | None = None
    cert_file: str | None = None  # client certificate (PEM), presented when the server asks
    key_file: str | None = None  # its private key (PEM; default: in cert_file)
    # the same as inline PEM text (blackbox's ca, cert, key): each at most one of it and its *_file form
    ca: str | None = None
    cert: str | None = None
    key: SecretStr | None = None
    min_cert_days: float | None = Field(default=None, gt=0, le=36500)  # fail when the cert expires sooner
    # the TLS versions the client offers (blackbox's spelling); unset: what the system's OpenSSL allows
    min_version: TLSVersion | None = None
    max_version: TLSVersion | None = None

    @field_validator("server_name")
    @classmethod
    def _server_name(cls, v: str | None) -> str | None:
        if v is not None and (err := host_name_error(v)):
            raise ValueError(err)
        return v

    @model_validator(mode="after")
    def _expiry_needs_verify(self) -> TLSSpec:
        if self.min_cert_days is not None and self.insecure_skip_verify:
            raise ValueError("min_cert_days needs certificate verification (insecure_skip_verify is true)")
        for inline, file in (("ca", "ca_file"), ("cert", "cert_file"), ("key", "key_file")):
            if getattr(self, inline) is not None and getattr(self, file) is not None:
                raise ValueError(f"at most one of {inline} and {file}")
        if (self.key_file is not None or self.key is not None) and self.cert_file is None and self.cert is None:
            raise ValueError(f"{'key_file' if self.key_file is not None else 'key'} needs cert_file or cert")
        self._check_inline_pem()
        if self.min_version and self.max_version and TLS_VERSIONS.index(self.min_version) > TLS_VERSIONS.index(
                self.max_version):
            raise ValueError(f"min_version {self.min_version} is above max_version {self.max_version}")
        return self


    def _check_inline_pem(self) -> None:
        """Inline PEM that does not load is a config error (not a failure at every probe)."""
        import ssl

        from prober.tlsinfo import EncryptedKey, load_client_chain

        if self.ca is not None:
            try:
                ssl.create_default_context(cadata=self.ca)
            except (ssl.SSLError, ValueError):
                raise ValueError("ca: not PEM certificates") from None
        if self.cert is not None or self.key is not None:
            import os.path

            if self.cert_file is not None and not os.path.isfile(self.cert_file):
                return  # read when a probe needs it (check-config away from the mounted files)
            if self.key_file is not None and not os.path.isfile(self.key_file):
                return
            try:
                load_client_chain(ssl.create_default_context(), self)
            except EncryptedKey as exc:
                raise ValueError(f"{'key' if self.key is not None else 'key_file'}: {exc}") from None
            except (ssl.SSLError, ValueError):
                which = "cert" if self.cert is not None else "key"
                raise ValueError(f"{which}: cannot load the client certificate and key: not PEM, or the key does "
                                 "not match the certificate") from None
            except OSError as exc:
                raise ValueError(f"cannot load the client certificate and key: {exc.strerror or exc}") from None


class HeaderMatch(Frozen):
    header: str
    regexp: str
    allow_missing: bool = False

    @field_validator("regexp")
    @classmethod
    def _re(cls, v: str) -> str:
        return _check_regexes((v,))[0]


def _source_ip(v: str | None) -> str | None:
    if v is not None:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"{_shown(v)} is not an IP address") from None
    return v


def _check_http_url(v: str, what: str) -> str:
    """An http:// or https:// URL with a valid host (a token endpoint): one-line errors."""
    from urllib.parse import urlsplit

    from prober.redact import redact_url

    try:
        u = urlsplit(v)
        u.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        raise ValueError(f"{_shown(redact_url(v))} is not a URL: {exc}") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"{what}: {_shown(redact_url(v))} is not an http:// or https:// URL")
    if u.username is not None or u.password is not None:
        raise ValueError(f"{what}: credentials in the URL are not supported (use client_id and client_secret)")
    if u.fragment:
        raise ValueError(f"{what}: a URL with a #fragment is not a token endpoint")
    if any(c.isspace() or not c.isprintable() for c in v):
        raise ValueError(f"{what}: {_shown(redact_url(v))} holds a space or a control character")
    if err := host_name_error(u.hostname):
        raise ValueError(f"{what}: {err}")
    return v


class OAuth2Spec(Frozen):
    """OAuth 2.0 client credentials (blackbox's `http.oauth2`): a token is fetched from `token_url` (`prober.oauth2`)
    and sent as `Authorization: <token_type> <access_token>` on the probe's request."""

    client_id: str = Field(min_length=1, max_length=4096)
    client_secret: SecretStr  # a `client_secret_file` is read at load (`connprobe.blackbox`)
    token_url: str
    scopes: tuple[str, ...] = ()  # sent space-joined as `scope`
    endpoint_params: dict[str, str] = Field(default_factory=dict)  # extra form fields of the token request
    tls: TLSSpec = TLSSpec()  # for an https token_url (blackbox's oauth2.tls_config)

    @field_validator("token_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_http_url(v, "token_url")

    @field_validator("tls")
    @classmethod
    def _tls(cls, v: TLSSpec) -> TLSSpec:
        if v.min_cert_days is not None:  # the token endpoint's certificate is not the probe's subject
            raise ValueError("tls.min_cert_days: not supported for the token endpoint (only for the target)")
        return v

    @field_validator("client_id")
    @classmethod
    def _id(cls, v: str) -> str:
        if re.search(r"[\r\n\x00]", v):
            raise ValueError("client_id: contains a line break")
        return v

    @field_validator("client_secret")
    @classmethod
    def _secret(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value():
            raise ValueError("client_secret: must not be empty")
        return v

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for scope in v:
            if not scope or any(c.isspace() or not c.isprintable() for c in scope):
                raise ValueError(f"scope {_shown(scope)}: a scope is one word of printable characters")
        return v

    @field_validator("endpoint_params")
    @classmethod
    def _params(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not name or not name.isprintable():
                raise ValueError(f"endpoint_params: {_shown(name)} is not a parameter name")
        return v

    def secrets(self) -> tuple[str, ...]:
        """The client secret and what the token request carries of it: the HTTP Basic credentials made of it, and
        the secret form-encoded (as it is in the request's form, which an endpoint's error text may quote)."""
        from urllib.parse import quote_plus

        secret = self.client_secret.get_secret_value()
        encoded = quote_plus(secret, safe="")
        return (secret, oauth2_basic_credentials(self.client_id, secret), *((encoded,) if encoded != secret else ()))


def oauth2_basic_credentials(client_id: str, secret: str) -> str:
    """The base64 of the Basic credentials of a token request (RFC 6749 2.3.1: each part form-encoded first, as
    Go's oauth2 package does); `prober.oauth2` sends them, the redactor hides them."""
    from urllib.parse import quote_plus

    return base64.b64encode(f"{quote_plus(client_id, safe='')}:{quote_plus(secret, safe='')}".encode()).decode()


def check_proxy_url(v: str) -> str:
    """An http://HOST[:PORT] proxy, normalised to carry its port (errors show it without its userinfo: a proxy
    password stays out of them)."""
    from urllib.parse import urlsplit

    from prober.redact import redact_url

    try:
        u = urlsplit(v)
        port = u.port
    except ValueError as exc:
        raise ValueError(f"{_shown(redact_url(v))} is not a URL: {exc}") from None
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"{_shown(redact_url(v))}: only http://HOST:PORT proxies are supported")
    if u.username is not None or u.password is not None:
        raise ValueError("credentials in proxy_url are not supported")
    if u.path not in ("", "/") or u.query or u.fragment:
        raise ValueError(f"{_shown(redact_url(v))}: a proxy URL has no path, query or fragment")
    if err := host_name_error(u.hostname):
        raise ValueError(err)
    return f"http://{u.netloc}" if port else f"http://{u.netloc}:80"


HTTP_VERSIONS = ("HTTP/1.0", "HTTP/1.1", "HTTP/2.0")


class HTTPSpec(Frozen):
    # aiohttp: aiohttp's parser on the prober's own connection (fastest); aiohttp-session: a full
    # aiohttp.ClientSession; httpx: httpx over an httpcore backend using the prober's sockets
    client: Literal["aiohttp", "aiohttp-session", "httpx"] = "aiohttp"
    method: str = "GET"
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    body: str | None = None
    valid_status_codes: tuple[int, ...] = ()  # empty: any 2xx
    follow_redirects: bool = True
    max_redirects: int = Field(default=10, ge=0)
    fail_if_ssl: bool = False
    fail_if_not_ssl: bool = False
    fail_if_body_matches_regexp: tuple[str, ...] = ()
    fail_if_body_not_matches_regexp: tuple[str, ...] = ()
    fail_if_header_matches: tuple[HeaderMatch, ...] = ()
    fail_if_header_not_matches: tuple[HeaderMatch, ...] = ()
    max_body_bytes: int | None = Field(default=None, ge=0)  # unset: 10 MiB with a body regexp, else no cap
    max_decompressed_bytes: int = Field(default=32 * 2**20, ge=1)  # a compressed body inflated (gzip bombs)
    capture_headers: tuple[str, ...] = ()  # response headers copied into the result (e.g. X-Request-Id)
    tls: TLSSpec = TLSSpec()
    preferred_ip_protocol: Literal["ip4", "ip6"] | None = None  # blackbox's key; unset: the resolver's order
    ip_protocol_fallback: bool = True
    valid_http_versions: tuple[str, ...] = ()  # e.g. ["HTTP/1.1"]; empty: any
    # the coding asked for (Accept-Encoding) and required of the answer (Content-Encoding); the body is decoded
    compression: Literal["gzip", "deflate", "identity"] | None = None
    # the Accept-Encoding sent when no header sets it: unset, the client's "gzip, deflate" (or `compression`);
    # a blackbox file gets "identity", as blackbox_exporter asks for no coding
    accept_encoding: Literal["identity", "gzip", "deflate", "gzip, deflate"] | None = None
    source_ip_address: str | None = None  # the local address the probe's connections are bound to
    # an http:// proxy: plain requests go to it in absolute form, https ones through a CONNECT tunnel (httpx)
    proxy_url: str | None = None
    http2: bool = False  # offer h2 by ALPN on https targets (httpx; blackbox's enable_http2)
    proxy_headers: dict[str, SecretStr] = Field(default_factory=dict)  # sent to the proxy (CONNECT), secrets
    oauth2: OAuth2Spec | None = None  # client credentials: a token fetched and sent as Authorization
    # a proxy per target scheme (instead of proxy_url; `proxy_from_environment` fills it at load) and the targets
    # that bypass the proxy: which request goes where is decided in `prober.proxy`
    proxy_urls: dict[Literal["http", "https"], str] = Field(default_factory=dict)
    no_proxy: tuple[str, ...] = ()

    _source = field_validator("source_ip_address")(classmethod(lambda cls, v: _source_ip(v)))

    @field_validator("proxy_url")
    @classmethod
    def _proxy(cls, v: str | None) -> str | None:
        return None if v is None else check_proxy_url(v)

    @field_validator("proxy_urls")
    @classmethod
    def _proxies(cls, v: dict[str, str]) -> dict[str, str]:
        return {scheme: check_proxy_url(url) for scheme, url in v.items()}

    @field_validator("no_proxy", mode="before")
    @classmethod
    def _no_proxy_list(cls, v: object) -> tuple[str, ...]:
        from prober.proxy import split_no_proxy

        return split_no_proxy(v)

    @field_validator("no_proxy")
    @classmethod
    def _no_proxy(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from prober.proxy import check_no_proxy

        return check_no_proxy(v)

    @model_validator(mode="after")
    def _proxy_client(self) -> HTTPSpec:
        if self.proxy_url is not None and self.client != "httpx":
            raise ValueError(f"proxy_url: needs client: httpx (the {self.client} client does not use proxies)")
        if self.proxy_urls and self.client != "httpx":
            raise ValueError(f"proxy_urls: needs client: httpx (the {self.client} client does not use proxies)")
        if self.proxy_urls and self.proxy_url is not None:
            raise ValueError("proxy_urls: give proxy_url (every target) or proxy_urls (per scheme), not both")
        if self.proxy_headers and self.proxy_url is None and not self.proxy_urls:
            raise ValueError("proxy_headers: needs proxy_url")
        if self.no_proxy and self.proxy_url is None and not self.proxy_urls:
            raise ValueError("no_proxy: needs proxy_url")
        if self.http2 and self.client != "httpx":
            raise ValueError(f"http2: needs client: httpx (the {self.client} client speaks HTTP/1.1)")
        if self.oauth2 is not None and any(k.lower() == "authorization" for k in self.headers):
            raise ValueError("oauth2: an Authorization header is also configured (the token is sent as one)")
        return self

    @field_validator("valid_http_versions")
    @classmethod
    def _versions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for version in v:
            if version not in HTTP_VERSIONS:
                raise ValueError(f"unknown HTTP version {_shown(version)} (one of {', '.join(HTTP_VERSIONS)})")
        return v

    @model_validator(mode="after")
    def _accept_encoding(self) -> HTTPSpec:
        if self.compression is None:
            return self
        asked = [v.get_secret_value() for k, v in self.headers.items() if k.lower() == "accept-encoding"]
        codings = [[c.split(";")[0].strip().lower() for c in a.split(",")] for a in asked]
        if asked and not any(self.compression in offered for offered in codings):
            raise ValueError(f"compression: {self.compression} is not in the configured Accept-Encoding header")
        return self

    @field_validator("fail_if_body_matches_regexp", "fail_if_body_not_matches_regexp")
    @classmethod
    def _re(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _check_regexes(v)

    @field_validator("headers", "proxy_headers")
    @classmethod
    def _no_header_injection(cls, v: dict[str, SecretStr]) -> dict[str, SecretStr]:
        return _checked_headers(v)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z]+", v):
            raise ValueError(f"invalid HTTP method {v!r}")
        return v.upper()

    @field_validator("valid_status_codes")
    @classmethod
    def _codes(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        for code in v:
            if not 100 <= code <= 599:
                raise ValueError(f"status code {code} is outside 100-599")
        return v

    def secrets(self) -> tuple[str, ...]:
        """Every header value (and proxy header value), whatever its length (how outputs hide them:
        `prober.redact`)."""
        found = tuple(v for s in (*self.headers.values(), *self.proxy_headers.values())
                      if (v := s.get_secret_value()).strip())
        return found + (self.oauth2.secrets() if self.oauth2 is not None else ())


class QueryStep(Frozen):
    """One step of blackbox's `query_response`: send bytes, expect a regex, or start TLS (tcp-like probes)."""

    send: str | None = None
    expect: str | None = None  # regex the bytes read so far must match
    starttls: bool = False

    @field_validator("expect")
    @classmethod
    def _re(cls, v: str | None) -> str | None:
        return v if v is None else _check_regexes((v,))[0]

    @model_validator(mode="after")
    def _one_thing(self) -> QueryStep:
        if self.send is None and self.expect is None and not self.starttls:
            raise ValueError("a query_response step needs send, expect or starttls")
        return self


class TCPSpec(Frozen):
    send: str | None = None
    expect: str | None = None  # regex the first bytes read must match
    query_response: tuple[QueryStep, ...] = ()  # blackbox's conversation (instead of send/expect)
    tls: bool = False
    tls_config: TLSSpec = TLSSpec()
    preferred_ip_protocol: Literal["ip4", "ip6"] | None = None  # blackbox's key; unset: the resolver's order
    ip_protocol_fallback: bool = True
    source_ip_address: str | None = None  # the local address the connection is bound to

    _source = field_validator("source_ip_address")(classmethod(lambda cls, v: _source_ip(v)))

    @field_validator("expect")
    @classmethod
    def _re(cls, v: str | None) -> str | None:
        return v if v is None else _check_regexes((v,))[0]

    @model_validator(mode="after")
    def _one_conversation(self) -> TCPSpec:
        if self.query_response and (self.send is not None or self.expect is not None):
            raise ValueError("query_response: give either query_response or send/expect, not both")
        if (self.tls_config.min_cert_days is not None and not self.tls
                and not any(step.starttls for step in self.query_response)):
            raise ValueError("tls_config.min_cert_days: needs tls: true or a starttls step (a plain connection "
                             "has no certificate)")
        return self


_QTYPES = {"A", "AAAA", "CNAME", "MX", "NS", "PTR", "SOA", "SRV", "TXT", "CAA", "ANY", "HTTPS", "SVCB"}


class RRValidator(Frozen):
    """blackbox's validate_{answer,authority,additional}_rrs: regexes on each resource record of a section, in
    its text form `name<TAB>ttl<TAB>class<TAB>type<TAB>data`."""

    fail_if_matches_regexp: tuple[str, ...] = ()  # fail when any record matches any of them
    fail_if_all_match_regexp: tuple[str, ...] = ()  # fail when every record matches one of them (and there is one)
    fail_if_not_matches_regexp: tuple[str, ...] = ()  # fail when a record does not match one of them
    fail_if_none_matches_regexp: tuple[str, ...] = ()  # fail when no record matches one of them

    @field_validator("*")
    @classmethod
    def _re(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _check_regexes(v)

    def failed(self, records: tuple[str, ...] | list[str]) -> str | None:
        """The first matcher this section's records fail, or None."""
        for pattern in self.fail_if_matches_regexp:
            if any(re.search(pattern, r) for r in records):
                return "fail_if_matches_regexp"
        for pattern in self.fail_if_all_match_regexp:
            if records and all(re.search(pattern, r) for r in records):
                return "fail_if_all_match_regexp"
        for pattern in self.fail_if_not_matches_regexp:
            if any(not re.search(pattern, r) for r in records):
                return "fail_if_not_matches_regexp"
        for pattern in self.fail_if_none_matches_regexp:
            if not any(re.search(pattern, r) for r in records):
                return "fail_if_none_matches_regexp"
        return None


class DNSSpec(Frozen):
    query_name: str
    query_type: str = "A"
    # tls: DNS over TLS (RFC 7858; port 853 when the target names none), checked as `tls_config` says
    transport: Literal["udp", "tcp", "tls"] = "udp"
    tls_config: TLSSpec = TLSSpec()
    source_ip_address: str | None = None  # the local address the query's socket is bound to
    recursion_desired: bool = True
    valid_rcodes: tuple[str, ...] = ("NOERROR",)
    fail_if_no_answer: bool = False
    fail_if_answer_not_matches_regexp: tuple[str, ...] = ()
    validate_answer_rrs: RRValidator = RRValidator()
    validate_authority_rrs: RRValidator = RRValidator()
    validate_additional_rrs: RRValidator = RRValidator()
    preferred_ip_protocol: Literal["ip4", "ip6"] | None = None  # blackbox's key; unset: the resolver's order
    ip_protocol_fallback: bool = True

    _source = field_validator("source_ip_address")(classmethod(lambda cls, v: _source_ip(v)))

    @model_validator(mode="after")
    def _tls_config_needs_tls(self) -> DNSSpec:
        if "tls_config" in self.model_fields_set and self.transport != "tls":
            raise ValueError(f"tls_config: only used with transport: tls (DNS over TLS), transport is "
                             f"{self.transport}")
        if self.tls_config.min_cert_days is not None:
            raise ValueError("tls_config.min_cert_days: not supported for dns probes")
        return self

    @field_validator("query_name")
    @classmethod
    def _qname(cls, v: str) -> str:
        if err := query_name_error(v):
            raise ValueError(err)
        return v

    @field_validator("query_type")
    @classmethod
    def _qtype(cls, v: str) -> str:
        if v.upper() not in _QTYPES:
            raise ValueError(f"unknown query type {v!r} (one of {', '.join(sorted(_QTYPES))})")
        return v.upper()

    @field_validator("valid_rcodes")
    @classmethod
    def _rcodes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(r.upper() for r in v)
        for r in out:
            if r not in DNS_RCODES:
                raise ValueError(f"unknown rcode {r!r}")
        return out

    @field_validator("fail_if_answer_not_matches_regexp")
    @classmethod
    def _re(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _check_regexes(v)


class ICMPSpec(Frozen):
    """blackbox_exporter's `icmp:` module keys (an echo request, one reply awaited)."""

    preferred_ip_protocol: Literal["ip4", "ip6"] = "ip6"  # blackbox's default; a literal address decides itself
    ip_protocol_fallback: bool = True  # no address of the preferred family: use the other one
    source_ip_address: str | None = None  # bind the echo's socket to this local address
    payload_size: int = Field(default=0, ge=0, le=65000)  # bytes after the 8-byte ICMP header
    dont_fragment: bool = False  # IPv4 DF bit (IPv6: IPV6_DONTFRAG, no local fragmentation)
    ttl: int = Field(default=64, ge=1, le=255)  # IPv4 TTL / IPv6 hop limit of the request

    @field_validator("source_ip_address")
    @classmethod
    def _source_ip(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ipaddress.ip_address(v)
            except ValueError:
                raise ValueError(f"{_shown(v)} is not an IP address") from None
        return v


class GRPCSpec(Frozen):
    """blackbox_exporter's `grpc:` module keys (grpc.health.v1 Check)."""

    service: str = ""  # "" asks about the server as a whole
    preferred_ip_protocol: Literal["ip4", "ip6"] = "ip6"
    ip_protocol_fallback: bool = True
    tls: bool = False
    tls_config: TLSSpec = TLSSpec()

    @field_validator("tls_config")
    @classmethod
    def _verified(cls, v: TLSSpec) -> TLSSpec:
        if v.insecure_skip_verify:  # grpcio's TLS always verifies the peer
            raise ValueError("insecure_skip_verify is not possible with grpc (grpcio always verifies)")
        if v.min_version is not None or v.max_version is not None:  # grpcio's credentials take no TLS versions
            raise ValueError("min_version/max_version are not possible with grpc (grpcio's channel credentials "
                             "cannot limit TLS versions)")
        return v

    @model_validator(mode="after")
    def _cert_days_need_tls(self) -> GRPCSpec:
        if self.tls_config.min_cert_days is not None and not self.tls:
            raise ValueError("tls_config.min_cert_days: needs tls: true (a plain connection has no certificate)")
        return self


class WebSocketSpec(Frozen):
    """A WebSocket probe: the upgrade, then `query_response` over text messages (send/expect)."""

    headers: dict[str, SecretStr] = Field(default_factory=dict)
    query_response: tuple[QueryStep, ...] = ()
    tls_config: TLSSpec = TLSSpec()

    @field_validator("query_response")
    @classmethod
    def _no_starttls(cls, v: tuple[QueryStep, ...]) -> tuple[QueryStep, ...]:
        if any(step.starttls for step in v):
            raise ValueError("starttls is not possible in a WebSocket conversation (use a wss:// target)")
        return v

    @field_validator("tls_config")
    @classmethod
    def _no_cert_days(cls, v: TLSSpec) -> TLSSpec:
        if v.min_cert_days is not None:
            raise ValueError("min_cert_days: not supported for websocket probes (http, tcp and grpc have it)")
        return v

    @field_validator("headers")
    @classmethod
    def _no_header_injection(cls, v: dict[str, SecretStr]) -> dict[str, SecretStr]:
        return _checked_headers(v)

    def secrets(self) -> tuple[str, ...]:
        return tuple(v for s in self.headers.values() if (v := s.get_secret_value()).strip())


class UnixSpec(Frozen):
    """A Unix-socket probe: connect to a stream socket's path, then `query_response` (starttls too)."""

    query_response: tuple[QueryStep, ...] = ()
    tls_config: TLSSpec = TLSSpec()

    @field_validator("tls_config")
    @classmethod
    def _no_cert_days(cls, v: TLSSpec) -> TLSSpec:
        if v.min_cert_days is not None:
            raise ValueError("min_cert_days: not supported for unix probes (http, tcp and grpc have it)")
        return v


ProberName = Literal["http", "tcp", "dns", "icmp", "grpc", "websocket", "unix"]
# The phases a prober times (PhaseSpan names): http resolve..transfer, icmp setup/rtt, grpc check.
PhaseName = Literal["resolve", "connect", "tls", "processing", "transfer", "setup", "rtt", "check"]
SECTIONS = ("http", "tcp", "dns", "icmp", "grpc", "websocket", "unix")


class ModuleSpec(Frozen):
    """A reusable way of probing (blackbox_exporter's `modules:`)."""

    prober: ProberName
    timeout: TimeoutDuration = 5.0
    budget: TimeoutDuration | None = None  # latency budget: a slower probe gets a verdict even when it succeeded
    ip_policy: Literal["all", "first", "ipv4", "ipv6"] = "first"
    # the agent's /metrics: the phases that get a per-probe histogram (connprobe_probe_phase_duration_seconds,
    # 14 series each); none unless listed (the last probe's phases are always in probe_http_duration_seconds)
    phase_histograms: tuple[PhaseName, ...] = ()
    http: HTTPSpec | None = None
    tcp: TCPSpec | None = None
    dns: DNSSpec | None = None
    icmp: ICMPSpec | None = None
    grpc: GRPCSpec | None = None
    websocket: WebSocketSpec | None = None
    unix: UnixSpec | None = None
    # the agent's /probe only (where the caller picks the target): the targets this module may be pointed at
    # when it carries secrets (http.headers), and the link-local/metadata addresses it may reach; hostnames
    # (wildcards: *.example.com) or addresses/CIDRs (10.0.0.0/8); for a unix module, the socket paths it may
    # be pointed at (none listed: /probe refuses it)
    allowed_targets: tuple[str, ...] = ()

    @field_validator("allowed_targets")
    @classmethod
    def _allowed_targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        import ipaddress

        for entry in v:
            if entry.startswith("/"):  # a unix probe's socket path, named exactly
                continue
            try:
                ipaddress.ip_network(entry, strict=False)
                continue
            except ValueError:
                pass
            if not re.fullmatch(r"[A-Za-z0-9*_-]+(\.[A-Za-z0-9*_-]+)*\.?", entry):
                raise ValueError(f"{entry!r} is neither a hostname (wildcards allowed) nor an address or CIDR")
        return v

    @model_validator(mode="after")
    def _section_matches_prober(self) -> ModuleSpec:
        for section in SECTIONS:
            if section != self.prober and getattr(self, section) is not None:
                raise ValueError(f"{section}: section given but prober is {self.prober!r}")
        if self.prober == "dns" and self.dns is None:
            raise ValueError("dns: required for prober dns (at least query_name)")
        if self.prober == "http" and self.http is None:
            object.__setattr__(self, "http", HTTPSpec())
        if self.prober == "tcp" and self.tcp is None:
            object.__setattr__(self, "tcp", TCPSpec())
        defaults = {"icmp": ICMPSpec, "grpc": GRPCSpec, "websocket": WebSocketSpec, "unix": UnixSpec}
        if self.prober in defaults and getattr(self, self.prober) is None:
            object.__setattr__(self, self.prober, defaults[self.prober]())
        return self

    def preferred_family(self) -> tuple[str | None, bool]:
        """("ip4"|"ip6", fallback) of a kind that has blackbox's preferred_ip_protocol, else (None, True)."""
        section = getattr(self, self.prober)
        pref = getattr(section, "preferred_ip_protocol", None)
        return pref, getattr(section, "ip_protocol_fallback", True)


class ProbeSpec(Frozen):
    """One scheduled probe: a module applied to a target from a source."""

    name: str = Field(min_length=1)
    module: ModuleSpec
    target: str = Field(min_length=1)
    source: str = "host"
    interval: Duration = 15.0
    timeout: TimeoutDuration | None = None  # default: the module's
    budget: TimeoutDuration | None = None  # default: the module's
    jitter: float = Field(default=0.1, ge=0, le=1)  # fraction of the interval, +/- on each wait
    labels: dict[str, str] = Field(default_factory=dict)

    @property
    def effective_timeout(self) -> float:
        return self.timeout if self.timeout is not None else self.module.timeout

    @property
    def effective_budget(self) -> float | None:
        return self.budget if self.budget is not None else self.module.budget

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, v: object) -> str:
        return parse_source(v).text  # the canonical form: "host", "netns NAME" or "/proc/PID/ns/net"

    @property
    def source_spec(self) -> SourceSpec:
        return parse_source(self.source)

    @model_validator(mode="after")
    def _target_fits_prober(self) -> ProbeSpec:
        try:
            target = parse_target(self.module.prober, self.target)
        except ValueError as exc:
            raise ValueError(f"target: {exc}") from None
        if target.host and (err := host_name_error(target.host)):
            raise ValueError(f"target: {err}")
        return self

    @model_validator(mode="after")
    def _timeout_fits(self) -> ProbeSpec:
        if self.effective_timeout > self.interval:
            raise ValueError(f"timeout: {self.effective_timeout:g}s is longer than interval {self.interval:g}s")
        return self
