"""The secret canary: one distinct secret in every place a secret can be configured, then every output is
searched for each of them.

Places: a header value (a long one and a 2-character one), a URL's password, a username-only userinfo (HTTP
and TCP), a query value and a fragment, an OAuth2 client secret (and the Basic credentials made of it) and the
token fetched with it (the upstream's `/token` hands out a canary) — in the probe config, in a reload (a
rejected one, then an accepted one) and in `connprobe diagnose` targets. The upstream (a raw HTTP server on
127.0.0.1) answers `/echo` with a malformed header that repeats what the probe sent (its header values, its
Basic credentials and its request target), so each secret really reaches the probe's error text: the only
thing between it and the outputs is the redactor.

Outputs searched: `/metrics`, the status page, `/api/recent`, `/probe?debug=true`, the JSON-lines log, the
agent's log (stderr, debug level), `check-config` (a valid and an invalid file), `diagnose` text and
`--json` (and a usage error), the `--record` files (and their mode: 0600, an existing file included).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

from tests.agent.helpers import AgentProcess, free_port, http_get, wait_for

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "connprobe.cli"]


class EchoServer:
    """HTTP on 127.0.0.1: `/ok` answers 200; `/echo` answers a Content-Length header that repeats every
    request header value and the request target (a protocol error whose message quotes it)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.seen: list[bytes] = []  # raw requests, to check the secrets were really sent
        self.token = "CnkNoTokenYet"  # what `/token` hands out (a canary of its own)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="canary-echo", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    continue
                if not data:
                    continue
                self.seen.append(data)
                head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
                target = head[0].split(b" ")[1] if len(head[0].split(b" ")) > 1 else b"/"
                with_values = b" ".join([target] + [ln.split(b":", 1)[1].strip() for ln in head[1:] if b":" in ln])
                if target.startswith(b"/token"):  # an OAuth2 token endpoint: the canary token
                    doc = b'{"access_token": "' + self.token.encode() + b'", "token_type": "bearer"}'
                    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: " + str(len(doc)).encode() + b"\r\n\r\n" + doc)
                elif target.startswith(b"/echo"):
                    reply = b"HTTP/1.1 200 OK\r\nContent-Length: " + with_values + b"\r\n\r\n"
                else:
                    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                try:
                    conn.sendall(reply)
                except OSError:
                    pass

    def url(self, path: str, userinfo: str = "") -> str:
        return f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(5)


class Canaries:
    """Distinct secrets by place; `all()` adds the encodings a client derives from them."""

    def __init__(self, tag: str):
        self.by_place: dict[str, str] = {}
        self.tag = tag

    def new(self, place: str, value: str | None = None) -> str:
        value = value or f"Cn{self.tag}{place.replace('_', '')}{len(self.by_place)}x"
        self.by_place[place] = value
        return value

    def basic(self, user: str, password: str = "") -> str:
        """The Basic credentials an HTTP client sends for a URL's userinfo: a secret in another encoding."""
        value = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.by_place[f"basic({user}:{password})"] = value
        return value


def find_leaks(outputs: dict[str, str], canaries: Canaries) -> list[str]:
    return [f"{place} secret {secret!r} in {where}"
            for where, text in outputs.items() for place, secret in canaries.by_place.items() if secret in text]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_no_secret_reaches_any_output(tmp_path):
    c = Canaries("k")
    up = EchoServer()
    closed_port = free_port()  # nothing listens there: a refused connection
    agent = None
    try:
        hdr = c.new("header", "Bearer CnkHeaderLong0x")
        short = c.new("header_2_chars", "jQ")
        pw = c.new("password")
        user_only = c.new("username_only")
        qv = c.new("query_value")
        frag = c.new("fragment")
        tcp_user = c.new("tcp_username")
        s_pw = c.new("session_password")
        s_qv = c.new("session_query_value")
        c.basic("user", pw)
        basic_user_only = c.basic(user_only)
        c.basic("user", s_pw)
        up.token = c.new("oauth2_token")
        oauth_secret = c.new("oauth2_client_secret")
        from prober.oauth2 import basic_credentials

        oauth_basic = c.new("oauth2_basic_credentials", basic_credentials("canary", oauth_secret))
        modules = {
            "secret_http": {"prober": "http", "timeout": "800ms",
                            "http": {"headers": {"Authorization": hdr, "X-Short": short}}},
            "secret_session": {"prober": "http", "timeout": "800ms",
                               "http": {"client": "aiohttp-session", "headers": {"X-Short": short}}},
            "secret_oauth": {"prober": "http", "timeout": "800ms",
                             "http": {"oauth2": {"client_id": "canary", "client_secret": oauth_secret,
                                                 "token_url": up.url("/token")}}},
            "plain_http": {"prober": "http", "timeout": "800ms"},
            "tcp": {"prober": "tcp", "timeout": "800ms"},
        }

        def probe(name: str, module: str, target: str) -> dict:
            return {"name": name, "module": module, "target": target, "interval": "1s", "jitter": 0}

        probes = [
            probe("headers", "secret_http", up.url("/echo")),
            probe("oauth2", "secret_oauth", up.url("/echo")),
            probe("password", "plain_http", up.url(f"/echo?token={qv}#{frag}", f"user:{pw}")),
            probe("username_only", "plain_http", up.url("/echo", user_only)),
            probe("session", "secret_session", up.url(f"/echo?token={s_qv}", f"user:{s_pw}")),
            probe("refused", "plain_http", f"http://user:{pw}@127.0.0.1:{closed_port}/x?token={qv}#{frag}"),
            probe("tcp_user", "tcp", f"{tcp_user}@127.0.0.1:{up.port}"),
        ]
        cfg = tmp_path / "canary.yml"
        cfg.write_text(yaml.safe_dump({"modules": modules, "probes": probes}, sort_keys=False))

        outputs: dict[str, str] = {}
        check = run_cli("check-config", str(cfg))
        assert check.returncode == 0, check.stderr
        outputs["check-config"] = check.stdout + check.stderr

        agent = AgentProcess(cfg, tmp_path, "--no-kernel", "--log-level", "debug").start()

        def results_for(names: set[str]) -> bool:
            code, text = http_get(agent.url + "/api/recent")
            return code == 200 and names <= set(json.loads(text)["probes"])

        wait_for(lambda: results_for({p["name"] for p in probes}), 30, "a result of every probe")

        # a rejected reload: its error names the bad target
        bad_pw = c.new("rejected_reload_password")
        bad_qv = c.new("rejected_reload_query_value")
        bad = tmp_path / "bad.yml"
        bad_probes = [*probes, probe("bad", "plain_http", f"ftp://user:{bad_pw}@127.0.0.1/?token={bad_qv}")]
        bad.write_text(yaml.safe_dump({"modules": modules, "probes": bad_probes}, sort_keys=False))
        check = run_cli("check-config", str(bad))
        assert check.returncode == 1 and "ftp://" in check.stderr, check.stderr
        outputs["check-config (invalid)"] = check.stdout + check.stderr
        cfg.write_text(bad.read_text())
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "reload rejected" in http_get(agent.url + "/")[1], 20, "the rejected reload on the page")
        outputs["status page (rejected reload)"] = http_get(agent.url + "/")[1]

        # an accepted reload: new probes, new secrets
        r_hdr = c.new("reload_header", "CnkReloadHeader1")
        r_short = c.new("reload_header_2_chars", "Zv")
        r_user = c.new("reload_username_only")
        r_frag = c.new("reload_fragment")
        modules["reloaded"] = {"prober": "http", "timeout": "800ms",
                               "http": {"headers": {"X-Api-Key": r_hdr, "X-Tiny": r_short}}}
        basic_r_user = c.basic(r_user)
        probes.append(probe("after_reload", "reloaded", up.url(f"/echo#{r_frag}", r_user)))
        cfg.write_text(yaml.safe_dump({"modules": modules, "probes": probes}, sort_keys=False))
        agent.signal(signal.SIGHUP)
        wait_for(lambda: results_for({"after_reload"}), 30, "a result of the reloaded probe")
        time.sleep(2.2)  # another round of every probe

        # the secrets did go out: each one reached the upstream (or the probe's own error text)
        sent = b"\n".join(up.seen)
        for secret in (hdr, short, r_hdr, r_short, qv, s_qv, basic_user_only, basic_r_user, up.token, oauth_basic):
            assert secret.encode() in sent, f"{secret!r} never reached the upstream: the test would prove nothing"

        code, outputs["/metrics"] = http_get(agent.url + "/metrics")
        assert code == 200
        code, outputs["status page"] = http_get(agent.url + "/")
        assert code == 200 and "after_reload" in outputs["status page"]
        code, outputs["/api/recent"] = http_get(agent.url + "/api/recent")
        assert code == 200
        recent = json.loads(outputs["/api/recent"])["probes"]
        assert "<redacted>" in recent["headers"][-1]["error_detail"]  # the echo came back, redacted
        assert "Bearer <redacted>" in recent["oauth2"][-1]["error_detail"]  # the fetched token too
        assert recent["password"][-1]["target"].startswith("http://<redacted>@127.0.0.1:")
        q = urllib.parse.urlencode({"target": up.url(f"/echo?token={qv}#{frag}", f"user:{pw}"),
                                    "module": "plain_http", "debug": "true"})
        outputs["/probe debug"] = http_get(f"{agent.url}/probe?{q}")[1]
        time.sleep(0.3)  # the JSON-lines sink writes from its own queue
        agent.stop()
        outputs["JSON-lines log"] = agent.log_json.read_text()
        outputs["agent log"] = agent.stderr()
        assert "DEBUG" in outputs["agent log"] or "INFO" in outputs["agent log"]

        # diagnose: text, --json, --record (into a file that exists already with 0644), a usage error
        d_pw = c.new("diagnose_password")
        d_qv = c.new("diagnose_query_value")
        d_frag = c.new("diagnose_fragment")
        d_user = c.new("diagnose_username_only")
        c.basic("user", d_pw)
        c.basic(d_user)
        rec = tmp_path / "rec"
        rec.mkdir()
        (rec / "attempt-001-127.0.0.1.json").write_text("old")
        os.chmod(rec / "attempt-001-127.0.0.1.json", 0o644)
        d_target = up.url(f"/echo?token={d_qv}#{d_frag}", f"user:{d_pw}")
        text = run_cli("diagnose", d_target, "--no-kernel", "--record", str(rec))
        assert text.returncode == 1, text.stderr
        outputs["diagnose text"] = text.stdout + text.stderr
        rec2 = tmp_path / "rec2"  # made by diagnose
        js = run_cli("diagnose", up.url("/echo", d_user), "--no-kernel", "--json", "-n", "2", "--record", str(rec2))
        assert js.returncode == 1, js.stderr
        doc = json.loads(js.stdout)
        assert doc["target"].startswith("http://<redacted>@127.0.0.1:")
        outputs["diagnose --json"] = js.stdout + js.stderr
        usage = run_cli("diagnose", f"http://user:{d_pw}@127.0.0.1:99999/?token={d_qv}", "--no-kernel")
        assert usage.returncode == 2 and "TARGET" in usage.stderr, usage.stderr
        outputs["diagnose usage error"] = usage.stdout + usage.stderr
        files = sorted(rec.iterdir()) + sorted(rec2.iterdir())
        assert [f.name for f in files] == ["attempt-001-127.0.0.1.json",  # existed, mode 0644, rewritten
                                           "attempt-001-127.0.0.1.json", "attempt-002-127.0.0.1.json"]
        assert stat.S_IMODE(rec2.stat().st_mode) == 0o700
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f"{f} has mode {oct(f.stat().st_mode)}"
            outputs[f"record {f.parent.name}/{f.name}"] = f.read_text()
            assert json.loads(f.read_text())["result"]["error"] == "protocol_error"

        assert set(c.by_place) >= {"header", "header_2_chars", "password", "username_only", "query_value",
                                   "fragment"}
        leaks = find_leaks(outputs, c)
        assert not leaks, "secrets leaked:\n" + "\n".join(leaks)
    finally:
        if agent is not None:
            agent.stop()
        up.close()


@pytest.mark.parametrize("places", [{"a": "Cnk-found-here"}])
def test_the_search_itself_finds_a_secret(places):
    """The canary search is not blind: a secret in an output is reported with its place and output."""
    c = Canaries("k")
    for place, value in places.items():
        c.new(place, value)
    assert find_leaks({"somewhere": "x Cnk-found-here y"}, c) == ["a secret 'Cnk-found-here' in somewhere"]


def test_documents_redact_a_result_that_was_built_elsewhere():
    """`/api/recent` and the JSON lines redact again: a result made outside the prober (a watchdog, a test)
    with a raw target and a URL in its error text shows neither."""
    from connprobe.sinks import verdict_document
    from correlator import correlate
    from prober.types import ErrorKind, ProbeKind, ProbeResult

    result = ProbeResult(name="p", kind=ProbeKind.HTTP, target="http://me:Cnkpw1@h.test/x?token=Cnkqv1#Cnkfr1",
                         source="host", start_ns=1, end_ns=2, ok=False, error=ErrorKind.INTERNAL,
                         error_detail="gave up on http://Cnkuser1@h.test/?token=Cnkqv1")
    doc = json.dumps(verdict_document(correlate(result, ())))
    for secret in ("Cnkpw1", "Cnkqv1", "Cnkfr1", "Cnkuser1"):
        assert secret not in doc
    assert '"target": "http://<redacted>@h.test/x?token=<redacted>#<redacted>"' in doc
