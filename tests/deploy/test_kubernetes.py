"""deploy/kubernetes: the DaemonSet, ServiceAccount, ConfigMap, web-config Secret and Service parse, decode into
the Kubernetes API's own models without losing a key, and carry what the agent needs and no more (the host
network, BPF capabilities and SYS_ADMIN with their reasons, the runtime's default seccomp and AppArmor profiles,
read-only kernel mounts, the token in the agent's pod only (RBAC: tests/deploy/test_rbac.py), a config connprobe
accepts, the web config Prometheus uses).
tests/app/test_privileges.py shows, on the kernel, that each capability given is needed."""

from __future__ import annotations

import re

import pytest
import yaml
from kubernetes.client import ApiClient

from connprobe.config import parse_config
from tests.deploy.helpers import DEPLOY, run

K8S = DEPLOY / "kubernetes"
FILES = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
KERNEL_MOUNTS = ("/sys/kernel/tracing", "/sys/kernel/btf", "/run/netns")
CAPABILITIES = ["BPF", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"]
WEB_CONFIG = "/etc/connprobe/web/web-config.yml"


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
    assert {k for k, _ in objs} == {"Namespace", "ServiceAccount", "Secret", "ConfigMap", "DaemonSet", "Service",
                                    "ClusterRole", "ClusterRoleBinding"}
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in FILES)
    for (kind, _), obj in objs.items():
        if kind not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):  # cluster-scoped
            assert obj["metadata"]["namespace"] == "connprobe", kind


def test_daemonset_has_the_host_network_and_only_the_capabilities_it_needs(objs, pod):
    ds = objs[("DaemonSet", "connprobe")]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert pod["hostNetwork"] is True
    assert pod["hostPID"] is True and not pod.get("hostIPC")  # --kubernetes: pods' /proc entries name their netns
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"operator": "Exists"} in pod["tolerations"]
    (agent,) = pod["containers"]
    sc = agent["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": CAPABILITIES}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["appArmorProfile"] == {"type": "RuntimeDefault"}
    assert "--config=/etc/connprobe/config.yaml" in agent["args"]


def test_each_privilege_kept_says_why_in_the_manifest():
    text = (K8S / "daemonset.yaml").read_text()
    header = text[:text.index("apiVersion:")]
    for cap in CAPABILITIES:
        assert re.search(rf"^#\s+(\w+, )*{cap}\b.*\S", header, re.M), f"no reason given for {cap}"
    assert re.search(r"^#\s+hostNetwork\s+\S", header, re.M)
    assert re.search(r"^#\s+hostPID, SYS_PTRACE\s+--kubernetes: \S", header, re.M)
    for gone in ("NET_ADMIN", "SYS_RESOURCE", "SYSLOG"):
        assert gone in header, f"the manifest does not say why {gone} is not given"


def test_the_token_is_in_the_agents_pod_only(objs, pod):
    sa = objs[("ServiceAccount", pod["serviceAccountName"])]
    assert sa["automountServiceAccountToken"] is False  # another pod using the account gets none
    assert pod["automountServiceAccountToken"] is True  # the agent's --kubernetes lists and watches with it
    (agent,) = pod["containers"]
    assert "--kubernetes" in agent["args"]
    assert not any(m["mountPath"].startswith("/var/run/secrets") for m in agent["volumeMounts"])
    (binding,) = [o for (k, _), o in objs.items() if k == "ClusterRoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]


def _projected_files(pod) -> dict[str, tuple[str, str, str]]:
    """Path inside the container -> (kind, object name, key) of the config volume's projected sources."""
    (agent,) = pod["containers"]
    mount = next(m for m in agent["volumeMounts"] if m["mountPath"] == "/etc/connprobe")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    out = {}
    for src in volume["projected"]["sources"]:
        (kind, ref), = src.items()
        for item in ref.get("items", []):
            out[f"{mount['mountPath']}/{item['path']}"] = (kind, ref["name"], item["key"])
    return out


def test_web_config_secret_is_mounted_and_passed_to_the_agent(objs, pod):
    (agent,) = pod["containers"]
    assert f"--web.config.file={WEB_CONFIG}" in agent["args"]
    files = _projected_files(pod)
    kind, name, key = files[WEB_CONFIG]
    assert kind == "secret"
    secret = objs[("Secret", name)]["stringData"]
    web = yaml.safe_load(secret[key])
    assert set(web) == {"tls_server_config", "basic_auth_users"}
    tls = web["tls_server_config"]
    for path in (tls["cert_file"], tls["key_file"]):  # each file the web config names is in the mount
        assert files[path][:2] == ("secret", name) and files[path][2] in secret, path
    # a placeholder, not a real hash: no password works until the operator puts one in
    (user, placeholder), = web["basic_auth_users"].items()
    assert user == "prometheus" and not placeholder.startswith("$2")
    for check in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert agent[check]["httpGet"]["scheme"] == "HTTPS"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["projected"]["defaultMode"] == 0o400


def test_prometheus_scrapes_the_agents_with_tls_and_basic_auth(objs, promtool, tmp_path):
    (job,) = yaml.safe_load((DEPLOY / "prometheus" / "scrape-kubernetes.yml").read_text())["scrape_configs"]
    assert job["scheme"] == "https"
    assert job["basic_auth"]["username"] == "prometheus" and job["basic_auth"]["password_file"]
    assert "insecure_skip_verify" not in job["tls_config"]
    # the certificate the Secret's instructions make carries the name Prometheus checks
    header = (K8S / "web-config-secret.yaml").read_text()
    assert f"subjectAltName=DNS:{job['tls_config']['server_name']}" in header
    # promtool checks the TLS and auth settings (this Debian build has no Kubernetes discovery: a static target)
    for key in ("ca_file", "password_file"):
        section = job["tls_config"] if key == "ca_file" else job["basic_auth"]
        local = tmp_path / key
        local.write_text("x")
        section[key] = str(local)
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [{"targets": ["10.0.0.7:9516"]}]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"scrape_configs": [job]}))
    out = run(promtool, "check", "config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr


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


def test_configmap_holds_a_config_connprobe_accepts(objs, pod, tmp_path):
    files = _projected_files(pod)
    (cm_name,) = [src["configMap"]["name"] for src in
                  next(v for v in pod["volumes"] if v["name"] == "config")["projected"]["sources"]
                  if "configMap" in src and "items" not in src["configMap"]]
    config = parse_config(objs[("ConfigMap", cm_name)]["data"]["config.yaml"], "configmap.yaml")
    assert {p.module.prober for p in config.probes} == {"http", "tcp", "dns"}
    # cross-node evidence: the peer token is in the Secret's mount, a placeholder the agent refuses
    assert files[config.node.peer_token_file] == ("secret", "connprobe-web-config", "peer-token")
    from connprobe.crossnode import PeerConfigError, read_token

    token = objs[("Secret", "connprobe-web-config")]["stringData"]["peer-token"]
    placeholder = tmp_path / "peer-token"
    placeholder.write_text(token + "\n")
    with pytest.raises(PeerConfigError, match="still the placeholder"):
        read_token(str(placeholder), "node: peer_token_file")
    assert all(p.source == "host" for p in config.probes)
    # every CA file a module names is mounted (the cluster's CA, without a service account token)
    for module in config.modules.values():
        tls = getattr(getattr(module, "http", None), "tls", None)
        if tls is not None and tls.ca_file:
            assert files[tls.ca_file] == ("configMap", "kube-root-ca.crt", "ca.crt"), tls.ca_file


def test_the_container_arguments_are_ones_the_cli_accepts(pod):
    from connprobe.cli import build_parser
    from connprobe.commands.agent import parse_listen

    (agent,) = pod["containers"]
    args = [a.replace("$(NODE_IP)", "10.0.0.7") for a in agent["args"]]
    ns = build_parser().parse_args(args)
    assert ns.command == "agent" and ns.config == "/etc/connprobe/config.yaml"
    assert ns.web_config_file == WEB_CONFIG and not ns.keep_capabilities
    assert parse_listen(ns.listen) == ("10.0.0.7", 9516)
    with pytest.raises(ValueError, match=r"^--listen: "):  # a digit to str.isdigit, not to int()
        parse_listen("[::1]:\u00b2")
    # --kubernetes: in-cluster credentials (no kubeconfig), this node's name from the downward API
    assert ns.kubernetes and ns.kubernetes_discovery and ns.kubeconfig is None and ns.kubernetes_node is None
    # the node mesh: peers on the same port over https, verified with the agents' shared certificate (the Secret's
    # instructions make it for the name "connprobe")
    from connprobe.cluster.options import mesh_options
    from connprobe.webconfig import TLSServerConfig, WebConfig

    web = WebConfig(tls=TLSServerConfig(cert_file="/etc/connprobe/web/tls.crt", key_file="/etc/connprobe/web/tls.key"))
    mesh = mesh_options(ns, 9516, web)
    assert (mesh.k, mesh.port, mesh.scheme, mesh.source) == (3, 9516, "https", "host")
    assert (mesh.ca_file, mesh.server_name) == ("/etc/connprobe/web/tls.crt", "connprobe")
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in agent["env"]
