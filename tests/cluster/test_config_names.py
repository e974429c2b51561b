"""Probes written with cluster names in the config: parsed into templates, hostile names refused with one line
naming the probe and the field; without --kubernetes the agent refuses them."""

from __future__ import annotations

import pytest
import yaml

from connprobe.cli import main
from connprobe.cluster.refs import PodRef, SelectorSource, ServiceRef
from connprobe.config import ConfigError, parse_config

pytestmark = pytest.mark.timeout(30)

MODULES = {"tcp": {"prober": "tcp", "timeout": "1s"}, "http": {"prober": "http", "timeout": "1s"},
           "dns": {"prober": "dns", "timeout": "1s", "dns": {"query_name": "x.example"}}}


def _config(*probes: dict) -> str:
    return yaml.safe_dump({"modules": MODULES, "probes": list(probes)})


def test_cluster_probes_become_templates():
    cfg = parse_config(_config(
        {"name": "a", "module": "tcp", "target": "svc/payments/api:8080", "source": "pod frontend/web-1"},
        {"name": "b", "module": "http", "target": "svc/payments/api:http/healthz", "endpoints": True,
         "source": {"namespace": "frontend", "selector": {"app": "web", "tier": 1}}},
        {"name": "c", "module": "tcp", "target": "10.0.0.1:80"},
    ))
    assert [p.name for p in cfg.probes] == ["c"]
    a, b = cfg.templates
    assert a.parts.source == PodRef("frontend", "web-1") and a.parts.target == ServiceRef("payments", "api", 8080)
    assert not a.parts.endpoints
    assert b.parts.source == SelectorSource("frontend", {"app": "web", "tier": "1"})
    assert b.parts.target == ServiceRef("payments", "api", "http", "/healthz") and b.parts.endpoints
    assert str(b.parts.target) == "svc/payments/api:http/healthz"


@pytest.mark.parametrize(("probe", "error"), [
    ({"source": "pod frontend"}, "source: must be 'pod NAMESPACE/NAME', got 'pod frontend'"),
    ({"source": "pod Front/web"}, "source: pod: namespace 'Front' is not a valid namespace name"),
    ({"source": {"namespace": "x"}}, "source: selector: required, a non-empty mapping of label to value"),
    ({"source": {"namespace": "x", "selector": {"app": "a b"}}}, "source: selector: app: 'a b' is not a valid "
                                                                  "label value"),
    ({"source": {"namespace": "x", "selector": {"-bad": "a"}}}, "source: selector: '-bad' is not a valid label key"),
    ({"source": {"namespace": "x", "selector": {"a": "b"}, "node": "n1"}}, "source: unknown key 'node' (expected "
                                                                            "namespace, selector)"),
    ({"target": "svc/payments/api"}, "target: 'svc/payments/api' needs a port"),
    ({"target": "svc/payments/api:0"}, "target: svc: port 0 is out of range (1-65535)"),
    ({"target": "svc/payments/api:\u00b2"}, "target: svc: port '\u00b2' is neither a number nor a port name"),
    ({"target": "svc/payments/api:\u0663"}, "target: svc: port '\u0663' is neither a number nor a port name"),
    ({"target": "10.0.0.1:80", "endpoints": True}, "endpoints: only for a svc/NAMESPACE/NAME:PORT target"),
    ({"target": "svc/a/b:80", "endpoints": "yes"}, "endpoints: must be true or false, got 'yes'"),
    ({"module": "dns", "target": "svc/a/b:53"}, "target: svc/ targets work with the tcp, http, grpc probers, not dns"),
])
def test_hostile_cluster_names_are_one_line_errors(probe, error):
    body = {"name": "p", "module": "tcp", "target": "10.0.0.1:80", **probe}
    with pytest.raises(ConfigError) as exc:
        parse_config(_config(body))
    (line,) = exc.value.errors
    assert line.startswith(f'probe "p": {error}'), line


def test_check_config_lists_templates(tmp_path, capsys):
    path = tmp_path / "c.yml"
    path.write_text(_config({"name": "b", "module": "tcp", "target": "svc/payments/api:http", "endpoints": True,
                             "source": {"namespace": "frontend", "selector": {"app": "web"}}}))
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert ("  b: tcp svc/payments/api:http and each ready endpoint from frontend pods with app=web every 15s "
            "(cluster names: expanded by the agent with --kubernetes)") in out


def test_the_agent_refuses_cluster_names_without_kubernetes(tmp_path):
    import asyncio

    from connprobe.agent import Agent

    path = tmp_path / "c.yml"
    path.write_text(_config({"name": "b", "module": "tcp", "target": "svc/payments/api:80"}))

    async def go():
        agent = Agent(path, kernel=False)
        with pytest.raises(ConfigError) as exc:
            await agent.start()
        return exc.value.errors

    assert asyncio.run(go()) == ['probe "b": source/target name cluster objects: run the agent with --kubernetes']
