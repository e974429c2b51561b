"""Probe targets: `parse_target(kind, text)` splits a configured target per probe kind into a `Target`
(host, port, scheme; the address is filled in once resolved). Config validation (`prober/spec.py`) and the
runner both use it, so a target that validates is one the prober can run.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from prober.redact import redact_url
from prober.resolve import is_ip


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed probe target: where to connect (the address is resolved already, or None for dns)."""

    raw: str
    host: str
    port: int
    scheme: str = ""
    address: str | None = None


def parse_target(kind: str, target: str, dns_port: int = 53) -> Target:
    """Split a target string per prober; raises ValueError with a message for config errors. `dns_port`: a dns
    target's port when it names none (853 for DNS over TLS)."""
    if kind == "http":
        return _url_target(target, "http", "https", "http target must be an http:// or https:// URL")
    if kind in ("tcp", "grpc"):
        u = urllib.parse.urlsplit("//" + target)
        try:
            port = u.port
        except ValueError:
            port = None
        if not u.hostname or port is None:
            raise ValueError(f"{kind} target must be host:port (IPv6 as [addr]:port), got {redact_url(target)!r}")
        return Target(target, u.hostname, port)
    if kind == "dns":
        if not target or target == "resolv.conf":
            return Target(target, "", dns_port)
        u = urllib.parse.urlsplit("//" + target)
        try:
            port = u.port or dns_port
        except ValueError:
            raise ValueError(f"dns target must be a server address[:port], got {redact_url(target)!r}") from None
        if not u.hostname:
            raise ValueError(f"dns target must be a server address[:port], got {redact_url(target)!r}")
        return Target(target, u.hostname, port)
    if kind == "icmp":
        host = target[1:-1] if target.startswith("[") and target.endswith("]") else target
        if not host or "/" in host or (":" not in host and not urllib.parse.urlsplit("//" + host).hostname):
            raise ValueError(f"icmp target must be a host name or address (no port), got {redact_url(target)!r}")
        if ":" in host and not is_ip(host):
            raise ValueError(f"icmp target must be a host name or address (no port), got {redact_url(target)!r}")
        return Target(target, host, 0)
    if kind == "websocket":
        return _url_target(target, "ws", "wss", "websocket target must be a ws:// or wss:// URL")
    if kind == "unix":
        if not target.startswith("/") or "\x00" in target or len(target.encode()) > 107:
            raise ValueError(f"unix target must be an absolute socket path (at most 107 bytes), got {target!r}")
        return Target(target, "", 0, "unix", target)
    raise ValueError(f"unknown prober {kind!r}")


def _url_target(target: str, plain: str, secure: str, must: str) -> Target:
    """A URL target of scheme `plain` (port 80 by default) or `secure` (443)."""
    u = urllib.parse.urlsplit(target)
    if u.scheme not in (plain, secure) or not u.hostname:
        raise ValueError(f"{must}, got {redact_url(target)!r}")
    try:
        port = u.port or (443 if u.scheme == secure else 80)
    except ValueError:
        raise ValueError(f"invalid port in {redact_url(target)!r}") from None
    return Target(target, u.hostname, port, u.scheme)
