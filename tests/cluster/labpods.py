"""Lab namespaces standing in for pods: the stand-in API server lists pods whose IPs are the lab namespaces'
addresses, and a fake /proc tree gives each "pod" a process whose cgroup path carries the pod's UID (kubelet's
systemd driver, containerd) and whose ns/net is the lab namespace itself (so its inode is the kernel's)."""

from __future__ import annotations

from pathlib import Path

from connprobe.lab.topology import VIP, VIP_PORT, role_addresses
from tests.cluster import objects as o

# role -> (namespace, pod name, owner, labels)
PODS = {
    "client": ("frontend", "web-5d8f7b9c4-x2x7q", ("ReplicaSet", "web-5d8f7b9c4"),
               {"app": "web", "pod-template-hash": "5d8f7b9c4"}),
    "srv1": ("payments", "api-6c9d8f7b5-k4m2p", ("ReplicaSet", "api-6c9d8f7b5"),
             {"app": "api", "pod-template-hash": "6c9d8f7b5"}),
    "srv2": ("payments", "ledger-0", ("StatefulSet", "ledger"), {"app": "ledger"}),
}
NODE = "n1"


def pod_object(role: str, node: str = NODE) -> dict:
    ns, name, owner, labels = PODS[role]
    return o.pod(name, namespace=ns, node=node, ips=role_addresses(role), owner=owner, labels=labels)


def uid_of(role: str) -> str:
    return pod_object(role)["metadata"]["uid"]


def seed(api, roles=("client", "srv1", "srv2")) -> None:
    """Pods for the lab roles, the api (lab VIP → srv1:8080) and ledger services, their slices, two nodes."""
    for ns in ("frontend", "payments"):
        api.apply(o.namespace(ns))
    api.apply(o.node(NODE, internal_ip="192.0.2.1"))
    api.apply(o.node("n2", internal_ip="192.0.2.2"))
    for role in roles:
        api.apply(pod_object(role))
    api.apply(o.service("api", cluster_ips=VIP, ports=(("http", VIP_PORT),)))
    api.apply(o.endpoint_slice("api-abcde", "api", [(role_addresses("srv1")[0], PODS["srv1"][1], NODE, True)],
                               port=8080, port_name="http"))
    api.apply(o.service("ledger", cluster_ips=("None",), ports=(("http", 8080),)))  # headless
    api.apply(o.endpoint_slice("ledger-fghij", "ledger", [(role_addresses("srv2")[0], "ledger-0", NODE, True)],
                               port=8080, port_name="http"))


def fake_proc(root: Path, lab, roles=("client", "srv1", "srv2")) -> Path:
    """/proc as the agent would see it on the node: PID 1 in the host's namespace, one pod process per role."""
    root.mkdir(parents=True, exist_ok=True)
    entries = {1: ("0::/init.scope\n", "/proc/1/ns/net")}
    for i, role in enumerate(roles):
        uid = uid_of(role).replace("-", "_")
        cgroup = (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/"
                  f"cri-containerd-{i:064x}.scope\n")
        entries[1000 + i] = (cgroup, lab.ns(role).path)
    for pid, (cgroup, ns) in entries.items():
        d = root / str(pid)
        (d / "ns").mkdir(parents=True, exist_ok=True)
        (d / "cgroup").write_text(cgroup)
        link = d / "ns" / "net"
        if link.is_symlink():
            link.unlink()
        link.symlink_to(ns)
    return root
