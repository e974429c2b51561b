"""connprobe's probers: HTTP, TCP and DNS probes that time every phase and record every flow they used.

Public API: `run_probe(spec, env)`, `ProbeEnv`, the settings objects in `prober.spec`, the result types
in `prober.types`, and `Scheduler`. prober/ never imports bpf/ or connprobe/.
"""

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
