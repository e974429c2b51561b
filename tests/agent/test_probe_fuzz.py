"""Hypothesis against `/probe`'s query string and scrape-timeout header: whatever arrives, the answer is 200, 400
(one line, no traceback) or 429, never a 5xx; no thread or file descriptor is left behind.

The agent runs in a thread with its own event loop; its DNS goes to a dead loopback port, and a recording socket
class refuses any connect beyond loopback, so a generated target can never send a packet elsewhere. Failing
examples are kept in hypothesis' example database (`.hypothesis/`) and printed as a reproduction blob."""

from __future__ import annotations

import asyncio
import http.client
import os
import threading
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from connprobe.agent import Agent
from connprobe.probepolicy import ProbeLimiter
from connprobe.web import start_server
from prober.resolve import ResolvConf
from tests.agent.helpers import free_port
from tests.agent.test_hostile_client import ConnectRecorder, probe_config
from tests.leaks import FUZZ_SEED

SAFE_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Nd"), blacklist_characters="[]:"), max_size=40)
HOSTS = st.one_of(st.sampled_from(["127.0.0.1", "127.0.0.1", "[::1]", "localhost", "169.254.169.254", "[fe80::1]",
                                   "[fd00:ec2::254]", "[::ffff:169.254.169.254]", "meta.test", "x..y", "-a-", ""]),
                  SAFE_TEXT)
PORTS = st.one_of(st.just(""), st.integers(0, 70000).map(lambda p: f":{p}"), st.sampled_from([":", ":x", ":-1"]))


@st.composite
def targets(draw, upstream: str):
    kind = draw(st.sampled_from(["url", "hostport", "known", "known", "text"]))
    if kind == "known":
        return draw(st.sampled_from([upstream + "/ok", upstream + "/redirect?to=http://169.254.169.254/",
                                     "127.0.0.1:1", "resolv.conf", "http://127.0.0.1:1/"]))
    if kind == "text":
        return draw(SAFE_TEXT)
    host, port = draw(HOSTS), draw(PORTS)
    if kind == "hostport":
        return host + port
    scheme = draw(st.sampled_from(["http", "https", "ftp", "", "HTTP", "http:"]))
    path = draw(st.text(max_size=20).map(urllib.parse.quote))
    userinfo = draw(st.sampled_from(["", "u:p@", "tok@", "@"]))
    return f"{scheme}://{userinfo}{host}{port}/{path}"


@st.composite
def queries(draw, upstream: str, fifo: str):
    params: list[tuple[str, str]] = []
    often = st.integers(0, 9).map(bool)  # true 9 times in 10: most requests get as far as probing
    if draw(often):
        params.append(("target", draw(targets(upstream))))
    if draw(st.booleans()):
        params.append(("module", draw(st.sampled_from(["http_2xx", "tcp", "with_token", "token_loopback"] * 4
                                                      + ["nope", "", "\x00", "http_2xx\n"]))))
    if draw(st.integers(0, 3).map(lambda n: n == 0)):
        params.append(("source", draw(st.one_of(st.sampled_from(["host", "/dev/zero", fifo, "/proc/1/ns/net",
                                                                 "cp-unknown", "declared", "", "\x00"]), SAFE_TEXT))))
    if draw(st.booleans()):
        params.append(("budget", draw(st.one_of(st.sampled_from(["300ms", "0", "-1s", "inf", "nan", "1e400",
                                                                 "9" * 400]), st.text(max_size=10)))))
    if draw(st.booleans()):
        params.append(("debug", draw(st.sampled_from(["true", "false", "1", ""]))))
    if draw(st.booleans()):
        params.append(("probe", draw(st.text(max_size=300))))
    params += draw(st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=3))
    query = urllib.parse.urlencode(params)
    raw = draw(st.sampled_from(["", "", "", "", "&target=%ff%fe", "&source=%2Fdev%2Fnull", "&&&", "&target", "&=x",
                                "&%zz"]))
    return query + raw


HEADERS = st.one_of(st.none(), st.sampled_from(["nan", "inf", "-inf", "-1", "0", "0.9", "1.2", "3", "1e309", "",
                                                " 2 ", "9" * 400]),
                    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=12))


class AgentThread:
    """An agent and its web server on their own loop in a thread (hypothesis' test functions are synchronous)."""

    def __init__(self, config):
        self.config = config
        self.port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.error: BaseException | None = None

    def start(self, dns_port: int) -> AgentThread:
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main(dns_port)), name="agent-under-fuzz")
        self.thread.start()
        assert self._ready.wait(30), self.error
        return self

    async def _main(self, dns_port: int) -> None:
        try:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            agent = Agent(self.config, kernel=False)
            await agent.start()
            agent.env.resolv_conf = ResolvConf(nameservers=("127.0.0.1",), port=dns_port, timeout=0.3, attempts=1)
            server = await start_server(agent, "127.0.0.1", 0, limiter=ProbeLimiter(64, rate=100_000))
            await agent.wait_ready(10)
            self.port = server.addresses[0][1]
        except BaseException as exc:
            self.error = exc
            self._ready.set()
            raise
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.cleanup()
            await agent.stop()

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory):
    import asyncio as _asyncio

    from tests.agent.test_hostile_client import Upstream

    tmp = tmp_path_factory.mktemp("fuzz")
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    up_holder = {}
    up_loop = _asyncio.new_event_loop()
    up_thread = threading.Thread(target=up_loop.run_forever, name="fuzz-upstream")
    up_thread.start()
    up_holder["up"] = _asyncio.run_coroutine_threadsafe(Upstream().start(), up_loop).result(10)
    upstream = up_holder["up"].url
    cfg = probe_config(tmp / "c.yml", upstream, probes=[
        {"name": "d", "module": "http_2xx", "target": upstream + "/ok", "source": "netns declared",
         "interval": "1h"}])
    agent = AgentThread(cfg).start(dns_port=free_port())
    yield {"port": agent.port, "upstream": upstream, "fifo": str(fifo)}
    agent.stop()
    _asyncio.run_coroutine_threadsafe(up_holder["up"].runner.cleanup(), up_loop).result(10)
    up_loop.call_soon_threadsafe(up_loop.stop)
    up_thread.join(10)
    up_loop.close()


def _ask(port: int, path: str, header: str | None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"X-Prometheus-Scrape-Timeout-Seconds": header} if header is not None else {}
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_probe_query_strings_never_give_a_5xx(fuzz_env, monkeypatch):
    ConnectRecorder().install(monkeypatch)
    port = fuzz_env["port"]
    assert _ask(port, "/metrics", None)[0] == 200  # worker threads exist from here on
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    seen: dict[int, int] = {}

    @seed(FUZZ_SEED)
    @settings(max_examples=1000, deadline=None, print_blob=True, suppress_health_check=list(HealthCheck))
    @given(query=queries(fuzz_env["upstream"], fuzz_env["fifo"]), header=HEADERS)
    def check(query: str, header: str | None) -> None:
        status, body = _ask(port, "/probe?" + query, header)
        seen[status] = seen.get(status, 0) + 1
        assert status in (200, 400), (status, body)
        text = body.decode("utf-8")
        assert "Traceback" not in text
        if status == 400:
            assert text.endswith("\n") and text.count("\n") == 1, text

    check()
    assert seen.get(200) and seen.get(400), seen  # the generator reaches both the probes and the refusals
    assert _ask(port, "/-/healthy", None)[0] == 200
    assert threading.active_count() == threads
    assert len(os.listdir("/proc/self/fd")) <= fds + 2  # hypothesis' own database files may stay open
