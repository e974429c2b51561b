"""What a finished TLS handshake tells blackbox's metrics: the version, when the peer's certificates expire, and
which certificate it was.

`tls_facts(ssl_object)` is called once per handshake (HTTP hops, TCP `tls`/STARTTLS); `Attempt.tls()` puts its
values in the result, the app turns them into `probe_tls_version_info`, `probe_ssl_earliest_cert_expiry`,
`probe_ssl_last_chain_expiry_timestamp_seconds` and `probe_ssl_last_chain_info`.
"""

from __future__ import annotations

import _ssl
import hashlib
import ssl
from dataclasses import dataclass
from typing import Any

# TLS versions as the float stored in a result's values (the metric's label is the name)
TLS_VERSIONS = {"TLSv1": 1.0, "TLSv1.1": 1.1, "TLSv1.2": 1.2, "TLSv1.3": 1.3}
TLS_VERSION_NAMES = {1.0: "TLS 1.0", 1.1: "TLS 1.1", 1.2: "TLS 1.2", 1.3: "TLS 1.3"}
MAX_LABEL = 256  # a certificate's names can be long; a label value is cut there

# attribute names as Go's crypto/x509/pkix prints them (what blackbox's labels hold)
_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
          "localityName": "L", "stateOrProvinceName": "ST", "streetAddress": "STREET", "postalCode": "POSTALCODE",
          "serialNumber": "SERIALNUMBER"}


@dataclass(frozen=True, slots=True)
class TLSFacts:
    values: dict[str, float]  # tls_version, ssl_earliest_cert_expiry, ssl_last_chain_expiry
    leaf: tuple[tuple[str, str], ...]  # fingerprint_sha256, subject, issuer, subjectalternative


def _not_after(info: dict[str, Any]) -> float | None:
    text = info.get("notAfter")
    if not text:
        return None
    try:
        return float(ssl.cert_time_to_seconds(text))
    except ValueError:
        return None


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;' else c for c in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def dn_text(rdns: Any) -> str:
    """A subject or issuer (as `ssl` decodes it) the way Go prints a pkix.Name: the last RDN first."""
    parts = []
    for rdn in reversed(rdns or ()):
        parts.append("+".join(f"{_SHORT.get(k, k)}={_escape(str(v))}" for k, v in rdn))
    return ",".join(parts)[:MAX_LABEL]


def tls_facts(sslobj: Any) -> TLSFacts | None:
    """The facts of a handshake (None without one). The earliest expiry is over every certificate the peer
    sent; the last chain expiry is the earliest within the verified chain (the one OpenSSL built)."""
    if sslobj is None:
        return None
    values: dict[str, float] = {}
    version = TLS_VERSIONS.get(sslobj.version() or "")
    if version is not None:
        values["tls_version"] = version
    inner = getattr(sslobj, "_sslobj", sslobj)  # SSLObject/SSLSocket wrap the C object holding the chains
    sent = _chain(inner, "get_unverified_chain")
    verified = _chain(inner, "get_verified_chain")
    if not sent:  # the leaf alone (a verified handshake always has it)
        leaf = sslobj.getpeercert() or {}
        sent = [(leaf, b"")] if leaf else []
    times = [t for info, _ in sent if (t := _not_after(info)) is not None]
    if times:
        values["ssl_earliest_cert_expiry"] = min(times)
    chain_times = [t for info, _ in verified if (t := _not_after(info)) is not None]
    if chain_times:
        values["ssl_last_chain_expiry"] = min(chain_times)
    leaf_info, leaf_der = (verified or sent or [({}, b"")])[0]
    if not leaf_der:
        leaf_der = sslobj.getpeercert(binary_form=True) or b""
    leaf: tuple[tuple[str, str], ...] = ()
    if leaf_der:
        sans = ",".join(v for k, v in leaf_info.get("subjectAltName", ()) if k == "DNS")
        leaf = (("fingerprint_sha256", hashlib.sha256(leaf_der).hexdigest()),
                ("issuer", dn_text(leaf_info.get("issuer"))), ("subject", dn_text(leaf_info.get("subject"))),
                ("subjectalternative", sans[:MAX_LABEL]))
    return TLSFacts(values, leaf)


def _chain(inner: Any, method: str) -> list[tuple[dict[str, Any], bytes]]:
    get = getattr(inner, method, None)
    if get is None:
        return []
    try:
        certs = get() or []
    except (ValueError, ssl.SSLError):
        return []
    out = []
    for cert in certs:
        try:
            out.append((cert.get_info(), cert.public_bytes(_ssl.ENCODING_DER)))
        except (AttributeError, ValueError, ssl.SSLError):
            continue
    return out


def leaf_info(sslobj: Any) -> dict[str, Any]:
    """The peer's leaf certificate as `ssl` decodes it: of a verified handshake, else the first certificate the
    peer sent (an unverified one: grpc's second handshake); {} without one."""
    if sslobj is None:
        return {}
    info = sslobj.getpeercert() or {}
    if not info:
        sent = _chain(getattr(sslobj, "_sslobj", sslobj), "get_unverified_chain")
        info = sent[0][0] if sent else {}
    return info


def expires_within(cert: dict[str, Any] | None, days: float) -> bool:
    """`tls.min_cert_days` (http, tcp, grpc): True when the leaf certificate expires in fewer than `days` days
    from now — or its expiry is not known (no certificate, an unreadable date): the validator fails then too."""
    import time

    not_after = _not_after(cert or {})
    return not_after is None or (not_after - time.time()) / 86400 < days


class EncryptedKey(ValueError):
    """A client key encrypted with a pass phrase: not supported (there is no key to give one)."""


def no_passphrase() -> bytes:
    """`load_cert_chain`'s `password`: an encrypted key is a one-line error, where OpenSSL would otherwise ask for
    the pass phrase on the process's terminal and block (check-config, or the agent run in a shell)."""
    raise EncryptedKey("the private key is encrypted with a pass phrase (not supported: give it unencrypted)")


def load_client_chain(ctx: ssl.SSLContext, tls: Any) -> None:
    """Load a TLS setting's client certificate and key into `ctx`: from `cert_file` / `key_file`, or from inline PEM
    (`cert`, `key`), which OpenSSL reads from an anonymous in-memory file (memfd: never written to disk). An
    encrypted key raises `EncryptedKey` (never a pass phrase prompt)."""
    import contextlib
    import os

    key_text = tls.key.get_secret_value() if tls.key is not None else None

    def memfd(text: str, stack: contextlib.ExitStack) -> str:
        fd = os.memfd_create("connprobe-tls", os.MFD_CLOEXEC)
        stack.callback(os.close, fd)
        os.write(fd, text.encode())
        return f"/proc/self/fd/{fd}"

    with contextlib.ExitStack() as stack:
        if tls.cert_file is not None:
            certfile = tls.cert_file
        elif tls.cert is not None:
            certfile = memfd(tls.cert, stack)
        else:
            return
        keyfile = tls.key_file if tls.key_file is not None else (
            memfd(key_text, stack) if key_text is not None else None)
        ctx.load_cert_chain(certfile, keyfile, password=no_passphrase)
