"""The --kubernetes command-line options of the agent and diagnose, and the ClusterView they ask for (the
kubernetes client is imported only when --kubernetes is given)."""

from __future__ import annotations

from typing import Any


def add_arguments(p: Any) -> None:
    """The --kubernetes options (agent and diagnose)."""
    k8s = p.add_argument_group("Kubernetes (off by default)")
    k8s.add_argument("--kubernetes", action="store_true",
                     help="watch the cluster (this node's pods, services, endpoint slices, nodes, namespaces) and "
                          "name pods, services and nodes in verdicts")
    k8s.add_argument("--kubernetes.kubeconfig", dest="kubeconfig", metavar="FILE",
                     help="kubeconfig to reach the API server (default: the pod's service account, in-cluster)")
    k8s.add_argument("--kubernetes.node", dest="kubernetes_node", metavar="NAME",
                     help="this node's name (default: $NODE_NAME, set from spec.nodeName in the DaemonSet)")
    k8s.add_argument("--kubernetes.discovery", dest="kubernetes_discovery", action="store_true",
                     help="(agent) also probe Services annotated connprobe.io/probe (see README: annotation "
                          "discovery)")
    k8s.add_argument("--kubernetes.proc", dest="kubernetes_proc", default="/proc", metavar="DIR",
                     help="where the host's /proc is (default /proc: the DaemonSet runs with hostPID)")


def open_cluster_view(args: Any, command: str, *, start: bool = True) -> Any:
    """The ClusterView the arguments ask for (None without --kubernetes); started unless `start=False` (the
    agent starts it after dropping capabilities, so its threads hold no more). ValueError: one line."""
    import os

    if not getattr(args, "kubernetes", False):
        return None
    from connprobe.cluster.state import ClusterConfigError, ClusterState, load_api_client
    from connprobe.cluster.view import ClusterView

    node = getattr(args, "kubernetes_node", None) or os.environ.get("NODE_NAME", "")
    if not node:
        raise ValueError(f"{command}: --kubernetes needs this node's name: --kubernetes.node NAME or $NODE_NAME")
    try:
        client = load_api_client(getattr(args, "kubeconfig", None))
    except ClusterConfigError as exc:
        raise ValueError(f"{command}: --kubernetes: {exc}") from None
    try:
        state = ClusterState(client, node_name=node)
    except ValueError as exc:
        client.close()
        raise ValueError(f"{command}: --kubernetes.node: {exc}") from None
    view = ClusterView(state, proc_root=getattr(args, "kubernetes_proc", "/proc"))
    return view.start() if start else view


def add_mesh_arguments(p: Any) -> None:
    """The node mesh's options (agent only; README "Node mesh")."""
    m = p.add_argument_group("Kubernetes node mesh (off by default; needs --kubernetes)")
    m.add_argument("--kubernetes.mesh", dest="kubernetes_mesh", type=int, metavar="K",
                   help="probe the health endpoint of K peer agents (rendezvous hashing on node names, Ready nodes "
                        "only) and the node-local essentials: cluster DNS through the node's resolver and through "
                        "the cluster DNS Service, the API server through Service default/kubernetes (0: only those)")
    m.add_argument("--kubernetes.mesh-interval", dest="kubernetes_mesh_interval", default="30s", metavar="DURATION",
                   help="how often each mesh probe runs (default 30s)")
    m.add_argument("--kubernetes.mesh-module", dest="kubernetes_mesh_module", metavar="NAME",
                   help="an http module of the config for the peer probes (default: a built-in one; with TLS in "
                        "--web.config.file it verifies the peers against its cert_file for "
                        "--kubernetes.mesh-server-name)")
    m.add_argument("--kubernetes.mesh-server-name", dest="kubernetes_mesh_server_name", default="connprobe",
                   metavar="NAME", help="the name in the agents' shared certificate (default connprobe)")
    m.add_argument("--kubernetes.mesh-source", dest="kubernetes_mesh_source", default="host", metavar="SOURCE",
                   help="where the mesh probes start: host (the node's network namespace; default) or netns NAME")
    m.add_argument("--kubernetes.resolv-conf", dest="kubernetes_resolv_conf", default="/etc/resolv.conf",
                   metavar="FILE", help="the node's resolv.conf: its first nameserver is mesh/dns-node's server "
                                        "(default /etc/resolv.conf)")
    m.add_argument("--kubernetes.dns-service", dest="kubernetes_dns_service", default="kube-system/kube-dns",
                   metavar="NS/NAME", help="the cluster DNS Service pods' resolv.conf names (default "
                                           "kube-system/kube-dns)")
    m.add_argument("--kubernetes.dns-name", dest="kubernetes_dns_name",
                   default="kubernetes.default.svc.cluster.local", metavar="NAME",
                   help="the name the DNS probes ask for (default kubernetes.default.svc.cluster.local)")


def mesh_options(args: Any, listen_port: int, web_config: Any = None, command: str = "connprobe agent") -> Any:
    """The MeshOptions the arguments ask for (None without --kubernetes.mesh); ValueError: one line naming the
    option. The peers listen as this agent does: the same port, https when `web_config` has TLS."""
    k = getattr(args, "kubernetes_mesh", None)
    if k is None:
        return None
    if not getattr(args, "kubernetes", False):
        raise ValueError(f"{command}: --kubernetes.mesh needs --kubernetes")
    from pydantic import ValidationError

    from connprobe.targets.mesh import MeshOptions
    from prober.spec import parse_duration

    try:
        interval = parse_duration(args.kubernetes_mesh_interval)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{command}: --kubernetes.mesh-interval: {exc}") from None
    if not 1 <= interval <= 3600:
        raise ValueError(f"{command}: --kubernetes.mesh-interval: {args.kubernetes_mesh_interval} must be from 1s "
                         "to 1h")
    tls = getattr(web_config, "tls", None)
    try:
        return MeshOptions(
            k=k, port=listen_port, scheme="https" if tls is not None else "http",
            ca_file=tls.cert_file if tls is not None else None,
            server_name=args.kubernetes_mesh_server_name or None, peer_module=args.kubernetes_mesh_module,
            interval=interval, source=args.kubernetes_mesh_source, resolv_conf=args.kubernetes_resolv_conf,
            dns_service=args.kubernetes_dns_service, dns_name=args.kubernetes_dns_name)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = {"source": "--kubernetes.mesh-source", "query_name": "--kubernetes.dns-name",
                 "server_name": "--kubernetes.mesh-server-name"}.get(str(err["loc"][-1]) if err["loc"] else "",
                                                                      "--kubernetes.mesh")
        raise ValueError(f"{command}: {field}: {err['msg'].removeprefix('Value error, ')}") from None
    except ValueError as exc:
        raise ValueError(f"{command}: {exc}") from None
