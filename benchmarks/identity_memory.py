"""Memory of the cluster identity at N pods: the slim Pod and EndpointSlice records `ClusterState` keeps, and
the `IdentityCache` built from them (tracemalloc, Python allocations only).

    .venv/bin/python benchmarks/identity_memory.py [N_PODS]      # default 10,000

Each pod has an IPv4 and an IPv6 address, three labels, a Deployment owner, and is an endpoint of one of
N/100 EndpointSlices. The same measurement runs as a test with a loose bound
(tests/cluster/test_identity.py::test_identity_cache_memory_at_10000_pods).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster.test_identity import measure_identity_cache


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    records, cache, keys = measure_identity_cache(n)
    print(f"{n} pods ({keys} addresses):")
    print(f"  slim Pod + EndpointSlice records  {records / 2**20:6.1f} MiB")
    print(f"  identity cache                    {cache / 2**20:6.1f} MiB")
    print(
        f"  total                             {(records + cache) / 2**20:6.1f} MiB ({(records + cache) / n:.0f} B/pod)"
    )


if __name__ == "__main__":
    main()
