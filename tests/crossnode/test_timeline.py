"""A remote event on the timeline (diagnose, the status page): marked with the node that saw it, its namespace
there and how far its placement may be off; this node's events unmarked."""

from __future__ import annotations

from bpf.types import RemoteEvent, RemoteEvidence
from connprobe import timeline
from connprobe.statuspage import timeline_lines
from correlator import correlate
from prober.types import ErrorKind
from tests.correlator.builders import MS, result, syn_drop, syn_retransmit


def test_remote_events_are_marked_with_their_node():
    r = result(ok=False, error=ErrorKind.CONNECT_TIMEOUT, phases={"resolve": (0, 1), "connect": (1, 3001)})
    drops = [syn_drop(1.2), syn_drop(1001.2)]
    remote = RemoteEvidence("node-b", True, "", tuple(RemoteEvent(e, "node-b", 2 * MS, "cp-x-srv1") for e in drops),
                            True, 2 * MS)
    v = correlate(r, [syn_retransmit(1001)], remote=[remote])
    rows = [row for row in timeline.rows(v, {}) if row.kind == "kernel"]
    marked = [row for row in rows if row.node == "node-b"]
    assert len(marked) == 2 and all("in cp-x-srv1" in row.text and "(±2.0 ms)" in row.text for row in marked)
    assert [row.node for row in rows if "retransmit" in row.text] == [None]
    page = "\n".join(timeline_lines(v, {}))
    assert page.count("▲ kernel node-b drop") == 2
