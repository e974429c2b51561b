"""`connprobe doctor`: run the checks of `connprobe/doctor.py` and print one line per check as it is done.

Exit status 0 when the sensor can run (warnings allowed), 1 when it cannot.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from connprobe.commands.output import add_output_option, output_format, write_document
from connprobe.doctor import FAIL, WARN, Check, checks


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Entry point of `connprobe doctor` (options read with getattr: `no_load`)."""
    out = out or sys.stdout

    fmt = output_format(args)

    def emit(c: Check) -> None:
        if fmt == "text":
            print(c.line(), file=out, flush=True)

    done = checks(load=not getattr(args, "no_load", False), emit=emit)
    failed = [c for c in done if c.status == FAIL]
    warned = [c for c in done if c.status == WARN]
    if fmt != "text":
        state = "unavailable" if failed else ("prerequisites" if getattr(args, "no_load", False) else "ready")
        write_document({"sensor": state, "failed": len(failed), "warnings": len(warned),
                        "checks": [{"name": c.name, "status": c.status, "detail": c.detail, "fix": c.fix}
                                   for c in done]}, fmt, out)
        return 1 if failed else 0
    if failed:
        print(f"kernel sensor: UNAVAILABLE ({len(failed)} failed). Probes still run; verdicts will say "
              "'no kernel evidence'.", file=out)
        return 1
    extra = f" with {len(warned)} warning(s)" if warned else ""
    if getattr(args, "no_load", False):
        print(f"kernel sensor: prerequisites present{extra}; load not tried (--no-load).", file=out)
    else:
        print(f"kernel sensor: ready{extra}.", file=out)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `connprobe doctor` (for the CLI to call when it builds the subcommand)."""
    parser.add_argument("--no-load", action="store_true", help="do not compile and attach the BPF programs")
    add_output_option(parser, "json/yaml: {sensor, failed, warnings, checks: [{name, status, detail, fix}]}")
