"""The correlator: pure functions from a `ProbeResult` and `KernelEvent`s to a `Verdict`.

It imports the record types of prober/ and bpf/ and nothing that touches a socket or the kernel, so it is
tested on recorded data alone.
"""

from correlator.correlate import correlate
from correlator.join import EventIndex, join
from correlator.rules import RULES
from correlator.types import Cause, KernelCoverage, Verdict

__all__ = ["RULES", "Cause", "EventIndex", "KernelCoverage", "Verdict", "correlate", "join"]
