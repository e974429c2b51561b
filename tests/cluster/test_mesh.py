"""Rendezvous hashing of peers: deterministic, size K, NotReady skipped, minimal churn."""

from __future__ import annotations

import random

import pytest

from connprobe.cluster.mesh import peers
from connprobe.cluster.state import NodeInfo

pytestmark = pytest.mark.timeout(60)


def _nodes(n: int, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    return [f"node-{rnd.getrandbits(32):08x}" for _ in range(n)]


def test_deterministic_and_of_size_k():
    nodes = _nodes(50)
    first = peers(nodes[0], nodes, 5)
    assert len(first) == 5 and len(set(first)) == 5 and nodes[0] not in first
    assert peers(nodes[0], list(reversed(nodes)), 5) == first  # order of the input does not matter
    # fixed across runs and machines (BLAKE2b, not Python's salted hash)
    assert peers("n1", ["n1", "n2", "n3", "n4", "n5", "n6"], 3) == peers("n1", ("n6", "n5", "n4", "n3", "n2"), 3)
    assert peers("a", ["a", "b"], 5) == ["b"]
    assert peers("a", ["a"], 5) == [] and peers("a", ["a", "b"], 0) == []


def test_not_ready_nodes_are_skipped():
    names = _nodes(20, seed=1)
    infos = [NodeInfo(name, "", ready=True, addresses=()) for name in names]
    chosen = peers(names[0], infos, 4)
    sick = chosen[0]
    infos = [NodeInfo(n.name, "", ready=n.name != sick, addresses=()) for n in infos]
    after = peers(names[0], infos, 4)
    assert sick not in after and len(after) == 4
    assert set(chosen) - set(after) == {sick}


@pytest.mark.parametrize("k", [-1, 1.5, True, "3"])
def test_bad_k_is_a_one_line_error(k):
    with pytest.raises(ValueError, match=r"^k: must be a whole number >= 0, got "):
        peers("a", ["a", "b"], k)


@pytest.mark.parametrize("change", ["join", "leave"])
def test_one_node_joining_or_leaving_moves_about_k_over_n_of_the_peers(change):
    k, changed_peers, total_peers, worst = 5, 0, 0, 0
    for seed in range(40):
        nodes = _nodes(60, seed=seed)
        if change == "join":
            before_nodes, after_nodes = nodes[:-1], nodes
        else:
            before_nodes, after_nodes = nodes, nodes[:-1]
        for agent in nodes[:-1]:
            before, after = set(peers(agent, before_nodes, k)), set(peers(agent, after_nodes, k))
            moved = len(before - after)
            worst = max(worst, moved)
            changed_peers += moved
            total_peers += k
    # Each agent changes at most one peer, and only about K/N of the agents change any: the share of all
    # peer slots that move is about 1/N (K/N of the agents move 1 of their K peers).
    assert worst == 1
    share = changed_peers / total_peers
    assert share < 2 / 60, share
    assert share > 0.25 / 60, share  # it does move (the test can fail both ways)
