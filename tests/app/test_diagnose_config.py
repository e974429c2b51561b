"""`connprobe diagnose --config FILE --probe NAME`: an agent's probe re-run exactly (module, credentials, CA,
timeout); `-o text|json|yaml`; attempts printed as they finish."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "docs" / "diagnose.schema.json").read_text())
CLI = [sys.executable, "-m", "connprobe.cli", "diagnose"]


class Server:
    """127.0.0.1:0; records the Authorization header of each request; the n-th request can be held."""

    def __init__(self) -> None:
        self.auth: list[str | None] = []
        self.hold_from = 10**9
        self.release = threading.Event()
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.auth.append(self.headers.get("Authorization"))
                if len(outer.auth) >= outer.hold_from:
                    outer.release.wait(20)
                self.send_response(200)
                self.send_header("Content-Length", "7")
                self.end_headers()
                self.wfile.write(b"healthy")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def config(tmp_path, server) -> Path:
    (tmp_path / "token").write_text("tok-from-file\n")
    cfg = tmp_path / "probes.yml"
    cfg.write_text(f"""\
modules:
  api_auth:
    prober: http
    timeout: 3s
    http:
      bearer_token_file: token
      fail_if_body_not_matches_regexp: [healthy]
probes:
  - name: api
    module: api_auth
    target: http://127.0.0.1:{server.port}/healthz
    interval: 10s
    budget: 2s
""")
    return cfg


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "160"})


def test_probe_from_config_runs_as_the_agent_does(server, config):
    proc = run("--config", str(config), "--probe", "api", "--no-kernel", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    jsonschema.validate(doc, SCHEMA)
    assert server.auth == ["Bearer tok-from-file"]  # the module's credentials, read from its file
    assert doc["target"] == f"http://127.0.0.1:{server.port}/healthz" and doc["source"] == "host"
    assert doc["budget_ms"] == 2000.0  # the probe's own budget
    assert "tok-from-file" not in proc.stdout + proc.stderr

    as_yaml = run("--config", str(config), "--probe", "api", "--no-kernel", "-o", "yaml")
    assert as_yaml.returncode == 0, as_yaml.stderr
    ydoc = yaml.safe_load(as_yaml.stdout)
    jsonschema.validate(ydoc, SCHEMA)
    assert ydoc["attempts"][0]["verdict"]["cause"] == "ok"

    text = run("--config", str(config), "--probe", "api", "--no-kernel")
    assert text.returncode == 0 and "verdict: ok" in text.stdout, text.stdout + text.stderr


def test_attempts_are_printed_as_they_finish(server, config):
    """The second request is held until the first attempt's verdict has been read from the output."""
    server.hold_from = 2
    proc = subprocess.Popen([*CLI, "--config", str(config), "--probe", "api", "--no-kernel", "-n", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "COLUMNS": "160"})
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "verdict:" in line:
                break
        assert any("attempt 1/2" in s for s in seen), seen
        # the verdict above came out while the second attempt cannot finish: the server holds its request
        assert proc.poll() is None and not server.release.is_set()
        server.release.set()
        rest = proc.stdout.read()
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert "attempt 2/2" in rest and rest.count("verdict: ok") == 1 and "2 attempt(s), 0 with a problem" in rest


@pytest.mark.parametrize("args,message", [
    (["--probe", "nosuch"], "connprobe diagnose: --probe: no probe 'nosuch' in {cfg} (probes: api)"),
    (["--probe", "api", "http://127.0.0.1:1/"],
     "connprobe diagnose: TARGET 'http://127.0.0.1:1/': not with --config (the probe's target is used)"),
    ([], "connprobe diagnose: --config: needs --probe NAME"),
    (["--probe", "api", "--from", "cp-x"], "connprobe diagnose: --from: not with --config (the probe's own "
                                            "setting is used)"),
    (["--probe", "api", "--timeout", "1s"], "connprobe diagnose: --timeout: not with --config"),
    (["--probe", "api", "--json", "-o", "yaml"], "connprobe diagnose: --json: not with -o yaml"),
])
def test_usage_errors(config, args, message):
    proc = run("--config", str(config), *args, "--no-kernel")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert " ".join(proc.stderr.split()).startswith(message.format(cfg=config)), proc.stderr


def test_config_problems_are_usage_errors(tmp_path):
    proc = run("--config", str(tmp_path / "missing.yml"), "--probe", "api", "--no-kernel")
    assert proc.returncode == 2 and "cannot read: No such file or directory" in proc.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text("modules: {m: {prober: http, http: {use_proxy_dns: true}}}\nprobes: []\n")
    proc = run("--config", str(bad), "--probe", "api", "--no-kernel")
    assert proc.returncode == 2
    assert "--config: module \"m\": http.use_proxy_dns: blackbox_exporter key not supported" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("--probe", "api", "--no-kernel")
    assert proc.returncode == 2 and "--probe: needs --config FILE" in proc.stderr
    proc = run("--no-kernel")
    assert proc.returncode == 2 and "TARGET: required (or --config FILE --probe NAME)" in proc.stderr
