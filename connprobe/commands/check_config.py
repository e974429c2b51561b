"""`connprobe check-config FILE`: 0 and a summary when valid, 1 and one line per error when invalid, 2 when the
file cannot be read (missing, no permission, not a regular file) or no FILE was given. The checks are the
agent's own (`connprobe.config.load_config`)."""

from __future__ import annotations

import argparse
import sys

from connprobe.commands.output import add_output_option, output_format, write_document
from connprobe.config import ConfigError, ConfigUnreadable, is_blackbox_file, load_config
from prober.redact import redact_text, redact_url


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the YAML config")
    p.add_argument("--blackbox", action="store_true",
                   help="FILE is a blackbox_exporter blackbox.yml (modules only, blackbox's defaults)")
    add_output_option(p, "json/yaml: {file, ok, errors, modules, probes, templates}; errors still exit 1")


def run(args: argparse.Namespace) -> int:
    path = args.file
    if not path:
        print("check-config: a config FILE is required", file=sys.stderr)
        return 2
    blackbox = bool(getattr(args, "blackbox", False))
    # recognisably a blackbox.yml: read with blackbox's defaults, as --blackbox does (the OK line says so)
    blackbox = blackbox or is_blackbox_file(path)
    fmt = output_format(args)
    try:
        cfg = load_config(path, blackbox=blackbox)
    except ConfigUnreadable as exc:
        print(f"check-config: {exc.errors[0]}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        if fmt != "text":
            write_document({"file": str(path), "ok": False, "blackbox": blackbox,
                            "errors": [redact_text(e) for e in exc.errors]}, fmt)
            return 1
        for line in exc.errors:  # the messages name targets redacted already; a URL quoted elsewhere is too
            print(redact_text(line), file=sys.stderr)
        n = len(exc.errors)
        print(f"{path}: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
        return 1
    kinds: dict[str, int] = {}
    for p in cfg.probes:
        kinds[p.module.prober] = kinds.get(p.module.prober, 0) + 1
    if fmt != "text":
        write_document(_document(str(path), blackbox, cfg), fmt)
        return 0
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no probes"
    form = " (blackbox_exporter format)" if blackbox else ""
    print(f"{path}: OK{form}: {len(cfg.modules)} modules, {len(cfg.probes)} probes ({summary})")
    if blackbox:
        for name, module in cfg.modules.items():
            print(f"  module {name}: {module.prober}, timeout {module.timeout:g}s")
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


def _document(path: str, blackbox: bool, cfg) -> dict:
    """What check-config loaded, as plain data (targets redacted as in the text form)."""
    probes = [{"name": p.name, "prober": p.module.prober, "target": redact_url(p.target), "source": p.source,
               "interval_seconds": p.interval, "timeout_seconds": p.effective_timeout,
               "budget_seconds": p.effective_budget} for p in cfg.probes]
    templates = []
    for t in cfg.templates:
        parts, p = t.parts, t.spec
        templates.append({"name": p.name, "prober": p.module.prober,
                          "target": str(parts.target) if parts.target is not None else redact_url(p.target),
                          "source": str(parts.source) if parts.source is not None else p.source,
                          "endpoints": bool(parts.endpoints), "interval_seconds": p.interval})
    return {"file": path, "ok": True, "blackbox": blackbox, "errors": [],
            "modules": {name: {"prober": m.prober, "timeout_seconds": m.timeout} for name, m in cfg.modules.items()},
            "probes": probes, "templates": templates}
