"""What got through: each dropped TCP segment matched to the retransmission of the same segment, and whether
each direction of a probe's connection was still making progress when the probe ended — pure functions.

The sensor gives every watched drop of a TCP segment its sequence range (from the packet's header) and every
retransmission its range plus the sender's snd_una and counters (data segments sent, segments retransmitted,
from the socket). A direction is *stalled* at the end when its last retransmissions all resent the one segment
at snd_una and nothing of that direction after it was seen: the state a policy leaves a flow in from the moment
it applies (every copy dropped, the retransmission timer backing off), and also the state random loss leaves it
in for a while when it takes the same segment several times in a row. What tells them apart is how likely the
loss rate the sender had met before is to take every copy in a row (`Stall.chance`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from correlator.join import Matched
from correlator.reasons import DECISIVE, reason_class

SEQ_SPACE = 2**32
RTO_MIN_NS = 200_000_000  # Linux TCP_RTO_MIN: the least a timeout-driven retransmission waits
SLACK_NS = 5_000_000  # hooks can report a little out of order
# How sure the loss rate is: a prior of PRIOR_SEGMENTS segments with one lost (networks mostly lose little),
# updated by the sender's own counters; the estimate used is two standard deviations above the mean.
PRIOR_SEGMENTS = 100
BACKOFF_RATIO = 1.5  # each wait of a backing-off retransmission timer at least this times the previous (it doubles)


def _after(a: int, b: int) -> bool:
    """Sequence number a is after b (modulo 2^32)."""
    return 0 < (a - b) % SEQ_SPACE < SEQ_SPACE // 2


def seq_before(a: int, b: int) -> bool:
    """Sequence number a is before b (modulo 2^32)."""
    return _after(b, a)


def _covers(seq: int, length: int, s: int) -> bool:
    return (s - seq) % SEQ_SPACE < max(length, 1)


@dataclass(frozen=True)
class DropFate:
    """A dropped data segment and what became of its retransmission."""

    drop: Matched
    retransmission: Matched | None  # the first retransmission covering it, None when none was seen
    fate: str  # "through": acknowledged later | "dropped": the copy was dropped too | "unseen": no later sign


@dataclass(frozen=True)
class Stall:
    """One direction stopped: its last copies all resent the segment at `seq` and none got through."""

    outbound: bool
    seq: int
    copies: tuple[Matched, ...]  # the retransmissions of that segment (or, with no sender on this node, its drops)
    dropped: tuple[Matched, ...]  # the drops of those copies that were seen
    gaps_ns: tuple[int, ...]
    segs_before: int | None  # data segments the sender had sent before the first copy (its own counter)
    retrans_before: int | None  # of which it had retransmitted this many
    original: Matched | None = None  # the drop of the segment's first transmission, when seen
    # Dropped at the end and not yet retransmitted: the last contiguous run of segments (a wall drops
    # every one of a window; random loss leaves gaps between the ones it takes).
    pending: tuple[Matched, ...] = ()

    # Every drop of the segment seen from its first transmission on (copies whose retransmission event was
    # missed included): each is one transmission that did not get through.
    all_drops: tuple[Matched, ...] = ()

    @property
    def drops_in_a_row(self) -> int:
        """Transmissions of the segment that did not get through: its copies seen dropped, and the first one
        (a segment is retransmitted because it was lost, whether or not that drop was seen)."""
        if not self.copies:
            return len(self.pending)
        return max(len(self.all_drops), len(self.dropped) + 1)

    @property
    def start(self) -> Matched:
        return self.pending[0] if self.pending else self.original or self.copies[0]

    @property
    def every_copy_dropped(self) -> bool:
        return bool(self.copies) and len(self.dropped) >= len(self.copies)

    @property
    def backoff(self) -> bool:
        """The last waits between copies grew as a retransmission timer backing off makes them (at least two
        waits of a timer, each at least BACKOFF_RATIO times the one before)."""
        return len(self.backoff_gaps_ns) >= 2

    @property
    def backoff_gaps_ns(self) -> tuple[int, ...]:
        """The longest chain of a retransmission timer's waits that grew as backing off makes them (quick
        resends by the sender's own stack, shorter than half the least timeout, left out; a copy sent early
        because the other end asked — a duplicate ACK — ends one chain)."""
        timer = [g for g in self.gaps_ns if g >= RTO_MIN_NS // 2]
        best: list[int] = []
        chain: list[int] = []
        for g in timer:
            chain = [*chain, g] if chain and g >= BACKOFF_RATIO * chain[-1] else [g]
            if len(chain) > len(best):
                best = chain
        return tuple(best) if len(best) >= 2 else ()

    @property
    def loss_rate(self) -> float | None:
        """An upper estimate of the loss rate the sender had met (retransmitted / sent, with a margin)."""
        if self.segs_before is None or self.retrans_before is None:
            return None
        n = max(self.segs_before, self.retrans_before) + PRIOR_SEGMENTS
        p = (self.retrans_before + 1) / n
        return min(1.0, p + 2 * math.sqrt(p * (1 - p) / n))

    @property
    def chance(self) -> float | None:
        """How likely random loss at `loss_rate` is to have taken a segment this many times in a row: each
        of the losses the sender had met (its retransmissions) is a chance for its copies to be lost again."""
        p = self.loss_rate
        if p is None:
            return None
        if not self.copies:  # drops not yet retransmitted: each a loss of its own
            return p ** len(self.pending)
        return min(1.0, ((self.retrans_before or 0) + 1) * p ** (self.drops_in_a_row - 1))

    @property
    def likelihood(self) -> float | None:
        """How likely that loss rate is to do this to the one segment (or run) it took: its copies lost
        again, one after the other (pending drops: each of them lost)."""
        p = self.loss_rate
        if p is None:
            return None
        return p ** len(self.pending) if not self.copies else p ** (self.drops_in_a_row - 1)


@dataclass(frozen=True)
class Direction:
    """One direction of a probe's TCP data: who sent it (`outbound`: the probe) and what became of it."""

    outbound: bool
    drops: tuple[Matched, ...]  # data segments dropped (sequence range known)
    retransmits: tuple[Matched, ...]  # retransmissions with a sequence range
    fates: tuple[DropFate, ...]
    stall: Stall | None  # stalled at the probe's end, else None
    flowing_at_end: bool  # newer data of this direction was seen after its last retransmissions began

    def through(self) -> int:
        return sum(1 for f in self.fates if f.fate == "through")

    def dropped_again(self) -> int:
        return sum(1 for f in self.fates if f.fate == "dropped")


def _is_data_drop(m: Matched) -> bool:
    """A segment that did not get through: dropped by a policy, a program or loss. (A copy the receiver
    refused as a duplicate, TCP_OLD_DATA, did get through.)"""
    e = m.event
    return (e.kind == "drop" and e.proto == "tcp" and e.seq is not None and bool(e.seq_len)
            and reason_class(e.reason) in DECISIVE)


def _is_rtx(m: Matched) -> bool:
    e = m.event
    return (e.kind == "retransmit" and e.proto == "tcp" and e.seq is not None and e.error != -16
            and e.tcp_state != "SYN_SENT")


def _dropped_copy(copy: Matched, until_ns: int, drops: tuple[Matched, ...]) -> Matched | None:
    """The drop of a retransmitted copy: the same segment, dropped after the copy left (a copy is dropped on
    its way, so after its retransmission event on the same clock) and before the next copy."""
    for d in drops:
        if copy.event.ts_ns <= d.event.ts_ns <= until_ns and d.event.seq == copy.event.seq:
            return d
    return None


def _fates(drops: tuple[Matched, ...], rtx: tuple[Matched, ...]) -> tuple[DropFate, ...]:
    """For each drop: the first retransmission covering it, and whether that copy got through (a later
    retransmission acknowledged past it), was dropped again (before the next copy), or left no sign.
    (`rtx` are `_is_rtx` events, so they carry a sequence number; the arithmetic of `_covers` and `_after`
    is written out here: a loss recording has hundreds of drops against hundreds of retransmissions.)"""
    space, half = SEQ_SPACE, SEQ_SPACE // 2
    copies = [(r, r.event.ts_ns, r.event.seq, max(r.event.seq_len or 0, 1), r.event.snd_una) for r in rtx]
    out = []
    for d in drops:
        s = d.event.seq
        lo = d.event.ts_ns - SLACK_NS
        first = None
        first_ts = 0
        for r, ts, seq, length, _ in copies:
            if ts >= lo and (s - seq) % space < length:
                first, first_ts = r, ts
                break
        if first is None:
            out.append(DropFate(d, None, "unseen"))
            continue
        acked = False
        nxt = None
        for _, ts, seq, length, una in copies:
            if ts > first_ts:
                if not acked and una is not None and 0 < (una - s) % space < half:
                    acked = True
                    break
                if nxt is None and (s - seq) % space < length:
                    nxt = ts
        if acked:
            out.append(DropFate(d, first, "through"))
            continue
        until = nxt if nxt is not None else first_ts + 10 * RTO_MIN_NS
        again = None
        for x in drops:
            if x is not d and first_ts <= x.event.ts_ns <= until and x.event.seq == first.event.seq:
                again = x
                break
        out.append(DropFate(d, first, "dropped" if again else "unseen"))
    return tuple(out)


def _stall(outbound: bool, drops: tuple[Matched, ...], rtx: tuple[Matched, ...],
           end_ns: int) -> tuple[Stall | None, bool]:
    """The stall this direction ended in (or None), and whether newer data was seen after its last copies."""
    if rtx:
        last = rtx[-1]
        copies: list[Matched] = []
        for r in reversed(rtx):
            if r.event.seq != last.event.seq:
                break
            copies.insert(0, r)
        # Anything of this direction after the copies started, other than the copies, is progress.
        later = [d for d in drops if d.event.ts_ns > copies[0].event.ts_ns and d.event.seq != last.event.seq]
        if later:
            after = [d for d in later if d.event.ts_ns > last.event.ts_ns]
            if not after:
                return None, True
            first = last.event
            retrans = max((first.total_retrans or 1) - 1, 0) if first.total_retrans is not None else None
            run = _same_segment_tail(after)
            if len(run) >= 2:
                # One segment dropped again and again with no retransmission traced for it (its own stack
                # dropped the copies, or the events were missed): its drops are its copies.
                gaps = tuple(b.event.ts_ns - a.event.ts_ns for a, b in itertools.pairwise(run))
                return Stall(outbound, run[-1].event.seq, run, run, gaps, first.segs_out, retrans,
                             all_drops=run), True
            return Stall(outbound, after[-1].event.seq, (), (), (), first.segs_out, retrans,
                         pending=_contiguous_tail(after)), True
        dropped = []
        for i, c in enumerate(copies):
            until = copies[i + 1].event.ts_ns if i + 1 < len(copies) else end_ns
            d = _dropped_copy(c, until, drops)
            if d is not None:
                dropped.append(d)
        gaps = tuple(b.event.ts_ns - a.event.ts_ns for a, b in itertools.pairwise(copies))
        # A timer that would have fired again well before the end, and no copy of the segment came (neither
        # its retransmission nor a drop of it): the last one got through.
        due = 2 * max(gaps[-1] if gaps else RTO_MIN_NS, RTO_MIN_NS)
        seen = max([last.event.ts_ns] + [d.event.ts_ns for d in drops if d.event.seq == last.event.seq])
        if end_ns - seen > 2.5 * due:
            return None, False
        first = copies[0].event
        segs = first.segs_out
        retrans = max((first.total_retrans or 1) - 1, 0) if first.total_retrans is not None else None
        original = next((d for d in drops if d.event.seq == first.seq and d.event.ts_ns < first.ts_ns), None)
        since = (original or copies[0]).event.ts_ns
        same = tuple(d for d in drops if d.event.seq == first.seq and d.event.ts_ns >= since)
        return Stall(outbound, last.event.seq, tuple(copies), tuple(dropped), gaps, segs, retrans, original,
                     all_drops=same), False
    if not drops:
        return None, False
    # No sender on this node: its copies are the drops of one segment, repeated, nothing of it after.
    copies = _same_segment_tail(list(drops))
    gaps = tuple(b.event.ts_ns - a.event.ts_ns for a, b in itertools.pairwise(copies))
    return Stall(outbound, copies[-1].event.seq, copies, copies, gaps, None, None, all_drops=copies), False


def _same_segment_tail(drops: list[Matched]) -> tuple[Matched, ...]:
    """The drops of the last dropped segment, back to the first of them: drops of newer segments in between
    (the rest of a window a wall took) are passed over; a drop of an older segment (progress came after it)
    ends the run."""
    s = drops[-1].event.seq
    run = [drops[-1]]
    for d in reversed(drops[:-1]):
        if d.event.seq == s:
            run.insert(0, d)
        elif seq_before(d.event.seq, s):
            break
    return tuple(run)


def _contiguous_tail(drops: list[Matched]) -> tuple[Matched, ...]:
    """The last drops whose segments follow each other with no gap in sequence space."""
    run = [drops[-1]]
    for d in reversed(drops[:-1]):
        nxt = run[0].event
        if (d.event.seq + (d.event.seq_len or 0)) % SEQ_SPACE != nxt.seq:
            break
        run.insert(0, d)
    return tuple(run)


def directions(matched: tuple[Matched, ...], end_ns: int) -> tuple[Direction, ...]:
    """Each direction that has sequence-level evidence, from the events up to `end_ns` (the probe's end)."""
    out = []
    for outbound in (True, False):
        mine = [m for m in matched if m.outbound == outbound and m.event.ts_ns <= end_ns + SLACK_NS]
        drops = tuple(m for m in mine if _is_data_drop(m))
        rtx = tuple(m for m in mine if _is_rtx(m))
        if not drops and not rtx:
            continue
        stall, flowing = _stall(outbound, drops, rtx, end_ns)
        out.append(Direction(outbound, drops, rtx, _fates(drops, rtx), stall, flowing))
    return tuple(out)


def has_sequence_evidence(matched: tuple[Matched, ...]) -> bool:
    """Whether the sensor recorded sequence numbers at all (an older sensor did not)."""
    return any(m.event.seq is not None for m in matched if m.event.kind in ("drop", "retransmit"))
