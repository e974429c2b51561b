"""`connprobe agent` as a process in the lab with an ICMP probe: it keeps CAP_NET_RAW (and drops the rest), the
reply's hop limit is on /metrics, and a policy drop of the echo requests becomes policy_drop/echo with kernel
evidence."""

from __future__ import annotations

import pytest

from tests.agent.helpers import AgentProcess, last_recent, samples_named, wait_for, write_config

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(180)]


def test_agent_icmp_probe_names_a_policy_drop_of_its_echo(lab, tmp_path):
    source = f"netns {lab.ns('client').name}"
    probes = [{"name": "gw6", "module": "ping", "target": lab.server("srv2").addr6, "source": source,
               "interval": "1s", "jitter": 0}]
    cfg = write_config(tmp_path / "agent.yml", probes, {"ping": {"prober": "icmp", "timeout": "800ms"}})
    agent = AgentProcess(cfg, tmp_path)
    try:
        agent.start()
        wait_for(lambda: (last_recent(agent, "gw6") or {}).get("cause") == "ok", 20, "gw6 healthy")
        m = agent.metrics()
        assert samples_named(m, "probe_icmp_reply_hop_limit", probe="gw6") == {
            frozenset({("probe", "gw6"), ("target", lab.server("srv2").addr6), ("source", lab.ns("client").name)}):
            63.0}
        held = samples_named(m, "connprobe_capability_held", capability="CAP_NET_RAW")
        assert held and all(v == 1.0 for v in held.values()), held
        with lab.icmp_echo_drop("srv2", direction="in", family="ipv6"):
            last = wait_for(lambda: (d := last_recent(agent, "gw6")) and d["cause"] == "policy_drop" and d, 20,
                            "a policy_drop verdict for gw6")
        assert last["sub_cause"] == "policy_drop/echo" and last["kernel_events"] > 0, last
        wait_for(lambda: (last_recent(agent, "gw6") or {}).get("cause") == "ok", 20, "gw6 healthy again")
    finally:
        agent.stop()
