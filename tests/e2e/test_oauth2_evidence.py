"""An OAuth2 token endpoint behind a policy drop, in the lab with the kernel sensor: the token fetch's connection is
one of the probe's flows, so the kernel's drop of its SYN names the cause (the target itself is never asked)."""

from __future__ import annotations

import pytest

from correlator import correlate

pytestmark = pytest.mark.kernel


@pytest.mark.timeout(120)
async def test_token_endpoint_behind_a_policy_drop(lab):
    from connprobe.sensorload import close_watch, open_watch
    from prober import HTTPSpec, ProbeEnv, run_probe
    from prober.spec import ModuleSpec, OAuth2Spec, ProbeSpec

    token_url = lab.server("srv2").url("/token")
    oauth = OAuth2Spec(client_id="prober", client_secret="lab-secret", token_url=token_url)
    spec = ProbeSpec(name="oauth", target=lab.server("srv1").url("/ok"), source=f"netns {lab.ns('client').name}",
                     interval=5, module=ModuleSpec(prober="http", timeout=1.5, http=HTTPSpec(oauth2=oauth)))
    ev = await open_watch()
    assert ev.available, ev.unavailable_reason
    try:
        async with ProbeEnv(on_local_port=ev.on_local_port) as env:
            with lab.policy_drop("srv2", direction="in", port=lab.server("srv2").port):
                (r,) = await run_probe(spec, env)
                events, status = await ev.collect(r)
    finally:
        await close_watch(ev)
    assert r.error == "connect_timeout", (r.error, r.error_detail)
    assert r.error_detail == f"oauth2 token endpoint {token_url}: no token within the probe's timeout (in connect)"
    srv2 = lab.server("srv2")
    assert [(f.remote_addr, f.remote_port) for f in r.flows if f.proto == "tcp"] == [(srv2.addr4, srv2.port)]
    v = correlate(r, events, coverage=status)
    assert v.cause == "policy_drop" and v.sub_cause == "policy_drop/syn", (v.sub_cause, v.facts)
