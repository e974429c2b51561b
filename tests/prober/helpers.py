from __future__ import annotations

from prober import ModuleSpec, ProbeSpec


def spec(target: str, prober: str = "http", name: str = "t", timeout: float = 3.0, source: str = "host",
         **module) -> ProbeSpec:
    section = module.pop("section", None)
    if section is not None:
        module[prober] = section
    return ProbeSpec(name=name, target=target, source=source, interval=max(timeout, 1.0), timeout=timeout,
                     module=ModuleSpec(prober=prober, **module))


def ms(result, phase: str) -> float:
    return result.phase_durations_ns().get(phase, 0) / 1e6
