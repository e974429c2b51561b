"""The status board keeps older healthy verdicts compact (`connprobe.sinks._KeptEntry`): what the status page and
`/api/recent` render of every entry is the same as from the whole verdicts."""

from __future__ import annotations

import json

from bpf.types import EventKind, KernelEvent, RemoteEvidence
from connprobe.sinks import BoardEntry, StatusBoard, verdict_document
from connprobe.statuspage import AgentStatus, render_status_page
from connprobe.web import recent_document
from correlator.types import Cause, Verdict
from prober.types import Arrival, DnsTransaction, ErrorKind, Flow, PhaseSpan, ProbeKind, ProbeResult, Proto

T0 = 5_000_000_000


def _result(name: str, i: int, *, ok: bool = True, address: str = "10.77.2.12", redirect: bool = False,
            labels: tuple = ()) -> ProbeResult:
    s = T0 + i * 10_000_000_000 + i * 7
    udp = Flow(Proto.UDP, "10.77.1.2", 40000 + i, "10.77.2.53", 53, 4026531840)
    tcp = Flow(Proto.TCP, "10.77.1.2", 50000 + i, address, 8080, 4026531840)
    phases = [PhaseSpan("resolve", s, s + 800_000 + i), PhaseSpan("connect", s + 900_000, s + 990_000 + 13 * i),
              PhaseSpan("processing", s + 1_000_000, s + 1_300_000), PhaseSpan("transfer", s + 1_300_000,
                                                                              s + 1_400_000 + i)]
    if redirect:  # a second hop: phases of one name add up
        phases += [PhaseSpan("connect", s + 1_500_000, s + 1_600_003), PhaseSpan("processing", s + 1_600_003,
                                                                                 s + 1_700_000)]
    return ProbeResult(
        name=name, kind=ProbeKind.HTTP, target="http://srv1.lab.test:8080/ok?token=<redacted>",
        source="cp-client", start_ns=s, end_ns=s + 1_800_000 + 31 * i, ok=ok,
        error=None if ok else ErrorKind.CONNECT_TIMEOUT, error_detail="" if ok else "no answer to SYN",
        phases=tuple(phases), http_status=200 if ok else None, address=address, flows=(udp, tcp),
        dns=(DnsTransaction("10.77.2.53", "srv1.lab.test.", "A", s + 10, s + 700_000, "NOERROR", udp,
                            ("srv1.lab.test. A 10.77.2.12",)),),
        labels=labels, values=(("http_content_length", 8.0), ("http_version", 1.1)),
        progress=(Arrival(s + 1_390_000, 8),))


def _event(i: int) -> KernelEvent:
    return KernelEvent(T0 + i * 10_000_000_000 + 50_000, EventKind.RETRANSMIT, "tcp", "10.77.1.2", 50000 + i,
                       "10.77.2.12", 8080, 4026531840, tcp_state="SYN_SENT")


def _verdicts() -> dict[str, list[Verdict]]:
    out: dict[str, list[Verdict]] = {}
    for i in range(29):  # more than the board keeps; the last of "flaky" fails
        r = _result("healthy", i, redirect=i % 5 == 0, address="fd77:2::12" if i % 7 == 0 else "10.77.2.12",
                    labels=(("team", "pay"),))
        out.setdefault("healthy", []).append(
            Verdict(r, Cause.OK, None, 1.0, "healthy", (), (f"succeeded in {r.duration_ns / 1e6:.1f} ms",),
                    f"healthy: ok — succeeded in {r.duration_ns / 1e6:.1f} ms"))
        # a probe that fails now and then, with kernel evidence; healthy ones in between with unusual fields
        if i % 4 == 0:
            r = _result("flaky", i, ok=False)
            v = Verdict(r, Cause.TCP_RETRANSMIT, "tcp/syn", 0.85, "syn_retransmit", (_event(i),),
                        ("SYN sent 2 time(s)",), "flaky: tcp_retransmit (85%) — SYN sent 2 time(s)")
        elif i % 4 == 1:  # healthy, but the summary is not the usual one and a peer answered
            r = _result("flaky", i)
            v = Verdict(r, Cause.OK, None, 0.9, "healthy", (), ("succeeded", "peer agreed"), "flaky: fine",
                        (RemoteEvidence("node-b", True),))
        elif i % 4 == 2:  # healthy, an integer confidence (JSON writes 1, not 1.0), no facts
            r = _result("flaky", i)
            v = Verdict(r, Cause.OK, None, 1, "healthy", (), (), "")
        else:
            r = _result("flaky", i)
            v = Verdict(r, Cause.OK, None, 0.95, "healthy", (), ("succeeded in 2 ms",), "flaky: ok — other words")
        out.setdefault("flaky", []).append(v)
    return out


class _WholeBoard:
    """The reference: the last 20 verdicts of each probe, whole."""

    def __init__(self, entries: dict[str, list[BoardEntry]]):
        self._entries = entries

    def probes(self) -> dict[str, list[BoardEntry]]:
        return {k: list(v) for k, v in self._entries.items()}


def _fill() -> tuple[StatusBoard, _WholeBoard]:
    clock = iter(1_796_000_000.123456 + 0.37 * k for k in range(1000))
    board = StatusBoard(20, clock=lambda: next(clock))
    whole: dict[str, list[BoardEntry]] = {}
    by_probe = _verdicts()
    for i in range(29):
        for name in ("healthy", "flaky"):
            v = by_probe[name][i]
            board(v)
            whole.setdefault(name, []).append(BoardEntry(board.probes()[name][-1].wall_time, v))
    return board, _WholeBoard({k: v[-20:] for k, v in whole.items()})


def test_every_kept_entry_renders_as_its_whole_verdict():
    board, whole = _fill()
    got, want = board.probes(), whole.probes()
    assert list(got) == list(want)
    compact = 0
    for name in want:
        assert len(got[name]) == len(want[name]) == 20
        for g, w in zip(got[name], want[name], strict=True):
            assert g.wall_time == w.wall_time
            assert g.cause == w.verdict.cause
            assert json.dumps(verdict_document(g.verdict, g.wall_time)) == json.dumps(
                verdict_document(w.verdict, w.wall_time))
            compact += type(g) is not BoardEntry
        assert got[name][-1].verdict is want[name][-1].verdict  # the newest stays whole
        for g, w in zip(got[name], want[name], strict=True):  # failing, peer-answered, int confidence: whole
            if w.verdict.cause != Cause.OK or w.verdict.remote or type(w.verdict.confidence) is not float:
                assert g.verdict is w.verdict
    assert compact == 19 + 5  # every older healthy one of "healthy"; of "flaky" the i % 4 == 3 ones


def test_status_page_and_api_recent_are_the_same_bytes():
    board, whole = _fill()
    specs = {}  # the page lists the configured probes: any object with target and source
    from types import SimpleNamespace

    for name in ("healthy", "flaky"):
        specs[name] = SimpleNamespace(target="http://srv1.lab.test:8080/ok", source="netns cp-client")

    def page(b) -> str:
        return render_status_page(AgentStatus("agent.yml", "attached", 1_795_999_000.0, True, "", specs, b),
                                  now=1_796_000_100.0)

    assert page(board) == page(whole)
    names = board.names()
    doc = recent_document(names, board.entries(names), True, "attached", board.failing(), len(names), 0, 100)
    ref = recent_document(names, whole.probes(), True, "attached", ["flaky"], len(names), 0, 100)
    assert board.failing() == ["flaky"]
    assert doc == ref
