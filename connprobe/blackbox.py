"""blackbox_exporter's `blackbox.yml` read as connprobe modules: each blackbox key is mapped onto connprobe's
spec (`prober.spec`), or refused with one line naming it. Nothing is silently dropped.

`connprobe agent --blackbox-config blackbox.yml` and `connprobe check-config --blackbox blackbox.yml` read a
file in this form (only `modules:`); the same keys are accepted in a connprobe config's modules too, so a
blackbox module can be pasted as it is. Only the defaults differ: a blackbox file gets blackbox's
(`preferred_ip_protocol: ip6`, DNS `query_type: ANY`), a connprobe config keeps connprobe's.

Credentials given as files (`basic_auth.password_file`, `bearer_token_file`, `authorization.credentials_file`,
`body_file`) are read when the config is loaded (and again on every reload); a relative path is taken from the
config file's directory, as blackbox does. `KEYS` is the whole mapping, one row per documented key; README's
"blackbox_exporter key mapping" table is generated from it (`connprobe.blackbox.markdown_table`).
"""

from __future__ import annotations

import base64
import os
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_SECRET_BYTES = 64 << 10  # a token or password file; a larger one is a mistake (or /dev/zero)
MAX_BODY_FILE_BYTES = 1 << 20

# status of a blackbox key in connprobe: how it is carried, or why it is refused
SAME = "same key"
MAPPED = "mapped"
REFUSED = "refused"

# (section, blackbox key, status, connprobe key or note)
KEYS: tuple[tuple[str, str, str, str], ...] = (
    ("module", "prober", SAME, "prober (http, tcp, dns, icmp, grpc)"),
    ("module", "timeout", SAME, "timeout (at most 10m; `w`/`y` units are refused)"),
    ("http", "valid_status_codes", SAME, "http.valid_status_codes"),
    ("http", "valid_http_versions", SAME, "http.valid_http_versions (HTTP/1.0, HTTP/1.1, HTTP/2.0)"),
    ("http", "method", SAME, "http.method"),
    ("http", "headers", SAME, "http.headers (secret values)"),
    ("http", "body", SAME, "http.body"),
    ("http", "body_file", MAPPED, "http.body (the file read at load)"),
    ("http", "body_size_limit", MAPPED, "http.max_body_bytes (0: no limit)"),
    ("http", "compression", SAME, "http.compression (gzip, deflate, identity; br refused)"),
    ("http", "follow_redirects", SAME, "http.follow_redirects"),
    ("http", "no_follow_redirects", MAPPED, "http.follow_redirects: false"),
    ("http", "fail_if_ssl", SAME, "http.fail_if_ssl"),
    ("http", "fail_if_not_ssl", SAME, "http.fail_if_not_ssl"),
    ("http", "fail_if_body_matches_regexp", SAME, "http.fail_if_body_matches_regexp"),
    ("http", "fail_if_body_not_matches_regexp", SAME, "http.fail_if_body_not_matches_regexp"),
    ("http", "fail_if_header_matches", SAME, "http.fail_if_header_matches"),
    ("http", "fail_if_header_not_matches", SAME, "http.fail_if_header_not_matches"),
    ("http", "tls_config", MAPPED, "http.tls (see tls_config rows)"),
    ("http", "basic_auth", MAPPED, "an `Authorization: Basic` header (username[_file], password[_file])"),
    ("http", "bearer_token", MAPPED, "an `Authorization: Bearer` header"),
    ("http", "bearer_token_file", MAPPED, "an `Authorization: Bearer` header, the file read at load"),
    ("http", "authorization", MAPPED, "an `Authorization: <type>` header (credentials[_file])"),
    ("http", "oauth2", SAME, "http.oauth2: client credentials; the token is fetched within the probe's timeout "
                             "and cached until 10s before expires_in (see oauth2 rows)"),
    ("http", "proxy_url", SAME, "http.proxy_url (an http:// proxy; https targets through CONNECT; the module "
                                "uses client: httpx)"),
    ("http", "no_proxy", SAME, "http.no_proxy (hosts, domains, addresses, CIDRs, `*`; Go's rules: localhost and "
                               "loopback never proxied then; needs proxy_url)"),
    ("http", "proxy_from_environment", MAPPED, "http.proxy_urls and no_proxy from the agent's HTTP_PROXY, HTTPS_PROXY "
                                               "and NO_PROXY, read at load"),
    ("http", "proxy_connect_header", MAPPED, "http.proxy_headers (secret values; several joined with \", \"), sent "
                                           "to the proxy with CONNECT"),
    ("http", "skip_resolve_phase_with_proxy", REFUSED, "not supported (the target is resolved by connprobe)"),
    ("http", "use_proxy_dns", REFUSED, "not supported (the target is resolved by connprobe)"),
    ("http", "enable_http2", MAPPED, "http.http2 (h2 offered by ALPN on https targets; the module uses client: "
                                   "httpx)"),
    ("http", "enable_http_1_1", REFUSED, "not supported"),
    ("http", "http_headers", MAPPED, "http.headers (values, secrets, files: each file read at load; several "
                                   "values of one header joined with \", \")"),
    ("http", "preferred_ip_protocol", SAME, "http.preferred_ip_protocol"),
    ("http", "ip_protocol_fallback", SAME, "http.ip_protocol_fallback"),
    ("http", "source_ip_address", SAME, "http.source_ip_address"),
    ("tcp", "preferred_ip_protocol", SAME, "tcp.preferred_ip_protocol"),
    ("tcp", "ip_protocol_fallback", SAME, "tcp.ip_protocol_fallback"),
    ("tcp", "source_ip_address", SAME, "tcp.source_ip_address"),
    ("tcp", "query_response", SAME, "tcp.query_response (expect, send, starttls)"),
    ("tcp", "tls", SAME, "tcp.tls"),
    ("tcp", "tls_config", SAME, "tcp.tls_config"),
    ("dns", "preferred_ip_protocol", SAME, "dns.preferred_ip_protocol"),
    ("dns", "ip_protocol_fallback", SAME, "dns.ip_protocol_fallback"),
    ("dns", "source_ip_address", SAME, "dns.source_ip_address (the query's socket, udp, tcp and tls)"),
    ("dns", "transport_protocol", MAPPED, "dns.transport (udp, tcp; tcp with dns_over_tls: tls)"),
    ("dns", "dns_over_tls", MAPPED, "dns.transport: tls (needs transport_protocol: tcp, as blackbox does; port 853 "
                                   "when the target names none)"),
    ("dns", "tls_config", SAME, "dns.tls_config (only with dns_over_tls: true)"),
    ("dns", "query_name", SAME, "dns.query_name"),
    ("dns", "query_type", SAME, "dns.query_type (blackbox's default ANY in a blackbox file)"),
    ("dns", "query_class", MAPPED, "IN only (other classes refused)"),
    ("dns", "recursion_desired", SAME, "dns.recursion_desired"),
    ("dns", "valid_rcodes", SAME, "dns.valid_rcodes"),
    ("dns", "validate_answer_rrs", SAME, "dns.validate_answer_rrs (all four matchers)"),
    ("dns", "validate_authority_rrs", SAME, "dns.validate_authority_rrs (all four matchers)"),
    ("dns", "validate_additional_rrs", SAME, "dns.validate_additional_rrs (all four matchers)"),
    ("icmp", "preferred_ip_protocol", SAME, "icmp.preferred_ip_protocol"),
    ("icmp", "ip_protocol_fallback", SAME, "icmp.ip_protocol_fallback"),
    ("icmp", "source_ip_address", SAME, "icmp.source_ip_address"),
    ("icmp", "dont_fragment", SAME, "icmp.dont_fragment"),
    ("icmp", "payload_size", SAME, "icmp.payload_size"),
    ("icmp", "ttl", SAME, "icmp.ttl"),
    ("grpc", "service", SAME, "grpc.service"),
    ("grpc", "preferred_ip_protocol", SAME, "grpc.preferred_ip_protocol"),
    ("grpc", "ip_protocol_fallback", SAME, "grpc.ip_protocol_fallback"),
    ("grpc", "tls", SAME, "grpc.tls"),
    ("grpc", "tls_config", SAME, "grpc.tls_config (insecure_skip_verify refused: grpcio always verifies)"),
    ("oauth2", "client_id", SAME, "oauth2.client_id (required)"),
    ("oauth2", "client_secret", SAME, "oauth2.client_secret (a secret; it or client_secret_file is required)"),
    ("oauth2", "client_secret_file", MAPPED, "oauth2.client_secret, the file read at load"),
    ("oauth2", "scopes", SAME, "oauth2.scopes (sent space-joined as scope)"),
    ("oauth2", "token_url", SAME, "oauth2.token_url (http:// or https://; on /probe it passes the target policy)"),
    ("oauth2", "endpoint_params", SAME, "oauth2.endpoint_params (added to the token request's form)"),
    ("oauth2", "tls_config", MAPPED, "oauth2.tls (see tls_config rows)"),
    ("oauth2", "proxy_url", REFUSED, "not supported (the token endpoint is reached directly)"),
    ("tls_config", "insecure_skip_verify", SAME, "insecure_skip_verify"),
    ("tls_config", "ca_file", SAME, "ca_file (relative: to the config's directory)"),
    ("tls_config", "cert_file", SAME, "cert_file (client certificate)"),
    ("tls_config", "key_file", SAME, "key_file"),
    ("tls_config", "server_name", SAME, "server_name"),
    ("tls_config", "min_version", SAME, "min_version (TLS10..TLS13; the system's OpenSSL floor still applies: "
                                        "TLS 1.2 on Debian; refused for grpc)"),
    ("tls_config", "max_version", SAME, "max_version (TLS10..TLS13; refused for grpc: grpcio cannot limit it)"),
    ("tls_config", "ca", SAME, "ca (inline PEM; at most one of ca and ca_file)"),
    ("tls_config", "cert", SAME, "cert (inline PEM; at most one of cert and cert_file)"),
    ("tls_config", "key", SAME, "key (inline PEM, a secret; at most one of key and key_file; loaded from memory, "
                                "never written to disk)"),
    ("tls_config", "key_file_ref", REFUSED, "not supported"),
)
# blackbox_exporter 0.23's metrics (every one its binary defines) -> connprobe: (metric, probers, status, note).
# "compared": tests/app/test_blackbox_side_by_side.py checks name and value (timings: name) against 0.23 itself.
METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("probe_success", "all", "compared", "same"),
    ("probe_duration_seconds", "all", "compared", "same (a timing)"),
    ("probe_dns_lookup_time_seconds", "all but unix", "compared",
     "the target name's lookup (0 for an address); a DNS probe's own question is probe_dns_duration_seconds"),
    ("probe_ip_protocol", "all but unix", "compared", "same"),
    ("probe_ip_addr_hash", "all but unix", "compared", "same value (FNV-1a of the address bytes)"),
    ("probe_http_duration_seconds{phase}", "http", "compared", "same phases, summed over redirects"),
    ("probe_http_status_code", "http", "compared", "same"),
    ("probe_http_version", "http", "compared", "same"),
    ("probe_http_content_length", "http", "compared", "same (-1 without the header)"),
    ("probe_http_uncompressed_body_length", "http", "compared", "same"),
    ("probe_http_redirects", "http", "compared", "same"),
    ("probe_http_ssl", "http", "compared", "same"),
    ("probe_http_last_modified_timestamp_seconds", "http", "compared", "same"),
    ("probe_failed_due_to_regex", "http, tcp", "compared", "same"),
    ("probe_ssl_earliest_cert_expiry", "http, tcp, grpc", "compared",
     "same; grpc: read by a second TLS handshake of connprobe's own to the same address (ALPN h2, not verified "
     "again) once the check answered over TLS (grpcio does not show the chain), 0 without such an answer as "
     "blackbox"),
    ("probe_ssl_last_chain_expiry_timestamp_seconds", "http, tcp", "compared",
     "same; not for grpc (blackbox's grpc prober has none)"),
    ("probe_ssl_last_chain_info{fingerprint_sha256,issuer,subject,subjectalternative}", "http, tcp, grpc",
     "compared", "same labels and values; grpc: from connprobe's second handshake (above)"),
    ("probe_tls_version_info{version}", "http, tcp, grpc", "compared",
     "same; grpc: of connprobe's second handshake (above)"),
    ("probe_dns_query_succeeded", "dns", "compared", "same"),
    ("probe_dns_duration_seconds{phase}", "dns", "compared",
     "same phases; connect: the TCP connect and, over TLS, the handshake (0 over UDP), request: the rest"),
    ("probe_dns_answer_rrs", "dns", "compared", "same"),
    ("probe_dns_authority_rrs", "dns", "compared", "same"),
    ("probe_dns_additional_rrs", "dns", "compared", "same"),
    ("probe_dns_serial", "dns", "compared", "same"),
    ("probe_icmp_duration_seconds{phase}", "icmp", "compared", "same phases"),
    ("probe_icmp_reply_hop_limit", "icmp", "compared", "same"),
    ("probe_grpc_status_code", "grpc", "compared", "same"),
    ("probe_grpc_healthcheck_response{serving_status}", "grpc", "compared", "same (every status 0 without an "
     "answer, NOT_FOUND included)"),
    ("probe_grpc_duration_seconds{phase}", "grpc", "compared", "same phases"),
    ("probe_grpc_ssl", "grpc", "compared", "same (1 only when the check answered over TLS)"),
)
_REFUSED = {(sec, key): note for sec, key, status, note in KEYS if status == REFUSED}


class Translation:
    """Errors (one line each, naming the key) found while mapping one module."""

    def __init__(self, base_dir: Path | None) -> None:
        self.base_dir = base_dir
        self.errors: list[str] = []

    def error(self, where: str, msg: str) -> None:
        self.errors.append(f"{where}: {msg}")

    def path(self, value: Any) -> Path | None:
        if not isinstance(value, str) or not value or "\x00" in value:
            return None
        p = Path(value)
        if not p.is_absolute() and self.base_dir is not None:
            p = self.base_dir / p
        return p

    def read(self, where: str, value: Any, limit: int, secret: bool = True) -> str | None:
        """The text of a file named in the config (trailing newline removed, as blackbox does for secrets)."""
        p = self.path(value)
        if p is None:
            self.error(where, "must be a file name")
            return None
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            self.error(where, f"cannot read {str(p)!r}: {exc.strerror or exc}")
            return None
        try:
            if not os.path.isfile(f"/proc/self/fd/{fd}"):
                self.error(where, f"{str(p)!r} is not a regular file")
                return None
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(limit + 1)
        except OSError as exc:
            self.error(where, f"cannot read {str(p)!r}: {exc.strerror or exc}")
            return None
        finally:
            os.close(fd)
        if len(data) > limit:
            self.error(where, f"{str(p)!r} is larger than {limit} bytes")
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.error(where, f"{str(p)!r} is not UTF-8")
            return None
        if secret:
            text = text.strip("\r\n")
            if re.search(r"[\r\n\x00]", text):
                self.error(where, f"{str(p)!r} holds more than one line")
                return None
        return text


def _refuse(t: Translation, section: str, body: dict, prefix: str) -> None:
    for key in list(body):
        note = _REFUSED.get((section, key))
        if note is not None:
            t.error(f"{prefix}.{key}", f"blackbox_exporter key not supported by connprobe: {note}")
            del body[key]


def _tls(t: Translation, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        return raw  # the spec says what is wrong with it
    body = dict(raw)
    _refuse(t, "tls_config", body, prefix)
    for key in ("ca_file", "cert_file", "key_file"):
        if key in body:
            p = t.path(body[key])
            if p is None:
                t.error(f"{prefix}.{key}", "must be a file name")
                del body[key]
            else:  # relative: to the config's directory. Read when a probe needs it (a config is often
                body[key] = str(p)  # checked where the pod's mounted files are not: check-config on a laptop)
    if isinstance(body.get("cert_file"), str) and Path(body["cert_file"]).is_file() and "key" not in body:
        from prober.tlsinfo import EncryptedKey, no_passphrase

        try:  # a certificate and key that are there but do not load: a config error, not a failure at each probe
            ssl.create_default_context().load_cert_chain(body["cert_file"], body.get("key_file"),
                                                         password=no_passphrase)
        except EncryptedKey as exc:
            t.error(f"{prefix}.{'key_file' if body.get('key_file') else 'cert_file'}", str(exc))
        except ssl.SSLError:
            t.error(f"{prefix}.cert_file", "cannot load the client certificate and key: not PEM, or the key "
                                           "does not match the certificate")
        except (OSError, TypeError) as exc:
            t.error(f"{prefix}.cert_file", f"cannot load the client certificate and key: "
                                           f"{getattr(exc, 'strerror', None) or exc}")
    return body


def _secret_pair(t: Translation, body: dict, key: str, where: str) -> str | None:
    """`key` or `key_file` (at most one), as text."""
    literal, file_key = body.pop(key, None), f"{key}_file"
    filename = body.pop(file_key, None)
    if literal is not None and filename is not None:
        t.error(where, f"at most one of {key} and {file_key}")
        return None
    if filename is not None:
        return t.read(f"{where}.{file_key}", filename, MAX_SECRET_BYTES)
    if literal is not None and not isinstance(literal, str):
        t.error(f"{where}.{key}", "must be a string")
        return None
    return literal


def _oauth2(t: Translation, body: dict, prefix: str) -> None:
    """blackbox's `oauth2:` onto connprobe's `http.oauth2` (the same keys; client_secret_file read at load,
    tls_config as tls). What is missing or unknown is named by the spec."""
    where = f"{prefix}.oauth2"
    raw = body.get("oauth2")
    if not isinstance(raw, dict):
        return  # the spec says what is wrong with it
    sub = dict(raw)
    _refuse(t, "oauth2", sub, where)
    before = len(t.errors)
    secret = _secret_pair(t, sub, "client_secret", where)
    if secret is not None:
        sub["client_secret"] = secret  # neither given: the spec says client_secret is required
    elif len(t.errors) > before:
        sub["client_secret"] = "unread"  # said already (both given, a file not read): not "required" as well
    if "tls_config" in sub:
        tls = _tls(t, sub.pop("tls_config"), f"{where}.tls_config")
        if "tls" in sub:
            t.error(f"{where}.tls_config", "give tls_config (blackbox) or tls (connprobe), not both")
        else:
            sub["tls"] = tls
    elif isinstance(sub.get("tls"), dict):
        sub["tls"] = _tls(t, sub["tls"], f"{where}.tls")
    body["oauth2"] = sub


def _environment_errors(t: Translation, where: str, urls: dict[str, str], no_proxy: tuple[str, ...]) -> bool:
    """`proxy_from_environment`'s values checked here, each error naming the variable it came from (the keys they
    fill, proxy_urls and no_proxy, are not in the user's file); True when one is wrong."""
    from prober.proxy import check_no_proxy
    from prober.spec import check_proxy_url

    def var(name: str) -> str:
        return name if os.environ.get(name, "").strip() else name.lower()

    errors = len(t.errors)
    for scheme, url in urls.items():
        try:
            check_proxy_url(url)
        except ValueError as exc:
            t.error(where, f"{var(scheme.upper() + '_PROXY')} in the agent's environment: {exc}")
    try:
        if urls:  # no proxy variable: NO_PROXY is not used
            check_no_proxy(no_proxy)
    except ValueError as exc:
        t.error(where, f"{var('NO_PROXY')} in the agent's environment: {exc}")
    return len(t.errors) > errors


def _authorization(t: Translation, body: dict, prefix: str) -> str | None:
    """The Authorization header value the module's credentials make, or None."""
    given = [k for k in ("basic_auth", "bearer_token", "bearer_token_file", "authorization", "oauth2") if k in body]
    if len(given) > 1:
        t.error(prefix, f"at most one of basic_auth, bearer_token, bearer_token_file, authorization and oauth2 "
                        f"(got {', '.join(given)})")
        for k in given:
            body.pop(k)
        return None
    if not given or given == ["oauth2"]:
        if given:
            _oauth2(t, body, prefix)
        return None
    key = given[0]
    raw = body.pop(key)
    where = f"{prefix}.{key}"
    if key == "bearer_token":
        if not isinstance(raw, str) or not raw:
            t.error(where, "must be a non-empty string")
            return None
        return f"Bearer {raw}"
    if key == "bearer_token_file":
        token = t.read(where, raw, MAX_SECRET_BYTES)
        return f"Bearer {token}" if token is not None else None
    if not isinstance(raw, dict):
        t.error(where, "must be a mapping")
        return None
    sub = dict(raw)
    if key == "basic_auth":
        user = _secret_pair(t, sub, "username", where)
        password = _secret_pair(t, sub, "password", where)
        for k in sub:
            t.error(f"{where}.{k}", "unknown key")
        if user is None:
            if not any(e.startswith(where) for e in t.errors):
                t.error(f"{where}.username", "required")
            return None
        if ":" in user:
            t.error(f"{where}.username", "must not contain ':'")
            return None
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        return f"Basic {token}"
    kind = sub.pop("type", "Bearer")
    if not isinstance(kind, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", kind):
        t.error(f"{where}.type", f"{kind!r} is not an authorization scheme")
        return None
    if kind.lower() == "basic":
        t.error(f"{where}.type", "Basic is set with basic_auth, not authorization")
        return None
    creds = _secret_pair(t, sub, "credentials", where)
    for k in sub:
        t.error(f"{where}.{k}", "unknown key")
    if creds is None:
        if not any(e.startswith(where) for e in t.errors):
            t.error(f"{where}.credentials", "required")
        return None
    return f"{kind} {creds}"


def _http_headers(t: Translation, body: dict, prefix: str) -> None:
    """prometheus/common's `http_headers: {NAME: {values: [...], secrets: [...], files: [...]}}` merged into
    `headers` (a file holds one value; several values are joined with ", ", as one header line)."""
    raw = body.pop("http_headers")
    where = f"{prefix}.http_headers"
    if not isinstance(raw, dict):
        t.error(where, "must be a mapping of header name to {values, secrets, files}")
        return
    headers = body.get("headers") or {}
    if not isinstance(headers, dict):
        return  # the spec says what is wrong with headers
    taken = {k.lower() for k in headers if isinstance(k, str)}
    merged = dict(headers)
    for name, spec in raw.items():
        here = f"{where}.{name}"
        if not isinstance(name, str):
            t.error(where, f"{name!r:.40} is not a header name")
            continue
        if name.lower() in taken:
            t.error(here, "also given in headers")
            continue
        if not isinstance(spec, dict):
            t.error(here, "must be a mapping with values, secrets or files")
            continue
        values: list[str] = []
        for key, items in spec.items():
            if key not in ("values", "secrets", "files"):
                t.error(f"{here}.{key}", "unknown key (values, secrets, files)")
                continue
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                t.error(f"{here}.{key}", "must be a list of strings")
                continue
            if key == "files":
                for i, filename in enumerate(items):
                    text = t.read(f"{here}.files[{i}]", filename, MAX_SECRET_BYTES)
                    if text is not None:
                        values.append(text)
            else:
                values.extend(items)
        if values:
            merged[name] = ", ".join(values)
            taken.add(name.lower())
    body["headers"] = merged


_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "kib": 1 << 10, "mb": 1 << 20, "mib": 1 << 20, "gb": 1 << 30,
          "gib": 1 << 30, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(value: Any) -> int:
    """blackbox's body_size_limit: a byte count or "10KB" / "1MiB" (powers of two, as blackbox reads them)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 1MB, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d{1,12})\s*([A-Za-z]{0,3})\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(m.group(1)) * _UNITS[m.group(2).lower()]
    raise ValueError(f"expected a size like 1MB, got {value!r:.40}")


def _http(t: Translation, raw: Any, prefix: str, blackbox_defaults: bool = False) -> Any:
    if not isinstance(raw, dict):
        return raw
    body = dict(raw)
    _refuse(t, "http", body, prefix)
    if "no_follow_redirects" in body:
        v = body.pop("no_follow_redirects")
        if "follow_redirects" in body:
            t.error(f"{prefix}.no_follow_redirects", "give follow_redirects or no_follow_redirects, not both")
        elif not isinstance(v, bool):
            t.error(f"{prefix}.no_follow_redirects", "must be true or false")
        else:
            body["follow_redirects"] = not v
    if "body_size_limit" in body:
        v = body.pop("body_size_limit")
        if "max_body_bytes" in body:
            t.error(f"{prefix}.body_size_limit", "give body_size_limit or max_body_bytes, not both")
        else:
            try:
                n = parse_size(v)
                if n > 0:
                    body["max_body_bytes"] = n
            except ValueError as exc:
                t.error(f"{prefix}.body_size_limit", str(exc))
    if "body_file" in body:
        filename = body.pop("body_file")
        if "body" in body:
            t.error(f"{prefix}.body_file", "give body or body_file, not both")
        else:
            text = t.read(f"{prefix}.body_file", filename, MAX_BODY_FILE_BYTES, secret=False)
            if text is not None:
                body["body"] = text
    if "proxy_connect_header" in body:
        raw = body.pop("proxy_connect_header")
        where = f"{prefix}.proxy_connect_header"
        if not isinstance(raw, dict):
            t.error(where, "must be a mapping of header name to a list of values")
        elif "proxy_headers" in body:
            t.error(where, "give proxy_connect_header or proxy_headers, not both")
        else:
            out = {}
            for name, values in raw.items():
                if isinstance(values, str):
                    values = [values]
                if not isinstance(name, str) or not isinstance(values, list) or not all(
                        isinstance(v, str) for v in values):
                    t.error(f"{where}.{name}", "must be a list of strings")
                    continue
                out[name] = ", ".join(values)
            body["proxy_headers"] = out
    if "proxy_from_environment" in body:
        v = body.pop("proxy_from_environment")
        where = f"{prefix}.proxy_from_environment"
        if not isinstance(v, bool):
            t.error(where, "must be true or false")
        elif v and ("proxy_url" in body or "proxy_urls" in body):
            t.error(where, "give proxy_url or proxy_from_environment, not both")
        elif v and "no_proxy" in body:
            t.error(where, "give no_proxy or proxy_from_environment (NO_PROXY is read then), not both")
            body.pop("no_proxy")  # said once
        elif v:
            from prober.proxy import from_environment

            urls, no_proxy = from_environment(os.environ)  # the agent's environment, read at load (and reload)
            if _environment_errors(t, where, urls, no_proxy):
                urls = {}
            if urls:
                body["proxy_urls"] = urls
                if no_proxy:
                    body["no_proxy"] = list(no_proxy)
    if ("proxy_url" in body or "proxy_urls" in body) and "client" not in body:
        body["client"] = "httpx"  # the client that speaks to proxies
    if "enable_http2" in body:
        v = body.pop("enable_http2")
        if not isinstance(v, bool):
            t.error(f"{prefix}.enable_http2", "must be true or false")
        elif v:
            body["http2"] = True
            body.setdefault("client", "httpx")  # the client that speaks HTTP/2
    if "http_headers" in body:
        _http_headers(t, body, prefix)
    if blackbox_defaults and "compression" not in body and "accept_encoding" not in body:
        headers = body.get("headers")
        if not (isinstance(headers, dict) and any(str(k).lower() == "accept-encoding" for k in headers)):
            body["accept_encoding"] = "identity"  # blackbox asks for no coding (its Go client's is turned off)
    auth = _authorization(t, body, prefix)
    if auth is not None:
        headers = body.get("headers")
        if headers is None:
            headers = {}
        if isinstance(headers, dict):
            if any(isinstance(k, str) and k.lower() == "authorization" for k in headers):
                t.error(f"{prefix}.headers", "an Authorization header and credentials (basic_auth, bearer_token, "
                                             "authorization) both given")
            else:
                body["headers"] = {**headers, "Authorization": auth}
    if isinstance(body.get("tls"), dict):  # connprobe's own key: the same file checks
        body["tls"] = _tls(t, body["tls"], f"{prefix}.tls")
    if "tls_config" in body:
        tls = _tls(t, body.pop("tls_config"), f"{prefix}.tls_config")
        if "tls" in body:
            t.error(f"{prefix}.tls_config", "give tls_config (blackbox) or tls (connprobe), not both")
        else:
            body["tls"] = tls
    return body


def _tcp_like(section: str) -> Callable[[Translation, Any, str], Any]:
    def tr(t: Translation, raw: Any, prefix: str) -> Any:
        if not isinstance(raw, dict):
            return raw
        body = dict(raw)
        _refuse(t, section, body, prefix)
        if "tls_config" in body:
            body["tls_config"] = _tls(t, body["tls_config"], f"{prefix}.tls_config")
        return body

    return tr


def _dns(t: Translation, raw: Any, prefix: str, blackbox_defaults: bool) -> Any:
    if not isinstance(raw, dict):
        return raw
    body = dict(raw)
    _refuse(t, "dns", body, prefix)
    if "transport_protocol" in body:
        v = body.pop("transport_protocol")
        if "transport" in body:
            t.error(f"{prefix}.transport_protocol", "give transport_protocol or transport, not both")
        elif v not in ("udp", "tcp"):
            t.error(f"{prefix}.transport_protocol", f"must be udp or tcp, got {v!r:.40}")
        else:
            body["transport"] = v
    if "dns_over_tls" in body:
        v = body.pop("dns_over_tls")
        where = f"{prefix}.dns_over_tls"
        if not isinstance(v, bool):
            t.error(where, "must be true or false")
        elif v and body.get("transport") == "tcp":
            body["transport"] = "tls"
        elif v:  # blackbox_exporter 0.23 loads it and then fails every probe ("Expected transport protocol tcp")
            t.error(where, "needs transport_protocol: tcp (blackbox_exporter fails every probe of this module)")
    if "tls_config" in body:
        if body.get("transport") != "tls":
            t.error(f"{prefix}.tls_config", "only used with dns_over_tls: true (transport: tls)")
            del body["tls_config"]
        else:
            body["tls_config"] = _tls(t, body["tls_config"], f"{prefix}.tls_config")
    if "query_class" in body:
        v = body.pop("query_class")
        if not (isinstance(v, str) and v.upper() == "IN"):
            t.error(f"{prefix}.query_class", f"only IN is supported, got {v!r:.40}")
    if blackbox_defaults:
        body.setdefault("query_type", "ANY")
    return body


_SECTIONS: dict[str, Callable[[Translation, Any, str], Any]] = {
    "http": _http, "tcp": _tcp_like("tcp"), "icmp": _tcp_like("icmp"), "grpc": _tcp_like("grpc"),
}
FAMILY_SECTIONS = ("http", "tcp", "dns", "icmp", "grpc")


BLACKBOX_MODULE_KEYS = frozenset(("prober", "timeout", *FAMILY_SECTIONS))


def looks_like_blackbox(raw: Any) -> bool:
    """A document given to `--config` that is recognisably a blackbox.yml: `modules:` is its only top-level key
    (no `probes:`), every module is a mapping with blackbox's `prober:` and only blackbox's module keys (and only
    blackbox's documented keys, `KEYS`, in its prober section), and at least one has a prober section (`http:`,
    `tcp:`, `dns:`, `icmp:`, `grpc:`). Anything else is read as a connprobe config (whose checks name what is
    wrong)."""
    if not isinstance(raw, dict) or set(raw) != {"modules"}:
        return False
    modules = raw["modules"]
    if not isinstance(modules, dict) or not modules:
        return False
    bodies = list(modules.values())
    if not all(isinstance(b, dict) and "prober" in b and set(b) <= BLACKBOX_MODULE_KEYS for b in bodies):
        return False
    documented = {sec: {k for s, k, _, _ in KEYS if s == sec} for sec in FAMILY_SECTIONS}
    for b in bodies:  # a prober section with a key blackbox does not document (connprobe's own): not blackbox's
        for sec in set(b) & set(FAMILY_SECTIONS):
            if b[sec] is not None and (not isinstance(b[sec], dict) or not set(b[sec]) <= documented[sec]):
                return False
    return any(set(b) & set(FAMILY_SECTIONS) for b in bodies)


def translate_module(raw: dict, base_dir: Path | None = None, blackbox_defaults: bool = False
                     ) -> tuple[dict, list[str]]:
    """A module body with blackbox's keys mapped to connprobe's: (body for `ModuleSpec`, errors as
    "key.path: message" lines). Keys connprobe knows under the same name pass through to its validation."""
    t = Translation(base_dir)
    body = dict(raw)
    for section in ("http", "tcp", "dns", "icmp", "grpc"):
        if section not in body:
            continue
        if section == "dns":
            body[section] = _dns(t, body[section], section, blackbox_defaults)
        elif section == "http":
            body[section] = _http(t, body[section], section, blackbox_defaults)
        else:
            body[section] = _SECTIONS[section](t, body[section], section)
    if blackbox_defaults:
        prober = body.get("prober")
        if prober in FAMILY_SECTIONS:
            section = body.get(prober)
            if section is None:
                section = body[prober] = {}
            if isinstance(section, dict):
                section.setdefault("preferred_ip_protocol", "ip6")  # blackbox's default
                if prober == "http" and not isinstance(raw.get("http"), dict):  # made here: blackbox's defaults
                    section.setdefault("accept_encoding", "identity")
        if prober == "dns" and body.get("dns") is None:
            pass  # ModuleSpec says query_name is required
    return body, t.errors


def metrics_table() -> str:
    """README's metric mapping table."""
    lines = ["| blackbox_exporter 0.23 metric | probers | connprobe |", "|---|---|---|"]
    for name, probers, status, note in METRICS:
        lines.append(f"| `{name}` | {probers} | {status}: {note} |")
    return "\n".join(lines)


def markdown_table() -> str:
    """README's key mapping table."""
    lines = ["| blackbox_exporter key | connprobe | status |", "|---|---|---|"]
    for section, key, status, note in KEYS:
        where = key if section == "module" else f"{section}.{key}"
        lines.append(f"| `{where}` | {note} | {status} |")
    return "\n".join(lines)
