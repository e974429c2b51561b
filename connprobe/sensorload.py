"""Loading the kernel sensor for the app: one place that imports `bpf.sensor`, loads and attaches it, and says
in one line why not when it cannot (no bcc, no privileges, a verifier error). Used by the agent, by
`connprobe diagnose` (through `open_evidence`), by the lab's fault matrix and by the benchmarks.

Whoever opens a `KernelEvidence` here closes it with `close_evidence` (its pump stopped, the sensor's
programs detached); the agent builds its own evidence from `load_sensor` and so starts and stops its own pump.
"""

from __future__ import annotations

from typing import Any

from connprobe.evidence import KernelEvidence


async def load_sensor(disabled: bool = False) -> tuple[Any | None, str]:
    """The loaded and attached `bpf.sensor.KernelSensor`, or None and why it is off."""
    if disabled:
        return None, "disabled with --no-kernel"
    try:
        from bpf.sensor import KernelSensor, SensorError
    except ImportError as exc:  # bcc missing
        return None, f"kernel sensor unavailable: {exc}"
    sensor = KernelSensor()
    try:
        await sensor.__aenter__()
    except SensorError as exc:
        return None, str(exc)
    except Exception as exc:  # e.g. bcc not importable: name the cause rather than die
        return None, f"{type(exc).__name__}: {exc}"
    return sensor, ""


async def open_evidence(disabled: bool = False) -> KernelEvidence:
    """A running `KernelEvidence` (its pump started), without a sensor when it is off; close with `close_evidence`."""
    sensor, reason = await load_sensor(disabled)
    evidence = KernelEvidence(sensor, reason)
    await evidence.start()
    return evidence


async def close_evidence(evidence: KernelEvidence) -> None:
    """Stop the evidence's pump and detach its sensor."""
    await evidence.stop()
    if evidence.sensor is not None:
        evidence.sensor.close()
