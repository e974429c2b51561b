"""What the agent's `/probe` lets a caller do. Scheduled probes come from the operator's config file and are
never restricted here; on `/probe` the caller picks the target and the source, so:

- `source=` names a source the loaded config declares ("host", or the netns name of a configured probe's
  `source: netns NAME`, with or without "netns "); a path or any other name is refused before anything is
  opened.
- link-local and cloud metadata addresses (169.254.0.0/16, fe80::/10, fd00:ec2::254) are refused, the
  resolved addresses included, unless the module lists them in `allowed_targets` (an address, a CIDR that
  holds them, or the exact host name; a wildcard does not unlock them).
- a module that carries secrets (configured `http.headers`, `proxy_headers`, an `oauth2` token) sends them only to
  targets its `allowed_targets` matches (host name wildcards, or CIDRs holding every resolved address); without
  the list it is refused. An `oauth2.token_url` is configured by the operator, like `proxy_url`: its connects pass
  the same per-connect check as the target's (`connect_guard`: link-local and metadata addresses refused unless
  listed), nothing more.
- `ProbeLimiter`: a concurrency cap and a token-bucket rate, answered with 429 and `Retry-After`.

`check_target()` answers with a one-line reason (or None); `connect_guard()` builds the callable that
`prober.sockets.connect_guard` consults before each connect of the probe, so a redirect or a name that
resolves elsewhere on the second lookup cannot reach what the first check refused.
"""

from __future__ import annotations

import errno
import fnmatch
import ipaddress
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prober.spec import ModuleSpec, ProbeSpec

__all__ = ["BLOCKED_NETWORKS", "ProbeLimiter", "TargetRefused", "carries_secrets", "check_target", "connect_guard",
           "declared_source"]

BLOCKED_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128"))


class TargetRefused(PermissionError):
    """A connect the `/probe` policy refuses (raised before the packet; the prober reports it as a failure)."""

    def __init__(self, reason: str):
        super().__init__(errno.EACCES, reason)
        self.reason = reason


def declared_source(name: str, probes: Iterable[ProbeSpec]) -> str:
    """The probe source `name` stands for, or ValueError: "host", or the netns name of a configured probe."""
    if name in ("", "host"):
        return "host"
    if "/" in name or "\0" in name:
        raise ValueError("source: a path is never accepted on /probe; name a source of the configuration "
                         "(host or the netns name of a configured probe)")
    wanted = name.strip()
    if wanted.startswith("netns "):  # the config's own spelling, as blackbox-style jobs pass it
        wanted = wanted[len("netns "):].strip()
    for p in probes:
        s = p.source.strip()
        if s.startswith("netns ") and s[len("netns "):].strip() == wanted:
            return s
    shown = name if len(name) <= 64 and name.isprintable() else name[:64].encode("unicode_escape").decode() + "..."
    raise ValueError(f"source: {shown!r} is not a source of the configuration (host or the netns name of a "
                     "configured probe)")


def carries_secrets(module: ModuleSpec) -> bool:
    if module.websocket is not None and module.websocket.headers:
        return True
    return module.http is not None and bool(module.http.headers or module.http.proxy_headers
                                            or module.http.oauth2 is not None)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


@dataclass(frozen=True)
class _Allowed:
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    patterns: tuple[str, ...]

    @classmethod
    def of(cls, module: ModuleSpec) -> _Allowed:
        nets, pats = [], []
        for entry in module.allowed_targets:
            try:
                nets.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                pats.append(entry.lower().rstrip("."))
        return cls(tuple(nets), tuple(pats))

    def host_matches(self, host: str) -> bool:
        h = host.lower().rstrip(".")
        return any(fnmatch.fnmatchcase(h, p) for p in self.patterns)

    def host_named(self, host: str) -> bool:
        h = host.lower().rstrip(".")
        return any("*" not in p and h == p for p in self.patterns)

    def holds(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(addr.version == n.version and addr in n for n in self.networks)


def _blocked(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == n.version and addr in n for n in BLOCKED_NETWORKS)


def check_target(module: ModuleSpec, host: str, addresses: Iterable[str]) -> str | None:
    """Why `/probe` must not probe `host` (resolved to `addresses`) with `module`; None when it may."""
    allowed = _Allowed.of(module)
    addrs = [a for a in (_address(x) for x in addresses) if a is not None]
    for a in addrs:
        if _blocked(a) and not (allowed.holds(a) or allowed.host_named(host)):
            shown = host if _address(host) == a else f"{host} resolves to {a}"
            return (f"target: {shown}, a link-local or metadata address; refused on /probe unless the module "
                    "lists it in allowed_targets")
    if carries_secrets(module):
        if not module.allowed_targets:
            return ("target: the module sends configured headers and has no allowed_targets; on /probe it only "
                    "probes targets its allowed_targets list")
        if not (allowed.host_matches(host) or (addrs and all(allowed.holds(a) for a in addrs))):
            return f"target: {host} is not in the module's allowed_targets (its configured headers stay home)"
    return None


def connect_guard(module: ModuleSpec, host: str, nameservers: Iterable[str] = ()) -> Callable[[str], None]:
    """For `prober.sockets.connect_guard`: refuses a connect to an address `check_target` would refuse
    (the resolver's own nameservers excepted)."""
    exempt = frozenset(nameservers)

    def guard(address: str) -> None:
        if address in exempt:
            return
        a = _address(address)
        if a is None:  # the probers connect to numeric addresses only: anything else fails closed
            raise TargetRefused(f"refused by /probe policy: target: {address!r} is not a numeric address")
        literal = _address(host)
        # an address target that leads elsewhere was redirected: the new address speaks for itself
        reason = check_target(module, address if literal is not None and literal != a else host, [address])
        if reason is None and carries_secrets(module):
            # a redirect to another host: its address must be allowed on its own
            allowed = _Allowed.of(module)
            if not allowed.host_matches(host) and not allowed.holds(a):
                reason = f"target: {address} is not in the module's allowed_targets"
        if reason is not None:
            raise TargetRefused(f"refused by /probe policy: {reason}")

    return guard


class ProbeLimiter:
    """At most `concurrency` `/probe` calls at once, and `rate` per second on average (bursts of `burst`)."""

    def __init__(self, concurrency: int = 32, rate: float = 20.0, burst: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.concurrency = concurrency
        self.rate = rate
        self.burst = float(burst if burst is not None else max(1, int(rate * 2)))
        self.clock = clock
        self.running = 0
        self.refused = {"concurrency": 0, "rate": 0}
        self._tokens = self.burst
        self._stamp = clock()

    def try_acquire(self) -> tuple[str, int] | None:
        """None when a call may start (then `release()` it), else (why, seconds to wait)."""
        if self.running >= self.concurrency:
            self.refused["concurrency"] += 1
            return "too many /probe calls in flight", 1
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1.0:
            self.refused["rate"] += 1
            return "/probe rate limit reached", max(1, math.ceil((1.0 - self._tokens) / self.rate))
        self._tokens -= 1.0
        self.running += 1
        return None

    def release(self) -> None:
        self.running -= 1
