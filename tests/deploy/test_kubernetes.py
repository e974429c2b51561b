"""deploy/kubernetes: the DaemonSet, RBAC, ConfigMap and Service parse, decode into the Kubernetes API's own
models without losing a key, and carry what the agent needs (host namespaces, BPF capabilities, read-only
kernel mounts, read-only RBAC, a config connprobe accepts)."""

from __future__ import annotations

import pytest
import yaml
from kubernetes.client import ApiClient

from connprobe.config import parse_config
from tests.deploy.helpers import DEPLOY

K8S = DEPLOY / "kubernetes"
FILES = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
KERNEL_MOUNTS = ("/sys/kernel/tracing", "/sys/kernel/btf", "/run/netns")


def objects() -> dict[tuple[str, str], dict]:
    out = {}
    for path in FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


@pytest.fixture(scope="module")
def objs() -> dict[tuple[str, str], dict]:
    return objects()


@pytest.fixture(scope="module")
def pod(objs) -> dict:
    return objs[("DaemonSet", "connprobe")]["spec"]["template"]["spec"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_manifests_decode_into_the_kubernetes_models(path):
    api = ApiClient()
    for doc in yaml.safe_load_all(path.read_text()):
        version = doc["apiVersion"].rsplit("/", 1)[-1]
        model = api._ApiClient__deserialize(doc, version.capitalize() + doc["kind"])
        # a misspelt or misplaced field is dropped by the model: the round trip must give back every key
        assert api.sanitize_for_serialization(model) == doc, f"{path.name}: {doc['kind']} has unknown fields"


def test_the_set_is_complete_and_kustomize_lists_it(objs):
    assert {k for k, _ in objs} == {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                    "ConfigMap", "DaemonSet", "Service"}
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in FILES)
    for (kind, _), obj in objs.items():
        if kind not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == "connprobe", kind


def test_daemonset_runs_in_the_host_namespaces_with_bpf_capabilities(objs, pod):
    ds = objs[("DaemonSet", "connprobe")]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"operator": "Exists"} in pod["tolerations"]
    (agent,) = pod["containers"]
    sc = agent["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"} <= set(sc["capabilities"]["add"])
    assert "--config=/etc/connprobe/config.yaml" in agent["args"]


def test_kernel_mounts_are_read_only_host_paths(pod):
    (agent,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in KERNEL_MOUNTS:
        assert path in mounts, path
        assert mounts[path]["readOnly"] is True, path
        assert volumes[mounts[path]["name"]]["hostPath"]["path"] == path
    assert mounts["/run/netns"]["mountPropagation"] == "HostToContainer"
    # every writable mount is a scratch volume, never a host path
    for m in agent["volumeMounts"]:
        if not m.get("readOnly"):
            assert "hostPath" not in volumes[m["name"]], m["mountPath"]


def test_metrics_port_health_checks_and_scrape_annotations_agree(objs, pod):
    (agent,) = pod["containers"]
    (port,) = agent["ports"]
    annotations = objs[("DaemonSet", "connprobe")]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert any(a.endswith(f":{port['containerPort']}") for a in agent["args"] if a.startswith("--listen="))
    assert agent["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert agent["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    svc = objs[("Service", "connprobe")]["spec"]
    assert svc["clusterIP"] == "None"
    assert svc["ports"][0]["targetPort"] == port["name"]
    assert svc["selector"].items() <= objs[("DaemonSet", "connprobe")]["spec"]["template"]["metadata"]["labels"].items()


def test_rbac_is_read_only_and_bound_to_the_agent(objs, pod):
    role = objs[("ClusterRole", "connprobe")]
    for rule in role["rules"]:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
        assert "secrets" not in rule["resources"]
    binding = objs[("ClusterRoleBinding", "connprobe")]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "connprobe"} in \
        binding["subjects"]
    assert ("ServiceAccount", pod["serviceAccountName"]) in objs


def test_configmap_holds_a_config_connprobe_accepts(objs, pod):
    volumes = {v["name"]: v for v in pod["volumes"]}
    (agent,) = pod["containers"]
    config_mount = next(m for m in agent["volumeMounts"] if m["mountPath"] == "/etc/connprobe")
    cm_name = volumes[config_mount["name"]]["configMap"]["name"]
    config = parse_config(objs[("ConfigMap", cm_name)]["data"]["config.yaml"], "configmap.yaml")
    assert {p.module.prober for p in config.probes} == {"http", "tcp", "dns"}
    assert all(p.source == "host" for p in config.probes)


def test_the_container_arguments_are_ones_the_cli_accepts(pod):
    from connprobe.agent import parse_listen
    from connprobe.cli import build_parser

    (agent,) = pod["containers"]
    args = [a.replace("$(NODE_IP)", "10.0.0.7") for a in agent["args"]]
    ns = build_parser().parse_args(args)
    assert ns.command == "agent" and ns.config == "/etc/connprobe/config.yaml"
    assert parse_listen(ns.listen) == ("10.0.0.7", 9516)
