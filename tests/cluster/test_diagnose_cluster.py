"""`connprobe diagnose --from pod/NS/NAME svc/NS/NAME:PORT`: names resolved through the watched state; hostile or
unknown names are one-line usage errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from connprobe.cli import main
from tests.agent.helpers import REPO
from tests.cluster import labpods

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(("argv", "message"), [
    (["--from", "pod/../etc", "svc/payments/api:80"],
     "connprobe diagnose: --from: pod: namespace '..' is not a valid namespace name (lowercase letters, digits and "
     "'-', at most 63)"),
    (["--from", "pod/payments", "10.0.0.1:80"],
     "connprobe diagnose: --from: must be pod/NAMESPACE/NAME or deploy/NAMESPACE/NAME, got 'pod/payments'"),
    (["--from", "deploy/payments/Web$", "10.0.0.1:80"],
     "connprobe diagnose: --from: deploy: deployment name 'Web$' is not a valid name (lowercase letters, digits, "
     "'-' and '.', at most 253)"),
    (["svc/payments/api"], "connprobe diagnose: TARGET: 'svc/payments/api' needs a port: svc/payments/api:PORT "
                           "(a number or a port name)"),
    (["svc/payments/api:99999"], "connprobe diagnose: TARGET: svc: port 99999 is out of range (1-65535)"),
    (["svc/payments/1api:80"], "connprobe diagnose: TARGET: svc: service name '1api' is not a valid name "
                               "(lowercase letters, digits and '-', starting with a letter, at most 63)"),
    (["svc/payments/api:http/a b"], "connprobe diagnose: TARGET: svc: path '/a b' may hold only printable "
                                    "characters without spaces"),
])
def test_hostile_names_are_one_line_usage_errors(argv, message, capsys):
    assert main(["diagnose", "--no-kernel", *argv]) == 2
    assert capsys.readouterr().err.strip() == message


def test_unknown_names_say_what_is_missing(api, tmp_path, capsys):
    labpods.seed(api, roles=("srv1",))
    base = ["diagnose", "--no-kernel", "--kubernetes.kubeconfig", api.kubeconfig(tmp_path / "kc"),
            "--kubernetes.node", "n1", "--kubernetes.proc", str(tmp_path / "proc")]
    cases = [
        (["--from", "pod/frontend/web-1", "10.0.0.1:80"],
         "--from pod/frontend/web-1: pod frontend/web-1 is not on node n1 (its node's agent probes from it)"),
        (["--from", "deploy/frontend/web", "10.0.0.1:80"], "--from deploy/frontend/web: no pod of deployment "
                                                          "frontend/web on node n1"),
        (["svc/payments/nope:80"], "TARGET svc/payments/nope:80: service payments/nope does not exist"),
        (["svc/payments/api:grpc"], "TARGET svc/payments/api:grpc: service payments/api has no port grpc "
                                    "(ports: http:80)"),
        (["--from", "pod/payments/api-6c9d8f7b5-k4m2p", "10.0.0.1:80"],
         "--from pod/payments/api-6c9d8f7b5-k4m2p: pod payments/api-6c9d8f7b5-k4m2p: its network namespace was "
         "not found under /run/netns"),
    ]
    for argv, message in cases:
        assert main([*base, *argv]) == 2
        assert capsys.readouterr().err.strip() == f"connprobe diagnose: {message}"
    api.stop()
    assert main([*base, "svc/payments/api:80"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("connprobe diagnose: --kubernetes: the cluster state was not read within 10s (") and (
        "\n" not in err)


@pytest.mark.kernel
def test_diagnose_from_a_pod_to_a_service_names_the_destination_pod_of_a_drop(lab, api, tmp_path):
    labpods.seed(api)
    proc = labpods.fake_proc(tmp_path / "proc", lab)
    web, api_pod = labpods.PODS["client"][1], labpods.PODS["srv1"][1]
    argv = [sys.executable, "-m", "connprobe.cli", "diagnose", "--from", f"pod/frontend/{web}",
            "svc/payments/api:http", "--timeout", "1s", "--kubernetes.kubeconfig", api.kubeconfig(tmp_path / "kc"),
            "--kubernetes.node", "n1", "--kubernetes.proc", str(proc)]
    ok = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=90)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"pod/frontend/{web} is pod frontend/{web} (netns {lab.ns('client').name})" in ok.stdout
    assert "svc/payments/api:http is 10.96.0.10:80" in ok.stdout
    with lab.policy_drop("srv1", direction="in", port=8080):
        bad = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=90)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    out = " ".join(bad.stdout.split())
    assert f"in pod payments/{api_pod} on node n1 (netns inode {lab.ns('srv1').inode})" in out, bad.stdout
    assert "destination 10.96.0.10: service payments/api" in out
    assert f"source: pod frontend/{web} on node n1 (workload deployment/web)" in out
    assert "verdict: " in out and "policy_drop" in out
