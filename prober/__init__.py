"""connprobe's probers: HTTP, TCP and DNS probes that time every phase and record every flow they used.

Public API: `run_probe(spec, env)`, `ProbeEnv`, the settings objects in `prober.spec`, the result types
in `prober.types`, and `Scheduler`. prober/ never imports bpf/ or connprobe/.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prober.env import ProbeEnv
    from prober.runner import PROBERS, run_probe
    from prober.scheduler import Scheduler
    from prober.spec import (
        DNSSpec,
        GRPCSpec,
        HTTPSpec,
        ICMPSpec,
        ModuleSpec,
        ProbeSpec,
        QueryStep,
        TCPSpec,
        TLSSpec,
        UnixSpec,
        WebSocketSpec,
    )
    from prober.types import DnsTransaction, ErrorKind, Flow, PhaseSpan, ProbeKind, ProbeResult, Proto

# Each public name's module, imported at first use (PEP 562): a caller that needs only the result types
# (`prober.types`, e.g. a diagnose that reads an agent's answers) does not pay for importing the HTTP clients.
_HOMES = {
    "ProbeEnv": "prober.env",
    "PROBERS": "prober.runner",
    "run_probe": "prober.runner",
    "Scheduler": "prober.scheduler",
    **dict.fromkeys(("DNSSpec", "GRPCSpec", "HTTPSpec", "ICMPSpec", "ModuleSpec", "ProbeSpec", "QueryStep",
                     "TCPSpec", "TLSSpec", "UnixSpec", "WebSocketSpec"), "prober.spec"),
    **dict.fromkeys(("DnsTransaction", "ErrorKind", "Flow", "PhaseSpan", "ProbeKind", "ProbeResult", "Proto"),
                    "prober.types"),
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'prober' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


__all__ = [
    "PROBERS",
    "DNSSpec",
    "DnsTransaction",
    "ErrorKind",
    "Flow",
    "GRPCSpec",
    "HTTPSpec",
    "ICMPSpec",
    "ModuleSpec",
    "PhaseSpan",
    "ProbeEnv",
    "ProbeKind",
    "ProbeResult",
    "ProbeSpec",
    "Proto",
    "QueryStep",
    "Scheduler",
    "TCPSpec",
    "TLSSpec",
    "UnixSpec",
    "WebSocketSpec",
    "run_probe",
]
