"""The cause table: for every correlator `Cause`, the colour all outputs paint it in and what it means in a line.

The correlator owns the causes (`correlator/types.py`) and decides them; how a cause looks to a person is
presentation, so the table lives in the app, beside the outputs that read it: the status page
(`connprobe/statuspage.py`), `connprobe diagnose` and the demo (through `colour`), the lab's confusion matrix
(`connprobe/lab/scenarios.py`, which lists the causes in the table's order) and the Grafana dashboards
(`deploy/grafana/generate.py`). Colours are `#rrggbb`, which HTML, rich and Grafana all take as they are.
tests/app/test_causes.py checks that every `Cause` has an entry and that each output uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

from correlator.types import Cause

__all__ = ["CAUSES", "FALLBACK_COLOUR", "CauseLook", "colour"]


@dataclass(frozen=True, slots=True)
class CauseLook:
    colour: str  # "#rrggbb"
    meaning: str  # one line for a legend or a tooltip


CAUSES: dict[Cause, CauseLook] = {
    Cause.OK: CauseLook("#2e7d32", "the probe succeeded within its budget"),
    Cause.DNS: CauseLook("#6a1b9a", "the name did not resolve, or resolving took the time"),
    Cause.TCP_RETRANSMIT: CauseLook("#ef6c00", "packets were lost on the path: the kernel retransmitted"),
    Cause.POLICY_DROP: CauseLook("#c62828", "a firewall or network policy dropped or rejected the traffic"),
    Cause.UPSTREAM_LATENCY: CauseLook("#f9a825", "the path was clean but the server was slow to answer"),
    Cause.CONNECTION_REFUSED: CauseLook("#ad1457", "nothing listened on the port: the server's host refused"),
    Cause.TLS: CauseLook("#4527a0", "the TLS handshake or certificate check failed"),
    Cause.HTTP_ERROR: CauseLook("#d84315", "the server answered with an unexpected HTTP status or body"),
    Cause.UNKNOWN: CauseLook("#616161", "the evidence did not name a cause"),
}
FALLBACK_COLOUR = CAUSES[Cause.UNKNOWN].colour


def colour(cause: str) -> str:
    """The colour of a cause given by its name (a `Cause` is one); a name outside the table gets unknown's."""
    try:
        return CAUSES[Cause(cause)].colour
    except ValueError:
        return FALLBACK_COLOUR

