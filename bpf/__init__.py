"""The kernel sensor: what the Linux kernel did with a probe's packets (docs/architecture.md, "The parts").

Modules:
    types          KernelEvent, EventKind (the records this package produces)
    sensor         KernelSensor (life cycle, watch list, events, counters, status)
    hooks          the hook table (HOOKS, HookSpec) and HookStatus
    preload        the checks before loading (privileges, bcc, kernel headers, tracefs, BTF, each hook);
                   shared by the sensor and `connprobe doctor`
    loader         compile sensor.c with bcc, attach each hook alone, read the kernel's reason names
    runstats       per-program run counts and time (BPF_ENABLE_STATS, fdinfo)
    errors         SensorError and its kinds
    decode         ring-buffer record -> KernelEvent (pure)
    btf            struct offsets and enums from the running kernel's BTF
    kernel_compat  tracefs formats (tracepoints, fields, reason names) and /proc/kallsyms
    sensor.c, events.h   the BPF programs (bcc), compiled at start-up with -D flags from btf.py

`bpf.sensor` imports nothing from bcc until a sensor is opened, so the rest of connprobe works without it.
"""
