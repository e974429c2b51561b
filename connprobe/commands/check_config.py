"""`connprobe check-config FILE`: 0 and a summary when valid, 1 and one line per error when invalid, 2 when the
file cannot be read (missing, no permission, not a regular file) or no FILE was given. The checks are the
agent's own (`connprobe.config.load_config`)."""

from __future__ import annotations

import argparse
import sys

from connprobe.config import ConfigError, ConfigUnreadable, load_config
from prober.redact import redact_text, redact_url


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the YAML config")


def run(args: argparse.Namespace) -> int:
    path = args.file
    if not path:
        print("check-config: a config FILE is required", file=sys.stderr)
        return 2
    try:
        cfg = load_config(path)
    except ConfigUnreadable as exc:
        print(f"check-config: {exc.errors[0]}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        for line in exc.errors:  # the messages name targets redacted already; a URL quoted elsewhere is too
            print(redact_text(line), file=sys.stderr)
        n = len(exc.errors)
        print(f"{path}: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
        return 1
    kinds: dict[str, int] = {}
    for p in cfg.probes:
        kinds[p.module.prober] = kinds.get(p.module.prober, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no probes"
    print(f"{path}: OK: {len(cfg.modules)} modules, {len(cfg.probes)} probes ({summary})")
    for p in cfg.probes:
        budget = f", budget {p.effective_budget:g}s" if p.effective_budget is not None else ""
        print(f"  {p.name}: {p.module.prober} {redact_url(p.target)} from {p.source} every {p.interval:g}s, "
              f"timeout {p.effective_timeout:g}s{budget}")
    for t in cfg.templates:
        parts, p = t.parts, t.spec
        target = str(parts.target) if parts.target is not None else redact_url(p.target)
        source = str(parts.source) if parts.source is not None else p.source
        extra = " and each ready endpoint" if parts.endpoints else ""
        print(f"  {p.name}: {p.module.prober} {target}{extra} from {source} every {p.interval:g}s "
              "(cluster names: expanded by the agent with --kubernetes)")
    return 0
