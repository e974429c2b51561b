"""Probes written with cluster names, turned into ordinary probes from the watched cluster state.

A config probe whose `source:` is `pod NS/NAME` or `{namespace, selector}`, or whose `target:` is
`svc/NS/NAME:PORT[/PATH]` (optionally with `endpoints: true`), is a *template* (`ClusterProbe`): the config
validates it (`split_cluster_probe`, placeholders in the cluster fields) and the agent expands it
(`expand`) into concrete `ProbeSpec`s whenever the cluster changes:

- source pod / selector → each matching Running pod **on this node** whose network namespace is found under
  `/run/netns` (containerd and CRI-O name pods' namespaces there) → `source: netns NAME`; the probe is named
  `TEMPLATE@POD`;
- target svc → the Service's cluster IP and port (`TARGET`'s prober: tcp `IP:PORT`, grpc `IP:PORT`, http
  `http://IP:PORT/PATH`); with `endpoints: true` also each ready endpoint at the port the slice gives for
  that service port, named `TEMPLATE~POD` (so "the VIP fails but endpoint X is fine" shows).

What cannot be expanded now (no such service, a pod of another node, no namespace found yet) is a *note*,
shown on the status page, not an error: it may appear with the next watch event.

This is a target source behind a small interface (`templates in, ProbeSpecs and notes out`); a targets layer
can call `expand` as one source among others.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from connprobe.cluster.refs import (
    PodRef,
    SelectorSource,
    ServiceRef,
    is_cluster_source,
    parse_cluster_source,
    parse_service_target,
)
from prober.spec import ProbeSpec

SVC_PROBERS = ("tcp", "http", "grpc")
PLACEHOLDER_HOST = "127.0.0.1"  # validation only: a template is never probed as written


@dataclass(frozen=True)
class ClusterParts:
    source: PodRef | SelectorSource | None
    target: ServiceRef | None
    endpoints: bool = False


@dataclass(frozen=True)
class ClusterProbe:
    spec: ProbeSpec  # validated with placeholders in the cluster fields
    parts: ClusterParts

    @property
    def name(self) -> str:
        return self.spec.name


def is_cluster_probe(body: Mapping[str, Any]) -> bool:
    target = body.get("target")
    return (is_cluster_source(body.get("source")) or (isinstance(target, str) and target.startswith("svc/"))
            or "endpoints" in body)


def split_cluster_probe(body: Mapping[str, Any], prober: str) -> tuple[dict[str, Any], ClusterParts]:
    """The probe body with placeholders for its cluster fields, and those fields parsed. ValueError: one line
    naming the field."""
    body = dict(body)
    source = target = None
    if is_cluster_source(body.get("source")):
        try:
            source = parse_cluster_source(body["source"])
        except ValueError as exc:
            raise ValueError(f"source: {exc}") from None
        body["source"] = "host"
    raw_target = body.get("target")
    if isinstance(raw_target, str) and raw_target.startswith("svc/"):
        if prober not in SVC_PROBERS:
            raise ValueError(f"target: svc/ targets work with the {', '.join(SVC_PROBERS)} probers, not {prober}")
        try:
            target = parse_service_target(raw_target)
        except ValueError as exc:
            raise ValueError(f"target: {exc}") from None
        body["target"] = _target_text(prober, PLACEHOLDER_HOST, target.port if isinstance(target.port, int) else 1,
                                      target.path)
    endpoints = body.pop("endpoints", False)
    if not isinstance(endpoints, bool):
        raise ValueError(f"endpoints: must be true or false, got {endpoints!r}"[:200])
    if endpoints and target is None:
        raise ValueError("endpoints: only for a svc/NAMESPACE/NAME:PORT target")
    return body, ClusterParts(source, target, endpoints)


def _target_text(prober: str, ip: str, port: int, path: str) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    if prober == "http":
        return f"http://{host}:{port}{path}"
    return f"{host}:{port}"


# ---------------------------------------------------------------------------------------------------------
# expansion


@dataclass(frozen=True)
class Expansion:
    probes: tuple[ProbeSpec, ...]
    notes: tuple[str, ...]  # "probe NAME: why (part of) it is not running now"


def pod_sources(view: Any, source: PodRef | SelectorSource, netns_paths: Mapping[int, str]
                ) -> tuple[list[tuple[Any, str]], list[str]]:
    """(pod, "netns NAME") for the pods of this node a source names, and notes for the ones left out."""
    state = view.state
    notes: list[str] = []
    if isinstance(source, PodRef):
        if source.kind == "deploy":
            pods = [p for p in state.pods(source.namespace) if _deployment_of(p) == source.name]
            if not pods:
                return [], [f"no pod of deployment {source.namespace}/{source.name} on node {view.node_name}"]
        else:
            pods = [p for p in state.pods(source.namespace) if p.name == source.name]
            if not pods:
                return [], [f"pod {source.namespace}/{source.name} is not on node {view.node_name} (its node's agent "
                            "probes from it)"]
    else:
        pods = [p for p in state.pods(source.namespace) if source.matches(p.namespace, p.labels)]
    out = []
    inodes = view.pod_netns()
    for pod in sorted(pods, key=lambda p: p.name):
        if pod.host_network:
            out.append((pod, "host"))
            continue
        if pod.phase != "Running":
            notes.append(f"pod {pod.namespace}/{pod.name} is {pod.phase}")
            continue
        inode = inodes.get(pod.uid)
        name = netns_paths.get(inode) if inode is not None else None
        if name is None:
            notes.append(f"pod {pod.namespace}/{pod.name}: its network namespace was not found under /run/netns")
            continue
        out.append((pod, f"netns {name}"))
    return out, notes


def _deployment_of(pod: Any) -> str | None:
    from connprobe.cluster.identity import workload_of

    w = workload_of(pod)
    return w.name if w is not None and w.kind == "Deployment" else None


def service_targets(view: Any, ref: ServiceRef, prober: str, endpoints: bool
                    ) -> tuple[list[tuple[str, str]], list[str]]:
    """(name suffix, target) for the Service's VIP and, with `endpoints`, each ready endpoint; notes."""
    svc = view.state.service(ref.namespace, ref.name)
    if svc is None:
        return [], [f"service {ref.namespace}/{ref.name} does not exist"]
    port = next((p for p in svc.ports if (p[1] == ref.port if isinstance(ref.port, int) else p[0] == ref.port)),
                None)
    if port is None:
        have = ", ".join(f"{n}:{p}" if n else str(p) for n, p, _ in svc.ports) or "none"
        return [], [f"service {ref.namespace}/{ref.name} has no port {ref.port} (ports: {have})"]
    out: list[tuple[str, str]] = []
    notes: list[str] = []
    if svc.cluster_ips:
        out.append(("", _target_text(prober, svc.cluster_ips[0], port[1], ref.path)))
    else:
        notes.append(f"service {ref.namespace}/{ref.name} is headless (no cluster IP): only its endpoints")
    if endpoints or not svc.cluster_ips:
        seen = set()
        for eps in view.state.endpoint_slices(ref.namespace, ref.name):
            ep_port = next((p[1] for p in eps.ports if (p[0] or None) == (port[0] or None) and p[1]), None)
            if ep_port is None:
                continue
            for ep in eps.endpoints:
                if not ep.ready or not ep.addresses:
                    continue
                address = ep.addresses[0]
                try:
                    ipaddress.ip_address(address)
                except ValueError:
                    continue  # FQDN endpoints are not probed
                who = ep.pod_name or address
                if who in seen:
                    continue
                seen.add(who)
                out.append((f"~{who}", _target_text(prober, address, ep_port, ref.path)))
    return out, notes


def expand(templates: Iterable[ClusterProbe], view: Any, taken: Iterable[str] = ()) -> Expansion:
    """Concrete probes for the templates from the view's current state. `taken`: names already in use."""
    from connprobe.netnames import netns_names

    names = set(taken)
    probes: list[ProbeSpec] = []
    notes: list[str] = []
    netns_paths = {inode: name for inode, name in netns_names().items() if name != "host"}
    for t in templates:
        spec, parts = t.spec, t.parts
        sources: list[tuple[str, str]] = [("", spec.source)]
        if parts.source is not None:
            found, why = pod_sources(view, parts.source, netns_paths)
            notes.extend(f"probe {t.name}: {w}" for w in why)
            sources = [(f"@{pod.name}", src) for pod, src in found]
            if isinstance(parts.source, PodRef) and parts.source.kind == "pod":
                sources = [("", src) for _, src in sources]  # one pod: the probe keeps its name
        targets: list[tuple[str, str]] = [("", spec.target)]
        if parts.target is not None:
            targets, why = service_targets(view, parts.target, spec.module.prober, parts.endpoints)
            notes.extend(f"probe {t.name}: {w}" for w in why)
        for s_suffix, source in sources:
            for t_suffix, target in targets:
                name = f"{spec.name}{s_suffix}{t_suffix}"
                if name in names:
                    notes.append(f"probe {t.name}: {name} is already a probe's name; skipped")
                    continue
                names.add(name)
                probes.append(spec.model_copy(update={"name": name, "source": source, "target": target}))
    return Expansion(tuple(probes), tuple(notes))
