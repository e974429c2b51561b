"""The agent listening on a lab address (srv2's namespace, 0.0.0.0), asked from the lab's client namespace, a
non-loopback caller, and from srv2's own loopback: without a web config it warns at start and on the status page,
and /probe, /-/reload, /api/recent and the status page answer loopback callers only; --web.allow-unauthenticated
opens them; with basic auth every endpoint needs it and loopback is no longer special."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
import pytest
import yaml

from tests.agent.helpers import REPO, wait_for, write_config

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(240)]
PORT = 9516
LOOPBACK_ONLY = ("{path} answers loopback callers only: the agent listens beyond loopback without authentication "
                 "(configure --web.config.file, or --web.allow-unauthenticated)\n")


def curl(ns: str, url: str, *args: str) -> tuple[int, str]:
    out = subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "-m", "10", "-w", "\n%{http_code}", *args, url],
                         capture_output=True, text=True, timeout=20)
    body, _, code = out.stdout.rpartition("\n")
    return int(code or 0), body


class LabAgent:
    def __init__(self, lab, tmp: Path, *extra: str):
        self.ns = lab.ns("srv2").name
        self.addr = lab.server("srv2").addr4
        cfg = write_config(tmp / "c.yml", [])
        self.stderr_path = tmp / "agent.stderr"
        self.argv = ["ip", "netns", "exec", self.ns, sys.executable, "-m", "connprobe.cli", "agent", "--config",
                     str(cfg), "--no-kernel", "--listen", f"0.0.0.0:{PORT}", *extra]

    def __enter__(self) -> LabAgent:
        self._err = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=self._err)
        healthy = f"http://127.0.0.1:{PORT}/-/healthy"
        try:
            wait_for(lambda: self.proc.poll() is None and curl(self.ns, healthy)[0] in (200, 401), 60,
                     "the agent in srv2")
        except BaseException:
            self.__exit__(None, None, None)  # nothing left behind when it never came up
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._err.close()

    def stderr(self) -> str:
        return self.stderr_path.read_text()


RESTRICTED = [("/probe?target=http://127.0.0.1:1/", "/probe"), ("/api/recent", "/api/recent"), ("/", "/")]


def test_unauthenticated_listener_beyond_loopback_serves_loopback_only(lab, tmp_path):
    client = lab.ns("client").name
    with LabAgent(lab, tmp_path) as agent:
        base = f"http://{agent.addr}:{PORT}"
        time.sleep(0.2)
        assert ("listening on 0.0.0.0, beyond loopback, without authentication (no --web.config.file with "
                "basic_auth_users or a required client certificate): /probe, /-/reload, /api/recent and the status "
                "page answer loopback callers only") in agent.stderr()
        for path in ("/metrics", "/-/healthy", "/-/ready"):
            assert curl(client, base + path)[0] == 200, path
        for url, path in RESTRICTED:
            assert curl(client, base + url) == (403, LOOPBACK_ONLY.format(path=path)), path
        assert curl(client, base + "/-/reload", "-X", "POST", "-H", "X-Connprobe-Request: 1") == (
            403, LOOPBACK_ONLY.format(path="/-/reload"))
        # DNS rebinding: a foreign Host is refused even for the open endpoints; the node's address is fine
        assert curl(client, base + "/metrics", "-H", f"Host: rebind.attacker.example:{PORT}")[0] == 403
        # loopback callers in the agent's own namespace get everything, and the page says what is going on
        local = f"http://127.0.0.1:{PORT}"
        assert curl(agent.ns, local + "/api/recent")[0] == 200
        status, page = curl(agent.ns, local + "/")
        assert status == 200 and 'id="exposed"' in page and "beyond loopback, without authentication" in page
        assert curl(agent.ns, local + "/-/reload", "-X", "POST", "-H", "X-Connprobe-Request: 1")[0] == 200


def test_allow_unauthenticated_opens_it_and_basic_auth_secures_it(lab, tmp_path):
    client = lab.ns("client").name
    with LabAgent(lab, tmp_path, "--web.allow-unauthenticated") as agent:
        base = f"http://{agent.addr}:{PORT}"
        assert curl(client, base + "/api/recent")[0] == 200
        status, page = curl(client, base + "/")
        assert status == 200 and "answer anyone who can reach it" in page
    web = tmp_path / "web.yml"
    web.write_text(yaml.safe_dump({"basic_auth_users": {
        "prometheus": bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()}}))
    with LabAgent(lab, tmp_path, "--web.config.file", str(web)) as agent:
        base = f"http://{agent.addr}:{PORT}"
        assert "beyond loopback" not in agent.stderr()
        for path in ("/metrics", "/api/recent", "/"):
            assert curl(client, base + path)[0] == 401, path
            assert curl(client, base + path, "-u", "prometheus:pw")[0] == 200, path
        assert curl(client, base + "/-/healthy")[0] == 200  # the kubelet's check sends no credentials
        assert curl(agent.ns, f"http://127.0.0.1:{PORT}/metrics")[0] == 401  # loopback is no exception
