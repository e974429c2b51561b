"""The agent's status page `/`: which targets fail and why, at a glance; server-rendered, no external assets.

Top: the agent (kernel sensor, probes, reloads). Then one row per probe, failing ones first: a coloured
verdict, the one-line summary, the recent verdicts as a strip of squares, the last duration and its phases.
Below, for every probe whose last verdict is not ok, the kernel timeline of that failure: phases and kernel
events on one time axis (the same picture `connprobe diagnose` prints).

The page is rendered in a thread (`web.status_page`), from copies that are safe to take there (the board's
`probes()`, the running config's dict which a reload replaces but never changes), and it is bounded: at most
`max_rows` rows (failing probes first) and `MAX_TIMELINES` timelines; `/api/recent` pages through the rest.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from connprobe import timeline
from connprobe.causes import CAUSES, colour
from connprobe.netnames import netns_names
from connprobe.sinks import BoardEntry, StatusBoard
from connprobe.timeline import name_namespaces
from correlator.types import Cause, Verdict
from prober.redact import redact_url
from prober.spec import ProbeSpec

__all__ = ["MAX_ROWS", "MAX_TIMELINES", "AgentStatus", "render_status_page"]

MAX_ROWS = 500
MAX_TIMELINES = 20

PHASE_COLOURS = {"resolve": "#7e57c2", "connect": "#42a5f5", "tls": "#26a69a", "processing": "#ffa726",
                 "transfer": "#66bb6a"}

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:12px 20px;display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0}
header .meta{color:#c8cdd8;font-size:13px}
main{padding:16px 20px}
.summary{display:flex;gap:12px;margin-bottom:16px;flex-wrap:wrap}
.card{background:#fff;border-radius:6px;padding:10px 16px;box-shadow:0 1px 2px rgba(0,0,0,.12)}
.card b{font-size:22px;display:block}
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 2px rgba(0,0,0,.12)}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #e3e6ec;vertical-align:top}
th{background:#eceff4;font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.03em}
tr.fail td{background:#fff5f5}
.cause{display:inline-block;color:#fff;border-radius:3px;padding:1px 8px;font-weight:600;white-space:nowrap}
.strip span{display:inline-block;width:9px;height:16px;margin-right:1px;border-radius:1px}
.phases{display:flex;height:12px;width:180px;background:#eceff4;border-radius:2px;overflow:hidden}
.phases span{display:block;height:100%}
.target{font-family:ui-monospace,monospace;font-size:13px;word-break:break-all}
.dim{color:#6b7385}
section.timeline{background:#fff;margin-top:18px;padding:10px 16px;box-shadow:0 1px 2px rgba(0,0,0,.12)}
section.timeline h2{font-size:15px;margin:4px 0 8px}
pre{font:12px/1.5 ui-monospace,monospace;margin:0;white-space:pre-wrap}
.ev{color:#ad1457}
.legend span{margin-right:12px}
"""


@dataclass(frozen=True)
class AgentStatus:
    """What the page shows of the agent, taken on the event loop: its state, the running configuration's probes
    (a dict a reload replaces but never changes) and the status board (whose `probes()` copy is safe to take
    in the rendering thread)."""

    targets: str  # where the probes come from: the config file's path
    sensor_state: str
    started_at: float
    last_reload_ok: bool
    last_reload_error: str
    probes: Mapping[str, ProbeSpec]
    board: StatusBoard
    cluster: Any = None  # connprobe.cluster.view.ClusterView with --kubernetes (safe to read in a thread)
    cluster_notes: tuple[str, ...] = ()  # cluster names not probed now, and bad annotations


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _cause_badge(v: Verdict) -> str:
    cause = str(v.cause)
    label = v.sub_cause or cause
    return f'<span class="cause" style="background:{colour(cause)}">{_e(label)}</span>'


def _ago(then: float, now: float) -> str:
    s = max(0.0, now - then)
    if s < 90:
        return f"{s:.0f}s ago"
    if s < 5400:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago"


def _phase_bar(v: Verdict) -> str:
    r = v.result
    total = max(r.duration_ns, 1)
    parts = []
    for name, ns in r.phase_durations_ns().items():
        pct = 100.0 * ns / total
        if pct >= 0.5:
            parts.append(f'<span title="{_e(name)} {ns / 1e6:.1f} ms" '
                         f'style="width:{pct:.1f}%;background:{PHASE_COLOURS.get(name, "#90a4ae")}"></span>')
    text = ", ".join(f"{k} {ns / 1e6:.1f}" for k, ns in r.phase_durations_ns().items())
    return f'<div class="phases">{"".join(parts)}</div><div class="dim">{_e(text or "no phase reached")}</div>'


def _strip(entries: list[BoardEntry]) -> str:
    cells = []
    for e in entries:
        c = str(e.cause)
        cells.append(f'<span title="{_e(c)}" style="background:{colour(c)}"></span>')
    return f'<div class="strip">{"".join(cells)}</div>'


def timeline_lines(v: Verdict, names: dict[int, str]) -> list[str]:
    """Phases, DNS transactions and kernel events of one probe on one time axis (ms from its start)."""
    out = []
    for row in timeline.rows(v, names):
        head = f"{row.offset_ms:+9.1f} ms  "
        if row.kind == "kernel":
            who = f"▲ kernel {row.node} " if row.node else "▲ kernel "
            out.append(f'{_e(head)}<span class="ev">{_e(who + row.text)}</span>')
        else:
            out.append(_e(head + ("  " if row.kind == "dns" else "") + row.text))
    return out


def render_status_page(status: AgentStatus, now: float | None = None, *, warning: str = "",
                       max_rows: int = MAX_ROWS) -> str:
    """The page; `warning` (the server's, when it listens beyond loopback unauthenticated) is shown on top."""
    now = time.time() if now is None else now
    specs = status.probes
    board = status.board.probes()
    names = netns_names()
    cluster = status.cluster
    if cluster is not None:
        names.update(cluster.netns_names())
    rows = []
    failing: list[tuple[str, BoardEntry]] = []
    for name, spec in specs.items():
        entries = board.get(name, [])
        last = entries[-1] if entries else None
        bad = last is not None and last.cause != Cause.OK
        ok_n = sum(1 for e in entries if e.cause == Cause.OK)
        rows.append((0 if bad else (1 if last is None else 2), name, spec, entries, last, ok_n))
        if bad and last is not None:
            # the most recent failure that carries kernel evidence, else the last failure
            with_events = [e for e in entries if e.cause != Cause.OK and e.verdict.evidence]
            failing.append((name, with_events[-1] if with_events else last))
    rows.sort(key=lambda r: (r[0], r[1]))
    n_fail = sum(1 for r in rows if r[0] == 0)
    n_ok = sum(1 for r in rows if r[0] == 2)
    n_wait = sum(1 for r in rows if r[0] == 1)
    hidden = max(0, len(rows) - max_rows)
    rows = rows[:max_rows]
    failing.sort(key=lambda f: f[0])
    failing = failing[:MAX_TIMELINES]

    body = []
    body.append('<table id="probes"><thead><tr><th>probe</th><th>target</th><th>from</th><th>verdict</th>'
                '<th>why</th><th>recent</th><th>last</th><th>phases (ms)</th></tr></thead><tbody>')
    for state, name, spec, entries, last, ok_n in rows:
        if last is None:
            verdict_cell, why, last_cell, phases = '<span class="dim">waiting</span>', "", "", ""
        else:
            v = last.verdict
            verdict_cell = _cause_badge(v)
            why = _e(name_namespaces(v.summary.removeprefix(f"{name}: "), names))
            last_cell = f"{v.result.duration_ns / 1e6:.1f} ms<br><span class='dim'>{_ago(last.wall_time, now)}</span>"
            phases = _phase_bar(v)
        ratio = f'<div class="dim">{ok_n}/{len(entries)} ok</div>' if entries else ""
        cls = ' class="fail"' if state == 0 else ""
        body.append(f'<tr{cls} data-probe="{_e(name)}" data-cause="{_e(last.verdict.cause if last else "")}">'
                    f"<td><b>{_e(name)}</b></td><td class='target'>{_e(redact_url(spec.target))}</td>"
                    f"<td>{_e(spec.source)}</td><td>{verdict_cell}</td><td>{why}</td>"
                    f"<td>{_strip(entries)}{ratio}</td><td>{last_cell}</td><td>{phases}</td></tr>")
    body.append("</tbody></table>")
    if hidden:
        body.append(f'<p class="dim" id="hidden">{hidden} more probes not shown (failing ones come first); '
                    '<a href="api/recent">/api/recent</a> pages through all of them</p>')
    for name, entry in failing:
        v = entry.verdict
        facts = "".join(f"<li>{_e(name_namespaces(f, names))}</li>" for f in v.facts)
        evidence = "kernel evidence: " + (f"{len(v.evidence)} event(s)" if v.evidence else "none in this window")
        body.append(f'<section class="timeline" data-probe="{_e(name)}"><h2>{_e(name)} — {_cause_badge(v)} '
                    f'<span class="dim">{_ago(entry.wall_time, now)}, rule {_e(v.rule)}, confidence '
                    f'{v.confidence:.2f}, {evidence}</span></h2><ul>{facts}</ul><pre>'
                    + "\n".join(timeline_lines(v, names)) + "</pre></section>")
    legend = "".join(f'<span title="{_e(look.meaning)}"><span class="cause" style="background:{look.colour}">'
                     f"{_e(cause)}</span></span>" for cause, look in CAUSES.items())
    reload_note = ""
    if not status.last_reload_ok:
        reload_note = (f'<div class="card" style="border-left:4px solid #c62828"><b>reload rejected</b>'
                       f"<pre>{_e(status.last_reload_error)}</pre>the previous configuration keeps running</div>")
    banner = ""
    notes = status.cluster_notes
    if notes:
        items = "".join(f"<li>{_e(n)}</li>" for n in notes[:50])
        more = f"<li>and {len(notes) - 50} more</li>" if len(notes) > 50 else ""
        banner += ('<div class="card" id="cluster-notes" style="border-left:4px solid #f9a825;margin-bottom:12px">'
                   f"<b>cluster names not probed now</b><ul>{items}{more}</ul></div>")
    if warning:
        banner += ('<div class="card" id="exposed" style="border-left:4px solid #c62828;margin-bottom:12px">'
                  f"<b>unauthenticated</b>{_e(warning)}</div>")
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta http-equiv="refresh" content="10"><meta name="viewport" content="width=device-width">'
        f"<title>connprobe: {n_fail} failing</title><style>{CSS}</style></head><body>"
        f"<header><h1>connprobe agent</h1><span class='meta'>config {_e(status.targets)}</span>"
        f"<span class='meta'>kernel sensor {_e(status.sensor_state)}</span>"
        + (f"<span class='meta' id=cluster>{_e(cluster.readiness())}</span>" if cluster is not None else "")
        + f"<span class='meta'>up {_ago(status.started_at, now).removesuffix(' ago')}</span></header><main>{banner}"
        f'<div class="summary"><div class="card" id="failing"><b style="color:#c62828">{n_fail}</b>failing</div>'
        f'<div class="card"><b style="color:#2e7d32">{n_ok}</b>ok</div>'
        f'<div class="card"><b>{n_wait}</b>waiting for a first result</div>{reload_note}</div>'
        + "".join(body)
        + f'<p class="legend dim">{legend}</p></main></body></html>'
    )
