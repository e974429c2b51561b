"""deploy/kubernetes against the Kubernetes API's JSON schemas (kubernetes-validate, which bundles them: no
network), strict (an unknown field fails), for the newest Kubernetes version it ships; and the DaemonSet's
mounts and capabilities against what `connprobe doctor` checks (connprobe/doctor.py): each prerequisite of the
kernel sensor is present in the pod, and nothing is mounted that neither doctor nor the agent needs.
tests/deploy/test_image.py runs doctor in the image with exactly these mounts and capabilities."""

from __future__ import annotations

import inspect
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from bpf.kernel_compat import KALLSYMS, TRACEFS_CANDIDATES
from connprobe import doctor
from tests.deploy.helpers import DEPLOY

K8S = DEPLOY / "kubernetes"
ROOT = DEPLOY.parent
VERSION = kubernetes_validate.latest_version()
# Custom resources (the Prometheus operator's) have no schema among Kubernetes' own: checked by their own tests.
CUSTOM_GROUPS = {"monitoring.coreos.com"}


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                out.append((f"{path.relative_to(K8S)}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


def test_the_bundled_schemas_are_a_current_kubernetes():
    major, minor, *_ = (int(x) for x in VERSION.split("."))
    assert (major, minor) >= (1, 33), VERSION


def core_documents() -> list[tuple[str, dict]]:
    """Every manifest but the custom resources (tests/deploy/test_prometheus_operator.py checks those)."""
    return [(n, d) for n, d in documents() if d["apiVersion"].split("/")[0] not in CUSTOM_GROUPS]


@pytest.mark.parametrize("name,doc", core_documents(), ids=[n for n, _ in core_documents()])
def test_manifest_follows_the_kubernetes_schema(name, doc):
    try:
        kubernetes_validate.validate(doc, VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name}: {exc.message} at {'.'.join(map(str, exc.path))} (Kubernetes {VERSION})")


def test_a_misspelt_field_fails_the_schema():
    """The check above can fail: a field the API does not know is rejected (strict), as is a wrong type."""
    ds = next(d for n, d in documents() if d["kind"] == "DaemonSet")
    bad = yaml.safe_load(yaml.safe_dump(ds))
    bad["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSION, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(ds))
    bad["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["readOnly"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSION, strict=True)


@pytest.fixture(scope="module")
def pod() -> dict:
    (ds,) = [d for _, d in documents() if d["kind"] == "DaemonSet"]
    return ds["spec"]["template"]["spec"]


def _default(func, param: str) -> Path:
    return Path(inspect.signature(func).parameters[param].default)


def _mount_of(pod: dict, path: Path) -> tuple[dict, dict] | None:
    """The volume mount (and its volume) under which `path` lies inside the agent container, deepest first."""
    (agent,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    best = None
    for m in agent["volumeMounts"]:
        mp = Path(m["mountPath"])
        deeper = best is None or len(mp.parts) > len(Path(best[0]["mountPath"]).parts)
        if (path == mp or mp in path.parents) and deeper:
            best = (m, volumes[m["name"]])
    return best


def test_daemonset_gives_what_doctor_checks(pod):
    (agent,) = pod["containers"]
    sc = agent["securityContext"]
    # root: doctor's first check
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
    # kernel BTF: the node's, read-only from the host (struct offsets of the running kernel)
    btf = _default(doctor.check_btf, "path")
    mount, volume = _mount_of(pod, btf)
    assert volume["hostPath"]["path"] == mount["mountPath"] and mount["readOnly"] is True, btf
    # tracefs: the first place doctor (bpf.kernel_compat) looks, the host's, read-only
    tracefs = TRACEFS_CANDIDATES[0]
    mount, volume = _mount_of(pod, tracefs)
    assert volume["hostPath"]["path"] == str(tracefs) == mount["mountPath"] and mount["readOnly"] is True
    # kernel headers: doctor looks under /lib/modules/<release>/build. Not from the host: a writable scratch
    # volume, where the image's entrypoint links the headers it carries
    modules = _default(doctor.check_headers, "modules")
    mount, volume = _mount_of(pod, modules / "6.99.0-any" / "build")
    assert Path(mount["mountPath"]) == modules and "emptyDir" in volume and not mount.get("readOnly"), mount
    entrypoint = (ROOT / "deploy" / "image" / "entrypoint").read_text()
    assert f'kdir="{modules}/$(uname -r)"' in entrypoint and 'ln -sfn "$build" "$kdir/build"' in entrypoint
    for path in ("/lib/modules", "/usr/src"):
        assert all(v.get("hostPath", {}).get("path") != path for v in pod["volumes"]), f"host {path} mounted"
    # kallsyms: not mounted (with hostPID /proc is the host's, for --kubernetes), and the agent runs without
    # CAP_SYSLOG: doctor warns and drop locations are not symbolised (a warning, never a failure)
    assert _mount_of(pod, KALLSYMS) is None
    # BPF load + attach: CAP_BPF and CAP_PERFMON (doctor's hint for the root check names them)
    root_hint = inspect.getsource(doctor.check_root)
    for cap in ("BPF", "PERFMON"):
        assert f"CAP_{cap}" in root_hint and cap in sc["capabilities"]["add"], cap
    assert "SYSLOG" not in sc["capabilities"]["add"]


def test_nothing_else_is_mounted(pod):
    """Every mount is one doctor checks, or one the agent reads: named namespaces, its config, scratch /tmp."""
    (agent,) = pod["containers"]
    needed = {
        str(_default(doctor.check_btf, "path").parent),  # /sys/kernel/btf
        str(TRACEFS_CANDIDATES[0]),
        str(_default(doctor.check_headers, "modules")),
        "/run/netns",  # probes and diagnose --from a pod's named network namespace
        "/etc/connprobe",  # config, web config, the cluster's CA
        "/tmp",  # scratch for bcc and Python (root file system read-only)
    }
    assert {m["mountPath"] for m in agent["volumeMounts"]} == needed
