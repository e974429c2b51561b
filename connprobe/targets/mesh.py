"""The node mesh (`--kubernetes.mesh K`): probes of K peer agents and of the node-local essentials, made from the
watched cluster state; part of the cluster target source (`connprobe/targets/cluster.py` adds them on each load).

    mesh/node/PEER   GET SCHEME://PEER_IP:PORT/-/healthy of each of the K peers `connprobe.cluster.mesh.peers`
                     picks among the Ready nodes (rendezvous hashing: the same K on every load, at most one peer
                     changed when a node joins or leaves); PORT and SCHEME are this agent's own (--listen, TLS of
                     --web.config.file): the DaemonSet runs every agent alike. /-/healthy answers without basic
                     auth. Label `peer_node`.
    mesh/dns-node    the cluster name (`dns_name`) asked of the first nameserver of the node's resolv.conf
    mesh/dns-pod     the same name asked of the cluster DNS Service's IP (`dns_service`, what a pod's resolv.conf
                     names)
    mesh/api         GET SCHEME://VIP:PORT/readyz of the Service default/kubernetes (the API server as pods reach
                     it, through kube-proxy); SCHEME and CA are the API client's; 200, 401 and 403 all mean "it
                     answers" (anonymous /readyz may be off)

Series: K + 3 probes per node, whatever the cluster's size. What cannot be made now (no Ready peer with an
address, no nameserver, a missing Service) is a note, as for the other cluster probes.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from connprobe.cluster.mesh import peers
from prober.spec import ModuleSpec, ProbeSpec

PREFIX = "mesh/"
API_STATUS = (200, 401, 403)
ADDRESS_TYPES = ("InternalIP", "ExternalIP")
MAX_NODE_NAME = 128  # a label value's limit (connprobe.config.MAX_LABEL_VALUE); Kubernetes allows 253
_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,126}[a-z0-9])?")


@dataclass(frozen=True)
class MeshOptions:
    k: int
    port: int = 9516
    scheme: str = "http"  # the peers' scheme: this agent's own
    ca_file: str | None = None  # https: the CA (or the shared certificate) the peers' certificates verify with
    server_name: str | None = None  # https: the name the peers' certificate carries
    peer_module: str | None = None  # a module of the config instead of the built-in one (--kubernetes.mesh-module)
    interval: float = 30.0
    source: str = "host"
    resolv_conf: str = "/etc/resolv.conf"
    dns_service: str = "kube-system/kube-dns"
    dns_name: str = "kubernetes.default.svc.cluster.local"
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or not 0 <= self.k <= 1000:
            raise ValueError(f"--kubernetes.mesh: {self.k!r} must be a whole number from 0 to 1000")
        ns, sep, name = self.dns_service.partition("/")
        if not sep or not ns or not name or "/" in name:
            raise ValueError(f"--kubernetes.dns-service: {self.dns_service!r} must be NAMESPACE/NAME")
        # every probe is built once here, so a bad option fails at start-up with one line, not at each load
        ProbeSpec(name="mesh/check", module=self._module("dns"), target="127.0.0.1:53", source=self.source,
                  interval=self.interval)
        if self.peer_module is None:
            self.peer_module_spec({})

    def _module(self, kind: str, tls: dict[str, Any] | None = None, status: tuple[int, ...] = ()) -> ModuleSpec:
        timeout = min(5.0, self.interval)
        if kind == "dns":
            return ModuleSpec(prober="dns", timeout=min(2.0, self.interval),
                              dns={"query_name": self.dns_name, "query_type": "A", "fail_if_no_answer": True})
        http: dict[str, Any] = {"valid_status_codes": status, "follow_redirects": False}
        if tls:
            http["tls"] = tls
        return ModuleSpec(prober="http", timeout=timeout, http=http)

    def peer_module_spec(self, modules: Mapping[str, ModuleSpec]) -> ModuleSpec:
        """The peers' module: the config's `peer_module` (ValueError when it is missing or not http), else the
        built-in http one (with TLS verified against `ca_file` for `server_name` when the agents speak https)."""
        if self.peer_module is not None:
            module = modules.get(self.peer_module)
            if module is None:
                known = ", ".join(sorted(modules)) or "none defined"
                raise ValueError(f"--kubernetes.mesh-module: no module {self.peer_module!r} in the config "
                                 f"(known: {known})")
            if module.prober != "http":
                raise ValueError(f"--kubernetes.mesh-module: {self.peer_module} is a {module.prober} module; the "
                                 "peers' health endpoint needs an http one")
            return module
        tls = None
        if self.scheme == "https":
            tls = {k: v for k, v in (("ca_file", self.ca_file), ("server_name", self.server_name)) if v}
        return self._module("http", tls)


def _url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


def node_address(node: Any) -> str | None:
    """The address peers reach a node's agent at (hostNetwork): its InternalIP, else its ExternalIP."""
    for kind in ADDRESS_TYPES:
        for t, addr in node.addresses:
            if t == kind:
                try:
                    ipaddress.ip_address(addr)
                except ValueError:
                    continue
                return addr
    return None


def first_nameserver(path: str) -> str | None:
    """The first nameserver of a resolv.conf (None when it has none or cannot be read)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(65536).splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                return str(ipaddress.ip_address(parts[1].split("%", 1)[0]))
            except ValueError:
                continue
    return None


def mesh_probes(opts: MeshOptions, view: Any, modules: Mapping[str, ModuleSpec] | None = None,
                api_client: Any = None) -> tuple[list[ProbeSpec], list[str]]:
    """The mesh's probes now, and notes for what cannot be probed now (the config's `modules` for
    --kubernetes.mesh-module: ValueError, one line, when it names none or not an http one)."""
    state = view.state
    out: list[ProbeSpec] = []
    notes: list[str] = []

    def add(name: str, module: ModuleSpec, target: str, **labels: str) -> None:
        out.append(ProbeSpec(name=PREFIX + name, module=module, target=target, source=opts.source,
                             interval=opts.interval, labels={**opts.labels, "mesh": name.split("/")[0], **labels}))

    nodes = {}
    for n in state.nodes():
        if _NODE_NAME.fullmatch(n.name):
            nodes[n.name] = n
        else:  # the API server validates names; a stand-in or a proxy might not: never a label or probe name
            notes.append(f"mesh: node {n.name[:60]!r} left out: not a DNS name of at most {MAX_NODE_NAME} characters")
    reachable = [n for n in nodes.values() if n.ready and node_address(n) is not None]
    if opts.k:
        chosen = peers(view.node_name, reachable, opts.k)
        module = opts.peer_module_spec(modules or {})
        for peer in chosen:
            addr = node_address(nodes[peer])
            add(f"node/{peer}", module, f"{opts.scheme}://{_url_host(addr)}:{opts.port}/-/healthy", peer_node=peer)
        if len(chosen) < opts.k:
            others = len([n for n in nodes.values() if n.name != view.node_name])
            notes.append(f"mesh: {len(chosen)} of {opts.k} peers (nodes besides this one: {others}, Ready with an "
                         f"address: {len([n for n in reachable if n.name != view.node_name])})")
    dns = opts._module("dns")
    server = first_nameserver(opts.resolv_conf)
    if server is None:
        notes.append(f"mesh/dns-node: no nameserver in {opts.resolv_conf}")
    else:
        add("dns-node", dns, f"{_url_host(server)}:53")
    ns, _, name = opts.dns_service.partition("/")
    svc = state.service(ns, name)
    vip = _vip(svc)
    if vip is None:
        notes.append(f"mesh/dns-pod: service {opts.dns_service} " + ("does not exist" if svc is None else
                                                                      "has no cluster IP"))
    else:
        port = next((p for _, p, proto in svc.ports if proto == "UDP" and p), 53)
        add("dns-pod", dns, f"{_url_host(vip)}:{port}")
    api = state.service("default", "kubernetes")
    vip = _vip(api)
    if vip is None:
        notes.append("mesh/api: service default/kubernetes " + ("does not exist" if api is None else
                                                                "has no cluster IP"))
    else:
        scheme, ca = "https", None
        config = getattr(api_client, "configuration", None)
        if config is not None:
            scheme = "http" if str(getattr(config, "host", "")).startswith("http://") else "https"
            ca = getattr(config, "ssl_ca_cert", None)
        port = api.ports[0][1] if api.ports else 443
        tls = None
        if scheme == "https":
            tls = {"server_name": "kubernetes.default.svc", **({"ca_file": ca} if ca else {})}
        add("api", opts._module("http", tls, API_STATUS), f"{scheme}://{_url_host(vip)}:{port}/readyz")
    return out, notes


def _vip(svc: Any) -> str | None:
    if svc is None:
        return None
    for ip in svc.cluster_ips:
        if ip and ip != "None":
            return ip
    return None
