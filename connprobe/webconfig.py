"""`--web.config.file`: TLS, basic auth and response headers for the agent's HTTP server, in the YAML that
Prometheus' exporter-toolkit reads (one `web-config.yml` secures every exporter of a node):

    tls_server_config:
      cert_file: /etc/connprobe/tls.crt
      key_file: /etc/connprobe/tls.key
      client_auth_type: RequireAndVerifyClientCert   # NoClientCert (default), RequestClientCert,
      client_ca_file: /etc/connprobe/clients-ca.crt  #  RequireAnyClientCert, VerifyClientCertIfGiven
      min_version: TLS12                             # TLS10 .. TLS13 (default TLS12), max_version too
    basic_auth_users:
      prometheus: $2b$12$...                         # bcrypt hash (htpasswd -nBC 12 prometheus)
    http_server_config:
      headers:
        Strict-Transport-Security: max-age=31536000

`load_web_config(path)` returns a frozen `WebConfig` or raises `WebConfigError` (one line naming the key).
Differences from exporter-toolkit, each refused or documented rather than silently ignored: Python's TLS
cannot accept a client certificate without verifying it, so `RequireAnyClientCert` and `RequestClientCert`
verify against `client_ca_file` when it is given (`RequestClientCert` without one asks for nothing);
`cipher_suites`, `curve_preferences` and `client_allowed_sans` are refused as unsupported; `http2` is
accepted and has no effect (the agent speaks HTTP/1.1).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["CLIENT_AUTH_TYPES", "BasicAuth", "WebConfig", "WebConfigError", "load_web_config", "parse_web_config"]

CLIENT_AUTH_TYPES = ("NoClientCert", "RequestClientCert", "RequireAnyClientCert", "VerifyClientCertIfGiven",
                     "RequireAndVerifyClientCert")
TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# the headers exporter-toolkit lets a web config set (anything else could break the protocol)
ALLOWED_HEADERS = ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options", "X-XSS-Protection",
                   "Strict-Transport-Security")
_TOP = ("tls_server_config", "basic_auth_users", "http_server_config")
_TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version")
_TLS_UNSUPPORTED = ("cert", "key", "client_ca", "cipher_suites", "curve_preferences", "prefer_server_cipher_suites",
                    "client_allowed_sans")
_HTTP_KEYS = ("headers", "http2")


class WebConfigError(ValueError):
    """The web config file is invalid: one line naming the file and the key."""


@dataclass(frozen=True)
class TLSServerConfig:
    cert_file: str
    key_file: str
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    min_version: str = "TLS12"
    max_version: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """A server context from the files (read now: a reload picks up renewed certificates)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = TLS_VERSIONS[self.min_version]
        if self.max_version:
            ctx.maximum_version = TLS_VERSIONS[self.max_version]
        self.load_chain(ctx)
        if self.client_ca_file:
            try:
                ctx.load_verify_locations(cafile=self.client_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise WebConfigError(f"tls_server_config: cannot load client_ca_file {self.client_ca_file!r}: "
                                     f"{_why(exc)}") from None
        if self.client_auth_type in ("RequireAnyClientCert", "RequireAndVerifyClientCert"):
            ctx.verify_mode = ssl.CERT_REQUIRED
        elif self.client_auth_type in ("VerifyClientCertIfGiven", "RequestClientCert") and self.client_ca_file:
            ctx.verify_mode = ssl.CERT_OPTIONAL
        else:
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def load_chain(self, ctx: ssl.SSLContext) -> None:
        """The certificate and key into `ctx` (also the live context at a reload). An encrypted key is a one-line
        error naming key_file, never OpenSSL's pass phrase prompt on the agent's terminal."""
        from prober.tlsinfo import EncryptedKey, no_passphrase

        try:
            ctx.load_cert_chain(self.cert_file, self.key_file, password=no_passphrase)
        except EncryptedKey as exc:
            raise WebConfigError(f"tls_server_config.key_file: {self.key_file!r}: {exc}") from None
        except (OSError, ssl.SSLError) as exc:
            raise WebConfigError(f"tls_server_config: cannot load cert_file {self.cert_file!r} / key_file "
                                 f"{self.key_file!r}: {_why(exc)}") from None


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__


# a bcrypt hash of a random password: unknown users cost as much time as known ones
_DUMMY_HASH = b"$2b$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi"


class BasicAuth:
    """bcrypt-checked users. A bcrypt check costs tens of milliseconds of CPU: it runs in a thread, at most
    two at a time, and a successful (user, password) pair is remembered by its SHA-256 (as exporter-toolkit
    caches), so Prometheus' scrapes cost one check, not one per scrape."""

    def __init__(self, users: dict[str, str]):
        self.users = {u: h.encode() for u, h in users.items()}
        self._ok: OrderedDict[bytes, None] = OrderedDict()
        self._checks = asyncio.Semaphore(2)

    def _key(self, user: str, password: str) -> bytes:
        h = self.users.get(user, _DUMMY_HASH)
        return hashlib.sha256(user.encode() + b"\0" + password.encode() + b"\0" + h).digest()

    async def check(self, user: str, password: str) -> bool:
        import bcrypt

        key = self._key(user, password)
        if key in self._ok:
            self._ok.move_to_end(key)
            return True
        hashed = self.users.get(user)
        async with self._checks:
            try:
                ok = await asyncio.to_thread(bcrypt.checkpw, password.encode(), hashed or _DUMMY_HASH)
            except ValueError:  # a malformed hash: never a match
                ok = False
        ok = ok and hashed is not None
        if ok:
            self._ok[key] = None
            if len(self._ok) > 1000:
                self._ok.popitem(last=False)
        return ok


@dataclass(frozen=True)
class WebConfig:
    path: str = ""
    tls: TLSServerConfig | None = None
    users: dict[str, str] = field(default_factory=dict)  # user -> bcrypt hash
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def auth_required(self) -> bool:
        return bool(self.users)

    @property
    def secured(self) -> bool:
        """Callers must prove who they are: basic auth, or a client certificate that is required."""
        return self.auth_required or (self.tls is not None and self.tls.client_auth_type in (
            "RequireAnyClientCert", "RequireAndVerifyClientCert"))

    def basic_auth(self) -> BasicAuth | None:
        return BasicAuth(self.users) if self.users else None


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{where}: must be a mapping")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise WebConfigError(f"{where}: must be a non-empty string")
    return value


def parse_web_config(text: str, filename: str = "<web config>") -> WebConfig:
    try:
        raw = yaml.safe_load(text)
    except RecursionError:
        raise WebConfigError(f"{filename}: invalid YAML: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark is not None else filename
        raise WebConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or 'unparsable'}") from None
    raw = _mapping(raw, filename)
    for k in raw:
        if k not in _TOP:
            raise WebConfigError(f"{filename}: {k}: unknown key (expected {', '.join(_TOP)})")
    tls = None
    t = _mapping(raw.get("tls_server_config"), f"{filename}: tls_server_config")
    for k in t:
        if k in _TLS_UNSUPPORTED:
            raise WebConfigError(f"{filename}: tls_server_config.{k}: not supported by connprobe")
        if k not in _TLS_KEYS:
            raise WebConfigError(f"{filename}: tls_server_config.{k}: unknown key (expected {', '.join(_TLS_KEYS)})")
    if t:
        kw: dict[str, Any] = {}
        for k in ("cert_file", "key_file"):
            if k not in t:
                raise WebConfigError(f"{filename}: tls_server_config.{k}: required")
            kw[k] = _str(t[k], f"{filename}: tls_server_config.{k}")
        auth = t.get("client_auth_type", "NoClientCert")
        if auth not in CLIENT_AUTH_TYPES:
            raise WebConfigError(f"{filename}: tls_server_config.client_auth_type: {auth!r} is not one of "
                                 f"{', '.join(CLIENT_AUTH_TYPES)}")
        ca = t.get("client_ca_file")
        if ca is not None:
            ca = _str(ca, f"{filename}: tls_server_config.client_ca_file")
            if auth == "NoClientCert":
                raise WebConfigError(f"{filename}: tls_server_config.client_ca_file: given but client_auth_type "
                                     "is NoClientCert")
        elif auth in ("RequireAnyClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert"):
            raise WebConfigError(f"{filename}: tls_server_config.client_ca_file: required with client_auth_type "
                                 f"{auth}")
        for k in ("min_version", "max_version"):
            if k in t and t[k] not in TLS_VERSIONS:
                raise WebConfigError(f"{filename}: tls_server_config.{k}: {t[k]!r} is not one of "
                                     f"{', '.join(TLS_VERSIONS)}")
        tls = TLSServerConfig(**kw, client_auth_type=auth, client_ca_file=ca,
                              min_version=t.get("min_version", "TLS12"), max_version=t.get("max_version"))
        try:
            tls.ssl_context()  # the files exist and match, now rather than at the first connection
        except WebConfigError as exc:
            raise WebConfigError(f"{filename}: {exc}") from None
    users: dict[str, str] = {}
    for user, h in _mapping(raw.get("basic_auth_users"), f"{filename}: basic_auth_users").items():
        if not isinstance(user, str) or not user or ":" in user:
            raise WebConfigError(f"{filename}: basic_auth_users: user {user!r} must be a non-empty string "
                                 "without ':'")
        if not isinstance(h, str) or not h.startswith(("$2a$", "$2b$", "$2y$")) or len(h) != 60:
            raise WebConfigError(f"{filename}: basic_auth_users.{user}: must be a bcrypt hash ($2b$..., 60 "
                                 "characters)")
        users[user] = h
    http = _mapping(raw.get("http_server_config"), f"{filename}: http_server_config")
    for k in http:
        if k not in _HTTP_KEYS:
            raise WebConfigError(f"{filename}: http_server_config.{k}: unknown key (expected {', '.join(_HTTP_KEYS)})")
    headers: dict[str, str] = {}
    allowed = {h.lower(): h for h in ALLOWED_HEADERS}
    for name, value in _mapping(http.get("headers"), f"{filename}: http_server_config.headers").items():
        canonical = allowed.get(str(name).lower())
        if canonical is None:
            raise WebConfigError(f"{filename}: http_server_config.headers.{name}: not allowed (one of "
                                 f"{', '.join(ALLOWED_HEADERS)})")
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            raise WebConfigError(f"{filename}: http_server_config.headers.{name}: must be a one-line string")
        headers[canonical] = value
    return WebConfig(filename, tls, users, headers)


def load_web_config(path: str | Path) -> WebConfig:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise WebConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WebConfigError(f"{p}: not UTF-8 (byte {exc.start})") from None
    return parse_web_config(text, str(p))
