"""What a finished TLS handshake tells blackbox's metrics: the version, and when the peer's certificates expire.

`tls_facts(ssl_object)` is called once per handshake (HTTP hops, TCP `tls`/STARTTLS); the probers put its
values in `Attempt.values`, the app turns them into `probe_tls_version_info`, `probe_ssl_earliest_cert_expiry`
and `probe_ssl_last_chain_expiry_timestamp_seconds`.
"""

from __future__ import annotations

import ssl
from typing import Any

# TLS versions as the float stored in a result's values (the metric's label is the name)
TLS_VERSIONS = {"TLSv1": 1.0, "TLSv1.1": 1.1, "TLSv1.2": 1.2, "TLSv1.3": 1.3}
TLS_VERSION_NAMES = {1.0: "TLS 1.0", 1.1: "TLS 1.1", 1.2: "TLS 1.2", 1.3: "TLS 1.3"}


def _not_after(info: dict[str, Any]) -> float | None:
    text = info.get("notAfter")
    if not text:
        return None
    try:
        return float(ssl.cert_time_to_seconds(text))
    except ValueError:
        return None


def tls_facts(sslobj: Any) -> dict[str, float]:
    """{"tls_version": 1.3, "ssl_earliest_cert_expiry": unix time, "ssl_last_chain_expiry": unix time} as far as
    they are known. The earliest expiry is over every certificate the peer sent; the last chain expiry is the
    earliest expiry within the verified chain (one chain: the one OpenSSL built)."""
    out: dict[str, float] = {}
    if sslobj is None:
        return out
    version = TLS_VERSIONS.get(sslobj.version() or "")
    if version is not None:
        out["tls_version"] = version
    inner = getattr(sslobj, "_sslobj", sslobj)  # SSLObject/SSLSocket wrap the C object holding the chains
    sent = _chain(inner, "get_unverified_chain")
    verified = _chain(inner, "get_verified_chain")
    if not sent:  # the leaf alone (a verified handshake always has it)
        leaf = sslobj.getpeercert() or {}
        sent = [t for t in (_not_after(leaf),) if t is not None]
    if sent:
        out["ssl_earliest_cert_expiry"] = min(sent)
    if verified:
        out["ssl_last_chain_expiry"] = min(verified)
    return out


def _chain(inner: Any, method: str) -> list[float]:
    get = getattr(inner, method, None)
    if get is None:
        return []
    try:
        certs = get() or []
    except (ValueError, ssl.SSLError):
        return []
    out = []
    for cert in certs:
        info = cert.get_info() if hasattr(cert, "get_info") else {}
        t = _not_after(info)
        if t is not None:
            out.append(t)
    return out
