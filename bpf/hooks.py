"""The sensor's hook table: each tracepoint the BPF programs (`bpf/sensor.c`) attach to, the tracefs fields
and BTF offsets it needs, the event kind it produces; and `HookStatus`, whether a hook is attached and why not.

A hook is attached alone (`bpf/loader.py`), so a tracepoint this kernel lacks costs only its own event kind.
"""

from __future__ import annotations

from dataclasses import dataclass

from bpf.types import EventKind


@dataclass(frozen=True, slots=True)
class HookSpec:
    category: str
    event: str
    kind: EventKind
    fields: tuple[tuple[str, int | None], ...]  # required field → size in bytes (None: any)
    offsets: tuple[str, ...] = ()  # optional BTF offsets (bpf.btf.OPTIONAL_FIELDS) the program needs
    raw: bool = False  # attached as a raw tracepoint (arguments are the kernel function's, not the format's)

    @property
    def name(self) -> str:
        return f"{self.category}:{self.event}"

    @property
    def macro(self) -> str:
        return f"HOOK_{self.category}_{self.event}".upper()


_ADDRS = (("family", 2), ("saddr", 4), ("daddr", 4), ("saddr_v6", 16), ("daddr_v6", 16))

HOOKS: tuple[HookSpec, ...] = (
    HookSpec("tcp", "tcp_retransmit_skb", EventKind.RETRANSMIT,
             (("skaddr", 8), ("state", 4), ("sport", 2), ("dport", 2), ("err", 4), *_ADDRS)),
    HookSpec("tcp", "tcp_retransmit_synack", EventKind.SYNACK_RETRANSMIT,
             (("skaddr", 8), ("sport", 2), ("dport", 2), *_ADDRS)),
    HookSpec("sock", "inet_sock_set_state", EventKind.STATE,
             (("skaddr", 8), ("oldstate", 4), ("newstate", 4), ("sport", 2), ("dport", 2),
              ("protocol", 2), *_ADDRS)),
    HookSpec("tcp", "tcp_receive_reset", EventKind.RESET_RX,
             (("skaddr", 8), ("sport", 2), ("dport", 2), *_ADDRS)),
    # 6.10+ layout: raw sockaddrs of 28 bytes and a reason; older kernels' layout is not supported.
    HookSpec("tcp", "tcp_send_reset", EventKind.RESET_TX,
             (("skbaddr", 8), ("skaddr", 8), ("state", 4), ("reason", 4), ("saddr", 28), ("daddr", 28))),
    HookSpec("skb", "kfree_skb", EventKind.DROP,
             (("skbaddr", 8), ("location", 8), ("protocol", 2), ("reason", 4))),
    HookSpec("icmp", "icmp_send", EventKind.ICMP_SEND, (("skbaddr", 8), ("type", 4), ("code", 4))),
    # Raw: the regular tracepoint has no socket pointer, so no namespace; the socket's fields come from BTF.
    HookSpec("sock", "inet_sk_error_report", EventKind.SOCK_ERROR, (),
             offsets=("OFF_SK_ERR", "OFF_SK_PROTOCOL", "OFF_INET_SPORT"), raw=True),
    HookSpec("sock", "sock_send_length", EventKind.UDP_SEND,
             (("sk", 8), ("protocol", 2), ("ret", 4), ("flags", 4))),
    HookSpec("sock", "sock_recv_length", EventKind.UDP_RECV,
             (("sk", 8), ("protocol", 2), ("ret", 4), ("flags", 4))),
)


@dataclass(frozen=True, slots=True)
class HookStatus:
    name: str  # "tcp:tcp_retransmit_skb"
    kind: EventKind
    attached: bool
    detail: str  # why not attached, or "" when attached
