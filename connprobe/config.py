"""connprobe's probe configuration: YAML with blackbox_exporter-like `modules:` and `probes:` using them.

    modules:
      http_2xx:
        prober: http
        timeout: 5s
        http: {valid_status_codes: [200], fail_if_body_not_matches_regexp: ["ok"]}
    probes:
      - name: api
        module: http_2xx
        target: http://srv1.lab.test:8080/ok
        source: netns cp-lab-client
        interval: 15s

Parsed once into frozen objects (`prober.spec.ModuleSpec` / `ProbeSpec`); unknown keys are rejected;
every error is one line naming the probe (or module) and the field. `connprobe check-config FILE`
validates without probing (`check_config_main`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from prober.spec import ModuleSpec, ProbeSpec

TOP_KEYS = ("modules", "probes")


class ConfigError(ValueError):
    """The configuration is invalid; `errors` holds one line per problem."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Config:
    modules: dict[str, ModuleSpec]
    probes: tuple[ProbeSpec, ...]


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required",
}


def _format(owner: str, exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # a union/literal branch name (e.g. "float") adds nothing for the reader
        loc = tuple(p for p in loc if p not in ("constrained-float", "float", "str", "int"))
        msg = _MESSAGES.get(err["type"], err["msg"])
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        elif msg.startswith("Assertion failed, "):
            msg = msg[len("Assertion failed, ") :]
        msg = msg.replace("Input should be", "must be")
        where = _loc(loc)
        lines.append(f"{owner}: {where}: {msg}" if where else f"{owner}: {msg}")
    return lines


def parse_config(text: str, filename: str = "<config>") -> Config:
    """Validate a whole config; raises ConfigError listing every problem found."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark is not None else filename
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"config: top level must be a mapping with {' and '.join(TOP_KEYS)}"])
    errors: list[str] = [f"config: {k}: unknown key (expected {', '.join(TOP_KEYS)})" for k in raw
                         if k not in TOP_KEYS]

    modules: dict[str, ModuleSpec] = {}
    raw_modules = raw.get("modules") or {}
    if not isinstance(raw_modules, dict):
        errors.append("config: modules: must be a mapping of module name to settings")
        raw_modules = {}
    bad_modules: set[str] = set()
    for name, body in raw_modules.items():
        owner = f'module "{name}"'
        if not isinstance(body, dict):
            errors.append(f"{owner}: must be a mapping")
            bad_modules.add(str(name))
            continue
        try:
            modules[str(name)] = ModuleSpec.model_validate(body)
        except ValidationError as exc:
            errors.extend(_format(owner, exc))
            bad_modules.add(str(name))

    probes: list[ProbeSpec] = []
    raw_probes = raw.get("probes") or []
    if not isinstance(raw_probes, list):
        errors.append("config: probes: must be a list of probes")
        raw_probes = []
    seen: dict[str, int] = {}
    for i, body in enumerate(raw_probes):
        if not isinstance(body, dict):
            errors.append(f"probes[{i}]: must be a mapping")
            continue
        name = body.get("name")
        owner = f'probe "{name}"' if isinstance(name, str) and name else f"probes[{i}]"
        if not (isinstance(name, str) and name):
            errors.append(f"{owner}: name: required")
            continue
        if name in seen:
            errors.append(f"{owner}: name: duplicate (first defined as probes[{seen[name]}])")
            continue
        seen[name] = i
        module_name = body.get("module")
        if module_name is None:
            errors.append(f"{owner}: module: required")
            continue
        if module_name in bad_modules:
            continue  # its module's own errors are reported already
        if module_name not in modules:
            known = ", ".join(sorted(str(m) for m in raw_modules)) or "none defined"
            errors.append(f'{owner}: module: unknown module "{module_name}" (known: {known})')
            continue
        try:
            probes.append(ProbeSpec.model_validate({**body, "module": modules[module_name]}))
        except ValidationError as exc:
            errors.extend(_format(owner, exc))
    if errors:
        raise ConfigError(errors)
    return Config(modules=modules, probes=tuple(probes))


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror or exc}"]) from None
    return parse_config(text, str(p))


def check_config_main(args: Any) -> int:
    """`connprobe check-config FILE`: 0 and a summary when valid, 1 and one line per error otherwise.

    `args` is an argparse namespace with `file` (or `config`), or a list of arguments.
    """
    if isinstance(args, Sequence) and not isinstance(args, str):
        path = args[0] if args else None
    else:
        path = getattr(args, "file", None) or getattr(args, "config", None)
    if not path:
        print("check-config: a config FILE is required", file=sys.stderr)
        return 2
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        from prober.redact import redact_text

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
        print(f"  {p.name}: {p.module.prober} {_shown_target(p)} from {p.source} every {p.interval:g}s, "
              f"timeout {p.effective_timeout:g}s{budget}")
    return 0


def _shown_target(p: ProbeSpec) -> str:
    from prober.redact import redact_url

    return redact_url(p.target)
