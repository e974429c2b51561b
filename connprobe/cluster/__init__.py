"""What the agent knows about its Kubernetes cluster.

- `state`: list+watch of this node's Pods and the cluster's Services, EndpointSlices, Nodes and Namespaces
  through the official `kubernetes` client, kept as slim records in an in-memory store (`ClusterState`).
- `identity`: who an address or a network namespace belongs to, at a given time (`IdentityCache`,
  `NetnsIndex`).
- `mesh`: which peer agents this node probes (rendezvous hashing, `peers`).
"""

# Imported on first use: the config parser reads `connprobe.cluster.refs`/`targets` without loading the
# kubernetes client.
_HOMES = {
    "Identity": "identity", "IdentityCache": "identity", "NetnsIndex": "identity", "Workload": "identity",
    "pod_uid_from_cgroup": "identity", "workload_of": "identity", "peers": "mesh",
    "ClusterConfigError": "state", "ClusterState": "state", "EndpointSliceInfo": "state", "NamespaceInfo": "state",
    "NodeInfo": "state", "PodInfo": "state", "ServiceInfo": "state", "load_api_client": "state",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'connprobe.cluster' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"connprobe.cluster.{home}"), name)


__all__ = [
    "ClusterConfigError",
    "ClusterState",
    "EndpointSliceInfo",
    "Identity",
    "IdentityCache",
    "NamespaceInfo",
    "NetnsIndex",
    "NodeInfo",
    "PodInfo",
    "ServiceInfo",
    "Workload",
    "load_api_client",
    "peers",
    "pod_uid_from_cgroup",
    "workload_of",
]
