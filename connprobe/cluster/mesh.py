"""Which peer agents this node probes: rendezvous (highest random weight) hashing on node names.

Every agent scores every other Ready node with a hash of the pair (self, peer) and keeps the K highest.
The choice is deterministic (the same on every run and every machine: BLAKE2b, not Python's salted `hash`),
each agent has exactly min(K, Ready peers) peers, and when one node joins or leaves an agent's set changes by
at most one peer — and only for the agents that ranked that node in their top K (about K/N of them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from connprobe.cluster.state import NodeInfo


def score(self_node: str, peer: str) -> int:
    digest = hashlib.blake2b(f"{self_node}\0{peer}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def peers(self_node: str, nodes: Iterable[NodeInfo | str], k: int) -> list[str]:
    """The K peers `self_node` probes, best-scored first. A plain name counts as a Ready node."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"k: must be a whole number >= 0, got {k!r}")
    ready = set()
    for node in nodes:
        if isinstance(node, str):
            ready.add(node)
        elif node.ready:
            ready.add(node.name)
    ready.discard(self_node)
    return sorted(ready, key=lambda peer: (-score(self_node, peer), peer))[:k]
