"""The two-node rows of the fault matrix end to end (connprobe/lab/twonode.py), IPv4 and IPv6, three trials
each: node A alone (single-node mode) gets its single-node verdict, node A asking node B's agent gets the
cause with which node saw what. A trial whose fault acted on no packet is a lab error, run again."""

from __future__ import annotations

import pytest
import pytest_asyncio

from connprobe.lab.twonode import TWO_NODE_SCENARIOS, TwoNodes, run_two_node_scenario

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio(loop_scope="module")]

TRIALS = 3
LAB_RETRIES = 2


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def nodes(lab, tmp_path_factory):
    async with TwoNodes(lab, tmp_path_factory.mktemp("twonode-matrix")) as n:
        yield n


@pytest.mark.timeout(240)
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("sc", TWO_NODE_SCENARIOS, ids=[s.name for s in TWO_NODE_SCENARIOS])
async def test_two_node_scenario(nodes, sc, family):
    wrong = []
    for trial in range(TRIALS):
        for _ in range(1 + LAB_RETRIES):
            out, err = await run_two_node_scenario(nodes, sc, family)
            if err is None:
                break
        assert err is None, f"lab error (not a verdict): {err}"
        got = (out.alone.sub_cause or str(out.alone.cause), str(out.asked.cause), out.asked.sub_cause)
        if got != (sc.alone, sc.expected, sc.expected_sub) or sc.fact not in out.asked.facts[0]:
            wrong.append(f"trial {trial}: {got} — {out.asked.facts}")
            continue
        assert bool(out.asked.remote) == sc.asks
        assert out.asked.evidence, "a verdict without the events that decided it"
        if sc.agrees:  # decided on node A; node B was asked whether it agrees: it never contradicts here
            assert out.asked.remote[0].available, out.asked.remote
            assert out.asked.confidence == out.alone.confidence, out.asked.facts
            said = [f for f in out.asked.facts if f.startswith(sc.agrees)]
            assert len(said) == 1 and "contradicts this" not in said[0], out.asked.facts
            kinds = {e.event.kind for r in out.asked.remote for e in r.events}
            assert kinds <= {"synack_retransmit"}, out.asked.remote
    assert not wrong, f"{sc.name} v{family}: {len(wrong)}/{TRIALS} wrong:\n" + "\n".join(wrong)
