"""What a probe is asked to do: frozen, validated settings objects (pydantic), built once from config.

`connprobe/config.py` reads YAML into these; probers only ever see these objects, never loose dicts.
Header values are `SecretStr`: they never show in a repr, a result, a log line or a label.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator, model_validator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "250ms", "5s", "1m"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 5s or 250ms")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNIT[m.group(2)]
    raise ValueError(f"expected a duration like 5s or 250ms, got {value!r}")


Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_regexes(values: tuple[str, ...]) -> tuple[str, ...]:
    for pattern in values:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
    return values


class TLSSpec(Frozen):
    insecure_skip_verify: bool = False
    server_name: str | None = None  # SNI and the name the certificate must match
    ca_file: str | None = None
    min_cert_days: float | None = Field(default=None, gt=0)  # fail when the cert expires sooner

    @model_validator(mode="after")
    def _expiry_needs_verify(self) -> TLSSpec:
        if self.min_cert_days is not None and self.insecure_skip_verify:
            raise ValueError("min_cert_days needs certificate verification (insecure_skip_verify is true)")
        return self


class HeaderMatch(Frozen):
    header: str
    regexp: str
    allow_missing: bool = False

    @field_validator("regexp")
    @classmethod
    def _re(cls, v: str) -> str:
        return _check_regexes((v,))[0]


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
    max_body_bytes: int | None = Field(default=None, ge=0)
    capture_headers: tuple[str, ...] = ()  # response headers copied into the result (e.g. X-Request-Id)
    tls: TLSSpec = TLSSpec()

    @field_validator("fail_if_body_matches_regexp", "fail_if_body_not_matches_regexp")
    @classmethod
    def _re(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _check_regexes(v)

    @field_validator("headers")
    @classmethod
    def _no_header_injection(cls, v: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, value in v.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"invalid header name {name!r}")
            if re.search(r"[\r\n\x00]", value.get_secret_value()):
                raise ValueError(f"header {name!r}: value contains a line break")
        return v

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
        return tuple(s.get_secret_value() for s in self.headers.values() if len(s.get_secret_value()) >= 4)


class TCPSpec(Frozen):
    send: str | None = None
    expect: str | None = None  # regex the first bytes read must match
    tls: bool = False
    tls_config: TLSSpec = TLSSpec()

    @field_validator("expect")
    @classmethod
    def _re(cls, v: str | None) -> str | None:
        return v if v is None else _check_regexes((v,))[0]


_RCODES = {
    "NOERROR",
    "FORMERR",
    "SERVFAIL",
    "NXDOMAIN",
    "NOTIMP",
    "REFUSED",
    "YXDOMAIN",
    "YXRRSET",
    "NXRRSET",
    "NOTAUTH",
    "NOTZONE",
}
_QTYPES = {"A", "AAAA", "CNAME", "MX", "NS", "PTR", "SOA", "SRV", "TXT", "CAA", "ANY", "HTTPS", "SVCB"}


class DNSSpec(Frozen):
    query_name: str
    query_type: str = "A"
    transport: Literal["udp", "tcp"] = "udp"
    recursion_desired: bool = True
    valid_rcodes: tuple[str, ...] = ("NOERROR",)
    fail_if_no_answer: bool = False
    fail_if_answer_not_matches_regexp: tuple[str, ...] = ()

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
            if r not in _RCODES:
                raise ValueError(f"unknown rcode {r!r}")
        return out

    @field_validator("fail_if_answer_not_matches_regexp")
    @classmethod
    def _re(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _check_regexes(v)


ProberName = Literal["http", "tcp", "dns"]


class ModuleSpec(Frozen):
    """A reusable way of probing (blackbox_exporter's `modules:`)."""

    prober: ProberName
    timeout: Duration = 5.0
    budget: Duration | None = None  # latency budget: a slower probe gets a verdict even when it succeeded
    ip_policy: Literal["all", "first", "ipv4", "ipv6"] = "first"
    http: HTTPSpec | None = None
    tcp: TCPSpec | None = None
    dns: DNSSpec | None = None
    # the agent's /probe only (where the caller picks the target): the targets this module may be pointed at
    # when it carries secrets (http.headers), and the link-local/metadata addresses it may reach; hostnames
    # (wildcards: *.example.com) or addresses/CIDRs (10.0.0.0/8)
    allowed_targets: tuple[str, ...] = ()

    @field_validator("allowed_targets")
    @classmethod
    def _allowed_targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        import ipaddress

        for entry in v:
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
        for section in ("http", "tcp", "dns"):
            if section != self.prober and getattr(self, section) is not None:
                raise ValueError(f"{section}: section given but prober is {self.prober!r}")
        if self.prober == "dns" and self.dns is None:
            raise ValueError("dns: required for prober dns (at least query_name)")
        if self.prober == "http" and self.http is None:
            object.__setattr__(self, "http", HTTPSpec())
        if self.prober == "tcp" and self.tcp is None:
            object.__setattr__(self, "tcp", TCPSpec())
        return self


class ProbeSpec(Frozen):
    """One scheduled probe: a module applied to a target from a source."""

    name: str = Field(min_length=1)
    module: ModuleSpec
    target: str = Field(min_length=1)
    source: str = "host"
    interval: Duration = 15.0
    timeout: Duration | None = None  # default: the module's
    budget: Duration | None = None  # default: the module's
    jitter: float = Field(default=0.1, ge=0, le=1)  # fraction of the interval, +/- on each wait
    labels: dict[str, str] = Field(default_factory=dict)

    @property
    def effective_timeout(self) -> float:
        return self.timeout if self.timeout is not None else self.module.timeout

    @property
    def effective_budget(self) -> float | None:
        return self.budget if self.budget is not None else self.module.budget

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        v = v.strip()
        if v == "host" or v.startswith("/"):
            return v
        if re.fullmatch(r"netns [A-Za-z0-9_.-]+", v):
            return v
        raise ValueError(f"must be 'host', 'netns NAME' or an absolute path to a namespace, got {v!r}")

    @model_validator(mode="after")
    def _target_fits_prober(self) -> ProbeSpec:
        from prober.core import parse_target

        try:
            parse_target(self.module.prober, self.target)
        except ValueError as exc:
            raise ValueError(f"target: {exc}") from None
        return self

    @model_validator(mode="after")
    def _timeout_fits(self) -> ProbeSpec:
        if self.effective_timeout > self.interval:
            raise ValueError(f"timeout: {self.effective_timeout:g}s is longer than interval {self.interval:g}s")
        return self
