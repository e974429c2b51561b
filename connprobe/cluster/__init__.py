"""What the agent knows about its Kubernetes cluster.

- `state`: list+watch of this node's Pods and the cluster's Services, EndpointSlices, Nodes and Namespaces
  through the official `kubernetes` client, kept as slim records in an in-memory store (`ClusterState`).
- `identity`: who an address or a network namespace belongs to, at a given time (`IdentityCache`,
  `NetnsIndex`).
- `mesh`: which peer agents this node probes (rendezvous hashing, `peers`).
"""

from connprobe.cluster.identity import Identity, IdentityCache, NetnsIndex, Workload, pod_uid_from_cgroup, workload_of
from connprobe.cluster.mesh import peers
from connprobe.cluster.state import (
    ClusterConfigError,
    ClusterState,
    EndpointSliceInfo,
    NamespaceInfo,
    NodeInfo,
    PodInfo,
    ServiceInfo,
    load_api_client,
)

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
