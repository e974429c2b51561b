"""A fault-matrix trial is judged only when its fault produced its symptom; otherwise it is a lab error."""

from __future__ import annotations

from connprobe.lab.scenarios import SCENARIOS, symptom_missing

BY_NAME = {s.name: s for s in SCENARIOS}


def attempt(ok=False, error="read_timeout", duration_ms=3000.0, transfer_ms=2500.0) -> dict:
    return {"ok": ok, "error": error, "duration_ms": duration_ms,
            "phases": [{"name": "connect", "duration_ms": 1.0}, {"name": "transfer", "duration_ms": transfer_ms}]}


def test_a_loss_fault_that_dropped_nothing_is_a_lab_error():
    sc = BY_NAME["path_loss"]
    assert "acted on no packet" in symptom_missing(sc, attempt(ok=True, error=None, duration_ms=50), 0, 10)
    assert symptom_missing(sc, attempt(ok=True, error=None, duration_ms=50), 12, 10) is None


def test_a_transfer_that_did_not_run_out_of_time_is_a_lab_error():
    sc = BY_NAME["heavy_loss_timeout_tc"]
    assert symptom_missing(sc, attempt(), 40, 100) is None
    assert "no transfer ran" in symptom_missing(sc, attempt(error="connect_timeout", transfer_ms=0), 40, 100)
    assert "no transfer ran" in symptom_missing(sc, attempt(transfer_ms=200), 40, 100)


def test_a_fault_scenario_whose_probe_succeeded_within_budget_is_a_lab_error():
    sc = BY_NAME["slow_upstream"]
    assert "succeeded within budget" in symptom_missing(sc, attempt(ok=True, error=None, duration_ms=20), None, 300)
    assert symptom_missing(sc, attempt(ok=True, error=None, duration_ms=620), None, 300) is None


def test_healthy_needs_no_symptom():
    assert symptom_missing(BY_NAME["healthy"], attempt(ok=True, error=None, duration_ms=5), None, 300) is None
