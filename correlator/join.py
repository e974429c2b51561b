"""Joining kernel events to the probe that caused them — pure functions over recorded data.

An event belongs to a probe when one of its endpoints is the local endpoint (address, port, protocol) of
one of the probe's flows — its TCP connections, redirect hops included, and the UDP sockets of its own DNS
queries — and it happened inside the probe's time span plus a grace period. Matching on the local
endpoint, not the whole 4-tuple, keeps the server-side events of a flow (reversed tuple) and those seen
after a DNAT rewrote the destination (a Service VIP). When an event was seen in the probe's own network
namespace it must also carry that namespace's inode, so equal tuples in two namespaces stay apart.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

from bpf.types import KernelEvent
from prober.types import Flow, ProbeResult

# The TCP state changes the correlator reads: ESTABLISHED (reasons.TcpFacts: the handshake completed) and CLOSE
# (`window_complete`: the socket is done, no late event can come); any state event also shows that the other
# end of a flow is on this node (`window_complete`), and each socket has both. The app has the kernel sensor
# send only these as events and count the rest (SYN_SENT, FIN_WAIT1, ...: ~6 of a connection's ~10 changes).
TCP_STATES_READ = frozenset({"ESTABLISHED", "CLOSE"})

GRACE_NS = 500_000_000  # late events (a reset after the probe gave up, a retransmit in flight)
SLACK_NS = 5_000_000  # hooks can report a little before the prober's own timestamp


@dataclass(frozen=True, slots=True)
class Matched:
    """A kernel event joined to one flow of a probe, with the side it was seen on."""

    event: KernelEvent
    flow: Flow
    outbound: bool  # the packet/socket goes from the probe towards the target
    local_ns: bool  # seen in the probe's own network namespace


class EventIndex:
    """Kernel events indexed by (protocol, address, port) of either endpoint, kept in timestamp order per key:
    `join` over an index reads only the events of the probe's own local endpoints in its time span, not every
    event of the window (a window of a busy node holds thousands of other connections' events). Add events
    as they arrive (`add`, `extend`); `join(result, index)` gives exactly what `join(result, events)` gives
    for the same events in the same order (events with equal timestamps keep their arrival order)."""

    __slots__ = ("_by_end", "_count")

    def __init__(self, events: Iterable[KernelEvent] = ()):
        # key -> (timestamps, [(timestamp, arrival number, event)]), both sorted by timestamp
        self._by_end: dict[tuple[str, str, int], tuple[list[int], list[tuple[int, int, KernelEvent]]]] = {}
        self._count = 0
        self.extend(events)

    def __len__(self) -> int:
        return self._count

    def add(self, ev: KernelEvent) -> None:
        entry = (ev.ts_ns, self._count, ev)
        self._count += 1
        src = (ev.proto, ev.saddr, ev.sport)
        self._put(src, entry)
        dst = (ev.proto, ev.daddr, ev.dport)
        if dst != src:
            self._put(dst, entry)

    def extend(self, events: Iterable[KernelEvent]) -> None:
        for ev in events:
            self.add(ev)

    def _put(self, key: tuple[str, str, int], entry: tuple[int, int, KernelEvent]) -> None:
        slot = self._by_end.get(key)
        ts = entry[0]
        if slot is None:
            self._by_end[key] = ([ts], [entry])
            return
        stamps, entries = slot
        if ts >= stamps[-1]:
            stamps.append(ts)
            entries.append(entry)
        else:  # out of order (per-CPU rings): keep the key's list sorted, equal stamps in arrival order
            i = bisect.bisect_right(stamps, ts)
            stamps.insert(i, ts)
            entries.insert(i, entry)

    def between(self, keys: Iterable[tuple[str, str, int]], lo: int, hi: int) -> list[KernelEvent]:
        """The events with an endpoint in `keys` and lo <= ts_ns <= hi, each once, in (timestamp, arrival)
        order."""
        found: dict[int, tuple[int, int, KernelEvent]] = {}
        for key in keys:
            slot = self._by_end.get(key)
            if slot is None:
                continue
            stamps, entries = slot
            for i in range(bisect.bisect_left(stamps, lo), bisect.bisect_right(stamps, hi)):
                entry = entries[i]
                found[entry[1]] = entry
        return [entry[2] for entry in sorted(found.values(), key=_ts_arrival)]


def _ts_arrival(entry: tuple[int, int, KernelEvent]) -> tuple[int, int]:
    return entry[0], entry[1]


def join(result: ProbeResult, events: Iterable[KernelEvent] | EventIndex,
         grace_ns: int = GRACE_NS) -> list[Matched]:
    """The events of `result`, in timestamp order. `events` is any iterable of events (scanned in full) or
    an `EventIndex` (only the probe's own endpoints are read)."""
    by_local = result.local_endpoints()
    lo, hi = result.start_ns - SLACK_NS, result.end_ns + grace_ns
    if isinstance(events, EventIndex):
        events = events.between(by_local, lo, hi)
    out: list[Matched] = []
    get = by_local.get
    for ev in events:
        ts = ev.ts_ns
        if ts < lo or ts > hi:
            continue
        proto = ev.proto
        flow = get((proto, ev.saddr, ev.sport))
        outbound = True
        if flow is None:
            flow = get((proto, ev.daddr, ev.dport))
            outbound = False
            if flow is None:
                continue
        local_ns = ev.netns == flow.netns
        if not local_ns and outbound and ev.kind not in _PATH_KINDS:
            # A socket-level event with our source tuple in another namespace is someone else's socket.
            continue
        out.append(Matched(ev, flow, outbound, local_ns))
    out.sort(key=_matched_ts)
    return out


def _matched_ts(m: Matched) -> int:
    return m.event.ts_ns


# Packet-level events can be seen in any namespace on the path (router, server, DNAT node); socket-level
# ones (retransmit, state, reset) with our source tuple belong to our socket, so to our namespace.
_PATH_KINDS = frozenset({"drop", "icmp_send"})


def window_complete(result: ProbeResult, events: Iterable[KernelEvent]) -> bool:
    """Whether no more kernel events can come for this probe: every TCP flow of it was seen closed (or reset)
    by the kernel — its own socket, and the other end's too when that end is on this node (it showed events)
    — so no retransmission timer is pending. DNS flows need nothing: the prober has their answers.

    Then its evidence window can close at once instead of waiting the grace period for late events.
    """
    tcp = [f for f in result.flows if str(f.proto) == "tcp"]
    if not tcp:
        return False  # nothing the kernel would tell us is over: wait the grace period
    closed: set[tuple[str, int, str, int, bool]] = set()
    seen_peer: set[tuple[str, int, str, int]] = set()
    for ev in events:
        if ev.proto != "tcp":
            continue
        key = (ev.saddr, ev.sport, ev.daddr, ev.dport)
        if ev.kind == "state" and ev.tcp_state == "CLOSE":
            closed.add((*key, True))
        elif ev.kind in ("state", "retransmit", "reset_rx"):
            seen_peer.add(key)
    for f in tcp:
        mine = (f.local_addr, f.local_port, f.remote_addr, f.remote_port)
        if (*mine, True) not in closed:
            return False
        peer = (f.remote_addr, f.remote_port, f.local_addr, f.local_port)
        if peer in seen_peer and (*peer, True) not in closed:
            return False
    return True
