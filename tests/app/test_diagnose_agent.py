"""`connprobe diagnose` through the node's agent (`connprobe/agentchannel.py`): the same timeline as a standalone
diagnose, attempt by attempt; the channel refuses callers other than root, and answers hostile requests with
one line."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from connprobe.agentchannel import ChannelError, DiagnoseChannel, parse_request
from tests.agent.helpers import AgentProcess, free_port, wait_for, write_config
from tests.app.test_diagnose import normalise

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "connprobe.cli", "diagnose"]
NOBODY = 65534


def diagnose(*args: str, socket_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "160", "CONNPROBE_DIAGNOSE_SOCKET": str(socket_path)}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=90, cwd=ROOT, env=env)


@pytest.fixture
def upstream():
    """A loopback HTTP server (healthy) and a loopback port nobody listens on (refused, with a kernel RST)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield SimpleNamespace(ok=f"http://127.0.0.1:{server.server_address[1]}/", closed=f"127.0.0.1:{free_port()}")
    server.shutdown()
    server.server_close()
    t.join(5)


@pytest.fixture
def agent(tmp_path, upstream):
    if os.geteuid() != 0:
        pytest.skip("the agent's sensor needs root")
    cfg = write_config(tmp_path / "agent.yaml", [{"name": "up", "module": "http_2xx", "target": upstream.ok,
                                                  "interval": "5s"}])
    sock = tmp_path / "run" / "diagnose.sock"
    proc = AgentProcess(cfg, tmp_path, "--diagnose.socket", str(sock)).start()
    wait_for(lambda: "kernel sensor attached" in proc.stderr(), 60, "the agent's sensor")
    try:
        yield SimpleNamespace(proc=proc, sock=sock)
    finally:
        proc.stop()
    assert not sock.exists(), "the agent leaves no socket behind"


@pytest.mark.kernel
@pytest.mark.timeout(240)
def test_same_timeline_through_the_agent_as_standalone(agent, upstream):
    assert (agent.sock.stat().st_mode & 0o777) == 0o600
    assert (agent.sock.parent.stat().st_mode & 0o777) == 0o700
    for target, code in ((upstream.ok, 0), (upstream.closed, 1)):
        via = diagnose(target, "-n", "2", socket_path=agent.sock)
        alone = diagnose(target, "-n", "2", "--no-agent", socket_path=agent.sock)
        assert (via.returncode, alone.returncode) == (code, code), (via.stderr, alone.stderr)
        assert normalise(via.stdout, "LAB") == normalise(alone.stdout, "LAB"), (via.stdout, alone.stdout)
        assert "attempt 2/2" in via.stdout and "kernel evidence is off" not in via.stdout
    # the refused connection's reset is kernel evidence, in both
    assert "▲ kernel" in via.stdout
    log = agent.proc.stderr()
    assert log.count("diagnose channel: 2 attempt(s) of") == 2, log
    # the JSON document too: the same shape and verdicts through the agent
    via = json.loads(diagnose(upstream.closed, "--json", socket_path=agent.sock).stdout)
    alone = json.loads(diagnose(upstream.closed, "--json", "--no-agent", socket_path=agent.sock).stdout)
    assert [a["verdict"]["rule"] for a in via["attempts"]] == [a["verdict"]["rule"] for a in alone["attempts"]]
    assert via["attempts"][0]["events"] and alone["attempts"][0]["events"]
    # --record writes the same recordings through the agent (the window's events included)
    from correlator.record import load

    rec = agent.sock.parent.parent / "rec"
    assert diagnose(upstream.closed, "--record", str(rec), socket_path=agent.sock).returncode == 1
    (path,) = rec.iterdir()
    recording = load(path)
    assert recording.events and recording.expected_cause == "connection_refused"
    # a usage error the agent finds reads as the standalone one
    via, alone = (diagnose(upstream.ok, "--budget", "soon", *extra, socket_path=agent.sock)
                  for extra in ((), ("--no-agent",)))
    assert via.returncode == alone.returncode == 2
    assert via.stderr == alone.stderr and "--budget: 'soon' is not a duration" in via.stderr


@pytest.mark.timeout(120)
def test_without_an_agent_diagnose_runs_standalone(tmp_path, upstream):
    proc = diagnose(upstream.ok, "--no-kernel", socket_path=tmp_path / "nobody-here.sock")
    assert proc.returncode == 0, proc.stderr
    proc = diagnose(upstream.ok, socket_path=tmp_path / "nobody-here.sock")
    assert "verdict: ok" in proc.stdout and "attempt 1/1" in proc.stdout, proc.stderr


def _as_nobody(sock: Path, line: bytes) -> subprocess.CompletedProcess:
    """Connect and send `line` from a child process running as uid 65534; prints the reply or the error."""
    code = ("import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print('connect:', e.strerror); sys.exit(0)\n"
            "try:\n    s.sendall(sys.argv[2].encode() + b'\\n')\n"
            "except OSError:\n    pass  # refused before it was read: the answer is there all the same\n"
            "print(s.makefile('rb').readline().decode().strip())\n")
    return subprocess.run([sys.executable, "-c", code, str(sock), line.decode()], capture_output=True, text=True,
                          timeout=30, user=NOBODY, group=NOBODY, cwd="/")


class _NotReady:
    ready = False
    kernel_watch = None
    env = None
    sensor_state = "loading"


@pytest.mark.timeout(60)
def test_the_channel_refuses_unauthenticated_callers():
    if os.geteuid() != 0:
        pytest.skip("running a caller as another user needs root")
    request = json.dumps({"target": "http://127.0.0.1:9/"}).encode()
    with tempfile.TemporaryDirectory(prefix="connprobe-chan-") as d:
        os.chmod(d, 0o711)  # the test's callers may reach the socket: the file mode is all that is in the way

        async def scenario() -> tuple[str, str, DiagnoseChannel, DiagnoseChannel]:
            strict = DiagnoseChannel(_NotReady(), Path(d) / "strict.sock")  # the default 0600
            wide = DiagnoseChannel(_NotReady(), Path(d) / "wide.sock", mode=0o666)  # only the peer check left
            await strict.start()
            await wide.start()
            try:
                blocked = await asyncio.to_thread(_as_nobody, strict.path, request)
                refused = await asyncio.to_thread(_as_nobody, wide.path, request)
            finally:
                await strict.close()
                await wide.close()
            return blocked.stdout.strip(), refused.stdout.strip() or refused.stderr, strict, wide

        blocked, refused, strict, wide = asyncio.run(scenario())
    assert blocked == "connect: Permission denied"
    assert json.loads(refused) == {"refused": "only root may use the agent's diagnose channel"}
    assert (wide.refused, wide.served, wide.declined) == (1, 0, 0)
    assert (strict.refused, strict.served) == (0, 0)


@pytest.mark.timeout(60)
def test_hostile_requests_get_one_line(tmp_path):
    long_line = b"{" + b" " * (70 * 1024)
    cases = [
        (b"not json", "request: not JSON"),
        (b"[1, 2]", "request: must be a JSON object"),
        (json.dumps({"target": "http://x/", "shell": "rm -rf /"}).encode(), "request: field 'shell': Extra inputs"),
        (json.dumps({"target": "http://x/", "count": 10**9}).encode(), "request: field 'count'"),
        (json.dumps({"target": ""}).encode(), "request: field 'target'"),
        (json.dumps({"target": "http://x/", "timeout": "forever"}).encode(), "--timeout: 'forever' is not a duration"),
        (json.dumps({"target": "ftp:/x"}).encode(), "TARGET 'ftp:/x'"),
        (long_line, "request: longer than 65536 bytes"),
        (json.dumps({"target": "http://127.0.0.1:9/"}).encode(), "the agent is still starting"),
    ]

    async def scenario() -> list[dict]:
        chan = DiagnoseChannel(_NotReady(), tmp_path / "c.sock")
        await chan.start()
        out = []
        try:
            for line, _ in cases:
                r, w = await asyncio.open_unix_connection(str(chan.path))
                w.write(line + b"\n")
                await w.drain()
                out.append(json.loads(await asyncio.wait_for(r.readline(), 10)))
                assert await asyncio.wait_for(r.readline(), 10) == b""  # one line, then closed
                w.close()
        finally:
            await chan.close()
        assert not chan.path.exists()
        return out

    replies = asyncio.run(scenario())
    for (_, want), reply in zip(cases, replies, strict=True):
        (key, text), = reply.items()
        assert key in ("error", "unavailable") and want in text, reply
        assert "\n" not in text and "Traceback" not in text


def test_parse_request_defaults_and_bounds():
    req = parse_request(b'{"target": "dns:example.org"}')
    assert (req.count, req.timeout, req.interval, req.budget, req.source) == (1, "5s", "0s", None, "host")
    with pytest.raises(ValueError, match="field 'v'"):
        parse_request(b'{"v": 2, "target": "x:1"}')


@pytest.mark.timeout(60)
def test_a_live_socket_is_not_taken_over(tmp_path):
    async def scenario() -> str:
        first = DiagnoseChannel(_NotReady(), tmp_path / "c.sock")
        await first.start()
        try:
            second = DiagnoseChannel(_NotReady(), tmp_path / "c.sock")
            with pytest.raises(ChannelError) as err:
                await second.start()
            return str(err.value)
        finally:
            await first.close()

    assert "another agent answers there" in asyncio.run(scenario())
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()  # a socket file nobody listens on: an agent that did not stop cleanly

    async def reuse() -> None:
        chan = DiagnoseChannel(_NotReady(), tmp_path / "stale.sock")
        await chan.start()
        await chan.close()

    asyncio.run(reuse())


@pytest.mark.timeout(60)
def test_no_channel_in_a_directory_others_may_write(tmp_path):
    from connprobe.agentchannel import ChannelError

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)

    async def scenario() -> None:
        await DiagnoseChannel(_NotReady(), shared / "c.sock").start()

    with pytest.raises(ChannelError, match="writable by others"):
        asyncio.run(scenario())
    assert not (shared / "c.sock").exists()
