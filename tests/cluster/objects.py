"""Kubernetes objects shaped as the API server returns them (only the fields a real object always has, and
the ones connprobe reads)."""

from __future__ import annotations

import uuid


def _uid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, name))


def pod(
    name,
    namespace="payments",
    node="n1",
    ips=("10.244.1.5",),
    *,
    uid=None,
    owner=None,
    labels=None,
    phase="Running",
    host_network=False,
):
    meta = {
        "name": name,
        "namespace": namespace,
        "uid": uid or _uid(f"pod/{namespace}/{name}"),
        "creationTimestamp": "2026-11-30T10:00:00Z",
        "labels": dict(labels or {}),
    }
    if owner:
        kind, owner_name = owner
        meta["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": kind,
                "name": owner_name,
                "uid": _uid(f"{kind}/{owner_name}"),
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    status = {"phase": phase, "hostIP": "192.0.2.1", "qosClass": "Burstable"}
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": ip} for ip in ips]
    spec = {
        "nodeName": node,
        "containers": [{"name": "app", "image": "registry.example/app:1"}],
        "restartPolicy": "Always",
        "serviceAccountName": "default",
    }
    if host_network:
        spec["hostNetwork"] = True
    return {"kind": "Pod", "apiVersion": "v1", "metadata": meta, "spec": spec, "status": status}


def service(name, namespace="payments", cluster_ips=("10.96.0.10",), ports=((None, 80),), annotations=None):
    return {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": _uid(f"svc/{namespace}/{name}"),
            "annotations": dict(annotations or {}),
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ips[0],
            "clusterIPs": list(cluster_ips),
            "ports": [{"name": n, "port": p, "protocol": "TCP", "targetPort": p} for n, p in ports],
            "selector": {"app": name},
        },
        "status": {"loadBalancer": {}},
    }


def endpoint_slice(name, service_name, endpoints, namespace="payments", port=80, port_name=""):
    """endpoints: (address, pod name, node, ready) tuples."""
    eps = []
    for address, pod_name, node, ready in endpoints:
        eps.append(
            {
                "addresses": [address],
                "conditions": {"ready": ready, "serving": ready, "terminating": False},
                "nodeName": node,
                "targetRef": {
                    "kind": "Pod",
                    "namespace": namespace,
                    "name": pod_name,
                    "uid": _uid(f"pod/{namespace}/{pod_name}"),
                },
            }
        )
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "addressType": "IPv4",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": _uid(f"eps/{namespace}/{name}"),
            "labels": {
                "kubernetes.io/service-name": service_name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "endpoints": eps,
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
    }


def node(name, ready=True, internal_ip="192.0.2.1"):
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": name, "uid": _uid(f"node/{name}")},
        "spec": {"podCIDR": "10.244.1.0/24"},
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if ready else "False",
                    "reason": "KubeletReady" if ready else "KubeletNotReady",
                }
            ],
            "addresses": [{"type": "InternalIP", "address": internal_ip}, {"type": "Hostname", "address": name}],
        },
    }


def namespace(name):
    return {
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": {"name": name, "uid": _uid(f"ns/{name}"), "labels": {"kubernetes.io/metadata.name": name}},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }
