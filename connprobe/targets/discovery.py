"""Probes discovered from Service annotations: a target source next to the config file.

A Service opts in with `connprobe.io/probe`; the other annotations are optional:

    connprobe.io/probe: "http:/healthz"      # tcp | grpc | http:/PATH  (required)
    connprobe.io/port: "http"                # a port number or name of the Service (default: its first port)
    connprobe.io/module: "http_2xx"          # a module of the agent's config (its prober must match)
    connprobe.io/interval: "30s"             # default 30s
    connprobe.io/endpoints: "true"           # also each ready endpoint
    connprobe.io/source: "frontend/app=web,tier=fe"   # probe from matching pods of this node (NAMESPACE/SELECTOR;
                                                      # without "NAMESPACE/": the Service's namespace)

Each annotated Service becomes a `ClusterProbe` template named `svc/NAMESPACE/NAME` built through the same
validation as a config probe (`split_cluster_probe`, `ProbeSpec`), so a bad annotation gets the config's
one-line error, e.g. `service payments/api: connprobe.io/interval: 2ms is shorter than limits.min_interval (1s)`.
A bad annotation is reported (`problems`: the status page and `connprobe_discovery_invalid_services`), never
raised. Probes appear, change and disappear with the watch (the agent re-expands on each change).

Interface: `AnnotationSource(modules, min_interval).templates(services)` → `(templates, problems)`; the
cluster target source (`connprobe/targets/cluster.py`) calls it on every load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from connprobe.cluster.targets import ClusterProbe, split_cluster_probe
from prober.spec import ModuleSpec, ProbeSpec, format_duration, parse_duration

PREFIX = "connprobe.io/"
KEYS = ("probe", "port", "module", "interval", "endpoints", "source")
KINDS = ("tcp", "grpc", "http")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
DEFAULT_INTERVAL = 30.0
DEFAULT_TIMEOUT = 5.0
MAX_VALUE = 256


def _shown(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


class AnnotationSource:
    def __init__(self, modules: Mapping[str, ModuleSpec] | None = None, min_interval: float = 1.0) -> None:
        self.modules = dict(modules or {})
        self.min_interval = min_interval

    def templates(self, services: Iterable[Any]) -> tuple[list[ClusterProbe], list[str]]:
        out: list[ClusterProbe] = []
        problems: list[str] = []
        for svc in sorted(services, key=lambda s: (s.namespace, s.name)):
            notes = svc.annotations or {}
            if PREFIX + "probe" not in notes:
                continue
            try:
                out.append(self.template(svc))
            except ValueError as exc:
                problems.append(f"service {svc.namespace}/{svc.name}: {exc}")
        return out, problems

    def template(self, svc: Any) -> ClusterProbe:
        notes: Mapping[str, str] = svc.annotations
        unknown = sorted(k for k in notes if k.startswith(PREFIX) and k[len(PREFIX):] not in KEYS)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown annotation (known: {', '.join(PREFIX + k for k in KEYS)})")
        for key, value in notes.items():
            if len(value) > MAX_VALUE:
                raise ValueError(f"{key}: longer than {MAX_VALUE} characters")
        probe = notes[PREFIX + "probe"].strip()
        kind, _, path = probe.partition(":")
        if kind not in KINDS:
            raise ValueError(f"{PREFIX}probe: {_shown(probe)} must be tcp, grpc or http:/PATH")
        if kind != "http" and path:
            raise ValueError(f"{PREFIX}probe: {_shown(probe)}: only http takes a path")
        path = path or "/"
        if not path.startswith("/"):
            raise ValueError(f"{PREFIX}probe: {_shown(probe)}: the path must start with '/'")
        interval_text = notes.get(PREFIX + "interval")
        interval = DEFAULT_INTERVAL
        if interval_text is not None:
            try:
                interval = parse_duration(interval_text)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{PREFIX}interval: {exc}") from None
            if interval < self.min_interval:
                raise ValueError(f"{PREFIX}interval: {interval_text} is shorter than limits.min_interval "
                                 f"({format_duration(self.min_interval)})")
        module_name = notes.get(PREFIX + "module")
        if module_name is not None:
            module = self.modules.get(module_name)
            if module is None:
                known = ", ".join(sorted(self.modules)) or "none defined"
                raise ValueError(f"{PREFIX}module: unknown module {_shown(module_name)} (known: {known})")
            if module.prober != kind:
                raise ValueError(f"{PREFIX}module: {module_name} is a {module.prober} module, the probe is {kind}")
        else:
            module = ModuleSpec(prober=kind, timeout=min(DEFAULT_TIMEOUT, interval))
        port = notes.get(PREFIX + "port")
        if port is None:
            if not svc.ports:
                raise ValueError("the Service has no port")
            port = str(svc.ports[0][1])
        endpoints_text = notes.get(PREFIX + "endpoints", "false").strip().lower()
        if endpoints_text not in ("true", "false"):
            raise ValueError(f"{PREFIX}endpoints: must be \"true\" or \"false\", got {_shown(endpoints_text)}")
        body: dict[str, Any] = {
            "name": f"svc/{svc.namespace}/{svc.name}",
            "target": f"svc/{svc.namespace}/{svc.name}:{port.strip()}" + (path if kind == "http" else ""),
            "interval": interval,
            "endpoints": endpoints_text == "true",
        }
        source = notes.get(PREFIX + "source")
        if source is not None:
            body["source"] = _selector(source, svc.namespace)
        try:
            body, parts = split_cluster_probe(body, kind)
        except ValueError as exc:
            raise ValueError(_rename(str(exc))) from None
        try:
            spec = ProbeSpec.model_validate({**body, "module": module})
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(x) for x in err["loc"]) or "probe"
            raise ValueError(f"{PREFIX}{_FIELDS.get(field, field)}: {err['msg'].removeprefix('Value error, ')}"
                             ) from None
        return ClusterProbe(spec, parts)


_FIELDS = {"target": "port", "interval": "interval", "source": "source", "timeout": "module"}


def _rename(message: str) -> str:
    """A config field in an error → the annotation it came from."""
    field, sep, rest = message.partition(": ")
    return f"{PREFIX}{_FIELDS.get(field, field)}: {rest}" if sep else message


def _selector(text: str, default_namespace: str) -> dict[str, Any]:
    # NAMESPACE/ is the text before the first '/' unless that is a label key's prefix (app.kubernetes.io/name):
    # a prefix is a DNS subdomain with a dot, a namespace never has one
    ns, sep, rest = text.strip().partition("/")
    if not sep or "=" in ns or ("." in ns and _SUBDOMAIN.fullmatch(ns)):
        ns, rest = default_namespace, text.strip()
    selector: dict[str, str] = {}
    for part in rest.split(","):
        key, eq, value = part.strip().partition("=")
        if not eq or not key:
            raise ValueError(f"{PREFIX}source: {_shown(text)} must be [NAMESPACE/]KEY=VALUE[,KEY=VALUE...]")
        selector[key.strip()] = value.strip()
    return {"namespace": ns, "selector": selector}
