"""What a rule returns: a `Finding` (cause, sub-cause, confidence, the events that decided, the facts in words).
The rules of `correlator/rules.py` and of `correlator/crossnode.py` return it; `correlator/correlate.py` makes
the `Verdict` from it."""

from __future__ import annotations

from dataclasses import dataclass

from correlator.join import Matched
from correlator.types import Cause


@dataclass(frozen=True)
class Finding:
    cause: Cause
    sub_cause: str | None
    confidence: float
    evidence: tuple[Matched, ...]
    facts: tuple[str, ...]
    needs_kernel: bool = True  # without kernel evidence this finding is a guess: confidence is capped
