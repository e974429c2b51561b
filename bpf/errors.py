"""The kernel sensor's errors (raised by the pre-load checks, the loader and `KernelSensor`):

    SensorError
     ├── SensorUnavailable   the sensor cannot run here at all (not root, no bcc, no BTF, no tracefs,
     │                       no kernel headers, BPF refused); the message names the missing piece
     ├── SensorClosed        used after close()
     └── WatchListFull       no free slot on the in-kernel watch list
"""

from __future__ import annotations


class SensorError(Exception):
    """Base of the sensor's errors."""


class SensorUnavailable(SensorError):
    """The kernel sensor cannot run on this machine; the message says what is missing and what to do."""


class SensorClosed(SensorError):
    """The sensor was used after close()."""


class WatchListFull(SensorError):
    """The kernel watch list has no free slot for one more port (`watch_max` ports are watched)."""
