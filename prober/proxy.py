"""Which proxy an HTTP request goes through: the one home of `proxy_url`, `proxy_urls`, `no_proxy` and
`proxy_from_environment` (blackbox_exporter's keys, read as Go's `net/http` and `x/net/http/httpproxy` read them).

- `proxy_url` alone: every request goes through it (Go's `http.ProxyURL`).
- with `no_proxy`, or per-scheme `proxy_urls` (which `proxy_from_environment` fills from the agent's
  `HTTP_PROXY` / `HTTPS_PROXY` / `NO_PROXY`, read when the config is loaded): Go's httpproxy rules. A request to
  `localhost` or a loopback address never goes through a proxy; a `no_proxy` entry is `*` (nothing is proxied), an
  IP address or CIDR, `[IPv6]:port` / `IP:port`, or a domain with an optional port: `example.com` matches it and
  its subdomains, `.example.com` and `*.example.com` only its subdomains. The target's host as written in the URL
  is matched (not the address it resolves to), as Go does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ProxyRules", "check_no_proxy", "from_environment", "proxy_for", "split_no_proxy"]


def split_no_proxy(value: object) -> tuple[str, ...]:
    """blackbox's comma-separated `no_proxy` string, or a list: the entries, trimmed and lower-cased."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError("no_proxy: a comma-separated string or a list of hosts, domains, addresses or CIDRs")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"no_proxy: {item!r:.40} is not a host, domain, address or CIDR")
        item = item.strip().lower()
        if item:
            out.append(item)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class _Entry:
    kind: str  # "all", "net", "ip", "domain"
    value: object
    port: str = ""
    match_host: bool = False


def _parse(entry: str) -> _Entry:
    if entry == "*":
        return _Entry("all", None)
    try:
        return _Entry("net", ipaddress.ip_network(entry, strict=False)) if "/" in entry else _Entry(
            "ip", ipaddress.ip_address(entry))
    except ValueError:
        if "/" in entry:
            raise ValueError(f"no_proxy: {entry!r:.60} is not a CIDR") from None
    host, port = entry, ""
    if entry.startswith("["):
        inside, sep, rest = entry[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"no_proxy: {entry!r:.60} is not [IPv6]:port")
        host, port = inside, rest[1:]
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"no_proxy: {entry!r:.60}: {port!r:.10} is not a port")
    if not host:
        raise ValueError(f"no_proxy: {entry!r:.60} has no host")
    try:
        return _Entry("ip", ipaddress.ip_address(host), port)
    except ValueError:
        pass
    if host.startswith("*."):
        host = host[1:]
    match_host = not host.startswith(".")
    name = host if host.startswith(".") else "." + host
    labels = name[1:].split(".")
    if not name[1:] or not all(lb and all(c.isalnum() or c in "-_" for c in lb) and lb.isascii() for lb in labels):
        raise ValueError(f"no_proxy: {entry!r:.60} is not a host, domain, address or CIDR")
    return _Entry("domain", name, port, match_host)


def check_no_proxy(entries: tuple[str, ...]) -> tuple[str, ...]:
    for entry in entries:
        _parse(entry)
    return entries


class ProxyRules:
    """A module's proxy settings made ready to answer `proxy_for` (built once per spec)."""

    __slots__ = ("all_direct", "entries", "go_rules", "proxies")

    def __init__(self, proxy_url: str | None, proxy_urls: Mapping[str, str], no_proxy: tuple[str, ...]) -> None:
        if proxy_urls:
            self.proxies = dict(proxy_urls)
        elif proxy_url is not None:
            self.proxies = {"http": proxy_url, "https": proxy_url}
        else:
            self.proxies = {}
        self.go_rules = bool(proxy_urls) or bool(no_proxy)  # else Go's http.ProxyURL: everything through it
        self.entries = tuple(_parse(e) for e in no_proxy)
        self.all_direct = any(e.kind == "all" for e in self.entries)

    def proxy_for(self, scheme: str, host: str, port: int | None) -> str | None:
        proxy = self.proxies.get(scheme)
        if proxy is None or not self.go_rules:
            return proxy
        host = host.lower().rstrip(".").strip("[]")
        if host == "localhost" or self.all_direct:
            return None
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            ip = None
        if ip is not None and ip.is_loopback:
            return None
        port_text = str(port if port is not None else (443 if scheme == "https" else 80))
        for e in self.entries:
            if e.port and e.port != port_text:
                continue
            if e.kind == "net" and ip is not None and ip.version == e.value.version and ip in e.value:
                return None
            if e.kind == "ip" and ip is not None and ip == e.value:
                return None
            if e.kind == "domain" and (host.endswith(e.value) or (e.match_host and host == e.value[1:])):
                return None
        return proxy


_rules: dict[int, tuple[object, ProxyRules]] = {}


def proxy_for(spec, scheme: str, host: str, port: int | None) -> str | None:
    """The proxy URL a request of an `HTTPSpec` to scheme://host:port goes through, or None (direct)."""
    if spec.proxy_url is None and not spec.proxy_urls:
        return None
    cached = _rules.get(id(spec))
    if cached is None or cached[0] is not spec:
        if len(_rules) > 10000:
            _rules.clear()
        cached = _rules[id(spec)] = (spec, ProxyRules(spec.proxy_url, spec.proxy_urls, spec.no_proxy))
    return cached[1].proxy_for(scheme, host, port)


def from_environment(environ: Mapping[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """`proxy_from_environment`: (proxy_urls, no_proxy) from HTTP_PROXY, HTTPS_PROXY and NO_PROXY (the upper-case
    name first, as Go reads them; a value without a scheme is an http:// proxy, as Go takes it)."""
    def get(name: str) -> str:
        return (environ.get(name) or environ.get(name.lower()) or "").strip()

    urls = {}
    for scheme, var in (("http", "HTTP_PROXY"), ("https", "HTTPS_PROXY")):
        value = get(var)
        if value:
            urls[scheme] = value if "://" in value else f"http://{value}"
    return urls, split_no_proxy(get("NO_PROXY"))
