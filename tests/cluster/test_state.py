"""ClusterState against the stand-in API server, through the official client: list, watch, bookmarks,
410 Gone, dropped connections, a server that is down for a while, token auth."""

from __future__ import annotations

import logging
import random
import subprocess

import pytest
from kubernetes.config import incluster_config
from prometheus_client import CollectorRegistry

from connprobe.cluster.state import Backoff, ClusterConfigError, ClusterState, load_api_client
from tests.cluster import objects as o
from tests.cluster.apiserver import FakeApiServer, wait_until

pytestmark = pytest.mark.timeout(60)


def _seed(api):
    api.apply(o.pod("api-7f9c", owner=("ReplicaSet", "api-5d8f7b9c4"), labels={"pod-template-hash": "5d8f7b9c4"}))
    api.apply(o.pod("remote-1", node="n2", ips=("10.244.2.7",)))
    api.apply(o.service("api"))
    api.apply(o.endpoint_slice("api-x1", "api", [("10.244.1.5", "api-7f9c", "n1", True)]))
    api.apply(o.node("n1"))
    api.apply(o.node("n2", internal_ip="192.0.2.2"))
    api.apply(o.namespace("payments"))


def _names(state):
    return sorted(p.name for p in state.pods())


def test_initial_list_keeps_this_nodes_pods_and_the_cluster_objects(api, make_state):
    _seed(api)
    state = make_state().start()
    assert state.wait_synced(10)
    assert _names(state) == ["api-7f9c"]  # remote-1 is on n2
    (pod,) = state.pods()
    assert pod.ips == ("10.244.1.5",) and pod.node == "n1" and pod.owner_kind == "ReplicaSet"
    assert state.service("payments", "api").cluster_ips == ("10.96.0.10",)
    (eps,) = state.endpoint_slices("payments", "api")
    assert eps.endpoints[0].pod_name == "api-7f9c" and eps.endpoints[0].ready
    assert {n.name: n.ready for n in state.nodes()} == {"n1": True, "n2": True}
    assert [n.name for n in state.namespaces()] == ["payments"]
    # The pod list and watch carry the field selector; the other kinds are cluster-wide.
    assert api.lists_of("Pod")[0]["fieldSelector"] == "spec.nodeName=n1"
    wait_until(lambda: api.watches_of("Pod"))
    watch = api.watches_of("Pod")[0]
    assert watch["fieldSelector"] == "spec.nodeName=n1"
    assert watch["allowWatchBookmarks"] == "true"
    assert watch["resourceVersion"] == str(api.resource_version)
    assert "fieldSelector" not in api.lists_of("Service")[0]


def test_watch_events_are_applied_and_handed_to_listeners(api, make_state):
    _seed(api)
    state = make_state().start()
    assert state.wait_synced(10)
    seen = []
    state.subscribe(lambda kind, etype, old, new: seen.append((kind, etype, (new or old).name)))
    api.apply(o.pod("worker-0", ips=("10.244.1.9", "fd00:10:244:1::9"), owner=("StatefulSet", "worker")))
    wait_until(lambda: "worker-0" in _names(state))
    api.apply(o.pod("worker-0", ips=("10.244.1.10",), owner=("StatefulSet", "worker")))
    wait_until(lambda: ("pods", "MODIFIED", "worker-0") in seen)
    assert [p.ips for p in state.pods() if p.name == "worker-0"] == [("10.244.1.10",)]
    api.delete("Pod", "payments", "worker-0")
    api.delete("Service", "payments", "api")
    wait_until(lambda: ("services", "DELETED", "api") in seen and ("pods", "DELETED", "worker-0") in seen)
    assert _names(state) == ["api-7f9c"]
    assert state.service("payments", "api") is None
    assert [e for e in seen if e[0] == "pods"] == [
        ("pods", "ADDED", "worker-0"),
        ("pods", "MODIFIED", "worker-0"),
        ("pods", "DELETED", "worker-0"),
    ]
    assert [e for e in seen if e[0] != "pods"] == [("services", "DELETED", "api")]


def test_a_bookmark_only_moves_the_version(api, make_state):
    _seed(api)
    state = make_state().start()
    assert state.wait_synced(10)
    seen = []
    state.subscribe(lambda *event: seen.append(event))
    wait_until(lambda: api.watches_of("Pod"))
    moved_to = api.bump_silently(7)
    api.bookmark("Pod")
    pods = state.reflectors["pods"]
    wait_until(lambda: pods.bookmarks == 1)
    assert pods.resource_version == str(moved_to)
    assert seen == []
    api.drop_watches()  # the next watch starts from the bookmark's version
    wait_until(lambda: len(api.watches_of("Pod")) >= 2)
    assert api.watches_of("Pod")[-1]["resourceVersion"] == str(moved_to)
    assert len(api.lists_of("Pod")) == 1


def test_a_dropped_watch_resumes_from_the_last_version_without_listing(api, make_state):
    _seed(api)
    state = make_state().start()
    assert state.wait_synced(10)
    last = api.apply(o.pod("before-drop", ips=("10.244.1.20",)))
    wait_until(lambda: "before-drop" in _names(state))
    api.drop_watches()
    api.apply(o.pod("during-drop", ips=("10.244.1.21",)))  # replayed from the version the watch resumes at
    wait_until(lambda: "during-drop" in _names(state))
    resumed = [w["resourceVersion"] for w in api.watches_of("Pod")]
    assert str(last) in resumed[1:]
    assert len(api.lists_of("Pod")) == 1
    assert state.reflectors["pods"].drops >= 1
    assert not state.stale


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-status"])
def test_410_gone_lists_again_and_turns_the_difference_into_events(api, make_state, as_http):
    _seed(api)
    state = make_state().start()
    assert state.wait_synced(10)
    seen = []
    state.subscribe(lambda kind, etype, old, new: seen.append((kind, etype, (new or old).name)))
    api.gone_as_http = as_http
    api.stop()  # while it is away, the cluster changes and the history is compacted
    wait_until(lambda: state.stale)
    api.delete("Pod", "payments", "api-7f9c")
    api.apply(o.pod("api-new", ips=("10.244.1.30",)))
    api.compact()
    api.start()
    wait_until(lambda: "api-new" in _names(state) and not state.stale)
    assert _names(state) == ["api-new"]
    assert ("pods", "DELETED", "api-7f9c") in seen and ("pods", "ADDED", "api-new") in seen
    assert state.reflectors["pods"].relists == 1
    assert len(api.lists_of("Pod")) == 2
    assert api.lists_of("Pod")[1]["fieldSelector"] == "spec.nodeName=n1"


def test_server_down_keeps_the_last_state_marks_it_stale_and_recovers(api, make_state):
    _seed(api)
    state = make_state().start()
    registry = CollectorRegistry()
    registry.register(state)
    assert state.wait_synced(10)
    assert registry.get_sample_value("connprobe_cluster_state_stale") == 0
    api.stop()
    wait_until(lambda: state.stale)
    assert state.stale_since is not None
    wait_until(lambda: "cannot connect to the API server (Connection refused)" in (state.last_error or ""))
    assert "\n" not in state.last_error
    assert _names(state) == ["api-7f9c"] and state.service("payments", "api") is not None
    assert registry.get_sample_value("connprobe_cluster_state_stale") == 1
    assert registry.get_sample_value("connprobe_cluster_state_stale_since_seconds") == state.stale_since
    assert registry.get_sample_value("connprobe_cluster_objects", {"kind": "pods"}) == 1
    api.start()
    wait_until(lambda: not state.stale)
    assert state.stale_since is None and state.last_error is None
    assert registry.get_sample_value("connprobe_cluster_state_stale") == 0
    api.apply(o.pod("after", ips=("10.244.1.40",)))
    wait_until(lambda: "after" in _names(state))


def test_a_wrong_token_is_a_one_line_error_and_stale(api, make_state, caplog):
    _seed(api)
    caplog.set_level(logging.INFO, logger="connprobe.cluster")
    state = make_state(token="not-the-token").start()
    wait_until(lambda: state.last_error is not None)
    assert not state.synced and state.stale
    assert "HTTP 401 Unauthorized (the token was refused)" in state.last_error
    records = [r for r in caplog.records if r.name == "connprobe.cluster"]
    assert records and all(r.exc_info is None and "\n" not in r.getMessage() for r in records)
    assert all(q.get("watch") != "true" for _, q in api.requests)  # never watched without a list


def test_close_is_prompt_in_every_phase(api, make_state):
    _seed(api)
    watching = make_state().start()
    assert watching.wait_synced(10)
    wait_until(lambda: len(api.watches_of("Namespace")) >= 1)
    watching.close()  # open watches are cut, not waited for (watch_timeout is 30 s)
    api.stop()
    backing_off = make_state().start()
    wait_until(lambda: backing_off.stale)
    backing_off.close()
    api.start()


def test_indexes_follow_changes(api, make_state):
    _seed(api)
    api.apply(o.pod("other-ns-pod", namespace="shop", ips=("10.244.1.60",)))
    api.apply(o.endpoint_slice("api-x2", "api", [("10.244.1.61", "api-2", "n1", True)]))
    api.apply(o.endpoint_slice("web-x1", "web", [("10.244.1.62", "web-1", "n1", True)]))
    state = make_state(kinds=["pods", "endpointslices"]).start()
    assert state.wait_synced(10)
    assert [p.name for p in state.pods("shop")] == ["other-ns-pod"]
    assert sorted(s.name for s in state.endpoint_slices("payments", "api")) == ["api-x1", "api-x2"]
    assert len(state.endpoint_slices("payments")) == 3
    api.delete("EndpointSlice", "payments", "api-x1")
    api.apply(o.pod("other-ns-pod", namespace="shop", ips=("10.244.1.63",)))
    wait_until(lambda: [s.name for s in state.endpoint_slices("payments", "api")] == ["api-x2"])
    wait_until(lambda: [p.ips for p in state.pods("shop")] == [("10.244.1.63",)])
    assert state.pods("nowhere") == [] and state.endpoint_slices("payments", "nothing") == []
    assert state.services() == [] and state.node("n1") is None  # kinds not watched hold nothing
    assert {path for path, _ in api.requests} == {"/api/v1/pods", "/apis/discovery.k8s.io/v1/endpointslices"}


def test_kubeconfig_errors_are_one_line(tmp_path):
    with pytest.raises(ClusterConfigError, match=r"^kubeconfig .*missing\.yaml: ") as e:
        load_api_client(tmp_path / "missing.yaml")
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    with pytest.raises(ClusterConfigError, match=r"^kubeconfig .*bad\.yaml: "):
        load_api_client(bad)


def test_in_cluster_config_over_tls_with_the_service_account(tmp_path, monkeypatch):
    """The pod's service account: host and port from the environment, token and CA from files, HTTPS."""
    key, cert = tmp_path / "tls.key", tmp_path / "ca.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=kube-apiserver", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    token = tmp_path / "token"
    token.write_text("in-cluster-token")
    server = FakeApiServer(token="in-cluster-token", tls=(str(cert), str(key))).start()
    state = None
    try:
        _seed(server)
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
        monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
        monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(cert))
        state = ClusterState(load_api_client(), node_name="n1", watch_timeout=30).start()
        assert state.wait_synced(10)
        assert _names(state) == ["api-7f9c"]
        server.apply(o.pod("over-tls", ips=("10.244.1.50",)))
        wait_until(lambda: "over-tls" in _names(state))
    finally:
        if state is not None:
            state.close()
        server.stop()


def test_in_cluster_config_outside_a_cluster_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ClusterConfigError, match=r"^in-cluster config: .*not set"):
        load_api_client()


def test_bad_arguments_are_one_line_errors(api, tmp_path):
    client = load_api_client(api.kubeconfig(tmp_path / "kc"))
    with pytest.raises(ValueError, match=r"^node_name: "):
        ClusterState(client, node_name="")
    with pytest.raises(ValueError, match=r"^kinds: 'secrets' is not one of"):
        ClusterState(client, node_name="n1", kinds=["secrets"])
    client.close()


def test_backoff_is_exponential_with_jitter_and_capped():
    rnd = random.Random(7)
    backoff = Backoff(base=0.5, cap=30.0)
    for attempt in range(12):
        ceiling = min(30.0, 0.5 * 2**attempt)
        delays = [backoff.delay(attempt, rnd) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered: agents that lost the API server together do not retry together
    assert backoff.delay(10_000, rnd) <= 30.0


def test_a_failing_listener_is_logged_in_one_line_and_the_watch_goes_on(api, make_state, caplog):
    _seed(api)
    state = make_state(kinds=["pods"]).start()
    assert state.wait_synced(10)
    state.subscribe(lambda *event: 1 / 0)
    api.apply(o.pod("after-bad-listener", ips=("10.244.1.70",)))
    api.apply(o.pod("and-another", ips=("10.244.1.71",)))
    wait_until(lambda: "and-another" in _names(state))
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "connprobe.cluster"]
    assert errors and all(r.exc_info is None and "division by zero" in r.getMessage() for r in errors)


def test_the_package_exports_what_it_names():
    import connprobe.cluster as cluster

    assert all(hasattr(cluster, name) for name in cluster.__all__)
    assert sorted(cluster.__all__) == cluster.__all__
