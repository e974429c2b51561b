"""The cluster as a target source (connprobe/targets/cluster.py), on its own: `load()` expands the config file's
cluster names against the watched state, `watch()` asks for a reload when the cluster changes what `load()`
would give, and not otherwise."""

from __future__ import annotations

import asyncio

import pytest
import yaml

from connprobe.cluster.state import Backoff, ClusterState, load_api_client
from connprobe.cluster.view import ClusterView
from connprobe.targets import ConfigFile
from connprobe.targets.cluster import ClusterTargets
from tests.cluster import objects as o

pytestmark = pytest.mark.timeout(60)


def test_load_expands_and_watch_asks_for_a_reload_on_a_change(api, tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump({
        "modules": {"tcp": {"prober": "tcp", "timeout": "1s"}},
        "probes": [{"name": "static", "module": "tcp", "target": "127.0.0.1:9"},
                   {"name": "api", "module": "tcp", "target": "svc/payments/api:http", "endpoints": True}]}))
    client = load_api_client(api.kubeconfig(tmp_path / "kc"))
    view = ClusterView(ClusterState(client, node_name="n1", watch_timeout=30, backoff=Backoff(0.02, 0.2)),
                       proc_root=str(tmp_path / "proc"))
    source = ClusterTargets(ConfigFile(path), view, resync=0.5)

    async def go():
        await source.start()
        first = source.load()
        assert [p.name for p in first.probes] == ["static"] and first.templates == ()
        assert source.notes == ("probe api: service payments/api does not exist",)
        reloads = asyncio.Queue()

        async def changed():
            await reloads.put(source.load())

        watch = asyncio.create_task(source.watch(changed))
        try:
            await asyncio.to_thread(view.wait_synced, 10)
            api.apply(o.service("api", ports=(("http", 80),)))
            api.apply(o.endpoint_slice("api-1", "api", [("10.244.2.7", "api-7f9c", "n2", True)], port=8080,
                                       port_name="http"))
            got = await asyncio.wait_for(reloads.get(), 10)
            while len(got.probes) < 3:  # the service and its slice may come as two reloads
                got = await asyncio.wait_for(reloads.get(), 10)
            assert {p.name: p.target for p in got.probes} == {
                "static": "127.0.0.1:9", "api": "10.96.0.10:80", "api~api-7f9c": "10.244.2.7:8080"}
            assert source.notes == ()
            await asyncio.sleep(1.5)  # nothing changed: three resyncs, no reload
            assert reloads.empty()
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    try:
        asyncio.run(go())
    finally:
        view.close()
