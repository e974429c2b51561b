"""Annotation discovery: Services annotated connprobe.io/probe become probes; added, changed, removed and
malformed annotations, through the stand-in API server and lab namespaces standing in for pods."""

from __future__ import annotations

import json

import pytest

from connprobe.cluster.refs import SelectorSource, ServiceRef
from connprobe.cluster.state import slim_service
from connprobe.targets.discovery import AnnotationSource
from prober.spec import ModuleSpec
from tests.agent.helpers import AgentProcess, http_get, samples_named, wait_for, write_config
from tests.cluster import labpods
from tests.cluster import objects as o

pytestmark = pytest.mark.timeout(60)


def _svc(**notes):
    return slim_service(o.service("api", ports=(("http", 80), ("admin", 9000)),
                                  annotations={f"connprobe.io/{k}": v for k, v in notes.items()}))


def test_annotations_make_templates():
    source = AnnotationSource({"web": ModuleSpec(prober="http", timeout=2.0)}, min_interval=1.0)
    (t,), problems = source.templates([_svc(probe="http:/healthz", port="admin", module="web", interval="10s",
                                            endpoints="true", source="frontend/app=web,tier=fe"),
                                       slim_service(o.service("plain"))])
    assert problems == []
    assert t.name == "svc/payments/api" and t.spec.interval == 10.0 and t.spec.module.timeout == 2.0
    assert t.parts.target == ServiceRef("payments", "api", "admin", "/healthz") and t.parts.endpoints
    assert t.parts.source == SelectorSource("frontend", {"app": "web", "tier": "fe"})
    (t,), _ = source.templates([_svc(probe="tcp")])
    assert t.parts.target == ServiceRef("payments", "api", 80) and t.parts.source is None
    assert t.spec.interval == 30.0 and not t.parts.endpoints


@pytest.mark.parametrize(("text", "namespace", "selector"), [
    ("frontend/app.kubernetes.io/name=web", "frontend", {"app.kubernetes.io/name": "web"}),
    ("app.kubernetes.io/name=web,tier=fe", "payments", {"app.kubernetes.io/name": "web", "tier": "fe"}),
    ("frontend/app=web", "frontend", {"app": "web"}),
    ("app=web", "payments", {"app": "web"}),
])
def test_source_annotation_takes_prefixed_label_keys(text, namespace, selector):
    """A namespace has no dot; the part before a '/' that has one is a label key's prefix (app.kubernetes.io/)."""
    (t,), problems = AnnotationSource().templates([_svc(probe="tcp", source=text)])
    assert problems == [] and t.parts.source == SelectorSource(namespace, selector)


@pytest.mark.parametrize(("notes", "problem"), [
    ({"probe": "udp"}, "connprobe.io/probe: 'udp' must be tcp, grpc or http:/PATH"),
    ({"probe": "tcp:/x"}, "connprobe.io/probe: 'tcp:/x': only http takes a path"),
    ({"probe": "tcp", "interval": "2ms"}, "connprobe.io/interval: 2ms is shorter than limits.min_interval (1s)"),
    ({"probe": "tcp", "interval": "soon"}, "connprobe.io/interval: "),
    ({"probe": "tcp", "port": "no such port!"}, "connprobe.io/port: svc: port 'no such port!' is neither a number "
                                                "nor a port name"),
    ({"probe": "tcp", "module": "nope"}, "connprobe.io/module: unknown module 'nope' (known: web)"),
    ({"probe": "tcp", "module": "web"}, "connprobe.io/module: web is a http module, the probe is tcp"),
    ({"probe": "tcp", "endpoints": "yes"}, "connprobe.io/endpoints: must be \"true\" or \"false\", got 'yes'"),
    ({"probe": "tcp", "source": "../app=x"}, "connprobe.io/source: namespace '..' is not a valid namespace name"),
    ({"probe": "tcp", "source": "app"}, "connprobe.io/source: 'app' must be [NAMESPACE/]KEY=VALUE"),
    ({"probe": "tcp", "colour": "red"}, "connprobe.io/colour: unknown annotation"),
    ({"probe": "tcp" + " " * 300}, "connprobe.io/probe: longer than 256 characters"),
])
def test_malformed_annotations_are_one_line_problems_never_raised(notes, problem):
    source = AnnotationSource({"web": ModuleSpec(prober="http", timeout=2.0)})
    templates, problems = source.templates([_svc(**notes)])
    assert templates == []
    (line,) = problems
    assert line.startswith(f"service payments/api: {problem}"), line
    assert "\n" not in line


def _recent(agent: AgentProcess) -> dict:
    code, text = http_get(agent.url + "/api/recent")
    assert code == 200
    return json.loads(text)["probes"]


@pytest.mark.kernel
@pytest.mark.timeout(180)
def test_discovered_probes_follow_the_annotations(lab, api, tmp_path):
    labpods.seed(api)
    proc = labpods.fake_proc(tmp_path / "proc", lab)
    cfg = write_config(tmp_path / "agent.yml", [], {"tcp": {"prober": "tcp", "timeout": "1s"}})
    agent = AgentProcess(cfg, tmp_path, "--no-kernel", "--kubernetes", "--kubernetes.discovery",
                         "--kubernetes.kubeconfig", api.kubeconfig(tmp_path / "kc"), "--kubernetes.node", "n1",
                         "--kubernetes.proc", str(proc))
    name = f"svc/payments/api@{labpods.PODS['client'][1]}"
    base = {"connprobe.io/port": "http", "connprobe.io/interval": "2s", "connprobe.io/source": "frontend/app=web"}

    def annotate(notes):
        svc = o.service("api", cluster_ips=("10.96.0.10", "fd96::10"), ports=(("http", 80),), annotations=notes)
        api.apply(svc)

    def target() -> str | None:
        got = samples_named(agent.metrics(), "probe_success", probe=name)
        return next((dict(k)["target"] for k in got), None)

    try:
        agent.start()
        assert not _recent(agent)
        # added
        annotate({**base, "connprobe.io/probe": "tcp"})
        wait_for(lambda: ((_recent(agent).get(name) or [{}])[-1]).get("cause") == "ok", 30, "the discovered probe")
        assert target() == "10.96.0.10:80"
        # changed: now an HTTP check of /ok
        annotate({**base, "connprobe.io/probe": "http:/ok"})
        wait_for(lambda: target() == "http://10.96.0.10:80/ok", 30, "the changed probe")
        # malformed: reported, the probe goes, the agent stays
        annotate({**base, "connprobe.io/probe": "http:/ok", "connprobe.io/interval": "2ms"})
        wait_for(lambda: samples_named(agent.metrics(), "connprobe_discovery_invalid_services")
                 == {frozenset(): 1.0}, 30, "the bad annotation to be counted")
        wait_for(lambda: target() is None, 30, "the probe to go")
        code, page = http_get(agent.url + "/")
        assert code == 200 and ("service payments/api: connprobe.io/interval: 2ms is shorter than "
                                "limits.min_interval (100ms)") in page
        assert "annotation discovery: service payments/api: connprobe.io/interval: 2ms" in agent.stderr()
        # fixed, then removed
        annotate({**base, "connprobe.io/probe": "tcp"})
        wait_for(lambda: target() == "10.96.0.10:80", 30, "the probe back")
        assert samples_named(agent.metrics(), "connprobe_discovery_invalid_services") == {frozenset(): 0.0}
        annotate({})
        wait_for(lambda: target() is None, 30, "the probe to go with its annotation")
    finally:
        rc = agent.stop()
    assert rc == 0, agent.stderr()[-3000:]
