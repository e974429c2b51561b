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
