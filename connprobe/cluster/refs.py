"""Names of cluster objects as a config or a command line writes them, parsed once with one-line errors.

    source: pod NAMESPACE/NAME                          one pod (probed by the agent of the pod's node)
    source: {namespace: NS, selector: {app: web}}       every matching pod on this node, each its own probe
    --from pod/NS/NAME | deploy/NS/NAME                 (diagnose) a pod, or a pod of a Deployment, on this node
    target: svc/NAMESPACE/NAME:PORT[/PATH]              a Service, by port number or port name

Names follow Kubernetes' own rules (namespaces and services: DNS-1123/1035 labels; pods: DNS-1123
subdomains; label keys and values as the API validates them), so a hostile or mistyped name is refused
before anything is looked up.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["PodRef", "SelectorSource", "ServiceRef", "is_cluster_source", "parse_cluster_source",
           "parse_service_target", "parse_workload_ref"]

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # DNS-1123 label (namespaces)
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")  # services
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")  # pods, deployments
_PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?")  # IANA_SVC_NAME
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_PATH = re.compile(r"/[\x21-\x7e]{0,1023}")
MAX_SELECTOR = 16


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


@dataclass(frozen=True, slots=True)
class PodRef:
    namespace: str
    name: str
    kind: str = "pod"  # or "deploy": a pod of that Deployment

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class SelectorSource:
    namespace: str
    selector: Mapping[str, str] = field(hash=False)

    def matches(self, namespace: str, labels: Mapping[str, str]) -> bool:
        return namespace == self.namespace and all(labels.get(k) == v for k, v in self.selector.items())

    def __str__(self) -> str:
        return f"{self.namespace} pods with " + ",".join(f"{k}={v}" for k, v in sorted(self.selector.items()))


@dataclass(frozen=True, slots=True)
class ServiceRef:
    namespace: str
    name: str
    port: int | str  # a number, or the name of one of the service's ports
    path: str = "/"

    def __str__(self) -> str:
        return f"svc/{self.namespace}/{self.name}:{self.port}" + (self.path if self.path != "/" else "")


def _namespace(value: str, what: str) -> str:
    if not _LABEL.fullmatch(value):
        prefix = f"{what}: " if what != "namespace" else ""
        raise ValueError(f"{prefix}namespace {_shown(value)} is not a valid namespace name (lowercase letters, "
                         "digits and '-', at most 63)")
    return value


def _pod_name(value: str, what: str, kind: str = "pod") -> str:
    if not _SUBDOMAIN.fullmatch(value):
        raise ValueError(f"{what}: {kind} name {_shown(value)} is not a valid name (lowercase letters, digits, "
                         "'-' and '.', at most 253)")
    return value


def is_cluster_source(value: object) -> bool:
    """Whether a config's `source:` is one of the cluster forms (a pod, or a namespace and selector)."""
    return isinstance(value, dict) or (isinstance(value, str) and value.strip().startswith("pod "))


def parse_cluster_source(value: object) -> PodRef | SelectorSource:
    """`pod NS/NAME` or `{namespace: NS, selector: {KEY: VALUE, ...}}`; ValueError (one line) otherwise."""
    if isinstance(value, str):
        text = value.strip()
        rest = text.removeprefix("pod ").strip()
        ns, sep, name = rest.partition("/")
        if not text.startswith("pod ") or not sep:
            raise ValueError(f"must be 'pod NAMESPACE/NAME', got {_shown(value)}")
        return PodRef(_namespace(ns, "pod"), _pod_name(name, "pod"))
    if not isinstance(value, dict):
        raise ValueError(f"must be 'pod NAMESPACE/NAME' or {{namespace: NS, selector: {{...}}}}, got {_shown(value)}")
    unknown = sorted(str(k) for k in value if k not in ("namespace", "selector"))
    if unknown:
        raise ValueError(f"unknown key {_shown(unknown[0])} (expected namespace, selector)")
    ns, selector = value.get("namespace"), value.get("selector")
    if not isinstance(ns, str):
        raise ValueError(f"namespace: required, a namespace name (got {_shown(ns)})")
    _namespace(ns, "namespace")
    if not isinstance(selector, dict) or not selector:
        raise ValueError(f"selector: required, a non-empty mapping of label to value (got {_shown(selector)})")
    if len(selector) > MAX_SELECTOR:
        raise ValueError(f"selector: {len(selector)} labels, more than {MAX_SELECTOR}")
    clean: dict[str, str] = {}
    for k, v in selector.items():
        if not isinstance(k, str) or not _label_key_ok(k):
            raise ValueError(f"selector: {_shown(k)} is not a valid label key")
        if isinstance(v, bool) or not isinstance(v, str | int) or not _LABEL_VALUE.fullmatch(str(v)):
            raise ValueError(f"selector: {k}: {_shown(v)} is not a valid label value")
        clean[k] = str(v)
    return SelectorSource(ns, clean)


def _label_key_ok(key: str) -> bool:
    prefix, sep, name = key.rpartition("/")
    if sep and (len(prefix) > 253 or not _SUBDOMAIN.fullmatch(prefix)):
        return False
    return bool(_LABEL_NAME.fullmatch(name))


def parse_workload_ref(value: str) -> PodRef:
    """`pod/NS/NAME` or `deploy/NS/NAME` (diagnose's --from); ValueError (one line) otherwise."""
    kind, sep, rest = value.partition("/")
    ns, sep2, name = rest.partition("/")
    if kind not in ("pod", "deploy", "deployment") or not sep or not sep2:
        raise ValueError(f"must be pod/NAMESPACE/NAME or deploy/NAMESPACE/NAME, got {_shown(value)}")
    kind = "deploy" if kind.startswith("deploy") else "pod"
    return PodRef(_namespace(ns, kind), _pod_name(name, kind, "deployment" if kind == "deploy" else "pod"), kind)


def parse_service_target(value: object) -> ServiceRef:
    """`svc/NAMESPACE/NAME:PORT[/PATH]` (PORT a number or a port name); ValueError (one line) otherwise."""
    if not isinstance(value, str) or not value.startswith("svc/"):
        raise ValueError(f"must be svc/NAMESPACE/NAME:PORT, got {_shown(value)}")
    rest = value[4:]
    ns, sep, rest = rest.partition("/")
    if not sep:
        raise ValueError(f"must be svc/NAMESPACE/NAME:PORT, got {_shown(value)}")
    _namespace(ns, "svc")
    name_port, slash, path = rest.partition("/")
    name, colon, port = name_port.partition(":")
    if not colon or not port:
        raise ValueError(f"{_shown(value)} needs a port: svc/{ns}/{name or 'NAME'}:PORT (a number or a port name)")
    if not _DNS1035.fullmatch(name):
        raise ValueError(f"svc: service name {_shown(name)} is not a valid name (lowercase letters, digits and "
                         "'-', starting with a letter, at most 63)")
    port_value: int | str
    if port.isascii() and port.isdigit():
        port_value = int(port)
        if not 0 < port_value < 65536:
            raise ValueError(f"svc: port {port} is out of range (1-65535)")
    elif _PORT_NAME.fullmatch(port) and any(c.isalpha() for c in port):
        port_value = port
    else:
        raise ValueError(f"svc: port {_shown(port)} is neither a number nor a port name")
    path = "/" + path if slash else "/"
    if not _PATH.fullmatch(path):
        raise ValueError(f"svc: path {_shown(path)} may hold only printable characters without spaces")
    return ServiceRef(ns, name, port_value, path)
