"""Fault injectors for the lab. Each is a context manager: switched on at `with`, undone on exit even when
the body raises (and undone by `Lab.down()` if it is still on then).

    with lab.policy_drop("srv1", direction="in", proto="tcp", port=8080):       # nftables drop
    with lab.policy_drop("client", direction="out", action="reject", port=8080):  # nftables reject
    with lab.packet_loss(0.2, link="client", direction="both"):                 # cls_bpf random loss
    with lab.random_drop(0.2, link="client", direction="both"):                 # nftables numgen random loss
    with lab.dns_fault("srv1.lab.test", "nxdomain"):                            # DNS modes
    with lab.slow_upstream("srv1", 0.3):  with lab.http_status("srv1", 503):  with lab.no_listener("srv1"):
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from connprobe.lab import control
from connprobe.lab.plumbing import LabError, in_ns, ip, named_netns, nft


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class _Controlled(Protocol):
    @property
    def control(self) -> Path: ...


class LabHandle(Protocol):
    """What an injector needs of its lab (`connprobe.lab.topology.Lab` is the one; it imports this module, not
    the other way round): its namespaces by role, its servers' control sockets, its DNS server's, fault ids."""

    @property
    def dns_control(self) -> Path: ...

    def ns(self, role: str) -> _Named: ...

    def server(self, role: str) -> _Controlled: ...

    def next_fault_id(self) -> int: ...

HOOKS = {"in": "input", "out": "output", "forward": "forward"}
FAMILIES = {"inet": None, "ipv4": "ipv4", "ipv6": "ipv6"}
LOSS_SOURCE = Path(__file__).with_name("loss.c")
CLSACT_PARENT = {"ingress": "ffff:fff2", "egress": "ffff:fff3"}


# Namespaces whose TCP senders the loss injectors make emit wire-sized segments (never the router: it
# only forwards, and never the root namespace).
ENDPOINT_ROLES = ("client", "srv1", "srv2", "dns")
LINK_DEVS = {"client": "c0", "srv1": "s-srv1", "srv2": "s-srv2", "dns": "s-dns"}
DIRECTIONS = ("egress", "ingress", "both")


class _Fault(AbstractContextManager):
    on_enter = staticmethod(lambda fault: None)
    on_exit = staticmethod(lambda fault: None)
    active = False

    def __enter__(self):
        self._apply()
        self.active = True
        self.on_enter(self)
        return self

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        self.active = False
        self.on_exit(self)
        self._undo()

    def _apply(self) -> None:
        raise NotImplementedError

    def _undo(self) -> None:
        raise NotImplementedError

    def bites(self) -> int | None:
        """How many packets the fault acted on so far (None: it cannot tell; the probe's outcome must)."""
        return None


class WireSized:
    """While on, the TCP senders of the lab's endpoint namespaces emit one wire-sized segment per packet.

    veth carries 64 KB GSO super-packets, so a random dropper on the path loses a handful of them, which
    SACK repairs at once: the fault would not reliably slow a transfer. With `gso_max_segs 1` on each
    endpoint's eth0 (read by TCP when a connection picks its route), every packet is one segment, as on a
    real wire. The previous values are put back on exit, also when the body raised.
    """

    def __init__(self, lab: LabHandle):
        self.ns_names = [lab.ns(role).name for role in ENDPOINT_ROLES]
        self._before: dict[str, str] = {}

    def apply(self) -> None:
        try:
            for ns in self.ns_names:
                info = json.loads(ip(ns, "-d", "-j", "link", "show", "dev", "eth0"))[0]
                self._before[ns] = str(info.get("gso_max_segs", 65535))
                ip(ns, "link", "set", "dev", "eth0", "gso_max_segs", "1")
        except Exception:
            self.undo()
            raise

    def undo(self) -> None:
        names = set(named_netns())
        errors = []
        for ns, value in reversed(list(self._before.items())):
            if ns in names:
                try:
                    ip(ns, "link", "set", "dev", "eth0", "gso_max_segs", value)
                except LabError as exc:
                    errors.append(str(exc))
        self._before.clear()
        if errors:
            raise LabError("; ".join(errors))


def _link_args(what: str, fraction: float, link: str, direction: str, proto: str | None) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise LabError(f"{what}: fraction {fraction} must be between 0 and 1")
    if direction not in DIRECTIONS:
        raise LabError(f"{what}: direction {direction!r} must be egress, ingress or both")
    if link not in LINK_DEVS:
        raise LabError(f"{what}: link {link!r} must be client, srv1, srv2 or dns")
    if proto not in (None, "tcp", "udp"):
        raise LabError(f"{what}: proto {proto!r} must be tcp, udp or None")


class PolicyDrop(_Fault):
    """An nftables rule in one lab namespace that drops (or rejects) matching packets.

    direction: "in" (input hook), "out" (output hook) or "forward" (the router's forward hook);
    proto: "tcp" | "udp"; port: destination port to match (None: every port); action: "drop" | "reject"
    (a TCP reset for tcp, ICMP port unreachable for udp); family: "inet" (both), "ipv4" or "ipv6";
    daddr: only packets to this address (e.g. a virtual IP); port_side: match the "dst" port (default)
    or the "src" port (e.g. a server's answers); expr: extra nftables match expressions, appended as
    given (e.g. "tcp flags & (syn | ack) == ack" to spare the handshake and drop the data after it).
    """

    def __init__(self, lab: LabHandle, ns: str, direction: str = "in", proto: str = "tcp", port: int | None = None,
                 action: str = "drop", family: str = "inet", daddr: str | None = None, port_side: str = "dst",
                 expr: str | None = None):
        if direction not in HOOKS:
            raise LabError(f"policy_drop: direction {direction!r} must be one of {', '.join(HOOKS)}")
        if proto not in ("tcp", "udp"):
            raise LabError(f"policy_drop: proto {proto!r} must be tcp or udp")
        if action not in ("drop", "reject"):
            raise LabError(f"policy_drop: action {action!r} must be drop or reject")
        if family not in FAMILIES:
            raise LabError(f"policy_drop: family {family!r} must be one of {', '.join(FAMILIES)}")
        if port_side not in ("dst", "src"):
            raise LabError(f"policy_drop: port_side {port_side!r} must be dst or src")
        if port is not None and not 0 < port < 65536:
            raise LabError(f"policy_drop: port {port} is not a port number")
        self.lab, self.role = lab, ns
        self.ns_name = lab.ns(ns).name
        self.table = f"connprobe_fault_{lab.next_fault_id()}"
        match = [f"meta l4proto {proto}"]
        if FAMILIES[family]:
            match.insert(0, f"meta nfproto {FAMILIES[family]}")
        if daddr:
            match.append(f"{'ip6' if ':' in daddr else 'ip'} daddr {daddr}")
        if port is not None:
            match.append(f"th {port_side[0]}port {port}")
        if expr:
            match.append(expr)
        verdict = "drop" if action == "drop" else ("reject with tcp reset" if proto == "tcp" else "reject")
        self.rule = " ".join(match) + f" counter {verdict}"
        self.hook = HOOKS[direction]

    def _apply(self) -> None:
        nft(self.ns_name, f"table inet {self.table} {{\n chain fault {{\n"
                          f"  type filter hook {self.hook} priority -10; policy accept;\n  {self.rule}\n }}\n}}\n")

    def _undo(self) -> None:
        if self.ns_name in named_netns():
            in_ns(self.ns_name, "nft", "delete", "table", "inet", self.table)

    def bites(self) -> int:
        return self.matched()

    def matched(self) -> int:
        """Packets the rule has matched so far (its nftables counter)."""
        out = json.loads(in_ns(self.ns_name, "nft", "-j", "list", "table", "inet", self.table))
        for item in out["nftables"]:
            rule = item.get("rule")
            if rule:
                for expr in rule["expr"]:
                    if "counter" in expr:
                        return int(expr["counter"]["packets"])
        return 0


class IcmpEchoDrop(PolicyDrop):
    """An nftables rule in one lab namespace that drops (or rejects, with admin-prohibited) ICMP and ICMPv6 echo
    requests. direction and family as `PolicyDrop`; action "drop" | "reject"."""

    def __init__(self, lab: LabHandle, ns: str, direction: str = "in", action: str = "drop", family: str = "inet"):
        super().__init__(lab, ns, direction=direction, proto="udp", action=action, family=family)  # validates
        protos = {"inet": "{ icmp, ipv6-icmp }", "ipv4": "icmp", "ipv6": "ipv6-icmp"}[family]
        types = {"inet": "{ 8, 128 }", "ipv4": "8", "ipv6": "128"}[family]
        verdict = "drop" if action == "drop" else "reject with icmpx admin-prohibited"
        self.rule = f"meta l4proto {protos} @th,0,8 {types} counter {verdict}"


class PacketLoss(_Fault):
    """Lose a random `fraction` of packets on a router link, with a tc clsact BPF program (no netem here).

    link: "client" (the router's port toward the client) or a server role ("srv1", "srv2", "dns");
    direction: "egress" (router → that namespace), "ingress" (that namespace → router) or "both";
    proto: "tcp", "udp" or None for every IP packet. The kernel frees each lost packet with reason
    TC_EGRESS / TC_INGRESS — distinct from a policy drop's NETFILTER_DROP. While on, senders emit
    wire-sized segments (`WireSized`), so the loss hits segments, not 64 KB super-packets.
    """

    def __init__(self, lab: LabHandle, fraction: float, link: str = "client", direction: str = "both",
                 proto: str | None = "tcp"):
        _link_args("packet_loss", fraction, link, direction, proto)
        self.lab = lab
        self.fraction = fraction
        self.dev = LINK_DEVS[link]
        self.directions = ("egress", "ingress") if direction == "both" else (direction,)
        self.l4 = {None: 0, "tcp": 6, "udp": 17}[proto]
        self.router = lab.ns("router").name
        self._bpf = None
        self._wire = WireSized(lab)

    def _apply(self) -> None:
        self._wire.apply()
        try:
            self._attach()
        except Exception:
            self._wire.undo()
            raise

    def _attach(self) -> None:
        from bcc import BPF  # imported here: only loss injection needs bcc
        from pyroute2 import IPRoute

        threshold = min(int(self.fraction * 2**32), 2**32 - 1)
        cflags = [f"-DTHRESHOLD={threshold}U", f"-DL4PROTO={self.l4}"]
        self._bpf = BPF(text=LOSS_SOURCE.read_bytes(), cflags=cflags)
        fn = self._bpf.load_func(b"lab_loss", BPF.SCHED_CLS)
        def attach() -> None:
            with IPRoute(netns=self.router) as ipr:  # a netlink socket inside the router namespace
                idx = ipr.link_lookup(ifname=self.dev)[0]
                ipr.tc("add", "clsact", idx)
                for d in self.directions:
                    ipr.tc("add-filter", "bpf", idx, ":1", fd=fn.fd, name=fn.name,
                           parent=CLSACT_PARENT[d], classid=1, direct_action=True)

        try:
            # pyroute2 runs an asyncio loop of its own: give it a thread where no loop is running.
            with ThreadPoolExecutor(1, thread_name_prefix="lab-tc") as pool:
                pool.submit(attach).result()
        except Exception:
            self._undo()
            raise

    def _undo(self) -> None:
        try:
            if self.router in named_netns():
                in_ns(self.router, "tc", "qdisc", "del", "dev", self.dev, "clsact", check=False)
        finally:
            try:
                if self._bpf is not None:
                    self._bpf.cleanup()
                    self._bpf = None
            finally:
                self._wire.undo()

    def bites(self) -> int:
        return self.stats()[1]

    def stats(self) -> tuple[int, int]:
        """(packets considered, packets dropped) so far."""
        if self._bpf is None:
            return (0, 0)
        t = self._bpf[b"loss_stats"]
        return (t[0].value, t[1].value)


class RandomDrop(PolicyDrop):
    """Lose a random `fraction` of packets on a router link with an nftables `numgen random` rule.

    Same arguments as `PacketLoss`. The kernel frees each lost packet with reason NETFILTER_DROP — the
    reason a policy drop has — so only the pattern (drops interleaved with progress) tells it from a policy.
    Senders emit wire-sized segments while it is on (`WireSized`).
    """

    SCALE = 1_000_000

    def __init__(self, lab: LabHandle, fraction: float, link: str = "client", direction: str = "both",
                 proto: str | None = "tcp"):
        _link_args("random_drop", fraction, link, direction, proto)
        self.lab, self.role = lab, "router"
        self.ns_name = lab.ns("router").name
        self.table = f"connprobe_fault_{lab.next_fault_id()}"
        self.hook = "forward"
        dev = LINK_DEVS[link]
        match = [] if proto is None else [f"meta l4proto {proto}"]
        threshold = min(int(fraction * self.SCALE), self.SCALE)
        # egress: router → that namespace (leaves by the link's device); ingress: arrives by it
        sides = {"egress": ("oifname",), "ingress": ("iifname",), "both": ("oifname", "iifname")}[direction]
        self.rules = [" ".join([*match, f'{side} "{dev}"', f"numgen random mod {self.SCALE} < {threshold}",
                                "counter drop"]) for side in sides]
        self.rule = "\n  ".join(self.rules)
        self._wire = WireSized(lab)

    def _apply(self) -> None:
        self._wire.apply()
        try:
            super()._apply()
        except Exception:
            self._wire.undo()
            raise

    def _undo(self) -> None:
        try:
            super()._undo()
        finally:
            self._wire.undo()

    def matched(self) -> int:
        """Packets dropped so far (the sum of the rules' nftables counters)."""
        out = json.loads(in_ns(self.ns_name, "nft", "-j", "list", "table", "inet", self.table))
        return sum(int(expr["counter"]["packets"]) for item in out["nftables"] if "rule" in item
                   for expr in item["rule"]["expr"] if "counter" in expr)


class DnsFault(_Fault):
    """Switch how the lab DNS server answers one name: nxdomain, servfail, refused, timeout, slow."""

    def __init__(self, lab: LabHandle, name: str, mode: str, delay: float = 0.0):
        self.lab = lab
        self.name = name if name.endswith(".") else name + "."
        self.mode, self.delay = mode, delay
        self._before: dict | None = None

    def _apply(self) -> None:
        state = control.request(self.lab.dns_control, "ping")
        self._before = state["modes"].get(self.name, {"mode": "answer", "delay": 0.0})
        control.request(self.lab.dns_control, "mode", name=self.name, mode=self.mode, delay=self.delay)

    def _undo(self) -> None:
        assert self._before is not None
        control.request(self.lab.dns_control, "mode", name=self.name, **self._before)


class ServerFault(_Fault):
    """Set a lab HTTP server's delay, forced status, or listening state; restore the old values on exit."""

    def __init__(self, lab: LabHandle, server: str, **settings):
        self.lab = lab
        self.sock = lab.server(server).control
        self.settings = settings
        self._before: dict = {}

    def _apply(self) -> None:
        state = control.request(self.sock, "ping")
        keymap = {"delay": "delay", "status": "status", "listen": "listening"}
        self._before = {k: state[keymap[k]] for k in self.settings}
        control.request(self.sock, "set", **self.settings)

    def _undo(self) -> None:
        control.request(self.sock, "set", **self._before)
