"""Loading the kernel sensor for the app: one place that imports `bpf.sensor`, loads and attaches it, and says
in one line why not when it cannot (no bcc, no privileges, a verifier error). Used by the agent, by
`connprobe diagnose` (through `open_watch`), by the lab's fault matrix and by the benchmarks.

Whoever opens a `KernelWatch` here closes it with `close_watch` (its pump stopped, the sensor's programs
detached); the agent builds its own watch from `load_sensor` and so starts and stops its own pump.
"""

from __future__ import annotations

from typing import Any

from connprobe.kernelwatch import KernelWatch
from correlator.join import TCP_STATES_READ


async def load_sensor(disabled: bool = False, netns: frozenset[int] | None = None,
                      lazy_kallsyms: bool = False) -> tuple[Any | None, str]:
    """The loaded and attached `bpf.sensor.KernelSensor`, or None and why it is off. `netns`: report only these
    namespaces' events (a node's, for cross-node evidence); None: every namespace."""
    if disabled:
        return None, "disabled with --no-kernel"
    try:
        from bpf.errors import SensorError
        from bpf.sensor import KernelSensor
    except ImportError as exc:  # bcc missing
        return None, f"kernel sensor unavailable: {exc}"
    # Only the TCP state changes the correlator reads become events; the others are counted in the kernel.
    sensor = KernelSensor(netns=netns, lazy_kallsyms=lazy_kallsyms, state_records=TCP_STATES_READ)
    try:
        await sensor.__aenter__()
    except SensorError as exc:
        return None, str(exc)
    except Exception as exc:  # e.g. bcc not importable: name the cause rather than die
        return None, f"{type(exc).__name__}: {exc}"
    return sensor, ""


async def open_watch(disabled: bool = False, netns: frozenset[int] | None = None,
                     lazy_kallsyms: bool = False) -> KernelWatch:
    """A running `KernelWatch` (its pump started), without a sensor when it is off; close with `close_watch`."""
    sensor, reason = await load_sensor(disabled, netns, lazy_kallsyms)
    watch = KernelWatch(sensor, reason)
    await watch.start()
    return watch


async def close_watch(watch: KernelWatch) -> None:
    """Stop the watch's pump and detach its sensor."""
    await watch.stop()
    if watch.sensor is not None:
        watch.sensor.close()
