"""The ClusterRole in deploy/kubernetes/rbac.yaml is exactly what the code asks the API server for: the agent's
cluster view (connprobe/cluster) runs against the stand-in API server (tests/cluster/apiserver.py) through the
official client; every request it makes is turned into (API group, resource, verb) and compared with the rules."""

from __future__ import annotations

import pytest
import yaml

from connprobe.cluster.state import Backoff, ClusterState, load_api_client
from connprobe.cluster.view import ClusterView
from tests.cluster import objects as o
from tests.cluster.apiserver import FakeApiServer, wait_until
from tests.deploy.helpers import DEPLOY

pytestmark = pytest.mark.timeout(60)


def _asked(requests: list[tuple[str, dict[str, str]]]) -> set[tuple[str, str, str]]:
    """(group, resource, verb) of each request, the way the API server's authorizer sees it."""
    out = set()
    for path, query in requests:
        parts = [p for p in path.split("/") if p]
        if parts[0] == "api":  # /api/v1/RESOURCE[/NAME] or /api/v1/namespaces/NS/RESOURCE[/NAME]
            group, rest = "", parts[2:]
        else:  # /apis/GROUP/VERSION/...
            group, rest = parts[1], parts[3:]
        if len(rest) >= 3 and rest[0] == "namespaces":
            rest = rest[2:]
        resource, named = rest[0], len(rest) > 1
        verb = "watch" if query.get("watch") in ("true", "1") else ("get" if named else "list")
        out.add((group, resource, verb))
    return out


def _granted() -> set[tuple[str, str, str]]:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "rbac.yaml").read_text()))
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def test_the_cluster_role_grants_exactly_what_the_code_asks_for(tmp_path):
    api = FakeApiServer().start()
    try:
        api.apply(o.pod("api-1"))
        api.apply(o.service("api", annotations={"connprobe.io/probe": "tcp"}))
        api.apply(o.endpoint_slice("api-1", "api", [("10.244.1.5", "api-1", "n1", True)]))
        api.apply(o.node("n1"))
        api.apply(o.namespace("payments"))
        client = load_api_client(api.kubeconfig(tmp_path / "kc"))
        view = ClusterView(ClusterState(client, node_name="n1", watch_timeout=30, backoff=Backoff(0.02, 0.2)),
                           proc_root=str(tmp_path / "proc")).start()
        try:
            assert view.wait_synced(10)
            kinds = ("Pod", "Service", "EndpointSlice", "Node", "Namespace")
            wait_until(lambda: all(api.watches_of(k) for k in kinds))
            api.compact()  # 410 Gone on the next watch: the relist path is exercised too
            api.drop_watches()
            wait_until(lambda: all(len(api.watches_of(k)) >= 2 for k in kinds))
        finally:
            view.close()
        asked = _asked(list(api.requests))
    finally:
        api.stop()
    assert asked == _granted()
    assert {v for _, _, v in asked} == {"list", "watch"}  # read-only, and never one object by name


def test_the_request_mapping_sees_what_it_should():
    """The comparison above can fail: a get, a namespaced path and a group are told apart."""
    assert _asked([("/api/v1/namespaces/kube-system/pods/x", {}), ("/api/v1/pods", {"watch": "true"}),
                   ("/apis/discovery.k8s.io/v1/namespaces/a/endpointslices", {})]) == {
        ("", "pods", "get"), ("", "pods", "watch"), ("discovery.k8s.io", "endpointslices", "list")}
    assert _granted() - {("", "pods", "list")} != _granted()
