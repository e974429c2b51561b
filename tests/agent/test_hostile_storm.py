"""500 concurrent `/probe` calls against a running agent process: the cap answers 429 with Retry-After, the agent
never answers 5xx, its event loop is never held more than 50 ms by its own work, and the scheduled probe keeps its
interval (no skipped tick; it keeps producing results while the storm lasts)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from tests.agent.helpers import AgentProcess, free_port, parse_samples, samples_named, write_config

CALLS = 500
ROUNDS = 3


def blocked_histogram(samples: dict) -> dict[str, float]:
    buckets = samples_named(samples, "connprobe_event_loop_blocked_seconds_bucket")
    return {dict(lbl)["le"]: v for lbl, v in buckets.items()}


def runs_of(samples: dict, probe: str) -> float:
    return sum(samples_named(samples, "connprobe_probes_total", probe=probe).values())


@pytest.fixture
async def slow_upstream():
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("delay", "1")))
        return web.Response(text="slow")

    app = web.Application()
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_500_concurrent_probe_calls_get_429_and_the_loop_keeps_time(tmp_path, slow_upstream):
    port = free_port()
    # the scheduled probe asks the agent itself: its results depend on nothing this test process does
    cfg = write_config(tmp_path / "c.yml", [
        {"name": "self", "module": "http_2xx", "target": f"http://127.0.0.1:{port}/-/healthy", "interval": "0.25s",
         "timeout": "0.2s", "jitter": 0}])
    agent = AgentProcess(cfg, tmp_path, "--no-kernel", port=port)
    await asyncio.to_thread(agent.start)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
            async def metrics() -> dict:
                async with s.get(agent.url + "/metrics") as r:
                    return parse_samples(await r.text())

            async def one() -> tuple[int, str | None]:
                async with s.get(agent.url + "/probe", params={"target": slow_upstream + "/slow?delay=1",
                                                              "module": "http_2xx"}) as r:
                    await r.read()
                    return r.status, r.headers.get("Retry-After")

            before = await metrics()
            t0 = asyncio.get_running_loop().time()
            answers: list[tuple[int, str | None]] = []
            for _ in range(ROUNDS):
                answers += await asyncio.gather(*(one() for _ in range(CALLS)))
            await asyncio.sleep(0.5)
            after = await metrics()
            elapsed = asyncio.get_running_loop().time() - t0
        statuses = sorted({st for st, _ in answers})
        assert set(statuses) <= {200, 429}, statuses
        refused = [ra for st, ra in answers if st == 429]
        assert refused and all(ra is not None and int(ra) >= 1 for ra in refused)
        assert 0 < sum(1 for st, _ in answers if st == 200) <= ROUNDS * 40
        # the loop was never held more than 50 ms by the agent's own work
        b0, b1 = blocked_histogram(before), blocked_histogram(after)
        sampled = b1["+Inf"] - b0["+Inf"]
        within = b1["0.05"] - b0["0.05"]
        assert sampled >= 10 and within == sampled, str({le: b1[le] - b0[le] for le in b1})
        # the scheduled probe kept its interval
        skipped = samples_named(after, "connprobe_scheduler_skipped_ticks_total")
        assert list(skipped.values()) == [0.0]
        assert list(samples_named(after, "probe_success", probe="self").values()) == [1.0]
        runs = runs_of(after, "self") - runs_of(before, "self")
        assert runs >= elapsed / 0.25 / 2, (runs, elapsed)  # every 0.25 s; half of them is a generous floor
    finally:
        await asyncio.to_thread(agent.stop)
    assert "Traceback" not in agent.stderr()
